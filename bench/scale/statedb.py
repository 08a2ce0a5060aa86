"""bench/scale/statedb.py: the state database's queries at 10k / 100k / 1M execution rows (issue 18).

    python bench/scale/statedb.py [--rows 10000,100000,1000000] [--repeat 5] [--work DIR]

For each size, one generated history (runs of 100 executions: 10 characters x 10 stage kinds;
seven runs in ten are no-op applies whose rows are all ``cached``, the rest ran a share of their
stages, on Modal GPUs or here) is written twice: with the indexes of before this change
(executions_run, executions_stage, executions_learn) and with today's (runner.engine.workspace
INDEXES, built on the existing rows as an older database is migrated: that time is reported too).

Then the reads and writes a no-op plan and a run make are timed on both, interleaved, ``--repeat``
times, through today's :class:`runner.engine.workspace.Workspace` (the old database is opened
without migrating it); where this change also rewrote the query, "before" runs the old one:

- plan: the estimates' history of 12 kinds on both backends (before: one ROW_NUMBER() window query
  per backend; today: :func:`runner.engine.cost.load_history`'s bounded index seeks);
- apply: the dead-run check (runs still marked running), the newest run with a finished stage;
- report: its character's rows of the run (before: the whole run's, filtered in Python), the
  tracker runs of a cached stage, the last 50 runs;
- apply: writing a run's 1,000 cached rows (before: one autocommitted INSERT each; today: one
  transaction, :meth:`Workspace.record_executions`).

Prints one table (median ms, min-max, before/after ratio) and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from runner.engine import cost  # noqa: E402
from runner.engine.workspace import INDEXES, SCHEMA, ExecutionRecord, Workspace  # noqa: E402

KINDS = ["ingest", "analyze", "curate", "caption", "train", "evaluate", "video_identity", "video_clips",
         "storyboard", "video", "export", "report"]
GPU_KINDS = {"train", "evaluate", "storyboard", "video", "video_identity"}
GPUS = ["A10G", "L40S", "A100-80GB", "H100"]
PER_RUN = 100
OLD_INDEXES = """
CREATE INDEX executions_run ON executions(run_id);
CREATE INDEX executions_stage ON executions(stage_id);
CREATE INDEX executions_learn ON executions(kind, gpu, status, started);
"""
OLD_HISTORY = (  # runner/engine/cost.py load_history before this change
    "SELECT kind, gpu, stage_id, duration, metrics FROM ("
    " SELECT kind, COALESCE(gpu, ?) AS gpu, stage_id, duration, metrics, ROW_NUMBER() OVER"
    "  (PARTITION BY kind, gpu ORDER BY started DESC) AS n FROM executions"
    "  WHERE kind IN ({marks}) AND status='succeeded' AND backend=?)"
    " WHERE n <= ? ORDER BY kind, gpu, n")


def generate(path: Path, n: int, seed: int = 0) -> None:
    """A state.db with ``n`` execution rows and one run per 100 of them (no indexes yet)."""
    rng = random.Random(seed)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    t0 = 1.7e9
    for r in range(n // PER_RUN):
        run_id = f"run-{r:07d}"
        started = t0 + r * 600.0
        noop = rng.random() < 0.7
        db.execute("INSERT INTO runs(id, started, finished, status, command, specs, summary, host, pid, heartbeat)"
                   " VALUES (?,?,?,?,?,?,?,?,?,?)", (run_id, started, started + 60, "no-op" if noop else "succeeded",
                                                     "runner apply specs/", "[]", "{}", "bench", 1, started + 60))
        first = rng.randrange(0, max(1, n // 1000))  # a batch of ten characters of the fleet
        rows = []
        for i in range(PER_RUN):
            char, kind = f"c{first + i // 10:06d}", KINDS[i % 10 if i % 10 < 9 else rng.randrange(9, 12)]
            ran = not noop and rng.random() < 0.3
            status = ("failed" if rng.random() < 0.03 else "succeeded") if ran else "cached"
            remote = ran and kind in GPU_KINDS and rng.random() < 0.6
            metrics = json.dumps({"work_units": 10, "work_unit": "clip"} if status == "succeeded" else {})
            tracked = status == "succeeded" and rng.random() < 0.02
            tracking = '[{"tracker": "mlflow", "run_id": "x"}]' if tracked else None
            rows.append((run_id, f"{char}:{kind}", kind, char, f"k{rng.randrange(10 ** 9):09d}", "run" if ran else
                         "cached", "", status, started + i, rng.uniform(5, 600) if ran else 0.0, metrics, 0.1, "USD",
                         rng.choice(GPUS) if remote else None, "modal" if remote else "local", None, None, None,
                         tracking))
        db.executemany("INSERT INTO executions(run_id, stage_id, kind, character, key, action, reason, status, started,"
                       " duration, metrics, cost, currency, gpu, backend, remote_call_id, error, log_path, tracking)"
                       " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("COMMIT")
    db.close()


def workspace(project: Path, migrate: bool) -> Workspace:
    """Today's Workspace on ``project``; without ``migrate`` its database is opened as it is."""
    ws = Workspace(project)
    if not migrate:  # as Workspace.db opens it, less the schema script
        ws._db = sqlite3.connect(ws.dir / "state.db", timeout=30, isolation_level=None)
        ws._db.execute("PRAGMA journal_mode=WAL")
        ws._db.execute("PRAGMA synchronous=NORMAL")
    return ws


