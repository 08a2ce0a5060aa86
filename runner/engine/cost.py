"""Cost of a stage execution from its duration and the spec's price table."""

from __future__ import annotations

from typing import Any

from runner.stages import base

# Built-in estimates of on-demand prices per GPU-hour (USD), used when the spec's
# hardware.price_table does not name a GPU. They are estimates: put your provider's current prices
# in the spec for real cost accounting.
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
}


def price_per_hour(gpu: str | None, hardware: dict[str, Any] | None) -> tuple[float, str]:
    hardware = hardware or {}
    table = {**BUILTIN_PRICES_PER_HOUR, **hardware.get("price_table", {})}
    currency = hardware.get("currency", "USD")
    return float(table.get(gpu or "cpu", 0.0)), currency


def stage_gpu(node: base.PlanNode, hardware: dict[str, Any] | None, backend: str) -> str | None:
    """The GPU a stage would use on a remote backend (None when it runs on the CPU/locally)."""
    if node.gpu is None or backend != "modal":
        return None
    hardware = hardware or {}
    return hardware.get("stage_gpu", {}).get(node.kind) or node.gpu or hardware.get("gpu")


def stage_cost(duration_s: float, gpu: str | None, hardware: dict[str, Any] | None) -> tuple[float, str]:
    per_hour, currency = price_per_hour(gpu, hardware)
    return round(per_hour * duration_s / 3600.0, 6), currency
