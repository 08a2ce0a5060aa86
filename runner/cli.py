"""The `runner` command. Thin: parse arguments, call the library, print.

Every command is a library call that a test can make without a terminal; errors the user can fix
(every :class:`runner.core.errors.UserError`) print their message and hint and exit with the
error's ``exit_code``, never a traceback:
  exit 0  success (plan --detailed-exitcode: no changes)
  exit 1  a stage failed, or another expected failure (storage unreachable, a model not cached)
  exit 2  bad spec or request (plan --detailed-exitcode: changes present)
  exit 3  the workspace is locked by another runner
  exit 4  runner publish: the tag is already published with other content
  exit 130 interrupted
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.core.errors import UserError
from runner.engine.watch import DEFAULT_INTERVAL_S, DEFAULT_SETTLE_S


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


class BadRequest(UserError):
    """A command line that cannot be carried out as given (two specs where one is needed, no
    destination): exit 2."""

    exit_code = 2


class _Commands(click.Group):
    """The command group: an expected failure (any :class:`UserError`) prints its message and
    hint and exits with its ``exit_code``; here rather than in :func:`main`, so every way of
    calling a command (``main``, click's test runner) reports it the same."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _echo_err(exc.render())
            sys.exit(exc.exit_code)


spec_args = click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=str))


def budget_opts(fn: Any) -> Any:
    """--max-cost / --max-hours: the batch's budget, over hardware.budget of every spec."""
    fn = click.option("--max-hours", type=click.FloatRange(min=0), default=None, metavar="HOURS",
                      help="Refuse when the stages that would run are estimated at more stage hours "
                           "(overrides hardware.budget.max_hours).")(fn)
    return click.option("--max-cost", type=click.FloatRange(min=0), default=None, metavar="AMOUNT",
                        help="Refuse, before anything runs, when the stages that would run are estimated to cost "
                             "more on Modal (hardware.currency; overrides hardware.budget.max_cost).")(fn)
allow_outside_opt = click.option(
    "--allow-outside-project", is_flag=True,
    help="Allow spec paths that resolve outside the project folder.",
)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="character-runner")
def cli() -> None:
    """character-runner: one declarative spec per character, one command to build it.

    \b
    runner init NAME            write a commented starter spec
    runner validate SPEC...     check specs against the schema
    runner plan SPEC...         show what would run, and why
    runner apply SPEC...        run what changed, write the HTML report
    runner watch SPEC...        apply again whenever the specs or their files change
    runner status / runs        what the workspace holds
    runner publish SPEC --to URL  upload a released version (LoRA, report, manifest)
    """


# ----------------------------------------------------------------------------- validate


@cli.command()
@spec_args
@allow_outside_opt
@click.option("--require-files/--no-require-files", default=False, show_default=True,
              help="Also require that every data path in the spec exists.")
def validate(specs: tuple[str, ...], allow_outside_project: bool, require_files: bool) -> None:
    """Check spec files against the schema; report every problem at once."""
    from runner.spec import load_specs

    loaded = load_specs(list(specs), allow_outside=allow_outside_project, require_files=require_files)
    for s in loaded:
        click.echo(f"{s.file}: ok ({s.name})")


# ----------------------------------------------------------------------------- plan


def _plan_line(ps: Any, estimate: Any = None) -> str:
    sym = {"run": "+", "rerun": "~", "resume": ">", "cached": "="}[ps.action]
    extra = ""
    if estimate is not None:  # its GPU (on Modal or here) and what a run would take / cost
        here = "gpu stage, local" if ps.node.gpu else "local"
        where = here if estimate.backend == "local" else f"{estimate.backend} {estimate.gpu}"
        extra = f"  [{where}, {estimate.short()}: {estimate.note}]"
    elif ps.node.gpu:  # runs here; the GPU type only applies on a remote backend
        extra = "  [gpu stage, local]"
    return f"  {sym} {ps.id:<38} {ps.action:<7} {'; '.join(ps.reasons)}{extra}"


def _print_plan(plan: Any, specs: list[Any], *, header: bool = True, estimates: dict | None = None,
                budget: Any = None) -> None:
    estimates = estimates or {}
    if header:
        root = specs[0].project_root if specs else Path.cwd()
        names = ", ".join(str(_rel(s.file)) for s in specs)
        click.echo(f"Plan for {names} (project {root})")
    for ps in _listed_stages(plan):
        if isinstance(ps, str):
            click.echo(ps)
            continue
        click.echo(_plan_line(ps, estimates.get(ps.id) if ps.will_execute else None))
        for note in ps.notes:  # a variant's effective differences, phases in steps and epochs
            click.echo(f"      {note}")
    click.echo(plan.summary())
    _warn_uncached_models(plan)
    todo = [estimates[ps.id] for ps in plan.stages if ps.id in estimates and ps.will_execute
            and getattr(estimates[ps.id], "backend", "modal") == "modal"]
    if todo:
        cur = todo[0].currency
        click.echo(f"Estimated Modal cost of this plan: ~{sum(e.cost for e in todo):.2f} {cur} "
                   f"({len(todo)} remote stage{'s' if len(todo) != 1 else ''}; price table in hardware.price_table)")
    _print_batch(plan, estimates, budget)


