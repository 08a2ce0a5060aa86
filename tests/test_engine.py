"""Engine guarantees across processes: kill -9 leaves nothing half-written, the lock, unlock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.engine.lock import LockHeld, lock_status, unlock, workspace_lock

TESTS = Path(__file__).resolve().parent

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  traits: {fixed: [tall], variable: [hat]}
dataset:
  sources:
    - images: ../photos
"""


@pytest.fixture()
def hero(project, shared_data):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    spec = project / "specs" / "hero.yaml"
    spec.write_text(SPEC)
    return spec


def runner_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CHARACTER_RUNNER_STAGE_PLUGINS"] = "fake_stages"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    # keep the real (heavier) pipeline stages out of this engine test: only ingest, report, fakes
    env["FAKE_STAGES_ONLY_KINDS"] = "ingest,report,fake_a,fake_b,fake_c,fake_slow"
    env.update(extra)
    return env


def runner_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *args]


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def store_entries(project: Path) -> dict[str, dict]:
    out = {}
    store = project / ".runner" / "store"
    for d in store.iterdir() if store.exists() else []:
        m = d / "_manifest.json"
        if m.exists():
            out[json.loads(m.read_text())["stage_id"]] = {"dir": d}
    return out


def test_kill_9_leaves_nothing_half_written_and_next_apply_finishes(hero, tmp_path):
    project = hero.parent.parent
    signal_file = tmp_path / "started"
    env = runner_env(tmp_path, FAKE_SLOW_SIGNAL=str(signal_file), FAKE_SLOW_RELEASE=str(tmp_path / "never"))
    proc = subprocess.Popen(runner_cmd("apply", str(hero)), env=env, cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(signal_file)
        # fake_slow has written half of its output into its tmp folder and is waiting
        partial = list((project / ".runner" / "tmp").rglob("part1.txt"))
        assert partial, "the stage should be mid-write"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = store_entries(project)
    assert "hero:ingest" in done and "hero:fake_slow" not in done
    assert all((e["dir"] / "_manifest.json").exists() for e in done.values())
    # the lock was released by the kernel; the next apply cleans up and finishes the work
    r = subprocess.run(runner_cmd("apply", str(hero)), env=runner_env(tmp_path), cwd=project,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hero:ingest" in r.stdout and "cached" in r.stdout
    done = store_entries(project)
    slow = done["hero:fake_slow"]["dir"] / "out"
    assert (slow / "part1.txt").exists() and (slow / "part2.txt").exists()
    assert not any((project / ".runner" / "tmp").iterdir())


def test_second_apply_waits_or_exits_with_holder(hero, tmp_path):
    project = hero.parent.parent
    ws_dir = project / ".runner"
    with workspace_lock(ws_dir, command="runner apply (test holder)"):
        info = lock_status(ws_dir)
        assert info.held and info.holder["pid"] == os.getpid()
        r = subprocess.run(runner_cmd("apply", str(hero)), env=runner_env(tmp_path), cwd=project,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3
        assert f"locked by pid {os.getpid()}" in r.stderr and "runner apply (test holder)" in r.stderr
        assert "Traceback" not in r.stderr
        # a waiting apply gets the lock once the holder lets go
        proc = subprocess.Popen(runner_cmd("apply", "--wait", "60", str(hero)), env=runner_env(tmp_path),
                                cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not lock_status(ws_dir).held


def test_lock_of_a_dead_holder_is_taken_over(tmp_path):
    ws_dir = tmp_path / ".runner"
    code = (
        "import os, sys; sys.path.insert(0, %r); from runner.engine.lock import workspace_lock\n"
        "cm = workspace_lock(__import__('pathlib').Path(%r), command='doomed'); cm.__enter__(); os._exit(0)"
    ) % (str(Path(__file__).resolve().parents[1]), str(ws_dir))
    subprocess.run([sys.executable, "-c", code], check=True)
    info = lock_status(ws_dir)
    assert not info.held and info.holder.get("command") == "doomed"
    with workspace_lock(ws_dir, command="next") as holder:
        assert holder["previous"]["command"] == "doomed"


def test_unlock(tmp_path):
    ws_dir = tmp_path / ".runner"
    assert unlock(ws_dir) == "no lock to clear"
    with workspace_lock(ws_dir, command="busy"):
        with pytest.raises(LockHeld):
            unlock(ws_dir)
    (ws_dir / "lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "command": "stale"}))
    assert "lock cleared" in unlock(ws_dir)
    # the record is cleared; the file stays (deleting it would let two holders lock two files)
    assert (ws_dir / "lock").exists() and (ws_dir / "lock").read_text() == ""


def test_interrupted_stage_is_recorded_and_cleaned(hero, tmp_path):
    project = hero.parent.parent
    signal_file = tmp_path / "started"
    env = runner_env(tmp_path, FAKE_SLOW_SIGNAL=str(signal_file), FAKE_SLOW_RELEASE=str(tmp_path / "never"))
    proc = subprocess.Popen(runner_cmd("apply", str(hero)), env=env, cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(signal_file)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not any((project / ".runner" / "tmp").iterdir())
    r = subprocess.run(runner_cmd("runs", "--project", str(project)), env=runner_env(tmp_path),
                       capture_output=True, text=True)
    assert "interrupted" in r.stdout
