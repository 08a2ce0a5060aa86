"""Shot classification rules, balance strategies and dedupe on synthetic records (fast, no faces)."""

from __future__ import annotations

import pytest

from runner.stages import curate
from runner.stages.base import StageError
from runner.vision import shots as S


@pytest.mark.parametrize("box,height,shot", [
    ((0, 10, 100, 190), 200, "extreme_close_up"),  # face fills the frame
    ((0, 100, 100, 300), 500, "close_up"),  # 1 face height below the chin
    ((0, 100, 100, 200), 600, "medium"),  # 4 below
    ((0, 100, 100, 200), 1000, "full_body"),  # 8 below
    ((0, 100, 40, 140), 1000, "wide"),  # face 4% of the frame
    ((0, 900, 100, 1000), 1100, "full_body"),  # small face low in a tall frame: scale wins, not close-up
])
def test_classify_shot(box, height, shot):
    assert S.classify_shot(box, height) == shot


def item(i, shot, q=0.5, flags=()):
    return {"id": f"{i:04d}", "shot": shot, "categories": [shot, *flags], "quality": q}


def test_balance_table_status():
    rows = {r.category: r for r in S.shot_balance_table([(["close_up"], 1)] * 3 + [(["medium"], 1)],
                                                        {"close_up": [0.2, 0.5], "medium": [0.3, 0.6]})}
    assert rows["close_up"].share == 0.75 and rows["close_up"].status == "over"
    assert rows["medium"].status == "under" and rows["wide"].status == "" and "multi_character" not in rows


def test_select_drops_lowest_quality_of_over_category_only():
    items = [item(i, "close_up", q=i / 10) for i in range(8)] + [item(10 + i, "medium") for i in range(2)]
    kept, dropped = S.select_to_targets(items, {"close_up": [0.3, 0.6]})
    share = sum(1 for k in kept if k["shot"] == "close_up") / len(kept)
    assert share <= 0.6 and all(cat == "close_up" for _, cat in dropped)
    assert [d["id"] for d, _ in dropped] == ["0000", "0001", "0002", "0003", "0004"][: len(dropped)]
    assert all(k["shot"] == "medium" for k in items[8:]) and all(i in kept for i in items[8:])


def test_select_never_pushes_a_met_minimum_under():
    items = [item(i, "close_up", flags=("multi_character",)) for i in range(6)] + [item(9, "medium")]
    _, dropped = S.select_to_targets(items, {"close_up": [0.0, 0.5], "multi_character": [0.85, 1.0]})
    assert not dropped  # removing a close-up would take multi_character (6/7) under its 85% minimum


def test_reweight_repeats_reach_target_midpoints():
    items = [item(i, "close_up") for i in range(8)] + [item(10 + i, "full_body") for i in range(2)]
    reps = S.reweight_to_targets(items, {"close_up": [0.4, 0.6], "full_body": [0.4, 0.6]})
    assert reps == {"close_up": 1, "full_body": 4}
    rows = {r.category: r for r in S.shot_balance_table([(i["categories"], reps[i["shot"]]) for i in items],
                                                        {"close_up": [0.4, 0.6], "full_body": [0.4, 0.6]})}
    assert rows["close_up"].share == 0.5 and rows["full_body"].status == "ok"
    assert S.reweight_to_targets(items, {"full_body": [0.9, 1.0]}, max_repeats=5)["full_body"] == 5


def test_crop_box_frames_the_face_as_asked():
    face = (450, 200, 550, 300)  # 100 px face in a 1000x1400 full-body frame
    for shot in ("medium", "close_up"):
        box = S.crop_box_for(face, (1000, 1400), shot)
        assert box is not None
        moved = (face[0] - box[0], face[1] - box[1], face[2] - box[0], face[3] - box[1])
        assert S.classify_shot(moved, box[3] - box[1]) == shot
        assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1400
    assert S.crop_box_for((450, 1250, 550, 1350), (1000, 1400), "medium") is None  # no room below


def test_dedupe_keeps_the_better_image():
    a = {"id": "a", "phash": "ffff0000ffff0000", "quality": 0.2}
    b = {"id": "b", "phash": "ffff0000ffff0001", "quality": 0.9}
    c = {"id": "c", "phash": "0000ffff0000ffff", "quality": 0.1}
    kept, dups = curate.dedupe([a, b, c], 6)
    assert [k["id"] for k in kept] == ["b", "c"]
    assert dups[0][0]["id"] == "a" and dups[0][1]["id"] == "b" and dups[0][2] == 1
    assert len(curate.dedupe([a, b, c], 0)[0]) == 3


def test_gate_reasons():
    face = {"box": [0, 0, 40, 40], "blur": 100.0, "exposure": {"clipped_dark": 0.0, "clipped_bright": 0.0}, "identity": 0.95}
    rec = {"id": "x", "faces": [face], "main_face": 0, "identity": 0.95}
    cfg = dict(curate.DEFAULTS)
    assert curate.gate(rec, cfg, 0.92)[0] == "face too small"
    assert curate.gate({**rec, "identity": 0.5}, cfg, 0.92)[0] == "not the character"
    assert curate.gate(rec, {**cfg, "min_face_px": 10, "min_blur": 200}, 0.92)[0] == "blurry face"
    assert curate.gate({"id": "y", "error": "cannot read image: x"}, cfg, None)[0] == "unreadable"
    assert curate.gate({"id": "z", "no_face": True, "faces": []}, {**cfg, "require_face": False}, None) is None


def test_targets_min_above_max_is_a_clear_error(tmp_path):
    import json

    from runner.engine.context import LocalStageContext
    from runner.stages import base

    adir = tmp_path / "analysis"
    adir.mkdir()
    (adir / "summary.json").write_text(json.dumps({"backend": "dlib", "default_identity_threshold": 0.92, "references": 0}))
    (adir / "records.jsonl").write_text("")
    ctx = LocalStageContext.for_folder(tmp_path / "c")
    with pytest.raises(StageError, match="close_up"):
        curate.run({**curate.DEFAULTS, **curate.SHOT_DEFAULTS, "targets": {"close_up": [0.6, 0.2]}},
                   {"analysis": base.Artifact("analysis", adir)}, ctx)