#: Cached stages of one kind that `runner plan` lists one by one; a ride day's thousands more are
#: counted in one line (`--json` lists every stage).
LISTED_CACHED = 12
SHOWN_OF_MANY = 3


def _listed_stages(plan: Any) -> list[Any]:
    """The plan's stages as printed: every stage that would execute, and the cached ones of a
    character's kind one by one up to LISTED_CACHED; beyond that the first SHOWN_OF_MANY and, in
    place of the rest, a line counting them."""
    cached: dict[tuple[str, str], int] = {}
    for ps in plan.stages:
        if ps.action == "cached":
            cached[(ps.node.character, ps.node.kind)] = cached.get((ps.node.character, ps.node.kind), 0) + 1
    out: list[Any] = []
    seen: dict[tuple[str, str], int] = {}
    for ps in plan.stages:
        group = (ps.node.character, ps.node.kind)
        if ps.action != "cached" or cached[group] <= LISTED_CACHED:
            out.append(ps)
            continue
        seen[group] = seen.get(group, 0) + 1
        if seen[group] <= SHOWN_OF_MANY:
            out.append(ps)
        elif seen[group] == SHOWN_OF_MANY + 1:
            rest = cached[group] - SHOWN_OF_MANY
            out.append(f"  = ... and {rest} more cached {ps.node.kind} stages of {ps.node.character} "
                       "(`runner plan --json` lists every stage)")
    return out


def _print_batch(plan: Any, estimates: dict, budget: Any) -> None:
    """The whole batch's stage hours, wall time at best and budget (runner.engine.budget)."""
    from runner.engine.budget import Budget, batch_cost, plan_line
    from runner.engine.executor import ApplyOptions
    from runner.engine.fanout import max_parallel

    batch, budget = batch_cost(plan, estimates), budget or Budget()
    if batch.stages or budget.is_set:
        click.echo(plan_line(batch, budget, max_parallel(plan.graph, ApplyOptions())))


def _warn_uncached_models(plan: Any) -> None:
    from runner.plan.preflight import uncached_models

    for m in uncached_models(plan):
        _echo_err(f"warning: {m.message()}")


def _estimates(p: Any, backend: str | None) -> dict:
    from runner.engine.executor import plan_estimates
    from runner.engine.workspace import Workspace

    ws = Workspace(next(iter(p.graph.specs.values())).project_root)
    try:
        return plan_estimates(p, backend, ws)
    finally:
        ws.close()


def _rel(p: Path) -> Path:
    try:
        return p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return p


@cli.command()
@spec_args
@click.option("--resolved", is_flag=True, help="Print the fully resolved spec(s) (presets and defaults applied).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (stage, kind, action, reason).")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 when nothing would run, 2 when something would.")
@click.option("--force", multiple=True, metavar="STAGE", help="Plan STAGE (id, kind or glob) as re-running.")
@click.option("--only", multiple=True, metavar="STAGE", help="Plan only STAGE and what it needs.")
@click.option("--backend", type=click.Choice(["local", "modal"]), default=None,
              help="Override hardware.backend (modal: show GPU types and estimated costs).")
@click.option("--scenes", is_flag=True,
              help="Also print each storyboard's scenes and frame prompts (manual and rules planners; no GPU).")
@budget_opts
@allow_outside_opt
def plan(specs: tuple[str, ...], resolved: bool, as_json: bool, detailed_exitcode: bool,
         force: tuple[str, ...], only: tuple[str, ...], backend: str | None, scenes: bool,
         max_cost: float | None, max_hours: float | None, allow_outside_project: bool) -> None:
    """Show, per stage, whether it runs, is cached, or re-runs, and why."""
    from runner.engine.executor import plan_specs
    from runner.spec import load_specs
    from runner.stages import registry

    loaded = load_specs(list(specs), allow_outside=allow_outside_project)
    if resolved:
        import yaml

        from runner.spec.variants import resolved_variants_comment

        for s in loaded:
            click.echo(f"# {s.file} (resolved)")
            click.echo(yaml.safe_dump(s.data, sort_keys=False, allow_unicode=True, width=100))
            click.echo(resolved_variants_comment(s.data.get("train")), nl=False)
        return
    p, ws = plan_specs(loaded, force=list(force), only=list(only), registry=registry())
    try:
        from runner.engine.budget import batch_budget, batch_cost, check_budget
        from runner.engine.executor import plan_estimates

        estimates = plan_estimates(p, backend, ws)
        budget = batch_budget(loaded, max_cost, max_hours)
        if as_json:
            from runner.plan.preflight import uncached_models

            data = p.as_json()
            data["uncached_models"] = [m.as_json() for m in uncached_models(p)]
            for st in data["stages"]:
                if st["stage"] in estimates:
                    est = estimates[st["stage"]].as_json()
                    st["remote" if est["backend"] == "modal" else "estimate"] = est
            data["review_orphans"] = _review_orphans(p, ws, loaded)
            data["batch"] = {**batch_cost(p, estimates).as_json(), "max_cost": budget.max_cost,
                             "max_hours": budget.max_hours}
            click.echo(json.dumps(data, indent=2))
        else:
            _print_plan(p, loaded, estimates=estimates, budget=budget)
            _print_review_orphans(p, ws, loaded)
            if scenes:
                _print_scenes(loaded)
    finally:
        ws.close()
    check_budget(p, estimates, budget)  # over budget: the refusal `runner apply` would give (exit 2)
    if detailed_exitcode and p.has_changes:
        sys.exit(2)


