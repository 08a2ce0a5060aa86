"""Open eyes in the shared clips are not called shut: the Hamilton clip's wide shot (faces of
45-53 px, eyes 7-8 px wide, where JPEG blocks make the two eyes' iris edges differ up to 4x) and
its stage shot under warm light (the whites of the eyes lose their grey); carphone's three blinks
still read shut against the track's own open eyes."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from runner.vision import measures as M

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CARPHONE_BLINKS = (42, 92, 112)


@lru_cache(maxsize=None)
def eyes_of(clip: str, frames: tuple[int, ...]) -> tuple[tuple[int, dict | None], ...]:
    """(frame, runner.vision.measures.eye_openness) of the largest face of each frame."""
    from runner.video.decode import iter_frames
    from runner.vision.faces import get_face_backend

    backend = get_face_backend("dlib")
    out = []
    for fr in iter_frames(DATA / "video" / clip, wanted=set(frames)):
        faces = backend.analyze(fr.rgb)
        if faces:
            face = max(faces, key=lambda f: f.box[2] - f.box[0])
            out.append((fr.index, M.eye_openness(fr.rgb, face.landmarks)))
    return tuple(out)


@pytest.mark.slow  # 29 frames of 640x360
def test_hamilton_open_eyes_read_no_wink_and_no_blink() -> None:
    # frames 0-15: the wide shot; 90-210: the stage shot (Lin-Manuel Miranda's eyes open throughout)
    rows = eyes_of("short_hamilton_clip.mp4", (*range(0, 20, 5), *range(90, 215, 5)))
    assert len(rows) >= 25
    called = [(i, e["closed"]) for i, e in rows if e is not None and e["closed"] != "none"]
    assert not called, called  # the edges ratio alone called frames 5, 10 and 15 winks
    blinks = [i for (i, _), b in zip(rows, M.blinks_in_track([e and e["appearance"] for _, e in rows])) if b]
    assert not blinks, blinks  # the sclera baseline alone called frame 125 a blink


@pytest.mark.slow  # 40 frames of 176x144
def test_carphone_blinks_need_both_the_grey_white_and_the_iris_edges_gone() -> None:
    frames = tuple(sorted(set(range(0, 120, 4)) | {b + d for b in CARPHONE_BLINKS for d in (-1, 0, 1)}))
    rows = eyes_of("carphone.mp4", frames)
    shut = {i for (i, _), b in zip(rows, M.blinks_in_track([e and e["appearance"] for _, e in rows])) if b}
    assert set(CARPHONE_BLINKS) <= shut and all(min(abs(i - b) for b in CARPHONE_BLINKS) <= 1 for i in shut), shut
