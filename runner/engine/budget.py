"""Cost control for one apply: the estimated cost and hours of every stage that would run, summed
over the whole batch (every spec of one ``runner apply``), against ``hardware.budget`` or
``--max-cost`` / ``--max-hours``. A batch over its budget is refused before anything starts,
naming the stages that would run and what each is estimated at.

The figures are the plan's estimates (:func:`runner.engine.executor.plan_estimates`: learned
from earlier runs in state.db, else the kind's typical duration and the price table); the cost
is what the remote (Modal) stages would be billed, local stages cost nothing here. With several
specs setting a limit, the smallest applies: each spec says how much an apply that includes it
may spend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.engine.cost import Estimate, duration_text
from runner.engine.request import ApplyError
from runner.spec.config import view_of
from runner.spec.sections import BudgetConfig

#: Stages named one by one in a refusal (the most expensive first); the rest are counted.
LISTED = 20


class OverBudget(ApplyError):
    """The batch's estimated cost or hours exceed its budget: nothing was started (exit 2)."""


@dataclass(frozen=True)
class Budget:
    """The limits of one apply and where each came from (for the message)."""

    max_cost: float | None = None
    max_hours: float | None = None
    cost_from: str = ""  # "--max-cost", or "hardware.budget.max_cost of specs/a.yaml"
    hours_from: str = ""

    @property
    def is_set(self) -> bool:
        return self.max_cost is not None or self.max_hours is not None


def batch_budget(specs: list[Any], max_cost: float | None = None, max_hours: float | None = None) -> Budget:
    """The budget of a batch of specs: ``max_cost`` / ``max_hours`` (the command line) where given,
    else the smallest ``hardware.budget`` limit any spec sets."""
    def smallest(key: str) -> tuple[float | None, str]:
        best: tuple[float | None, str] = (None, "")
        for s in specs:
            cfg = view_of(BudgetConfig, (s.data.get("hardware") or {}).get("budget") or {})
            value = getattr(cfg, key)
            if value is not None and (best[0] is None or float(value) < best[0]):
                best = (float(value), f"hardware.budget.{key} of {_name(s)}")
        return best

    cost, cost_from = (float(max_cost), "--max-cost") if max_cost is not None else smallest("max_cost")
    hours, hours_from = (float(max_hours), "--max-hours") if max_hours is not None else smallest("max_hours")
    return Budget(cost, hours, cost_from, hours_from)


def _name(spec: Any) -> str:
    from pathlib import Path

    try:
        return Path(spec.file).resolve().relative_to(Path(spec.project_root).resolve()).as_posix()
    except (ValueError, AttributeError, TypeError):
        return str(getattr(spec, "file", spec))


@dataclass
class BatchCost:
    """What the stages of a plan that would run are estimated at, summed."""

    stages: list[tuple[str, Estimate]] = field(default_factory=list)  # (stage id, estimate), plan order
    unestimated: list[str] = field(default_factory=list)  # would run; no estimate (CPU stages, new here)
    currencies: tuple[str, ...] = ()
    path_seconds: float = 0.0  # the longest chain of estimated stages that wait for each other

    @property
    def cost(self) -> float:
        return sum(e.cost for _, e in self.stages if e.backend == "modal")

    @property
    def seconds(self) -> float:
        return sum(e.seconds for _, e in self.stages)

    @property
    def currency(self) -> str:
        return self.currencies[0] if self.currencies else "USD"

    @property
    def defaults(self) -> int:
        """Estimates that are the kind's default (no earlier run on that GPU), not learned."""
        return sum(1 for _, e in self.stages if e.source != "history")

    def wall_seconds(self, max_parallel: int) -> float:
        """A lower bound of the batch's wall time: its longest chain of stages that wait for each
        other (train, then evaluate), and no less than local stages one after another plus remote
        ones ``max_parallel`` at a time."""
        local = sum(e.seconds for _, e in self.stages if e.backend != "modal")
        remote = sum(e.seconds for _, e in self.stages if e.backend == "modal")
        return max(self.path_seconds, local + remote / max(1, int(max_parallel)))

    def as_json(self) -> dict[str, Any]:
        return {"stages": len(self.stages) + len(self.unestimated), "estimated": len(self.stages),
                "cost": round(self.cost, 2), "currency": self.currency, "hours": round(self.seconds / 3600, 3),
                "defaults": self.defaults}


def batch_cost(plan: Any, estimates: dict[str, Estimate]) -> BatchCost:
    """Sum the estimates of the stages of ``plan`` that would execute (run, rerun, resume)."""
    out = BatchCost()
    currencies: dict[str, None] = {}
    for ps in plan.stages:
        if not ps.will_execute:
            continue
        est = estimates.get(ps.id)
        if est is None:
            out.unestimated.append(ps.id)
            continue
        out.stages.append((ps.id, est))
        if est.backend == "modal":
            currencies[est.currency] = None
    if not currencies:  # nothing priced runs: the batch's own currency
        for spec in plan.graph.specs.values():
            currencies.setdefault((spec.data.get("hardware") or {}).get("currency") or "USD", None)
            break
    out.currencies = tuple(currencies)
    out.path_seconds = _longest_chain(plan, dict(out.stages))
    return out


