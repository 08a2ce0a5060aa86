"""Cost of a stage execution from its duration and the spec's price table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.core import contract
from runner.core.pricing import is_priced, price_note, remote_cpu, remote_gpu, stage_cost


def stage_gpu(node: contract.PlanNode, hardware: dict[str, Any] | None, backend: str) -> str | None:
    """What a stage is billed for on a remote backend: its GPU, or for a CPU stage sent there
    (hardware.stage_backend) its CPU container's label (``cpu 4 cores 16 GiB``, priced per core-hour
    and GiB-hour); None when it runs locally."""
    if backend != "modal":
        return None
    if node.gpu is None:
        return remote_cpu(node.kind, hardware).label
    return remote_gpu(node.kind, node.gpu, hardware)


#: The device name a local stage's estimates learn under when the spec names no hardware.gpu.
LOCAL_DEVICE = "local"


def local_device(hardware: dict[str, Any] | None) -> str:
    """The device a stage running here is estimated on: this machine (``local``). ``hardware.gpu``
    names the remote GPU, not this machine's, so local estimates are time only, learned from
    earlier local runs."""
    return LOCAL_DEVICE


# --------------------------------------------------------------------------- estimates (plan)

# The wall time `runner plan` assumes for a remote stage whose kind declares no
# ``typical_seconds`` while the state database has no earlier run of it to go by. Each stage kind
# states its own typical duration at registration (a guess for a typical spec, labelled as such
# wherever shown).
FALLBACK_DURATION_S = 1800.0


#: Latest successful runs per (stage kind, GPU) an estimate learns from.
HISTORY_RUNS = 10


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
    units: float | None = None  # the work this execution does (from the node config), e.g. 12
    unit: str | None = None  # ... in these units: "clip", "step", "image"
    per_unit_s: float | None = None  # learned seconds per unit (None: learned per execution, or default)
    backend: str = "modal"  # "modal" | "local" (then ``gpu`` is the local device, cost 0 when unpriced)
    priced: bool = True  # False: no price for ``gpu`` in the table (the estimate is time only)

    def as_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "seconds": round(self.seconds, 1), "cost": self.cost,
                "currency": self.currency, "source": self.source, "runs": self.runs, "note": self.note,
                "units": self.units, "unit": self.unit,
                "per_unit_s": None if self.per_unit_s is None else round(self.per_unit_s, 4),
                "backend": self.backend, "priced": self.priced}

    def short(self) -> str:
        if not self.priced:
            return f"~{_minutes(self.seconds)}, time only"
        return f"~{self.cost:.2f} {self.currency}"


@dataclass(frozen=True)
class PastRun:
    """One earlier successful remote execution: its billed seconds and the work it did."""

    stage_id: str
    seconds: float
    units: float | None
    unit: str | None


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def work_metrics(work: tuple[float, str] | None) -> dict[str, Any]:
    """The metrics an execution's row keeps of its planned work (a stage's own ``work_units``
    metric, reported through ctx.metric, takes precedence)."""
    if not work or not work[0] or work[0] <= 0:
        return {}
    return {"work_units": float(work[0]), "work_unit": str(work[1])}


def work_of(kind: contract.StageKind | None, node: contract.PlanNode) -> tuple[float, str] | None:
    """(units, unit) of ``node``'s work by its kind's ``work_units`` trait; None when unknown."""
    fn = getattr(kind, "work_units", None)
    if fn is None:
        return None
    try:
        got = fn(node.config)
    except (KeyError, TypeError, ValueError):
        return None
    return (float(got[0]), str(got[1])) if got and got[0] and got[0] > 0 else None


def load_history(db: Any, kinds: list[str] | set[str], limit: int = HISTORY_RUNS,
                 backend: str = "modal") -> dict[tuple[str, str], list[PastRun]]:
    """The latest ``limit`` successful runs on ``backend`` per (kind, GPU) of ``kinds``, newest
    first. Local rows carry no GPU: they are keyed by :data:`LOCAL_DEVICE`.

    Every read is a seek on the index executions_history (kind, backend, status, gpu, started
    DESC) that returns at most ``limit`` rows: the rows of the GPU after the last one seen, newest
    first; so the plan reads a few rows per kind and GPU however long the history (a million
    executions: bench/scale/statedb.py)."""
    kinds = sorted(set(kinds))
    if db is None or not kinds:
        return {}
    out: dict[tuple[str, str], list[PastRun]] = {}
    base = "SELECT gpu, stage_id, duration, metrics FROM executions WHERE kind=? AND backend=? AND status='succeeded'"
    for kind in kinds:
        rows = db.execute(base + " AND gpu IS NULL ORDER BY started DESC LIMIT ?", (kind, backend, limit)).fetchall()
        after = None
        while True:
            if rows:
                _add_runs(out, kind, [r for r in rows if r[0] == rows[0][0]])
            nxt = db.execute(base + (" AND gpu > ?" if after is not None else " AND gpu IS NOT NULL")
                             + " ORDER BY gpu, started DESC LIMIT ?",
                             (kind, backend, *((after,) if after is not None else ()), limit)).fetchall()
            if not nxt:
                break
            rows, after = nxt, nxt[0][0]
    return out


def _add_runs(out: dict[tuple[str, str], list[PastRun]], kind: str, rows: list[tuple]) -> None:
    """Rows (gpu, stage_id, duration, metrics) of one (kind, GPU), newest first, as past runs."""
    for gpu, stage_id, duration, metrics in rows:
        try:
            m = json.loads(metrics or "{}")
        except ValueError:
            m = {}
        value = m.get("remote.billed_s") or duration
        if not value or value <= 0:
            continue
        units = m.get("work_units")
        units = float(units) if isinstance(units, (int, float)) and units > 0 else None
        out.setdefault((kind, gpu or LOCAL_DEVICE), []).append(
            PastRun(stage_id, float(value), units, m.get("work_unit") if units else None))


def earlier_durations(db: Any, node: contract.PlanNode, gpu: str) -> tuple[list[float], str]:
    """Billed seconds of earlier successful remote runs on ``gpu``: of this stage if any, else of
    its kind. Returns (seconds, which)."""
    runs, which = _pick(load_history(db, [node.kind]).get((node.kind, gpu), []), node)
    return [r.seconds for r in runs], which


def _pick(runs: list[PastRun], node: contract.PlanNode) -> tuple[list[PastRun], str]:
    same = [r for r in runs if r.stage_id == node.id]
    if same:
        return same, "this stage"
    return (runs, f"{node.kind} stages") if runs else ([], "")


def duration_text(seconds: float) -> str:
    """``40 s``, ``12 min``, ``1.8 h``: how the plan writes a duration."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else _minutes(seconds)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def estimate_stage(node: contract.PlanNode, hardware: dict[str, Any] | None, backend: str,
                   db: Any = None, typical_seconds: float | None = None, *,
                   history: dict[tuple[str, str], list[PastRun]] | None = None,
                   work: tuple[float, str] | None = None) -> Estimate | None:
    """Estimated GPU type, time and cost of running ``node`` on ``backend`` (None for a remote
    backend that gives it no GPU). Locally (``backend="local"``) the device is
    :func:`local_device` and history is that of local runs (keyed ``local``: a local row records
    no GPU); the cost is the price table's for ``hardware.gpu`` when it names one, else time only.

    Learned from the latest successful runs of its kind on the same GPU (``history``, from
    :func:`load_history`; read from ``db`` when not given), those of this very stage first: where
    the node's ``work`` (units, unit) is known and earlier runs recorded theirs, the median
    seconds per unit times this node's units; else the median seconds per execution. With no
    earlier run, ``typical_seconds`` (its kind's declared typical duration) or the fallback."""
    local = backend != "modal"
    gpu = local_device(hardware) if local else stage_gpu(node, hardware, backend)
    if gpu is None:
        return None
    if history is None:
        history = load_history(db, [node.kind], backend="local" if local else "modal")
    runs = history.get((node.kind, LOCAL_DEVICE if local else gpu), [])
    per_unit_s = None
    counted = [r for r in runs if work is not None and r.units and r.unit == work[1]]
    picked, which = _pick(counted, node)
    if picked:
        per_unit_s = _median([r.seconds / r.units for r in picked])
        seconds = per_unit_s * work[0]
        n = len(picked)
        note = (f"~{_minutes(seconds)} (learned from {n} run{'s' if n != 1 else ''} of {which} on {gpu}: "
                f"{per_unit_s:.3g} s per {work[1]} x {work[0]:g} {work[1]}s)")
    else:
        picked, which = _pick(runs, node)
        if picked:
            seconds = _median([r.seconds for r in picked])
            n = len(picked)
            note = (f"~{_minutes(seconds)} (learned from {n} run{'s' if n != 1 else ''} of {which} on {gpu}: "
                    "median per execution)")
        else:
            if local:  # the kinds' typical durations are GPU figures: nothing to go by on this machine yet
                return None
            seconds = typical_seconds or FALLBACK_DURATION_S
            note = f"no earlier runs: price table x default estimate for {node.kind} ({seconds / 60:.0f} min) (default)"
    source, runs_n = ("history", len(picked)) if picked else ("default", 0)
    price, currency = stage_cost(seconds, gpu, hardware)
    priced = is_priced(gpu, hardware)
    note += price_note(gpu, hardware)  # H100:8: eight GPUs at the table's price each
    if not priced and (not local or gpu != LOCAL_DEVICE):
        note += f"; no price for {gpu!r}: add it to hardware.price_table"
    elif not priced and node.gpu:  # a GPU stage here: this machine's GPU has no price
        note += "; time only (no hardware.gpu to price)"
    return Estimate(node.id, gpu, seconds, round(price, 2), currency, source, runs_n, note,
                    units=None if work is None else work[0], unit=None if work is None else work[1],
                    per_unit_s=per_unit_s, backend="local" if local else "modal", priced=priced or not local)

