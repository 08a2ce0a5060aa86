"""CPU stages on Modal (hardware.stage_backend): the real ingest and analyze stages run once here
and once through the worker entry point in subprocesses with a folder standing in for the Modal
Volume (runner.backends.remote.FolderTransport); their outputs are byte-identical, and the
remote rows name the backend, the call, the CPU container and its cost."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from runner.backends.remote import FolderTransport
from runner.core import pricing
from runner.engine.executor import ApplyError, ApplyOptions, apply, plan_estimates, plan_specs
from runner.engine.progress import PlainReporter
from runner.engine.workspace import Workspace
from runner.spec import load_specs

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  references: [../refs]
dataset:
  sources:
    - images: ../photos
  analysis: {backend: dlib, workers: 1}
hardware:
  stage_backend: {ingest: modal, analyze: modal}
  cpu: {cores: 4, memory_gib: 16}
  stage_cpu: {analyze: {cores: 8}}
  modal: {max_parallel: 2, retries: 0}
"""

STAGES = ["hero:ingest", "hero:analyze"]


def make_project(root: Path, shared_data: Path, spec_text: str = SPEC) -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("# character-runner project\n")
    (root / "photos").mkdir()
    (root / "refs").mkdir()
    faces = shared_data / "faces"
    shutil.copy(faces / "obama" / "obama_01.jpg", root / "refs")
    for src in (faces / "obama" / "obama_02.jpg", faces / "kit_harington" / "kit_02.jpg"):
        shutil.copy(src, root / "photos" / src.name)
    spec = root / "specs" / "hero.yaml"
    spec.write_text(spec_text)
    return spec


# Fields a stage writes that two local runs do not share either (its own wall time): compared
# without them, every other byte (and every other file) as is.
TIMINGS = {"analysis/summary.json": ("seconds", "images_per_s")}


def _digest(rel: str, p: Path) -> str:
    if rel not in TIMINGS:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    data = json.loads(p.read_text())
    assert all(k in data for k in TIMINGS[rel]), rel
    return json.dumps({k: v for k, v in data.items() if k not in TIMINGS[rel]}, sort_keys=True)


def store_digests(project: Path, stage_id: str) -> tuple[str, dict[str, str]]:
    """(cache key, {relative path: sha256}) of the stage's outputs in the store."""
    ws = Workspace(project)
    try:
        key = ws.last_success(stage_id).key
        root = ws.store_path(key)
    finally:
        ws.close()
    files = {p.relative_to(root).as_posix(): _digest(p.relative_to(root).as_posix(), p)
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "_manifest.json"}
    return key, files


def executions(project: Path, run_id: str) -> dict[str, dict]:
    ws = Workspace(project)
    try:
        return {e["stage_id"]: e for e in ws.executions(run_id)}
    finally:
        ws.close()


def test_cpu_stages_through_the_volume_equal_the_local_run(tmp_path, shared_data):
    here = make_project(tmp_path / "here", shared_data)
    there = make_project(tmp_path / "there", shared_data)
    log = io.StringIO()
    local = apply(load_specs([str(here)]), ApplyOptions(only=["analyze"], backend="local", command="test"),
                  PlainReporter(log))
    assert local.status == "succeeded", [(r.stage_id, r.error) for r in local.failed]
    transport = FolderTransport(tmp_path / "volume", retries=0)
    remote = apply(load_specs([str(there)]), ApplyOptions(only=["analyze"], remote=transport, command="test"),
                   PlainReporter(io.StringIO()))
    assert remote.status == "succeeded", [(r.stage_id, r.error) for r in remote.failed]

    here_rows = executions(here.parent.parent, local.run_id)
    rows = executions(there.parent.parent, remote.run_id)
    for sid in STAGES:
        assert here_rows[sid]["backend"] == "local" and here_rows[sid]["remote_call_id"] is None
        # where a stage runs changes neither its cache key nor a byte of its outputs
        key_here, files_here = store_digests(here.parent.parent, sid)
        key_there, files_there = store_digests(there.parent.parent, sid)
        assert key_here == key_there and files_here == files_there and files_here, sid
        row = rows[sid]
        assert row["status"] == "succeeded" and row["backend"] == "modal", sid
        assert row["remote_call_id"].startswith("local-"), sid
        assert row["duration"] > 0 and row["metrics"]["remote.billed_s"] > 0
        box = pricing.parse_cpu_label(row["gpu"])
        assert box is not None, row["gpu"]
        per_hour = 0.0472 * box.cores + 0.0080 * box.memory_gib
        assert row["cost"] == pytest.approx(per_hour * row["metrics"]["remote.billed_s"] / 3600, rel=1e-3, abs=1e-6)
        assert row["cost"] > 0 and row["currency"] == "USD"
    assert rows["hero:ingest"]["gpu"] == "cpu 4 cores 16 GiB"  # hardware.cpu
    assert rows["hero:analyze"]["gpu"] == "cpu 8 cores 16 GiB"  # hardware.stage_cpu.analyze over it
    assert "analyze" in rows["hero:analyze"]["kind"]
    # the analysis went up as the ingested images (content-addressed), the outputs came back
    assert rows["hero:analyze"]["metrics"]["remote.uploaded_files"] >= 1

    # the plan of the remote project learned from that run: a CPU container line with a cost
    plan, ws = plan_specs(load_specs([str(there)]), force=["analyze"], only=["analyze"])
    try:
        est = plan_estimates(plan, None, ws)
    finally:
        ws.close()
    assert est["hero:analyze"].backend == "modal" and est["hero:analyze"].gpu == "cpu 8 cores 16 GiB"
    assert est["hero:analyze"].source == "history" and est["hero:analyze"].priced


