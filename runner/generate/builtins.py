"""Build-once folders for the generation stages' tiny random models (``builtin:tiny-ltx``,
``builtin:tiny-ip-adapter``, ...): built into a temporary sibling under an inter-process lock
(:func:`runner.diffusion.tiny.file_lock`), then renamed into place, so a killed build never leaves
a half-written model and concurrent builders wait for one another."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(final: Path, builder: Callable[[Path], None], note: str) -> Path:
    """Return ``final``, building it with ``builder(tmp_folder)`` first when it is not complete.

    ``note`` goes into TINY_RANDOM_MODEL.txt beside the weights; a ``DONE`` file marks completion.
    """
    from runner.diffusion.tiny import file_lock
    from runner.metrics.embedders import _quiet_transformers

    final = Path(final)
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / "DONE").is_file():  # another process built it meanwhile
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
        try:
            with _quiet_transformers():
                builder(tmp)
            (tmp / "TINY_RANDOM_MODEL.txt").write_text(note.rstrip() + "\n")
            (tmp / "DONE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
