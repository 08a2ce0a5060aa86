"""The one atomic write: a temporary file next to the target, renamed over it.

A reader sees the old file or the complete new one, never half of one, and a crash leaves at most
a hidden ``.<name>.<random>.tmp`` file behind. Writing replaces a symlink at the target instead of
writing through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique name beside ``path`` (same folder, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it is renamed over
    ``path``, on an exception it is removed. For writers that want a file name (torch.save,
    safetensors, PIL, sqlite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def copy_atomic(src: Path | str, dest: Path | str) -> None:
    """Copy ``src`` to ``dest`` so that ``dest`` never holds a partial copy."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def replace_folder(dest: Path, fill: Callable[[Path], Any]) -> Path:
    """Replace folder ``dest`` with a new one that ``fill(tmp)`` builds, by renames: a reader sees
    the old folder or the complete new one, and a crash while filling leaves ``dest`` as it was.
    ``fill`` gets the path of a folder that does not exist yet (``shutil.copytree`` makes it);
    when it raises, what it made is removed."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
