"""Write a VideoResult to disk: per-person sets with one _meta.json per image, person meta.json,
the optional pair set, and an `images` artifact in the ingest manifest.jsonl layout.

Layout (``identity_dir``)::

    summary.json                      video, backends, options, persons, stop reasons
    person_<k>/meta.json              track score, prototype, counts, buckets filled, stop reason,
                                      conditioning ratio
    person_<k>/timeline.json          stable(t), novelty(t) and the action per analyzed frame
    person_<k>/anchors/anchor_001.jpg + anchor_001_meta.json        (best quality first)
    person_<k>/coverage/cov_yaw22_pitch0_neutral.jpg + ..._meta.json (bucket values in the name;
                                      a second image of a bucket gets _2)
    person_<k>/challenge/challenge_001.jpg + challenge_001_meta.json (in selection order)
    pair/f<frame>.png + f<frame>_meta.json   (two people, frames where both pass)

``images_dir``: images/<id>.png + manifest.jsonl (anchors, coverage, challenge of every person;
lossless PNG, as training reads them).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runner.video.gates import GATE_VERSION
from runner.video.pipeline import PersonResult, VideoResult, conditioning_for, person_meta
from runner.video.selection import Candidate, challenge_report

SETS = ("anchors", "coverage", "challenge")
SET_TYPE = {"anchors": "anchor", "coverage": "coverage", "challenge": "challenge"}
JPEG_QUALITY = 95


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def set_stems(set_name: str, items: list[Candidate]) -> list[str]:
    """File stems of one set: anchor_001..., challenge_001..., cov_<bucket>[_<n>]."""
    if set_name != "coverage":
        return [f"{SET_TYPE[set_name]}_{i:03d}" for i in range(1, len(items) + 1)]
    seen: dict[str, int] = {}
    stems = []
    for c in items:
        name = c.bins.bucket_name()
        seen[name] = seen.get(name, 0) + 1
        stems.append(f"cov_{name}" + (f"_{seen[name]}" if seen[name] > 1 else ""))
    return stems


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def candidate_meta(c: Candidate, set_name: str, *, file: str, identity_model: str, general_model: str,
                   general_is_fallback: bool, video: str) -> dict[str, Any]:
    return {
        "type": SET_TYPE[set_name],
        "person_id": c.person,
        "file": file,
        "video": video,
        "frame_idx": c.frame_idx,
        "timestamp_ms": round(c.timestamp_ms, 3),
        "bins": c.bins.labels(),
        "bucket": c.bins.bucket(),
        "pose": {"yaw": round(c.yaw, 2), "pitch": round(c.pitch, 2)},
        "detector": c.detector or "backend",
        "quality": round(c.quality, 4),
        "novelty": round(c.novelty, 4),
        "stable": round(c.stable, 4),
        "identity": {"basis": "embedding"} if c.admitted is None else {"basis": "track_continuity", **c.admitted},
        "strict_gate": c.strict,
        "challenge_kinds": c.challenge_kinds(),
        "face_bbox": [round(float(v), 1) for v in c.face_bbox],
        "crop_box": [int(v) for v in c.crop_box],
        "image_size": [int(c.crop.shape[1]), int(c.crop.shape[0])],
        "measures": {k: (round(float(v), 4) if isinstance(v, (int, float)) else v) for k, v in c.measures.items()},
        "embedding_model": {"identity": identity_model, "general": general_model,
                            "general_is_fallback": general_is_fallback},
        "gate_version": GATE_VERSION,
    }


@dataclass
class _Export:
    """What every file of one export shares, and the ingest manifest being built."""

    result: VideoResult
    identity_dir: Path
    images_dir: Path
    video_rel: str
    video_sha256: str
    source_index: int
    label: str
    embedding_model: dict[str, Any]
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_to_manifest(self, c: Candidate, set_name: str, meta_rel: str, png: bytes) -> None:
        """The crop as an ingest record (images/<id>.png), once however many sets hold it."""
        key = f"{self.video_sha256}:{c.person}:{c.frame_idx}:{list(c.crop_box)}"
        image_id = hashlib.sha256(key.encode()).hexdigest()[:16]
        if image_id not in self.manifest:
            info = self.result.info
            (self.images_dir / "images" / f"{image_id}.png").write_bytes(png)
            self.manifest[image_id] = {
                "id": image_id,
                "file": f"images/{image_id}.png",
                "source": self.video_rel,
                "source_index": self.source_index,
                "label": self.label,
                "sha256": hashlib.sha256(png).hexdigest(),
                "width": int(c.crop.shape[1]),
                "height": int(c.crop.shape[0]),
                "orig_width": int(info.width) if info else 0,
                "orig_height": int(info.height) if info else 0,
                "orig_format": f"video/{info.codec}" if info else "video",
                "orig_mode": "RGB",
                "exif_transposed": False,
                "scale": round(c.crop.shape[1] / max(1, c.crop_box[2] - c.crop_box[0]), 6),
                "video": {"person_id": c.person, "frame_idx": c.frame_idx,
                          "timestamp_ms": round(c.timestamp_ms, 3), "sets": [],
                          "bins": c.bins.labels(), "quality": round(c.quality, 4),
                          "stable": round(c.stable, 4), "crop_box": [int(v) for v in c.crop_box],
                          "meta": meta_rel},
            }
        self.manifest[image_id]["video"]["sets"].append(SET_TYPE[set_name])

    def write_person(self, p: PersonResult) -> dict[str, Any]:
        """person_<k>/: the three sets, meta.json and timeline.json; returns the person's meta."""
        pdir = self.identity_dir / f"person_{p.person_id}"
        em = self.embedding_model
        for set_name, items in (("anchors", p.anchors), ("coverage", p.coverage), ("challenge", p.challenge)):
            sdir = pdir / set_name
            sdir.mkdir(parents=True, exist_ok=True)
            for c, stem in zip(items, set_stems(set_name, items)):
                (sdir / f"{stem}.jpg").write_bytes(_jpeg_bytes(c.crop))
                _write_json(sdir / f"{stem}_meta.json", candidate_meta(
                    c, set_name, file=f"{stem}.jpg", identity_model=em["identity"], general_model=em["general"],
                    general_is_fallback=em["general_is_fallback"], video=self.video_rel))
                self.add_to_manifest(c, set_name, f"person_{p.person_id}/{set_name}/{stem}_meta.json",
                                     _png_bytes(c.crop))
        pm = person_meta(p, conditioning=conditioning_for(p, self.result.options))
        pm["embedding_model"] = em
        fps = (self.result.info.fps if self.result.info else 0.0) or 25.0
        pm["challenge"] = challenge_report(p.timeline, [c.frame_idx for c in p.challenge], fps=fps,
                                           challenge_max=int(self.result.options.get("challenge_max", 8)),
                                           stopped_early=p.stopped_early)
        _write_json(pdir / "meta.json", pm)
        _write_json(pdir / "timeline.json", p.timeline)
        return pm

    def write_pairs(self) -> None:
        if not self.result.pairs:
            return
        pair_dir = self.identity_dir / "pair"
        pair_dir.mkdir(parents=True, exist_ok=True)
        for pr in sorted(self.result.pairs, key=lambda x: x["frame_idx"]):
            stem = f"f{pr['frame_idx']:06d}"
            (pair_dir / f"{stem}.png").write_bytes(_png_bytes(pr["crop"]))
            _write_json(pair_dir / f"{stem}_meta.json", {
                "type": "pair", "video": self.video_rel, "frame_idx": pr["frame_idx"],
                "timestamp_ms": round(pr["timestamp_ms"], 3), "quality": round(pr["quality"], 4),
                "crop_box": [int(v) for v in pr["crop_box"]], "persons": pr["persons"],
                "embedding_model": self.embedding_model, "gate_version": GATE_VERSION,
            })

    def summary(self, persons: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        result, info = self.result, self.result.info
        return {
            "video": self.video_rel,
            "source_index": self.source_index,
            "info": None if info is None else {k: getattr(info, k) for k in
                                               ("width", "height", "fps", "frame_count", "duration_s",
                                                "codec", "decoder")},
            "sampled_frames": result.sampled_frames,
            "decoded_frames": result.decoded_frames,
            "truncated": result.truncated,
            "empty_reason": result.empty_reason,
            "quarantine": result.quarantine,
            "persons": persons,
            "pairs": len(result.pairs),
            "tracks": result.tracks,
            "detections": result.detections,
            "notes": result.notes,
            "timings": result.timings,
            "options": result.options,
            "embedding_model": self.embedding_model,
            "gate_version": GATE_VERSION,
            "images": len(self.manifest),
            **extra,
        }


def export_result(
    result: VideoResult,
    identity_dir: Path,
    images_dir: Path,
    *,
    video_rel: str,
    video_sha256: str,
    source_index: int,
    label: str,
    identity_model: str,
    general_model: str,
    general_is_fallback: bool,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write everything; returns the summary (also written to summary.json)."""
    identity_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / "images").mkdir(parents=True, exist_ok=True)
    ex = _Export(result, identity_dir, images_dir, video_rel, video_sha256, source_index, label,
                 {"identity": identity_model, "general": general_model, "general_is_fallback": general_is_fallback})
    persons = [ex.write_person(p) for p in result.persons]
    ex.write_pairs()
    with (images_dir / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for rec in ex.manifest.values():
            fh.write(json.dumps(rec) + "\n")
    summary = ex.summary(persons, extra_summary or {})
    _write_json(identity_dir / "summary.json", summary)
    return summary
