"""Run a stage remotely: inputs up (content-addressed), one worker call, outputs back.

:class:`RemoteBackend` is what the executor uses for a GPU stage when the backend is ``modal``.
Where the call runs is a *transport*:

- :class:`runner.backends.modal_backend.ModalTransport`: a Modal function call and a Modal Volume;
- :class:`FolderTransport`: the same worker entry point in a local subprocess, with a folder
  standing in for the volume (tests, and debugging a stage the way Modal runs it).

A transport offers ``missing(shas)``, ``upload({sha: path})``, ``fetch(sha, dest)``,
``read_result(key)`` and ``invoke(kind, config, manifest, node) -> RemoteCall``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from runner.core import contract
from runner.core.fs import atomic_write_text
from runner.core.hashing import HashIndex, file_sha256
from runner.core.pricing import gpu_count

MANIFEST_NAME = "_manifest.json"


class RemoteCallError(Exception):
    """The remote call itself failed (crashed on every attempt, lost its container...)."""


class RemoteCall(Protocol):
    call_id: str

    def result(self) -> dict[str, Any]: ...

    def cancel(self) -> None: ...


class Transport(Protocol):
    name: str

    def missing(self, shas: set[str]) -> set[str]: ...

    def upload(self, files: dict[str, Path]) -> None: ...

    def fetch(self, sha: str, dest: Path) -> None: ...

    def read_result(self, key: str) -> dict[str, Any] | None: ...

    def invoke(self, kind: str, config: dict[str, Any], manifest: dict[str, Any],
               node: contract.PlanNode) -> RemoteCall: ...


# ----------------------------------------------------------------------------- digests


class DigestCache:
    """sha256 of local files, remembered by their stat signature (:class:`runner.core.hashing.
    HashIndex`) in one JSON file per folder, so a large dataset is hashed once, not at every
    apply. The same files are the local side of the content addressing: an output whose bytes are
    already here (in the store, in the project) is copied, not downloaded."""

    def __init__(self, folder: Path, hasher: Callable[[Path], str] = file_sha256) -> None:
        self.folder = folder
        self.hasher = hasher  # reads a file's sha256 (tests count the reads)
        self._lock = threading.Lock()
        self._known: dict[str, Path] = {}
        self._indexed = False

    def _file_for(self, root: Path) -> Path:
        import hashlib

        return self.folder / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json")

    def _load(self, root: Path) -> HashIndex:
        try:
            data = json.loads(self._file_for(root).read_text(encoding="utf-8"))
            entries = data.get("files", {}) if data.get("root") == str(root) else {}
        except (OSError, json.JSONDecodeError, AttributeError):
            entries = {}
        return HashIndex(entries, hasher=self.hasher)

    def _save(self, root: Path, index: HashIndex) -> None:
        """Keep what was known of the folder's other files (stages name different files of one
        project) with what this call saw; write only when that changed."""
        files = {**index.old, **index.entries}
        if files != index.old:
            atomic_write_text(self._file_for(root), json.dumps({"root": str(root), "files": files}))

    def digest_tree(self, root: Path, files: list[Path]) -> list[list[Any]]:
        """[[relative path, sha256, size], ...] of ``files`` under ``root`` (or of the file root)."""
        index = self._load(root)
        out = []
        for f in files:
            st = f.stat()
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            sha = index.sha256(rel, f, st)
            out.append([rel, sha, st.st_size])
            with self._lock:
                self._known[sha] = f
        self._save(root, index)
        return out

    def record(self, root: Path, listing: list[list[Any]], base_dir: Path) -> None:
        """Remember files (downloaded into ``base_dir``) that will live under ``root`` (their
        store folder once promoted; a rename keeps size, mtime and inode)."""
        index = HashIndex()
        for rel, sha, _size in listing:
            try:
                index.remember(rel, base_dir / rel, sha)
            except OSError:
                continue
        self._save(root, index)

    def _index_all(self) -> None:
        known: dict[str, Path] = {}
        for f in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
                root = Path(data["root"])
                for rel, entry in data["files"].items():
                    known.setdefault(entry[-1], root if root.is_file() else root / rel)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        with self._lock:
            for sha, p in known.items():
                self._known.setdefault(sha, p)
            self._indexed = True

    def local_copy(self, sha: str, size: int) -> Path | None:
        with self._lock:
            p = self._known.get(sha)
            indexed = self._indexed
        if p is None and not indexed:
            self._index_all()
            with self._lock:
                p = self._known.get(sha)
        if p is not None and p.is_file() and p.stat().st_size == size:
            return p
        return None

    def remember(self, sha: str, path: Path) -> None:
        with self._lock:
            self._known[sha] = path


def _artifact_files(art: contract.Artifact) -> tuple[Path, str, list[Path]]:
    """(root, type, files) of an input artifact; a store folder's manifest is not an input."""
    root = Path(art.path)
    if art.files:
        files = [Path(f) for f in art.files]
        return root, ("file" if root.is_file() else "dir"), files
    if root.is_file():
        return root, "file", [root]
    if not root.is_dir():
        raise contract.StageError(f"input {art.name!r} does not exist: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return root, "dir", files


def _project_relative(folder: Path, project_root: Path) -> str | None:
    """Where ``folder`` lies in the project (``photos``, ``.runner/store/<key>``), or None outside
    it: the worker materializes an input there, so a stage that records project-relative paths
    (ingest's ``source``) writes the same bytes remotely as here."""
    try:
        return folder.resolve().relative_to(project_root.resolve()).as_posix()
    except (ValueError, OSError):
        return None


def project_paths(config: Any, project_root: Path, limit: int = 20000) -> list[Path]:
    """Files in the project that the stage config names (a local base model, a prompt suite
    file...): a remote stage gets them at the same project-relative path."""
    root = project_root.resolve()
    found: dict[Path, None] = {}

    def visit(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, str) and v and len(v) < 1024 and "\n" not in v and ":" not in v[:10]:
            p = Path(v).expanduser()
            p = (p if p.is_absolute() else root / p)
            try:
                p = p.resolve()
                p.relative_to(root)
            except (ValueError, OSError):
                return
            if p == root or not p.exists() or ".runner" in p.relative_to(root).parts:
                return
            if p.is_file():
                found[p] = None
            else:
                for f in sorted(p.rglob("*")):
                    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts):
                        found[f] = None
                        if len(found) > limit:
                            raise contract.StageError(
                                f"the stage config names {v!r}, a project folder with over {limit} files",
                                hint="Point the config at a smaller folder or a single file.")

    visit(config)
    return list(found)


