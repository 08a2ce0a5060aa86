"""`report`: one self-contained HTML file per run (autoescaped Jinja2, images as data URIs).

It takes every other stage of the character as input and asks each stage kind for its report
sections (the ``report=`` hook of :func:`runner.stages.contract.register`), then adds the spec summary
and the run's timeline of stages with durations, cache hits and costs.
"""

from __future__ import annotations

import datetime as _dt
import functools
import html
from pathlib import Path
from typing import Any

from runner.paths import list_files
from runner.core import contract
from runner.core.pricing import per_unit
from runner.spec.config import view_of
from runner.spec.sections import ReportConfig
from runner.stages import registry as stage_registry


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    from runner.spec import schema as S

    inputs: dict[str, contract.InputRef] = {}
    stages = []
    for node in graph.nodes:
        stages.append({"id": node.id, "kind": node.kind, "label": node.label, "config": node.config})
        for out in node.outputs:
            inputs[f"{node.id}/{out}"] = contract.StageOutputRef(node.id, out)
    try:
        spec_rel = graph.spec_file.resolve().relative_to(graph.project_root.resolve()).as_posix()
    except ValueError:
        spec_rel = str(graph.spec_file)
    config = {
        "report": spec.get("report", {}),
        "character": spec.get("character", {}),
        "spec_file": spec_rel,
        "spec": spec,
        "stages": stages,
        # What the key covers besides every stage's key (each stage's outputs are inputs, named by
        # its id; its key holds its keyed config): the spec without settings that change no output
        # (prices, worker counts...), so editing one re-renders nothing.
        "keyed": {"spec": S.without_effect_free(spec)},
    }
    review = _review_decisions(graph)
    if review:
        config["review"] = review
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "report"),
            kind="report",
            character=graph.character,
            config=config,
            inputs=inputs,
            outputs=("report",),
            label="HTML report",
            unkeyed=("report", "character", "spec", "stages"),
        )
    ]


def unit_targets(spec: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The spec's time and cost targets per unit of a stage kind's work (per clip:
    generate.video.targets); None where the spec sets none."""
    if kind == "video":
        return ((spec.get("generate") or {}).get("video") or {}).get("targets")
    return None


def plan_estimate(execution: dict[str, Any]) -> dict[str, Any] | None:
    """What the plan estimated for an execution before it ran (recorded with its metrics by the
    engine: seconds, cost, learned from how many earlier runs or the default), for the timeline."""
    m = execution.get("metrics") or {}
    if m.get("plan.estimate_s") is None:
        return None
    return {"seconds": float(m["plan.estimate_s"]), "cost": float(m.get("plan.estimate_cost") or 0.0),
            "source": m.get("plan.estimate_source") or "default", "runs": int(m.get("plan.estimate_runs") or 0)}


def fanout_summary(executions: list[dict[str, Any]], max_parallel: int | None = None) -> dict[str, Any] | None:
    """How the remote stages of a run fanned out, from their execution rows: how many ran, on how
    many containers (a retried call starts more than one), the most running at once (the peak
    overlap of their spans), the queue time before a container started (where the worker
    measured it), and the cost per stage and per unit of work. None when nothing ran remotely."""
    rows = [e for e in executions if e.get("backend") == "modal" and e.get("status") in ("succeeded", "failed")]
    if not rows:
        return None

    def m(e: dict[str, Any]) -> dict[str, Any]:
        return e.get("metrics") or {}

    containers = [int(m(e).get("remote.containers", m(e).get("remote.attempts", 1)) or 0) for e in rows]
    queues = sorted(float(m(e)["remote.queue_s"]) for e in rows if m(e).get("remote.queue_s") is not None)
    spans = sorted([(float(e["started"] or 0), 1) for e in rows]
                   + [(float(e["started"] or 0) + float(e["duration"] or 0), -1) for e in rows])
    peak = running = 0
    for _, step in spans:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    cost = sum(float(e.get("cost") or 0.0) for e in rows)
    units: dict[str, list[float]] = {}
    for e in rows:
        n = m(e).get("work_units")
        if isinstance(n, (int, float)) and n > 0:
            acc = units.setdefault(str(m(e).get("work_unit") or "unit"), [0.0, 0.0])
            acc[0], acc[1] = acc[0] + float(n), acc[1] + float(e.get("cost") or 0.0)
    return {"stages": len(rows), "containers": sum(containers), "retried": sum(1 for c in containers if c > 1),
            "peak": peak, "max_parallel": max_parallel, "queued": len(queues),
            "queue_median": queues[len(queues) // 2] if queues else None, "queue_max": queues[-1] if queues else None,
            "cost": cost, "cost_per_stage": cost / len(rows), "currency": rows[0].get("currency") or "",
            "per_unit": [{"unit": u, "units": n, "cost": c / n} for u, (n, c) in sorted(units.items())]}


def _remote_phases(metrics: dict[str, Any]) -> dict[str, float] | None:
    """A remote execution's upload, call and download seconds (None for a local one, or a row
    recorded before they were)."""
    if metrics.get("remote.call_s") is None:
        return None
    return {p: float(metrics.get(f"remote.{p}_s") or 0.0) for p in ("upload", "call", "download")}


def _review_decisions(graph: contract.GraphView) -> dict[str, Any]:
    """Everything people decided in `runner review`, for the report's review section."""
    from runner.review import decisions

    try:
        data = decisions.for_spec(graph.spec_file)
    except decisions.ReviewError as exc:
        raise contract.StageError(str(exc)) from None
    return {k: v for k, v in data.items() if k != "format" and v}


