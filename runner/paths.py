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


# --------------------------------------------------------------------------- names and paths

MAX_NAME_BYTES = 100  # a kohya folder '<repeats>_<trigger> <class>' stays under the 255-byte limit
_WINDOWS_RESERVED = '<>:"|?*'


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be (part of) a file or folder name, or None when it can.

    The one rule for every user value that reaches a file name (schema ``format: file-name``):
    no path separators, no '..', no control or invisible format characters, no leading dot (a
    hidden file), no characters Windows refuses, no leading or trailing space, at most 100 bytes.
    """
    import unicodedata

    if not name:
        return None
    for sep in ("/", "\\"):
        if sep in name:
            return f"it contains {sep!r}, a path separator"
    if ".." in name:
        return "it contains '..'"
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"it contains the control character U+{ord(ch):04X}"
        if ch in _WINDOWS_RESERVED:
            return f"it contains {ch!r}, which Windows does not allow in file names"
    if name.startswith("."):
        return "it starts with '.', which makes a hidden file"
    if name != name.strip():
        return "it starts or ends with a space"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def sub_path_problem(value: str) -> str | None:
    """Why ``value`` is not a relative path that stays inside its folder (``format: sub-path``),
    e.g. a weight file or subfolder inside a model repository; None when it is."""
    if value.startswith("~"):
        return "it starts with '~' (a home folder)"
    if value.startswith("/"):
        return "it is an absolute path"
    for part in value.split("/"):
        if part in ("", "."):
            continue
        problem = file_name_problem(part)
        if problem:
            return problem
    return None
