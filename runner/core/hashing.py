"""Content hashes of files, and the stat-keyed index that remembers them.

One implementation for the engine (file-set digests), the backends (what to upload, what is
already here) and the stages. A file is re-read only when its (size, mtime_ns, inode) changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def stat_signature(st: os.stat_result) -> tuple[int, int, int]:
    """What says a file is unchanged without reading it: size, mtime in ns, inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


class HashIndex:
    """sha256 of the files under one root, keyed by relative path and remembered with their stat
    signature. Where the entries are kept (a database row, a JSON file) is the caller's business:
    it passes the loaded entries in and saves :attr:`entries` when :attr:`changed`.

    ``hasher`` reads a file's content hash (the engine passes its own so tests can count reads).
    """

    def __init__(self, entries: dict[str, Any] | None = None, hasher=file_sha256) -> None:
        # rel -> (size, mtime_ns, inode, sha256); read only, never copied (a root may hold 100k)
        self.old: dict[str, Any] = entries if entries is not None else {}
        self.entries: dict[str, tuple] = {}
        self.hasher = hasher
        self._rehashed = False

    def sha256(self, rel: str, path: Path | str, st: os.stat_result | None = None) -> str:
        """The content hash of ``path`` (known as ``rel``), read only if its signature changed."""
        st = st if st is not None else os.stat(path)
        sig = stat_signature(st)
        hit = self.old.get(rel)
        if hit is not None and tuple(hit[:3]) == sig:
            sha = hit[3]
        else:
            sha = self.hasher(path)
            self._rehashed = True
        self.entries[rel] = (*sig, sha)
        return sha

    def remember(self, rel: str, path: Path | str, sha: str) -> None:
        """Record a file whose hash is known (downloaded by digest) without reading it."""
        self.entries[rel] = (*stat_signature(os.stat(path)), sha)
        self._rehashed = True

    @property
    def rehashed(self) -> bool:
        """Whether a file was read (new or changed signature) or remembered since loading."""
        return self._rehashed

    @property
    def changed(self) -> bool:
        """Whether the entries differ from what was loaded (a file re-read, added or gone)."""
        return self._rehashed or set(self.entries) != set(self.old)