def _review_section(config: dict[str, Any], inputs: dict[str, contract.Artifact], jenv: Any) -> dict[str, Any]:
    from runner.review.summary import report_context

    evaluations = {n.split("/", 1)[0]: Path(a.path) for n, a in inputs.items() if n.endswith("/evaluation")}
    curated = next((Path(a.path) for n, a in inputs.items() if n.endswith("/curated")), None)
    ctx = report_context(config["review"], evaluations, curated)
    return {"title": "Review", "anchor": "review", "stage": "review",
            "html": jenv.get_template("sections/review.html.j2").render(**ctx)}


@functools.lru_cache(maxsize=1)
def _jinja_env():
    """The report's Jinja environment, built once per process: its templates compile once, not once
    per report (a batch of 300 specs renders 300 reports)."""
    import jinja2

    from runner.report import charts, embed
    from runner.resources import resource_dir

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        autoescape=True,  # every template: spec text is user input and must stay text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["charts"] = charts
    env.globals["thumb"] = embed.thumbnail_data_uri
    env.filters["duration"] = _fmt_duration
    env.filters["pct"] = lambda v, d=1: "—" if v is None else f"{float(v) * 100:.{d}f}%"
    env.filters["num"] = lambda v, d=3: "—" if v is None else f"{float(v):.{d}f}"
    return env


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    if m < 120:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _spec_yaml(spec: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)


