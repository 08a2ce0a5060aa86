"""The one entry point that runs a stage body next to a volume.

The Modal function calls :func:`run_stage_in_volume` with the Volume mounted as a folder; tests
(and the folder transport) call it in a subprocess (``python -m runner.backends.worker``) with a
plain folder standing in for the volume. Either way:

1. a finished result for this cache key on the volume is returned as is (a retry that comes
   after the stage finished, or a client that lost the answer, costs nothing);
2. an attempt is recorded (``attempts/<key>.jsonl``), the inputs are materialized from blobs;
3. the stage runs with ``scratch_dir`` on the volume (``scratch/<key>``), so a preempted or
   crashed attempt leaves its checkpoints there and the next attempt (modal.Retries, or a new
   apply) resumes from them; while it runs the volume is committed every ``commit_every_s``;
   given a launcher, its ``ctx.map_items`` runs over containers (hardware.stage_map,
   :mod:`runner.backends.mapping`; ``python -m runner.backends.worker map`` runs one chunk);
4. its outputs are stored as blobs, the output manifest goes to ``results/<key>.json``, the
   scratch and work folders are removed, the volume is committed, and the manifest returned.

A :class:`runner.core.errors.UserError` (the user's problem, such as a ``StageError``) comes back as a ``failed``
manifest and is not retried; any other exception propagates, so the caller's retry policy (and
preemption handling) applies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runner.backends.context import LocalStageContext
from runner.backends.volume import (
    ATTEMPTS,
    CACHE,
    SCRATCH,
    WORK,
    FolderVolume,
    blob_relpath,
    result_relpath,
)
from runner.core.fs import atomic_write_text

MAX_EVENTS = 5000


def _attempts(root: Path, key: str) -> list[dict[str, Any]]:
    p = root / ATTEMPTS / f"{key}.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _append_attempt(root: Path, key: str, record: dict[str, Any]) -> None:
    p = root / ATTEMPTS / f"{key}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def billed_seconds(attempts: list[dict[str, Any]], now: float) -> tuple[float, int]:
    """Seconds of all attempts at a stage and their count. An attempt that never wrote its end
    (preempted, killed) is counted up to the start of the next attempt."""
    starts = sorted((a for a in attempts if a.get("event") == "start"), key=lambda a: a["t"])
    ends = {a["attempt"]: a["t"] for a in attempts if a.get("event") == "end"}
    total = 0.0
    for i, a in enumerate(starts):
        end = ends.get(a["attempt"])
        if end is None:
            end = starts[i + 1]["t"] if i + 1 < len(starts) else now
        total += max(0.0, end - a["t"])
    return total, len(starts)


def _materialize(vol: FolderVolume, entry: dict[str, Any], dest: Path,
                 shas: dict[str, str]) -> tuple[Path, tuple[Path, ...]]:
    """Copy an input's blobs into ``dest``; returns (artifact path, listed files). ``shas`` gets
    each file's sha256 by its normalized path (what a map's chunks materialize again)."""
    files = []
    for rel, sha, _size in entry["files"]:
        target = dest / rel
        vol.materialize(sha, rel, target)
        files.append(target)
        shas[os.path.normpath(target)] = sha
    dest.mkdir(parents=True, exist_ok=True)
    if entry["type"] == "file":
        return dest / entry["files"][0][0], tuple(files)
    return dest, tuple(files)


class _Committer:
    """Commits the volume every few seconds while a stage runs, so the checkpoints it writes
    into scratch survive a preemption (Modal commits at container exit, which a preempted
    container may never reach cleanly)."""

    def __init__(self, commit: Callable[[], None] | None, every_s: float) -> None:
        self.commit = commit
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Committer":
        if self.commit is not None and self.every_s > 0:
            self._thread = threading.Thread(target=self._loop, name="volume-commit", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.commit()
            except Exception:  # a failed background commit is retried at the next tick
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _read_events(log_file: Path) -> list[dict[str, Any]]:
    if not log_file.is_file():
        return []
    events = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if len(events) > MAX_EVENTS:  # keep the start and the end
        elided = {"event": "log", "level": "info", "message": "(events elided)"}
        events = events[: MAX_EVENTS // 2] + [elided] + events[-MAX_EVENTS // 2:]
    return events


@dataclass
class _Attempt:
    """One attempt at a stage on the volume: where it works and what it reports back."""

    root: Path
    key: str
    stage_id: str
    number: int
    work: Path  # work/<key>/attempt<N>
    scratch: Path  # scratch/<key> (kept across attempts)
    resume: str | None
    commit: Callable[[], None] | None
    submitted: float | None = None  # when the client submitted the call (its clock), for the queue time

    @property
    def log_file(self) -> Path:
        return self.work / "log.jsonl"

    def end(self, status: str, ctx: Any, duration: float) -> dict[str, Any]:
        """Record the attempt's end; the fields every result carries."""
        _append_attempt(self.root, self.key, {"event": "end", "attempt": self.number, "t": time.time(),
                                              "status": status})
        attempts = _attempts(self.root, self.key)
        billed, n = billed_seconds(attempts, time.time())
        mapper = getattr(ctx, "mapper", None)  # the containers of its map (hardware.stage_map)
        mapped = float(getattr(mapper, "billed_s", 0.0))
        return {"status": status, "stage_id": self.stage_id, "key": self.key, "attempt": self.number,
                "attempts": n, "billed_s": billed + mapped, "map_billed_s": mapped, "duration_s": duration,
                "resumed": self.resume,
                **self._queue(attempts),
                "metrics": ctx.metrics, "warnings": ctx.warnings, "events": _read_events(self.log_file)}

    def _queue(self, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        """The containers this call started (its attempts) and the seconds from its submission to
        the first one starting (``queue_s``: the provider's queue and cold start; the two clocks
        are the client's and the container's, so it is clamped at 0)."""
        if self.submitted is None:
            return {}
        starts = [a["t"] for a in attempts if a.get("event") == "start" and a.get("submitted") == self.submitted]
        if not starts:
            return {}
        return {"call_attempts": len(starts), "queue_s": max(0.0, min(starts) - self.submitted)}

    def commit_volume(self) -> None:
        if self.commit is not None:
            self.commit()


def run_stage_in_volume(kind: str, node_config: dict[str, Any], input_manifest: dict[str, Any],
                        volume_root: str | Path, *, commit: Callable[[], None] | None = None,
                        commit_every_s: float = 60.0, registry: Any = None,
                        launcher: Any = None, volume_files: tuple[Callable, Callable] | None = None) -> dict[str, Any]:
    """Run stage ``kind`` with ``node_config`` on the inputs listed in ``input_manifest`` (blobs
    already on the volume at ``volume_root``); returns the output manifest (see module doc).
    ``registry`` holds the stage kinds (default: the built-in ones and plugins). With a
    ``launcher`` (runner.backends.mapping), the stage's ``ctx.map_items`` runs over containers;
    ``volume_files`` (``read(rel, dest)``, ``remove(rel)``) reaches what they wrote on the volume
    (default: in the folder; Modal's go through the SDK)."""
    from runner.core.errors import UserError

    vol = FolderVolume(Path(volume_root))
    done = vol.read_result(input_manifest["key"])
    if done is not None:
        return {**done, "reused": True}
    if registry is None:
        from runner.stages import registry as stage_registry

        registry = stage_registry()
    stage = registry.get(kind)
    att = _begin_attempt(vol, input_manifest, stage, commit)
    shas: dict[str, str] = {}
    inputs = _materialize_inputs(vol, input_manifest, att.work, shas)
    ctx = _context(att, input_manifest)
    if launcher is not None:
        from runner.backends.mapping import VolumeMapper

        project = att.work / "project"
        always = {os.path.normpath(project / rel): sha for rel, sha, _size in input_manifest.get("project", [])}
        ctx.mapper = VolumeMapper(vol, att.key, att.work, shas, always, launcher, *(volume_files or ()))
    t0 = time.monotonic()
    try:
        with _Committer(commit, commit_every_s):
            outputs = stage.run(node_config, inputs, ctx)
    except UserError as exc:  # the user's problem: a failed result, not retried
        result = {**att.end("failed", ctx, time.monotonic() - t0), "error": str(exc), "hint": exc.hint}
        shutil.rmtree(att.work, ignore_errors=True)
        att.commit_volume()
        return result
    duration = time.monotonic() - t0
    listing, files = _store_outputs(vol, att.stage_id, outputs, att.work / "out")
    result = {**att.end("succeeded", ctx, duration), "outputs": listing, "files": files,
              "metric_history": ctx.metric_history, "finished": time.time()}
    atomic_write_text(att.root / result_relpath(att.key), json.dumps(result))
    if ctx.mapper is not None:
        ctx.mapper.cleanup()
    shutil.rmtree(att.scratch, ignore_errors=True)
    shutil.rmtree(att.root / WORK / att.key, ignore_errors=True)
    att.commit_volume()
    return result


def _begin_attempt(vol: FolderVolume, manifest: dict[str, Any], stage: Any,
                   commit: Callable[[], None] | None) -> _Attempt:
    """Record a new attempt (committed at once, so a preempted one still counts) and say how the
    stage would resume from the scratch folder an earlier attempt left."""
    root, key = vol.root, manifest["key"]
    number = 1 + sum(1 for a in _attempts(root, key) if a.get("event") == "start")
    submitted = manifest.get("submitted")
    _append_attempt(root, key, {"event": "start", "attempt": number, "t": time.time(),
                                "host": socket.gethostname(), "pid": os.getpid(), "submitted": submitted})
    if commit is not None:
        commit()
    work = root / WORK / key / f"attempt{number}"
    shutil.rmtree(work, ignore_errors=True)
    scratch = root / SCRATCH / key
    resume = stage.resume_info(scratch) if stage.resume_info and scratch.is_dir() else None
    return _Attempt(root, key, manifest["stage_id"], number, work, scratch, resume, commit,
                    float(submitted) if isinstance(submitted, (int, float)) else None)


def _materialize_inputs(vol: FolderVolume, manifest: dict[str, Any], work: Path,
                        shas: dict[str, str]) -> dict[str, Any]:
    """The stage's inputs as artifacts under ``work/project`` at their project-relative paths
    (``at``: where they lie in the client's project, its store included) or, for an input outside
    the project, under ``work/inputs``; and the project files it names under ``work/project``. So
    paths a stage derives from its inputs relative to the project root are those of a local run."""
    from runner.core import contract

    inputs: dict[str, contract.Artifact] = {}
    for name, entry in manifest.get("inputs", {}).items():
        at = entry.get("at")
        dest = work / "project" / at if isinstance(at, str) and ".." not in Path(at).parts else work / "inputs" / name
        path, files = _materialize(vol, entry, dest, shas)
        inputs[name] = contract.Artifact(name=name, path=path, digest=entry.get("digest", ""),
                                         files=files if entry.get("fileset") else (),
                                         meta=entry.get("meta", {}))
    project_root = work / "project"
    for rel, sha, _size in manifest.get("project", []):
        target = project_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vol.path(blob_relpath(sha)), target)
    project_root.mkdir(parents=True, exist_ok=True)
    return inputs


