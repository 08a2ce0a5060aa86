"""Targets pass/fail, the overall score and best-checkpoint selection with constraints."""

from __future__ import annotations

import pytest

from runner.eval import selection as S
from runner.core.errors import StageError


def cell(step, scale, fs, clip_t, cats=None, score=None):
    return {"step": step, "lora_scale": scale, "score": score,
            "overall": {"face_similarity": fs, "clip_t": clip_t},
            "categories": cats or {}}


def test_comparisons() -> None:
    assert S.parse_comparison(">= 0.25") == (">=", 0.25)
    assert S.holds(0.9, ">0.8") and not S.holds(0.8, ">0.8") and S.holds(0.8, ">=0.8")
    assert S.holds(-0.2, "<-0.1") and not S.holds(None, ">0")
    assert S.shortfall(0.5, ">=0.6") == pytest.approx(0.1, abs=1e-6) and S.shortfall(0.7, ">=0.6") == 0
    with pytest.raises(StageError, match="not a comparison"):
        S.parse_comparison("about 0.5", key="evaluate.targets.close_up.dino")


def test_targets_pass_fail_and_score() -> None:
    per_cat = {"close_up": {"consistency": 0.93, "face_similarity": 0.7, "diversity": None},
               "full_body": {"consistency": 0.6}}
    overall = {"clip_t": 0.3}
    targets = {"close_up": {"consistency": ">0.9", "diversity": ">0.1"},
               "full_body": {"consistency": ">0.75"}, "overall": {"clip_t": ">=0.25"}}
    res = S.evaluate_targets(per_cat, overall, targets)
    assert res["close_up"]["consistency"]["pass"] is True
    assert res["full_body"]["consistency"]["pass"] is False
    assert res["close_up"]["diversity"]["pass"] is False
    assert "two seeds" in res["close_up"]["diversity"]["note"]
    assert res["overall"]["clip_t"]["pass"] is True
    score, how = S.cell_score(res, overall)
    assert score == pytest.approx(2 / 4) and "target" in how
    assert S.cell_score({}, {"face_similarity": 0.42}) == (0.42, "overall face similarity (no targets declared)")


def test_validation_names_the_key() -> None:
    with pytest.raises(StageError, match=r"evaluate.targets.wide: category 'wide'"):
        S.validate_targets({"wide": {"dino": ">0.5"}}, ["close_up"])
    with pytest.raises(StageError, match="unknown metric 'fid'"):
        S.validate_targets({"close_up": {"fid": "<10"}}, ["close_up"])
    with pytest.raises(StageError, match="maximize: unknown metric"):
        S.validate_objective({"maximize": "beauty"}, ["close_up"])
    S.validate_objective({"maximize": "score", "constraints": {"clip_t": ">=0.2", "close_up.consistency": ">0.9"}},
                         ["close_up"])


def test_best_maximizes_subject_to_constraints() -> None:
    cells = [cell(100, 1.0, 0.80, 0.20), cell(200, 1.0, 0.75, 0.26), cell(200, 0.8, 0.70, 0.30),
             cell(300, 1.0, 0.90, 0.18)]
    best = S.select_best(cells, {"maximize": "face_similarity", "constraints": {"clip_t": ">=0.25"}})
    assert best["index"] == 1 and best["constraints_met"]
    assert best["feasible"] == [1, 2]
    assert best["constraints"]["clip_t"]["pass"] is True
    # unconstrained: the highest face similarity wins
    assert S.select_best(cells, {"maximize": "face_similarity"})["index"] == 3
    # per-category constraint
    cells[3]["categories"] = {"close_up": {"consistency": 0.95}}
    b = S.select_best(cells, {"maximize": "clip_t", "constraints": {"close_up.consistency": ">0.9"}})
    assert b["index"] == 3


def test_infeasible_takes_the_closest_and_says_so() -> None:
    cells = [cell(100, 1.0, 0.9, 0.10), cell(200, 1.0, 0.5, 0.20)]
    best = S.select_best(cells, {"maximize": "face_similarity", "constraints": {"clip_t": ">=0.25"}})
    assert best["index"] == 1 and best["constraints_met"] is False and "closest" in best["reason"]


def test_ties_are_broken_deterministically() -> None:
    cells = [cell(300, 1.0, 0.8, 0.3, score=0.5), cell(200, 0.8, 0.8, 0.3, score=0.5),
             cell(200, 1.0, 0.8, 0.3, score=0.75)]
    assert S.select_best(cells, {"maximize": "face_similarity"})["index"] == 2  # higher score
    cells[2]["score"] = 0.5
    assert S.select_best(cells, {"maximize": "face_similarity"})["index"] == 1  # earlier step, lower scale
