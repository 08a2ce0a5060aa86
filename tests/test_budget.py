"""Cost control: the plan sums the estimated cost and hours of every stage that would run, over all
specs of one apply, and a batch over ``hardware.budget`` (or ``--max-cost`` / ``--max-hours``) is
refused before anything starts, naming the stages; under budget it runs. The remote stages here
are the fake GPU kinds (tests/fake_gpu_stages.py) run in this process, their estimates the
defaults (no earlier run: 30 min each; A100-80GB at 2.50 USD/h, L40S at 1.95)."""

from __future__ import annotations

import io
import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import fake_gpu_stages  # noqa: F401  (registers fake_gpu_train / fake_gpu_eval; inert unless enabled)
from runner.engine.budget import OverBudget, batch_budget, check_budget
from runner.engine.executor import ApplyOptions, apply, plan_estimates, plan_specs
from runner.engine.progress import PlainReporter
from runner.engine.workspace import Workspace
from runner.spec import load_specs

SPEC = """\
version: 1
character:
  name: {name}
  trigger: {name}chr
  class_word: man
dataset:
  sources:
    - images: ../photos
hardware:
  backend: modal
  stage_gpu: {{fake_gpu_train: A100-80GB, fake_gpu_eval: L40S}}
{budget}"""

# per character with one variant: train 0.5 h x 2.50 + eval 0.5 h x 1.95 = 2.225 USD, 1 stage hour
ONE = 1.25 + 0.97  # each estimate is rounded to cents


class InProcess:
    """A remote backend that runs the stage body in this thread (the budget is decided before any
    call; what is under test is that the apply goes ahead)."""

    transport = SimpleNamespace(name="in-process")

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run_stage(self, kind, node, inputs, ctx):
        self.ran.append(node.id)
        return kind.run(node.config, inputs, ctx)

    def cancel_all(self) -> None:
        pass

    def session(self):
        return nullcontext()


@pytest.fixture()
def specs(project, shared_data, monkeypatch):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    monkeypatch.setenv("FAKE_GPU_SLEEP", "0")

    def write(name: str, budget: str = "") -> Path:
        path = project / "specs" / f"{name}.yaml"
        path.write_text(SPEC.format(name=name, budget=budget))
        return path

    return write


def do_apply(paths: list[Path], **kw):
    backend = InProcess()
    opts = ApplyOptions(only=["fake_gpu_eval*"], remote=backend, command="test", **kw)
    return apply(load_specs([str(p) for p in paths]), opts, PlainReporter(io.StringIO())), backend


def nothing_ran(project: Path) -> bool:
    ws = Workspace(project)
    try:
        return not ws.exists() or ws.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    finally:
        ws.close()


def test_over_budget_is_refused_before_anything_runs_naming_the_stages(specs, project):
    hero = specs("hero", "  budget: {max_cost: 2.0}\n")
    with pytest.raises(OverBudget) as err:
        do_apply([hero])
    msg = str(err.value)
    assert f"~{ONE:.2f} USD on Modal, over hardware.budget.max_cost of specs/hero.yaml (2.00 USD)" in msg
    assert "hero:fake_gpu_train[a]" in msg and "modal A100-80GB" in msg and "~1.25 USD" in msg
    assert "hero:fake_gpu_eval[a]" in msg and "default estimate" in msg
    assert "hero:ingest" in msg  # a local stage that would run too, with no estimate
    assert "--max-cost" in err.value.hint and "2 of the estimates are defaults" in err.value.hint
    assert err.value.exit_code == 2
    assert nothing_ran(project) and not (project / ".runner" / "store").exists()


def test_under_budget_runs_and_max_cost_overrides_the_spec(specs, project):
    hero = specs("hero", "  budget: {max_cost: 100}\n")
    with pytest.raises(OverBudget, match=r"over --max-cost \(0\.50 USD\)"):
        do_apply([hero], max_cost=0.5)  # the command line over the spec's limit, either way
    specs("hero", "  budget: {max_cost: 2.0}\n")
    result, backend = do_apply([hero], max_cost=3.0)
    assert result.status == "succeeded"
    assert sorted(backend.ran) == ["hero:fake_gpu_eval[a]", "hero:fake_gpu_train[a]"]


def test_several_specs_are_one_batch_summed_against_the_smallest_budget(specs, project):
    hero = specs("hero", "  budget: {max_cost: 3.0}\n")
    villain = specs("villain", "  budget: {max_cost: 50.0}\n")
    sidekick = specs("sidekick")  # no budget of its own: the batch's still applies to its stages
    loaded = load_specs([str(hero), str(villain), str(sidekick)])
    budget = batch_budget(loaded)
    assert (budget.max_cost, budget.cost_from) == (3.0, "hardware.budget.max_cost of specs/hero.yaml")
    plan, ws = plan_specs(loaded[:1])  # hero alone: 2.22 USD, within its 3.00
    try:
        assert check_budget(plan, plan_estimates(plan, None, ws), budget).cost == pytest.approx(ONE)
    finally:
        ws.close()
    with pytest.raises(OverBudget) as err:  # the three together: 6.66 USD
        do_apply([hero, villain, sidekick])
    msg = str(err.value)
    assert f"~{3 * ONE:.2f} USD" in msg and "the 9 stages this apply would run" in msg
    for name in ("hero", "villain", "sidekick"):
        assert f"{name}:fake_gpu_train[a]" in msg and f"{name}:fake_gpu_eval[a]" in msg
    assert nothing_ran(project)


