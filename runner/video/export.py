"""Write a VideoResult to disk: per-person sets with one _meta.json per image, person meta.json,
the optional pair set, and an `images` artifact in the ingest manifest.jsonl layout.

Layout (``identity_dir``)::

    summary.json                      video, backends, options, persons, stop reasons
    person_<k>/meta.json              track score, prototype, counts, buckets filled, stop reason,
                                      conditioning ratio
    person_<k>/timeline.json          stable(t), novelty(t) and the action per analyzed frame
    person_<k>/{anchors,coverage,challenge}/f<frame>.png + f<frame>_meta.json
    pair/f<frame>.png + f<frame>_meta.json   (two people, frames where both pass)

``images_dir``: images/<id>.png + manifest.jsonl (anchors, coverage, challenge of every person).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from runner.video.gates import GATE_VERSION
from runner.video.pipeline import VideoResult, conditioning_for, person_meta
from runner.video.selection import Candidate

SETS = ("anchors", "coverage", "challenge")
SET_TYPE = {"anchors": "anchor", "coverage": "coverage", "challenge": "challenge"}


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def candidate_meta(c: Candidate, set_name: str, *, identity_model: str, general_model: str,
                   general_is_fallback: bool, video: str) -> dict[str, Any]:
    return {
        "type": SET_TYPE[set_name],
        "person_id": c.person,
        "video": video,
        "frame_idx": c.frame_idx,
        "timestamp_ms": round(c.timestamp_ms, 3),
        "bins": c.bins.labels(),
        "pose": {"yaw": round(c.yaw, 2), "pitch": round(c.pitch, 2)},
        "quality": round(c.quality, 4),
        "novelty": round(c.novelty, 4),
        "stable": round(c.stable, 4),
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
    manifest: dict[str, dict[str, Any]] = {}
    persons_summary = []
    info = result.info
    for p in result.persons:
        pdir = identity_dir / f"person_{p.person_id}"
        cond = conditioning_for(p, result.options)
        for set_name, items in (("anchors", p.anchors), ("coverage", p.coverage), ("challenge", p.challenge)):
            sdir = pdir / set_name
            sdir.mkdir(parents=True, exist_ok=True)
            for c in items:
                stem = f"f{c.frame_idx:06d}"
                png = _png_bytes(c.crop)
                (sdir / f"{stem}.png").write_bytes(png)
                meta = candidate_meta(c, set_name, identity_model=identity_model, general_model=general_model,
                                      general_is_fallback=general_is_fallback, video=video_rel)
                _write_json(sdir / f"{stem}_meta.json", meta)
                key = f"{video_sha256}:{p.person_id}:{c.frame_idx}:{list(c.crop_box)}"
                image_id = hashlib.sha256(key.encode()).hexdigest()[:16]
                if image_id not in manifest:
                    (images_dir / "images" / f"{image_id}.png").write_bytes(png)
                    manifest[image_id] = {
                        "id": image_id,
                        "file": f"images/{image_id}.png",
                        "source": video_rel,
                        "source_index": source_index,
                        "label": label,
                        "sha256": hashlib.sha256(png).hexdigest(),
                        "width": int(c.crop.shape[1]),
                        "height": int(c.crop.shape[0]),
                        "orig_width": int(info.width) if info else 0,
                        "orig_height": int(info.height) if info else 0,
                        "orig_format": f"video/{info.codec}" if info else "video",
                        "orig_mode": "RGB",
                        "exif_transposed": False,
                        "scale": round(c.crop.shape[1] / max(1, c.crop_box[2] - c.crop_box[0]), 6),
                        "video": {"person_id": p.person_id, "frame_idx": c.frame_idx,
                                  "timestamp_ms": round(c.timestamp_ms, 3), "sets": [],
                                  "bins": c.bins.labels(), "quality": round(c.quality, 4),
                                  "stable": round(c.stable, 4), "crop_box": [int(v) for v in c.crop_box],
                                  "meta": f"person_{p.person_id}/{set_name}/{stem}_meta.json"},
                    }
                manifest[image_id]["video"]["sets"].append(SET_TYPE[set_name])
        pm = person_meta(p, conditioning=cond)
        pm["embedding_model"] = {"identity": identity_model, "general": general_model,
                                 "general_is_fallback": general_is_fallback}
        _write_json(pdir / "meta.json", pm)
        _write_json(pdir / "timeline.json", p.timeline)
        persons_summary.append(pm)
    if result.pairs:
        pair_dir = identity_dir / "pair"
        pair_dir.mkdir(parents=True, exist_ok=True)
        for pr in sorted(result.pairs, key=lambda x: x["frame_idx"]):
            stem = f"f{pr['frame_idx']:06d}"
            (pair_dir / f"{stem}.png").write_bytes(_png_bytes(pr["crop"]))
            _write_json(pair_dir / f"{stem}_meta.json", {
                "type": "pair", "video": video_rel, "frame_idx": pr["frame_idx"],
                "timestamp_ms": round(pr["timestamp_ms"], 3), "quality": round(pr["quality"], 4),
                "crop_box": [int(v) for v in pr["crop_box"]], "persons": pr["persons"],
                "embedding_model": {"identity": identity_model, "general": general_model,
                                    "general_is_fallback": general_is_fallback},
                "gate_version": GATE_VERSION,
            })
    with (images_dir / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for rec in manifest.values():
            fh.write(json.dumps(rec) + "\n")
    summary = {
        "video": video_rel,
        "source_index": source_index,
        "info": None if info is None else {k: getattr(info, k) for k in
                                           ("width", "height", "fps", "frame_count", "duration_s", "codec", "decoder")},
        "sampled_frames": result.sampled_frames,
        "decoded_frames": result.decoded_frames,
        "truncated": result.truncated,
        "empty_reason": result.empty_reason,
        "quarantine": result.quarantine,
        "persons": persons_summary,
        "pairs": len(result.pairs),
        "tracks": result.tracks,
        "notes": result.notes,
        "timings": result.timings,
        "options": result.options,
        "embedding_model": {"identity": identity_model, "general": general_model,
                            "general_is_fallback": general_is_fallback},
        "gate_version": GATE_VERSION,
        "images": len(manifest),
        **(extra_summary or {}),
    }
    _write_json(identity_dir / "summary.json", summary)
    return summary