# ----------------------------------------------------------------------------- backend


@dataclass
class RemoteInfo:
    call_id: str
    transport: str
    gpu: str | None
    wall_s: float = 0.0
    remote_s: float = 0.0
    billed_s: float = 0.0
    attempts: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    reused_files: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    reused_result: bool = False
    resumed: str | None = None
    queue_s: float | None = None  # submitted -> the first container started (None: not measured)
    containers: int = 0  # containers this call started (its attempts; 0 when the result was reused)
    # the remote path's phases on this machine's clock: inputs hashed and uploaded, the call (its
    # containers' start and the stage's run), the outputs brought back
    upload_s: float = 0.0
    call_s: float = 0.0
    download_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        queue = {} if self.queue_s is None else {"remote.queue_s": round(self.queue_s, 3)}
        return {
            **queue,
            "remote.containers": float(self.containers),
            "remote.billed_s": round(self.billed_s, 3),
            "remote.duration_s": round(self.remote_s, 3),
            "remote.attempts": float(self.attempts),
            "remote.uploaded_files": float(self.uploaded_files),
            "remote.uploaded_bytes": float(self.uploaded_bytes),
            "remote.downloaded_files": float(self.downloaded_files),
            "remote.downloaded_bytes": float(self.downloaded_bytes),
            "remote.upload_s": round(self.upload_s, 3),
            "remote.call_s": round(self.call_s, 3),
            "remote.download_s": round(self.download_s, 3),
        }


def remote_config(node: contract.PlanNode, gpu: str | None) -> dict[str, Any]:
    """The node config a remote call runs with: a data-parallel stage (its config has an unkeyed
    ``processes``, hardware.local_processes) runs one process per GPU of its function instead
    (``H100:8``: 8)."""
    if "processes" not in node.config:
        return node.config
    return {**node.config, "processes": gpu_count(gpu)}