def test_max_hours(specs, project):
    hero = specs("hero", "  budget: {max_hours: 0.75}\n")
    with pytest.raises(OverBudget, match=r"~1\.0 stage hours, over hardware\.budget\.max_hours of specs/hero\.yaml"):
        do_apply([hero])
    result, _ = do_apply([hero], max_hours=2)
    assert result.status == "succeeded"


def test_plan_shows_the_batch_and_refuses_like_apply(specs, project, monkeypatch):
    from runner.cli import cli

    specs("hero", "  budget: {max_cost: 5}\n")
    monkeypatch.chdir(project)
    runner = CliRunner()
    r = runner.invoke(cli, ["plan", "specs/hero.yaml"])
    assert r.exit_code == 0, r.output
    assert "~1.0 stage hours over 2 estimated stages; at best ~1.0 h of wall time with 4 remote at once" in r.output
    assert "budget 5.00 USD (hardware.budget.max_cost of specs/hero.yaml): within" in r.output
    r = runner.invoke(cli, ["plan", "--max-cost", "1", "specs/hero.yaml"])
    assert r.exit_code == 2 and "OVER, apply would refuse" in r.output
    assert "error: over budget, nothing was started" in r.output and "hero:fake_gpu_train[a]" in r.output
    r = runner.invoke(cli, ["apply", "--max-cost", "1", "specs/hero.yaml"])
    assert r.exit_code == 2 and "over --max-cost (1.00 USD)" in r.output and "Traceback" not in r.output
    assert nothing_ran(project)
    r = runner.invoke(cli, ["plan", "--json", "--max-cost", "9", "specs/hero.yaml"])
    import json

    batch = json.loads(r.output)["batch"]
    assert batch["cost"] == pytest.approx(ONE, abs=0.01) and batch["max_cost"] == 9.0 and batch["estimated"] == 2


def test_a_budget_is_no_key_of_any_stage(specs, project):
    keys = []
    for budget in ("", "  budget: {max_cost: 1, max_hours: 2}\n"):
        plan, ws = plan_specs(load_specs([str(specs("hero", budget))]))
        ws.close()
        keys.append({ps.id: ps.key for ps in plan.stages})
    assert keys[0] == keys[1]


def test_the_timeline_shows_the_fan_out_containers_queue_and_cost_per_stage(specs, project, tmp_path, monkeypatch):
    """The remote path as Modal runs it (content-addressed volume, the worker entry point), in this
    process: each call waits QUEUE_S before its container starts, and the rows say so."""
    import time

    from runner.backends.remote import FolderTransport
    from runner.backends.worker import run_stage_in_volume
    from runner.stages.report import _jinja_env, fanout_summary

    queue_s = 0.2

    class Call:
        def __init__(self, request):
            self.request, self.call_id = request, f"queued-{request[2]['stage_id']}"

        def result(self):
            time.sleep(queue_s)  # the provider's queue and cold start
            return run_stage_in_volume(*self.request, tr.root)

        def cancel(self):
            pass

    class Queued(FolderTransport):
        name, progress_poll_s = "queued", 0

        def invoke(self, kind, config, manifest, node):
            return Call((kind, config, manifest))

    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,b")
    hero = specs("hero")
    tr = Queued(tmp_path / "volume")
    opts = ApplyOptions(only=["fake_gpu_eval*"], remote=tr, command="test")
    result = apply(load_specs([str(hero)]), opts, PlainReporter(io.StringIO()))
    assert result.status == "succeeded"
    ws = Workspace(project)
    try:
        rows = ws.executions(result.run_id, "hero")
    finally:
        ws.close()
    remote = [e for e in rows if e["backend"] == "modal"]
    assert len(remote) == 4
    for e in remote:
        assert queue_s <= e["metrics"]["remote.queue_s"] < queue_s + 5, e["metrics"]
        assert e["metrics"]["remote.containers"] == 1.0
        # the remote path's phases: the call waited out the queue; upload and download are measured
        assert e["metrics"]["remote.call_s"] >= queue_s, e["metrics"]
        assert e["metrics"]["remote.upload_s"] >= 0 and e["metrics"]["remote.download_s"] >= 0
    f = fanout_summary(rows, 4)
    assert (f["stages"], f["containers"], f["retried"], f["queued"]) == (4, 4, 0, 4)
    assert 1 <= f["peak"] <= 4 and f["queue_median"] >= queue_s
    assert f["cost_per_stage"] == pytest.approx(f["cost"] / 4) and f["currency"] == "USD"
    html = _jinja_env().get_template("report.html.j2").render(
        title="t", character={}, spec_file="", spec_yaml="", references=[], sections=[], timeline=[],
        fanout=f, killed_runs=[], total_time=1.0, total_cost=f["cost"], currency="USD", run_id="r", generated="now",
        version="0")
    assert "4 remote stages on 4 containers" in html and "(hardware.modal.max_parallel 4)" in html
    assert "queue before a container started: median" in html and "cost per stage" in html
    from runner.stages.report import _remote_phases

    phases = _remote_phases(remote[0]["metrics"])
    row = {"stage_id": "hero:x", "kind": "x", "action": "run", "status": "succeeded", "duration": 3.0, "reason": "",
           "note": None, "cost": None, "per_unit": None,
           "started": 0.0, "character": "hero", "phases": phases}
    assert phases["call"] >= queue_s and _remote_phases({}) is None
    page = _jinja_env().get_template("report.html.j2").render(
        title="t", character={}, spec_file="", spec_yaml="", references=[], sections=[], timeline=[row],
        fanout=None, killed_runs=[], total_time=3.0, total_cost=0.0, currency="USD", run_id="r", generated="now",
        version="0")
    assert "up " in page and " · call " in page and " · down " in page
