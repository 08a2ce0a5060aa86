"""Execute a plan: dependency order, cached outputs restored, atomic promotion, state recorded."""

from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.engine import cost as cost_mod
from runner.backends.context import LocalStageContext
from runner.engine.lock import workspace_lock
from runner.engine.progress import PlainReporter, make_reporter
from runner.engine.workspace import ExecutionRecord, Workspace
from runner.paths import cache_root, inside
from runner.plan.graph import Graph, build_graph
from runner.plan.planner import Plan, PlannedStage, make_plan
from runner.spec.resolve import Spec
from runner.core import contract
from runner.stages import registry as stage_registry


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
    # Where remote stages run instead of Modal: a RemoteBackend, or a transport such as
    # runner.backends.remote.FolderTransport (tests; debugging a stage the way Modal runs it).
    remote: Any = None
    # Remote stages at once (default: the smallest hardware.modal.max_parallel of the batch).
    max_parallel: int | None = None


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
    for spec in specs:
        report_folder(spec)  # refuse a report folder outside the project before anything runs
    ws = Workspace(project_root_of(specs))
    try:
        with workspace_lock(ws.dir, command=options.command, wait_s=options.wait_s):
            _settle_dead_runs(ws, reporter)
            ws.clear_tmp()
            graph = build_graph(specs)
            try:
                plan = make_plan(graph, ws, ws, force=options.force, only=options.only)
            except KeyError as exc:
                raise ApplyError(str(exc.args[0]) if exc.args else str(exc)) from None
            remote_ids = _check_backend(specs, options, plan, graph)
            if on_plan is not None:
                on_plan(plan)
            return _execute(plan, graph, ws, options, reporter, [str(s.file) for s in specs], remote_ids)
    finally:
        reporter.close()
        ws.close()


def _settle_dead_runs(ws: Workspace, reporter: Any) -> None:
    """With the lock held, every run still recorded as running belongs to a process that died."""
    if not ws.exists():
        return
    for run_id, seen in ws.mark_dead_runs():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen))
        reporter.log("runs", "warning", f"run {run_id} was killed (its process died; last seen {when}); "
                     "it is marked killed in `runner runs`")


def backend_of(spec: Spec, options: ApplyOptions) -> str:
    return options.backend or spec.data.get("hardware", {}).get("backend", "local")


def is_remote(node: contract.PlanNode, graph: Graph, options: ApplyOptions) -> bool:
    """GPU stages of a spec whose backend is modal run remotely; everything else stays local."""
    return node.gpu is not None and backend_of(graph.specs[node.character], options) == "modal"


def _check_backend(specs: list[Spec], options: ApplyOptions, plan: Plan | None = None,
                   graph: Graph | None = None) -> list[str]:
    """The remote stages this apply will execute; fails at once (no network, no hang) when they
    need Modal and no credentials are configured."""
    if plan is None or graph is None:
        return []
    remote = [ps.id for ps in plan.stages if ps.will_execute and is_remote(ps.node, graph, options)]
    if remote and options.remote is None:
        from runner.backends.modal_backend import ModalUnavailable, require_credentials

        try:
            require_credentials("hardware.backend: modal" if options.backend is None else "--backend modal")
        except ModalUnavailable as exc:
            raise ApplyError(f"{len(remote)} GPU stage(s) to run on Modal ({', '.join(remote[:4])}"
                             f"{', ...' if len(remote) > 4 else ''}): {exc}") from None
    return remote


def plan_estimates(plan: Plan, backend: str | None = None, ws: Workspace | None = None) -> dict[str, cost_mod.Estimate]:
    """Estimated GPU and cost of every remote stage of ``plan`` (``runner plan`` shows them):
    from earlier runs in the state database where there are some, else from the price table and a
    the typical duration its kind declares (each estimate says which)."""
    out: dict[str, cost_mod.Estimate] = {}
    opts = ApplyOptions(backend=backend)
    db = ws.db if ws is not None and ws.exists() else None
    for ps in plan.stages:
        spec = plan.graph.specs[ps.node.character]
        if not is_remote(ps.node, plan.graph, opts):
            continue
        typical = plan.graph.registry.get(ps.node.kind).typical_seconds
        est = cost_mod.estimate_stage(ps.node, spec.data.get("hardware", {}), "modal", db, typical)
        if est is not None:
            out[ps.id] = est
    return out


