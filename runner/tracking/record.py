"""What one stage execution sends to a tracker, and what comes back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageLog:
    """Everything a stage logs, independent of the tracker.

    ``series`` are curves (name -> [(step, value)]: the trainer's loss and learning rate, the
    evaluation's metrics per category over checkpoints); ``metrics`` are single values (the run's
    summary); ``artifacts`` are (file or folder, folder inside the run's artifacts)."""

    name: str  # the run's name: "<stage id> <apply run id>"
    kind: str
    params: dict[str, Any] = field(default_factory=dict)  # nested, as in the node config
    tags: dict[str, str] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)

    def by_step(self) -> list[tuple[int, dict[str, float]]]:
        """The series merged per step, steps ascending (what W&B's run.log wants)."""
        steps: dict[int, dict[str, float]] = {}
        for name, points in self.series.items():
            for step, value in points:
                steps.setdefault(int(step), {})[name] = float(value)
        return sorted(steps.items())


@dataclass
class TrackedRun:
    """One run in one tracker (stored as JSON in executions.tracking). ``warning`` says what went
    wrong when logging failed (then ``run_id`` may be empty: nothing was recorded)."""

    backend: str  # mlflow | wandb
    run_id: str = ""
    url: str | None = None  # the run's web page, when there is one
    uri: str = ""  # mlflow: the tracking URI; wandb: the run's folder (offline) or project path
    experiment: str = ""  # mlflow experiment / wandb project
    mode: str = ""  # wandb: online | offline
    artifacts: bool = True  # whether files are logged (the report too)
    warning: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as flat params: ``{"lora": {"rank": 4}}`` -> ``{"lora.rank": "4"}``; list
    items by index (``phases.0.lr``); values as short strings (trackers cap them)."""
    out: dict[str, str] = {}
    if isinstance(data, dict) and data:
        items = data.items()
    elif isinstance(data, (list, tuple)) and data:
        items = enumerate(data)
    else:
        out[prefix or "value"] = str(data)[:500]
        return out
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
