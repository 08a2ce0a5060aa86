"""A stage's per-item map over containers (``hardware.stage_map``).

A stage hands its per-item work to ``ctx.map_items(fn, items, shared, containers=N)``
(:class:`runner.core.contract.StageContext`): ``fn`` names a ``module:function`` that takes a
chunk of items and the shared settings and yields one JSON record per item, in order. Locally the
context calls it once over every item in this process (:func:`run_here`), as the stage always did.
In a remote stage's worker with N > 1 the :class:`VolumeMapper` splits the items into N contiguous
chunks and runs each in a container of its own (:func:`run_chunk_in_volume`): a Modal function's
``.map`` (:mod:`runner.backends.modal_backend`), or N subprocesses ``python -m
runner.backends.worker map`` for the folder transport (:class:`SubprocessLauncher`); the parent
yields the records chunk after chunk, so in input order.

Files. A chunk sees the volume, not the parent's work folder. Every string in the items and the
shared settings that lies under the parent's work folder is rewritten to the chunk's own folder
(and back in its records): the input files the items name (and the project files the stage
config names) are materialized there from their blobs (content-addressed: the parent has each
input file's sha256 from the input manifest), and the parent's output folder's subfolders are
created. What the chunk writes under its output folder goes back as one archive and its records
as one JSONL file, both at ``map/<key>/<m>.<i>of<n>/`` on the volume (chunk i of n of the
stage's map m): the parent reads two files per chunk (on Modal through the SDK, which sees what
the chunks committed; its own mount would not without a reload), unpacks the archive into its
output folder at the same place and streams the records, so its memory stays flat however many
items there are. Both, and the chunks' manifests, are removed when the stage succeeds
(:meth:`VolumeMapper.cleanup`).

Retries and cost. A chunk that raises or whose container dies is retried by the transport
(``modal.Retries`` of the map function; the folder transport's ``retries``); a :class:`UserError`
comes back as a failed chunk and is not. Each attempt is recorded in
``attempts/<key>-map<m>.<i>of<n>.jsonl`` and billed like a stage attempt (each chunk's result
carries its attempts' seconds: the parent on Modal does not see what other containers commit to
its mounted volume), and a finished chunk's manifest, ``results/<key>-map<m>.<i>of<n>.json``, is
reused by a later attempt at the stage, so a preempted parent does not redo finished chunks.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from runner.backends.volume import CACHE, MAP, FolderVolume, result_relpath
from runner.core.fs import atomic_write_text, copy_atomic

#: A launcher runs chunk requests in containers and yields their results in request order.
Launcher = Callable[[list[dict[str, Any]]], Iterator[dict[str, Any]]]


def resolve(fn: str) -> Callable[..., Any]:
    """The function ``module:function`` names."""
    module, sep, name = fn.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"a map function is named 'module:function', not {fn!r}")
    return getattr(importlib.import_module(module), name)


def run_here(fn: str, items: list[dict[str, Any]], shared: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``fn`` over every item in this process: what a local stage does."""
    yield from resolve(fn)(items, shared)


