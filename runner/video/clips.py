"""Training clips cut around the main person's track (issue 16, video LoRA data).

Input: a video file and the video_identity ``identity`` folder (person_<k>/timeline.json, whose
entries carry the face ``box`` per analyzed frame). A clip is ``frames`` frames taken every
``stride``-th source frame where the person is tracked continuously (no gap between analyzed
frames longer than ``max_gap`` source frames); its crop is fixed: the union of the face boxes,
grown by ``margin``, made the output's aspect, clipped to the frame. The video is decoded once, up
to the last clip's end, for all the clips. Written as H.264 mp4.
A broken or faceless video gives zero clips and a reason, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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


def track_gap(tl: list[dict[str, Any]], stride: int, max_gap: int | None) -> int:
    """The longest gap (source frames) a clip may span: ``max_gap``, else three times the spacing
    of the analyzed frames, at least twice the cutting stride."""
    if max_gap is not None:
        return int(max_gap)
    spacing = tl[1]["frame_idx"] - tl[0]["frame_idx"] if len(tl) > 1 else 0
    return max(2 * stride, 3 * spacing)


@dataclass
class _Cut:
    """One planned clip: its source frames, fixed crop and output size, and the frames read so far."""

    start: int
    end: int
    boxes: list[list[float]]
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    images: list[Any] = field(default_factory=list)


def _plan_cuts(windows: list[tuple[int, int]], tl: list[dict[str, Any]], info: Any, *, margin: float,
               max_side: int) -> list[_Cut]:
    cuts = []
    for s, e in windows:
        boxes = [t["box"] for t in tl if s <= t["frame_idx"] <= e]
        box = crop_box(boxes, info.width, info.height, margin=margin, aspect=info.width / info.height)
        scale = min(1.0, max_side / max(box[2] - box[0], box[3] - box[1]))
        size = (max(2, int((box[2] - box[0]) * scale)), max(2, int((box[3] - box[1]) * scale)))
        cuts.append(_Cut(s, e, boxes, box, size))
    return cuts


def _read_cuts(video: Path, cuts: list[_Cut], stride: int, frames: int, summary: dict[str, Any]) -> Iterator[_Cut]:
    """Decode the video once, up to the last clip's end; yield each clip once its frames are read.
    A decode error stops the cutting (the clips already complete are kept) and sets the reason."""
    from PIL import Image

    from runner.video.decode import VideoDecodeError, iter_frames

    wanted = {f for c in cuts for f in range(c.start, c.end + 1, stride)}
    stats: dict[str, Any] = {}
    pending = iter(cuts)
    cur = next(pending, None)
    try:
        for f in iter_frames(video, wanted=wanted, stats=stats):
            while cur is not None and f.index > cur.end:  # frames missing from this clip: skip it
                cur = next(pending, None)
            if cur is None:
                break
            if f.index >= cur.start:
                cur.images.append(Image.fromarray(f.rgb).crop(cur.box).resize(cur.size))
            if len(cur.images) == frames:
                yield cur
                cur = next(pending, None)
    except VideoDecodeError as exc:
        summary["reason"] = f"decode stopped: {exc}"
    summary["decoded_frames"] = int(stats.get("decoded", 0))


def cut_clips(video: Path, identity_dir: Path, out_dir: Path, *, frames: int = 33, stride: int = 1,
              max_per_source: int = 24, caption: str = "{trigger} {class}, {shot}, moving naturally",
              trigger: str = "", class_word: str = "person", max_side: int = 512, margin: float = 0.6,
              max_gap: int | None = None, source: str = "", id_prefix: str = "") -> dict[str, Any]:
    """Write clips/<id>.mp4 + clips.jsonl + summary.json under ``out_dir``; returns the summary.
    Clip ids are ``<id_prefix>p<person>_f<start frame>`` (a prefix per source keeps them unique)."""
    from runner.video.decode import VideoDecodeError, probe_video

    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"source": source or str(video), "clips": 0, "reason": "", "shots": {},
                               "source_seconds": None, "fps": None, "clip_seconds": 0.0, "decoded_frames": 0}
    pid, tl, reason = main_person_timeline(identity_dir)
    try:
        info = probe_video(video)
    except VideoDecodeError as exc:
        reason = reason or f"unreadable video: {exc}"
        info = None
    windows = []
    if not reason and info is not None:
        windows = plan_windows(tl, frames=frames, stride=stride, max_gap=track_gap(tl, stride, max_gap),
                               max_clips=max_per_source)
        if not windows:
            reason = f"no continuous track of {frames} frames (stride {stride})"
    fps = (info.fps if info else 0.0) or 25.0
    clip_fps = int(round(fps / stride)) or 1
    if info is not None:
        summary["fps"] = round(fps, 3)
        summary["source_seconds"] = info.duration_s or ((info.frame_count or 0) / fps) or None
    cuts = _plan_cuts(windows, tl, info, margin=margin, max_side=max_side) if windows else []
    for cut in _read_cuts(video, cuts, stride, frames, summary) if cuts else ():
        face_h = sum(b[3] - b[1] for b in cut.boxes) / len(cut.boxes)
        shot = shot_of(face_h / max(1, cut.box[3] - cut.box[1]))
        cid = f"{id_prefix}p{pid}_f{cut.start:06d}"
        meta = write_mp4(cut.images, out_dir / "clips" / f"{cid}.mp4", clip_fps)
        cut.images = []
        records.append({"id": cid, "clip": f"clips/{cid}.mp4",
                        "caption": caption.format_map({"trigger": trigger, "class": class_word,
                                                       "shot": shot.replace("_", " ")}),
                        "frames": meta["frames"], "fps": clip_fps, "width": meta["width"],
                        "height": meta["height"], "shot": shot, "person": pid, "source": summary["source"],
                        "start_frame": cut.start, "end_frame": cut.end, "stride": stride,
                        "face_frames": len(cut.boxes), "crop_box": list(cut.box)})
        summary["shots"][shot] = summary["shots"].get(shot, 0) + 1
    with (out_dir / "clips.jsonl").open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    summary["clips"] = len(records)
    summary["clip_seconds"] = round(sum(r["frames"] / r["fps"] for r in records), 3)
    summary["reason"] = summary["reason"] or reason
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
