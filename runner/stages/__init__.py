"""Stage kinds. Each module registers itself with :func:`runner.stages.base.register`.

To add a stage kind, add its module name to ``BUILTIN_STAGE_MODULES`` (pipeline order is given by
each kind's ``order``, not by this list).
"""

from __future__ import annotations

import importlib

BUILTIN_STAGE_MODULES = (
    "ingest",
    "report",
)

_loaded = False


def load_builtin_stages() -> None:
    global _loaded
    if _loaded:
        return
    for name in BUILTIN_STAGE_MODULES:
        importlib.import_module(f"runner.stages.{name}")
    _loaded = True