def _context(att: _Attempt, manifest: dict[str, Any]) -> LocalStageContext:
    """The stage's context next to the volume (the model cache on the volume), with the attempt's
    first log line written."""
    cache_dir = att.root / CACHE
    os.environ.setdefault("CHARACTER_RUNNER_CACHE", str(cache_dir))
    ctx = LocalStageContext(
        stage_id=att.stage_id, character=manifest.get("character", ""), out_dir=att.work / "out",
        scratch_dir=att.scratch, cache_dir=cache_dir, project_root=att.work / "project",
        run_id=manifest.get("run_id", "remote"), log_file=att.log_file,
        extra=dict(manifest.get("extra", {})),
    )
    ctx._write({"event": "start", "attempt": att.number, "resume": att.resume, "host": socket.gethostname()})
    return ctx


def _store_outputs(vol: FolderVolume, stage_id: str, outputs: Any, out_dir: Path) -> tuple[dict[str, Any], list]:
    """Check the stage's outputs lie in its output folder and store every file as a blob; returns
    (output name -> path/type/meta, [[relative path, sha256, size], ...])."""
    from runner.core import contract

    if not isinstance(outputs, dict):
        raise TypeError(f"stage {stage_id} returned {type(outputs).__name__}, not a dict of artifacts")
    out_dir = out_dir.resolve()
    listing: dict[str, Any] = {}
    for name, art in outputs.items():
        p = Path(art.path).resolve()
        try:
            rel = p.relative_to(out_dir).as_posix() or "."
        except ValueError:
            raise contract.StageError(f"stage {stage_id} output {name!r} is outside its output folder: {p}") from None
        if not p.exists():
            raise contract.StageError(f"stage {stage_id} output {name!r} does not exist: {p}")
        listing[name] = {"path": rel, "type": "dir" if p.is_dir() else "file", "meta": contract.jsonable(art.meta)}
    files = [[f.relative_to(out_dir).as_posix(), vol.put_blob(f), f.stat().st_size]
             for f in sorted(x for x in out_dir.rglob("*") if x.is_file())]
    return listing, files


