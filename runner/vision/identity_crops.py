"""Identity-adapter reference crops of a captioned dataset (the export stage's ``identity_crops``).

For each adapter in ``adapters`` (see :data:`runner.vision.align.ADAPTERS`), a folder
``<adapter>/`` with one sub-folder per crop it reads (``arcface112/``, ``arcface224/``,
``ffhq512/``) holding ``<image id>.png``, and ``<adapter>/manifest.json``::

    {"adapter", "crops": [{"name", "alignment", "size", "role", "template"}],
     "background": null | {"model", "session", "file", "sha256", "tiny_random_model", "output", "color",
                           "applied_to": "image crops"},
     "landmarks_from": "...", "images": [{"id", "source", "source_sha256", "identity", "keypoints",
     "pose", "files": {crop: path}, "matrix": {crop: 2x3}, "upscale": {crop: x}, "outside": {crop: f}}],
     "skipped": [{"id", "source", "reason"}]}

Only the main face of original images (not curate's crops or mirrored copies) whose identity was
checked against the character's references is used; every image left out is listed with its reason
(a derived copy, no face, identity unchecked or below the threshold, a face cut by the frame
(:data:`MAX_FACE_OUTSIDE`) or turned too far, or too small for a crop: enlarged more than
``max_upscale``). Background removal (:mod:`runner.vision.matting`), when configured, is applied to
the ``image`` crops only: the ``embedding`` crops feed ArcFace models, which were trained on
unmatted faces.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from runner.vision import align as A

LANDMARKS_FROM = {
    "dlib": "dlib 68-point landmarks reduced to 5 (eye centres: mean of each eye's 6 points; nose tip 30; "
            "mouth corners 48 and 54)",
    "insightface": "insightface detector's 5 keypoints",
}

#: A face whose 112 px ArcFace crop (the face itself) lies more than this much outside the photo is
#: cut by the frame: the adapters would embed the border colour. Wider crops (ffhq512) may run past
#: the frame, as facexlib's do; their manifests say by how much ("outside").
MAX_FACE_OUTSIDE = 0.05


@dataclass
class Settings:
    adapters: list[str]
    max_upscale: float
    max_yaw: float
    max_pitch: float
    identity_threshold: float | None
    backend: str = ""
    matting: Any = None  # runner.vision.matting.Matting or None
    output: str = "flat"
    color: tuple[int, int, int] = (255, 255, 255)


@dataclass
class Plan:
    """One image's crops per adapter, or why it is skipped (for all adapters or for some)."""

    record: dict[str, Any]
    face: dict[str, Any] | None = None
    skip: str | None = None
    skip_adapter: dict[str, str] = field(default_factory=dict)


def _needed(adapters: Iterable[str]) -> list[A.Crop]:
    return list(dict.fromkeys(c for a in adapters for c in A.ADAPTERS[a]))


def plan_image(rec: dict[str, Any], analysis: dict[str, Any] | None, s: Settings) -> Plan:
    """What to do with one dataset record (see the module docstring for the rules)."""
    p = Plan(rec)
    if rec.get("parent"):
        p.skip = f"a derived copy (crop or mirror) of {rec['parent']}: identity crops come from original images"
    elif analysis is None or analysis.get("error"):
        p.skip = "not in the analysis" if analysis is None else f"not analyzed: {analysis['error']}"
    elif analysis.get("main_face") is None:
        p.skip = "no face found"
    elif s.identity_threshold is None:
        p.skip = "identity not checked: the spec has no character.references"
    elif analysis.get("identity") is None or analysis["identity"] < s.identity_threshold:
        p.skip = f"identity {analysis.get('identity')} below the threshold {s.identity_threshold} (kept by a reviewer?)"
    if p.skip:
        return p
    face = analysis["faces"][analysis["main_face"]]
    p.skip = A.face_problem(face.get("keypoints"), face.get("pose"), analysis["width"], analysis["height"],
                            max_yaw=s.max_yaw, max_pitch=s.max_pitch)
    if p.skip:
        return p
    cut = A.outside_fraction(A.matrix(face["keypoints"], "arcface", 112), 112, analysis["width"], analysis["height"])
    if cut > MAX_FACE_OUTSIDE:
        p.skip = f"face cut by the frame edge: {cut:.0%} of its ArcFace crop lies outside the image"
        return p
    p.face = face
    for adapter in s.adapters:
        for crop in A.ADAPTERS[adapter]:
            up = A.upscale_of(face["keypoints"], crop)
            if up > s.max_upscale:
                p.skip_adapter[adapter] = (f"face too small for the {crop.name} crop: the eyes are "
                                           f"{A.eye_distance(face['keypoints']):.0f} px apart, it would be enlarged "
                                           f"x{up:.1f} (max_upscale {s.max_upscale:g})")
                break
    return p