@contract.register("report", version=1, order=100, expand=expand, summarizes=True,
               description="Render the self-contained HTML report.")
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Render the self-contained HTML report."""
    rep = view_of(ReportConfig, config.get("report", {}))
    env_settings = {
        "gallery_limit": rep.gallery_limit,
        "thumbnail_px": rep.thumbnail_px,
        "character": config.get("character", {}),
        "project_root": str(ctx.project_root),
    }
    # the registry the engine planned with (a test's fake kinds); the built-in one when run alone
    registry = (getattr(ctx, "extra", {}) or {}).get("registry") or stage_registry()
    jenv = _jinja_env()
    sections = _stage_sections(config["stages"], inputs, registry, env_settings, jenv, ctx,
                               rep.max_sections_per_kind)

    if config.get("review"):  # what people decided in `runner review`
        sections.append(_review_section(config, inputs, jenv))
    extra = getattr(ctx, "extra", {}) or {}
    timeline = [t for t in extra.get("timeline", []) if t.get("character") == ctx.character]
    ws = extra.get("workspace")
    costs = ws.executions(ctx.run_id, ctx.character) if ws is not None else []
    cost_by_stage = {e["stage_id"]: e for e in costs}
    for t in timeline:
        e = cost_by_stage.get(t["stage_id"])
        t["cost"] = e["cost"] if e else None
        t["currency"] = e["currency"] if e else ""
        t["gpu"] = e["gpu"] if e else None
        t["backend"] = e["backend"] if e else ""
        t["per_unit"] = per_unit(e, unit_targets(config.get("spec", {}), t["kind"])) if e else None
        t["estimate"] = plan_estimate(e) if e else None
        t["queue_s"] = (e["metrics"] or {}).get("remote.queue_s") if e else None
        t["phases"] = _remote_phases(e["metrics"] or {}) if e else None
    modal = (config.get("spec", {}).get("hardware") or {}).get("modal") or {}
    fanout = fanout_summary(costs, modal.get("max_parallel"))
    tracked = _tracked_runs(ws, ctx.run_id, ctx.character) if ws is not None else []
    if tracked:  # the experiment-tracker runs of this report's stages (runner.tracking)
        sections.append({"title": "Experiment tracking", "anchor": "tracking", "stage": "tracking",
                         "html": jenv.get_template("sections/tracking.html.j2").render(runs=tracked)})
    killed_runs = _killed_runs_before(ws, ctx.run_id, ctx.character) if ws is not None else []
    total_time = sum(t["duration"] for t in timeline)
    total_cost = sum((t.get("cost") or 0.0) for t in timeline)
    character = config.get("character", {})
    title = rep.title or character.get("display_name") or character.get("name", "character")
    refs = []
    for ref in character.get("references", []):
        p = Path(ref) if Path(ref).is_absolute() else ctx.project_root / ref
        files = list_files(p)  # what the other stages read: hidden names skipped
        for f in files[:8]:
            try:
                refs.append({"src": _thumb_or_none(f, env_settings["thumbnail_px"]), "name": f.name})
            except Exception:
                continue
    refs = [r for r in refs if r["src"]]
    page = jenv.get_template("report.html.j2").render(
        title=title,
        character=character,
        spec_file=config.get("spec_file", ""),
        spec_yaml=_spec_yaml(config.get("spec", {})),
        references=refs,
        sections=sections,
        timeline=timeline,
        fanout=fanout,
        killed_runs=killed_runs,
        total_time=total_time,
        total_cost=total_cost,
        currency=((timeline[0].get("currency") if timeline else "")
                  or config.get("spec", {}).get("hardware", {}).get("currency", "USD")),
        run_id=ctx.run_id,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=_version(),
    )
    out = ctx.out_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    ctx.metric("report_bytes", out.stat().st_size)
    return {"report": contract.Artifact("report", out)}


def _outputs_of(stage_id: str, inputs: dict[str, contract.Artifact]) -> dict[str, contract.Artifact]:
    """A stage's outputs among the report's inputs ("<stage id>/<output>": a stage id may hold '/'
    (a video in a sub-folder), an output name not)."""
    return {name.rpartition("/")[2]: art for name, art in inputs.items() if name.rpartition("/")[0] == stage_id}


def _stage_sections(stages: list[dict[str, Any]], inputs: dict[str, contract.Artifact], registry: Any,
                    env_settings: dict[str, Any], jenv: Any, ctx: contract.StageContext,
                    limit: int) -> list[dict[str, Any]]:
    """Every stage's sections in plan order. A kind with more than ``limit`` stages (a ride day's
    thousand videos) that declares ``report_row`` gets one table of all of them instead, then the
    detailed sections of ``limit`` of them, those whose row asks for attention first."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for st in stages:
        by_kind.setdefault(st["kind"], []).append(st)
    sections: list[dict[str, Any]] = []
    for st in stages:
        kind = registry.get(st["kind"])
        if kind is None or kind.report is None:
            continue
        group = by_kind[st["kind"]]
        if kind.report_row is None or len(group) <= limit:
            sections += _sections_of(st, kind, inputs, env_settings, jenv, ctx)
        elif st is group[0]:
            sections += _kind_table(kind, group, inputs, env_settings, jenv, ctx, limit)
    return sections