def main(argv: list[str] | None = None) -> int:
    """``python -m runner.backends.worker [stage|map] --request R.json --volume-root DIR --result OUT.json``

    ``stage`` (the default): a stage call, the request {kind, config, manifest, map}; its ``map``
    ({python, retries}, from the folder transport) runs the stage's map over subprocesses.
    ``map``: one chunk of a stage's map (runner.backends.mapping.run_chunk_in_volume)."""
    from runner.backends import mapping

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=("stage", "map"), default="stage")
    ap.add_argument("--request", required=True, help="JSON: {kind, config, manifest, map}, or a map chunk")
    ap.add_argument("--volume-root", required=True)
    ap.add_argument("--result", required=True, help="where the output manifest is written")
    args = ap.parse_args(argv)
    req = json.loads(Path(args.request).read_text(encoding="utf-8"))
    try:
        if args.mode == "map":
            mapping.exit_with_parent()
            result = mapping.run_chunk_in_volume(req, args.volume_root)
        else:
            opts = req.get("map") or {}
            launcher = (mapping.SubprocessLauncher(opts.get("python") or sys.executable, args.volume_root,
                                                   int(opts.get("retries", 0))) if req.get("map") else None)
            result = run_stage_in_volume(req["kind"], req["config"], req["manifest"], args.volume_root,
                                         launcher=launcher)
    except Exception:
        traceback.print_exc()
        return 3
    atomic_write_text(Path(args.result), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