def _review_orphans(plan: Any, ws: Any, specs: list[Any]) -> list[dict[str, Any]]:
    """Decisions in <spec>.review.yaml whose image, frame or clip the workspace no longer has."""
    from runner.review.decisions import review_path

    out = []
    for s in specs:
        path = review_path(s.file)
        if not path.exists():
            continue
        from runner.review.state import ReviewState

        st = ReviewState(spec=s, review_file=path)
        st.use_plan(plan, ws)
        out += [{"review_file": str(_rel(path)), **o} for o in st.orphans()]
    return out


def _print_review_orphans(plan: Any, ws: Any, specs: list[Any]) -> None:
    orphans = _review_orphans(plan, ws, specs)
    for path in dict.fromkeys(o["review_file"] for o in orphans):
        mine = [o for o in orphans if o["review_file"] == path]
        click.echo(f"Review ({path}): {len(mine)} decision{'s' if len(mine) != 1 else ''} for "
                   "things no longer in the workspace (kept in the file):")
        for o in mine:
            click.echo(f"  {o['section']}: {o['what']} (sha256 {o['sha'][:12]}): {o['decision']}")


def _print_scenes(specs: list[Any]) -> None:
    from runner.generate.planner import format_scenes, plan_story

    for s in specs:
        if not isinstance(s.data.get("generate", {}).get("storyboard"), dict):
            continue
        story = plan_story(s.data, allow_llm=False)
        click.echo(f"\nStoryboard scenes for {s.name} ({story.planner} planner):")
        click.echo(format_scenes(story.scenes, story.notes))
        if story.planner == "llm":
            click.echo("  (not previewed: the LLM planner is asked at run time; `runner storyboard-preview --llm` "
                       "asks the endpoint now)")


# ----------------------------------------------------------------------------- apply


def apply_opts(fn: Any) -> Any:
    """The options of one apply, shared by `runner apply` and `runner watch`."""
    fn = allow_outside_opt(budget_opts(fn))
    fn = click.option("--quiet", "-q", is_flag=True, help="Only the plan summary, warnings and the result.")(fn)
    fn = click.option("--backend", type=click.Choice(["local", "modal"]), default=None,
                      help="Override hardware.backend for every spec.")(fn)
    fn = click.option("--wait", "wait_s", type=float, default=0.0, metavar="SECONDS",
                      help="Wait up to SECONDS for another runner's workspace lock.")(fn)
    fn = click.option("--keep-going", "-k", is_flag=True, help="After a failure, keep running independent stages.")(fn)
    return click.option("--only", multiple=True, metavar="STAGE", help="Run only STAGE and whatever it needs.")(fn)


def _apply_options(command: str, specs: tuple[str, ...], *, force: tuple[str, ...] = (), only: tuple[str, ...],
                   keep_going: bool, wait_s: float, backend: str | None, max_cost: float | None,
                   max_hours: float | None) -> Any:
    from runner.engine.executor import ApplyOptions

    return ApplyOptions(force=list(force), only=list(only), keep_going=keep_going, wait_s=wait_s, backend=backend,
                        command=f"{command} " + " ".join(specs), max_cost=max_cost, max_hours=max_hours)


def _apply_and_print(specs: tuple[str, ...], options: Any, *, quiet: bool, allow_outside: bool,
                     on_plan: Any = None) -> Any:
    """One apply as `runner apply` runs it (`runner watch` applies through this too): load the
    specs, print the plan (unless quiet; ``on_plan(plan)`` first), run, print the result; the
    ApplyResult."""
    from runner.engine.budget import batch_budget
    from runner.engine.executor import apply as do_apply
    from runner.engine.progress import make_reporter
    from runner.spec import load_specs
    from runner.stages import registry

    loaded = load_specs(list(specs), allow_outside=allow_outside)
    t0 = time.monotonic()

    def show(p: Any) -> None:
        if on_plan is not None:
            on_plan(p)
        if not quiet:
            _print_plan(p, loaded, estimates=_estimates(p, options.backend),
                        budget=batch_budget(loaded, options.max_cost, options.max_hours))
            sys.stdout.flush()

    result = do_apply(loaded, options, make_reporter(quiet=quiet), registry=registry(), on_plan=show)
    _print_result(result, time.monotonic() - t0)
    return result


