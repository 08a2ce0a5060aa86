"""The run history tells the truth: a runner killed by SIGKILL is marked killed (with when it was
last seen) by the next runner that looks, and `runner unlock --force` never lets two applies run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.engine.lock import LockHeld, lock_status, unlock, workspace_lock
from runner.engine.workspace import Workspace
import test_engine
from test_engine import runner_cmd, runner_env, wait_for

hero = test_engine.hero  # test_engine's fixture: the tests below take it by name

ROOT = Path(__file__).resolve().parents[1]


def start_slow_apply(hero_spec: Path, tmp_path: Path, name: str = "started") -> tuple[subprocess.Popen, dict]:
    """`runner apply` in a subprocess, stopped inside fake_slow (which waits for a release file)."""
    signal_file = tmp_path / name
    env = runner_env(tmp_path, FAKE_SLOW_SIGNAL=str(signal_file), FAKE_SLOW_RELEASE=str(tmp_path / "never"),
                     CHARACTER_RUNNER_HEARTBEAT_S="0.2")
    proc = subprocess.Popen(runner_cmd("apply", str(hero_spec)), env=env, cwd=hero_spec.parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(signal_file)
    return proc, env


def kill9(proc: subprocess.Popen) -> float:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return time.time()


def run_cli(project: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(runner_cmd(*args), env=runner_env(tmp_path), cwd=project,
                          capture_output=True, text=True, timeout=120)


def db_rows(project: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(project / ".runner" / "state.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("reader", ["runs", "status", "apply"])
@pytest.mark.slow  # 3-6 s each: real runs killed
def test_a_run_killed_by_sigkill_is_marked_killed_by_the_next_runner(hero, tmp_path, reader):
    project = hero.parent.parent
    proc, _ = start_slow_apply(hero, tmp_path)
    time.sleep(0.8)  # a few heartbeats while fake_slow waits
    (status, started, beat), = db_rows(project, "SELECT status, started, heartbeat FROM runs")
    assert status == "running" and beat > started  # the heartbeat moves while the stage runs
    killed_at = kill9(proc)
    assert db_rows(project, "SELECT status FROM runs") == [("running",)]  # nobody has looked yet

    r = run_cli(project, tmp_path, reader, *((str(hero),) if reader == "apply" else ("--project", str(project))))
    assert r.returncode == 0, r.stderr
    runs = {row[0]: row[1:] for row in db_rows(project, "SELECT id, status, finished, heartbeat FROM runs")}
    killed = [rid for rid, (st, _, _) in runs.items() if st == "killed"]
    assert len(killed) == 1 and all(st != "running" for st, _, _ in runs.values())
    _, finished, seen = runs[killed[0]]
    assert finished == seen and killed_at - 2.0 < seen <= killed_at  # last seen just before the kill
    stages = dict(db_rows(project, f"SELECT stage_id, status FROM executions WHERE run_id='{killed[0]}'"))
    assert stages["hero:fake_slow"] == "killed" and stages["hero:ingest"] == "succeeded"
    if reader == "runs":
        assert "killed" in r.stdout and "last seen" in r.stdout
    if reader == "status":
        assert f"{killed[0]} killed (process died; last seen" in r.stdout
    if reader == "apply":
        assert f"run {killed[0]} was killed" in r.stdout + r.stderr

    listing = run_cli(project, tmp_path, "runs", "--project", str(project), "--json")
    by_id = {row["id"]: row for row in json.loads(listing.stdout)}
    assert by_id[killed[0]]["status"] == "killed" and by_id[killed[0]]["last_seen"] == seen
    detail = run_cli(project, tmp_path, "runs", killed[0], "--project", str(project))
    assert "hero:fake_slow" in detail.stdout and "killed" in detail.stdout and "died" in detail.stdout


def test_the_report_timeline_lists_the_killed_run(hero, tmp_path):
    project = hero.parent.parent
    proc, _ = start_slow_apply(hero, tmp_path)
    kill9(proc)
    r = run_cli(project, tmp_path, "apply", str(hero))
    assert r.returncode == 0, r.stderr
    (killed,), = db_rows(project, "SELECT id FROM runs WHERE status='killed'")
    html = (project / "reports" / "hero" / "latest.html").read_text()
    timeline = html[html.index('id="timeline"'):]
    assert "Earlier runs that were killed" in timeline and killed in timeline
    assert "<code>hero:fake_slow</code>" in timeline[timeline.index(killed):]
    # the next report, after a run that ended normally, no longer lists it
    (project / "specs" / "hero.yaml").write_text(hero.read_text().replace("class_word: man", "class_word: woman"))
    r = run_cli(project, tmp_path, "apply", str(hero))
    assert r.returncode == 0, r.stderr
    assert killed not in (project / "reports" / "hero" / "latest.html").read_text()


def test_a_live_run_is_not_marked_killed_by_readers(hero, tmp_path):
    project = hero.parent.parent
    proc, _ = start_slow_apply(hero, tmp_path)
    try:
        for args in (("runs", "--project", str(project)), ("status", "--project", str(project))):
            r = run_cli(project, tmp_path, *args)
            assert r.returncode == 0, r.stderr
            assert "running" in r.stdout and "killed" not in r.stdout
        assert db_rows(project, "SELECT status FROM runs") == [("running",)]
        assert dict(db_rows(project, "SELECT stage_id, status FROM executions"))["hero:fake_slow"] == "running"
        assert proc.poll() is None
    finally:
        kill9(proc)


@pytest.mark.parametrize("force", [False, True])
def test_unlock_never_takes_a_live_holders_lock(hero, tmp_path, force):
    project = hero.parent.parent
    proc, _ = start_slow_apply(hero, tmp_path)
    try:
        r = run_cli(project, tmp_path, "unlock", "--project", str(project), *(("--force",) if force else ()))
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"pid {proc.pid}" in r.stderr and "live process" in r.stderr and "Traceback" not in r.stderr
        assert lock_status(project / ".runner").held
        # a second apply still finds the workspace busy: never two applies at once
        second = run_cli(project, tmp_path, "apply", str(hero))
        assert second.returncode == 3 and f"locked by pid {proc.pid}" in second.stderr
        assert proc.poll() is None
    finally:
        kill9(proc)
    # once the holder is dead, unlock clears its record and marks its run killed
    r = run_cli(project, tmp_path, "unlock", "--project", str(project), *(("--force",) if force else ()))
    assert r.returncode == 0, r.stderr
    assert "lock cleared" in r.stdout and "marked killed" in r.stdout
    assert db_rows(project, "SELECT status FROM runs") == [("killed",)]


def test_unlock_names_a_lock_kept_by_a_child_of_a_dead_holder(tmp_path):
    """The recorded holder is gone but a process it forked still has the lock open: refused."""
    ws_dir = tmp_path / ".runner"
    code = (
        "import os, sys, time; sys.path.insert(0, %r); from pathlib import Path\n"
        "from runner.engine.lock import workspace_lock\n"
        "cm = workspace_lock(Path(%r), command='parent'); cm.__enter__()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(child, flush=True); os._exit(0)\n"
    ) % (str(ROOT), str(ws_dir))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    child = int(p.stdout.strip())
    holder = json.loads((ws_dir / "lock").read_text())
    try:
        with pytest.raises(LockHeld) as exc:
            unlock(ws_dir, force=True)
        assert f"pid {holder['pid']} is gone" in str(exc.value) and "fuser" in str(exc.value)
        assert lock_status(ws_dir).held
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while lock_status(ws_dir).held:  # the kernel frees it once the child is gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "lock cleared" in unlock(ws_dir)


def test_dead_runs_in_one_workspace_api(tmp_path):
    """mark_dead_runs: the live holder's run stays running; others become killed at their last beat."""
    ws = Workspace(tmp_path)
    a = ws.start_run("runner apply a", [])
    b = ws.start_run("runner apply b", [])
    ws.db.execute("UPDATE runs SET heartbeat=?, pid=? WHERE id=?", (123.0, 4242, a))
    ws.db.execute("INSERT INTO executions(run_id, stage_id, character, status, started) VALUES (?,?,?,?,?)",
                  (a, "x:train", "x", "running", 100.0))
    me = (os.uname().nodename, os.getpid())
    assert [r for r, _ in ws.mark_dead_runs(lambda host, pid: (host, pid) == me)] == [a]
    runs = {r["id"]: r for r in ws.runs()}
    assert runs[a]["status"] == "killed" and runs[a]["finished"] == 123.0 and runs[b]["status"] == "running"
    (status, duration, error), = ws.db.execute("SELECT status, duration, error FROM executions").fetchall()
    assert status == "killed" and duration == 23.0 and "pid 4242" in error
    with workspace_lock(ws.dir, command="t"):
        assert [r for r, _ in ws.mark_dead_runs()] == [b]
    ws.close()