def old_history(ws: Workspace) -> None:
    marks = ",".join("?" * len(KINDS))
    for backend in ("modal", "local"):
        ws.db.execute(OLD_HISTORY.format(marks=marks), (cost.LOCAL_DEVICE, *KINDS, backend, 10)).fetchall()


def new_history(ws: Workspace) -> None:
    for backend in ("modal", "local"):
        cost.load_history(ws.db, KINDS, backend=backend)


def cached_rows(run_id: str, n: int = 1000) -> list[ExecutionRecord]:
    return [ExecutionRecord(run_id, f"x{i:05d}:ingest", "ingest", f"x{i:05d}", f"k{i}", "cached", "", "cached",
                            time.time(), 0.0, {}, 0.0, "USD", None, "local", None, None, None) for i in range(n)]


def operations(sample: dict[str, str]) -> list[tuple[str, Callable[[Workspace], Any], Callable[[Workspace], Any]]]:
    """(name, before, after) of each timed operation."""
    run_id, char, stage, key = sample["run"], sample["character"], sample["stage"], sample["key"]
    seq = iter(range(10 ** 6))
    return [
        ("plan: estimates' history (12 kinds, 2 backends)", old_history, new_history),
        ("apply: dead-run check", lambda ws: ws.mark_dead_runs(lambda h, p: True),
         lambda ws: ws.mark_dead_runs(lambda h, p: True)),
        ("runs / report: newest run with a finished stage", lambda ws: ws.last_run_id(), lambda ws: ws.last_run_id()),
        ("report: its character's rows of a run",
         lambda ws: [e for e in ws.executions(run_id) if e["character"] == char],
         lambda ws: ws.executions(run_id, char)),
        ("report: tracker runs of a cached stage", lambda ws: ws.tracked_runs(stage, key),
         lambda ws: ws.tracked_runs(stage, key)),
        ("report: the last 50 runs", lambda ws: ws.runs(limit=50), lambda ws: ws.runs(limit=50)),
        ("apply: write 1,000 cached rows",
         lambda ws: [ws.record_execution(r) for r in cached_rows(f"bench-{next(seq)}")],
         lambda ws: ws.record_executions(cached_rows(f"bench-{next(seq)}"))),
    ]


def bench_size(work: Path, n: int, repeat: int) -> dict[str, Any]:
    base = work / f"rows-{n}"
    before, after = base / "before", base / "after"
    for p in (before, after):
        shutil.rmtree(p, ignore_errors=True)
        (p / ".runner").mkdir(parents=True)
        (p / "runner.toml").write_text("")
    t = time.perf_counter()
    generate(before / ".runner" / "state.db", n)
    gen_s = time.perf_counter() - t
    shutil.copy(before / ".runner" / "state.db", after / ".runner" / "state.db")
    db = sqlite3.connect(before / ".runner" / "state.db")
    db.executescript(OLD_INDEXES)
    db.close()
    t = time.perf_counter()
    db = sqlite3.connect(after / ".runner" / "state.db")
    db.executescript(OLD_INDEXES + INDEXES)  # an older database opened by today's runner
    db.close()
    migrate_s = time.perf_counter() - t
    ws = {"before": workspace(before, False), "after": workspace(after, True)}
    sample_run = f"run-{(n // PER_RUN) // 2:07d}"
    row = ws["after"].db.execute("SELECT character, stage_id, key FROM executions WHERE run_id=? LIMIT 1",
                                 (sample_run,)).fetchone()
    sample = {"run": sample_run, "character": row[0], "stage": row[1], "key": row[2]}
    ops = operations(sample)
    times: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name, _, _ in ops}
    for rep in range(repeat):
        for name, fb, fa in ops:
            order = (("before", fb), ("after", fa)) if rep % 2 == 0 else (("after", fa), ("before", fb))
            for variant, fn in order:
                t = time.perf_counter()
                fn(ws[variant])
                times[name][variant].append((time.perf_counter() - t) * 1000)
    for w in ws.values():
        w.close()
    return {"rows": n, "generate_s": round(gen_s, 1), "migrate_s": round(migrate_s, 2), "sample": sample,
            "ms": times}


def summary(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="10000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "statedb")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.rows.split(",")):
        res = bench_size(args.work, n, args.repeat)
        results.append(res)
        print(f"\n{n:,} executions (generated in {res['generate_s']} s; today's indexes built on them in "
              f"{res['migrate_s']} s)")
        print(f"  {'operation':<50} {'before ms (min-max)':>24} {'after ms (min-max)':>22} {'before/after':>14}")
        for name, t in res["ms"].items():
            ratios = sorted(b / a for b, a in zip(t["before"], t["after"]) if a > 0)
            print(f"  {name:<50} {summary(t['before']):>24} {summary(t['after']):>22} "
                  f"{statistics.median(ratios):>6.1f}x ({ratios[0]:.1f}-{ratios[-1]:.1f})")
    args.work.mkdir(parents=True, exist_ok=True)
    out = {"machine": platform.platform(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
           "repeat": args.repeat, "results": results}
    (args.work / "results.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
