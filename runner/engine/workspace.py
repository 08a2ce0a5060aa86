"""The workspace: ``<project>/.runner`` with the state database, artifact store, scratch and logs.

Layout::

    .runner/state.db          SQLite: runs, stage executions, current key per stage, stat cache
                              (a run's heartbeat column says when its process was last seen;
                              runs and executions of a process that died are marked killed)
    .runner/lock              who holds the workspace (see lock.py)
    .runner/store/<key>/      promoted stage outputs, one folder per cache key, never modified
    .runner/tmp/              stage output folders while a stage runs (cleared at the next apply)
    .runner/scratch/<key>/    resumable state of long stages (checkpoints), kept across crashes
    .runner/logs/<run-id>/    one structured JSONL log per stage execution
"""

from __future__ import annotations

import functools
import json
import marshal
import os
import re
import shutil
import socket
import sqlite3
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from runner.core import contract
from runner.core.hashing import HashIndex, file_sha256, stat_signature
from runner.engine.lock import pid_alive, probe_lock
from runner.paths import iter_tree, workspace_dir
from runner.plan.planner import FileSetDigest, PriorRecord, sha256_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
  id TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT, command TEXT,
  specs TEXT, summary TEXT, host TEXT, pid INTEGER, heartbeat REAL);
CREATE TABLE IF NOT EXISTS executions(
  id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, stage_id TEXT, kind TEXT, character TEXT,
  key TEXT, action TEXT, reason TEXT, status TEXT, started REAL, duration REAL, metrics TEXT,
  cost REAL, currency TEXT, gpu TEXT, backend TEXT, remote_call_id TEXT, error TEXT,
  log_path TEXT, tracking TEXT);
CREATE TABLE IF NOT EXISTS stage_current(
  stage_id TEXT PRIMARY KEY, key TEXT, components TEXT, run_id TEXT, finished REAL);
