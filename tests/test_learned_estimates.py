"""The plan's time and cost estimates learn from earlier runs in state.db: seconds per unit of
work (per clip, per training step) of the latest successful runs of the same kind on the same GPU,
today's default until a run exists, in a few indexed seeks per kind; the report shows
time and cost per unit against the spec's targets. Fake kinds and hand-written rows (milliseconds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner.core import contract
from runner.core.pricing import per_unit
from runner.engine import cost as C
from runner.engine.executor import plan_estimates, plan_specs
from runner.engine.workspace import ExecutionRecord
from runner.spec import load_spec

SPEC = "version: 1\ncharacter:\n  name: hero\n  trigger: hrochr\n  description: first\n"


def expand_clips(spec, graph):
    return [contract.PlanNode(id=contract.node_id(graph.character, "clips"), kind="clips", character=graph.character,
                              config={"n": 5}, outputs=("items",), gpu="L4")]


def run_clips(config, inputs, ctx):
    out = ctx.out_dir / "items.txt"
    out.write_text("x")
    return {"items": contract.Artifact("items", out)}


def registry(work: bool = True) -> contract.Registry:
    reg = contract.Registry()
    extra = {"work_units": lambda config: (config["n"], "clip")} if work else {}
    reg.register("clips", version=1, order=10, expand=expand_clips, typical_seconds=600.0, **extra)(run_clips)
    return reg


def planned(project: Path, reg: contract.Registry):
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    return plan_specs([load_spec(spec)], registry=reg)


def add_row(ws, *, seconds: float, units: float | None = None, gpu: str = "L4", status: str = "succeeded",
            stage_id: str = "other:clips", started: float | None = None, backend: str = "modal") -> None:
    metrics = {} if units is None else {"work_units": units, "work_unit": "clip"}
    ws.record_execution(ExecutionRecord(
        run_id="r", stage_id=stage_id, kind="clips", character=stage_id.split(":")[0], key="k", action="run",
        reason="", status=status, started=time.time() if started is None else started, duration=seconds,
        metrics=metrics, cost=0.0, currency="USD", gpu=gpu, backend=backend, remote_call_id=None, error=None,
        log_path=None))


def test_default_until_a_run_exists_then_seconds_per_clip(project: Path) -> None:
    plan, ws = planned(project, registry())
    try:
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        assert (est.source, est.seconds, est.runs, est.unit, est.units) == ("default", 600.0, 0, "clip", 5.0)
        assert "(default)" in est.note and "(10 min)" in est.note
        # 3 runs of the kind on L4: 10, 12 and 14 s per clip; one on another GPU, one failed, one local
        for secs, units in ((100, 10), (240, 20), (42, 3)):
            add_row(ws, seconds=secs, units=units)
        add_row(ws, seconds=1.0, units=10, gpu="H100")
        add_row(ws, seconds=9999.0, units=1, status="failed")
        add_row(ws, seconds=1.0, units=10, backend="local", gpu=None)
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        assert est.source == "history" and est.runs == 3 and est.per_unit_s == pytest.approx(12.0)
        assert est.seconds == pytest.approx(60.0)  # 12 s per clip x this plan's 5 clips
        assert "learned from 3 runs of clips stages on L4" in est.note and est.note.startswith("~60 s")
        assert est.as_json()["per_unit_s"] == 12.0 and est.as_json()["unit"] == "clip"
        # this very stage's own runs come first
        add_row(ws, seconds=10.0, units=5, stage_id="hero:clips")
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        assert est.runs == 1 and est.per_unit_s == pytest.approx(2.0) and "this stage" in est.note
    finally:
        ws.close()


def test_only_the_latest_runs_count_and_rows_without_work_go_per_execution(project: Path) -> None:
    plan, ws = planned(project, registry())
    try:
        now = time.time()
        for i in range(C.HISTORY_RUNS):  # the latest: 1 s per clip
            add_row(ws, seconds=10.0, units=10, started=now - i)
        for i in range(5):  # older: 100 s per clip, past the window
            add_row(ws, seconds=1000.0, units=10, started=now - 1000 - i)
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        assert est.runs == C.HISTORY_RUNS and est.per_unit_s == pytest.approx(1.0)
    finally:
        ws.close()
    # a kind that declares no work: the median of whole executions, as before
    plan, ws = planned(project, registry(work=False))
    try:
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        assert est.source == "history" and est.per_unit_s is None and est.seconds == pytest.approx(10.0)
        assert "median per execution" in est.note
    finally:
        ws.close()


def test_the_plan_reads_history_in_a_few_indexed_seeks(project: Path) -> None:
    plan, ws = planned(project, registry())
    try:
        add_row(ws, seconds=100, units=10)
        seen: list[str] = []
        ws.db.set_trace_callback(seen.append)
        plan_estimates(plan, "modal", ws)
        ws.db.set_trace_callback(None)
        reads = [q for q in seen if "FROM executions" in q]
        assert len(reads) == 3, reads  # one kind on one GPU: no-GPU rows, the GPU's, none after it
        for q in reads:
            detail = " ".join(str(r) for r in ws.db.execute("EXPLAIN QUERY PLAN " + q).fetchall())
            assert "SEARCH executions USING INDEX executions_history" in detail and "TEMP B-TREE" not in detail, \
                (q, detail)
    finally:
        ws.close()


def test_the_recorder_keeps_the_planned_work_and_a_stage_metric_wins(project: Path) -> None:
    from runner.engine.record import Ended, Recorder

    plan, ws = planned(project, registry())
    try:
        ps = next(p for p in plan.stages if p.id == "hero:clips")
        rec = Recorder(ws, "r1", plan.graph, lambda node: True)
        row = rec.row(ps, Ended("succeeded", time.time(), 5.0, {"x": 1.0}))
        assert row.metrics == {"work_units": 5.0, "work_unit": "clip", "x": 1.0}
        row = rec.row(ps, Ended("succeeded", time.time(), 5.0, {"work_units": 7.0}))
        assert row.metrics["work_units"] == 7.0
        assert "work_units" not in rec.row(ps, Ended("failed", time.time(), 5.0, {})).metrics
    finally:
        ws.close()


def test_video_and_train_declare_their_work() -> None:
    from runner.stages import registry as stage_registry

    reg = stage_registry()
    video, train = reg.get("video").work_units, reg.get("train").work_units
    suite = {"cases": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    assert video({"source": "storyboard", "key_frames": [1, 4], "suite": suite}) == (8.0, "clip")
    assert video({"source": "images/hero.png", "key_frames": [], "suite": None}) == (1.0, "clip")
    assert train({"steps": 1500, "phases": []}) == (1500.0, "step")
    two = {"steps": 10, "phases": [{"name": "warm", "steps": 200}, {"name": "main", "steps": 800}]}
    assert train(two) == (1000.0, "step")
    assert train({"steps": 10, "phases": [{"name": "main", "epochs": 3}]}) is None  # known once captioned


def test_per_clip_time_and_cost_against_the_spec_targets() -> None:
    from runner.stages.report import unit_targets

    row = {"status": "succeeded", "duration": 130.0, "cost": 0.6, "currency": "USD",
           "metrics": {"work_units": 4.0, "work_unit": "clip", "remote.billed_s": 120.0}}
    spec = {"generate": {"video": {"targets": {"max_seconds": 60, "max_cost": 0.1}}}}
    got = per_unit(row, unit_targets(spec, "video"))
    assert (got["seconds"], got["cost"], got["unit"]) == (30.0, 0.15, "clip")
    assert got["time_pass"] is True and got["cost_pass"] is False
    plain = per_unit(row, unit_targets({}, "train"))
    assert plain["max_seconds"] is None and plain["time_pass"] is None
    assert per_unit({**row, "status": "cached"}) is None and per_unit({**row, "metrics": {}}) is None


def test_the_estimates_stay_fast_on_a_long_history(project: Path) -> None:
    """20,000 earlier executions of 20 kinds: the plan's seeks read only the latest per (kind, GPU)."""
    plan, ws = planned(project, registry())
    try:
        now = time.time()
        ws.db.execute("BEGIN")
        ws.db.executemany(
            "INSERT INTO executions(run_id, stage_id, kind, character, status, started, duration, metrics, gpu,"
            " backend) VALUES ('r', ?, ?, 'x', 'succeeded', ?, 10.0, '{\"work_units\": 10, \"work_unit\": \"clip\"}',"
            " 'L4', 'modal')",
            [(f"x:k{i % 20}", "clips" if i % 20 == 0 else f"k{i % 20}", now - i) for i in range(20000)])
        ws.db.execute("COMMIT")
        t0 = time.perf_counter()
        est = plan_estimates(plan, "modal", ws)["hero:clips"]
        took = time.perf_counter() - t0
        assert est.runs == C.HISTORY_RUNS and est.per_unit_s == pytest.approx(1.0)
        assert took < 0.25, took  # ~5 ms here; the old per-stage scans had no index on kind
    finally:
        ws.close()


