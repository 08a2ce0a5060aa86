"""Cost of a stage execution from its duration and the spec's price table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.core import contract
from runner.core.pricing import BUILTIN_PRICES_PER_HOUR, price_per_hour, stage_cost  # noqa: F401

def stage_gpu(node: contract.PlanNode, hardware: dict[str, Any] | None, backend: str) -> str | None:
    """The GPU a stage would use on a remote backend (None when it runs on the CPU/locally)."""
    if node.gpu is None or backend != "modal":
        return None
    hardware = hardware or {}
    return hardware.get("stage_gpu", {}).get(node.kind) or node.gpu or hardware.get("gpu")


# --------------------------------------------------------------------------- estimates (plan)

# Rough wall times of one remote execution per stage kind, used by `runner plan` only while the
# state database has no earlier run of the stage to go by. Guesses for a typical spec (SDXL LoRA,
# ~2000 steps; an evaluation suite of ~50 images per checkpoint), labelled as such wherever shown.
DEFAULT_DURATION_S: dict[str, float] = {
    "train": 5400.0,
    "evaluate": 1200.0,
    "storyboard": 600.0,
    "video": 900.0,
}
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
                   db: Any = None) -> Estimate | None:
    """Estimated GPU type and cost of running ``node`` remotely (None when it runs locally)."""
    gpu = stage_gpu(node, hardware, backend)
    if gpu is None:
        return None
    secs, which = earlier_durations(db, node, gpu)
    if secs:
        seconds = _median(secs)
        source, runs = "history", len(secs)
        note = f"median of {runs} earlier run{'s' if runs != 1 else ''} of {which} on {gpu} ({seconds / 60:.0f} min)"
    else:
        seconds = DEFAULT_DURATION_S.get(node.kind, FALLBACK_DURATION_S)
        source, runs = "default", 0
        note = f"no earlier runs: price table x default estimate for {node.kind} ({seconds / 60:.0f} min)"
    price, currency = stage_cost(seconds, gpu, hardware)
    if gpu not in {**BUILTIN_PRICES_PER_HOUR, **(hardware or {}).get("price_table", {})}:
        note += f"; no price for {gpu!r}: add it to hardware.price_table"
    return Estimate(node.id, gpu, seconds, round(price, 2), currency, source, runs, note)