def test_an_old_state_database_gains_the_heartbeat_column(tmp_path):
    (tmp_path / ".runner").mkdir()
    db = sqlite3.connect(tmp_path / ".runner" / "state.db")
    db.execute("CREATE TABLE runs(id TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT, command TEXT,"
               " specs TEXT, summary TEXT, host TEXT, pid INTEGER)")
    db.execute("INSERT INTO runs VALUES ('old', 1.0, NULL, 'running', 'c', '[]', NULL, 'h', 1)")
    db.commit()
    db.close()
    ws = Workspace(tmp_path)
    assert ws.settle_dead_runs() == [("old", 1.0)]
    assert ws.runs()[0]["status"] == "killed"
    ws.close()


@pytest.mark.parametrize("beat,ends,seen", [(None, [105.0], 105.0), (110.0, [105.0], 110.0),
                                            (101.0, [103.0, 108.5], 108.5), (None, [], 100.0)])
def test_a_killed_run_is_last_seen_at_its_last_sign_of_life(tmp_path, beat, ends, seen):
    """A stage the run finished after its last heartbeat (or before the first) is a sign of life:
    'last seen' and the killed stage's duration count from the later of the two."""
    ws = Workspace(tmp_path)
    run = ws.start_run("runner apply a", [])
    ws.db.execute("UPDATE runs SET started=?, heartbeat=? WHERE id=?", (100.0, beat, run))
    t = 100.0
    for i, end in enumerate(ends):
        ws.db.execute("INSERT INTO executions(run_id, stage_id, character, status, started, duration)"
                      " VALUES (?,?,?,?,?,?)", (run, f"x:s{i}", "x", "succeeded", t, end - t))
        t = end
    ws.db.execute("INSERT INTO executions(run_id, stage_id, character, status, started) VALUES (?,?,?,?,?)",
                  (run, "x:train", "x", "running", t))
    with workspace_lock(ws.dir, command="t"):
        assert ws.mark_dead_runs() == [(run, seen)]
    assert {r["id"]: r for r in ws.runs()}[run]["finished"] == seen
    (duration,), = ws.db.execute("SELECT duration FROM executions WHERE stage_id='x:train'").fetchall()
    assert duration == seen - t
    ws.close()