class _LockedReporter:
    """Serializes reporter calls when stages run in threads (rich is not thread-safe)."""

    def __init__(self, inner: Any) -> None:
        import threading

        self._inner = inner
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


def _make_remote_backend(plan: Plan, graph: Graph, ws: Workspace, options: ApplyOptions, remote_ids: list[str]):
    from runner.backends.remote import RemoteBackend

    def gpu_of(node: contract.PlanNode) -> str | None:
        return cost_mod.stage_gpu(node, graph.specs[node.character].data.get("hardware", {}), "modal")

    if options.remote is not None:
        r = options.remote
        return r if hasattr(r, "run_stage") else RemoteBackend(r, ws.dir, gpu_of)
    from runner.backends.modal_backend import ModalTransport, ModalUnavailable, build_stage_app

    try:
        stage_app = build_stage_app(graph, [graph.nodes[i] for i in remote_ids])
    except ModalUnavailable as exc:
        raise ApplyError(str(exc)) from None
    except Exception as exc:  # the SDK rejected a setting (a GPU name, a timeout...)
        raise ApplyError(f"the Modal app for the GPU stages could not be declared: {type(exc).__name__}: {exc} "
                         "(check hardware.gpu, hardware.stage_gpu and hardware.modal)") from None
    return RemoteBackend(ModalTransport(stage_app), ws.dir, gpu_of)


def _max_parallel(graph: Graph, options: ApplyOptions) -> int:
    if options.max_parallel:
        return max(1, int(options.max_parallel))
    values = [int(((s.data.get("hardware", {}).get("modal") or {}).get("max_parallel", 4)))
              for s in graph.specs.values()]
    return max(1, min(values or [4]))


