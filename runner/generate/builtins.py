"""Build-once folders for the generation stages' tiny random models (``builtin:tiny-ltx``,
``builtin:tiny-ip-adapter``, ...), through :func:`runner.buildcache.build_once`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def build_once(final: Path, builder: Callable[[Path], None], note: str) -> Path:
    """Return ``final``, building it with ``builder(tmp_folder)`` first when it is not complete.

    ``note`` goes into TINY_RANDOM_MODEL.txt beside the weights; a ``DONE`` file marks completion.
    """
    from runner.buildcache import build_once as _build_once
    from runner.metrics.embedders import _quiet_transformers

    def quiet_builder(tmp: Path) -> None:
        with _quiet_transformers():
            builder(tmp)

    return _build_once(Path(final), quiet_builder, notes={"TINY_RANDOM_MODEL.txt": note.rstrip() + "\n"})
