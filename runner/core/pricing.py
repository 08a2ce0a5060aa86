"""GPU prices per hour, CPU container prices, the cost of a stage's duration, and the memory of
each GPU type.

The built-in prices are estimates of on-demand prices (USD); a spec's ``hardware.price_table``
overrides them, and its ``hardware.currency`` names the currency. A CPU stage sent to Modal
(``hardware.stage_backend``) runs in a container of ``hardware.cpu`` cores and memory, billed as
Modal bills CPU functions: per physical core-hour plus per GiB-hour of memory (the table's
``cpu_core`` and ``memory_gib`` entries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from runner.core.errors import UserError

BUILTIN_PRICES_PER_HOUR: dict[str, float] = {
    "cpu": 0.0,
    "T4": 0.59,
    "L4": 0.80,
    "A10G": 1.10,
    "L40S": 1.95,
    "A100-40GB": 2.10,
    "A100-80GB": 2.50,
    "H100": 3.95,
    "H200": 4.54,
    "B200": 6.25,
    # CPU containers on Modal (hardware.stage_backend): per physical core-hour and per GiB-hour of
    # memory (Modal's list prices, $0.0000131/core/s and $0.00000222/GiB/s).
    "cpu_core": 0.0472,
    "memory_gib": 0.0080,
}

#: The price table entries of a CPU container (not GPU types).
CPU_PRICE_KEYS = ("cpu_core", "memory_gib")


# GPU memory in GiB as nvidia-smi reports memory.total for each type (quoted from the vendors'
# figures: 16/24/48/40/80/141/180 GB cards less what the driver reserves); the train stage's plan
# compares its estimated peak against these (runner.diffusion.memory). hardware.gpu_memory_gib
# overrides them.
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 15.0,
    "L4": 22.5,
    "A10G": 22.5,
    "L40S": 45.0,
    "A100-40GB": 40.0,
    "A100-80GB": 80.0,
    "H100": 79.6,
    "H200": 140.4,
    "B200": 179.0,
}


#: The most GPUs one container takes (Modal's limit for ``<type>:<n>``).
MAX_GPUS = 8


class GpuSpecError(UserError):
    """A GPU setting that is not ``<type>`` or ``<type>:<n>`` with n in 1..MAX_GPUS."""


def parse_gpu(gpu: str, key: str = "hardware.gpu") -> tuple[str, int]:
    """(type, count) of a GPU setting in Modal's syntax: ``H100`` -> (H100, 1), ``H100:8`` ->
    (H100, 8). ``key`` names the setting in the message of a count that is not 1..MAX_GPUS."""
    kind, sep, count = str(gpu).strip().rpartition(":")
    if not sep:
        return str(gpu).strip(), 1
    if not kind or not count.isdigit() or not 1 <= int(count) <= MAX_GPUS:
        raise GpuSpecError(f"{key}: {gpu!r} is not a GPU type with a count of 1 to {MAX_GPUS}",
                           hint=f"Write the type alone (H100) or <type>:<n> with n from 1 to {MAX_GPUS} "
                                "(Modal's syntax, e.g. H100:8 for eight H100s in one container).")
    return kind, int(count)


def gpu_type(gpu: str | None) -> str | None:
    """The GPU type of a setting without its count (``H100:8`` -> ``H100``)."""
    return parse_gpu(gpu)[0] if gpu else gpu


def gpu_count(gpu: str | None) -> int:
    """GPUs of a setting (``H100:8`` -> 8; a type alone, or none, -> 1)."""
    return parse_gpu(gpu)[1] if gpu else 1


def gpu_memory_gib(gpu: str | None, hardware: dict[str, Any] | None) -> float | None:
    """GPU memory of one GPU of ``gpu`` in GiB (the spec's hardware.gpu_memory_gib over the
    built-in figures; ``H100:8`` is eight H100s, each with an H100's memory); None for a type
    neither knows."""
    if not gpu:
        return None
    table = {**GPU_MEMORY_GIB, **((hardware or {}).get("gpu_memory_gib") or {})}
    value = table.get(gpu, table.get(gpu_type(gpu)))
    return float(value) if value is not None else None

def price_table(hardware: dict[str, Any] | None) -> dict[str, float]:
    """The built-in prices with the spec's own on top."""
    return {**BUILTIN_PRICES_PER_HOUR, **(hardware or {}).get("price_table", {})}


def price_per_hour(gpu: str | None, hardware: dict[str, Any] | None) -> tuple[float, str]:
    """Price per hour of ``gpu``: the table's price of its type times its count (``H100:8`` costs
    eight H100s), unless the table prices the setting itself; a CPU container's label
    (:func:`cpu_label`) costs its cores at ``cpu_core`` plus its memory at ``memory_gib``."""
    currency = (hardware or {}).get("currency", "USD")
    table = price_table(hardware)
    box = parse_cpu_label(gpu)
    if box is not None:
        return float(table.get("cpu_core", 0.0)) * box.cores + float(table.get("memory_gib", 0.0)) * box.memory_gib, \
            currency
    if gpu and gpu not in table:
        kind, count = parse_gpu(gpu)
        return float(table.get(kind, 0.0)) * count, currency
    return float(table.get(gpu or "cpu", 0.0)), currency


def is_priced(gpu: str, hardware: dict[str, Any] | None) -> bool:
    """Whether the price table prices ``gpu`` (its type, for ``<type>:<n>``; a CPU container always:
    the built-in table holds its two entries)."""
    if parse_cpu_label(gpu) is not None:
        return True
    table = price_table(hardware)
    return gpu in table or gpu_type(gpu) in table


def price_note(gpu: str | None, hardware: dict[str, Any] | None) -> str:
    """'; 8 x H100 at 3.95 USD/h each' for a several-GPU setting the table prices by type, else ''."""
    box = parse_cpu_label(gpu)
    if box is not None:
        t, cur = price_table(hardware), (hardware or {}).get("currency", "USD")
        return (f"; {box.cores:g} cores at {float(t.get('cpu_core', 0.0)):g} {cur}/h each + "
                f"{box.memory_gib:g} GiB at {float(t.get('memory_gib', 0.0)):g} {cur}/h each")
    if not gpu or gpu in price_table(hardware) or gpu_count(gpu) == 1 or not is_priced(gpu, hardware):
        return ""
    kind, count = parse_gpu(gpu)
    per_gpu = price_table(hardware)[kind]
    return f"; {count} x {kind} at {per_gpu:g} {(hardware or {}).get('currency', 'USD')}/h each"


def stage_cost(duration_s: float, gpu: str | None, hardware: dict[str, Any] | None) -> tuple[float, str]:
    per_hour, currency = price_per_hour(gpu, hardware)
    return round(per_hour * duration_s / 3600.0, 6), currency


def remote_gpu(kind: str, requested: str | None, hardware: dict[str, Any] | None) -> str | None:
    """The GPU type a stage of ``kind`` asks for on a remote backend: ``hardware.stage_gpu[kind]``,
    else what the stage requested, else ``hardware.gpu``; None for a stage that needs no GPU
    (``requested`` None)."""
    if requested is None:
        return None
    hardware = hardware or {}
    return (hardware.get("stage_gpu") or {}).get(kind) or requested or hardware.get("gpu")


# --------------------------------------------------------------------------- CPU stages on Modal

#: Where stage kinds run: "local" (this machine) or "modal".
BACKENDS = ("local", "modal")


@dataclass(frozen=True)
class CpuBox:
    """A CPU container a remote CPU stage asks for: physical cores (Modal's ``cpu=``) and memory in
    GiB (Modal's ``memory=`` is MiB)."""

    cores: float
    memory_gib: float

    @property
    def label(self) -> str:
        return cpu_label(self.cores, self.memory_gib)

    @property
    def memory_mib(self) -> int:
        return int(round(self.memory_gib * 1024))


_CPU_LABEL = re.compile(r"^cpu (\d+(?:\.\d+)?) cores? (\d+(?:\.\d+)?) GiB$")


def cpu_label(cores: float, memory_gib: float) -> str:
    """How a CPU container is named where a GPU type would be (the plan line, the executions
    table's ``gpu`` column, the history estimates learn from): ``cpu 4 cores 16 GiB``."""
    return f"cpu {float(cores):g} cores {float(memory_gib):g} GiB"


def parse_cpu_label(label: str | None) -> CpuBox | None:
    """The container of a :func:`cpu_label`, or None for anything else (a GPU setting, None)."""
    m = _CPU_LABEL.match(label or "")
    return CpuBox(float(m.group(1)), float(m.group(2))) if m else None


def stage_backend(kind: str, gpu: str | None, hardware: dict[str, Any] | None, override: str | None = None) -> str:
    """Where a stage of ``kind`` runs: ``override`` (``--backend``) ``local`` keeps every stage here;
    else ``hardware.stage_backend[kind]`` when set; else a GPU stage (``gpu`` not None) follows
    ``override`` or ``hardware.backend``, and a CPU stage runs here."""
    hardware = hardware or {}
    if override == "local":
        return "local"
    chosen = (hardware.get("stage_backend") or {}).get(kind)
    if chosen:
        return str(chosen)
    return (override or hardware.get("backend", "local")) if gpu is not None else "local"


def remote_cpu(kind: str, hardware: dict[str, Any] | None) -> CpuBox:
    """The CPU container of a CPU stage of ``kind`` on Modal: ``hardware.stage_cpu[kind]`` over
    ``hardware.cpu`` (each key on its own). ``hardware`` is a resolved spec's (the schema's
    defaults of hardware.cpu filled in: they are the one source of the default container)."""
    hardware = hardware or {}
    box = {**(hardware.get("cpu") or {}), **((hardware.get("stage_cpu") or {}).get(kind) or {})}
    if "cores" not in box or "memory_gib" not in box:
        raise ValueError("hardware.cpu has no cores/memory_gib: pass a resolved spec's hardware section")
    return CpuBox(float(box["cores"]), float(box["memory_gib"]))


# --------------------------------------------------------------------------- per unit of work (report)


def per_unit(execution: dict[str, Any], targets: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Seconds and cost per unit of work of one recorded execution (a row of
    ``Workspace.executions``), against ``targets`` (``max_seconds`` / ``max_cost`` per unit, None:
    no target); None when the row did no counted work or did not succeed."""
    m = execution.get("metrics") or {}
    units = m.get("work_units")
    if execution.get("status") != "succeeded" or not isinstance(units, (int, float)) or units <= 0:
        return None
    seconds = float(m.get("remote.billed_s") or execution.get("duration") or 0.0) / units
    cost = float(execution.get("cost") or 0.0) / units
    out: dict[str, Any] = {"units": units, "unit": m.get("work_unit") or "unit", "seconds": round(seconds, 3),
                           "cost": round(cost, 6), "currency": execution.get("currency") or "",
                           "max_seconds": None, "max_cost": None, "time_pass": None, "cost_pass": None}
    targets = targets or {}
    if targets.get("max_seconds") is not None:
        out.update(max_seconds=float(targets["max_seconds"]), time_pass=seconds <= float(targets["max_seconds"]))
    if targets.get("max_cost") is not None:
        out.update(max_cost=float(targets["max_cost"]), cost_pass=cost <= float(targets["max_cost"]))
    return out
