"""Build something into the shared cache exactly once, safely across processes.

Used for the built-in tiny models (diffusion, CLIP/DINO, IP-Adapter, ControlNet, LTX): the build
goes into a temporary sibling folder, a marker file is written last, and the folder is renamed
into place (:func:`runner.core.fs.replace_folder`) under an inter-process lock, so a killed build
never leaves a half-written model and concurrent builders wait for one another instead of racing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from runner.core.fs import replace_folder


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: msvcrt byte lock
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
        yield
    finally:
        fh.close()  # closing the descriptor releases the lock


def build_once(final: Path, build: Callable[[Path], None], *, marker: str = "DONE",
               marker_text: str = "ok\n", notes: dict[str, str] | None = None) -> Path:
    """Return ``final``, building it with ``build(tmp_folder)`` first if its marker is missing.

    ``notes`` are extra files (name -> text) written next to what ``build`` made, e.g. a
    TINY_RANDOM_MODEL.txt that labels the folder for anyone who finds it.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / marker).is_file():  # another process built it meanwhile
            return final

        def fill(tmp: Path) -> None:
            tmp.mkdir()
            build(tmp)
            for name, text in (notes or {}).items():
                (tmp / name).write_text(text)
            (tmp / marker).write_text(marker_text)

        replace_folder(final, fill)
    return final
