"""The workspace: ``<project>/.runner`` with the state database, artifact store, scratch and logs.

Layout::

    .runner/state.db          SQLite: runs, stage executions, current key per stage, stat cache
    .runner/lock              who holds the workspace (see lock.py)
    .runner/store/<key>/      promoted stage outputs, one folder per cache key, never modified
    .runner/tmp/              stage output folders while a stage runs (cleared at the next apply)
    .runner/scratch/<key>/    resumable state of long stages (checkpoints), kept across crashes
    .runner/logs/<run-id>/    one structured JSONL log per stage execution
"""

from __future__ import annotations

import json
import marshal
import os
import shutil
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from runner.hashing import file_sha256
from runner.paths import iter_tree, workspace_dir
from runner.plan.planner import FileSetDigest, PriorRecord, canonical_json, sha256_text
from runner.stages import base

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
  id TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT, command TEXT,
  specs TEXT, summary TEXT, host TEXT, pid INTEGER);
CREATE TABLE IF NOT EXISTS executions(
  id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, stage_id TEXT, kind TEXT, character TEXT,
  key TEXT, action TEXT, reason TEXT, status TEXT, started REAL, duration REAL, metrics TEXT,
  cost REAL, currency TEXT, gpu TEXT, backend TEXT, remote_call_id TEXT, error TEXT,
  log_path TEXT);
CREATE INDEX IF NOT EXISTS executions_run ON executions(run_id);
CREATE INDEX IF NOT EXISTS executions_stage ON executions(stage_id);
CREATE TABLE IF NOT EXISTS stage_current(
  stage_id TEXT PRIMARY KEY, key TEXT, components TEXT, run_id TEXT, finished REAL);
CREATE TABLE IF NOT EXISTS filesets(digest TEXT PRIMARY KEY, listing TEXT);
CREATE TABLE IF NOT EXISTS stat_blob(root TEXT PRIMARY KEY, data BLOB);
"""

MANIFEST = "_manifest.json"


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

    # ------------------------------------------------------------------ db
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.dir / "state.db", timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def exists(self) -> bool:
        return (self.dir / "state.db").exists()

    # ------------------------------------------------------------------ PlanState
    def last_success(self, stage_id: str) -> PriorRecord | None:
        row = self.db.execute(
            "SELECT key, components, run_id, finished FROM stage_current WHERE stage_id=?", (stage_id,)
        ).fetchone()
        if row is None:
            return None
        return PriorRecord(key=row[0], components=json.loads(row[1]), run_id=row[2], finished_at=row[3])

    def store_path(self, key: str) -> Path:
        return self.store_dir / key

    def store_has(self, key: str) -> bool:
        return (self.store_path(key) / MANIFEST).is_file()

    def scratch_dir(self, key: str) -> Path:
        return self.scratch_root / key

    def fileset_listing(self, digest: str) -> dict[str, str] | None:
        row = self.db.execute("SELECT listing FROM filesets WHERE digest=?", (digest,)).fetchone()
        return dict(json.loads(row[0])) if row else None

    # ------------------------------------------------------------------ FileDigester
    def digest_fileset(self, ref: base.FileSetRef) -> FileSetDigest:
        """Digest a set of files, re-reading only files whose (size, mtime, inode) changed.

        The stat cache of one root is a single marshalled row: loading 10,000 entries this way is
        an order of magnitude faster than 10,000 SQLite rows, and a no-op plan is dominated by it.
        """
        root = Path(ref.root)
        root_key = str(root)
        row = self.db.execute("SELECT data FROM stat_blob WHERE root=?", (root_key,)).fetchone()
        cached: dict[str, tuple] = marshal.loads(row[0]) if row else {}
        files: list[tuple[str, str]] = []
        fresh: dict[str, tuple] = {}
        changed = False
        for rel, full, st in _scan(root, ref.patterns, ref.recursive):
            hit = cached.get(rel)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns and hit[2] == st.st_ino:
                digest = hit[3]
            else:
                digest = file_digest(Path(full))
                changed = True
            fresh[rel] = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
            files.append((rel, digest))
        if changed or len(fresh) != len(cached):
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO stat_blob VALUES (?, ?)", (root_key, marshal.dumps(fresh)))
        files.sort()
        digest = sha256_text(canonical_json(files))
        return FileSetDigest(digest=digest, files=tuple(files), root=root)

    # ------------------------------------------------------------------ runs
    def start_run(self, command: str, specs: Iterable[str]) -> str:
        run_id = new_run_id()
        with self.db:
            self.db.execute(
                "INSERT INTO runs(id, started, status, command, specs, host, pid) VALUES (?,?,?,?,?,?,?)",
                (run_id, time.time(), "running", command, json.dumps(list(specs)), socket.gethostname(), os.getpid()),
            )
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        with self.db:
            self.db.execute(
                "UPDATE runs SET finished=?, status=?, summary=? WHERE id=?",
                (time.time(), status, json.dumps(summary), run_id),
            )

    def record_execution(self, rec: ExecutionRecord) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO executions(run_id, stage_id, kind, character, key, action, reason, status,"
                " started, duration, metrics, cost, currency, gpu, backend, remote_call_id, error, log_path)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.run_id, rec.stage_id, rec.kind, rec.character, rec.key, rec.action, rec.reason,
                 rec.status, rec.started, rec.duration, json.dumps(rec.metrics), rec.cost, rec.currency,
                 rec.gpu, rec.backend, rec.remote_call_id, rec.error, rec.log_path),
            )

    def set_current(self, stage_id: str, key: str, components: dict[str, Any], run_id: str,
                    filesets: dict[str, FileSetDigest]) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO stage_current VALUES (?,?,?,?,?)",
                (stage_id, key, json.dumps(components), run_id, time.time()),
            )
            for fd in filesets.values():
                self.db.execute(
                    "INSERT OR IGNORE INTO filesets VALUES (?,?)", (fd.digest, json.dumps(fd.files))
                )

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, started, finished, status, command, summary FROM runs ORDER BY started DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            {"id": r[0], "started": r[1], "finished": r[2], "status": r[3], "command": r[4],
             "summary": json.loads(r[5]) if r[5] else {}}
            for r in rows
        ]

    def executions(self, run_id: str) -> list[dict[str, Any]]:
        cols = ["stage_id", "kind", "character", "key", "action", "reason", "status", "started",
                "duration", "metrics", "cost", "currency", "gpu", "backend", "remote_call_id", "error",
                "log_path"]
        rows = self.db.execute(
            f"SELECT {', '.join(cols)} FROM executions WHERE run_id=? ORDER BY id", (run_id,)
        ).fetchall()
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            d["metrics"] = json.loads(d["metrics"] or "{}")
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

    def load_outputs(self, key: str) -> dict[str, base.Artifact]:
        d = self.store_path(key)
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        return {
            name: base.Artifact(name=name, path=d / rel, digest=key, meta=manifest.get("meta", {}).get(name, {}))
            for name, rel in manifest["outputs"].items()
        }

    def manifest(self, key: str) -> dict[str, Any]:
        return json.loads((self.store_path(key) / MANIFEST).read_text(encoding="utf-8"))


def _scan(root: Path, patterns: tuple[str, ...], recursive: bool):
    """(relative posix path, full path, stat) of matching files, read the way runner.paths.iter_tree
    walks folders (hidden names skipped, symlinked folders followed once). Whether a symlink may
    lead outside the project was decided when the spec was loaded (runner.spec.paths)."""
    import fnmatch

    try:
        st = root.stat()
    except FileNotFoundError:
        return
    if not os.path.isdir(root):
        yield root.name, str(root), st
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
