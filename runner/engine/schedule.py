"""Which stage of a plan acts next, and how: pure bookkeeping, no I/O.

The executor asks :meth:`Scheduler.next` for a :class:`Step` until there is none, tells it each
stage's final status with :meth:`Scheduler.finished`, and waits for a running remote stage when
nothing can act. Stages are taken in plan (dependency) order; a stage waits while an upstream
stage is running, is skipped when one failed or was skipped (or after a failure without
--keep-going), and is cached when the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from runner.plan.planner import PlannedStage

# Final statuses that keep the stages downstream of them from running.
BLOCKING = ("failed", "skipped")


@dataclass(frozen=True)
class Step:
    ps: PlannedStage
    how: str  # skip | cached | remote | local
    why: str = ""  # for a skip: the reason shown and recorded


class Scheduler:
    def __init__(self, stages: Iterable[PlannedStage], remote_ids: Iterable[str] = ()) -> None:
        self.pending = list(stages)
        self.known = {ps.id for ps in self.pending}
        self.remote_ids = set(remote_ids)
        self.done: dict[str, str] = {}  # stage id -> final status

    def next(self, *, stop: bool = False, remote_slot: bool = False) -> Step | None:
        """The first pending stage that can act now (taken off the pending list), or None.
        ``stop``: an earlier stage failed and the run does not keep going; ``remote_slot``: a
        remote stage may start now (the fan-out has a free slot)."""
        for ps in self.pending:
            step = self._step(ps, stop, remote_slot)
            if step is not None:
                self.pending.remove(ps)
                if step.how in ("skip", "cached"):
                    self.done[ps.id] = "skipped" if step.how == "skip" else "cached"
                return step
        return None

    def _step(self, ps: PlannedStage, stop: bool, remote_slot: bool) -> Step | None:
        ups = [u for u in ps.node.upstream_ids() if u in self.known]
        blocked = [u for u in ups if self.done.get(u) in BLOCKING]
        if stop or blocked:
            return Step(ps, "skip", f"upstream {blocked[0]} failed" if blocked else "not run: an earlier stage failed")
        if any(u not in self.done for u in ups):
            return None  # waits for a running upstream
        if not ps.will_execute:
            return Step(ps, "cached")
        if ps.id in self.remote_ids:
            return Step(ps, "remote") if remote_slot else None
        return Step(ps, "local")

    def finished(self, stage_id: str, status: str) -> None:
        self.done[stage_id] = status

    def stranded(self) -> list[PlannedStage]:
        """Stages never scheduled (cannot happen with a valid graph; never drop one silently)."""
        out, self.pending = self.pending, []
        return out