def _execute(plan: Plan, graph: Graph, ws: Workspace, options: ApplyOptions,
             reporter: PlainReporter, spec_files: list[str], remote_ids: list[str] | None = None) -> ApplyResult:
    """Run the plan in dependency order. Local stages run one at a time in this thread; remote
    stages (GPU stages on Modal) fan out to a thread pool, up to hardware.modal.max_parallel at
    once. Only this thread touches the state database and the store: a worker thread uploads,
    calls and downloads into the stage's tmp folder, and this thread promotes and records it, so a
    failure in one remote stage never loses the results of the others."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    remote_ids = remote_ids or []
    # Declared before the run starts: a Modal app that cannot be built fails the apply cleanly.
    remote_backend = _make_remote_backend(plan, graph, ws, options, remote_ids) if remote_ids else None
    session = None
    if remote_backend is not None:
        session = remote_backend.session()
        if getattr(remote_backend.transport, "name", "") == "modal":
            reporter.log("modal", "info", f"starting the Modal app for {len(remote_ids)} GPU stage(s) "
                         "(the first run builds the image: a few minutes)")
        try:
            session.__enter__()  # for Modal: app.run() (builds the image the first time)
        except Exception as exc:
            raise ApplyError(f"could not start the Modal app for the GPU stages: {type(exc).__name__}: {exc}"
                             " (check `modal token new` / `modal profile current`, or run with --backend local)") from None
    run_id = ws.start_run(options.command, spec_files)
    heartbeat = ws.heartbeat(run_id)
    results: list[StageResult] = []
    timeline: list[dict[str, Any]] = []
    done: dict[str, str] = {}  # stage id -> final status
    by_id = {s.id: s for s in plan.stages}
    status = "succeeded" if plan.has_changes else "no-op"
    interrupted = False
    stop = False
    pool: ThreadPoolExecutor | None = None
    running: dict[Future, _Running] = {}
    max_parallel = _max_parallel(graph, options)
    if remote_ids:
        reporter = _LockedReporter(reporter)  # type: ignore[assignment]
    local_backend = _local_backend()

    def begin(ps: PlannedStage, backend: Any, remote: bool) -> _Running:
        r = _start(ps, by_id, ws, run_id, reporter, timeline, backend, remote=remote)
        # recorded as running at once: a process that dies now leaves a row `runner runs` marks killed
        r.exec_id = ws.record_execution(_record(run_id, ps, graph, "running", r.started, 0.0, {}, None,
                                                str(r.log_path), options))
        return r

    def finish(r: _Running, outcome: tuple) -> None:
        nonlocal status, stop
        res = _finish(r, outcome, graph, ws, run_id, reporter, options)
        results.append(res)
        done[res.stage_id] = res.status
        timeline.append(_timeline_entry(r.ps, res.status, res.duration, time.time() - res.duration, res.error))
        if res.status == "failed":
            status = "failed"
            if not options.keep_going:
                stop = True

    try:
        if remote_backend is not None:
            pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="remote-stage")
        pending = list(plan.stages)
        while pending or running:
            progressed = False
            for ps in list(pending):
                node = ps.node
                ups = [u for u in node.upstream_ids() if u in by_id]
                blocked = [u for u in ups if done.get(u) in ("failed", "skipped")]
                if stop or blocked:
                    why = f"upstream {blocked[0]} failed" if blocked else "not run: an earlier stage failed"
                    results.append(StageResult(ps.id, node.kind, ps.action, "skipped", error=why))
                    done[ps.id] = "skipped"
                    timeline.append(_timeline_entry(ps, "skipped", 0.0, time.time(), why))
                    ws.record_execution(_record(run_id, ps, graph, "skipped", time.time(), 0.0, {}, why, None, options))
                    pending.remove(ps)
                    progressed = True
                    continue
                if any(u not in done for u in ups):
                    continue  # waits for a running upstream
                if not ps.will_execute:
                    results.append(StageResult(ps.id, node.kind, ps.action, "cached"))
                    done[ps.id] = "cached"
                    timeline.append(_timeline_entry(ps, "cached", 0.0, time.time(), "; ".join(ps.reasons)))
                    ws.record_execution(_record(run_id, ps, graph, "cached", time.time(), 0.0, {}, None, None, options))
                    pending.remove(ps)
                    progressed = True
                    continue
                if ps.id in remote_ids and pool is not None and remote_backend is not None:
                    if len(running) >= max_parallel:
                        continue
                    r = begin(ps, remote_backend, True)
                    running[pool.submit(_body, r)] = r
                    pending.remove(ps)
                    progressed = True
                    continue
                r = begin(ps, local_backend, False)
                pending.remove(ps)
                try:
                    outcome = _body(r, in_main_thread=True)
                except KeyboardInterrupt:
                    _interrupted(r, graph, ws, run_id, reporter, options)
                    raise
                finish(r, outcome)
                progressed = True
                break  # re-scan from the start: a finished stage may unblock earlier-listed ones
            if progressed:
                continue
            if running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    r = running.pop(fut)
                    finish(r, fut.result())
                continue
            for ps in pending:  # cannot happen with a valid graph; never drop a stage silently
                why = "not scheduled: its upstream stages never finished"
                results.append(StageResult(ps.id, ps.node.kind, ps.action, "skipped", error=why))
                ws.record_execution(_record(run_id, ps, graph, "skipped", time.time(), 0.0, {}, why, None, options))
            break
    except KeyboardInterrupt:
        interrupted = True
        status = "interrupted"
        if remote_backend is not None:
            remote_backend.cancel_all()
        for fut, r in list(running.items()):
            _interrupted(r, graph, ws, run_id, reporter, options)
        running.clear()
    except BaseException:  # a bug or a database error: the run ended, say so rather than "running"
        heartbeat.stop()
        ws.finish_run(run_id, "failed", {"counts": plan.counts(), "stages": len(plan.stages),
                                         "error": "the runner stopped on an internal error"})
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=not interrupted, cancel_futures=True)
        if session is not None:
            try:
                session.__exit__(None, None, None)
            except Exception:  # leaving the Modal app can fail on a lost connection; results are in
                pass
    reports = _publish_reports(plan, ws, graph, run_id, results)
    _track_reports(ws, run_id, reports, results, reporter)
    _publish_outputs(plan, ws, results, reporter)
    heartbeat.stop()
    ws.finish_run(run_id, status, {"counts": plan.counts(), "stages": len(plan.stages)})
    if interrupted:
        raise KeyboardInterrupt
    return ApplyResult(run_id=run_id, plan=plan, results=results, reports=reports, status=status)


def _local_backend():
    from runner.backends import local

    return local.LocalBackend()


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


def _inputs_for(ps: PlannedStage, by_id: dict[str, PlannedStage], ws: Workspace) -> dict[str, contract.Artifact]:
    inputs: dict[str, contract.Artifact] = {}
    node_keys = {sid: p.key for sid, p in by_id.items()}
    for name, ref in ps.node.inputs.items():
        if isinstance(ref, contract.StageOutputRef):
            key = node_keys[ref.stage_id]
            outs = ws.load_outputs(key)
            if ref.output not in outs:
                raise contract.StageError(f"{ref.stage_id} has no output {ref.output!r}")
            inputs[name] = outs[ref.output]
        else:
            fd = ps.fileset_digests[name]
            root = Path(ref.root)
            files = tuple((root / rel) if root.is_dir() else root for rel, _ in fd.files)
            inputs[name] = contract.Artifact(name=name, path=root, digest=fd.digest, files=files,
                                         meta={"spec_key": ref.spec_key})
    return inputs


def _safe_name(stage_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stage_id)


@dataclass
class _Running:
    ps: PlannedStage
    ctx: LocalStageContext
    tmp: Path
    log_path: Path
    started: float
    t0: float
    by_id: dict[str, PlannedStage]
    ws: Workspace
    backend: Any
    remote: bool
    exec_id: int = 0  # its row in the executions table (status running until it ends)


def _start(ps: PlannedStage, by_id: dict[str, PlannedStage], ws: Workspace, run_id: str,
           reporter: Any, timeline: list[dict], backend: Any, *, remote: bool) -> _Running:
    """Open a stage execution (main thread): tmp output folder, context, first log line."""
    node = ps.node
    reporter.stage_started(ps.id, ps.action, "; ".join(ps.reasons))
    log_path = ws.logs_dir / run_id / f"{_safe_name(ps.id)}.jsonl"
    tmp = ws.new_tmp_dir(ps.key)
    # A remote stage keeps its resumable state on the volume, not in the local scratch folder.
    scratch = tmp.with_name(tmp.name + ".scratch") if remote else ws.scratch_dir(ps.key)
    ctx = LocalStageContext(
        stage_id=ps.id,
        character=node.character,
        out_dir=tmp,
        scratch_dir=scratch,
        cache_dir=cache_root(),
        project_root=ws.project_root,
        run_id=run_id,
        log_file=log_path,
        reporter=reporter,
        extra={"timeline": list(timeline), "run_id": run_id, "workspace": ws, "key": ps.key,
               "plan": [s.as_json() for s in by_id.values() if s.node.character == node.character]},
    )
    ctx._write({"event": "start", "action": ps.action, "reasons": ps.reasons, "key": ps.key,
                "config": node.config, "host": socket.gethostname(), "pid": os.getpid(),
                "backend": "modal" if remote else "local"})
    return _Running(ps, ctx, tmp, log_path, time.time(), time.monotonic(), by_id, ws, backend, remote)


def _body(r: _Running, in_main_thread: bool = False) -> tuple:
    """Run the stage body; returns ("ok", outputs) or ("error", exc, traceback). Safe in a worker
    thread (no database access)."""
    kind = stage_registry().get(r.ps.node.kind)
    try:
        inputs = _inputs_for(r.ps, r.by_id, r.ws)
        outputs = r.backend.run_stage(kind, r.ps.node, inputs, r.ctx)
        return ("ok", outputs)
    except KeyboardInterrupt:
        if in_main_thread:
            raise
        return ("error", RuntimeError("interrupted"), "")
    except BaseException as exc:  # noqa: BLE001  (reported as the stage's failure)
        return ("error", exc, traceback.format_exc())


def _interrupted(r: _Running, graph: Graph, ws: Workspace, run_id: str, reporter: Any,
                 options: ApplyOptions) -> None:
    shutil.rmtree(r.tmp, ignore_errors=True)
    duration = time.monotonic() - r.t0
    r.ctx._write({"event": "interrupted"})
    ws.update_execution(r.exec_id, _record(run_id, r.ps, graph, "interrupted", r.started, duration, r.ctx.metrics,
                                "interrupted", str(r.log_path), options, remote=r.ctx.extra.get("remote")))
    reporter.stage_finished(r.ps.id, "interrupted", duration)


def _finish(r: _Running, outcome: tuple, graph: Graph, ws: Workspace, run_id: str, reporter: Any,
            options: ApplyOptions) -> StageResult:
    """Promote or discard a stage's outputs and record it (main thread only)."""
    ps, ctx, tmp = r.ps, r.ctx, r.tmp
    error: str | None = None
    status = "succeeded"
    try:
        if outcome[0] == "ok":
            manifest = _manifest(ps, outcome[1], tmp, run_id, ctx)
            ws.promote(tmp, ps.key, manifest)
            ws.set_current(ps.id, ps.key, ps.components, run_id, ps.fileset_digests)
            # A finished stage no longer needs its resumable state.
            shutil.rmtree(ctx.scratch_dir, ignore_errors=True)
        else:
            raise outcome[1]
    except KeyboardInterrupt:
        raise
    except contract.StageError as exc:
        status = "failed"
        error = str(exc) + (f" (hint: {exc.hint})" if exc.hint else "")
        ctx._write({"event": "error", "error": error})
    except BaseException as exc:  # a bug or an unexpected library error: keep the traceback in the log
        status = "failed"
        error = f"{type(exc).__name__}: {exc}"
        tb = outcome[2] if outcome[0] == "error" and len(outcome) > 2 else traceback.format_exc()
        ctx._write({"event": "error", "error": error, "traceback": tb})
    if status == "failed":
        shutil.rmtree(tmp, ignore_errors=True)
        if r.remote:
            shutil.rmtree(ctx.scratch_dir, ignore_errors=True)
    duration = time.monotonic() - r.t0
    remote = ctx.extra.get("remote")
    if remote is not None:
        ctx.metrics.update(remote.as_metrics())
    ctx._write({"event": "end", "status": status, "duration": duration, "metrics": ctx.metrics,
                **({"remote_call_id": remote.call_id} if remote is not None else {})})
    ws.update_execution(r.exec_id, _record(run_id, ps, graph, status, r.started, duration, ctx.metrics, error,
                                           str(r.log_path), options, remote=remote))
    if status == "succeeded":
        _track(r, ws, run_id, reporter)
    note = error if error else (f"{len(ctx.warnings)} warning(s)" if ctx.warnings else "")
    if remote is not None and not error:
        note = (note + "; " if note else "") + f"modal call {remote.call_id}"
    reporter.stage_finished(ps.id, status, duration, note)
    return StageResult(ps.id, ps.node.kind, ps.action, status, duration, error, str(r.log_path))