def _sections_of(st: dict[str, Any], kind: Any, inputs: dict[str, contract.Artifact], env_settings: dict[str, Any],
                 jenv: Any, ctx: contract.StageContext) -> list[dict[str, Any]]:
    """One stage's rendered sections; a section that fails to render is replaced by its error."""
    try:
        produced = kind.report(st["config"], _outputs_of(st["id"], inputs), env_settings)
    except Exception as exc:  # a broken section must not cost the whole report
        ctx.warn(f"report section of {st['id']} failed: {type(exc).__name__}: {exc}")
        return [{"title": st["id"], "anchor": _anchor(st["id"]), "stage": st["id"],
                 "html": f'<p class="error">This section could not be rendered: '
                         f'{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</p>'}]
    return [{"title": sec.title, "anchor": sec.anchor or _anchor(st["id"] + "-" + sec.title), "stage": st["id"],
             "html": jenv.get_template(sec.template).render(**sec.context, stage_id=st["id"], section=sec)}
            for sec in produced]


def _kind_table(kind: Any, group: list[dict[str, Any]], inputs: dict[str, contract.Artifact],
                env_settings: dict[str, Any], jenv: Any, ctx: contract.StageContext,
                limit: int) -> list[dict[str, Any]]:
    """The table of every stage of a kind (a row each, from ``report_row``), then ``limit``
    detailed sections: the stages whose row has ``attention`` first, then in plan order."""
    rows = []
    for st in group:
        try:
            row = dict(kind.report_row(st["config"], _outputs_of(st["id"], inputs)) or {})
        except Exception as exc:  # one unreadable output leaves its row saying so
            row = {"attention": f"row could not be read: {type(exc).__name__}: {exc}"}
        rows.append({"stage": st["id"], **row})
    columns = list(dict.fromkeys(c for r in rows for c in r if c not in ("stage", "attention")))
    first = sorted(range(len(group)), key=lambda i: (not rows[i].get("attention"), i))[:limit]
    table = {"title": f"{len(group)} {kind.kind} stages", "anchor": _anchor(f"{kind.kind}-table"),
             "stage": kind.kind,
             "html": jenv.get_template("sections/stage_table.html.j2").render(
                 kind=kind.kind, rows=rows, columns=columns, detailed=[group[i]["id"] for i in first],
                 limit=limit)}
    details = [sec for i in sorted(first) for sec in _sections_of(group[i], kind, inputs, env_settings, jenv, ctx)]
    return [table, *details]


def _tracked_runs(ws: Any, run_id: str, character: str) -> list[dict[str, Any]]:
    """Tracker runs of the character's stages in this apply; a cached stage shows the runs of the
    execution that produced its outputs."""
    rows = []
    for e in ws.executions(run_id, character):
        runs = e["tracking"] or (ws.tracked_runs(e["stage_id"], e["key"]) if e["status"] == "cached" else [])
        rows += [{**r, "stage_id": e["stage_id"], "status": e["status"]} for r in runs]
    return rows


def _killed_runs_before(ws: Any, run_id: str, character: str) -> list[dict[str, Any]]:
    """The runs of this character killed since the last one that ended normally (newest first):
    their process died, so they never wrote a report of their own."""
    def utc(ts: float | None) -> str:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "—"

    out = []
    for r in ws.runs(limit=50):
        if r["id"] == run_id or r["status"] == "running":
            continue
        if r["status"] != "killed":
            break  # older runs were in an earlier report
        mine = ws.executions(r["id"], character)
        if mine:
            out.append({"id": r["id"], "started": utc(r["started"]), "last_seen": utc(r["last_seen"]),
                        "stages": [e["stage_id"] for e in mine if e["status"] == "killed"]})
    return out


def _thumb_or_none(path: Path, px: int) -> str | None:
    from runner.report.embed import thumbnail_data_uri

    try:
        return thumbnail_data_uri(path, px)
    except Exception:
        return None


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _version() -> str:
    from runner import __version__

    return __version__
