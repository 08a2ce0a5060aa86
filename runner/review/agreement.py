"""Do people and metrics agree? Human pass/fail ratings of evaluation images against each metric.

For every category and every per-image metric (higher is better for all of them: face similarity,
CLIP-T, CLIP score, CLIP-I, DINO) two figures, over the images people rated:

- **rank agreement**: the chance that an image rated *pass* scores higher on the metric than one
  rated *fail* (ties count half; the area under the ROC curve). 1.0: the metric orders images
  the way people do; 0.5: it says nothing about their judgement; below 0.5: the opposite. Needs at
  least one pass and one fail in the category.
- **target agreement**, when ``evaluate.targets`` declares a target for that category and metric:
  the share of rated images where "meets the target" equals "rated pass".

A *disagreement* is a rated image where a declared target and the person say opposite things
(or, with no target, a failed image that scores above the median of the passed ones).
Pure functions over ``evaluation.json`` and the decisions (no disk access).
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

NOT_METRICS = {"prompt_index", "seed", "face_found", "face_box"}


def image_metrics(img: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in img.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def rated_images(evaluation: dict[str, Any], ratings: dict[str, dict[str, Any]],
                 sha_of: dict[str, str]) -> list[dict[str, Any]]:
    """Every image of ``evaluation`` that a person rated: {cell, category, metrics, rating}.
    ``sha_of`` maps an image's path in the evaluation folder to its content sha256."""
    out = []
    for cell in evaluation.get("cells", []):
        for img in cell.get("images", []):
            r = ratings.get(sha_of.get(img.get("path", ""), ""), {}).get("rating")
            if r in ("pass", "fail"):
                out.append({"cell": cell["cell"], "category": img["category"], "path": img.get("path", ""),
                            "metrics": image_metrics(img), "pass": r == "pass"})
    return out


def rank_agreement(passed: Iterable[float], failed: Iterable[float]) -> float | None:
    p, f = list(passed), list(failed)
    if not p or not f:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in f)
    return round(wins / (len(p) * len(f)), 4)


def _target(targets: dict[str, Any], category: str, metric: str) -> str | None:
    return (targets.get(category) or {}).get(metric) or (targets.get("overall") or {}).get(metric)


def table(evaluation: dict[str, Any], rated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per category x metric with the two agreement figures (see the module docstring)."""
    from runner.eval.selection import holds

    targets = evaluation.get("targets") or {}
    rows = []
    for cat in sorted({r["category"] for r in rated}):
        in_cat = [r for r in rated if r["category"] == cat]
        metrics = sorted({m for r in in_cat for m in r["metrics"]})
        for m in metrics:
            have = [r for r in in_cat if m in r["metrics"]]
            target = _target(targets, cat, m)
            agree = None
            if target:
                agree = round(sum(1 for r in have if holds(r["metrics"][m], target) == r["pass"]) / len(have), 4)
            rows.append({
                "category": cat, "metric": m, "rated": len(have),
                "passed": sum(1 for r in have if r["pass"]),
                "rank_agreement": rank_agreement([r["metrics"][m] for r in have if r["pass"]],
                                                 [r["metrics"][m] for r in have if not r["pass"]]),
                "target": target, "target_agreement": agree,
            })
    return rows


def disagreements(evaluation: dict[str, Any], rated: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Image path -> the metrics that contradict the person's rating."""
    from runner.eval.selection import holds

    targets = evaluation.get("targets") or {}
    out: dict[str, list[str]] = {}
    for cat in {r["category"] for r in rated}:
        in_cat = [r for r in rated if r["category"] == cat]
        for r in in_cat:
            for m, v in r["metrics"].items():
                target = _target(targets, cat, m)
                if target:
                    contra = holds(v, target) != r["pass"]
                else:
                    passed = [x["metrics"][m] for x in in_cat if x["pass"] and m in x["metrics"]]
                    contra = (not r["pass"]) and bool(passed) and v > statistics.median(passed)
                if contra:
                    out.setdefault(r["path"], []).append(m)
    return out
