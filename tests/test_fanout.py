"""Remote stages through the worker entry point: fan-out, failure isolation, content-addressed
upload/download, resume after a crash. The worker runs in subprocesses (as Modal runs it in a
container) with a folder standing in for the Modal Volume (runner.backends.remote.FolderTransport).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import fake_gpu_stages  # noqa: F401  (registers fake_gpu_train / fake_gpu_eval; inert unless enabled)
from runner.backends.remote import FolderTransport
from runner.engine.executor import ApplyOptions, apply
from runner.engine.progress import PlainReporter
from runner.engine.workspace import Workspace
from runner.spec import load_specs

TESTS = Path(__file__).resolve().parent

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
dataset:
  sources:
    - images: ../photos
hardware:
  backend: modal
  stage_gpu: {fake_gpu_train: A100-80GB, fake_gpu_eval: L40S}
  modal: {max_parallel: 3, retries: 0}
"""


@pytest.fixture()
def hero(project, shared_data, monkeypatch, tmp_path):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    monkeypatch.setenv("FAKE_GPU_TIMES", str(tmp_path / "times.txt"))
    monkeypatch.setenv("FAKE_GPU_SLEEP", "0.3")
    return spec


def transport(tmp_path: Path, retries: int = 0) -> FolderTransport:
    env = {"CHARACTER_RUNNER_STAGE_PLUGINS": "fake_gpu_stages",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return FolderTransport(tmp_path / "volume", retries=retries, env=env)


def run(spec: Path, tr: FolderTransport, **kw):
    import io

    opts = ApplyOptions(only=["fake_gpu_eval*"], remote=tr, command="test", **kw)
    return apply(load_specs([str(spec)]), opts, PlainReporter(io.StringIO()))


def executions(project: Path, run_id: str) -> dict[str, dict]:
    ws = Workspace(project)
    try:
        return {e["stage_id"]: e for e in ws.executions(run_id)}
    finally:
        ws.close()


def intervals(path: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for line in path.read_text().splitlines():
        sid, a, b, _pid = line.split()
        out[sid] = (float(a), float(b))
    return out


@pytest.mark.slow  # several seconds
def test_fanout_runs_variants_in_parallel_and_a_failure_keeps_the_others(hero, tmp_path, monkeypatch):
    project = hero.parent.parent
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,b,FAILc")
    tr = transport(tmp_path)
    result = run(hero, tr)
    st = {r.stage_id: r for r in result.results}
    assert result.status == "failed"
    assert st["hero:fake_gpu_train[FAILc]"].status == "failed"
    assert "variant FAILc was asked to fail" in st["hero:fake_gpu_train[FAILc]"].error
    assert "rename the variant" in st["hero:fake_gpu_train[FAILc]"].error  # the remote hint comes back
    # the other variants ran at the same time and their results were promoted and recorded
    assert st["hero:fake_gpu_train[a]"].status == "succeeded"
    assert st["hero:fake_gpu_train[b]"].status == "succeeded"
    iv = intervals(tmp_path / "times.txt")
    a, b = iv["hero:fake_gpu_train[a]"], iv["hero:fake_gpu_train[b]"]
    assert a[0] < b[1] and b[0] < a[1], f"variants did not overlap: {a} {b}"
    ex = executions(project, result.run_id)
    for v in ("a", "b"):
        e = ex[f"hero:fake_gpu_train[{v}]"]
        assert e["backend"] == "modal" and e["gpu"] == "A100-80GB"
        assert e["remote_call_id"].startswith("local-")
        assert e["cost"] > 0 and e["metrics"]["remote.billed_s"] > 0
        assert e["metrics"]["loss"] == pytest.approx(0.2)  # the remote stage's metrics came back
    assert ex["hero:fake_gpu_train[FAILc]"]["status"] == "failed"
    assert ex["hero:fake_gpu_train[FAILc]"]["remote_call_id"].startswith("local-")
    assert ex["hero:ingest"]["backend"] == "local" and ex["hero:ingest"]["remote_call_id"] is None
    # without --keep-going the evaluations were not started
    assert ex["hero:fake_gpu_eval[a]"]["status"] == "skipped"

    # the successful variants are cached now: the next apply runs only what is left
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,b")
    result = run(hero, tr)
    st = {r.stage_id: r.status for r in result.results}
    assert result.status == "succeeded", [r.error for r in result.results if r.error]
    assert st["hero:fake_gpu_train[a]"] == "cached" and st["hero:fake_gpu_train[b]"] == "cached"
    assert st["hero:fake_gpu_eval[a]"] == "succeeded" and st["hero:fake_gpu_eval[b]"] == "succeeded"
    ex = executions(project, result.run_id)
    # the evaluations' inputs (the train outputs) were produced on the volume: nothing to upload
    assert ex["hero:fake_gpu_eval[a]"]["metrics"]["remote.uploaded_files"] == 0
    assert ex["hero:fake_gpu_eval[a]"]["gpu"] == "L40S"
    ws = Workspace(project)
    try:
        out = ws.load_outputs(ws.last_success("hero:fake_gpu_eval[b]").key)["evaluation"]
        assert json.loads((Path(out.path) / "evaluation.json").read_text()) == {"variant": "b", "from": "b"}
        lora = ws.load_outputs(ws.last_success("hero:fake_gpu_train[a]").key)["lora"]
        index = json.loads((Path(lora.path) / "index.json").read_text())
        assert index["images"] and index["resumed_from"] == 0
        assert (Path(lora.path) / "shared.bin").read_bytes() == b"\x00" * 4096
    finally:
        ws.close()


@pytest.mark.slow  # about 4 s
def test_inputs_go_up_once_and_outputs_come_back_by_digest(hero, tmp_path, monkeypatch):
    project = hero.parent.parent
    tr = transport(tmp_path)
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    first = executions(project, run(hero, tr).run_id)
    up = first["hero:fake_gpu_train[a]"]["metrics"]
    assert up["remote.uploaded_files"] == 2  # the ingested image and its manifest.jsonl
    blobs = list((tmp_path / "volume" / "blobs").rglob("*"))
    # a new variant with the same inputs: nothing goes up again
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,d")
    second = executions(project, run(hero, tr).run_id)
    assert second["hero:fake_gpu_train[d]"]["metrics"]["remote.uploaded_files"] == 0
    # shared.bin of variant d has the bytes of variant a's (already here): copied, not fetched
    assert second["hero:fake_gpu_train[d]"]["metrics"]["remote.downloaded_files"] == 1  # index.json
    assert len(list((tmp_path / "volume" / "blobs").rglob("*"))) > len(blobs)


def test_crash_mid_stage_resumes_from_the_checkpoint_on_the_volume(hero, tmp_path, monkeypatch):
    project = hero.parent.parent
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    monkeypatch.setenv("FAKE_GPU_CRASH_ONCE", str(tmp_path / "crashed"))
    monkeypatch.setenv("FAKE_GPU_CRASH_AT", "3")
    # no retries: the call fails, the checkpoints stay on the volume
    result = run(hero, transport(tmp_path, retries=0))
    st = {r.stage_id: r for r in result.results}
    assert st["hero:fake_gpu_train[a]"].status == "failed"
    assert "failed on every attempt" in st["hero:fake_gpu_train[a]"].error
    scratch = list((tmp_path / "volume" / "scratch").iterdir())
    assert len(scratch) == 1 and sorted(p.name for p in scratch[0].iterdir()) == [
        "step-1.json", "step-2.json", "step-3.json"]
    # the next apply continues at step 4 (no local scratch was involved)
    assert not (project / ".runner" / "scratch").exists() or not any((project / ".runner" / "scratch").iterdir())
    result = run(hero, transport(tmp_path, retries=0))
    assert result.status == "succeeded"
    ws = Workspace(project)
    try:
        lora = ws.load_outputs(ws.last_success("hero:fake_gpu_train[a]").key)["lora"]
        index = json.loads((Path(lora.path) / "index.json").read_text())
    finally:
        ws.close()
    assert index["resumed_from"] == 3 and index["steps_run_here"] == [4, 5]
    e = executions(project, result.run_id)["hero:fake_gpu_train[a]"]
    assert e["metrics"]["remote.attempts"] == 2  # both attempts are billed
    assert not any((tmp_path / "volume" / "scratch").iterdir())  # done: the checkpoints are gone


def test_preempted_attempt_is_retried_within_the_call_and_resumes(hero, tmp_path, monkeypatch):
    project = hero.parent.parent
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    monkeypatch.setenv("FAKE_GPU_CRASH_ONCE", str(tmp_path / "crashed"))
    monkeypatch.setenv("FAKE_GPU_CRASH_AT", "2")
    result = run(hero, transport(tmp_path, retries=1))  # as modal.Retries(max_retries=1)
    assert result.status == "succeeded"
    ws = Workspace(project)
    try:
        lora = ws.load_outputs(ws.last_success("hero:fake_gpu_train[a]").key)["lora"]
        index = json.loads((Path(lora.path) / "index.json").read_text())
    finally:
        ws.close()
    assert index["resumed_from"] == 2 and index["steps_run_here"] == [3, 4, 5]
    e = executions(project, result.run_id)["hero:fake_gpu_train[a]"]
    assert e["metrics"]["remote.attempts"] == 2


def test_remote_progress_reaches_the_reporter_while_the_stage_runs(hero, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    monkeypatch.setenv("FAKE_GPU_SLEEP", "0.5")
    seen: list[tuple[str, str, float]] = []
    finished: dict[str, float] = {}

    class Recorder(PlainReporter):
        def progress(self, stage_id, desc, completed, total):
            seen.append((stage_id, desc, __import__("time").monotonic()))

        def stage_finished(self, stage_id, status, duration, note=""):
            finished[stage_id] = __import__("time").monotonic()

    import io

    opts = ApplyOptions(only=["fake_gpu_train*"], remote=transport(tmp_path), command="test")
    result = apply(load_specs([str(hero)]), opts, Recorder(io.StringIO()))
    assert result.status == "succeeded"
    relayed = [t for sid, desc, t in seen if sid == "hero:fake_gpu_train[a]" and desc == "training"]
    assert relayed and relayed[0] < finished["hero:fake_gpu_train[a]"]


def test_characters_of_one_batch_run_their_gpu_stages_in_parallel(hero, tmp_path, monkeypatch):
    import io

    project = hero.parent.parent
    villain = project / "specs" / "villain.yaml"
    villain.write_text(SPEC.replace("name: hero", "name: villain").replace("hrochr", "vlnchr"))
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a")
    opts = ApplyOptions(only=["fake_gpu_train*"], remote=transport(tmp_path), command="test")
    result = apply(load_specs([str(hero), str(villain)]), opts, PlainReporter(io.StringIO()))
    assert result.status == "succeeded"
    iv = intervals(tmp_path / "times.txt")
    h, v = iv["hero:fake_gpu_train[a]"], iv["villain:fake_gpu_train[a]"]
    assert h[0] < v[1] and v[0] < h[1], f"characters did not overlap: {h} {v}"
    ex = executions(project, result.run_id)
    assert {ex[f"{c}:fake_gpu_train[a]"]["character"] for c in ("hero", "villain")} == {"hero", "villain"}