class RemoteBackend:
    """Runs a stage through a transport. Thread-safe: the executor fans out with one call per
    thread. It never touches the state database; what it learned about the call is left in
    ``ctx.extra["remote"]`` (a :class:`RemoteInfo`) for the executor to record."""

    name = "modal"

    def __init__(self, transport: Transport, workspace_dir: Path,
                 gpu_of: Callable[[contract.PlanNode], str | None] | None = None) -> None:
        self.transport = transport
        self.digests = DigestCache(workspace_dir / "remote" / "digests")
        self.store_dir = workspace_dir / "store"  # where the executor promotes outputs
        self.gpu_of = gpu_of or (lambda node: node.gpu)
        self._calls: dict[str, RemoteCall] = {}
        self._lock = threading.Lock()

    # -- inputs
    def build_manifest(self, node: contract.PlanNode, inputs: dict[str, contract.Artifact],
                       ctx: Any) -> tuple[dict[str, Any], dict[str, Path]]:
        manifest: dict[str, Any] = {"stage_id": node.id, "character": node.character, "kind": node.kind,
                                    "key": ctx.extra.get("key", ""), "run_id": ctx.run_id, "inputs": {}}
        local: dict[str, Path] = {}
        project_root = Path(ctx.project_root)
        for name, art in inputs.items():
            root, typ, files = _artifact_files(art)
            listing = self.digests.digest_tree(root, files)
            for (_rel, sha, _), f in zip(listing, files):
                local[sha] = f
            manifest["inputs"][name] = {"type": typ, "files": listing, "meta": contract.jsonable(art.meta),
                                        "digest": art.digest, "fileset": bool(art.files),
                                        "at": _project_relative(root.parent if typ == "file" else root, project_root)}
        proj_files = project_paths(node.config, project_root)
        if proj_files:
            listing = self.digests.digest_tree(project_root, proj_files)
            for (_rel, sha, _), f in zip(listing, proj_files):
                local[sha] = f
            manifest["project"] = listing
        return manifest, local

    def _upload(self, local: dict[str, Path], info: RemoteInfo) -> None:
        missing = self.transport.missing(set(local))
        info.reused_files = len(local) - len(missing)
        if missing:
            todo = {sha: local[sha] for sha in sorted(missing)}
            self.transport.upload(todo)
            info.uploaded_files = len(todo)
            info.uploaded_bytes = sum(p.stat().st_size for p in todo.values())

    # -- outputs
    def _download(self, result: dict[str, Any], out_dir: Path, info: RemoteInfo) -> dict[str, contract.Artifact]:
        for rel, sha, size in result["files"]:
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            have = self.digests.local_copy(sha, size)
            if have is not None:
                import shutil

                shutil.copyfile(have, dest)
            else:
                self.transport.fetch(sha, dest)
                info.downloaded_files += 1
                info.downloaded_bytes += size
            self.digests.remember(sha, dest)
        self.digests.record(self.store_dir / result["key"], result["files"], out_dir)
        arts = {}
        for name, o in result["outputs"].items():
            p = out_dir if o["path"] == "." else out_dir / o["path"]
            if o["type"] == "dir":
                p.mkdir(parents=True, exist_ok=True)  # an output folder may be empty
            arts[name] = contract.Artifact(name=name, path=p, meta=o.get("meta", {}))
        return arts

    def _replay(self, result: dict[str, Any], ctx: Any) -> None:
        """The remote stage's log, metrics and warnings, into the local stage log and context."""
        for ev in result.get("events", []):
            kind = ev.get("event")
            if kind == "metric":
                ctx.metrics[ev["name"]] = float(ev["value"])
                ctx.metric_history.append({"name": ev["name"], "value": ev["value"], "step": ev.get("step")})
            if kind in ("start", "end"):
                continue
            ctx._write({**{k: v for k, v in ev.items() if k not in ("t", "stage")}, "remote": True,
                        "remote_t": ev.get("t")})
        for w in result.get("warnings", []):
            if w not in ctx.warnings:
                ctx.warnings.append(w)
                ctx.reporter.log(ctx.stage_id, "warning", w)
        for k, v in (result.get("metrics") or {}).items():
            ctx.metrics[k] = float(v)

    # -- the stage
    def run_stage(self, kind: contract.StageKind, node: contract.PlanNode, inputs: dict[str, contract.Artifact],
                  ctx: Any) -> dict[str, contract.Artifact]:
        t0 = time.monotonic()
        info = RemoteInfo(call_id="", transport=self.transport.name, gpu=self.gpu_of(node))
        ctx.extra["remote"] = info
        manifest, local = self.build_manifest(node, inputs, ctx)
        key = manifest["key"]
        result = self.transport.read_result(key) if key else None
        if result is not None and result.get("status") == "succeeded":
            info.reused_result = True
            info.call_id = "reused:" + key[:16]
            ctx.log("outputs for this cache key were already on the volume; fetching them")
        else:
            self._upload(local, info)
            info.upload_s = time.monotonic() - t0
            ctx.log(f"inputs: {info.uploaded_files} file(s) uploaded ({info.uploaded_bytes} bytes), "
                    f"{info.reused_files} already on the volume")
            manifest["submitted"] = time.time()  # the worker measures the queue time from it
            call = self.transport.invoke(kind.kind, remote_config(node, info.gpu), manifest, node)
            info.call_id = call.call_id
            ctx._write({"event": "remote_call", "call_id": call.call_id, "transport": self.transport.name,
                        "gpu": info.gpu})
            with self._lock:
                self._calls[call.call_id] = call
            relay = _ProgressRelay(self.transport, key, ctx)
            relay.start()
            try:
                result = call.result()
            finally:
                info.call_s = time.monotonic() - t0 - info.upload_s
                relay.stop()
                with self._lock:
                    self._calls.pop(call.call_id, None)
        note = getattr(self.transport, "note_present", None)
        if note is not None and result.get("files"):
            note({sha for _, sha, _ in result["files"]})  # the outputs are on the volume now
        info.attempts = int(result.get("attempts", 0))
        if result.get("reused") and not info.reused_result:  # a container found the outputs there
            info.containers = 1
        elif not info.reused_result:
            info.containers = int(result.get("call_attempts", info.attempts))
            info.queue_s = float(result["queue_s"]) if result.get("queue_s") is not None else None
        info.billed_s = 0.0 if info.reused_result else float(result.get("billed_s", 0.0))
        info.remote_s = float(result.get("duration_s", 0.0))
        info.resumed = result.get("resumed")
        if info.resumed:
            ctx.log(f"resumed on the volume: {info.resumed}")
        self._replay(result, ctx)
        if result.get("status") != "succeeded":
            info.wall_s = time.monotonic() - t0
            raise contract.StageError(f"{result.get('error', 'remote stage failed')} (remote call {info.call_id})",
                                  hint=result.get("hint", ""))
        t_down = time.monotonic()
        outputs = self._download(result, Path(ctx.out_dir), info)
        info.download_s = time.monotonic() - t_down
        info.wall_s = time.monotonic() - t0
        return outputs

    def cancel_all(self) -> None:
        with self._lock:
            calls = list(self._calls.values())
        for c in calls:
            try:
                c.cancel()
            except Exception:
                pass

    def session(self):
        """Context manager around a run's remote calls (the Modal app runs inside it)."""
        from contextlib import nullcontext

        sess = getattr(self.transport, "session", None)
        return sess() if sess is not None else nullcontext()


