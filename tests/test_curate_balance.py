"""Shot classification rules, balance strategies, the validation hold-out and dedupe on synthetic
records (fast, no faces). The property tests draw random datasets and targets (hypothesis); the
real-photo checks of the same guarantees are in tests/test_analyze_pipeline.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.diffusion.data import Example, split_validation
from runner.stages import curate
from runner.core.errors import StageError
from runner.vision import balance as B
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
    return {"id": f"{i:04d}", "shot": shot, "categories": [shot, *flags], "quality": q, "repeats": 1}


def test_balance_table_status():
    rows = {r.category: r for r in B.shot_balance_table([(["close_up"], 1)] * 3 + [(["medium"], 1)],
                                                        {"close_up": [0.2, 0.5], "medium": [0.3, 0.6]})}
    assert rows["close_up"].share == 0.75 and rows["close_up"].status == "over"
    assert rows["medium"].status == "under" and rows["wide"].status == "" and "multi_character" not in rows


def test_select_drops_lowest_quality_of_over_category_only():
    items = [item(i, "close_up", q=i / 10) for i in range(8)] + [item(10 + i, "medium") for i in range(2)]
    kept, dropped, short = B.select(items, {"close_up": [0.3, 0.6]})
    share = sum(1 for k in kept if k["shot"] == "close_up") / len(kept)
    assert share <= 0.6 and all(cat == "close_up" for _, cat in dropped) and not short
    assert [d["id"] for d, _ in dropped] == ["0000", "0001", "0002", "0003", "0004"]
    assert all(i in kept for i in items[8:])


def test_select_never_pushes_a_met_minimum_under():
    items = [item(i, "close_up", flags=("multi_character",)) for i in range(6)] + [item(9, "medium")]
    _, dropped, short = B.select(items, {"close_up": [0.0, 0.5], "multi_character": [0.85, 1.0]})
    assert not dropped  # removing a close-up would take multi_character (6/7) under its 85% minimum
    assert [(s.category, s.blockers) for s in short] == [("close_up", ("multi_character",))]


def issue_example():
    """The issue's dataset: one full-body photo (with a busy background), two close-ups, six medium
    shots of which one more has a busy background."""
    return ([item(0, "full_body", q=0.1, flags=("complex_background",)), item(1, "close_up", q=0.2),
             item(2, "close_up", q=0.9), item(3, "medium", q=0.3, flags=("complex_background",))]
            + [item(4 + i, "medium", q=0.5 + i / 100) for i in range(5)])


ISSUE_TARGETS = {"full_body": [0.25, 0.3], "close_up": [0.3, 0.5], "complex_background": [0.0, 0.1]}


def test_select_keeps_the_only_full_body_and_says_why():
    kept, _, short = B.select(issue_example(), ISSUE_TARGETS)
    assert "0000" in {k["id"] for k in kept}  # the only full-body photo stays
    before = B.Tally.of((i["categories"], 1) for i in issue_example()).distances(ISSUE_TARGETS)
    after = B.Tally.of((k["categories"], 1) for k in kept).distances(ISSUE_TARGETS)
    assert all(after[c] <= before[c] + 1e-9 for c in ISSUE_TARGETS)
    texts = {s.category: curate.shortfall_text(s, "select", {**curate.DEFAULTS, **curate.SHOT_DEFAULTS})
             for s in short}
    assert texts["full_body"].startswith("full-body ") and "(target 25%–30%)" in texts["full_body"]
    assert "add full-body photos or a video source" in texts["full_body"]


def test_shortfall_of_an_empty_category_says_no_candidates():
    items = [item(i, "medium") for i in range(4)]
    for strategy, run in (("select", lambda: B.select(items, {"full_body": [0.25, 0.3]})[2]),
                          ("reweight", lambda: B.reweight(items, {"full_body": [0.25, 0.3]})[1]),
                          ("augment", lambda: B.add(items, [], {"full_body": [0.25, 0.3]})[1])):
        (s,) = run()
        text = curate.shortfall_text(s, strategy, {**curate.DEFAULTS, **curate.SHOT_DEFAULTS})
        assert text == "full-body 0% (target 25%–30%): no candidates; add full-body photos or a video source"


def test_reweight_repeats_reach_target_midpoints():
    items = [item(i, "close_up") for i in range(8)] + [item(10 + i, "full_body") for i in range(2)]
    targets = {"close_up": [0.4, 0.6], "full_body": [0.4, 0.6]}
    reps, short = B.reweight(items, targets)
    assert reps == {("close_up",): 1, ("full_body",): 4} and not short
    rows = {r.category: r for r in B.shot_balance_table([(i["categories"], reps[B.signature(i)]) for i in items],
                                                        targets)}
    assert rows["close_up"].share == 0.5 and rows["full_body"].status == "ok"
    assert B.reweight(items, {"full_body": [0.9, 1.0]}, max_repeats=5)[0][("full_body",)] == 5


def test_reweight_moves_several_groups_when_one_step_alone_dilutes_another():
    # The real Obama set's groups: every single extra repeat pushes some category farther off.
    items = ([item(0, "close_up"), item(1, "close_up"), item(2, "full_body", flags=("complex_background",))]
             + [item(3 + i, "medium") for i in range(2)]
             + [item(5 + i, "medium", flags=("occluded",)) for i in range(2)]
             + [item(7, "medium", flags=("multi_character", "complex_background"))])
    targets = {"close_up": [0.45, 0.55], "medium": [0.25, 0.35], "full_body": [0.15, 0.25]}
    reps, short = B.reweight(items, targets)
    rows = {r.category: r for r in B.shot_balance_table([(i["categories"], reps[B.signature(i)]) for i in items],
                                                        targets)}
    assert all(rows[c].status == "ok" for c in targets) and not short


def test_augment_adds_a_mirror_and_crops_together_when_each_alone_dilutes_the_other():
    mirror = ({**item(50, "full_body", flags=("complex_background",)), "id": "mirror"}, (1,))
    crops = [({**item(60 + i, "close_up"), "id": f"crop{i}"}, (0, i)) for i in range(4)]
    added, _ = B.add(issue_example(), [mirror, *crops], {"full_body": [0.25, 0.3], "close_up": [0.3, 0.5]})
    assert "mirror" in {e["id"] for e in added} and any(e["id"].startswith("crop") for e in added)


def test_reweight_serves_flag_targets_too():
    items = [item(i, "medium") for i in range(9)] + [item(9, "medium", flags=("multi_character",))]
    reps, short = B.reweight(items, {"multi_character": [0.3, 0.5]})
    assert reps[("medium", "multi_character")] > 1 and not short


def test_augment_prefers_crops_and_stops_inside_the_range():
    items = [item(i, "medium") for i in range(6)]
    crops = [({**item(100 + i, "close_up"), "id": f"crop{i}"}, (0, -0.5, str(i))) for i in range(6)]
    mirrors = [({**item(200 + i, "medium"), "id": f"mirror{i}"}, (1, -0.5, str(i))) for i in range(6)]
    added, short = B.add(items, mirrors + crops, {"close_up": [0.2, 0.4]})
    assert [e["id"] for e in added] == ["crop0", "crop1", "crop2"]  # 3/9 = 33%, the midpoint is 30%
    assert not short


def test_targets_min_above_max_is_a_clear_error(tmp_path):
    import json

    from runner.backends.context import LocalStageContext
    from runner.core import contract

    adir = tmp_path / "analysis"
    adir.mkdir()
    (adir / "summary.json").write_text(json.dumps({"backend": "dlib", "default_identity_threshold": 0.92,
                                                   "references": 0}))
    (adir / "records.jsonl").write_text("")
    ctx = LocalStageContext.for_folder(tmp_path / "c")
    with pytest.raises(StageError, match="close_up"):
        curate.run({**curate.DEFAULTS, **curate.SHOT_DEFAULTS, "targets": {"close_up": [0.6, 0.2]}},
                   {"analysis": contract.Artifact("analysis", adir)}, ctx)


# --------------------------------------------------------------------------- properties

shot_st = st.sampled_from(S.SHOT_TYPES)
flags_st = st.lists(st.sampled_from(S.FLAGS), unique=True, max_size=2)
items_st = st.lists(st.tuples(shot_st, flags_st, st.floats(0, 1)), min_size=1, max_size=30).map(
    lambda xs: [item(i, s, q=q, flags=tuple(f)) for i, (s, f, q) in enumerate(xs)])
range_st = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda t: [round(min(t), 3), round(max(t), 3)])
targets_st = st.dictionaries(st.sampled_from(S.CATEGORIES), range_st, min_size=1, max_size=5)
cands_st = st.lists(st.tuples(shot_st, flags_st), max_size=20).map(
    lambda xs: [(item(100 + i, s, flags=tuple(f)), (i,)) for i, (s, f) in enumerate(xs)])


def distances(weighted, targets):
    return B.Tally.of(weighted).distances(targets)


def assert_no_farther(before, after, targets):
    for c in targets:
        assert after[c] <= before[c] + 1e-9, (c, before[c], after[c])


@settings(max_examples=150, deadline=None)
@given(items=items_st, targets=targets_st)
def test_select_is_never_farther_and_keeps_last_images(items, targets):
    start = distances(((i["categories"], 1) for i in items), targets)
    kept, dropped, short = B.select(items, targets)
    assert_no_farther(start, distances(((k["categories"], 1) for k in kept), targets), targets)
    assert kept and len(kept) + len(dropped) == len(items)
    before = B.Tally.of((i["categories"], 1) for i in items)
    after = B.Tally.of((k["categories"], 1) for k in kept)
    for c, n in before.counts.items():
        protected = c not in targets or B.status_of(before.share(c), targets[c]) == "under" or targets[c][0] > 0
        if n and protected:
            assert after.counts.get(c, 0) >= 1, f"the last {c} image was dropped"
    off = {c for c in targets if B.status_of(after.share(c), targets[c]) in ("under", "over")}
    assert {s.category for s in short} == off


@settings(max_examples=150, deadline=None)
@given(items=items_st, targets=targets_st, max_repeats=st.integers(1, 8))
def test_reweight_is_never_farther(items, targets, max_repeats):
    start = distances(((i["categories"], 1) for i in items), targets)
    reps, _ = B.reweight(items, targets, max_repeats=max_repeats)
    assert all(1 <= r <= max_repeats for r in reps.values())
    assert_no_farther(start, distances(((i["categories"], reps[B.signature(i)]) for i in items), targets), targets)


@settings(max_examples=150, deadline=None)
@given(items=items_st, targets=targets_st, cands=cands_st)
def test_augment_is_never_farther(items, targets, cands):
    start = distances(((i["categories"], 1) for i in items), targets)
    added, _ = B.add(items, cands, targets)
    assert len({e["id"] for e in added}) == len(added)  # each candidate at most once
    weighted = [(i["categories"], 1) for i in items] + [(e["categories"], 1) for e in added]
    assert_no_farther(start, distances(weighted, targets), targets)


@settings(max_examples=100, deadline=None)
@given(items=items_st, targets=targets_st, data=st.data())
def test_select_never_drops_a_pinned_image(items, targets, data):
    pinned = set(data.draw(st.lists(st.sampled_from([i["id"] for i in items]), unique=True)))
    kept, _, _ = B.select(items, targets, pinned=lambda it: it["id"] in pinned)
    assert pinned <= {k["id"] for k in kept}


# --------------------------------------------------------------------------- validation hold-out


def ex(i, shot, flags=(), parent=None):
    return Example(id=f"e{i}", image=None, caption="", shot=shot, categories=[shot, *flags], parent=parent)  # type: ignore[arg-type]


examples_st = st.lists(st.tuples(shot_st, flags_st), min_size=2, max_size=30).flatmap(
    lambda xs: st.tuples(st.just([ex(i, s, tuple(f)) for i, (s, f) in enumerate(xs)]),
                         st.lists(st.tuples(st.integers(0, len(xs) - 1), shot_st), max_size=10)))


@settings(max_examples=150, deadline=None)
@given(data=examples_st, fraction=st.floats(0.05, 0.6), seed=st.integers(0, 10_000))
def test_holdout_never_takes_a_categorys_last_training_image(data, fraction, seed):
    originals, crops = data
    examples = originals + [ex(100 + k, shot, parent=f"e{p}") for k, (p, shot) in enumerate(crops)]
    train, val = split_validation(examples, fraction, seed)
    assert len(val) <= max(1, round(fraction * len(originals)))
    assert all(e.parent is None for e in val)
    held = {e.id for e in val}
    assert not any(e.id in held or e.parent in held for e in train)
    every = {c for e in examples for c in e.categories}
    trained = {c for e in train for c in e.categories}
    assert every == trained  # a held-out image never takes a category's last training image


@settings(max_examples=100, deadline=None)
@given(shots=st.lists(shot_st, min_size=4, max_size=40), fraction=st.floats(0.1, 0.5), seed=st.integers(0, 10_000))
def test_holdout_is_stratified_by_shot_type(shots, fraction, seed):
    examples = [ex(i, s) for i, s in enumerate(shots)]
    _, val = split_validation(examples, fraction, seed)
    for s in set(shots):
        n = shots.count(s)
        held = sum(1 for e in val if e.shot == s)
        assert held <= n - 1 and abs(held - fraction * n) < 1 + 1e-9, (s, n, held)


def test_holdout_keeps_the_only_multi_character_photo():
    examples = [ex(i, "medium") for i in range(8)] + [ex(8, "medium", ("multi_character",))]
    assert all("e8" not in {e.id for e in split_validation(examples, 0.2, seed)[1]} for seed in range(60))


# --------------------------------------------------------------------------- crops, mirrors, gates


def test_crop_box_frames_the_face_as_asked():
    face = (400, 200, 600, 400)  # 200 px face in a 1000x2800 full-body frame
    for shot in S.CROP_LAYOUT:
        box = S.crop_box_for(face, (1000, 2800), shot)
        assert box is not None, shot
        moved = (face[0] - box[0], face[1] - box[1], face[2] - box[0], face[3] - box[1])
        assert S.classify_shot(moved, box[3] - box[1]) == shot
        assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 2800
    assert S.crop_box_for((450, 2650, 550, 2750), (1000, 2800), "medium") is None  # no room below


def test_mirror_entry_flips_sides():
    e = {**item(0, "medium"), "width": 400, "height": 600, "face_box": [50, 60, 150, 180], "parent": None,
         "pose": {"yaw": 20.0, "pitch": 5.0, "roll": -3.0}, "exposure": {"mean": 0.5, "side_balance": 0.2}}
    m = curate._mirror_entry(e)
    assert m["parent"] == "0000" and m["mirrored"] and m["file"] == f"mirrors/{m['id']}.png"
    assert m["face_box"] == [250, 60, 350, 180] and m["pose"] == {"yaw": -20.0, "pitch": 5.0, "roll": 3.0}
    assert m["exposure"]["side_balance"] == -0.2 and m["categories"] == e["categories"]


def test_flips_stay_off_for_a_character_with_a_sided_trait():
    spec = {"character": {"traits": {"fixed": ["scar over the left eye", "short hair"]}}}
    assert curate.sided_traits(spec, {"allow_flips": True}) == ["scar over the left eye"]
    assert curate.sided_traits(spec, {"allow_flips": False}) == []
    assert curate.sided_traits({"character": {"traits": {"fixed": ["bright smile"]}}}, {"allow_flips": True}) == []


def test_dedupe_keeps_the_better_image():
    a = {"id": "a", "phash": "ffff0000ffff0000", "quality": 0.2}
    b = {"id": "b", "phash": "ffff0000ffff0001", "quality": 0.9}
    c = {"id": "c", "phash": "0000ffff0000ffff", "quality": 0.1}
    kept, dups = curate.dedupe([a, b, c], 6)
    assert [k["id"] for k in kept] == ["b", "c"]
    assert dups[0][0]["id"] == "a" and dups[0][1]["id"] == "b" and dups[0][2] == 1
    assert len(curate.dedupe([a, b, c], 0)[0]) == 3


def test_gate_reasons():
    face = {"box": [0, 0, 40, 40], "blur": 100.0, "exposure": {"clipped_dark": 0.0, "clipped_bright": 0.0},
            "identity": 0.95}
    rec = {"id": "x", "faces": [face], "main_face": 0, "identity": 0.95}
    cfg = dict(curate.DEFAULTS)
    assert curate.gate(rec, cfg, 0.92)[0] == "face too small"
    assert curate.gate({**rec, "identity": 0.5}, cfg, 0.92)[0] == "not the character"
    assert curate.gate(rec, {**cfg, "min_face_px": 10, "min_blur": 200}, 0.92)[0] == "blurry face"
    assert curate.gate({"id": "y", "error": "cannot read image: x"}, cfg, None)[0] == "unreadable"
    assert curate.gate({"id": "z", "no_face": True, "faces": []}, {**cfg, "require_face": False}, None) is None
