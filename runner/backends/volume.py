"""The layout of a remote volume (a Modal Volume, or a plain folder standing in for one).

::

    blobs/<sha[:2]>/<sha256>     content-addressed files: stage inputs and outputs
    results/<key>.json           the output manifest of a finished stage (cache key = file name)
    scratch/<key>/               resumable state of a running stage (checkpoints), kept across
                                 preemptions and crashes, removed when the stage succeeds
    attempts/<key>.jsonl         one line per attempt at a stage (start, end), for resume and cost
    work/<key>/attempt<N>/       inputs materialized for one attempt, and its output folder
    cache/                       the model cache (CHARACTER_RUNNER_CACHE, HF_HOME) shared by calls
    map/<key>/<m>.<i>of<n>/      one chunk of a stage's map (hardware.stage_map): outputs.tar and
                                 records.jsonl, removed with its results/<key>-map<m>.<i>of<n>.json
                                 when the stage succeeds (runner.backends.mapping)

Inputs go up only when the volume lacks their digest, and outputs come back the same way: a
file is fetched only when no local file with its digest is known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

from runner.core.fs import copy_atomic
from runner.core.hashing import file_sha256 as sha256_file

BLOBS = "blobs"
RESULTS = "results"
SCRATCH = "scratch"
ATTEMPTS = "attempts"
WORK = "work"
CACHE = "cache"
MAP = "map"


def blob_relpath(sha: str) -> str:
    return f"{BLOBS}/{sha[:2]}/{sha}"


def result_relpath(key: str) -> str:
    return f"{RESULTS}/{key}.json"


class FolderVolume:
    """A folder with the volume layout. Used inside the worker (the Modal Volume is mounted as a
    folder there) and, from the client side, by the folder transport that stands in for Modal."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    # client-side operations (the Modal transport implements the same ones over the SDK)
    def missing(self, shas: Iterable[str]) -> set[str]:
        return {s for s in shas if not (self.root / blob_relpath(s)).is_file()}

    def upload(self, files: dict[str, Path]) -> None:
        for sha, src in files.items():
            dest = self.root / blob_relpath(sha)
            if not dest.is_file():
                copy_atomic(Path(src), dest)

    def fetch(self, sha: str, dest: Path) -> None:
        copy_atomic(self.root / blob_relpath(sha), dest)

    def read_result(self, key: str) -> dict[str, Any] | None:
        p = self.root / result_relpath(key)
        if not p.is_file():
            return None
        return json.loads(p.read_text(encoding="utf-8"))

    # worker-side
    def materialize(self, sha: str, rel: str, target: Path) -> None:
        """Copy blob ``sha`` (an input file known as ``rel``) to ``target``, making its folder."""
        src = self.root / blob_relpath(sha)
        if not src.is_file():
            raise FileNotFoundError(f"input blob {sha} ({rel}) is missing from the volume")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)

    def put_blob(self, src: Path, sha: str | None = None) -> str:
        sha = sha or sha256_file(src)
        dest = self.root / blob_relpath(sha)
        if not dest.is_file():
            copy_atomic(src, dest)
        return sha