def test_a_spec_without_stage_backend_keeps_cpu_stages_here(tmp_path, shared_data):
    spec = make_project(tmp_path / "p", shared_data, SPEC.split("hardware:")[0] + "hardware: {backend: modal}\n")
    plan, ws = plan_specs(load_specs([str(spec)]), only=["analyze"])
    try:
        assert plan_estimates(plan, None, ws) == {}  # no remote stage: nothing to price
    finally:
        ws.close()
    hw = load_specs([str(spec)])[0].data["hardware"]
    assert hw["stage_backend"] == {} and hw["cpu"] == {"cores": 2.0, "memory_gib": 8.0}
    for gpu, backend in ((None, "local"), ("A10G", "modal")):
        assert pricing.stage_backend("ingest", gpu, hw) == backend
    assert pricing.stage_backend("evaluate", "A10G", {**hw, "stage_backend": {"evaluate": "local"}}) == "local"
    assert pricing.stage_backend("ingest", None, {**hw, "stage_backend": {"ingest": "modal"}}, "local") == "local"


def test_unknown_or_summarizing_kinds_in_stage_backend_are_refused(tmp_path, shared_data):
    cases = (("stage_backend: {ingset: modal}", r"hardware\.stage_backend\.ingset.*ingset"),
             ("stage_cpu: {analyse: {cores: 2}}", r"hardware\.stage_cpu\.analyse"),
             ("stage_backend: {report: modal}", r"hardware\.stage_backend\.report.*summarizes"))
    for i, (entry, match) in enumerate(cases):
        spec = make_project(tmp_path / f"p{i}", shared_data, SPEC.split("hardware:")[0] + f"hardware:\n  {entry}\n")
        with pytest.raises(ApplyError, match=match) as err:
            plan_specs(load_specs([str(spec)]))[1].close()
        assert err.value.hint


def test_cpu_container_prices_per_core_hour_and_gib_hour():
    label = pricing.cpu_label(4, 16)
    assert label == "cpu 4 cores 16 GiB" and pricing.parse_cpu_label(label) == pricing.CpuBox(4.0, 16.0)
    assert pricing.parse_cpu_label("H100:8") is None and pricing.parse_cpu_label(None) is None
    per_hour, cur = pricing.price_per_hour(label, {})
    assert per_hour == pytest.approx(4 * 0.0472 + 16 * 0.0080) and cur == "USD"
    own = {"price_table": {"cpu_core": 0.1, "memory_gib": 0.01}, "currency": "EUR"}
    assert pricing.stage_cost(1800, label, own) == (pytest.approx((0.4 + 0.16) / 2), "EUR")
    assert pricing.is_priced(label, {}) and "4 cores at 0.0472 USD/h" in pricing.price_note(label, {})
    assert pricing.price_per_hour(None, {})[0] == 0.0  # a local run still costs the table's 'cpu'
    box = pricing.remote_cpu("analyze", {"cpu": {"cores": 2.0, "memory_gib": 8.0},
                                         "stage_cpu": {"analyze": {"memory_gib": 3.5}}})
    assert box == pricing.CpuBox(2.0, 3.5) and box.memory_mib == 3584


def test_modal_function_of_a_cpu_stage_asks_for_cores_and_memory(tmp_path, shared_data):
    pytest.importorskip("modal")
    from runner.backends import modal_backend
    from runner.plan.graph import build_graph

    spec = make_project(tmp_path / "p", shared_data)
    graph = build_graph(load_specs([str(spec)]))
    built = modal_backend.build_stage_app(graph)
    assert set(built.by_node) == set(STAGES)  # the CPU stages sent there, nothing else
    fn = built.function_for(graph.nodes["hero:analyze"])
    assert fn.gpu == "cpu 8 cores 16 GiB"
    info = fn.function.info()  # local metadata of an undeployed function: no network
    assert info.gpus == [] and info.cpu == 8.0 and info.memory_mib == 16384
    assert info.max_retries == 0 and list(info.volumes) == [modal_backend.VOLUME_MOUNT]
    info = built.function_for(graph.nodes["hero:ingest"]).function.info()
    assert info.cpu == 4.0 and info.memory_mib == 16384
