"""The worker entry point itself (what the Modal function calls), run as a subprocess against a
folder standing in for the volume: blobs in, blobs and a result manifest out, reuse, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runner.backends.volume import FolderVolume, blob_relpath, sha256_file
from runner.backends.worker import billed_seconds

TESTS = Path(__file__).resolve().parent


def call_worker(vol: Path, tmp: Path, kind: str, config: dict, manifest: dict, env: dict | None = None):
    req = tmp / "req.json"
    out = tmp / "out.json"
    out.unlink(missing_ok=True)
    req.write_text(json.dumps({"kind": kind, "config": config, "manifest": manifest}))
    e = dict(os.environ)
    e.update(CHARACTER_RUNNER_STAGE_PLUGINS="fake_gpu_stages",
             PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), e.get("PYTHONPATH", "")]), **(env or {}))
    r = subprocess.run([sys.executable, "-m", "runner.backends.worker", "--request", str(req),
                        "--volume-root", str(vol), "--result", str(out)], env=e, capture_output=True, text=True,
                       timeout=120)
    return r, (json.loads(out.read_text()) if out.is_file() else None)


def test_worker_materializes_inputs_stores_outputs_and_reuses_results(tmp_path):
    vol = tmp_path / "vol"
    src = tmp_path / "img.png"
    src.write_bytes(b"\x89PNG fake image bytes")
    sha = sha256_file(src)
    FolderVolume(vol).upload({sha: src})
    manifest = {"stage_id": "hero:fake_gpu_train[a]", "character": "hero", "key": "k1" * 32, "run_id": "r",
                "inputs": {"images": {"type": "dir", "files": [["images/x.png", sha, src.stat().st_size]],
                                      "meta": {}, "digest": "d", "fileset": False}}}
    config = {"variant": "a", "steps": 2, "sleep": 0.0, "note": ""}
    r, result = call_worker(vol, tmp_path, "fake_gpu_train", config, manifest)
    assert r.returncode == 0, r.stderr
    assert result["status"] == "succeeded" and result["attempts"] == 1 and result["billed_s"] > 0
    files = {rel: (s, size) for rel, s, size in result["files"]}
    assert set(files) == {"lora/index.json", "lora/shared.bin"}
    assert result["outputs"] == {"lora": {"path": "lora", "type": "dir", "meta": {}}}
    for s, size in files.values():
        blob = vol / blob_relpath(s)
        assert blob.is_file() and blob.stat().st_size == size and sha256_file(blob) == s
    index = json.loads((vol / blob_relpath(files["lora/index.json"][0])).read_text())
    assert index["images"] == ["x.png"]  # the input was materialized from its blob
    assert [m["name"] for m in result["metric_history"]] == ["loss", "loss"]
    assert (vol / "results" / f"{'k1' * 32}.json").is_file()
    assert not (vol / "scratch" / ("k1" * 32)).exists() and not (vol / "work" / ("k1" * 32)).exists()
    # the same key again (a retry after the answer was lost): the stored result, no new attempt
    r, again = call_worker(vol, tmp_path, "fake_gpu_train", config, manifest)
    assert again["reused"] is True and again["files"] == result["files"]
    attempts = (vol / "attempts" / f"{'k1' * 32}.jsonl").read_text().splitlines()
    assert len(attempts) == 2  # one start, one end


def test_worker_reports_stage_errors_and_crashes_differently(tmp_path):
    vol = tmp_path / "vol"
    manifest = {"stage_id": "hero:fake_gpu_train[FAILx]", "character": "hero", "key": "k2" * 32, "inputs": {}}
    r, result = call_worker(vol, tmp_path, "fake_gpu_train", {"variant": "FAILx", "steps": 2, "sleep": 0.0}, manifest)
    # a StageError is the user's problem: a failed manifest (not retried), with its hint
    assert r.returncode == 0 and result["status"] == "failed"
    assert "asked to fail" in result["error"] and result["hint"] == "rename the variant"
    assert not (vol / "results" / f"{'k2' * 32}.json").exists()  # failures are not cached
    # a missing input blob is a crash: non-zero exit, so a retry policy applies
    manifest = {"stage_id": "hero:fake_gpu_train[b]", "character": "hero", "key": "k3" * 32,
                "inputs": {"images": {"type": "dir", "files": [["x.png", "0" * 64, 3]], "meta": {}}}}
    r, result = call_worker(vol, tmp_path, "fake_gpu_train", {"variant": "b", "steps": 2, "sleep": 0.0}, manifest)
    assert r.returncode != 0 and result is None and "missing from the volume" in r.stderr


def test_billed_seconds_count_preempted_attempts_until_the_retry():
    attempts = [{"event": "start", "attempt": 1, "t": 100.0},  # preempted: no end
                {"event": "start", "attempt": 2, "t": 160.0},
                {"event": "end", "attempt": 2, "t": 200.0}]
    assert billed_seconds(attempts, now=500.0) == (100.0, 2)
    assert billed_seconds(attempts[:1], now=130.0) == (30.0, 1)
