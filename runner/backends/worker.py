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
4. its outputs are stored as blobs, the output manifest goes to ``results/<key>.json``, the
   scratch and work folders are removed, the volume is committed, and the manifest returned.

A :class:`runner.stages.contract.StageError` (the user's problem) comes back as a ``failed``
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
from pathlib import Path
from typing import Any, Callable

from runner.backends.volume import (
    ATTEMPTS,
    CACHE,
    SCRATCH,
    WORK,
    FolderVolume,
    atomic_write_text,
    blob_relpath,
    result_relpath,
)

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


def _materialize(vol: FolderVolume, entry: dict[str, Any], dest: Path) -> tuple[Path, tuple[Path, ...]]:
    """Copy an input's blobs into ``dest``; returns (artifact path, listed files)."""
    files = []
    for rel, sha, _size in entry["files"]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = vol.path(blob_relpath(sha))
        if not src.is_file():
            raise FileNotFoundError(f"input blob {sha} ({rel}) is missing from the volume")
        shutil.copyfile(src, target)
        files.append(target)
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
        events = events[: MAX_EVENTS // 2] + [{"event": "log", "level": "info", "message": "(events elided)"}] + events[-MAX_EVENTS // 2:]
    return events


def run_stage_in_volume(kind: str, node_config: dict[str, Any], input_manifest: dict[str, Any],
                        volume_root: str | Path, *, commit: Callable[[], None] | None = None,
                        commit_every_s: float = 60.0) -> dict[str, Any]:
    """Run stage ``kind`` with ``node_config`` on the inputs listed in ``input_manifest`` (blobs
    already on the volume at ``volume_root``); returns the output manifest (see module doc)."""
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.stages import registry as stage_registry

    root = Path(volume_root)
    vol = FolderVolume(root)
    key = input_manifest["key"]
    stage_id = input_manifest["stage_id"]
    done = vol.read_result(key)
    if done is not None:
        return {**done, "reused": True}

    stage = stage_registry().get(kind)
    previous = _attempts(root, key)
    attempt = 1 + sum(1 for a in previous if a.get("event") == "start")
    started = time.time()
    _append_attempt(root, key, {"event": "start", "attempt": attempt, "t": started,
                                "host": socket.gethostname(), "pid": os.getpid()})
    if commit is not None:
        commit()
    work = root / WORK / key / f"attempt{attempt}"
    shutil.rmtree(work, ignore_errors=True)
    scratch = root / SCRATCH / key
    resume = stage.resume_info(scratch) if stage.resume_info and scratch.is_dir() else None

    inputs: dict[str, contract.Artifact] = {}
    for name, entry in input_manifest.get("inputs", {}).items():
        path, files = _materialize(vol, entry, work / "inputs" / name)
        inputs[name] = contract.Artifact(name=name, path=path, digest=entry.get("digest", ""),
                                     files=files if entry.get("fileset") else (),
                                     meta=entry.get("meta", {}))
    project_root = work / "project"
    for rel, sha, _size in input_manifest.get("project", []):
        target = project_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vol.path(blob_relpath(sha)), target)
    project_root.mkdir(parents=True, exist_ok=True)

    cache_dir = root / CACHE
    os.environ.setdefault("CHARACTER_RUNNER_CACHE", str(cache_dir))
    log_file = work / "log.jsonl"
    ctx = LocalStageContext(
        stage_id=stage_id, character=input_manifest.get("character", ""), out_dir=work / "out",
        scratch_dir=scratch, cache_dir=cache_dir, project_root=project_root,
        run_id=input_manifest.get("run_id", "remote"), log_file=log_file,
        extra=dict(input_manifest.get("extra", {})),
    )
    ctx._write({"event": "start", "attempt": attempt, "resume": resume, "host": socket.gethostname()})
    t0 = time.monotonic()
    try:
        with _Committer(commit, commit_every_s):
            outputs = stage.run(node_config, inputs, ctx)
    except contract.StageError as exc:
        duration = time.monotonic() - t0
        _append_attempt(root, key, {"event": "end", "attempt": attempt, "t": time.time(), "status": "failed"})
        billed, n = billed_seconds(_attempts(root, key), time.time())
        result = {"status": "failed", "stage_id": stage_id, "key": key, "error": str(exc), "hint": exc.hint,
                  "attempt": attempt, "attempts": n, "billed_s": billed, "duration_s": duration,
                  "resumed": resume, "metrics": ctx.metrics, "warnings": ctx.warnings,
                  "events": _read_events(log_file)}
        shutil.rmtree(work, ignore_errors=True)
        if commit is not None:
            commit()
        return result
    duration = time.monotonic() - t0

    if not isinstance(outputs, dict):
        raise TypeError(f"stage {stage_id} returned {type(outputs).__name__}, not a dict of artifacts")
    out_dir = (work / "out").resolve()
    listing: dict[str, Any] = {}
    for name, art in outputs.items():
        p = Path(art.path).resolve()
        try:
            rel = p.relative_to(out_dir).as_posix() or "."
        except ValueError:
            raise contract.StageError(f"stage {stage_id} output {name!r} is outside its output folder: {p}") from None
        if not p.exists():
            raise contract.StageError(f"stage {stage_id} output {name!r} does not exist: {p}")
        listing[name] = {"path": rel, "type": "dir" if p.is_dir() else "file",
                         "meta": contract.jsonable(art.meta)}
    files = []
    for f in sorted(x for x in out_dir.rglob("*") if x.is_file()):
        sha = vol.put_blob(f)
        files.append([f.relative_to(out_dir).as_posix(), sha, f.stat().st_size])
    _append_attempt(root, key, {"event": "end", "attempt": attempt, "t": time.time(), "status": "succeeded"})
    billed, n = billed_seconds(_attempts(root, key), time.time())
    result = {
        "status": "succeeded", "stage_id": stage_id, "key": key, "outputs": listing, "files": files,
        "metrics": ctx.metrics, "metric_history": ctx.metric_history, "warnings": ctx.warnings,
        "events": _read_events(log_file), "attempt": attempt, "attempts": n, "billed_s": billed,
        "duration_s": duration, "resumed": resume, "finished": time.time(),
    }
    atomic_write_text(root / result_relpath(key), json.dumps(result))
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(root / WORK / key, ignore_errors=True)
    if commit is not None:
        commit()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m runner.backends.worker --request R.json --volume-root DIR --result OUT.json``"""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--request", required=True, help="JSON: {kind, config, manifest}")
    ap.add_argument("--volume-root", required=True)
    ap.add_argument("--result", required=True, help="where the output manifest is written")
    args = ap.parse_args(argv)
    req = json.loads(Path(args.request).read_text(encoding="utf-8"))
    try:
        result = run_stage_in_volume(req["kind"], req["config"], req["manifest"], args.volume_root)
    except Exception:
        traceback.print_exc()
        return 3
    atomic_write_text(Path(args.result), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