def split(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` in ``n`` contiguous chunks (fewer when there are fewer items), sizes within one."""
    n = max(1, min(int(n), len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def rebase(value: Any, old: str, new: str) -> Any:
    """``value`` with every string that is ``old`` or lies under it moved under ``new``."""
    if isinstance(value, str):
        if value == old or value.startswith(old + os.sep):
            return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rebase(v, old, new) for v in value]
    return value


def chunk_name(key: str, index: int, count: int, seq: int = 0) -> str:
    """The name of one chunk's attempts and result on the volume: chunk ``index`` of ``count`` of
    the stage's map number ``seq`` (a stage may map more than once; the first is 0)."""
    return f"{key}-map{seq}.{index}of{count}"


# ----------------------------------------------------------------------------- the parent


class VolumeMapper:
    """The map of a remote stage's worker: chunk requests out through ``launcher``, the chunks'
    outputs and records back from the volume (``read(rel, dest)`` copies a file of the volume:
    from the mounted folder by default, through the SDK on Modal; ``remove(rel)`` deletes one)."""

    def __init__(self, vol: FolderVolume, key: str, base: Path, files: dict[str, str], always: dict[str, str],
                 launcher: Launcher, read: Callable[[str, Path], None] | None = None,
                 remove: Callable[[str], None] | None = None) -> None:
        self.vol = vol
        self.key = key
        self.base = str(base)
        self.files = files  # input files of the stage (normalized absolute path -> sha256)
        self.always = always  # project files the stage config names: every chunk gets them
        self.launcher = launcher
        self.read = read or (lambda rel, dest: copy_atomic(vol.path(rel), dest))
        self.remove = remove or (lambda rel: _remove(vol.path(rel)))
        self.billed_s = 0.0  # seconds of every attempt of every chunk mapped so far (the stage bills them)
        self._names: list[str] = []  # the chunks mapped (their manifests on the volume)
        self._maps = 0  # map_items calls so far (the same order in every attempt at the stage)

    def __call__(self, ctx: Any, fn: str, items: list[dict[str, Any]], shared: dict[str, Any],
                 containers: int) -> Iterator[dict[str, Any]]:
        chunks = split(items, containers)
        out = Path(self.base) / "out"
        dirs = ["out", *sorted(self._rel(str(d)) for d in out.rglob("*") if d.is_dir())] if out.is_dir() else []
        requests = [self._request(fn, chunk, shared, i, len(chunks), dirs) for i, chunk in enumerate(chunks)]
        self._names += [chunk_name(self.key, i, len(chunks), self._maps) for i in range(len(chunks))]
        self._maps += 1
        ctx.log(f"map: {len(items)} items over {len(chunks)} containers "
                f"({', '.join(str(len(c)) for c in chunks)} items each)", map_containers=len(chunks))
        done: list[dict[str, Any]] = []
        for res in self.launcher(requests):
            if res.get("status") != "succeeded":
                from runner.core.errors import StageError

                raise StageError(f"map chunk {res.get('index', len(done)) + 1} of {len(chunks)}: "
                                 f"{res.get('error', 'failed')}", hint=res.get("hint", ""))
            self._collect_files(res)
            self.billed_s += float(res.get("billed_s", 0.0))
            done.append(res)
            ctx.log(f"map: chunk {len(done)}/{len(chunks)}: {res['items']} items in {res['duration_s']:.1f} s "
                    f"({res['attempts']} attempt(s){', reused' if res.get('reused') else ''})",
                    map_chunk=len(done) - 1, items=res["items"], seconds=round(res["duration_s"], 3),
                    attempts=res["attempts"], reused=bool(res.get("reused")), host=res.get("host"))
            yield from self._records(res)
        self._record(ctx, done)

    def _request(self, fn: str, chunk: list[dict[str, Any]], shared: dict[str, Any], index: int,
                 count: int, dirs: list[str]) -> dict[str, Any]:
        files = {self._rel(p): sha for p, sha in self.always.items()}
        for item in chunk:
            for v in item.values():
                if isinstance(v, str) and v.startswith(self.base + os.sep):
                    sha = self.files.get(os.path.normpath(v))
                    if sha is not None:
                        files[self._rel(os.path.normpath(v))] = sha
        return {"fn": fn, "items": chunk, "shared": shared, "key": self.key, "seq": self._maps, "index": index,
                "count": count, "base": self.base, "files": files, "dirs": dirs, "submitted": time.time()}

    def _rel(self, path: str) -> str:
        return Path(path).relative_to(self.base).as_posix()

    def cleanup(self) -> None:
        """Remove the chunks' outputs and manifests from the volume (the stage succeeded)."""
        for rel in [f"{MAP}/{self.key}", *(result_relpath(n) for n in self._names)]:
            try:
                self.remove(rel)
            except Exception:  # already gone, or a lost connection: the files are only garbage
                pass

    def _collect_files(self, res: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="runner-map-out-") as d:
            archive = Path(d) / "outputs.tar"
            self.read(res["archive"], archive)
            _unpack(archive, Path(self.base))

    def _records(self, res: dict[str, Any]) -> Iterator[dict[str, Any]]:
        rel, count = res["records"], res["items"]
        with tempfile.TemporaryDirectory(prefix="runner-map-records-") as d:
            local = Path(d) / "records.jsonl"
            self.read(rel, local)
            with local.open(encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)
                    count -= 1
        if count:
            raise RuntimeError(f"map chunk {res['index'] + 1} returned {res['items'] - count} of "
                               f"{res['items']} records")

    def _record(self, ctx: Any, done: list[dict[str, Any]]) -> None:
        """The map in the stage's log and metrics (the worker adds :attr:`billed_s` to the stage's
        billed seconds)."""
        seconds = [round(float(r["duration_s"]), 3) for r in done]
        ctx.log(f"map: {len(done)} containers done, the longest {max(seconds, default=0.0):.1f} s",
                map={"containers": len(done), "items": [r["items"] for r in done], "seconds": seconds,
                     "attempts": [r["attempts"] for r in done], "reused": sum(1 for r in done if r.get("reused"))})
        ctx.metric("map.containers", len(done))
        ctx.metric("map.attempts", sum(int(r["attempts"]) for r in done))
        ctx.metric("map.items_max", max((r["items"] for r in done), default=0))
        ctx.metric("map.seconds_max", max(seconds, default=0.0))
        ctx.metric("map.billed_s", round(self.billed_s, 3))


# ----------------------------------------------------------------------------- one chunk


def run_chunk_in_volume(request: dict[str, Any], volume_root: str | Path, *,
                        commit: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one chunk (a request of :class:`VolumeMapper`) next to the volume; returns its manifest:
    status, items, the volume paths of its outputs' archive and of its records, attempts, seconds."""
    from runner.backends.worker import _append_attempt, _attempts, billed_seconds
    from runner.core.errors import UserError

    vol = FolderVolume(Path(volume_root))
    name = chunk_name(request["key"], request["index"], request["count"], request.get("seq", 0))
    done = vol.read_result(name)
    if done is not None and all(vol.path(done[k]).is_file() for k in ("archive", "records")):
        return {**done, "reused": True}
    number = 1 + sum(1 for a in _attempts(vol.root, name) if a.get("event") == "start")
    _append_attempt(vol.root, name, {"event": "start", "attempt": number, "t": time.time(),
                                     "host": socket.gethostname(), "pid": os.getpid()})
    if commit is not None:
        commit()
    os.environ.setdefault("CHARACTER_RUNNER_CACHE", str(vol.root / CACHE))
    work = Path(tempfile.mkdtemp(prefix="runner-map-"))
    t0 = time.monotonic()
    try:
        result = {"status": "succeeded", **_run_chunk(vol, request, work)}
    except UserError as exc:  # the user's problem: a failed chunk, not retried
        result = {"status": "failed", "error": str(exc), "hint": exc.hint, "files": 0, "items": 0}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _append_attempt(vol.root, name, {"event": "end", "attempt": number, "t": time.time(), "status": result["status"]})
    billed, attempts = billed_seconds(_attempts(vol.root, name), time.time())
    result.update(index=request["index"], attempt=number, attempts=attempts, billed_s=billed,
                  duration_s=time.monotonic() - t0, host=socket.gethostname())
    if result["status"] == "succeeded":
        atomic_write_text(vol.root / result_relpath(name), json.dumps(result))
    if commit is not None:
        commit()
    return result


def _run_chunk(vol: FolderVolume, request: dict[str, Any], work: Path) -> dict[str, Any]:
    """Materialize the chunk's files under ``work``, run its function, put what it wrote on the
    volume (``map/<key>/<m>.<i>of<n>/``)."""
    for rel, sha in request["files"].items():
        vol.materialize(sha, rel, work / rel)
    for rel in request["dirs"]:
        (work / rel).mkdir(parents=True, exist_ok=True)
    base, here = request["base"], str(work)
    items, shared = rebase(request["items"], base, here), rebase(request["shared"], base, here)
    records = work / "records.jsonl"
    count = 0
    with records.open("w", encoding="utf-8") as fh:
        for rec in resolve(request["fn"])(items, shared):
            fh.write(json.dumps(rebase(rec, here, base)) + "\n")
            count += 1
    if count != len(items):
        raise RuntimeError(f"{request['fn']} yielded {count} records for {len(items)} items")
    files = sorted(x for x in (work / "out").rglob("*") if x.is_file())
    archive = work / "outputs.tar"
    with tarfile.open(archive, "w") as tar:  # the outputs are images mostly: not compressed
        for f in files:
            tar.add(f, arcname=f.relative_to(work).as_posix(), recursive=False)
    where = f"{MAP}/{request['key']}/{request.get('seq', 0)}.{request['index']}of{request['count']}"
    copy_atomic(archive, vol.path(f"{where}/outputs.tar"))
    copy_atomic(records, vol.path(f"{where}/records.jsonl"))
    return {"items": count, "files": len(files), "archive": f"{where}/outputs.tar",
            "records": f"{where}/records.jsonl"}


def _unpack(archive: Path, dest: Path) -> None:
    """The files of a chunk's archive into ``dest``; only regular files under ``out/``."""
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or member.name.startswith("/") or ".." in parts or parts[:1] != ("out",):
                raise RuntimeError(f"a map chunk's archive holds {member.name!r}, not a file of its output folder")
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as fh:
                shutil.copyfileobj(src, fh)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ----------------------------------------------------------------------------- folder transport


def exit_with_parent(every_s: float = 1.0) -> None:
    """End this chunk process once the stage's worker that started it is gone (a cancelled or
    killed call), as a container of a cancelled Modal call would be."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class SubprocessLauncher:
    """Each chunk in a subprocess of the worker entry point (``python -m runner.backends.worker
    map``), all at once, with the folder standing in for the volume; a chunk whose process dies is
    run again, ``retries`` times (as modal.Retries does for each input of a map)."""

    def __init__(self, python: str, volume_root: str | Path, retries: int = 0) -> None:
        self.python = python
        self.volume_root = str(volume_root)
        self.retries = int(retries)

    def __call__(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=max(1, len(requests)), thread_name_prefix="map-chunk") as pool:
            futures = [pool.submit(self._run, r) for r in requests]
            for fut in futures:
                yield fut.result()

    def _run(self, request: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="runner-chunk-") as d:
            req, out = Path(d) / "request.json", Path(d) / "result.json"
            req.write_text(json.dumps(request), encoding="utf-8")
            errors = []
            for attempt in range(self.retries + 1):
                proc = subprocess.run([self.python, "-m", "runner.backends.worker", "map", "--request", str(req),
                                       "--volume-root", self.volume_root, "--result", str(out)],
                                      capture_output=True, text=True)
                if proc.returncode == 0 and out.is_file():
                    return json.loads(out.read_text(encoding="utf-8"))
                tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                errors.append(f"attempt {attempt + 1}: {tail[0]}")
        raise RuntimeError(f"map chunk {request['index'] + 1} of {request['count']} failed on every attempt: "
                           + "; ".join(errors))
