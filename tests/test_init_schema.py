"""`runner init` writes a $schema path that exists in a fresh clone of the user's repo, wherever
character-runner is installed: outside the project, in a virtual environment inside it (ignored
by git), or as the project itself (a checkout of character-runner, schema tracked)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from runner.resources import resource_dir
from runner.spec import starter

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "HOME": str(cwd), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def schema_target(spec: Path) -> Path:
    first = spec.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    ref = first[len(prefix):]
    assert not Path(ref).is_absolute()
    return spec.parent / ref


def check_in_fresh_clone(repo: Path, spec_rel: str, tmp_path: Path) -> Path:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "spec")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    target = schema_target(clone / spec_rel)
    assert target.is_file(), f"{target} is missing from a fresh clone"
    schema = json.loads(target.read_text())
    assert schema["title"] == "character-runner spec"
    # the editor follows the sections' $refs relative to the file
    for ref in schema["properties"].values():
        if "$ref" in ref:
            assert (target.parent / ref["$ref"]).is_file(), ref
    # and the spec validates against the cloned schema
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    import yaml

    docs = {p.resolve().as_uri(): json.loads(p.read_text()) for p in target.parent.rglob("*.schema.json")}
    registry = Registry().with_resources((uri, Resource.from_contents(d)) for uri, d in docs.items())
    root = {**schema, "$id": target.resolve().as_uri()}
    data = yaml.safe_load((clone / spec_rel).read_text())
    errors = list(Draft202012Validator(root, registry=registry).iter_errors(data))
    assert not errors, errors[0].message
    return target


def installed_at(monkeypatch, folder: Path) -> None:
    """character-runner's shipped schemas live at ``folder`` (as in an installed package)."""
    shutil.copytree(resource_dir("schemas"), folder)
    monkeypatch.setattr(starter, "resource_dir", lambda name: folder)


def test_package_outside_the_project(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "hero-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text(".runner/\n")  # the workspace: store, state, logs
    installed_at(monkeypatch, tmp_path / "site-packages" / "runner" / "_data" / "schemas")
    starter.write_starter("hero", repo / "specs")
    target = check_in_fresh_clone(repo, "specs/hero.yaml", tmp_path)
    assert target.resolve().parent.parent == (tmp_path / "clone" / "specs").resolve()


def test_virtual_environment_inside_the_project_is_not_in_a_clone(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "hero-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text(".venv/\n.runner/\n")
    installed_at(monkeypatch, repo / ".venv" / "lib" / "python3.11" / "site-packages" / "runner" / "_data" / "schemas")
    starter.write_starter("hero", repo / "characters")
    target = check_in_fresh_clone(repo, "characters/hero.yaml", tmp_path)
    assert ".venv" not in target.parts and ".runner" not in target.parts


def test_checkout_of_character_runner_points_at_its_tracked_schema(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "character-runner"
    repo.mkdir()
    git(repo, "init", "-q")
    installed_at(monkeypatch, repo / "schemas")
    git(repo, "add", "schemas")
    git(repo, "commit", "-q", "-m", "schemas")
    spec = starter.write_starter("hero", repo / "specs")
    assert schema_target(spec).resolve() == (repo / "schemas" / "character.schema.json").resolve()
    assert not (repo / "specs" / starter.SCHEMA_FOLDER).exists()
    check_in_fresh_clone(repo, "specs/hero.yaml", tmp_path)


def test_init_again_refreshes_the_copy(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "runner.toml").write_text("")
    installed_at(monkeypatch, tmp_path / "pkg" / "schemas")
    starter.write_starter("hero", repo / "specs")
    stale = repo / "specs" / starter.SCHEMA_FOLDER / "sections" / "train.schema.json"
    stale.write_text("{}")
    starter.write_starter("villain", repo / "specs")
    assert json.loads(stale.read_text())["title"] == "train"
    assert schema_target(repo / "specs" / "hero.yaml") == schema_target(repo / "specs" / "villain.yaml")
