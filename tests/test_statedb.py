"""state.db at scale: every query a plan and an apply make seeks on an index (EXPLAIN QUERY PLAN
shows no scan of the executions table, nor of runs but in index order under a LIMIT), an older
database gets the indexes when it is opened, and the rows of a run's cached stages are written in
one transaction. The figures at 10k / 100k / 1M rows are in bench/scale/statedb.py."""

from __future__ import annotations

import io
import shutil
import sqlite3

import pytest

import fake_gpu_stages  # noqa: F401  (registers fake_gpu_train / fake_gpu_eval; inert unless enabled)
from runner.core import contract
from runner.engine import workspace as W
from runner.engine.executor import ApplyOptions, apply, plan_estimates, plan_specs
from runner.engine.progress import PlainReporter
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
"""

def kinds() -> contract.Registry:
    """Ingest, the fake GPU stages (run here) and the report: the queries of a real run, in a second."""
    from runner.stages import registry

    builtin = registry()
    return contract.Registry([builtin.get(k) for k in ("ingest", "fake_gpu_train", "fake_gpu_eval", "report")])


OLD_INDEXES = """
CREATE INDEX executions_run ON executions(run_id);
CREATE INDEX executions_stage ON executions(stage_id);
CREATE INDEX executions_learn ON executions(kind, gpu, status, started);
"""


@pytest.fixture()
def batch(project, shared_data, monkeypatch):
    photos = project / "photos"
    photos.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_small.jpg", photos / "a.jpg")
    monkeypatch.setenv("FAKE_GPU_VARIANTS", "a,b")
    monkeypatch.setenv("FAKE_GPU_SLEEP", "0")
    paths = []
    for name in ("hero", "villain", "sidekick"):
        path = project / "specs" / f"{name}.yaml"
        path.write_text(SPEC.format(name=name))
        paths.append(str(path))
    return paths


def run(paths: list[str], **options):
    return apply(load_specs(paths), ApplyOptions(**options), PlainReporter(io.StringIO()), registry=kinds())


def traced(monkeypatch) -> list[str]:
    """Every SQL statement any workspace connection runs from now on (values inlined)."""
    seen: list[str] = []
    connect = sqlite3.connect

    def tracing(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.set_trace_callback(seen.append)
        return db

    monkeypatch.setattr(W.sqlite3, "connect", tracing)
    return seen


def scans(db: sqlite3.Connection, statements: list[str]) -> list[tuple[str, str]]:
    """(statement, plan) of each read or write of executions / runs whose plan scans a table."""
    bad = []
    for q in dict.fromkeys(statements):
        head = q.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE", "DELETE", "WITH") or not any(t in q for t in ("executions", "runs")):
            continue
        detail = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + q).fetchall()]
        for d in detail:
            ordered_limit = "USING" in d and "INDEX" in d and " LIMIT " in q.upper()
            if d.startswith("SCAN") and not ordered_limit:
                bad.append((q, " | ".join(detail)))
    return bad


def test_the_plan_and_apply_queries_all_seek_on_an_index(batch, project, monkeypatch):
    seen = traced(monkeypatch)
    opts = dict(command="test", backend="local")
    first = run(batch, **opts)
    assert first.status == "succeeded"
    # a no-op plan with its estimates, a run that re-runs one stage per spec, a no-op apply
    plan, ws = plan_specs(load_specs(batch), registry=kinds())
    plan_estimates(plan, "modal", ws)
    ws.close()
    assert run(batch, force=["fake_gpu_eval*"], **opts).status == "succeeded"
    assert run(batch, **opts).status == "no-op"
    reads = [q for q in seen if "executions" in q or "runs" in q]
    assert any("FROM executions WHERE kind=" in q for q in reads)  # the estimates' reads were seen
    assert any("status='running'" in q for q in reads)  # and the dead-run check's
    db = sqlite3.connect(project / ".runner" / "state.db")
    try:
        assert scans(db, seen) == []
        # the same statements on the indexes of before: the dead-run check scanned runs (the
        # check can fail)
        db.executescript("".join(f"DROP INDEX {n};" for n in ("executions_run_status", "executions_run_character",
                                                              "executions_tracked", "executions_history",
                                                              "runs_status", "runs_started")) + OLD_INDEXES)
        before = scans(db, seen)
        assert any("status='running'" in q and "SCAN runs" in d for q, d in before), before
    finally:
        db.close()


def test_an_older_database_gets_the_indexes_and_loses_the_narrow_ones(project):
    root = project / ".runner"
    root.mkdir()
    db = sqlite3.connect(root / "state.db")
    db.executescript(W.SCHEMA + OLD_INDEXES)
    db.execute("INSERT INTO executions(run_id, stage_id, kind, status, started) VALUES ('r', 'x:a', 'a', 'cached', 1)")
    db.commit()
    db.close()
    ws = W.Workspace(project)
    try:
        names = {r[0] for r in ws.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"executions_run_status", "executions_run_character", "executions_tracked", "executions_history",
                "runs_status", "runs_started"} <= names
        assert not names & {"executions_run", "executions_stage", "executions_learn"}
        assert [e["stage_id"] for e in ws.executions("r")] == ["x:a"]  # the rows are kept
    finally:
        ws.close()


def test_the_cached_stages_of_a_run_are_one_transaction(batch, project, monkeypatch):
    run(batch, command="test", backend="local")
    seen = traced(monkeypatch)
    noop = run(batch, command="test", backend="local")
    assert noop.status == "no-op" and len(noop.results) == 3 * 6  # ingest, 2 train, 2 eval, report
    inserts = [i for i, q in enumerate(seen) if q.startswith("INSERT INTO executions")]
    assert len(inserts) == 18
    begins = [i for i, q in enumerate(seen) if q.startswith("BEGIN")]
    commits = [i for i, q in enumerate(seen) if q == "COMMIT"]
    assert any(b < inserts[0] and all(inserts[-1] < c for c in commits if c > b) for b in begins)
    assert sum(1 for c in commits if inserts[0] < c < inserts[-1]) == 0
    ws = W.Workspace(project)
    try:  # in the order the stages were taken, as before
        assert [e["stage_id"] for e in ws.executions(noop.run_id)] == [r.stage_id for r in noop.results]
    finally:
        ws.close()
