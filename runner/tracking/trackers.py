"""The Tracker interface, and the two calls the stages and the engine make: log and attach."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from runner.tracking.record import StageLog, TrackedRun


class Tracker(ABC):
    """One tracking backend. ``log`` records a whole stage execution as one run and returns it;
    ``attach`` adds files to a run logged earlier (the report, rendered after the stages)."""

    name: str

    def __init__(self, settings: dict[str, Any], workspace_dir: Path) -> None:
        self.settings = settings
        self.workspace_dir = workspace_dir

    @abstractmethod
    def log(self, log: StageLog) -> TrackedRun: ...

    @abstractmethod
    def attach(self, run: TrackedRun, files: list[tuple[Path, str]]) -> None: ...


def tracker(name: str, settings: dict[str, Any], workspace_dir: Path) -> Tracker:
    if name == "mlflow":
        from runner.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker(settings, workspace_dir)
    if name == "wandb":
        from runner.tracking.wandb_tracker import WandbTracker

        return WandbTracker(settings, workspace_dir)
    raise ValueError(f"unknown tracker {name!r}")


def _failure(name: str, exc: BaseException, what: str) -> str:
    if isinstance(exc, ImportError):
        return (f"{name} tracking is enabled but {name} is not installed "
                "(pip install 'character-runner[track]'); nothing was logged")
    return f"{name}: could not {what}: {type(exc).__name__}: {exc}"


def log_stage(settings: dict[str, Any] | None, log: StageLog, workspace_dir: Path) -> list[TrackedRun]:
    """Log ``log`` to every enabled tracker of a node's ``tracking`` config. Never raises for a
    tracker's failure (server down, no package, refused login): that tracker's entry carries a
    ``warning`` instead, so a finished training is never lost to its tracking."""
    out: list[TrackedRun] = []
    log.tags = {**(settings or {}).get("tags", {}), **log.tags}
    for name in ("mlflow", "wandb"):
        conf = (settings or {}).get(name)
        if not conf:
            continue
        try:
            out.append(tracker(name, conf, workspace_dir).log(log))
        except Exception as exc:  # noqa: BLE001  (any failure of a tracker is a warning)
            out.append(TrackedRun(name, warning=_failure(name, exc, f"log {log.name}")))
    return out


def attach(runs: list[dict[str, Any]], files: list[tuple[Path, str]], workspace_dir: Path,
           settings: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Add ``files`` to runs logged earlier (executions.tracking entries); returns warnings.
    Runs without an id (logging failed) and runs logged without artifacts are skipped."""
    warnings = []
    for entry in runs:
        run = TrackedRun(**entry)
        if not run.run_id or not run.artifacts:
            continue
        try:
            tracker(run.backend, (settings or {}).get(run.backend, {}), workspace_dir).attach(run, files)
        except Exception as exc:  # noqa: BLE001
            warnings.append(_failure(run.backend, exc,
                                     f"add {', '.join(p.name for p, _ in files)} to run {run.run_id}"))
    return warnings