class _ProgressRelay:
    """While a remote stage runs, polls its log on the volume (``transport.progress_events``) and
    hands new progress lines to the reporter, so a long remote train shows its steps here too.
    On Modal the log becomes visible when the worker commits the volume (every minute)."""

    def __init__(self, transport: Any, key: str, ctx: Any) -> None:
        self.transport = transport
        self.key = key
        self.ctx = ctx
        self.every_s = float(getattr(transport, "progress_poll_s", 0) or 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempt = ""
        self._count = 0  # events of the current attempt's log already relayed (the log only grows)

    def start(self) -> None:
        if self.every_s > 0 and hasattr(self.transport, "progress_events"):
            self._thread = threading.Thread(target=self._loop, name="progress-relay", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                attempt, events = self.transport.progress_events(self.key)
            except Exception:  # progress is best effort; the result is what counts
                continue
            if attempt != self._attempt:  # a retry writes a new log
                self._attempt, self._count = attempt, 0
            new, self._count = events[self._count:], max(self._count, len(events))
            for ev in new:
                if ev.get("event") == "progress":
                    self.ctx.reporter.progress(self.ctx.stage_id, str(ev.get("desc", "")),
                                               int(ev.get("completed", 0)), ev.get("total"))
                elif ev.get("event") == "log":
                    self.ctx.reporter.log(self.ctx.stage_id, str(ev.get("level", "info")),
                                          "[remote] " + str(ev.get("message", "")))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def parse_events(text: str) -> list[dict[str, Any]]:
    """Complete JSON lines of a log being written (a last line without its newline is left for
    the next poll)."""
    out = []
    for line in text.split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({})  # keeps the count aligned with the file's lines
    return out


# ----------------------------------------------------------------------------- folder transport


class _SubprocessCall:
    def __init__(self, transport: "FolderTransport", request: dict[str, Any]) -> None:
        self.transport = transport
        self.request = request
        self.call_id = "local-" + uuid.uuid4().hex[:12]
        self._proc: subprocess.Popen | None = None
        self._cancelled = False

    def result(self) -> dict[str, Any]:
        t = self.transport
        with tempfile.TemporaryDirectory(prefix="runner-call-") as d:
            req = Path(d) / "request.json"
            out = Path(d) / "result.json"
            req.write_text(json.dumps(self.request), encoding="utf-8")
            errors = []
            for attempt in range(t.retries + 1):  # as modal.Retries: the same call, again
                if self._cancelled:
                    raise RemoteCallError(f"call {self.call_id} cancelled")
                self._proc = subprocess.Popen(
                    [t.python, "-m", "runner.backends.worker", "--request", str(req),
                     "--volume-root", str(t.root), "--result", str(out)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=t.env(),
                )
                _, stderr = self._proc.communicate()
                if self._proc.returncode == 0 and out.is_file():
                    return json.loads(out.read_text(encoding="utf-8"))
                tail = (stderr or "").strip().splitlines()[-1:] or [f"exit status {self._proc.returncode}"]
                errors.append(f"attempt {attempt + 1}: {tail[0]}")
            raise RemoteCallError(f"remote call {self.call_id} failed on every attempt: " + "; ".join(errors))

    def cancel(self) -> None:
        self._cancelled = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


class FolderTransport:
    """The worker entry point in a local subprocess, a folder as the volume.

    ``retries`` re-runs a call whose process died (as modal.Retries does for a crashed or
    preempted container); the stage then resumes from its checkpoint in ``<root>/scratch``."""

    name = "folder"
    progress_poll_s = 0.25

    def __init__(self, root: Path | str, *, retries: int = 0, python: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        from runner.backends.volume import FolderVolume

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.volume = FolderVolume(self.root)
        self.retries = retries
        self.python = python or sys.executable
        self.extra_env = env or {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH", "")]))
        env.update(self.extra_env)
        return env

    def missing(self, shas: set[str]) -> set[str]:
        return self.volume.missing(shas)

    def upload(self, files: dict[str, Path]) -> None:
        self.volume.upload(files)

    def fetch(self, sha: str, dest: Path) -> None:
        self.volume.fetch(sha, dest)

    def read_result(self, key: str) -> dict[str, Any] | None:
        return self.volume.read_result(key)

    def progress_events(self, key: str) -> tuple[str, list[dict[str, Any]]]:
        """(attempt, the events its log holds so far) of the running attempt at ``key``."""
        from runner.backends.volume import WORK

        attempts = sorted((self.root / WORK / key).glob("attempt*"), key=lambda p: int(p.name[7:] or 0))
        if not attempts or not (attempts[-1] / "log.jsonl").is_file():
            return "", []
        text = (attempts[-1] / "log.jsonl").read_text(encoding="utf-8", errors="replace")
        return attempts[-1].name, parse_events(text)

    def invoke(self, kind: str, config: dict[str, Any], manifest: dict[str, Any],
               node: contract.PlanNode) -> _SubprocessCall:
        # the stage's map (hardware.stage_map) runs over subprocesses of this python, as retried
        return _SubprocessCall(self, {"kind": kind, "config": config, "manifest": manifest,
                                      "map": {"python": self.python, "retries": self.retries}})