def _print_result(result: Any, elapsed: float) -> None:
    """The summary line, the report of each character and each failed stage with its log."""
    counts: dict[str, int] = {}
    for r in result.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    if result.status == "no-op":
        click.echo(f"No changes: {counts.get('cached', 0)} stages up to date ({elapsed:.2f}s).")
    else:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        click.echo(f"Apply {'complete' if result.status == 'succeeded' else result.status}: {parts} "
                   f"in {elapsed:.1f}s (run {result.run_id}).")
    for char, path in result.reports.items():
        click.echo(f"Report for {char}: {_rel(path)}")
    for r in result.failed:
        _echo_err(f"error: {r.stage_id} failed: {r.error}")
        if r.log_path:
            _echo_err(f"  log: {_rel(Path(r.log_path))}")


@cli.command()
@spec_args
@click.option("--force", multiple=True, metavar="STAGE", help="Re-run STAGE (id, kind or glob) even if cached.")
@apply_opts
def apply(specs: tuple[str, ...], force: tuple[str, ...], only: tuple[str, ...], keep_going: bool,
          wait_s: float, backend: str | None, quiet: bool, max_cost: float | None, max_hours: float | None,
          allow_outside_project: bool) -> None:
    """Run the stages that changed and write the HTML report."""
    options = _apply_options("runner apply", specs, force=force, only=only, keep_going=keep_going, wait_s=wait_s,
                             backend=backend, max_cost=max_cost, max_hours=max_hours)
    if _apply_and_print(specs, options, quiet=quiet, allow_outside=allow_outside_project).failed:
        sys.exit(1)


# ----------------------------------------------------------------------------- watch


@cli.command()
@spec_args
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_INTERVAL_S,
              show_default=True, metavar="SECONDS", help="Look at the specs and the files they read every SECONDS.")
@click.option("--settle", type=click.FloatRange(min=0), default=DEFAULT_SETTLE_S, show_default=True,
              metavar="SECONDS", help="Apply once nothing has changed for SECONDS (a file still being copied "
                                      "keeps changing size).")
