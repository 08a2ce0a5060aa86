"""`runner init NAME [--family F]`: a commented starter spec that validates and that editors autocomplete.

With ``--family`` the spec trains and evaluates with that model family's presets. Which presets a
family starts from is data: a training preset's ``init:`` block (``family``: the registry family
it is the starter of; ``names``: other values ``--family`` accepts, e.g. ``flux``; ``evaluate``:
the inference preset that goes with it), so no family is named here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runner.core.errors import UserError
from runner.core.fs import atomic_write_text, replace_folder
from runner.paths import file_name_problem
from runner.resources import resource_dir
from runner.spec.errors import Problem, SpecError
from runner.spec.resolve import find_project_root, list_presets

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
{references}

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

{train_block}
hardware:
  backend: local                # local | modal
"""


NO_TRAIN_BLOCK = """\
# Uncomment to train and evaluate (see `runner presets`; `runner init NAME --family flux1` writes this for a family):
# train:
#   preset: sdxl-character
# evaluate:
#   preset: sdxl-quality
"""

TRAIN_BLOCK = """\
train:
  preset: {train}{train_pad} # see `runner presets`; every key of the preset can be overridden here
  # base_model: {base_model}   # the preset's; or a diffusers folder / a single .safetensors file
{evaluate_block}"""


@dataclass(frozen=True)
class Starter:
    """What ``runner init --family`` writes for one family: its training preset, the preset's model
    and family, and the inference preset that goes with it."""

    train: str
    family: str
    base_model: str
    evaluate: str | None


def family_starters() -> dict[str, Starter]:
    """``--family`` value -> its :class:`Starter`, from the training presets' ``init:`` blocks."""
    import yaml

    out: dict[str, Starter] = {}
    for preset, path in list_presets("train").items():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        init, values = data.get("init"), data.get("values") or {}
        if not isinstance(init, dict):
            continue
        starter = Starter(train=preset, family=str(values.get("model_family", "auto")),
                          base_model=str(values.get("base_model", "")), evaluate=init.get("evaluate"))
        for key in ([init["family"]] if init.get("family") else []) + list(init.get("names") or []):
            out[str(key)] = starter
    return out


def starter_for(family: str) -> Starter:
    starters = family_starters()
    if family not in starters:
        families = sorted({s.family for s in starters.values()})
        others = sorted(k for k in starters if k not in families)
        raise UserError(f"--family {family!r} is not a model family runner init knows",
                        hint=f"Families: {', '.join(families)} (also: {', '.join(others)}).")
    return starters[family]


def _train_block(family: str | None) -> str:
    if family is None:
        return NO_TRAIN_BLOCK
    s = starter_for(family)
    evaluate = f"evaluate:\n  preset: {s.evaluate}\n" if s.evaluate else ""
    return TRAIN_BLOCK.format(train=s.train, train_pad=" " * max(1, 22 - len(s.train)), base_model=s.base_model,
                              evaluate_block=evaluate)


def write_starter(name: str, folder: Path, *, force: bool = False, family: str | None = None) -> Path:
    if not NAME_RE.match(name) or file_name_problem(name):  # the spec must validate (not 'con')
        raise SpecError([Problem("(command line)", 1, 1, "NAME", f"'{name}' is not a valid character name",
                                 expected="lowercase letters, digits, '_' and '-', starting with a letter or digit",
                                 hint=file_name_problem(name) or "")])
    if family is not None:
        starter_for(family)  # an unknown family fails before anything is written
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
        train_block=_train_block(family),
        references=(f"  references: [../data/{name}/references]   # images that define the identity; "
                    "the evaluation compares with them" if family else
                    f"  references: []                # images or folders that define the identity, "
                    f"e.g. [../data/{name}/reference]"),
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
