"""The video stage's expression dynamics on real clips (../shared/data/video): the seed's failure
(a frozen face: no mouth movement, no blinks) is caught, a talking face is not called frozen.

The frozen clips are one real frame repeated, carried by a slow camera drift with sensor noise and
written to H.264 and decoded again, as a generated clip whose face did not move would be: the
landmarks then jitter by a pixel, which is what today's std-of-both rule took for movement.
Everything is measured with the stage's own functions (runner.generate.measures) and the dlib
backend (offline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.generate import measures as MS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"
FROZEN_BELOW = 0.06  # the schema's default for generate.video.dynamics.frozen_below
DYN_FRAMES = 16  # ... and for dynamics.frames

pytestmark = pytest.mark.skipif(not (DATA / "carphone.mp4").is_file(), reason="../shared/data/video is not here")


@lru_cache(maxsize=None)
def backend():
    from runner.vision.faces import get_face_backend

    return get_face_backend("dlib")


@lru_cache(maxsize=None)
def clip_frames(name: str, wanted: tuple[int, ...]) -> tuple[dict[int, Image.Image], float, int]:
    """({index: frame}, fps, frame count) decoding only ``wanted``."""
    from runner.video.decode import iter_frames, probe_video

    info = probe_video(DATA / name)
    frames = {f.index: Image.fromarray(f.rgb) for f in iter_frames(DATA / name, wanted=set(wanted))}
    return frames, float(info.fps), int(info.frame_count or 0)


def still_clip(frame: Image.Image, n: int, tmp: Path, seed: int = 0) -> list[Image.Image]:
    """``frame`` repeated n times with a drift of 0.25 px per frame, a 0.3% zoom over the clip and
    noise (sigma 2), through an H.264 file and back."""
    import av
    import cv2

    from runner.video.decode import iter_frames

    rng = np.random.default_rng(seed)
    rgb = np.asarray(frame.convert("RGB"))
    h, w = rgb.shape[:2]
    path = tmp / "still.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for k in range(n):
            m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, 1.0 + 0.003 * k / n)
            m[:, 2] += (0.25 * k, 0.1 * k)
            img = cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
            img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)[: stream.height, : stream.width]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return [Image.fromarray(f.rgb) for f in iter_frames(path)]


def suite(frames: list[Image.Image] | dict[int, Image.Image], n_frames: int, fps: float) -> dict:
    """What ClipMaker._measure does: dynamics at DYN_FRAMES evenly spaced frames, blinks on
    blink_indices, motion and identity drift (dlib's threshold)."""
    idx_dyn = MS.evenly_spaced(n_frames, DYN_FRAMES)
    idx_blink = MS.blink_indices(n_frames, fps)
    have = set(frames) if isinstance(frames, dict) else set(range(len(frames)))
    idx_dyn, idx_blink = [i for i in idx_dyn if i in have], [i for i in idx_blink if i in have]
    recs = {r["frame"]: r for r in MS.analyse_faces(frames, sorted(set(idx_dyn) | set(idx_blink)), backend())}
    dyn = MS.expression_dynamics([recs[i] for i in idx_dyn], FROZEN_BELOW, [recs[i] for i in idx_blink])
    dyn["identity_drift"] = MS.identity_drift([recs[i] for i in idx_dyn], backend().default_identity_threshold)
    seq = frames if isinstance(frames, list) else [frames[i] for i in sorted(frames)]
    pos = {i: k for k, i in enumerate(sorted(have))}
    dyn["motion"] = MS.motion_magnitude(seq, [pos[i] for i in idx_dyn], 256)
    return dyn


@pytest.mark.slow  # 10 frames through dlib, with its model load: ~5-7 s on 2 busy cores
def test_a_real_still_frame_repeated_reads_frozen(tmp_path: Path) -> None:
    """carphone.mp4 frame 10 (a 53 px face, eyes 8-9 px wide: readable) held for 10 frames: a face
    in every frame, the landmarks jitter (a std above 0.01: the old rule, both stds under 0.01,
    called it moving), no mouth movement, no blink."""
    frames, fps, _ = clip_frames("carphone.mp4", (10,))
    clip = still_clip(frames[10], 10, tmp_path)
    dyn = suite(clip, len(clip), 12.0)  # 12 fps: blinks read on every frame
    assert dyn["frames_with_landmarks"] == len(clip) and dyn["blink_frames_read"] >= 5, dyn
    assert dyn["mouth_spread"] < FROZEN_BELOW and dyn["blinks"] == 0, dyn
    assert dyn["frozen"] is True and not dyn["mouth_moves"]
    assert max(dyn["mouth_std"], dyn["eye_std"]) > 0.01, dyn  # what the old rule read as movement
    assert "mouth spread" in MS.dynamics_detail(dyn)
    assert dyn["identity_drift"]["distance"] < 20, dyn["identity_drift"]  # the same face, first to last


@pytest.mark.slow  # ~75 frames of 176x144 through dlib (upsampled HOG + 68 landmarks): ~15-20 s
def test_carphone_talking_is_not_frozen_and_its_still_frames_are(tmp_path: Path) -> None:
    _, fps, n = clip_frames("carphone.mp4", ())
    n = n or 120
    wanted = tuple(sorted(set(MS.evenly_spaced(n, DYN_FRAMES)) | set(MS.blink_indices(n, fps))))
    frames, _, _ = clip_frames("carphone.mp4", wanted)
    dyn = suite(frames, n, fps)
    assert dyn["frozen"] is False and dyn["mouth_moves"], dyn
    assert dyn["mouth_spread"] > 3 * FROZEN_BELOW, dyn  # talking, mouth wide open at 56-62 and 104-117
    assert dyn["blinks"] is not None and dyn["blinks"] >= 2, dyn  # blinks at 42, 92, 112
    assert all(min(abs(f - b) for b in (42, 92, 112)) <= 2 for f in dyn["blink_frames"]), dyn["blink_frames"]
    assert dyn["identity_drift"]["distance"] < 30, dyn["identity_drift"]  # the same man throughout
    # the open-mouth frame, held: the hardest still (a wide mouth's landmarks jitter most)
    still = still_clip(frames[60], 12, tmp_path, seed=1)
    sdyn = suite(still, len(still), 12.0)
    assert sdyn["frozen"] is True, sdyn
    assert dyn["motion"]["px_per_frame"] > sdyn["motion"]["px_per_frame"], (dyn["motion"], sdyn["motion"])


@pytest.mark.slow  # 33 frames of 640x360 through dlib: ~8-15 s
def test_hamilton_singing_is_not_frozen_and_its_still_frame_is(tmp_path: Path) -> None:
    """The stage shot (frames 90-210, one face of 91-108 px at yaw 30-50 degrees, singing, eyes open)."""
    wanted = tuple(range(90, 211, 5))
    frames, fps, _ = clip_frames("short_hamilton_clip.mp4", wanted)
    seq = [frames[i] for i in wanted]  # the stage shot's frames at every 5th, as a clip of its own
    dyn = suite(seq, len(seq), fps / 5)
    assert dyn["frames_with_landmarks"] >= 12 and dyn["mouth_moves"] and dyn["frozen"] is False, dyn
    assert not dyn["blinks"], dyn  # open eyes are not called blinks (tests/test_eyes_in_clips.py)
    still = still_clip(frames[100], 8, tmp_path)
    sdyn = suite(still, len(still), 8.0)
    assert sdyn["frozen"] is True, sdyn


def test_blink_runs_and_unread_tracks() -> None:
    """Runs of shut frames are one blink; under 5 readable frames: no count (None), not 0."""
    open_eye = {"left": {"sclera": 1.0, "edges": 1.0, "dark": 1.0}, "right": {"sclera": 1.0, "edges": 1.0, "dark": 1.0}}
    shut_eye = {k: {"sclera": 0.1, "edges": 0.1, "dark": 0.1} for k in ("left", "right")}
    seq = [open_eye] * 4 + [shut_eye] * 2 + [open_eye] * 4 + [shut_eye] + [open_eye] * 3
    recs = [{"frame": 2 * i, "eye_appearance": a} for i, a in enumerate(seq)]
    got = MS.count_blinks(recs)
    assert got["count"] == 2 and got["frames"] == [8, 10, 20], got
    assert MS.count_blinks(recs[:3])["count"] is None
    assert MS.blink_indices(97, 24) == list(range(0, 97, 2)) and MS.blink_indices(10, 8) == list(range(10))
    none = MS.expression_dynamics([{"frame": 0, "mouth_gap": None}], FROZEN_BELOW)
    assert none["frozen"] is None and MS.dynamics_detail(none) == "no landmarks in 2+ frames"
