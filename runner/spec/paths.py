"""Where a spec's paths may point: the outside-project rule, in one place.

Every path-valued key is marked in the schema with ``"x-path": <kind>``; ``runner.spec.resolve``
walks the schema and hands each such value to :class:`PathRules`, so a new path key is covered as
soon as it is declared (tests/test_spec_trust.py walks the schema to prove it). The kinds:

- ``data``: files or folders the runner reads (image folders, videos, references, control images,
  class images).
- ``named-or-data``: one of the names the schema lists (``x-names``, or the shipped presets folder
  named by ``x-names-dir``), else a data path (a LoRA file, a prompt-suite file, a source image).
- ``model``: a hub id (``org/name``) or ``builtin:...`` name, else a local file or folder.
- ``preset``: a shipped preset name, else a path to a preset YAML file.
- ``output``: a folder the runner writes (``report.output_dir``); null means ``x-project-default``
  under the project root.
- ``cache``: a shared cache outside any project (``~/.insightface``), like the Hugging Face cache:
  not subject to the rule.

The rule: relative paths are relative to the spec file; after resolving every symlink, a path
(and, for a folder, every symlink inside it that the runner would read) must stay inside the
project folder unless ``--allow-outside-project`` is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.paths import inside, links_leaving

CHECKED_KINDS = ("data", "named-or-data", "model", "preset", "output")
EXEMPT_KINDS = ("cache",)
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".onnx", ".gguf")
DATA_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9_+.-]*:(?![\\/])")  # builtin:tiny-sd, open_clip:ViT-B-32
OUTSIDE_HINT = ("Keep it inside the project (move or copy what it names there), "
                "or pass --allow-outside-project if this is intended.")
MAX_LINKS_LISTED = 5
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux


@dataclass(frozen=True)
class PathRules:
    spec_dir: Path
    project_root: Path
    allow_outside: bool = False

    def locate(self, value: str) -> tuple[Path | None, str]:
        """The resolved path of a spec value and '' , or the problem with it."""
        shown = value if len(value) <= 80 else value[:77] + "..."
        try:
            p = (self.spec_dir / Path(value).expanduser()).resolve()
        except (RuntimeError, OSError) as exc:  # unknown ~user, a symlink loop
            return None, f"path '{shown}' cannot be resolved: {exc}"
        if len(str(p).encode()) >= MAX_PATH_BYTES or any(len(part.encode()) > 255 for part in p.parts):
            return None, f"path '{shown}' is too long for the file system (a name over 255 bytes or a path over 4 KiB)"
        if not self.allow_outside and not inside(p, self.project_root):
            return p, f"path '{value}' resolves to {p}, outside the project folder {self.project_root}"
        return p, ""

    def links_out(self, folder: Path, recursive: bool = True) -> str:
        """A problem naming the symlinks under ``folder`` that lead outside the project, or ''."""
        if self.allow_outside or not os.path.isdir(folder):
            return ""
        links = links_leaving(folder, self.project_root, recursive=recursive)
        if not links:
            return ""
        listed = ", ".join(f"{rel} -> {target}" for rel, target in links[:MAX_LINKS_LISTED])
        more = f" and {len(links) - MAX_LINKS_LISTED} more" if len(links) > MAX_LINKS_LISTED else ""
        return (f"{folder} holds symbolic links that lead outside the project folder "
                f"{self.project_root}: {listed}{more}")

    def normalize(self, p: Path) -> str:
        """How the resolved spec holds a path: relative to the project root when inside it."""
        try:
            return p.relative_to(self.project_root).as_posix() or "."
        except ValueError:
            return str(p)


def is_path(value: str, kind: str, sch: dict[str, Any], rules: PathRules) -> bool:
    """Whether a value of an ``x-path`` key names a file or folder (else a name, hub id, ...)."""
    if kind == "named-or-data":
        return value not in declared_names(sch)
    if kind == "model":
        return is_local_model(value, rules.spec_dir, rules.project_root)
    return kind in ("data", "output", "preset")


def declared_names(sch: dict[str, Any]) -> set[str]:
    """The names a ``named-or-data`` key accepts: ``x-names`` and the shipped ``x-names-dir``."""
    names = set(sch.get("x-names", []))
    if sch.get("x-names-dir"):
        from runner.resources import resource_dir

        names |= {p.stem for p in (resource_dir("presets") / sch["x-names-dir"]).glob("*.yaml")}
    return names


def is_local_model(value: str, spec_dir: Path, project_root: Path) -> bool:
    """A model value is a local path unless it is a ``scheme:`` name or looks like a hub id
    (``name`` or ``org/name``) that names nothing next to the spec, nor in the project root (where
    the loaders look for project-relative paths: such a value is checked as a path too)."""
    if _SCHEME.match(value):
        return False
    if value.startswith(("./", "../", "/", "~")) or "\\" in value:
        return True
    if value.endswith(MODEL_FILE_SUFFIXES + DATA_FILE_SUFFIXES):
        return True
    parts = value.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts):
        return True  # a hub id has at most one '/', no '.' or '..' parts, no name a file could not have
    return os.path.lexists(spec_dir / value) or os.path.lexists(project_root / value)
