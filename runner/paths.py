"""Well-known folders.

- The cache root holds things that are expensive to make and safe to share between projects and
  runs, each keyed by content: built-in tiny models, downloaded/converted models, latent and
  text-embedding caches. ``CHARACTER_RUNNER_CACHE`` overrides it (tests point it at a temp folder).
  Stages get it as ``ctx.cache_dir``.
- The workspace (``<project>/.runner``) holds the state database, the lock, the artifact store,
  scratch space for resumable stages, and logs.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("CHARACTER_RUNNER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "character-runner"


def workspace_dir(project_root: Path) -> Path:
    return project_root / ".runner"