def test_the_report_timeline_shows_the_per_clip_figures_against_the_targets() -> None:
    from runner.stages.report import _jinja_env

    row = {"status": "succeeded", "duration": 130.0, "cost": 0.6, "currency": "USD",
           "metrics": {"work_units": 4.0, "work_unit": "clip"}}
    entry = {"stage_id": "hero:video", "kind": "video", "character": "hero", "action": "run", "status": "succeeded",
             "duration": 130.0, "started": 0.0, "reason": "new stage", "note": "", "cost": 0.6, "currency": "USD",
             "gpu": "L4", "backend": "modal", "per_unit": per_unit(row, {"max_seconds": 60, "max_cost": 0.1})}
    html = _jinja_env().get_template("report.html.j2").render(
        title="t", character={}, spec_file="", spec_yaml="", references=[], sections=[], timeline=[entry],
        killed_runs=[], total_time=130.0, total_cost=0.6, currency="USD", run_id="r", generated="now", version="0")
    assert "32.5 s / 60.0 s pass · 0.1500 USD / 0.1 fail per clip (4 clips)" in html


def test_a_local_gpu_stage_is_estimated_once_it_has_run_here(project: Path) -> None:
    """A local stage has no estimate until it ran on this machine (the kinds' typical durations
    are GPU figures, and hardware.gpu names the remote GPU, not this one); then its time per unit
    is learned from the local runs only, time only (no price for this machine)."""
    from runner.cli import _plan_line

    plan, ws = planned(project, registry())
    try:
        assert "hero:clips" not in plan_estimates(plan, "local", ws)
        add_row(ws, seconds=50, units=10, gpu=None, backend="local")  # a local row records no GPU
        add_row(ws, seconds=999, units=10, gpu="L4")  # a Modal run does not teach the local estimate
        est = plan_estimates(plan, "local", ws)["hero:clips"]
        assert (est.backend, est.gpu, est.priced) == ("local", "local", False)
        assert (est.source, est.runs, est.per_unit_s, est.seconds) == ("history", 1, 5.0, 25.0)
        ps = next(p for p in plan.stages if p.id == "hero:clips")
        line = _plan_line(ps, est)
        assert "[gpu stage, local, ~25 s, time only: ~25 s (learned from 1 run of clips stages" in line, line
    finally:
        ws.close()


