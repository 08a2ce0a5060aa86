"""Training clips cut around the main person's track (issue 16, video LoRA data).

Input: a video file and the video_identity ``identity`` folder (person_<k>/timeline.json, whose
entries carry the face ``box`` per analyzed frame). A clip is ``frames`` frames taken every
``stride``-th source frame where the person is tracked continuously (no gap between analyzed
frames longer than ``max_gap`` source frames); its crop is fixed: the union of the face boxes,
grown by ``margin``, made the output's aspect, clipped to the frame. Written as H.264 mp4.
A broken or faceless video gives zero clips and a reason, never an exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHOTS = ("extreme_close_up", "close_up", "medium", "full_body", "wide")


def write_mp4(images: list[Any], path: Path, fps: int, *, crf: int = 20) -> dict[str, Any]:
    """PIL images -> H.264 mp4 (yuv420p, even sides) with PyAV; {width, height, frames}."""
    import av
    import numpy as np

    w, h = images[0].size
    w, h = w - w % 2, h - h % 2
    with av.open(str(path), mode="w", format="mp4") as out:
        st = out.add_stream("libx264", rate=int(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": str(crf), "preset": "veryfast"}
        for im in images:
            arr = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:h, :w])
            out.mux(st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(st.encode())
    return {"width": w, "height": h, "frames": len(images)}


def shot_of(face_share: float) -> str:
    """Shot type from the face box's share of the crop's height."""
    if face_share >= 0.6:
        return "extreme_close_up"
    if face_share >= 0.3:
        return "close_up"
    if face_share >= 0.15:
        return "medium"
    if face_share >= 0.07:
        return "full_body"
    return "wide"


def main_person_timeline(identity_dir: Path) -> tuple[int | None, list[dict[str, Any]], str]:
    """(person id, timeline entries with boxes, reason when none)."""
    summary_file = identity_dir / "summary.json"
    if not summary_file.exists():
        return None, [], "identity summary.json missing"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    persons = summary.get("persons") or []
    if not persons:
        return None, [], summary.get("empty_reason") or "no person tracked in the video"
    pid = int(persons[0]["person_id"])
    tl_file = identity_dir / f"person_{pid}" / "timeline.json"
    tl = json.loads(tl_file.read_text(encoding="utf-8")) if tl_file.exists() else []
    tl = sorted((e for e in tl if e.get("box")), key=lambda e: e["frame_idx"])
    if not tl:
        return pid, [], "the timeline has no face boxes (identity built before boxes were exported)"
    return pid, tl, ""


def plan_windows(tl: list[dict[str, Any]], *, frames: int, stride: int, max_gap: int,
                 max_clips: int) -> list[tuple[int, int]]:
    """(start_frame, end_frame) windows of frames*stride source frames inside continuous runs."""
    runs, cur = [], [tl[0]]
    for e in tl[1:]:
        if e["frame_idx"] - cur[-1]["frame_idx"] <= max_gap:
            cur.append(e)
        else:
            runs.append(cur)
            cur = [e]
    runs.append(cur)
    span = (frames - 1) * stride
    out = []
    for run in runs:
        a, b = run[0]["frame_idx"], run[-1]["frame_idx"]
        s = a
        while s + span <= b and len(out) < max_clips:
            out.append((s, s + span))
            s += span + stride
    return out


def crop_box(boxes: list[list[float]], frame_w: int, frame_h: int, *, margin: float,
             aspect: float) -> tuple[int, int, int, int]:
    """Union box grown by margin (of its size), widened to ``aspect`` (w/h), clipped to the frame."""
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin)
    if w / max(h, 1e-6) < aspect:
        w = h * aspect
    else:
        h = w / aspect
    w, h = min(w, frame_w), min(h, frame_h)
    if w / h > aspect:
        w = h * aspect
    else:
        h = w / aspect
    left = min(max(0.0, cx - w / 2), frame_w - w)
    top = min(max(0.0, cy - h / 2), frame_h - h)
    return int(left), int(top), int(left + w), int(top + h)


def cut_clips(video: Path, identity_dir: Path, out_dir: Path, *, frames: int = 33, stride: int = 1,
              max_per_source: int = 24, caption: str = "{trigger} {class}, {shot}, moving naturally",
              trigger: str = "", class_word: str = "person", max_side: int = 512, margin: float = 0.6,
              max_gap: int | None = None, source: str = "") -> dict[str, Any]:
    """Write clips/<id>.mp4 + clips.jsonl + summary.json under ``out_dir``; returns the summary."""
    from PIL import Image

    from runner.video.decode import VideoDecodeError, iter_frames, probe_video

    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"source": source or str(video), "clips": 0, "reason": "", "shots": {}}
    pid, tl, reason = main_person_timeline(identity_dir)
    try:
        info = probe_video(video)
    except VideoDecodeError as exc:
        reason = reason or f"unreadable video: {exc}"
        info = None
    windows = []
    if not reason and info is not None:
        gap = max_gap if max_gap is not None else max(2 * stride, 3 * (tl[1]["frame_idx"] - tl[0]["frame_idx"])
                                                      if len(tl) > 1 else 2 * stride)
        windows = plan_windows(tl, frames=frames, stride=stride, max_gap=gap, max_clips=max_per_source)
        if not windows:
            reason = f"no continuous track of {frames} frames (stride {stride})"
    fps = (info.fps if info else 0.0) or 25.0
    for s, e in windows:
        wanted = set(range(s, e + 1, stride))
        boxes = [t["box"] for t in tl if s <= t["frame_idx"] <= e]
        aspect = info.width / info.height
        box = crop_box(boxes, info.width, info.height, margin=margin, aspect=aspect)
        scale = min(1.0, max_side / max(box[2] - box[0], box[3] - box[1]))
        size = (max(2, int((box[2] - box[0]) * scale)), max(2, int((box[3] - box[1]) * scale)))
        try:
            imgs = [Image.fromarray(f.rgb).crop(box).resize(size) for f in iter_frames(video, wanted=wanted)]
        except VideoDecodeError as exc:
            summary["reason"] = f"decode stopped: {exc}"
            break
        if len(imgs) < frames:
            continue
        face_h = sum(b[3] - b[1] for b in boxes) / len(boxes)
        shot = shot_of(face_h / max(1, box[3] - box[1]))
        cid = f"p{pid}_f{s:06d}"
        meta = write_mp4(imgs, out_dir / "clips" / f"{cid}.mp4", int(round(fps / stride)))
        records.append({"id": cid, "clip": f"clips/{cid}.mp4",
                        "caption": caption.format_map({"trigger": trigger, "class": class_word,
                                                       "shot": shot.replace("_", " ")}),
                        "frames": meta["frames"], "fps": int(round(fps / stride)), "width": meta["width"],
                        "height": meta["height"], "shot": shot, "person": pid, "source": summary["source"],
                        "start_frame": s, "end_frame": e, "face_frames": len(boxes), "crop_box": list(box)})
        summary["shots"][shot] = summary["shots"].get(shot, 0) + 1
    with (out_dir / "clips.jsonl").open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    summary["clips"] = len(records)
    summary["reason"] = summary["reason"] or reason
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
