"""Stage kinds. Each module registers itself with :func:`runner.core.contract.register`.

To add a stage kind, add its module name to ``BUILTIN_STAGE_MODULES`` (pipeline order is given by
each kind's ``order``, not by this list). Stage kinds of your own live in any importable module
named in the ``CHARACTER_RUNNER_STAGE_PLUGINS`` environment variable (comma-separated).
"""

from __future__ import annotations

import importlib
import os

from runner.core.contract import BUILTIN, Registry

BUILTIN_STAGE_MODULES = (
    "ingest",
    "video_identity",
    "video_clips",
    "analyze",
    "curate",
    "extract",
    "caption",
    "export",
    "train",
    "train_video",
    "evaluate",
    "evaluate_video",
    "storyboard",
    "video",
    "report",
)

_loaded = False


def load_builtin_stages() -> None:
    global _loaded
    if _loaded:
        return
    for name in BUILTIN_STAGE_MODULES:
        importlib.import_module(f"runner.stages.{name}")
    for name in filter(None, (m.strip() for m in os.environ.get("CHARACTER_RUNNER_STAGE_PLUGINS", "").split(","))):
        importlib.import_module(name)
    _loaded = True


def registry() -> Registry:
    """The registry of built-in stage kinds and plugins (imported on first use)."""
    load_builtin_stages()
    return BUILTIN