@click.option("--max-applies", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N applies, the first one included (scripts, tests).")
@apply_opts
def watch(specs: tuple[str, ...], interval: float, settle: float, max_applies: int | None, only: tuple[str, ...],
          keep_going: bool, wait_s: float, backend: str | None, quiet: bool, max_cost: float | None,
          max_hours: float | None, allow_outside_project: bool) -> None:
    """Apply now, then again whenever the specs or the files they read change and settle.

    \b
    Watched: the specs (a folder: every spec in it, new ones too), every source folder and file
    the plan reads, and the review files. A failed apply is reported and the watch goes on;
    Ctrl-C stops it (exit 0)."""
    from runner.engine.watch import Watch, WatchSettings

    options = _apply_options("runner watch", specs, only=only, keep_going=keep_going, wait_s=wait_s,
                             backend=backend, max_cost=max_cost, max_hours=max_hours)

    def apply_once(on_plan: Any) -> Any:
        return _apply_and_print(specs, options, quiet=quiet, allow_outside=allow_outside_project, on_plan=on_plan)

    Watch(list(specs), apply_once, WatchSettings(interval, settle, max_applies), echo=click.echo).run()


# ----------------------------------------------------------------------------- report


@cli.command()
@spec_args
@allow_outside_opt
def report(specs: tuple[str, ...], allow_outside_project: bool) -> None:
    """Re-render the HTML report from what the workspace holds."""
    from runner.engine.executor import plan_specs, rerender_reports
    from runner.spec import load_specs
    from runner.stages import registry

    loaded = load_specs(list(specs), allow_outside=allow_outside_project)
    p, ws = plan_specs(loaded, registry=registry())
    ws.close()
    stale = [s.id for s in p.pending_work()]
    if stale:
        raise BadRequest(
            f"{len(stale)} stage(s) are not up to date ({', '.join(stale[:5])}"
            f"{', ...' if len(stale) > 5 else ''}); run `runner apply` first"
        )
    result = rerender_reports(loaded, registry=registry())
    for char, path in result.reports.items():
        click.echo(f"Report for {char}: {_rel(path)}")
    if result.failed:
        for r in result.failed:
            _echo_err(f"error: {r.stage_id} failed: {r.error}")
        sys.exit(1)


# ----------------------------------------------------------------------------- status / runs


def _workspace_for(specs: tuple[str, ...], project: str | None):
    from runner.engine.workspace import Workspace
    from runner.spec.resolve import PROJECT_MARKERS

    if project:
        return Workspace(Path(project))
    if specs:
        from runner.spec import load_specs

        loaded = load_specs(list(specs), require_files=False)
        return Workspace(loaded[0].project_root)
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if any((folder / m).exists() for m in PROJECT_MARKERS):
            return Workspace(folder)
    return Workspace(cwd)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "—"


def _run_state(r: dict) -> str:
    """A run's status, with when its process was last seen where that matters."""
    if r["status"] == "killed":
        return f"killed (process died; last seen {_when(r.get('last_seen'))})"
    if r["status"] == "running":
        return f"running (pid {r.get('pid')} on {r.get('host')}; last seen {_when(r.get('last_seen'))})"
    return r["status"]


@cli.command()
@click.argument("specs", nargs=-1, type=click.Path(path_type=str))
@click.option("--project", type=click.Path(file_okay=False),
              help="Project folder (default: found from the current folder).")
def status(specs: tuple[str, ...], project: str | None) -> None:
    """Show the workspace: lock holder, last run, and (given specs) what is out of date."""
    from runner.engine.lock import lock_status

    ws = _workspace_for(specs, project)
    click.echo(f"project:   {ws.project_root}")
    click.echo(f"workspace: {ws.dir}{'' if ws.exists() else ' (empty: nothing applied yet)'}")
    info = lock_status(ws.dir)
    if info.held:
        h = info.holder
        click.echo(f"lock:      held by pid {h.get('pid')} on {h.get('host')} "
                   f"since {_when(h.get('since'))} ({h.get('command')})")
    else:
        click.echo("lock:      free")
    if ws.exists():
        ws.settle_dead_runs()
        runs = ws.runs(limit=1)
        if runs:
            r = runs[0]
            click.echo(f"last run:  {r['id']} {_run_state(r)}, started {_when(r['started'])}: {r['command']}")
    if specs:
        from runner.engine.executor import plan_specs
        from runner.spec import load_specs
        from runner.stages import registry

        loaded = load_specs(list(specs))
        p, ws2 = plan_specs(loaded, registry=registry())
        ws2.close()
        for ps in p.stages:
            state = "up to date" if not ps.will_execute else f"out of date ({'; '.join(ps.reasons)})"
            click.echo(f"  {ps.id:<38} {state}")
    ws.close()


@cli.command()
@click.argument("run_id", required=False)
@click.option("--limit", default=20, show_default=True, help="How many runs to list.")
@click.option("--project", type=click.Path(file_okay=False),
              help="Project folder (default: found from the current folder).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(run_id: str | None, limit: int, project: str | None, as_json: bool) -> None:
    """List recent runs, or the stage executions of RUN_ID."""
    ws = _workspace_for((), project)
    if not ws.exists():
        raise BadRequest(f"no workspace in {ws.project_root}: nothing has been applied here yet")
    try:
        ws.settle_dead_runs()
        if run_id:
            rows = ws.executions(run_id)
            if not rows:
                raise BadRequest(f"no run {run_id!r} (see `runner runs`)")
            if as_json:
                click.echo(json.dumps(rows, indent=2))
                return
            for e in rows:
                cost = f"{e['cost']:.4f} {e['currency']}" if e["cost"] else ""
                click.echo(f"{e['stage_id']:<38} {e['action']:<7} {e['status']:<11} {e['duration'] or 0:8.2f}s {cost}"
                           + (f"  {e['error']}" if e["error"] else ""))
                for t in e.get("tracking") or []:  # experiment-tracker runs (runner.tracking)
                    where = t.get("url") or t.get("uri") or ""
                    click.echo(f"    {t['backend']} run {t.get('run_id') or '—'}  {where}"
                               + (f"  warning: {t['warning']}" if t.get("warning") else ""))
            return
        rows = ws.runs(limit=limit)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo("no runs yet")
        for r in rows:
            dur = (r["finished"] - r["started"]) if r["finished"] else None
            counts = r["summary"].get("counts", {}) if r["summary"] else {}
            c = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
            seen = f"  last seen {_when(r['last_seen'])}" if r["status"] in ("killed", "running") else ""
            click.echo(f"{r['id']}  {_when(r['started'])}  {r['status']:<11} "
                       f"{(f'{dur:.1f}s' if dur is not None else '—'):>8}  {c}{seen}")
    finally:
        ws.close()


@cli.command()
@click.argument("refs", metavar="RUN...", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="HTML file to write (default: reports/compare-<time>.html).")
@click.option("--project", type=click.Path(file_okay=False),
              help="Project folder (default: found from the current folder).")
def compare(refs: tuple[str, ...], out: str | None, project: str | None) -> None:
    """Compare evaluations on one HTML page: run ids ('latest' too; every evaluate variant of the
    run) or evaluation folders. The first is the baseline."""
    from runner.eval.compare import evaluations_in, evaluations_of_run, write_comparison

    sources: list[tuple[str | None, Path]] = []
    ws = None
    try:
        for ref in refs:
            if Path(ref).exists():
                found = evaluations_in(Path(ref))
                if not found:
                    raise BadRequest(f"{ref}: no evaluation.json in it")
                sources += [(None, f) for f in found]
                continue
            ws = ws or _workspace_for((), project)
            run_id = (ws.last_run_id() if ws.exists() else None) if ref == "latest" else ref
            runs_found = evaluations_of_run(ws, run_id) if run_id and ws.exists() else []
            if not runs_found:
                raise BadRequest(f"{ref!r} is neither an evaluation folder nor a run with evaluate outputs "
                                 "(see `runner runs`)")
            sources += runs_found
        if len(sources) < 2:
            raise BadRequest(f"found {len(sources)} evaluation(s); a comparison needs at least two")
        root = ws.project_root if ws is not None else Path.cwd()
        path = write_comparison(
            sources, Path(out) if out else root / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html")
    finally:
        if ws is not None:
            ws.close()
    click.echo(f"wrote {_rel(path)} ({len(sources)} evaluations, baseline: {sources[0][0] or sources[0][1]})")


@cli.command()
@click.option("--project", type=click.Path(file_okay=False),
              help="Project folder (default: found from the current folder).")
@click.option("--force", is_flag=True,
              help="Kept for scripts: a lock that a live process holds is never taken (two applies would run at once).")
def unlock(project: str | None, force: bool) -> None:
    """Clear the record of a workspace lock whose holder is gone, and mark its runs killed.

    The lock is an flock the kernel releases when its holder dies, so a dead runner never blocks
    the next apply; while a live process holds it, unlock refuses (exit 3) and names it."""
    from runner.engine.lock import unlock as do_unlock

    ws = _workspace_for((), project)
    try:
        click.echo(do_unlock(ws.dir, force=force))
        for run_id, seen in ws.settle_dead_runs():
            click.echo(f"run {run_id} marked killed (last seen {_when(seen)})")
    finally:
        ws.close()


@cli.command("storyboard-preview")
@click.argument("spec", type=click.Path(path_type=str))
@click.option("--llm", "call_llm", is_flag=True, help="For planner 'llm': call the chat endpoint now (needs its key).")
@click.option("--json", "as_json", is_flag=True, help="Print the scenes as JSON.")
@allow_outside_opt
def storyboard_preview(spec: str, call_llm: bool, as_json: bool, allow_outside_project: bool) -> None:
    """Print a spec's storyboard scenes and frame prompts (no GPU, no model)."""
    from runner.generate.planner import PlannerError, format_scenes, plan_story

    s = _one_spec((spec,), allow_outside_project)
    story = plan_story(s.data, allow_llm=call_llm)
    if story.planner == "llm" and not story.scenes:
        raise PlannerError("; ".join(story.notes + ["the LLM planner asks a chat endpoint for the scenes; the preview "
                                                    "does not call it"]),
                           hint="Run `runner storyboard-preview --llm SPEC` to call the endpoint now.")
    if as_json:
        click.echo(json.dumps([sc.to_dict() for sc in story.scenes], indent=2))
    else:
        click.echo(format_scenes(story.scenes, story.notes))


# ----------------------------------------------------------------------------- serve / deploy


def _one_spec(specs: tuple[str, ...], allow_outside_project: bool = False):
    from runner.spec import load_specs

    # the photos need not be here: serving needs only the workspace's trained outputs
    loaded = load_specs(list(specs), allow_outside=allow_outside_project, require_files=False)
    if len(loaded) != 1:
        raise BadRequest("give exactly one spec: one server per character")
    return loaded[0]


@cli.command()
@click.argument("spec", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--checkpoint", default=None, help="Override generate.checkpoint: best, last or a LoRA file.")
@click.option("--device", default="auto", show_default=True, help="torch device: auto, cpu, cuda, mps.")
@click.option("--safety-model", default=None, metavar="REF",
              help="Safety checker (hub id or folder); turns the filter on (generate.api.safety_filter).")
@click.option("--insecure-no-auth", is_flag=True, help="Serve without a bearer token (trusted loopback use only).")
@allow_outside_opt
def serve(spec: str, host: str, port: int, checkpoint: str | None, device: str, safety_model: str | None,
          insecure_no_auth: bool, allow_outside_project: bool) -> None:
    """Start the generation API (FastAPI) for SPEC's trained character."""
    from runner.serve import api_settings, build_app, token_from_env
    from runner.serve.character import resolve_target

    s = _one_spec((spec,), allow_outside_project)
    target = resolve_target(s, checkpoint=checkpoint)
    api = api_settings(target)
    token = token_from_env(api["token_env"], insecure_no_auth=insecure_no_auth)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        _echo_err(f"warning: serving on {host} without authentication (--insecure-no-auth)")
    for w in target.warnings:
        _echo_err(f"warning: {w}")
    click.echo(f"loading {target.base_model} + {target.lora_source or 'no LoRA'} ...")
    try:
        app = build_app(target, token=token, device=device, safety_model=safety_model)
    except Exception as exc:
        raise BadRequest(f"could not load the model: {exc}", hint=getattr(exc, "hint", "")) from None
    if target.tiny_random:
        _echo_err("note: builtin:tiny-* is a tiny random model: its images are noise (for tests and demos)")
    import uvicorn

    auth = "no auth" if token is None else f"bearer token from ${api['token_env']}"
    click.echo(f"serving {target.character} on http://{host}:{port} ({auth}); docs at /docs")
    uvicorn.run(app, host=host, port=port, log_level="info")


@cli.command()
@click.argument("spec", type=click.Path(path_type=str))
@click.option("--checkpoint", default=None, help="Override generate.checkpoint: best, last or a LoRA file.")
@click.option("--token-secret", default="character-runner-api", show_default=True,
              help="modal.Secret holding the API token under the name generate.api.token_env.")
@click.option("--name", "app_name", default=None, help="Modal app name (default: <hardware.modal.app_name>-api).")
@click.option("--min-containers", default=0, show_default=True, type=int, help="Containers kept warm.")
@allow_outside_opt
def deploy(spec: str, checkpoint: str | None, token_secret: str, app_name: str | None, min_containers: int,
           allow_outside_project: bool) -> None:
    """Deploy SPEC's generation API as a Modal web endpoint."""
    from runner.backends.modal_backend import require_credentials
    from runner.serve.character import resolve_target
    from runner.serve.deploy import deploy as do_deploy

    require_credentials("runner deploy")
    s = _one_spec((spec,), allow_outside_project)
    target = resolve_target(s, checkpoint=checkpoint)
    for w in target.warnings:
        _echo_err(f"warning: {w}")
    dep, url = do_deploy(s, target, token_secret=token_secret, app_name=app_name, min_containers=min_containers)
    click.echo(f"deployed {dep.app_name}: {url or '(see `modal app list`)'}")
    click.echo(f"serving {target.lora_source or 'the base model'}; requests need 'Authorization: Bearer <token>'")


@cli.command()
@click.argument("spec", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
@click.option("--insecure-no-auth", is_flag=True, help="Serve on a non-loopback host without a bearer token.")
@allow_outside_opt
def review(spec: str, host: str, port: int, insecure_no_auth: bool, allow_outside_project: bool) -> None:
    """Open the review pages for SPEC: curate the dataset, rate images, pick a checkpoint.

    Decisions go to <spec>.review.yaml next to the spec; the next `runner apply` uses them.
    On any host but 127.0.0.1 the pages need the bearer token in $RUNNER_API_TOKEN
    (generate.api.token_env), as `runner serve` does; open /?token=<token> once in the browser."""
    from runner.review import decisions
    from runner.review.app import serve as serve_review
    from runner.serve import token_from_env

    s = _one_spec((spec,), allow_outside_project)
    token = None
    if host not in ("127.0.0.1", "localhost", "::1"):
        from runner.spec.schema import section_schema

        default_env = section_schema("generate")["properties"]["api"]["properties"]["token_env"]["default"]
        env = ((s.data.get("generate") or {}).get("api") or {}).get("token_env") or default_env
        token = token_from_env(env, insecure_no_auth=insecure_no_auth)
        if token is None:
            _echo_err(f"warning: serving the review pages on {host} without authentication (--insecure-no-auth)")
    decisions.for_spec(s.file)  # a broken review file is refused before the server starts
    click.echo(f"reviewing {s.name} on http://{host}:{port}/ (decisions: {_rel(decisions.review_path(s.file))}); "
               "Ctrl-C to stop")
    serve_review(s, host=host, port=port, token=token)


# ----------------------------------------------------------------------------- publish


def _storage_url(value: str) -> str:
    """--to: a URL as given, or a local folder as a file:// URL."""
    return value if "://" in value else Path(value).expanduser().resolve().as_uri()


def _print_versions(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no published versions")
        return
    click.echo(f"{'character':<14} {'tag':<14} {'created':<21} {'checkpoint':<22} {'metrics':<50} digest")
    for r in rows:
        ck = r["checkpoint"]
        where = f"step {ck.get('step')}" if ck.get("step") is not None else "a LoRA file"
        where += f" @ {ck['lora_scale']:g}" if isinstance(ck.get("lora_scale"), (int, float)) else ""
        where += " (review)" if ck.get("picked_by_reviewer") else ""
        m = r["metrics"]
        figures = " ".join(f"{k}={m[k]:.3f}" for k in ("face_similarity", "clip_t", "score")
                           if isinstance(m.get(k), (int, float)))
        click.echo(f"{r['character']:<14} {r['tag']:<14} {r['created'] or '?':<21} {where:<22} {figures or '-':<50} "
                   f"{(r['digest'] or '?')[:19]}")


@cli.command()
@click.argument("spec", required=False, type=click.Path(path_type=str))
@click.option("--to", "to", default=None, metavar="URL",
              help="s3://bucket/prefix, file:///folder or a local folder (default: publish.to of SPEC).")
@click.option("--tag", default=None, help="Version tag, e.g. v3 (default: publish.tag of SPEC).")
@click.option("--checkpoint", default=None,
              help="best (evaluation's best, or the reviewer's pick; default), last, or a LoRA file.")
@click.option("--endpoint-url", default=None, metavar="URL",
              help="S3-compatible server (default: publish.endpoint_url, then $AWS_ENDPOINT_URL).")
@click.option("--list", "list_only", is_flag=True, help="List the published versions (of SPEC's character, or all).")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON.")
@allow_outside_opt
def publish(spec: str | None, to: str | None, tag: str | None, checkpoint: str | None, endpoint_url: str | None,
            list_only: bool, as_json: bool, allow_outside_project: bool) -> None:
    """Upload SPEC's chosen LoRA, metadata, report and manifest as a version to object storage.

    \b
    Content-addressed: <to>/<character>/blobs/sha256/<hash> and
    <to>/<character>/versions/<tag>/manifest.json. Publishing the same content again is a no-op;
    a published tag with other content is refused (exit 4). Credentials come only from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)."""
    from runner import publish as P

    s = _one_spec((spec,), allow_outside_project) if spec else None
    defaults = (s.data.get("publish") or {}) if s else {}
    to = to or defaults.get("to")
    if not to:
        raise BadRequest((f"{s.file}: " if s else "") + "no destination: pass --to s3://bucket/prefix "
                        "(or file:///folder), or set publish.to in the spec")
    endpoint_url = endpoint_url or defaults.get("endpoint_url")
    if list_only:
        _print_versions(P.list_versions(_storage_url(to), s.name if s else None, endpoint_url=endpoint_url), as_json)
        return
    if s is None:
        raise BadRequest("give the SPEC to publish (or --list to see what is published)")
    done = P.publish(s, _storage_url(to), tag or defaults.get("tag") or "", checkpoint=checkpoint,
                     endpoint_url=endpoint_url)
    for w in done.warnings:
        _echo_err(f"warning: {w}")
    ck = done.manifest.get("checkpoint") or {}
    if done.unchanged:
        click.echo(f"{done.character} {done.tag} is already published with this content ({done.digest[:19]}): "
                   f"nothing to do ({done.url})")
        return
    click.echo(f"published {done.character} {done.tag}: {ck.get('source')}")
    click.echo(f"  {len(done.uploaded)} file(s) uploaded, {len(done.skipped)} already stored; "
               f"manifest {done.url} ({done.digest[:19]})")


# ----------------------------------------------------------------------------- init / presets / schema


@cli.command()
@click.argument("name")
@click.option("--dir", "folder", default="specs", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write NAME.yaml into.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--family", default=None, metavar="FAMILY",
              help="Train and evaluate with this model family's presets (a family name as train.model_family "
                   "spells it, or a short name its preset lists; an unknown one lists them all).")
def init(name: str, folder: str, force: bool, family: str | None) -> None:
    """Write a commented starter spec NAME.yaml that editors can autocomplete."""
    from runner.spec.starter import write_starter

    path = write_starter(name, Path(folder), force=force, family=family)
    click.echo(f"wrote {_rel(path)}")
    click.echo(f"next: put photos in the folder{'s' if family else ''} it names, then `runner plan {_rel(path)}`")


@cli.command()
def presets() -> None:
    """List the shipped training, inference and video presets."""
    import yaml

    from runner.spec.resolve import PRESET_FOLDERS, list_presets

    for section, folder in PRESET_FOLDERS.items():
        click.echo(f"{'.'.join(section)}.preset:")
        for name, path in list_presets(folder).items():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            click.echo(f"  {name:<22} {data.get('description', '')}")


@cli.command()
def schema() -> None:
    """Print where the spec JSON Schema is (for editors and CI)."""
    from runner.resources import schema_path

    click.echo(str(schema_path()))


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    # Library chatter (torchvision fallbacks, "no LoRA keys for the text encoder") is not for
    # users of a finished pipeline; set these to "info" to see it again.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        cli.main(args=argv, prog_name="runner", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _echo_err("interrupted: finished stages are kept; the next apply continues from there")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug: say so plainly, keep the traceback in a file
        crash = Path(os.environ.get("TMPDIR", "/tmp")) / f"character-runner-crash-{os.getpid()}.txt"
        try:
            crash.write_text(traceback.format_exc(), encoding="utf-8")
            where = f" (traceback saved to {crash})"
        except OSError:
            where = ""
        _echo_err(f"internal error: {type(exc).__name__}: {exc}{where}\n"
                  "This is a bug in character-runner; please report it with the saved traceback.")
        sys.exit(70)


if __name__ == "__main__":
    main()
