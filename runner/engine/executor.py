"""Execute a plan: dependency order, cached outputs restored, atomic promotion, state recorded."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.engine import cost as cost_mod
from runner.engine.context import LocalStageContext
from runner.engine.lock import workspace_lock
from runner.engine.progress import PlainReporter, make_reporter
from runner.engine.workspace import ExecutionRecord, Workspace
from runner.paths import cache_root
from runner.plan.graph import Graph, build_graph
from runner.plan.planner import Plan, PlannedStage, make_plan
from runner.spec.resolve import Spec
from runner.stages import base


class ApplyError(Exception):
    """A problem with the request itself (not a stage failure)."""

    exit_code = 2


@dataclass
class ApplyOptions:
    force: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)
    keep_going: bool = False
    wait_s: float = 0.0
    backend: str | None = None  # overrides hardware.backend of every spec
    command: str = "runner apply"
    dry_run: bool = False


@dataclass
class StageResult:
    stage_id: str
    kind: str
    action: str
    status: str  # succeeded | failed | cached | skipped | interrupted
    duration: float = 0.0
    error: str | None = None
    log_path: str | None = None


@dataclass
class ApplyResult:
    run_id: str | None
    plan: Plan
    results: list[StageResult]
    reports: dict[str, Path]
    status: str  # succeeded | failed | no-op | interrupted

    @property
    def failed(self) -> list[StageResult]:
        return [r for r in self.results if r.status == "failed"]


def project_root_of(specs: list[Spec]) -> Path:
    roots = {s.project_root for s in specs}
    if len(roots) != 1:
        raise ApplyError(
            "the specs of one batch must live in one project; found roots: "
            + ", ".join(str(r) for r in sorted(roots))
        )
    return roots.pop()


def plan_specs(specs: list[Spec], *, force: list[str] | None = None,
               only: list[str] | None = None) -> tuple[Plan, Workspace]:
    ws = Workspace(project_root_of(specs))
    graph = build_graph(specs)
    try:
        plan = make_plan(graph, ws, ws, force=force, only=only)
    except KeyError as exc:
        raise ApplyError(str(exc.args[0]) if exc.args else str(exc)) from None
    return plan, ws


def apply(specs: list[Spec], options: ApplyOptions | None = None,
          reporter: PlainReporter | None = None, on_plan: Any = None) -> ApplyResult:
    """Plan and execute ``specs`` under the workspace lock. ``on_plan(plan)`` is called with the
    plan before anything runs (the CLI prints it there)."""
    options = options or ApplyOptions()
    reporter = reporter or make_reporter()
    ws = Workspace(project_root_of(specs))
    try:
        with workspace_lock(ws.dir, command=options.command, wait_s=options.wait_s):
            ws.clear_tmp()
            graph = build_graph(specs)
            try:
                plan = make_plan(graph, ws, ws, force=options.force, only=options.only)
            except KeyError as exc:
                raise ApplyError(str(exc.args[0]) if exc.args else str(exc)) from None
            _check_backend(specs, options)
            if on_plan is not None:
                on_plan(plan)
            return _execute(plan, graph, ws, options, reporter, [str(s.file) for s in specs])
    finally:
        reporter.close()
        ws.close()


def _check_backend(specs: list[Spec], options: ApplyOptions) -> None:
    for spec in specs:
        backend = options.backend or spec.data.get("hardware", {}).get("backend", "local")
        if backend == "modal":
            raise ApplyError(
                f"{spec.file}: hardware.backend is 'modal', but this version of character-runner "
                "has no Modal backend yet; run with --backend local"
            )


def _execute(plan: Plan, graph: Graph, ws: Workspace, options: ApplyOptions,
             reporter: PlainReporter, spec_files: list[str]) -> ApplyResult:
    run_id = ws.start_run(options.command, spec_files)
    results: list[StageResult] = []
    timeline: list[dict[str, Any]] = []
    failed_ids: set[str] = set()
    by_id = {s.id: s for s in plan.stages}
    status = "succeeded" if plan.has_changes else "no-op"
    interrupted = False
    stop = False
    try:
        for ps in plan.stages:
            node = ps.node
            blocked = [u for u in node.upstream_ids() if u in failed_ids]
            if stop or blocked:
                why = f"upstream {blocked[0]} failed" if blocked else "not run: an earlier stage failed"
                results.append(StageResult(ps.id, node.kind, ps.action, "skipped", error=why))
                failed_ids.add(ps.id)
                timeline.append(_timeline_entry(ps, "skipped", 0.0, time.time(), why))
                ws.record_execution(_record(run_id, ps, graph, "skipped", time.time(), 0.0, {}, why, None, options))
                continue
            if not ps.will_execute:
                results.append(StageResult(ps.id, node.kind, ps.action, "cached"))
                timeline.append(_timeline_entry(ps, "cached", 0.0, time.time(), "; ".join(ps.reasons)))
                ws.record_execution(_record(run_id, ps, graph, "cached", time.time(), 0.0, {}, None, None, options))
                continue
            res = _run_stage(ps, by_id, graph, ws, run_id, reporter, timeline, options)
            results.append(res)
            timeline.append(_timeline_entry(ps, res.status, res.duration, time.time() - res.duration, res.error))
            if res.status == "failed":
                failed_ids.add(ps.id)
                status = "failed"
                if not options.keep_going:
                    stop = True
    except KeyboardInterrupt:
        interrupted = True
        status = "interrupted"
    reports = _publish_reports(plan, ws, graph, run_id, results)
    ws.finish_run(run_id, status, {"counts": plan.counts(), "stages": len(plan.stages)})
    if interrupted:
        raise KeyboardInterrupt
    return ApplyResult(run_id=run_id, plan=plan, results=results, reports=reports, status=status)


def _timeline_entry(ps: PlannedStage, status: str, duration: float, started: float, note: str | None) -> dict:
    return {
        "stage_id": ps.id,
        "kind": ps.node.kind,
        "character": ps.node.character,
        "action": ps.action,
        "status": status,
        "duration": round(duration, 3),
        "started": started,
        "reason": "; ".join(ps.reasons),
        "note": note or "",
    }


def _inputs_for(ps: PlannedStage, by_id: dict[str, PlannedStage], ws: Workspace) -> dict[str, base.Artifact]:
    inputs: dict[str, base.Artifact] = {}
    node_keys = {sid: p.key for sid, p in by_id.items()}
    for name, ref in ps.node.inputs.items():
        if isinstance(ref, base.StageOutputRef):
            key = node_keys[ref.stage_id]
            outs = ws.load_outputs(key)
            if ref.output not in outs:
                raise base.StageError(f"{ref.stage_id} has no output {ref.output!r}")
            inputs[name] = outs[ref.output]
        else:
            fd = ps.fileset_digests[name]
            root = Path(ref.root)
            files = tuple((root / rel) if root.is_dir() else root for rel, _ in fd.files)
            inputs[name] = base.Artifact(name=name, path=root, digest=fd.digest, files=files,
                                         meta={"spec_key": ref.spec_key})
    return inputs


def _safe_name(stage_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stage_id)


def _run_stage(ps: PlannedStage, by_id: dict[str, PlannedStage], graph: Graph, ws: Workspace, run_id: str,
               reporter: PlainReporter, timeline: list[dict], options: ApplyOptions) -> StageResult:
    node = ps.node
    kind = base.get(node.kind)
    reporter.stage_started(ps.id, ps.action, "; ".join(ps.reasons))
    log_path = ws.logs_dir / run_id / f"{_safe_name(ps.id)}.jsonl"
    started = time.time()
    t0 = time.monotonic()
    tmp = ws.new_tmp_dir(ps.key)
    ctx = LocalStageContext(
        stage_id=ps.id,
        character=node.character,
        out_dir=tmp,
        scratch_dir=ws.scratch_dir(ps.key),
        cache_dir=cache_root(),
        project_root=ws.project_root,
        run_id=run_id,
        log_file=log_path,
        reporter=reporter,
        extra={"timeline": list(timeline), "run_id": run_id, "workspace": ws,
               "plan": [s.as_json() for s in by_id.values() if s.node.character == node.character]},
    )
    ctx._write({"event": "start", "action": ps.action, "reasons": ps.reasons, "key": ps.key,
                "config": node.config, "host": socket.gethostname(), "pid": os.getpid()})
    error: str | None = None
    status = "succeeded"
    try:
        inputs = _inputs_for(ps, by_id, ws)
        backend = _backend_for(node, options)
        outputs = backend.run_stage(kind, node, inputs, ctx)
        manifest = _manifest(ps, outputs, tmp, run_id, ctx)
        ws.promote(tmp, ps.key, manifest)
        ws.set_current(ps.id, ps.key, ps.components, run_id, ps.fileset_digests)
        # A finished stage no longer needs its resumable state.
        shutil.rmtree(ws.scratch_dir(ps.key), ignore_errors=True)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        duration = time.monotonic() - t0
        ctx._write({"event": "interrupted"})
        ws.record_execution(_record(run_id, ps, graph, "interrupted", started, duration, ctx.metrics,
                                    "interrupted", str(log_path), options))
        reporter.stage_finished(ps.id, "interrupted", duration)
        raise
    except base.StageError as exc:
        status = "failed"
        error = str(exc) + (f" (hint: {exc.hint})" if exc.hint else "")
        ctx._write({"event": "error", "error": error})
    except Exception as exc:  # a bug or an unexpected library error: keep the traceback in the log
        status = "failed"
        error = f"{type(exc).__name__}: {exc}"
        ctx._write({"event": "error", "error": error, "traceback": traceback.format_exc()})
    if status == "failed":
        shutil.rmtree(tmp, ignore_errors=True)
    duration = time.monotonic() - t0
    ctx._write({"event": "end", "status": status, "duration": duration, "metrics": ctx.metrics})
    ws.record_execution(_record(run_id, ps, graph, status, started, duration, ctx.metrics, error,
                                str(log_path), options))
    note = error if error else (f"{len(ctx.warnings)} warning(s)" if ctx.warnings else "")
    reporter.stage_finished(ps.id, status, duration, note)
    return StageResult(ps.id, node.kind, ps.action, status, duration, error, str(log_path))


def _backend_for(node: base.PlanNode, options: ApplyOptions):
    from runner.backends import local

    return local.LocalBackend()


def _manifest(ps: PlannedStage, outputs: dict[str, base.Artifact], tmp: Path, run_id: str,
              ctx: LocalStageContext) -> dict[str, Any]:
    if not isinstance(outputs, dict):
        raise base.StageError(f"stage {ps.id} returned {type(outputs).__name__}, not a dict of artifacts")
    missing = [o for o in ps.node.outputs if o not in outputs]
    if missing:
        raise base.StageError(f"stage {ps.id} did not produce its outputs: {', '.join(missing)}")
    rel: dict[str, str] = {}
    meta: dict[str, Any] = {}
    tmp_r = tmp.resolve()
    for name, art in outputs.items():
        p = Path(art.path).resolve()
        try:
            rel[name] = p.relative_to(tmp_r).as_posix() or "."
        except ValueError:
            raise base.StageError(f"stage {ps.id} output {name!r} is outside its output folder: {p}") from None
        if not p.exists():
            raise base.StageError(f"stage {ps.id} output {name!r} does not exist: {p}")
        meta[name] = base.jsonable(art.meta)
    return {
        "stage_id": ps.id,
        "kind": ps.node.kind,
        "key": ps.key,
        "run_id": run_id,
        "created": time.time(),
        "outputs": rel,
        "meta": meta,
        "metrics": ctx.metrics,
        "warnings": ctx.warnings,
        "components": ps.components,
    }


def _record(run_id: str, ps: PlannedStage, graph: Graph, status: str, started: float,
            duration: float, metrics: dict, error: str | None, log_path: str | None,
            options: ApplyOptions) -> ExecutionRecord:
    hardware = graph.specs[ps.node.character].data.get("hardware", {})
    backend = options.backend or hardware.get("backend", "local")
    gpu = cost_mod.stage_gpu(ps.node, hardware, backend)
    price = cost_mod.stage_cost(duration, gpu, hardware) if status in ("succeeded", "failed") else (0.0, hardware.get("currency", "USD"))
    return ExecutionRecord(
        run_id=run_id, stage_id=ps.id, kind=ps.node.kind, character=ps.node.character, key=ps.key,
        action=ps.action, reason="; ".join(ps.reasons), status=status, started=started,
        duration=duration, metrics=metrics, cost=price[0], currency=price[1], gpu=gpu,
        backend=backend, remote_call_id=None, error=error, log_path=log_path,
    )


def _publish_reports(plan: Plan, ws: Workspace, graph: Graph, run_id: str,
                     results: list[StageResult]) -> dict[str, Path]:
    """Copy each character's report into <project>/<report.output_dir>/<character>/."""
    out: dict[str, Path] = {}
    status = {r.stage_id: r.status for r in results}
    for ps in plan.stages:
        if ps.node.kind != "report" or status.get(ps.id) not in ("succeeded", "cached"):
            continue
        spec = graph.specs[ps.node.character]
        folder = ws.project_root / spec.data.get("report", {}).get("output_dir", "reports") / ps.node.character
        src = ws.store_path(ps.key) / "report.html"
        if not src.exists():
            continue
        latest = folder / "latest.html"
        if status[ps.id] == "succeeded":
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{run_id}.html"
            _atomic_copy(src, dest)
            _atomic_copy(src, latest)
            out[ps.node.character] = dest
        else:
            out[ps.node.character] = latest if latest.exists() else src
    return out


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def rerender_reports(specs: list[Spec], reporter: PlainReporter | None = None) -> ApplyResult:
    """`runner report`: re-run only the report stages, against what the store holds now."""
    return apply(specs, ApplyOptions(force=["report"], only=["report"], command="runner report"),
                 reporter or make_reporter())
