"""After the stages: what an apply hands to the world outside the store.

- each summarizing stage's document (the HTML report) is copied to
  ``<report.output_dir>/<character>/<run id>.<ext>`` and ``latest.<ext>``;
- stages with a ``publish`` hook copy their outputs to ``<project>/.runner/exports/<character>/``;
- stages with a ``track`` hook log to experiment trackers, and a fresh report is attached to the
  tracker runs of its character.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runner.core.fs import copy_atomic
from runner.engine.record import StageResult
from runner.engine.request import ApplyError
from runner.engine.run_one import Running
from runner.engine.workspace import Workspace
from runner.paths import inside
from runner.plan.planner import Plan, PlannedStage
from runner.spec.resolve import Spec

KEPT = ("succeeded", "cached")  # statuses whose outputs are in the store after the run


def report_folder(spec: Spec) -> Path:
    """``<report.output_dir>/<character>`` (output_dir is resolved relative to the spec file). A
    symlink that takes it outside the project is refused before anything runs (exit 2)."""
    folder = spec.abspath(spec.data["report"]["output_dir"]) / spec.name
    if not spec.allow_outside and not inside(folder, spec.project_root):
        raise ApplyError(f"{spec.file}: report.output_dir: the report folder {folder} resolves to "
                         f"{os.path.realpath(folder)}, outside the project folder {spec.project_root}; "
                         "remove the symlink, or pass --allow-outside-project if this is intended")
    return folder


def publish_reports(plan: Plan, ws: Workspace, run_id: str, results: list[StageResult]) -> dict[str, Path]:
    """Copy each character's report (its summarizing stage's document) into its report folder;
    returns character -> the copy of this run (or the latest one, for a cached report)."""
    out: dict[str, Path] = {}
    status = {r.stage_id: r.status for r in results}
    for ps in plan.stages:
        if not ps.summarizes or status.get(ps.id) not in KEPT:
            continue
        src = _document(ps, ws)
        if src is None:
            continue
        folder = report_folder(plan.graph.specs[ps.node.character])
        latest = folder / f"latest{src.suffix}"
        if status[ps.id] == "succeeded":
            dest = folder / f"{run_id}{src.suffix}"
            copy_atomic(src, dest)
            copy_atomic(src, latest)
            out[ps.node.character] = dest
        else:
            out[ps.node.character] = latest if latest.exists() else src
    return out


def _document(ps: PlannedStage, ws: Workspace) -> Path | None:
    """The file a summarizing stage publishes: its first declared output, when that is a file."""
    if not ps.node.outputs or not ws.store_has(ps.key):
        return None
    art = ws.load_outputs(ps.key).get(ps.node.outputs[0])
    return Path(art.path) if art is not None and Path(art.path).is_file() else None


def publish_outputs(plan: Plan, ws: Workspace, results: list[StageResult], reporter: Any) -> None:
    """Stages with a ``publish`` hook copy their outputs to <project>/.runner/exports/<character>/."""
    status = {r.stage_id: r.status for r in results}
    for ps in plan.stages:
        kind = plan.graph.registry.get(ps.node.kind)
        if kind.publish is None or status.get(ps.id) not in KEPT or not ws.store_has(ps.key):
            continue
        dest = ws.dir / "exports" / ps.node.character
        try:
            kind.publish(ps.node.config, ws.load_outputs(ps.key), dest)
        except OSError as exc:
            reporter.log(ps.id, "warning", f"could not publish to {dest}: {exc}")


def track_stage(r: Running) -> None:
    """A succeeded stage's ``track`` hook (experiment trackers), recorded in executions.tracking;
    a tracker's failure is a warning, never the stage's failure."""
    ps, ws, run_id = r.ps, r.env.ws, r.env.run_id
    kind = r.env.registry.get(ps.node.kind)
    if kind.track is None or not ps.node.config.get("tracking"):
        return
    env = {"stage_id": ps.id, "character": ps.node.character, "run_id": run_id, "key": ps.key,
           "project_root": str(ws.project_root), "workspace_dir": str(ws.dir)}
    try:
        runs = kind.track(ps.node.config, ws.load_outputs(ps.key), env)
    except Exception as exc:  # noqa: BLE001  (a bug in a hook must not cost the stage)
        runs = [{"backend": "tracking", "run_id": "", "warning": f"tracking failed: {type(exc).__name__}: {exc}"}]
    ws.set_tracking(r.exec_id, runs)
    for run in runs:
        if run.get("warning"):
            r.ctx.warn(f"tracking: {run['warning']} (the stage's outputs are kept)")
        else:
            r.ctx.log(f"tracked as {run['backend']} run {run['run_id']}", tracking=run)
            r.env.reporter.log(ps.id, "info", f"{run['backend']} run {run['run_id']}"
                               + (f": {run['url']}" if run.get("url") else ""))


def track_reports(plan: Plan, ws: Workspace, run_id: str, reports: dict[str, Path],
                  results: list[StageResult], reporter: Any) -> None:
    """Add each character's new report to the tracker runs of this apply (artifacts)."""
    summaries = {ps.id for ps in plan.stages if ps.summarizes}
    fresh = {plan.by_id(r.stage_id).node.character for r in results
             if r.stage_id in summaries and r.status == "succeeded"}
    if not fresh:
        return
    from runner import tracking

    for e in ws.executions(run_id):
        report = reports.get(e["character"])
        if not e["tracking"] or e["character"] not in fresh or report is None:
            continue
        for warning in tracking.attach(e["tracking"], [(report, "report")], ws.dir):
            reporter.log(e["stage_id"], "warning", f"tracking: {warning}")
