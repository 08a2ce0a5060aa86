"""runner/video/clips.py: clips cut around the main person's track (synthetic timeline on a real clip)."""

import json
from pathlib import Path

import pytest

from runner.video.clips import crop_box, cut_clips

CARPHONE = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "carphone.mp4"


def _identity(tmp_path: Path, boxes: dict[int, list[float]], persons: bool = True) -> Path:
    idd = tmp_path / "identity"
    (idd / "person_0").mkdir(parents=True)
    (idd / "summary.json").write_text(json.dumps({"persons": [{"person_id": 0}] if persons else [],
                                                  "empty_reason": "" if persons else "no faces"}))
    (idd / "person_0" / "timeline.json").write_text(json.dumps([{"frame_idx": i, "box": b} for i, b in boxes.items()]))
    return idd


def test_crop_keeps_aspect_and_frame():
    x0, y0, x1, y1 = crop_box([[60, 30, 110, 90]], 176, 144, margin=0.3, aspect=176 / 144)
    assert 0 <= x0 < x1 <= 176 and 0 <= y0 < y1 <= 144
    assert abs((x1 - x0) / (y1 - y0) - 176 / 144) < 0.05
    assert x0 <= 60 and x1 >= 110 and y0 <= 30 and y1 >= 90


@pytest.mark.skipif(not CARPHONE.exists(), reason="shared data missing")
def test_clips_from_carphone(tmp_path):
    import av

    idd = _identity(tmp_path, {i: [60, 30, 110, 90] for i in range(0, 60, 2)})
    s = cut_clips(CARPHONE, idd, tmp_path / "out", frames=9, stride=2, max_per_source=2, trigger="ohwx")
    assert s["clips"] == 2 and not s["reason"]
    recs = [json.loads(x) for x in (tmp_path / "out" / "clips.jsonl").read_text().splitlines()]
    assert recs[0]["caption"].startswith("ohwx person, ") and recs[0]["frames"] == 9 and recs[0]["fps"] == 15
    with av.open(str(tmp_path / "out" / recs[0]["clip"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9


def test_faceless_and_garbage_give_zero_clips(tmp_path):
    idd = _identity(tmp_path, {}, persons=False)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    s = cut_clips(bad, idd, tmp_path / "out", frames=9)
    assert s["clips"] == 0 and s["reason"]