CREATE TABLE IF NOT EXISTS filesets(digest TEXT PRIMARY KEY, listing TEXT);
CREATE TABLE IF NOT EXISTS stat_blob(root TEXT PRIMARY KEY, data BLOB);
"""

# The indexes every query of a plan and an apply seeks on, so none reads a share of the
# executions table that grows with its size (a million rows: a year of ride-day batches; see
# bench/scale/statedb.py): a run's rows of one status (the dead-run check, the newest run with a
# finished stage) and of one character (its report), the tracked rows of one stage and key (the
# tracker runs of a cached stage; a partial index: most rows are not tracked), the latest
# successful runs of a kind on one GPU (the plan's estimates), runs by status and by start.
# Created on every open (IF NOT EXISTS: the migration of an older database, once); the older,
# narrower indexes these replace are dropped.
INDEXES = """
CREATE INDEX IF NOT EXISTS executions_run_status ON executions(run_id, status);
CREATE INDEX IF NOT EXISTS executions_run_character ON executions(run_id, character);
CREATE INDEX IF NOT EXISTS executions_tracked ON executions(stage_id, key) WHERE tracking IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_history ON executions(kind, backend, status, gpu, started DESC);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS runs_started ON runs(started);
DROP INDEX IF EXISTS executions_run;
DROP INDEX IF EXISTS executions_stage;
DROP INDEX IF EXISTS executions_learn;
"""

MANIFEST = "_manifest.json"
# Seconds between two writes of the stat caches while a plan hashes files it has not seen.
DIGEST_FLUSH_S = 10.0

# Seconds between two "still alive" writes of a running apply (runs.heartbeat).
HEARTBEAT_S = float(os.environ.get("CHARACTER_RUNNER_HEARTBEAT_S", "5"))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def file_digest(path: Path) -> str:
    """Content digest of a file (monkeypatched in tests to count reads)."""
    return file_sha256(path)


@dataclass
class ExecutionRecord:
    run_id: str
    stage_id: str
    kind: str
    character: str
    key: str
    action: str
    reason: str
    status: str
    started: float
    duration: float
    metrics: dict[str, Any]
    cost: float | None
    currency: str
    gpu: str | None
    backend: str
    remote_call_id: str | None
    error: str | None
    log_path: str | None


class Workspace:
    def __init__(self, project_root: Path) -> None:
        self.project_root = project_root.resolve()
        self.dir = workspace_dir(self.project_root)
        self.store_dir = self.dir / "store"
        self.tmp_dir = self.dir / "tmp"
        self.scratch_root = self.dir / "scratch"
        self.logs_dir = self.dir / "logs"
        self._db: sqlite3.Connection | None = None
        self._stat_entries: dict[str, dict[str, Any]] = {}  # root -> its stat cache, loaded once
        self._dirty_roots: set[str] = set()  # roots whose stat cache changed since flush_digests
        self._flushed_at = time.monotonic()
        self._current: dict[str, tuple] | None = None  # stage id -> (key, run id, finished), read once

    # ------------------------------------------------------------------ db
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.dir / "state.db", timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            _add_missing_columns(db, "runs", {"heartbeat": "REAL"})
            _add_missing_columns(db, "executions", {"tracking": "TEXT"})
            db.executescript(INDEXES)
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self.flush_digests()
            self._db.close()
            self._db = None

    def exists(self) -> bool:
        return (self.dir / "state.db").exists()

    # ------------------------------------------------------------------ PlanState
    def last_success(self, stage_id: str) -> PriorRecord | None:
        """The stage's current key (the last successful execution's). Every stage's is read in one
        query at the first call (10,000 stages: one query, not 10,000), kept up to date by
        set_current; its components are read only when asked for."""
        if self._current is None:
            self._current = {r[0]: r[1:] for r in self.db.execute(
                "SELECT stage_id, key, run_id, finished FROM stage_current")}
        row = self._current.get(stage_id)
        if row is None:
            return None
        return PriorRecord(key=row[0], components_json=lambda: self._components_of(stage_id),
                           run_id=row[1], finished_at=row[2])

    def _components_of(self, stage_id: str) -> str:
        row = self.db.execute("SELECT components FROM stage_current WHERE stage_id=?", (stage_id,)).fetchone()
        return row[0] if row else "{}"

    def store_path(self, key: str) -> Path:
        return self.store_dir / key

    def store_has(self, key: str) -> bool:
        # os.path, not pathlib: a no-op plan of 10,000 stages asks 10,000 times
        return os.path.isfile(os.path.join(self.store_dir, key, MANIFEST))

    def scratch_dir(self, key: str) -> Path:
        return self.scratch_root / key

    def fileset_listing(self, digest: str) -> dict[str, str] | None:
        row = self.db.execute("SELECT listing FROM filesets WHERE digest=?", (digest,)).fetchone()
        return dict(json.loads(row[0])) if row else None

    # ------------------------------------------------------------------ FileDigester
    def digest_fileset(self, ref: contract.FileSetRef) -> FileSetDigest:
        """Digest a set of files, re-reading only files whose (size, mtime, inode) changed.

        The stat cache of one root is a single marshalled row: loading 10,000 entries this way is
        an order of magnitude faster than 10,000 SQLite rows, and a no-op plan is dominated by it.
        It is loaded once per root and process; file sets sharing a root (one video file each of a
        folder of ride videos) each replace only their own files' entries, never the others'.
        """
        root = ref.root if isinstance(ref.root, Path) else Path(ref.root)
        root_key = str(root)
        old = self._stat_root(root_key)
        files = self._unchanged_file(root_key, old, ref)
        if files is None:
            files = self._scan_and_hash(root, root_key, old, ref)
        # canonical_json(files) without its conversion pass: the listing is (str, str) pairs already
        # (the same text, so the same digest; 100,000 images cost a second less)
        digest = sha256_text(json.dumps(files, separators=(",", ":"), ensure_ascii=False))
        return FileSetDigest(digest=digest, files=tuple(files), root=root)

    @staticmethod
    def _unchanged_file(root_key: str, old: dict[str, Any], ref: contract.FileSetRef) -> list[tuple[str, str]] | None:
        """The listing of a file set naming one file of a folder (a ride video) whose stat signature
        is the cached one: one stat, nothing else (10,000 of them in a ride day's no-op plan). None
        for anything else: the general path decides."""
        names = None if ref.recursive else _literal_names(ref.patterns)
        if names is None or len(names) != 1 or names[0] not in old:
            return None
        try:
            st = os.stat(os.path.join(root_key, names[0]))
        except OSError:
            return None
        hit = old[names[0]]
        if not stat.S_ISREG(st.st_mode) or tuple(hit[:3]) != stat_signature(st):
            return None
        return [(names[0], hit[3])]

    def _scan_and_hash(self, root: Path, root_key: str, old: dict[str, Any],
                       ref: contract.FileSetRef) -> list[tuple[str, str]]:
        """The sorted (relative path, sha256) listing of ``ref``, re-reading only files whose stat
        signature changed, and the root's stat cache brought up to date (written at flush_digests)."""
        # file_digest is looked up at call time: tests replace it to count reads
        index = HashIndex(old, hasher=lambda path: file_digest(Path(path)))
        files = sorted((rel, index.sha256(rel, full, st)) for rel, full, st in _scan(root, ref.patterns, ref.recursive))
        gone = _gone(old, index.entries, ref)
        if index.rehashed or gone or any(rel not in old for rel in index.entries):
            for rel in gone:  # in place: file sets of one root each touch only their own entries
                del old[rel]
            old.update(index.entries)
            self._dirty_roots.add(root_key)
            if index.rehashed and time.monotonic() - self._flushed_at > DIGEST_FLUSH_S:
                self.flush_digests()  # a first plan hashing a day of videos keeps what it read so far
        return files

    def flush_digests(self) -> None:
        """Write the stat caches that changed since the last flush: at the end of a plan, and while
        a plan reads files, every DIGEST_FLUSH_S, never once per file set (a first plan of 10,000
        new videos in one folder would rewrite that root's blob 10,000 times). A plan killed in
        between re-hashes at the next plan only the files read since the last flush."""
        self._flushed_at = time.monotonic()
        if not self._dirty_roots:
            return
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO stat_blob VALUES (?, ?)",
                                [(root, marshal.dumps(self._stat_entries[root])) for root in sorted(self._dirty_roots)])
        self._dirty_roots.clear()

    def _stat_root(self, root_key: str) -> dict[str, Any]:
        if root_key not in self._stat_entries:
            row = self.db.execute("SELECT data FROM stat_blob WHERE root=?", (root_key,)).fetchone()
            self._stat_entries[root_key] = marshal.loads(row[0]) if row else {}
        return self._stat_entries[root_key]

    # ------------------------------------------------------------------ runs
    def start_run(self, command: str, specs: Iterable[str]) -> str:
        run_id = new_run_id()
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO runs(id, started, status, command, specs, host, pid, heartbeat) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, now, "running", command, json.dumps(list(specs)), socket.gethostname(), os.getpid(), now),
            )
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        now = time.time()
        with self.db:
            self.db.execute(
                "UPDATE runs SET finished=?, heartbeat=?, status=?, summary=? WHERE id=?",
                (now, now, status, json.dumps(summary), run_id),
            )

    def beat(self, run_id: str) -> None:
        """Record that the process of ``run_id`` is alive now."""
        with self.db:
            self.db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (time.time(), run_id))

    def heartbeat(self, run_id: str, interval_s: float = HEARTBEAT_S) -> "Heartbeat":
        """A started :class:`Heartbeat` for ``run_id``; call ``stop()`` when the run ends."""
        return Heartbeat(self.dir / "state.db", run_id, interval_s)

    def mark_dead_runs(self, alive: Callable[[str, int], bool] | None = None) -> list[tuple[str, float]]:
        """Mark the runs still recorded as running whose process is gone as killed, with the last
        heartbeat as their finish time, and their running executions likewise; returns (run id,
        last seen) of each. ``alive(host, pid)`` tells which processes may still run one; without
        it (the caller holds the lock) every "running" run is dead: only one apply runs per
        workspace, so the others died (kill -9, OOM, reboot)."""
        rows = self.db.execute(
            "SELECT id, started, host, pid, heartbeat FROM runs WHERE status='running'").fetchall()
        dead = [r for r in rows if alive is None or not alive(r[2], r[3])]
        out: list[tuple[str, float]] = []
        with self.db:
            for run_id, started, host, pid, beat in dead:
                # its last sign of life: the heartbeat, or a stage it finished after the last beat
                (ended,) = self.db.execute("SELECT MAX(started + duration) FROM executions WHERE run_id=?"
                                           " AND status!='running'", (run_id,)).fetchone()
                seen = max(beat or started, ended or 0)
                why = (f"killed: the runner process (pid {pid} on {host}) died while this stage ran; "
                       f"last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seen))}")
                self.db.execute("UPDATE runs SET status='killed', finished=? WHERE id=? AND status='running'",
                                (seen, run_id))
                self.db.execute(
                    "UPDATE executions SET status='killed', duration=MAX(0, ? - started), error=?"
                    " WHERE run_id=? AND status='running'", (seen, why, run_id))
                out.append((run_id, seen))
        return out

    def settle_dead_runs(self) -> list[tuple[str, float]]:
        """`mark_dead_runs` for a reader that does not hold the lock (`runner runs`, `status`):
        takes the lock for a moment when it is free; while an apply holds it, only that
        holder's process, and processes alive on this host, count as alive."""
        if not self.exists():
            return []
        with probe_lock(self.dir) as holder:
            if holder is None:
                return self.mark_dead_runs()
            me = socket.gethostname()
            return self.mark_dead_runs(
                lambda host, pid: (host, pid) == (holder.get("host"), holder.get("pid"))
                or (host == me and pid_alive(int(pid or 0))))

    def record_execution(self, rec: ExecutionRecord) -> int:
        """Insert an execution row (status ``running`` while a stage runs); returns its id."""
        with self.db:
            cur = self.db.execute(_INSERT_EXECUTION, _execution_values(rec))
        return int(cur.lastrowid)

    def record_executions(self, recs: list[ExecutionRecord]) -> None:
        """Insert many finished rows (the cached and skipped stages of a run) in one transaction:
        10,000 cached stages are one commit, not 10,000."""
        if not recs:
            return
        with _transaction(self.db):
            self.db.executemany(_INSERT_EXECUTION, [_execution_values(r) for r in recs])

    def update_execution(self, exec_id: int, rec: ExecutionRecord) -> None:
        """Overwrite the row ``record_execution`` returned (a running stage that finished)."""
        with self.db:
            self.db.execute(
                "UPDATE executions SET run_id=?, stage_id=?, kind=?, character=?, key=?, action=?, reason=?,"
                " status=?, started=?, duration=?, metrics=?, cost=?, currency=?, gpu=?, backend=?,"
                " remote_call_id=?, error=?, log_path=? WHERE id=?",
                (*_execution_values(rec), exec_id),
            )

    def set_tracking(self, exec_id: int, runs: list[dict[str, Any]]) -> None:
        """The experiment-tracker runs (runner.tracking.TrackedRun as JSON) of an execution."""
        with self.db:
            self.db.execute("UPDATE executions SET tracking=? WHERE id=?", (json.dumps(runs), exec_id))

    def tracked_runs(self, stage_id: str, key: str) -> list[dict[str, Any]]:
        """The tracker runs of the newest execution that produced ``key`` for ``stage_id`` (what a
        cached stage's outputs were logged as), [] when it was never tracked."""
        row = self.db.execute(
            "SELECT tracking FROM executions WHERE stage_id=? AND key=? AND tracking IS NOT NULL"
            " ORDER BY id DESC LIMIT 1", (stage_id, key)).fetchone()
        return json.loads(row[0]) if row else []

    def set_current(self, stage_id: str, key: str, components: dict[str, Any], run_id: str,
                    filesets: dict[str, FileSetDigest]) -> None:
        """The stage's current key and the listings of its file sets, in one transaction (a
        stage over a folder of 1,000 videos has 1,000 file sets: one commit, not 1,001)."""
        now = time.time()
        with _transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO stage_current VALUES (?,?,?,?,?)",
                (stage_id, key, json.dumps(components), run_id, now),
            )
            for fd in filesets.values():
                self.db.execute(
                    "INSERT OR IGNORE INTO filesets VALUES (?,?)", (fd.digest, json.dumps(fd.files))
                )
        if self._current is not None:
            self._current[stage_id] = (key, run_id, now)

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Recent runs, newest first; ``last_seen`` is the run's last heartbeat."""
        rows = self.db.execute(
            "SELECT id, started, finished, status, command, summary, heartbeat, host, pid FROM runs"
            " ORDER BY started DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            {"id": r[0], "started": r[1], "finished": r[2], "status": r[3], "command": r[4],
             "summary": json.loads(r[5]) if r[5] else {}, "last_seen": r[6], "host": r[7], "pid": r[8]}
            for r in rows
        ]

    def executions(self, run_id: str, character: str | None = None) -> list[dict[str, Any]]:
        """The rows of a run in the order they were written; of one ``character`` only when given
        (a report reads its own, not the whole batch's)."""
        cols = ["stage_id", "kind", "character", "key", "action", "reason", "status", "started",
                "duration", "metrics", "cost", "currency", "gpu", "backend", "remote_call_id", "error",
                "log_path", "tracking"]
        where, args = ("run_id=? AND character=?", (run_id, character)) if character is not None \
            else ("run_id=?", (run_id,))
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM executions WHERE {where} ORDER BY id", args).fetchall()
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            d["metrics"] = json.loads(d["metrics"] or "{}")
            d["tracking"] = json.loads(d["tracking"] or "[]")
            out.append(d)
        return out

    def last_run_id(self, *, with_executions: bool = True) -> str | None:
        q = "SELECT id FROM runs ORDER BY started DESC LIMIT 1"
        if with_executions:
            q = ("SELECT r.id FROM runs r WHERE EXISTS (SELECT 1 FROM executions e WHERE e.run_id=r.id"
                 " AND e.status IN ('succeeded','failed')) ORDER BY r.started DESC LIMIT 1")
        row = self.db.execute(q).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ store
    def new_tmp_dir(self, key: str) -> Path:
        d = self.tmp_dir / f"{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        d.mkdir(parents=True)
        return d

    def clear_tmp(self) -> int:
        """Remove half-written outputs of killed stages (call with the lock held)."""
        if not self.tmp_dir.is_dir():
            return 0
        n = 0
        for child in self.tmp_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True)
            n += 1
        return n

    def promote(self, tmp: Path, key: str, manifest: dict[str, Any]) -> Path:
        """Move a finished stage's output folder into the store atomically."""
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        _fsync_dir(tmp)
        dest = self.store_path(key)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        old = None
        if dest.exists():
            old = self.tmp_dir / f"old.{key[:16]}.{uuid.uuid4().hex[:6]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(self.store_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def load_outputs(self, key: str) -> dict[str, contract.Artifact]:
        d = self.store_path(key)
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        return {
            name: contract.Artifact(name=name, path=d / rel, digest=key, meta=manifest.get("meta", {}).get(name, {}))
            for name, rel in manifest["outputs"].items()
        }

    def manifest(self, key: str) -> dict[str, Any]:
        return json.loads((self.store_path(key) / MANIFEST).read_text(encoding="utf-8"))


