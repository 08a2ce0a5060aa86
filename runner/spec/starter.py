"""`runner init NAME`: a commented starter spec that validates and that editors autocomplete."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from runner.core.fs import atomic_write_text, replace_folder
from runner.paths import file_name_problem
from runner.resources import resource_dir
from runner.spec.errors import Problem, SpecError
from runner.spec.resolve import find_project_root

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

TEMPLATE = """\
# yaml-language-server: $schema={schema}
# Spec for {name}. Every key is documented in the schema (your editor shows it on hover);
# `runner plan --resolved {spec_rel}` prints this spec with presets and defaults filled in.
version: 1

character:
  name: {name}
  display_name: {display}
  trigger: {trigger}            # a rare token that stands for the character in captions and prompts
  class_word: person            # what the character is: woman, man, 3d cartoon boy, ...
  description: ""
  traits:
    fixed: []                   # what must never change, e.g. "short curly brown hair"
    variable: []                # what may change, e.g. "outfit"
  references: []                # images or folders that define the identity, e.g. [../data/{name}/reference]

dataset:
  sources:
    - images: ../data/{name}/photos   # relative to this file
  shots:
    strategy: report            # report | select | reweight | augment
    targets:                    # share of the dataset per shot type, [min, max]
      close_up: [0.2, 0.35]
      medium: [0.25, 0.4]
      full_body: [0.15, 0.3]
      wide: [0.05, 0.15]

# Uncomment to train and evaluate (see `runner presets`):
# train:
#   preset: sdxl-character
# evaluate:
#   preset: sdxl-quality

hardware:
  backend: local                # local | modal
"""


def write_starter(name: str, folder: Path, *, force: bool = False) -> Path:
    if not NAME_RE.match(name) or file_name_problem(name):  # the spec must validate (not 'con')
        raise SpecError([Problem("(command line)", 1, 1, "NAME", f"'{name}' is not a valid character name",
                                 expected="lowercase letters, digits, '_' and '-', starting with a letter or digit",
                                 hint=file_name_problem(name) or "")])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    if path.exists() and not force:
        raise SpecError([Problem(str(path), 1, 1, "(file)", "file already exists",
                                 hint="Pass --force to overwrite it, or choose another name.")])
    schema_ref = _schema_reference(path)
    trigger = _trigger_for(name)
    text = TEMPLATE.format(
        schema=schema_ref,
        name=name,
        display=name.replace("_", " ").replace("-", " ").title(),
        trigger=trigger,
        spec_rel=path.as_posix(),
    )
    atomic_write_text(path, text)
    return path


def _trigger_for(name: str) -> str:
    # A rare-looking token from the name: consonants first, e.g. valentina -> vlntn.
    letters = re.sub(r"[^a-z]", "", name.lower())
    consonants = re.sub(r"[aeiou]", "", letters)
    token = (consonants or letters or "chr")[:6]
    return token + ("chr" if len(token) < 4 else "")


SCHEMA_FOLDER = "schema"  # next to the spec: <spec folder>/schema/character.schema.json


def _schema_reference(spec_path: Path) -> str:
    """The spec-relative path editors find the schema at, in every clone of the user's repo.

    In a checkout of character-runner itself the schema is a tracked file of the repo, so the spec
    points at it. Anywhere else (an installed package, a virtual environment inside the project,
    a git-ignored folder) the schema is copied next to the spec, into ``schema/``: files the user
    commits with the spec. ``runner init`` refreshes that copy."""
    schemas = resource_dir("schemas")
    spec_dir = spec_path.resolve().parent
    if _tracked_in_project(schemas, find_project_root(spec_path)):
        target = schemas / "character.schema.json"
    else:
        target = _copy_schema(schemas, spec_dir / SCHEMA_FOLDER) / "character.schema.json"
    return Path(os.path.relpath(target, spec_dir)).as_posix()


def _tracked_in_project(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is part of the project's own files: inside it, not in an installed
    package, and not ignored by its git (a fresh clone would not have it)."""
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    if "site-packages" in rel.parts or "dist-packages" in rel.parts:
        return False
    if not (root / ".git").exists():
        return True
    try:
        r = subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", str(rel / "character.schema.json")],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _copy_schema(schemas: Path, dest: Path) -> Path:
    """Replace ``dest`` with a copy of the schema files (JSON only)."""
    json_only = lambda d, names: [n for n in names if not n.endswith(".json") and not (Path(d) / n).is_dir()]  # noqa: E731
    return replace_folder(dest, lambda tmp: shutil.copytree(schemas, tmp, ignore=json_only))
