"""Weights & Biases: one run per stage execution, in the project named by the spec (default:
$WANDB_PROJECT, else the character). Offline unless a WANDB_API_KEY is set (or ``mode: online``):
offline runs are written under .runner/wandb/ (or $WANDB_DIR) and uploaded later with
``wandb sync``. Curves are logged per step, summary values into the run summary, files as one
artifact per stage execution."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runner.tracking import settings as S
from runner.tracking.record import StageLog, TrackedRun
from runner.tracking.trackers import Tracker


class WandbTracker(Tracker):
    name = "wandb"

    def _init(self, **kwargs: Any):
        import wandb

        folder = S.wandb_dir(self.workspace_dir)
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                  save_code=False, init_timeout=60)
        return wandb.init(dir=str(folder), mode=S.wandb_mode(self.settings), reinit="create_new",
                          settings=settings, **kwargs)

    def _project(self, log_tags: dict[str, str]) -> str:
        return (self.settings.get("project") or os.environ.get("WANDB_PROJECT")
                or log_tags.get("runner.character") or "character-runner")

    def log(self, log: StageLog) -> TrackedRun:
        project = self._project(log.tags)
        run = self._init(project=project, entity=self.settings.get("entity") or None, name=log.name,
                         job_type=log.kind, config=log.params,
                         tags=[f"{k}:{v}"[:64] for k, v in sorted(log.tags.items())])
        try:
            for step, values in log.by_step():
                run.log(values, step=step)
            run.summary.update(log.metrics)
            if self.settings.get("artifacts", True) and log.artifacts:
                _log_files(run, f"{log.kind}-{run.id}", log.kind, log.artifacts)
        except BaseException:
            run.finish(exit_code=1)
            raise
        mode = S.wandb_mode(self.settings)
        where = str(Path(run.dir).parent) if mode == "offline" else f"{run.entity}/{project}"
        url = run.url if mode == "online" else None
        run.finish()
        return TrackedRun("wandb", run_id=run.id, url=url, uri=where, experiment=project, mode=mode,
                          artifacts=bool(self.settings.get("artifacts", True)))

    def attach(self, run: TrackedRun, files: list[tuple[Path, str]]) -> None:
        # resuming an offline run writes a second offline folder for the same id; `wandb sync`
        # merges them into the one run
        self.settings = {**self.settings, "mode": run.mode or "auto"}
        wb = self._init(project=run.experiment, id=run.run_id, resume="allow")
        try:
            _log_files(wb, f"report-{run.run_id}", "report", files)
        finally:
            wb.finish()


def _log_files(run: Any, name: str, kind: str, files: list[tuple[Path, str]]) -> None:
    import wandb

    art = wandb.Artifact(name, type=kind)
    for path, folder in files:
        path = Path(path)
        if path.is_dir():
            art.add_dir(str(path), name=folder or None)
        elif path.is_file():
            art.add_file(str(path), name=f"{folder}/{path.name}" if folder else path.name)
    run.log_artifact(art)
