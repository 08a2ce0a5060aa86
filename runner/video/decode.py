"""Frame sampling from a video file: PyAV first, OpenCV as the fallback.

Frames are yielded at a stride (every Nth decoded frame) with their index and presentation
timestamp in milliseconds. Files that cannot be opened, hold no video stream, or stop decoding
part way (a truncated download) raise :class:`VideoDecodeError` with a short ``reason`` code that
the stage writes into its quarantine list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from runner.core.errors import UserError


class VideoDecodeError(UserError):
    """The file is not a readable video. ``reason`` is a short code for the quarantine list."""

    def __init__(self, reason: str, detail: str, *, frames_read: int = 0) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.frames_read = frames_read


@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    frame_count: int | None  # as the container declares it (may be missing or wrong)
    duration_s: float | None
    codec: str
    decoder: str  # "pyav" or "opencv"
    rotation: int = 0  # display rotation applied to every frame (degrees counterclockwise)


@dataclass
class Frame:
    index: int  # 0-based index of the decoded frame in the stream
    timestamp_ms: float
    rgb: np.ndarray = field(repr=False)  # HxWx3 uint8


def probe_video(path: str | Path, *, decoder: str = "auto") -> VideoInfo:
    """Open the file and read its stream parameters (no frames decoded)."""
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError("missing", f"{path} does not exist or is not a file")
    if decoder in ("auto", "pyav"):
        try:
            return _probe_pyav(path)
        except VideoDecodeError:
            if decoder == "pyav":
                raise
            err = None
        except ImportError as exc:  # PyAV not installed: fall back
            if decoder == "pyav":
                raise VideoDecodeError("no_decoder", f"PyAV is not installed ({exc})") from None
            err = exc
        del err
    return _probe_opencv(path)


def _probe_pyav(path: Path) -> VideoInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no_video_stream", f"{path.name} has no video stream")
            s = container.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0) or 0.0
            duration = None
            if s.duration is not None and s.time_base is not None:
                duration = float(s.duration * s.time_base)
            elif container.duration:
                duration = container.duration / 1e6
            frames = int(s.frames) if s.frames else None
            width, height = int(s.codec_context.width), int(s.codec_context.height)
            rotation = _first_frame_rotation(container, s)
            if rotation % 180:
                width, height = height, width
            return VideoInfo(str(path), width, height, fps, frames, duration, s.codec_context.name, "pyav",
                             rotation)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError("unreadable", f"{path.name} cannot be opened as a video ({exc})") from None


def _first_frame_rotation(container: object, stream: object) -> int:
    """The display rotation (phone videos shot upright carry one) read off the first frame."""
    try:
        for frame in container.decode(stream):  # type: ignore[attr-defined]
            return _quarter_turns(getattr(frame, "rotation", 0) or 0) * 90
    except Exception:  # an undecodable start shows up when the frames are read
        return 0
    return 0


def _quarter_turns(rotation: float) -> int:
    return int(round(float(rotation) / 90.0)) % 4


def _upright(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """Apply the display matrix's rotation (counterclockwise degrees), as players do."""
    k = _quarter_turns(rotation)
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _probe_opencv(path: Path) -> VideoInfo:
    import cv2

    cap = cv2.VideoCapture(str(path))  # OpenCV applies the display rotation itself
    try:
        if not cap.isOpened():
            raise VideoDecodeError("unreadable", f"{path.name} cannot be opened as a video (OpenCV)")
        w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w <= 0 or h <= 0:
            raise VideoDecodeError("no_video_stream", f"{path.name} has no video stream (OpenCV)")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
        codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip() or "?"
        return VideoInfo(str(path), w, h, fps, n, (n / fps) if (n and fps) else None, codec, "opencv")
    finally:
        cap.release()


def iter_frames(
    path: str | Path,
    *,
    stride: int = 1,
    decoder: str = "auto",
    wanted: set[int] | None = None,
    max_frames: int | None = None,
    stats: dict | None = None,
) -> Iterator[Frame]:
    """Yield every ``stride``-th frame (index 0, stride, 2*stride, ...) as RGB.

    ``wanted`` restricts the yielded frames to those indices (a second pass over a few frames).
    A decode error after some frames raises :class:`VideoDecodeError` with reason "truncated"
    once the readable frames have been yielded, so the caller decides what to keep.
    ``stats`` (a dict) receives "decoded": how many frames were decoded in all, and "info".
    """
    if stride < 1:
        raise ValueError("stride must be >= 1")
    info = probe_video(path, decoder=decoder)
    stats = stats if stats is not None else {}
    stats["info"] = info
    stats["decoded"] = 0
    if info.decoder == "pyav":
        yield from _iter_pyav(Path(path), stride, wanted, max_frames, stats)
    else:
        yield from _iter_opencv(Path(path), stride, wanted, max_frames, info.fps, stats)


def _take(index: int, stride: int, wanted: set[int] | None) -> bool:
    if wanted is not None:
        return index in wanted
    return index % stride == 0


def _iter_pyav(path: Path, stride: int, wanted: set[int] | None, max_frames: int | None,
               stats: dict) -> Iterator[Frame]:
    import av

    last = max(wanted) if wanted else None
    n_out = 0
    index = -1
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError("unreadable", f"{path.name} cannot be opened as a video ({exc})") from None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads inside libavcodec; no Python threads
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        tb = float(stream.time_base) if stream.time_base is not None else None
        start = stream.start_time or 0
        try:
            for frame in container.decode(stream):
                index += 1
                stats["decoded"] = index + 1
                if last is not None and index > last:
                    break
                if not _take(index, stride, wanted):
                    continue
                if frame.pts is not None and tb:
                    ts = (frame.pts - start) * tb * 1000.0
                else:
                    ts = index * 1000.0 / fps if fps else 0.0
                rgb = _upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0) or 0)
                yield Frame(index, round(ts, 3), rgb)
                n_out += 1
                if max_frames is not None and n_out >= max_frames:
                    return
        except av.FFmpegError as exc:
            raise VideoDecodeError(
                "truncated", f"decoding stopped after frame {index} ({exc})", frames_read=index + 1
            ) from None
    finally:
        container.close()
    if index < 0:
        raise VideoDecodeError("no_frames", f"{path.name} holds no decodable video frame")


def _iter_opencv(path: Path, stride: int, wanted: set[int] | None, max_frames: int | None,
                 fps: float, stats: dict) -> Iterator[Frame]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    last = max(wanted) if wanted else None
    index = -1
    n_out = 0
    try:
        while True:
            ok = cap.grab()
            if not ok:
                break
            index += 1
            stats["decoded"] = index + 1
            if last is not None and index > last:
                break
            if not _take(index, stride, wanted):
                continue
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                raise VideoDecodeError("truncated", f"decoding stopped at frame {index}", frames_read=index)
            ts = float(cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) or (index * 1000.0 / fps if fps else 0.0)
            yield Frame(index, round(ts, 3), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            n_out += 1
            if max_frames is not None and n_out >= max_frames:
                return
    finally:
        cap.release()
    if index < 0:
        raise VideoDecodeError("no_frames", f"{path.name} holds no decodable video frame")


def check_complete(info: VideoInfo, frames_decoded: int, *, tolerance: float = 0.1) -> str | None:
    """Say why a decode looks truncated (fewer frames than the container declares), else None."""
    if info.frame_count and frames_decoded < info.frame_count * (1.0 - tolerance):
        return (f"decoded {frames_decoded} of the {info.frame_count} frames the container declares; "
                "the file looks truncated")
    return None
