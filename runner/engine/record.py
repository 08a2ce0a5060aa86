"""Recording one apply: the rows of the state database's ``executions`` table, the stage results
the caller gets back, and the timeline the report shows.

Only the apply's main thread records (remote stages run in worker threads, which never touch the
database). One :class:`Recorder` per run; every row is built from an :class:`Ended`, what is known
about an execution when its row is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from runner.core import contract
from runner.core.pricing import stage_cost
from runner.engine.cost import stage_gpu, work_metrics, work_of
from runner.engine.workspace import ExecutionRecord, Workspace
from runner.plan.graph import Graph
from runner.plan.planner import PlannedStage

# Statuses whose execution is billed (a skipped, cached or interrupted stage costs nothing here).
BILLED = ("succeeded", "failed")


@dataclass
class StageResult:
    stage_id: str
    kind: str
    action: str
    status: str  # succeeded | failed | cached | skipped | interrupted
    duration: float = 0.0
    error: str | None = None
    log_path: str | None = None


@dataclass
class Ended:
    """What a row of the executions table says about one stage execution."""

    status: str  # running | succeeded | failed | cached | skipped | interrupted
    started: float
    duration: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    log_path: str | None = None
    remote: Any = None  # a runner.backends.remote.RemoteInfo for a remote stage


class Recorder:
    """The state rows, results and timeline of one run. ``remote_of(node)`` says whether a node
    runs on the remote backend (its row names the backend and the GPU it is billed for)."""

    def __init__(self, ws: Workspace, run_id: str, graph: Graph,
                 remote_of: Callable[[contract.PlanNode], bool], estimates: dict[str, Any] | None = None) -> None:
        self.ws, self.run_id, self.graph, self.remote_of = ws, run_id, graph, remote_of
        self.estimates = estimates or {}  # stage id -> runner.engine.cost.Estimate the plan showed
        self.results: list[StageResult] = []
        self.timeline: list[dict[str, Any]] = []
        self.done: dict[str, str] = {}  # stage id -> final status
        self._pending: list[ExecutionRecord] = []  # cached and skipped rows not written yet

    def row(self, ps: PlannedStage, e: Ended) -> ExecutionRecord:
        hardware = self.graph.specs[ps.node.character].data.get("hardware", {})
        backend = "modal" if self.remote_of(ps.node) else "local"
        gpu = stage_gpu(ps.node, hardware, backend)
        price = (stage_cost(_billed(e), gpu, hardware) if e.status in BILLED
                 else (0.0, hardware.get("currency", "USD")))
        return ExecutionRecord(
            run_id=self.run_id, stage_id=ps.id, kind=ps.node.kind, character=ps.node.character, key=ps.key,
            action=ps.action, reason="; ".join(ps.reasons), status=e.status, started=e.started,
            duration=e.duration, metrics=self._with_estimate(ps, self._with_work(ps, e)), cost=price[0],
            currency=price[1], gpu=gpu,
            backend=backend, remote_call_id=(e.remote.call_id or None) if e.remote is not None else None,
            error=e.error, log_path=e.log_path,
        )

    def _with_work(self, ps: PlannedStage, e: Ended) -> dict[str, Any]:
        """The execution's metrics with the work it did (``work_units``, ``work_unit``) for the
        plan's learned estimates: the stage's own metric, else its kind's planned work."""
        if e.status != "succeeded" or "work_units" in e.metrics:
            return e.metrics
        registry = self.graph.registry
        kind = registry.get(ps.node.kind) if ps.node.kind in registry else None
        return {**work_metrics(work_of(kind, ps.node)), **e.metrics}

    def _with_estimate(self, ps: PlannedStage, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics with what the plan estimated for this execution before it ran (``plan.*``:
        seconds, cost, where the figure came from), so the report can set it against what it took."""
        est = self.estimates.get(ps.id)
        if est is None:
            return metrics
        return {**metrics, "plan.estimate_s": round(est.seconds, 1), "plan.estimate_cost": est.cost,
                "plan.estimate_source": est.source, "plan.estimate_runs": est.runs}

    def insert(self, ps: PlannedStage, e: Ended) -> int:
        """A new row (a stage that starts is recorded as running at once: a process that dies
        then leaves a row `runner runs` marks killed); returns its id. The rows held back are
        written first, so the table keeps the order stages were taken in."""
        self.flush()
        return self.ws.record_execution(self.row(ps, e))

    def hold(self, ps: PlannedStage, e: Ended) -> None:
        """A finished row nobody needs the id of (a cached or skipped stage), written with the
        others at the next :meth:`flush`: a no-op apply of 10,000 stages is one transaction."""
        self._pending.append(self.row(ps, e))

    def flush(self) -> None:
        """Write the rows held back (at the next started stage and at the end of the run)."""
        if self._pending:
            rows, self._pending = self._pending, []
            self.ws.record_executions(rows)

    def update(self, exec_id: int, ps: PlannedStage, e: Ended) -> None:
        self.ws.update_execution(exec_id, self.row(ps, e))

    def result(self, ps: PlannedStage, status: str, *, duration: float = 0.0, error: str | None = None,
               log_path: str | None = None, note: str | None = None) -> StageResult:
        """The stage's final result, also in the timeline (``note`` defaults to ``error``)."""
        res = StageResult(ps.id, ps.node.kind, ps.action, status, duration, error, log_path)
        self.results.append(res)
        self.done[ps.id] = status
        self.timeline.append(timeline_entry(ps, status, duration, time.time() - duration,
                                            error if note is None else note))
        return res

    def skipped(self, ps: PlannedStage, why: str) -> None:
        self.result(ps, "skipped", error=why)
        self.hold(ps, Ended("skipped", time.time(), error=why))

    def cached(self, ps: PlannedStage) -> None:
        self.result(ps, "cached", note="; ".join(ps.reasons))
        self.hold(ps, Ended("cached", time.time()))


def _billed(e: Ended) -> float:
    """Seconds to bill: Modal bills the container time of every attempt, which the worker
    measures on the volume; a call that never answered is charged its wall time (an upper bound)."""
    r = e.remote
    if r is not None and (r.billed_s or r.reused_result):
        return r.billed_s
    return e.duration


def timeline_entry(ps: PlannedStage, status: str, duration: float, started: float, note: str | None) -> dict:
    return {
        "stage_id": ps.id,
        "kind": ps.node.kind,
        "character": ps.node.character,
        "action": ps.action,
        "status": status,
        "duration": round(duration, 3),
        "started": started,
        "reason": "; ".join(ps.reasons),
        "note": note or "",
    }