def _track(r: _Running, ws: Workspace, run_id: str, reporter: Any) -> None:
    """A succeeded stage's ``track`` hook (experiment trackers), recorded in executions.tracking;
    a tracker's failure is a warning, never the stage's failure."""
    kind = stage_registry().get(r.ps.node.kind)
    if kind.track is None or not r.ps.node.config.get("tracking"):
        return
    env = {"stage_id": r.ps.id, "character": r.ps.node.character, "run_id": run_id, "key": r.ps.key,
           "project_root": str(ws.project_root), "workspace_dir": str(ws.dir)}
    try:
        runs = kind.track(r.ps.node.config, ws.load_outputs(r.ps.key), env)
    except Exception as exc:  # noqa: BLE001  (a bug in a hook must not cost the stage)
        runs = [{"backend": "tracking", "run_id": "", "warning": f"tracking failed: {type(exc).__name__}: {exc}"}]
    ws.set_tracking(r.exec_id, runs)
    for run in runs:
        if run.get("warning"):
            r.ctx.warn(f"tracking: {run['warning']} (the stage's outputs are kept)")
        else:
            r.ctx.log(f"tracked as {run['backend']} run {run['run_id']}", tracking=run)
            reporter.log(r.ps.id, "info", f"{run['backend']} run {run['run_id']}" + (f": {run['url']}" if run.get("url") else ""))