def _longest_chain(plan: Any, estimated: dict[str, Estimate]) -> float:
    """Seconds of the longest chain of estimated stages through the plan's dependencies (stages
    are in dependency order; cached and unestimated ones count 0)."""
    if not estimated:  # nothing to run (a no-op plan of 10,000 stages): no walk
        return 0.0
    done: dict[str, float] = {}
    for ps in plan.stages:
        start = max((done.get(u, 0.0) for u in ps.node.upstream_ids()), default=0.0)
        est = estimated.get(ps.id)
        done[ps.id] = start + (est.seconds if est is not None else 0.0)
    return max(done.values(), default=0.0)


def check_budget(plan: Any, estimates: dict[str, Estimate], budget: Budget) -> BatchCost:
    """The batch's summed estimates; raises :class:`OverBudget` (before anything runs) when they
    exceed ``budget``."""
    batch = batch_cost(plan, estimates)
    if not budget.is_set:
        return batch
    if budget.max_cost is not None and len(batch.currencies) > 1:
        raise ApplyError(f"{budget.cost_from}: the specs of this batch price stages in "
                         f"{' and '.join(batch.currencies)}; one budget needs one currency",
                         hint="set the same hardware.currency (and price_table) in every spec of the batch")
    over = []
    if budget.max_cost is not None and batch.cost > budget.max_cost + 1e-9:
        over.append(f"~{batch.cost:.2f} {batch.currency} on Modal, over {budget.cost_from} "
                    f"({budget.max_cost:.2f} {batch.currency})")
    hours = batch.seconds / 3600.0
    if budget.max_hours is not None and hours > budget.max_hours + 1e-9:
        over.append(f"~{hours:.1f} stage hours, over {budget.hours_from} ({budget.max_hours:g} h)")
    if over:
        raise OverBudget(_refusal(batch, over), hint=_hint(batch, budget))
    return batch


def _refusal(batch: BatchCost, over: list[str]) -> str:
    n = len(batch.stages) + len(batch.unestimated)
    lines = [f"over budget, nothing was started: the {n} stage{'s' if n != 1 else ''} this apply would run "
             f"are estimated at {' and '.join(over)}", "  stages that would run (estimate):"]
    ranked = sorted(batch.stages, key=lambda se: (-se[1].cost, -se[1].seconds))
    for sid, e in ranked[:LISTED]:
        where = f"{e.backend} {e.gpu}" if e.backend == "modal" else "local"
        lines.append(f"    {sid:<40} {where:<18} {e.short():<18} {_source(e)}")
    if len(ranked) > LISTED:
        rest = ranked[LISTED:]
        lines.append(f"    ... and {len(rest)} more estimated at ~{sum(e.cost for _, e in rest):.2f} "
                     f"{batch.currency}, {sum(e.seconds for _, e in rest) / 3600:.1f} h")
    if batch.unestimated:
        shown = ", ".join(batch.unestimated[:8]) + (", ..." if len(batch.unestimated) > 8 else "")
        lines.append(f"    and {len(batch.unestimated)} local stage(s) with no estimate (no cost on Modal): {shown}")
    return "\n".join(lines)


def _source(e: Estimate) -> str:
    return f"learned from {e.runs} run{'s' if e.runs != 1 else ''}" if e.source == "history" else "default estimate"


def _hint(batch: BatchCost, budget: Budget) -> str:
    def raise_it(src: str, flag: str) -> str:
        return f"pass a larger {flag}" if src == flag else f"raise {src} (or pass {flag})"

    ways = [raise_it(src, flag) for src, flag in ((budget.cost_from, "--max-cost"), (budget.hours_from, "--max-hours"))
            if src]
    hint = (f"{'; '.join(ways)}; run part of the batch (--only STAGE, fewer specs); or pick cheaper GPUs "
            "(hardware.stage_gpu). `runner plan` shows every stage's estimate.")
    if batch.defaults:
        hint += (f" {batch.defaults} of the estimates are defaults (no earlier run of the kind on that GPU): "
                 "a first, smaller run teaches the plan real figures.")
    return hint


def plan_line(batch: BatchCost, budget: Budget, max_parallel: int) -> str:
    """`runner plan`'s line on the whole batch: its stage hours, the wall time it needs at best, and
    its budget (within, or over: then `runner apply` refuses)."""
    n = len(batch.stages)
    line = (f"  ~{batch.seconds / 3600:.1f} stage hours over {n} estimated stage{'s' if n != 1 else ''}; at best "
            f"~{duration_text(batch.wall_seconds(max_parallel))} of wall time with {max_parallel} remote at once")
    limits = []
    if budget.max_cost is not None:
        limits.append(f"{budget.max_cost:.2f} {batch.currency} ({budget.cost_from})")
    if budget.max_hours is not None:
        limits.append(f"{budget.max_hours:g} h ({budget.hours_from})")
    if limits:
        over = ((budget.max_cost is not None and batch.cost > budget.max_cost + 1e-9)
                or (budget.max_hours is not None and batch.seconds / 3600 > budget.max_hours + 1e-9))
        line += f"; budget {', '.join(limits)}: {'OVER, apply would refuse' if over else 'within'}"
    return line
