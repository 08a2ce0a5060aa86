"""Targets (pass/fail per category x metric), the overall score, and best-checkpoint selection.

A *cell* is one checkpoint at one LoRA scale, with its metrics per category and overall (the
equal-weight mean over categories).

- Targets: ``evaluate.targets`` maps a category (or ``overall``) to ``{metric: "<op> <value>"}``
  with op one of ``> >= < <=``. Each (category, metric) is a pass/fail cell; a metric that could
  not be computed (e.g. diversity with one seed) fails, with the reason recorded.
- Score: the share of target cells that pass, in [0, 1]. With no targets declared, it is the
  overall face similarity (so ``maximize: score`` still means something).
- Best: among the cells that satisfy every constraint of ``evaluate.objective.constraints``
  (keys ``metric`` for the overall value or ``category.metric``), the one with the highest
  ``objective.maximize`` metric; ties go to the higher score, then the higher CLIP-T, then the
  earlier step and the lower scale. When no cell satisfies the constraints, the cell closest to
  satisfying them is taken and ``constraints_met`` is false (the stage warns).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Iterable

from runner.metrics.catalog import METRICS
from runner.core.errors import StageError

_CMP = re.compile(r"^\s*(>=|<=|>|<)\s*(-?[0-9]*\.?[0-9]+)\s*$")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
SELECTABLE = tuple(METRICS) + ("score",)
OVERALL = "overall"


def parse_comparison(text: str, *, key: str = "") -> tuple[str, float]:
    m = _CMP.match(str(text))
    if not m:
        raise StageError(f"{key}: {text!r} is not a comparison like '>=0.6' or '<0.1'",
                         hint="Write an operator (>, >=, <, <=) followed by a number.")
    return m.group(1), float(m.group(2))


def holds(value: float | None, comparison: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    op, ref = parse_comparison(comparison)
    return bool(_OPS[op](float(value), ref))


def shortfall(value: float | None, comparison: str) -> float:
    """How far ``value`` is from satisfying ``comparison`` (0 when it holds; 1 when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 1.0
    op, ref = parse_comparison(comparison)
    if _OPS[op](float(value), ref):
        return 0.0
    return abs(float(value) - ref) + 1e-9


def validate_targets(targets: dict[str, dict[str, str]], categories: Iterable[str],
                     key: str = "evaluate.targets") -> None:
    """Raise StageError for unknown categories/metrics or malformed comparisons."""
    cats = set(categories)
    for cat, metrics in (targets or {}).items():
        if cat != OVERALL and cat not in cats:
            raise StageError(f"{key}.{cat}: category {cat!r} is not evaluated",
                             hint=f"Evaluated categories: {', '.join(sorted(cats))} (or 'overall').")
        for metric, cmp in metrics.items():
            if metric not in METRICS:
                raise StageError(f"{key}.{cat}.{metric}: unknown metric {metric!r}",
                                 hint=f"Metrics: {', '.join(METRICS)}.")
            parse_comparison(cmp, key=f"{key}.{cat}.{metric}")


def validate_objective(objective: dict[str, Any], categories: Iterable[str],
                       key: str = "evaluate.objective") -> None:
    cats = set(categories)
    metric = objective.get("maximize", "face_similarity")
    if metric not in SELECTABLE:
        raise StageError(f"{key}.maximize: unknown metric {metric!r}", hint=f"One of: {', '.join(SELECTABLE)}.")
    for ckey, cmp in (objective.get("constraints") or {}).items():
        cat, _, m = ckey.rpartition(".")
        if m not in SELECTABLE:
            raise StageError(f"{key}.constraints.{ckey}: unknown metric {m!r}",
                             hint=f"One of: {', '.join(SELECTABLE)}.")
        if cat and cat != OVERALL and cat not in cats:
            raise StageError(f"{key}.constraints.{ckey}: category {cat!r} is not evaluated",
                             hint=f"Evaluated categories: {', '.join(sorted(cats))}.")
        parse_comparison(cmp, key=f"{key}.constraints.{ckey}")


def evaluate_targets(per_category: dict[str, dict[str, Any]], overall: dict[str, Any],
                     targets: dict[str, dict[str, str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{category: {metric: {"target", "value", "pass", "note"}}} for every declared target."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for cat, metrics in (targets or {}).items():
        row = overall if cat == OVERALL else per_category.get(cat, {})
        for metric, cmp in metrics.items():
            value = row.get(metric)
            ok = holds(value, cmp)
            note = ""
            if value is None:
                note = "not computed" + (" (needs at least two seeds)" if metric == "diversity" else "")
            out.setdefault(cat, {})[metric] = {"target": cmp, "value": value, "pass": ok, "note": note}
    return out


def cell_score(target_results: dict[str, dict[str, dict[str, Any]]],
               overall: dict[str, Any]) -> tuple[float | None, str]:
    """(score, how it was computed)."""
    cells = [c for row in target_results.values() for c in row.values()]
    if cells:
        return sum(1 for c in cells if c["pass"]) / len(cells), "share of target cells passed"
    fs = overall.get("face_similarity")
    return (None if fs is None else float(fs)), "overall face similarity (no targets declared)"


def metric_value(cell: dict[str, Any], key: str) -> float | None:
    """``metric`` (overall), ``category.metric`` or ``score`` of a cell."""
    if key == "score":
        return cell.get("score")
    cat, _, metric = key.rpartition(".")
    if metric == "score":
        return cell.get("score")
    row = cell["overall"] if not cat or cat == OVERALL else cell["categories"].get(cat, {})
    v = row.get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def select_best(cells: list[dict[str, Any]], objective: dict[str, Any]) -> dict[str, Any]:
    """Pick the best cell; returns {"index", "constraints_met", "reason", "constraints": {...}}."""
    if not cells:
        raise StageError("nothing to select from: no checkpoint was evaluated")
    metric = objective.get("maximize") or "face_similarity"
    constraints = objective.get("constraints") or {}

    def neg(v: float | None) -> float:
        return -(v if v is not None else -math.inf)

    def rank(i: int) -> tuple:
        c = cells[i]
        return (neg(metric_value(c, metric)), neg(c.get("score")), neg(metric_value(c, "clip_t")),
                c["step"], c["lora_scale"])

    status = [{k: holds(metric_value(c, k), v) for k, v in constraints.items()} for c in cells]
    feasible = [i for i, s in enumerate(status) if all(s.values())]
    if feasible:
        best = min(feasible, key=rank)
        reason = (f"highest {metric} among {len(feasible)} of {len(cells)} checkpoint x scale cells "
                  f"meeting {_fmt_constraints(constraints)}" if constraints else f"highest {metric}")
        met = True
    else:
        def violation(i: int) -> float:
            return sum(shortfall(metric_value(cells[i], k), v) for k, v in constraints.items())

        best = min(range(len(cells)), key=lambda i: (violation(i), rank(i)))
        reason = (f"no cell meets {_fmt_constraints(constraints)}; took the one closest to meeting them, "
                  f"then the highest {metric}")
        met = False
    return {
        "index": best,
        "constraints_met": met,
        "reason": reason,
        "maximize": metric,
        "constraints": {k: {"target": v, "value": metric_value(cells[best], k), "pass": status[best][k]}
                        for k, v in constraints.items()},
        "feasible": feasible,
    }


def _fmt_constraints(constraints: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in constraints.items())
