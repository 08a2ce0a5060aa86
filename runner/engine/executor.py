"""Execute a plan: dependency order, cached outputs restored, atomic promotion, state recorded.

The pieces, each in its own module:

- :mod:`runner.engine.schedule`: which stage acts next (pure bookkeeping);
- :mod:`runner.engine.run_one`: one stage execution (open, run the body, promote or discard);
- :mod:`runner.engine.record`: the state database rows, results and timeline of a run;
- :mod:`runner.engine.fanout`: remote stages in a thread pool;
- :mod:`runner.engine.publish`: reports, exports and tracker runs after the stages.

This module ties them together under the workspace lock (:func:`apply`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.engine import cost as cost_mod
from runner.engine.budget import batch_budget, check_budget
from runner.engine.fanout import RemoteFanout
from runner.engine.lock import workspace_lock
from runner.engine.progress import PlainReporter, make_reporter
from runner.engine.publish import publish_outputs, publish_reports, report_folder, track_reports, track_stage
from runner.engine.record import Ended, Recorder, StageResult
from runner.engine.request import ApplyError, ApplyOptions, backend_of, check_stage_backends, is_remote
from runner.engine.run_one import Outcome, Running, StageEnv, discard, open_stage, run_body, settle
from runner.engine.schedule import Scheduler, Step
from runner.engine.workspace import Workspace
from runner.plan.graph import build_graph, builtin_registry
from runner.plan.planner import Plan, make_plan
from runner.spec.resolve import Spec

__all__ = ["ApplyError", "ApplyOptions", "ApplyResult", "StageResult", "apply", "backend_of", "is_remote",
           "plan_estimates", "plan_specs", "project_root_of", "report_folder", "rerender_reports"]


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


def _plan(specs: list[Spec], ws: Workspace, force: list[str] | None, only: list[str] | None,
          registry: contract.Registry | None) -> Plan:
    graph = build_graph(specs, registry)
    check_stage_backends(graph)
    try:
        plan = make_plan(graph, ws, ws, force=force, only=only)
    except KeyError as exc:
        raise ApplyError(str(exc.args[0]) if exc.args else str(exc)) from None
    ws.flush_digests()
    return plan


def plan_specs(specs: list[Spec], *, force: list[str] | None = None, only: list[str] | None = None,
               registry: contract.Registry | None = None) -> tuple[Plan, Workspace]:
    """The plan of ``specs`` with the kinds of ``registry`` (default: the built-in ones), and the
    workspace it was planned against (the caller closes it)."""
    ws = Workspace(project_root_of(specs))
    return _plan(specs, ws, force, only, registry), ws


def apply(specs: list[Spec], options: ApplyOptions | None = None, reporter: PlainReporter | None = None,
          on_plan: Any = None, registry: contract.Registry | None = None) -> ApplyResult:
    """Plan and execute ``specs`` under the workspace lock. ``on_plan(plan)`` is called with the
    plan before anything runs (the CLI prints it there); ``registry`` holds the stage kinds
    (default: the built-in ones)."""
    options = options or ApplyOptions()
    reporter = reporter or make_reporter()
    for spec in specs:
        report_folder(spec)  # refuse a report folder outside the project before anything runs
    ws = Workspace(project_root_of(specs))
    try:
        with workspace_lock(ws.dir, command=options.command, wait_s=options.wait_s):
            _settle_dead_runs(ws, reporter)
            ws.clear_tmp()
            plan = _plan(specs, ws, options.force, options.only, registry)
            # the estimates before this run's rows; a batch over its budget stops here
            estimates = plan_estimates(plan, options.backend, ws) if plan.has_changes else {}
            check_budget(plan, estimates, batch_budget(specs, options.max_cost, options.max_hours))
            remote_ids = _check_backend(options, plan)
            if on_plan is not None:
                on_plan(plan)
            return _execute(plan, ws, options, reporter, [str(s.file) for s in specs], remote_ids, estimates)
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


def _check_backend(options: ApplyOptions, plan: Plan) -> list[str]:
    """The remote stages this apply will execute; fails at once (no network, no hang) when they
    need Modal and no credentials are configured."""
    remote = [ps.id for ps in plan.stages if ps.will_execute and is_remote(ps.node, plan.graph, options)]
    if remote and options.remote is None:
        from runner.backends.modal_backend import ModalUnavailable, require_credentials

        try:
            require_credentials("hardware.backend: modal" if options.backend is None else "--backend modal")
        except ModalUnavailable as exc:
            raise ApplyError(f"{len(remote)} stage(s) to run on Modal ({', '.join(remote[:4])}"
                             f"{', ...' if len(remote) > 4 else ''}): {exc}") from None
    return remote


def plan_estimates(plan: Plan, backend: str | None = None, ws: Workspace | None = None) -> dict[str, cost_mod.Estimate]:
    """Estimated GPU, time and cost of every remote stage of ``plan``, and the time of every local
    stage (GPU or CPU) whose kind has run on this machine before (``runner plan`` shows them):
    learned from the latest earlier runs of its kind on its GPU (or CPU container, or this machine)
    in the state database (per clip, per step, ... where the kind declares ``work_units``); a
    remote stage with no history gets the price table and the typical duration its kind declares
    (each estimate says which). The summarizing report is not estimated."""
    out: dict[str, cost_mod.Estimate] = {}
    opts = ApplyOptions(backend=backend)
    db = ws.db if ws is not None and ws.exists() else None
    remote = [ps for ps in plan.stages if is_remote(ps.node, plan.graph, opts)]
    remote_ids = {ps.id for ps in remote}
    registry = plan.graph.registry
    local = [ps for ps in plan.stages if ps.id not in remote_ids and ps.node.kind in registry
             and not registry.get(ps.node.kind).summarizes]
    history = cost_mod.load_history(db, {ps.node.kind for ps in remote})  # a few index seeks per kind
    history_here = cost_mod.load_history(db, {ps.node.kind for ps in local}, backend="local")
    for backend, stages, hist in (("modal", remote, history), ("local", local, history_here)):
        for ps in stages:
            hardware = plan.graph.specs[ps.node.character].data.get("hardware", {})
            kind = registry.get(ps.node.kind)
            est = cost_mod.estimate_stage(ps.node, hardware, backend, db, kind.typical_seconds, history=hist,
                                          work=cost_mod.work_of(kind, ps.node))
            if est is not None:
                out[ps.id] = est
    return out


def rerender_reports(specs: list[Spec], reporter: PlainReporter | None = None,
                     registry: contract.Registry | None = None) -> ApplyResult:
    """`runner report`: re-run only the summarizing stages (the report), against what the store
    holds now."""
    return apply(specs, summary_options(builtin_registry(registry)), reporter or make_reporter(),
                 registry=registry)


def summary_options(registry: contract.Registry) -> ApplyOptions:
    """Options that force and select exactly the kinds that summarize a run."""
    kinds = [k.kind for k in registry if k.summarizes]
    if not kinds:
        raise ApplyError("no stage kind summarizes a run (none is registered with summarizes=True)")
    return ApplyOptions(force=kinds, only=kinds, command="runner report")


def _execute(plan: Plan, ws: Workspace, options: ApplyOptions, reporter: Any, spec_files: list[str],
             remote_ids: list[str], estimates: dict[str, cost_mod.Estimate]) -> ApplyResult:
    """Run the plan in dependency order. Local stages run one at a time in this thread; remote
    stages fan out (:mod:`runner.engine.fanout`). Only this thread touches the state database and
    the store."""
    fanout = RemoteFanout.start(plan.graph, ws, options, remote_ids, reporter) if remote_ids else None
    run_id = ws.start_run(options.command, spec_files)
    heartbeat = ws.heartbeat(run_id)
    run = _Run(plan, options, StageEnv(ws, run_id, plan, fanout.reporter if fanout else reporter), fanout, remote_ids,
               estimates)
    interrupted = False
    try:
        run.loop()
        run.rec.flush()
    except KeyboardInterrupt:
        interrupted = True
        run.interrupt()
        run.rec.flush()
    except BaseException:  # a bug or a database error: the run ended, say so rather than "running"
        heartbeat.stop()
        ws.finish_run(run_id, "failed", {"counts": plan.counts(), "stages": len(plan.stages),
                                         "error": "the runner stopped on an internal error"})
        raise
    finally:
        if fanout is not None:
            fanout.close(interrupted)
    results = run.rec.results
    reports = publish_reports(plan, ws, run_id, results)
    track_reports(plan, ws, run_id, reports, results, reporter)
    publish_outputs(plan, ws, results, reporter)
    heartbeat.stop()
    ws.finish_run(run_id, run.status, {"counts": plan.counts(), "stages": len(plan.stages)})
    if interrupted:
        raise KeyboardInterrupt
    return ApplyResult(run_id=run_id, plan=plan, results=results, reports=reports, status=run.status)


class _Run:
    """The loop of one run: ask the scheduler for the next step, carry it out, record it."""

    def __init__(self, plan: Plan, options: ApplyOptions, env: StageEnv, fanout: RemoteFanout | None,
                 remote_ids: list[str], estimates: dict[str, Any] | None = None) -> None:
        self.options, self.env, self.fanout = options, env, fanout
        self.rec = Recorder(env.ws, env.run_id, plan.graph, lambda n: is_remote(n, plan.graph, options), estimates)
        self.sched = Scheduler(plan.stages, remote_ids if fanout is not None else ())
        self.status = "succeeded" if plan.has_changes else "no-op"
        self.stop = False  # a stage failed and the run does not keep going
        from runner.backends.local import LocalBackend

        self.local = LocalBackend()

    def loop(self) -> None:
        while True:
            step = self.sched.next(stop=self.stop, remote_slot=self.fanout is not None and self.fanout.has_slot)
            if step is not None:
                self.take(step)
            elif self.fanout is not None and self.fanout.running:
                for r, outcome in self.fanout.wait():
                    self.finish(r, outcome)
            else:
                for ps in self.sched.stranded():
                    self.rec.skipped(ps, "not scheduled: its upstream stages never finished")
                return

    def take(self, step: Step) -> None:
        if step.how == "skip":
            self.rec.skipped(step.ps, step.why)
        elif step.how == "cached":
            self.rec.cached(step.ps)
        elif step.how == "remote":
            assert self.fanout is not None
            self.fanout.submit(self.begin(step, self.fanout.backend))
        else:
            r = self.begin(step, self.local)
            try:
                outcome = run_body(r, in_main_thread=True)
            except KeyboardInterrupt:
                self.interrupted(r)
                raise
            self.finish(r, outcome)

    def begin(self, step: Step, backend: Any) -> Running:
        r = open_stage(self.env, step.ps, backend, remote=step.how == "remote", timeline=self.rec.timeline)
        r.exec_id = self.rec.insert(r.ps, Ended("running", r.started, log_path=str(r.log_path)))
        return r

    def finish(self, r: Running, outcome: Outcome) -> None:
        """Promote or discard, record, track, report (main thread)."""
        error = settle(r, outcome)
        status = "failed" if error is not None else "succeeded"
        duration, ctx = r.duration(), r.ctx
        remote = ctx.extra.get("remote")
        if remote is not None:
            ctx.metrics.update(remote.as_metrics())
        ctx._write({"event": "end", "status": status, "duration": duration, "metrics": ctx.metrics,
                    **({"remote_call_id": remote.call_id} if remote is not None else {})})
        self.rec.update(r.exec_id, r.ps, Ended(status, r.started, duration, ctx.metrics, error,
                                               str(r.log_path), remote))
        if error is None:
            track_stage(r)
        self.env.reporter.stage_finished(r.ps.id, status, duration, _note(r, error))
        self.sched.finished(r.ps.id, status)
        self.rec.result(r.ps, status, duration=duration, error=error, log_path=str(r.log_path))
        if error is not None:
            self.status = "failed"
            self.stop = self.stop or not self.options.keep_going

    def interrupted(self, r: Running) -> None:
        discard(r)
        duration = r.duration()
        self.rec.update(r.exec_id, r.ps, Ended("interrupted", r.started, duration, r.ctx.metrics,
                                               "interrupted", str(r.log_path), r.ctx.extra.get("remote")))
        self.env.reporter.stage_finished(r.ps.id, "interrupted", duration)

    def interrupt(self) -> None:
        """Ctrl-C: cancel the remote calls in flight and record their stages as interrupted."""
        self.status = "interrupted"
        if self.fanout is not None:
            for r in self.fanout.cancel():
                self.interrupted(r)


def _note(r: Running, error: str | None) -> str:
    """The line after a finished stage: its error, or its warnings and remote call."""
    ctx = r.ctx
    note = error if error else (f"{len(ctx.warnings)} warning(s)" if ctx.warnings else "")
    remote = ctx.extra.get("remote")
    if remote is not None and not error:
        note = (note + "; " if note else "") + f"modal call {remote.call_id}"
    return note
