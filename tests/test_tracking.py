"""Experiment tracking end to end: a real `mlflow server` (SQLite backend, local artifact store in
tmp) on 127.0.0.1 and W&B in offline mode, a tiny train + evaluate run by `runner apply`, and
everything read back: through MlflowClient (params, loss and learning-rate history, metrics per
checkpoint and category, the LoRA files and the report as artifacts) and from the offline run's
own transaction log (W&B history). The stages upstream of train are written into the store at
their planned keys (tests/review_fixture.py), so only train, evaluate and the report run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from review_fixture import promote
from train_helpers import make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = """\
version: 1
character: {{name: hero, trigger: hrochr, class_word: man, references: [../refs]}}
dataset: {{sources: [{{images: ../photos}}]}}
train: {{preset: tiny-demo, steps: 4, checkpoints: {{every_steps: 2}}}}
evaluate: {{preset: tiny-demo, face_model: dlib, categories: [close_up, full_body], prompts_per_category: 1,
           seeds: [1], lora_scales: [0.5, 1.0]}}
hardware: {{device: cpu}}
tracking:
  mlflow: {{tracking_uri: "{uri}", experiment: hero-tests}}
  wandb: {{mode: offline, project: hero-tests}}
  tags: {{team: vision}}
"""


# --------------------------------------------------------------------------- unit: URIs, settings


GOOD_URIS = ["http://127.0.0.1:5000", "https://mlflow.example.com/prefix", "sqlite:///mlflow.db",
             "sqlite:////abs/path/mlflow.db", "file:///srv/mlruns", "file:mlruns",
             "postgresql://mlflow@db.internal/mlflow", "postgresql+psycopg2://db:5432/x",
             "mysql://db/mlflow", "databricks", "databricks://profile"]
BAD_URIS = ["mlruns", "htp://host:5000", "http://", "http://host:port", "sqlite:/rel.db", "sqlite://x.db",
            "postgresql://user:secret@db/mlflow", "https://u:pw@host", "ftp://host/x", "http+x://host",
            "postgresql:///nohost", "s3://bucket/mlruns"]


def test_tracking_uri_rules_accept_stores_and_refuse_what_cannot_work():
    from runner.tracking.uri import tracking_uri_problem

    for uri in GOOD_URIS:
        assert tracking_uri_problem(uri) is None, uri
    for uri in BAD_URIS:
        assert tracking_uri_problem(uri), uri


def _write_spec(root: Path, tracking: str) -> Path:
    (root / "specs").mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir(exist_ok=True)
    (root / "runner.toml").write_text("")
    spec = root / "specs" / "hero.yaml"
    spec.write_text("version: 1\ncharacter: {name: hero, trigger: hrochr, class_word: man}\n"
                    "dataset: {sources: [{images: ../photos}]}\ntrain: {preset: tiny-demo}\n" + tracking)
    return spec


@pytest.mark.parametrize("uri", BAD_URIS)
def test_validate_names_a_misconfigured_tracking_uri(tmp_path, capsys, uri):
    from test_spec_trust import run_cli

    spec = _write_spec(tmp_path, f'tracking: {{mlflow: {{tracking_uri: "{uri}"}}}}\n')
    code, out = run_cli("validate", str(spec), capsys=capsys)
    assert code == 2, out
    assert f"{spec}:5:" in out and "tracking.mlflow.tracking_uri" in out and "MLflow tracking URI" in out, out


def test_plan_names_a_misconfigured_mlflow_tracking_uri_env(tmp_path, capsys, monkeypatch):
    from test_spec_trust import run_cli

    spec = _write_spec(tmp_path, "tracking: {mlflow: true}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://typo:5000")
    code, out = run_cli("plan", str(spec), capsys=capsys)
    assert code == 2 and "MLFLOW_TRACKING_URI" in out and "htp://typo:5000" in out, out
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, out = run_cli("plan", str(spec), capsys=capsys)
    assert code in (0, 2) and "MLFLOW_TRACKING_URI" not in out, out


def test_tracking_is_off_by_default_and_opt_in_changes_no_key(tmp_path):
    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    keys = {}
    for name, section in (("off", ""), ("on", "tracking: {mlflow: true, wandb: {mode: offline}}\n"),
                          ("uri", 'tracking: {mlflow: {tracking_uri: "sqlite:///../ml.db"}}\n')):
        root = tmp_path / name
        nodes = {n.id: n for n in expand_spec(load_spec(_write_spec(root, section)))}
        keys[name] = {i: n.keyed_config() for i, n in nodes.items()}
        train = nodes["hero:train"]
        if name == "off":
            assert "tracking" not in train.config
        elif name == "on":  # the shorthand gets the schema's defaults; every tracked kind has it
            assert train.config["tracking"]["mlflow"] == {"enabled": True, "tracking_uri": None,
                                                          "experiment": None, "artifacts": True}
            assert train.config["tracking"]["wandb"]["mode"] == "offline"
            assert "tracking" in train.unkeyed
        else:  # a relative store is relative to the spec, like every path
            assert train.config["tracking"]["mlflow"]["tracking_uri"] == f"sqlite:///{(root / 'ml.db').resolve()}"
            assert "wandb" not in train.config["tracking"]
    assert keys["off"] == keys["on"] == keys["uri"]


def test_an_older_state_db_gains_the_tracking_column(tmp_path):
    from runner.engine.workspace import Workspace

    db_dir = tmp_path / ".runner"
    db_dir.mkdir()
    old = sqlite3.connect(db_dir / "state.db")
    old.executescript(
        "CREATE TABLE executions(id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, stage_id TEXT, kind TEXT,"
        " character TEXT, key TEXT, action TEXT, reason TEXT, status TEXT, started REAL, duration REAL,"
        " metrics TEXT, cost REAL, currency TEXT, gpu TEXT, backend TEXT, remote_call_id TEXT, error TEXT,"
        " log_path TEXT);"
        "INSERT INTO executions(run_id, stage_id, character, status, started) VALUES ('r1', 'hero:train', 'hero',"
        " 'succeeded', 1.0);")
    old.commit()
    old.close()
    (tmp_path / "runner.toml").write_text("")
    ws = Workspace(tmp_path)
    try:
        assert ws.executions("r1")[0]["tracking"] == []
        ws.set_tracking(1, [{"backend": "mlflow", "run_id": "abc"}])
        assert ws.executions("r1")[0]["tracking"] == [{"backend": "mlflow", "run_id": "abc"}]
    finally:
        ws.close()


# --------------------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    uri: str
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend store and a local artifact root; stopped (its whole
    process group) in teardown, whatever the test did."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        yield Server(f"http://127.0.0.1:{port}", proc, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory, shared_data):
    """A project whose train and evaluate stages ran with both trackers; (project, apply result)."""
    from runner.engine.executor import ApplyOptions, apply, plan_specs
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    root = tmp_path_factory.mktemp("tracking") / "project"
    for d in ("specs", "photos", "refs"):
        (root / d).mkdir(parents=True)
    (root / "runner.toml").write_text("")
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", root / "refs")
    shutil.copy(shared_data / "faces" / "obama" / "obama_02.jpg", root / "photos")
    spec_file = root / "specs" / "hero.yaml"
    spec_file.write_text(SPEC.format(uri=mlflow_server.uri))
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_DIR", str(root.parent / "wandb-dir"))
        plan, ws = plan_specs([load_spec(spec_file)])
        try:
            for ps in plan.stages:
                if ps.node.kind == "caption":
                    promote(ws, ps, lambda out: make_dataset(shared_data, out / "dataset", trigger="hrochr",
                                                             class_word="man", n=4, max_side=64))
                elif ps.node.kind not in ("train", "evaluate", "report"):
                    promote(ws, ps, lambda out: None)
        finally:
            ws.close()
        mlflow_server.wait_ready()
        result = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
        yield root, result


def _executions(root: Path, run_id: str) -> dict[str, dict]:
    from runner.engine.workspace import Workspace

    ws = Workspace(root)
    try:
        return {e["stage_id"]: e for e in ws.executions(run_id)}
    finally:
        ws.close()


def _store(root: Path, stage_id: str) -> Path:
    from runner.engine.workspace import Workspace

    ws = Workspace(root)
    try:
        return ws.store_path(ws.last_success(stage_id).key)
    finally:
        ws.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_train_and_evaluate_runs_read_back_through_the_mlflow_client(tracked, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    root, result = tracked
    assert result.status == "succeeded", [(r.stage_id, r.error) for r in result.results]
    ex = _executions(root, result.run_id)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("hero-tests")
    runs = {r.data.tags["runner.stage_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"hero:train", "hero:evaluate"}

    # train: params from the resolved config, loss and lr per step as the trainer logged them
    train = runs["hero:train"]
    assert train.info.status == "FINISHED"
    assert train.data.params["base_model"] == "builtin:tiny-sd" and train.data.params["lora.rank"] == "4"
    assert train.data.tags["team"] == "vision" and train.data.tags["runner.run_id"] == result.run_id
    store = _store(root, "hero:train")
    logged = [json.loads(x) for x in (store / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for name in ("loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(train.info.run_id, name))
        expected = [(r["step"], r[name]) for r in logged if name in r]
        assert len(history) == len(expected) == 4
        assert [h[0] for h in history] == [e[0] for e in expected]
        assert [h[1] for h in history] == pytest.approx([e[1] for e in expected])
    # the LoRA file of every kept checkpoint, byte for byte
    index = json.loads((store / "lora" / "index.json").read_text())
    assert len(index["checkpoints"]) == 2
    for ck in index["checkpoints"]:
        rel = f"lora/{Path(ck['diffusers']).parent.name}"
        names = {Path(a.path).name for a in client.list_artifacts(train.info.run_id, rel)}
        assert Path(ck["diffusers"]).name in names and Path(ck["kohya"]).name in names
        got = client.download_artifacts(train.info.run_id, f"{rel}/{Path(ck['diffusers']).name}", str(tmp_path))
        assert _sha(got) == _sha(store / "lora" / ck["diffusers"])
    # the report of this apply, attached after it was rendered, showing the run id
    report = client.download_artifacts(train.info.run_id, f"report/{result.run_id}.html", str(tmp_path))
    assert train.info.run_id in Path(report).read_text(encoding="utf-8")

    # evaluate: each metric per checkpoint (steps) and category, at each LoRA scale
    ev = runs["hero:evaluate"]
    evaluation = json.loads((_store(root, "hero:evaluate") / "evaluation" / "evaluation.json").read_text())
    steps = sorted({c["step"] for c in evaluation["cells"]})
    assert steps == [ck["step"] for ck in index["checkpoints"]]
    checked = 0
    for category in ["close_up", "full_body", "overall"]:
        for scale in ("0.5", "1"):
            cells = {c["step"]: c for c in evaluation["cells"] if f"{c['lora_scale']:g}" == scale}
            for metric in ("clip_t", "clip_i", "dino"):
                history = client.get_metric_history(ev.info.run_id, f"eval/{category}/{metric}/scale_{scale}")
                want = [(s,
                         (cells[s]["overall"] if category == "overall" else cells[s]["categories"][category])[metric])
                        for s in steps]
                got = sorted((m.step, m.value) for m in history)
                assert [g[0] for g in got] == steps and [g[1] for g in got] == pytest.approx([w[1] for w in want])
                checked += 1
    assert checked == 18
    assert ev.data.metrics["best_step"] == evaluation["best"]["step"]
    assert {Path(a.path).name for a in client.list_artifacts(ev.info.run_id, "evaluation")} == {"evaluation.json"}
    assert client.list_artifacts(ev.info.run_id, "best")

    # state.db links every execution to its runs, without warnings
    for sid, run in runs.items():
        entries = {t["backend"]: t for t in ex[sid]["tracking"]}
        assert entries["mlflow"]["run_id"] == run.info.run_id and not entries["mlflow"]["warning"]
        run_url = f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        assert entries["mlflow"]["url"] == run_url
        assert entries["wandb"]["mode"] == "offline" and entries["wandb"]["run_id"]


def _wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): wandb's protobuf Records in LevelDB-log
    framing (7-byte file header, 32 KiB blocks, chunks of full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_history(tracked):
    root, result = tracked
    ex = _executions(root, result.run_id)
    train = next(t for t in ex["hero:train"]["tracking"] if t["backend"] == "wandb")
    folder = Path(train["uri"])
    assert folder.parent == root.parent / "wandb-dir" / "wandb" and folder.name.startswith("offline-run-")
    history, config = {}, {}
    for rec in _wandb_records(folder / f"run-{train['run_id']}.wandb"):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items.get("_step", rec.history.step.num)), {}).update(items)
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    logged = [json.loads(x) for x in (_store(root, "hero:train") / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert {s: h["loss"] for s, h in history.items() if "loss" in h} == pytest.approx(losses)
    value = config["base_model"]
    assert (value.get("value") if isinstance(value, dict) else value) == "builtin:tiny-sd"


@pytest.mark.slow
def test_runs_and_the_report_show_the_tracking_run_ids(tracked, capsys):
    from test_spec_trust import run_cli

    root, result = tracked
    ex = _executions(root, result.run_id)
    ids = [t["run_id"] for sid in ("hero:train", "hero:evaluate") for t in ex[sid]["tracking"]]
    code, out = run_cli("runs", result.run_id, "--project", str(root), capsys=capsys)
    assert code == 0 and all(i in out for i in ids), out
    html = (root / "reports" / "hero" / f"{result.run_id}.html").read_text(encoding="utf-8")
    assert "Experiment tracking" in html and all(i in html for i in ids)


@pytest.mark.slow
def test_a_tracking_server_that_is_down_is_a_warning_not_a_failure(tracked):
    """Training again with the server's address pointing nowhere: the stage succeeds, its outputs
    are promoted, and the warning is on its execution record and in `runner runs`."""
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    root, _ = tracked
    spec_file = root / "specs" / "hero.yaml"
    dead = f"http://127.0.0.1:{_free_port()}"
    text = spec_file.read_text()
    spec_file.write_text(text.replace("wandb: {mode: offline, project: hero-tests}", "wandb: false")
                         .replace(text.split('tracking_uri: "')[1].split('"')[0], dead))
    t0 = time.monotonic()
    result = apply([load_spec(spec_file)], ApplyOptions(force=["hero:train"], only=["hero:train"]), QuietReporter())
    assert result.status == "succeeded", [(r.stage_id, r.error) for r in result.results]
    (entry,) = _executions(root, result.run_id)["hero:train"]["tracking"]
    assert entry["backend"] == "mlflow" and not entry["run_id"]
    assert dead in entry["warning"] and "not reachable" in entry["warning"]
    assert (_store(root, "hero:train") / "lora" / "index.json").is_file()
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_default_mlflow_store_is_sqlite_in_the_workspace(tmp_path, monkeypatch):
    """`mlflow: true` without a URI: a SQLite store at .runner/mlflow.db with the artifacts beside
    it (never in the current folder); names from a spec in param keys are made legal."""
    from mlflow.tracking import MlflowClient

    from runner.tracking import StageLog, log_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    ws_dir = tmp_path / "project" / ".runner"
    ws_dir.mkdir(parents=True)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"\x00weights")
    log = StageLog(name="hero:train r1", kind="train", params={"variants": {"wide (r=64)+": {"lora": {"rank": 64}}}},
                   tags={"runner.character": "hero"}, series={"loss": [(1, 0.5), (2, 0.25)]},
                   metrics={"final_loss": 0.25}, artifacts=[(lora, "lora")])
    conf = {"enabled": True, "tracking_uri": None, "experiment": None, "artifacts": True}
    (run,) = log_stage({"mlflow": conf, "tags": {"team": "vision"}}, log, ws_dir)
    assert run.warning is None and run.uri == f"sqlite:///{ws_dir / 'mlflow.db'}" and run.url is None
    client = MlflowClient(tracking_uri=run.uri)
    got = client.get_run(run.run_id)
    assert got.data.params == {"variants.wide _r_64__.lora.rank": "64"}
    assert got.data.tags["team"] == "vision" and client.get_experiment(got.info.experiment_id).name == "hero"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    stored = ws_dir / "mlartifacts" / "hero" / run.run_id / "artifacts" / "lora" / "lora.safetensors"
    assert stored.read_bytes() == b"\x00weights"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