def _track_reports(ws: Workspace, run_id: str, reports: dict[str, Path], results: list[StageResult],
                   reporter: Any) -> None:
    """Add each character's new report to the tracker runs of this apply (artifacts)."""
    fresh = {r.stage_id.split(":", 1)[0] for r in results if r.kind == "report" and r.status == "succeeded"}
    if not fresh:
        return
    from runner import tracking

    for e in ws.executions(run_id):
        report = reports.get(e["character"])
        if not e["tracking"] or e["character"] not in fresh or report is None:
            continue
        for warning in tracking.attach(e["tracking"], [(report, "report")], ws.dir):
            reporter.log(e["stage_id"], "warning", f"tracking: {warning}")


def _manifest(ps: PlannedStage, outputs: dict[str, contract.Artifact], tmp: Path, run_id: str,
              ctx: LocalStageContext) -> dict[str, Any]:
    if not isinstance(outputs, dict):
        raise contract.StageError(f"stage {ps.id} returned {type(outputs).__name__}, not a dict of artifacts")
    missing = [o for o in ps.node.outputs if o not in outputs]
    if missing:
        raise contract.StageError(f"stage {ps.id} did not produce its outputs: {', '.join(missing)}")
    rel: dict[str, str] = {}
    meta: dict[str, Any] = {}
    tmp_r = tmp.resolve()
    for name, art in outputs.items():
        p = Path(art.path).resolve()
        try:
            rel[name] = p.relative_to(tmp_r).as_posix() or "."
        except ValueError:
            raise contract.StageError(f"stage {ps.id} output {name!r} is outside its output folder: {p}") from None
        if not p.exists():
            raise contract.StageError(f"stage {ps.id} output {name!r} does not exist: {p}")
        meta[name] = contract.jsonable(art.meta)
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
            options: ApplyOptions, remote: Any = None) -> ExecutionRecord:
    hardware = graph.specs[ps.node.character].data.get("hardware", {})
    backend = "modal" if is_remote(ps.node, graph, options) else "local"
    gpu = cost_mod.stage_gpu(ps.node, hardware, backend)
    call_id = None
    billed = duration
    if remote is not None:
        call_id = remote.call_id or None
        # Modal bills the container time of every attempt, which the worker measures on the
        # volume; a call that never answered is charged its wall time (an upper bound).
        billed = remote.billed_s if (remote.billed_s or remote.reused_result) else duration
    price = cost_mod.stage_cost(billed, gpu, hardware) if status in ("succeeded", "failed") else (0.0, hardware.get("currency", "USD"))
    return ExecutionRecord(
        run_id=run_id, stage_id=ps.id, kind=ps.node.kind, character=ps.node.character, key=ps.key,
        action=ps.action, reason="; ".join(ps.reasons), status=status, started=started,
        duration=duration, metrics=metrics, cost=price[0], currency=price[1], gpu=gpu,
        backend=backend, remote_call_id=call_id, error=error, log_path=log_path,
    )