def _link_or_write(img: np.ndarray, dest: Path, written: dict[str, Path], name: str) -> None:
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    if name in written:
        try:
            os.link(written[name], dest)
            return
        except OSError:
            shutil.copyfile(written[name], dest)
            return
    Image.fromarray(img).save(dest, format="PNG", compress_level=1)
    written[name] = dest


def _crops_of(rgb: np.ndarray, face: dict[str, Any], crops: list[A.Crop],
              s: Settings) -> dict[str, tuple[np.ndarray, A.Aligned]]:
    out: dict[str, tuple[np.ndarray, A.Aligned]] = {}
    for crop in crops:
        al = A.align(rgb, face["keypoints"], crop.alignment, crop.size)
        pixels = al.image
        if s.matting is not None and crop.role == "image":
            from runner.vision.matting import composite

            pixels = composite(al.image, s.matting.alpha(al.image), s.output, s.color)
        out[crop.name] = (pixels, al)
    return out


def _entry(rec: dict[str, Any], face: dict[str, Any], sha: str, adapter: str,
           made: dict[str, tuple[np.ndarray, A.Aligned]]) -> dict[str, Any]:
    crops = A.ADAPTERS[adapter]
    return {
        "id": rec["id"], "source": rec.get("source", ""), "source_sha256": sha, "identity": rec.get("identity"),
        "keypoints": [[round(float(v), 2) for v in pt] for pt in face["keypoints"]], "pose": face.get("pose"),
        "files": {c.name: f"{c.name}/{rec['id']}.png" for c in crops},
        "matrix": {c.name: np.round(made[c.name][1].matrix, 6).tolist() for c in crops},
        "upscale": {c.name: round(A.upscale_of(face["keypoints"], c), 3) for c in crops},
        "outside": {c.name: made[c.name][1].outside for c in crops},
    }


def export(records: list[dict[str, Any]], analysis: dict[str, dict[str, Any]], ddir: Path, out: Path, s: Settings,
           progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Write every adapter's folder and manifest under ``out``; returns counts per adapter."""
    from runner.core.hashing import file_sha256
    from runner.vision.analysis import load_rgb

    entries: dict[str, list[dict[str, Any]]] = {a: [] for a in s.adapters}
    skipped: dict[str, list[dict[str, Any]]] = {a: [] for a in s.adapters}
    for rec in records:
        p = plan_image(rec, analysis.get(rec["id"]), s)
        todo = [a for a in s.adapters if not p.skip and a not in p.skip_adapter]
        rgb = None
        if todo:
            try:
                rgb = load_rgb(ddir / rec["image"])
            except Exception as exc:  # unreadable, truncated: skip it with the reason
                p.skip = f"image cannot be read: {type(exc).__name__}: {exc}"
        for a in s.adapters:
            reason = p.skip or p.skip_adapter.get(a)
            if reason:
                skipped[a].append({"id": rec["id"], "source": rec.get("source", ""), "reason": reason})
        if rgb is not None and not p.skip:
            made = _crops_of(rgb, p.face, _needed(todo), s)
            sha = file_sha256(ddir / rec["image"])
            written: dict[str, Path] = {}
            for a in todo:
                for c in A.ADAPTERS[a]:
                    _link_or_write(made[c.name][0], out / a / c.name / f"{rec['id']}.png", written, c.name)
                entries[a].append(_entry(rec, p.face, sha, a, made))
        progress()
    for a in s.adapters:
        _write_manifest(out / a, a, entries[a], skipped[a], s)
    return {a: {"images": len(entries[a]), "skipped": len(skipped[a])} for a in s.adapters}


def _write_manifest(folder: Path, adapter: str, images: list[dict[str, Any]], skipped: list[dict[str, Any]],
                    s: Settings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    background = None
    if s.matting is not None:
        background = {**s.matting.info, "output": s.output, "color": "#%02x%02x%02x" % s.color,
                      "applied_to": "image crops"}
    manifest = {
        "adapter": adapter,
        "crops": [{"name": c.name, "alignment": c.alignment, "size": c.size, "role": c.role,
                   "template": np.round(A.template(c.alignment, c.size), 4).tolist()} for c in A.ADAPTERS[adapter]],
        "background": background,
        "landmarks_from": LANDMARKS_FROM.get(s.backend, s.backend),
        "identity_threshold": s.identity_threshold,
        "images": images,
        "skipped": skipped,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
