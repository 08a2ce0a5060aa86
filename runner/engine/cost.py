"""Cost of a stage execution from its duration and the spec's price table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.core import contract
from runner.core.pricing import price_table, remote_gpu, stage_cost


def stage_gpu(node: contract.PlanNode, hardware: dict[str, Any] | None, backend: str) -> str | None:
    """The GPU a stage would use on a remote backend (None when it runs on the CPU/locally)."""
    return remote_gpu(node.kind, node.gpu, hardware) if backend == "modal" else None


# --------------------------------------------------------------------------- estimates (plan)

# The wall time `runner plan` assumes for a remote stage whose kind declares no
# ``typical_seconds`` while the state database has no earlier run of it to go by. Each stage kind
# states its own typical duration at registration (a guess for a typical spec, labelled as such
# wherever shown).
FALLBACK_DURATION_S = 1800.0


@dataclass
class Estimate:
    stage_id: str
    gpu: str
    seconds: float
    cost: float
    currency: str
    source: str  # "history" | "default"
    runs: int  # earlier runs the figure comes from (0 for the default)
    note: str

    def as_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "seconds": round(self.seconds, 1), "cost": self.cost,
                "currency": self.currency, "source": self.source, "runs": self.runs, "note": self.note}

    def short(self) -> str:
        return f"~{self.cost:.2f} {self.currency}"


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def earlier_durations(db: Any, node: contract.PlanNode, gpu: str) -> tuple[list[float], str]:
    """Billed seconds of earlier successful remote runs on ``gpu``: of this stage if any, else of
    its kind. Returns (seconds, which)."""
    if db is None:
        return [], ""
    for where, args, which in (
        ("stage_id=?", (node.id,), "this stage"),
        ("kind=?", (node.kind,), f"{node.kind} stages"),
    ):
        rows = db.execute(
            f"SELECT duration, metrics FROM executions WHERE {where} AND gpu=? AND backend='modal'"
            " AND status='succeeded' ORDER BY started DESC LIMIT 20", (*args, gpu)).fetchall()
        secs = []
        for duration, metrics in rows:
            try:
                billed = json.loads(metrics or "{}").get("remote.billed_s")
            except ValueError:
                billed = None
            value = billed if billed else duration
            if value and value > 0:
                secs.append(float(value))
        if secs:
            return secs, which
    return [], ""


def estimate_stage(node: contract.PlanNode, hardware: dict[str, Any] | None, backend: str,
                   db: Any = None, typical_seconds: float | None = None) -> Estimate | None:
    """Estimated GPU type and cost of running ``node`` remotely (None when it runs locally);
    ``typical_seconds`` is its kind's declared typical duration, used when no earlier run is known."""
    gpu = stage_gpu(node, hardware, backend)
    if gpu is None:
        return None
    secs, which = earlier_durations(db, node, gpu)
    if secs:
        seconds = _median(secs)
        source, runs = "history", len(secs)
        note = f"median of {runs} earlier run{'s' if runs != 1 else ''} of {which} on {gpu} ({seconds / 60:.0f} min)"
    else:
        seconds = typical_seconds or FALLBACK_DURATION_S
        source, runs = "default", 0
        note = f"no earlier runs: price table x default estimate for {node.kind} ({seconds / 60:.0f} min)"
    price, currency = stage_cost(seconds, gpu, hardware)
    if gpu not in price_table(hardware):
        note += f"; no price for {gpu!r}: add it to hardware.price_table"
    return Estimate(node.id, gpu, seconds, round(price, 2), currency, source, runs, note)