def test_a_local_cpu_stage_is_estimated_once_it_has_run_here(project: Path) -> None:
    """A CPU stage (a ride video's identity sets) that ran here before gets its time on this
    machine in the plan, learned per execution from the local runs of its kind; before that it has
    none (no CPU kind declares a duration for this machine)."""
    from runner.cli import _plan_line

    def expand_ident(spec, graph):
        return [contract.PlanNode(id=contract.node_id(graph.character, "ident", str(i)), kind="ident",
                                  character=graph.character, config={"i": i}, outputs=("items",)) for i in range(3)]

    reg = contract.Registry()
    reg.register("ident", version=1, order=10, expand=expand_ident)(run_clips)
    plan, ws = planned(project, reg)
    try:
        assert plan_estimates(plan, "local", ws) == {}
        for seconds in (70.0, 80.0, 90.0):
            ws.record_execution(ExecutionRecord(
                run_id="r", stage_id="other:ident[0]", kind="ident", character="other", key="k", action="run",
                reason="", status="succeeded", started=time.time(), duration=seconds, metrics={}, cost=0.0,
                currency="USD", gpu=None, backend="local", remote_call_id=None, error=None, log_path=None))
        est = plan_estimates(plan, None, ws)
        assert sorted(est) == ["hero:ident[0]", "hero:ident[1]", "hero:ident[2]"]
        first = est["hero:ident[0]"]
        assert (first.backend, first.seconds, first.runs, first.priced) == ("local", 80.0, 3, False)
        line = _plan_line(plan.stages[0], first)
        assert "[local, ~80 s, time only: ~80 s (learned from 3 runs of ident stages on local" in line, line
    finally:
        ws.close()


def test_each_execution_records_what_the_plan_estimated_and_the_report_shows_it(project: Path) -> None:
    """An apply records, with each execution's metrics, the estimate its plan showed (seconds,
    cost, learned or default): none for a local stage's first run here, then learned from it; the
    report's timeline sets it beside what the stage took."""
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.workspace import Workspace
    from runner.stages.report import _jinja_env, plan_estimate

    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    runs = [apply([load_spec(spec)], ApplyOptions(force=["clips"]), registry=registry()).run_id for _ in range(2)]
    ws = Workspace(project)
    try:
        first, second = (next(e for e in ws.executions(r) if e["kind"] == "clips") for r in runs)
    finally:
        ws.close()
    assert plan_estimate(first) is None  # a local stage has no estimate before it ran here once
    est = plan_estimate(second)
    assert est["source"] == "history" and est["runs"] == 1
    assert est["seconds"] == pytest.approx(first["duration"], abs=0.06)  # same 5 clips as the first run
    entry = {"stage_id": "hero:clips", "kind": "clips", "character": "hero", "action": "run", "status": "succeeded",
             "duration": 2.0, "started": 0.0, "reason": "", "note": "", "cost": None, "currency": "USD", "gpu": None,
             "backend": "local", "per_unit": None, "estimate": {**est, "seconds": 90.0}}
    html = _jinja_env().get_template("report.html.j2").render(
        title="t", character={}, spec_file="", spec_yaml="", references=[], sections=[], timeline=[entry],
        killed_runs=[], total_time=2.0, total_cost=0.0, currency="USD", run_id="r", generated="now", version="0")
    assert "est. 90.0 s (learned from 1 run)" in html