class Heartbeat:
    """Writes ``runs.heartbeat`` every ``interval_s`` seconds from a daemon thread with its own
    connection, so a run that dies mid-stage (even hours into a training step) shows when it was
    last alive. ``stop()`` ends it; a killed process takes the thread with it."""

    def __init__(self, db_path: Path, run_id: str, interval_s: float) -> None:
        self._db_path, self._run_id, self._interval = db_path, run_id, max(0.05, float(interval_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        db = sqlite3.connect(self._db_path, timeout=30, isolation_level=None)
        try:
            while not self._stop.wait(self._interval):
                try:
                    db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (time.time(), self._run_id))
                except sqlite3.Error:
                    continue  # a busy database: the next beat tries again
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextmanager
def _transaction(db: sqlite3.Connection):
    """One explicit transaction (the connection autocommits every statement otherwise: with
    ``isolation_level=None``, ``with db:`` commits nothing of its own)."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_INSERT_EXECUTION = (
    "INSERT INTO executions(run_id, stage_id, kind, character, key, action, reason, status, started, duration,"
    " metrics, cost, currency, gpu, backend, remote_call_id, error, log_path)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _execution_values(rec: ExecutionRecord) -> tuple:
    return (rec.run_id, rec.stage_id, rec.kind, rec.character, rec.key, rec.action, rec.reason,
            rec.status, rec.started, rec.duration, json.dumps(rec.metrics), rec.cost, rec.currency,
            rec.gpu, rec.backend, rec.remote_call_id, rec.error, rec.log_path)


def _add_missing_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Bring a state database written by an older version up to the current schema."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, sql_type in columns.items():
        if name not in have:
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            except sqlite3.OperationalError:  # another process added it first
                pass


def _scan(root: Path, patterns: tuple[str, ...], recursive: bool):
    """(relative posix path, full path, stat) of matching files, read the way runner.paths.iter_tree
    walks folders (hidden names skipped, symlinked folders followed once). Whether a symlink may
    lead outside the project was decided when the spec was loaded (runner.spec.paths)."""
    import fnmatch

    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield root.name, str(root), st
        return
    literal = None if recursive else _literal_names(patterns)
    if literal is not None:  # a file set naming its files (one video of a folder): one stat each, no scan
        found = _stat_files(str(root), literal)
        if found is not None:
            yield from found
            return
    pats = tuple(p.lower() for p in patterns)
    match_all = pats == ("*",)
    for rel, entry in iter_tree(root, recursive):
        try:
            if not entry.is_file(follow_symlinks=True):
                continue
            if not match_all and not any(fnmatch.fnmatchcase(entry.name.lower(), p) for p in pats):
                continue
            yield rel, entry.path, entry.stat(follow_symlinks=True)
        except OSError:
            continue


def _stat_files(root: str, names: tuple[str, ...]) -> list[tuple[str, str, os.stat_result]] | None:
    """(name, full path, stat) of each of ``names`` in ``root``; None when one is not a regular
    file (then the folder is scanned the usual way, which says what is there)."""
    out = []
    for name in names:
        full = os.path.join(root, name)
        try:
            st = os.stat(full)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        out.append((name, full, st))
    return out


_ESCAPED = re.compile(r"\[([*?\[])\]")
_SPECIAL = re.compile(r"[*?\[/]")  # a pattern without these is a plain file name


@functools.lru_cache(maxsize=1 << 16)
def _literal_names(patterns: tuple[str, ...]) -> tuple[str, ...] | None:
    """The file names of patterns that are plain names (``glob.escape``d ones included), or None
    when any pattern is a real glob."""
    names = []
    for p in patterns:
        if not _SPECIAL.search(p) and not p.startswith("."):
            names.append(p)  # a plain name (most ride videos): no unescaping to do
            continue
        name = _ESCAPED.sub(r"\1", p)
        if any(c in _ESCAPED.sub("", p) for c in "*?[") or name.startswith(".") or "/" in name:
            return None
        names.append(name)
    return tuple(names)


def _gone(old: dict[str, Any], scanned: dict[str, Any], ref: contract.FileSetRef) -> set[str]:
    """Stat-cache entries of files ``ref`` would list that the scan no longer found (deleted):
    for a ref naming its files, only those names are looked at, not the whole root's cache."""
    import fnmatch

    names = None if ref.recursive else _literal_names(ref.patterns)
    if names is not None:
        return {n for n in names if n in old and n not in scanned}
    pats = [p.lower() for p in ref.patterns]
    return {rel for rel in old if rel not in scanned and (ref.recursive or "/" not in rel)
            and any(fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1].lower(), p) for p in pats)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
