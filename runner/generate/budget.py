"""Wall time and cost per clip against the spec's targets.

Cost = price per hour of the priced GPU (``hardware.price_table`` merged over the built-in
estimates of :mod:`runner.core.pricing`) x wall seconds / 3600. The priced GPU is
``generate.video.targets.gpu`` when set; else ``hardware.stage_gpu.video`` or ``hardware.gpu``
when GPU stages run on Modal or the stage runs on a CUDA device; else ``cpu``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator


def priced_gpu(targets: dict[str, Any], hardware: dict[str, Any], device: str, kind: str = "video") -> str:
    """The price-table entry a clip is costed with (see the module docstring)."""
    if targets.get("gpu"):
        return str(targets["gpu"])
    if hardware.get("backend") == "modal" or str(device).startswith("cuda"):
        return str((hardware.get("stage_gpu") or {}).get(kind) or hardware.get("gpu") or "cpu")
    return "cpu"


def price(gpu: str, hardware: dict[str, Any]) -> tuple[float, str]:
    from runner.core.pricing import price_per_hour

    return price_per_hour(gpu, hardware)


class StepTimer:
    """Wall time per named step (accumulates when a step runs more than once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + (time.monotonic() - t0)

    def total(self, names: tuple[str, ...] | None = None) -> float:
        return sum(v for k, v in self.seconds.items() if names is None or k in names)


def budget(seconds: dict[str, float], per_hour: float, currency: str, gpu: str, targets: dict[str, Any],
           counted: tuple[str, ...]) -> dict[str, Any]:
    """Time and cost of a clip; pass/fail against ``max_seconds`` / ``max_cost`` (None: no target)."""
    total = sum(v for k, v in seconds.items() if k in counted)
    cost = per_hour * total / 3600.0
    max_s, max_c = targets.get("max_seconds"), targets.get("max_cost")
    return {
        "steps_s": {k: round(v, 3) for k, v in seconds.items()},
        "counted_steps": list(counted),
        "seconds": round(total, 3),
        "cost": round(cost, 6),
        "currency": currency,
        "gpu": gpu,
        "price_per_hour": per_hour,
        "max_seconds": max_s,
        "max_cost": max_c,
        "time_pass": None if max_s is None else bool(total <= float(max_s)),
        "cost_pass": None if max_c is None else bool(cost <= float(max_c)),
    }