def report_folder(spec: Spec) -> Path:
    """``<report.output_dir>/<character>`` (output_dir is resolved relative to the spec file). A
    symlink that takes it outside the project is refused before anything runs (exit 2)."""
    folder = spec.abspath(spec.data["report"]["output_dir"]) / spec.name
    if not spec.allow_outside and not inside(folder, spec.project_root):
        raise ApplyError(f"{spec.file}: report.output_dir: the report folder {folder} resolves to "
                         f"{os.path.realpath(folder)}, outside the project folder {spec.project_root}; "
                         "remove the symlink, or pass --allow-outside-project if this is intended")
    return folder


def _publish_reports(plan: Plan, ws: Workspace, graph: Graph, run_id: str,
                     results: list[StageResult]) -> dict[str, Path]:
    """Copy each character's report into <project>/<report.output_dir>/<character>/."""
    out: dict[str, Path] = {}
    status = {r.stage_id: r.status for r in results}
    for ps in plan.stages:
        if ps.node.kind != "report" or status.get(ps.id) not in ("succeeded", "cached"):
            continue
        folder = report_folder(graph.specs[ps.node.character])
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


def _publish_outputs(plan: Plan, ws: Workspace, results: list[StageResult], reporter: Any) -> None:
    """Stages with a ``publish`` hook copy their outputs to <project>/.runner/exports/<character>/."""
    status = {r.stage_id: r.status for r in results}
    for ps in plan.stages:
        kind = stage_registry().get(ps.node.kind)
        if kind.publish is None or status.get(ps.id) not in ("succeeded", "cached") or not ws.store_has(ps.key):
            continue
        try:
            kind.publish(ps.node.config, ws.load_outputs(ps.key), ws.dir / "exports" / ps.node.character)
        except OSError as exc:
            reporter.log(ps.id, "warning", f"could not publish to {ws.dir / 'exports' / ps.node.character}: {exc}")


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def rerender_reports(specs: list[Spec], reporter: PlainReporter | None = None) -> ApplyResult:
    """`runner report`: re-run only the report stages, against what the store holds now."""
    return apply(specs, ApplyOptions(force=["report"], only=["report"], command="runner report"),
                 reporter or make_reporter())
