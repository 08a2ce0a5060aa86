"""The wheel ships schemas, templates and presets, and the core needs no heavy stack."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (whl,) = out.glob("character_runner-*.whl")
    return whl


def test_wheel_contains_resources_and_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "runner/_data/schemas/character.schema.json" in names
    assert "runner/_data/schemas/sections/train.schema.json" in names
    assert "runner/_data/templates/report.html.j2" in names
    assert any(n.startswith("runner/presets/train/") and n.endswith(".yaml") for n in names)
    assert not any(n.startswith(("specs/", "tests/")) or n.endswith(".jpg") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")][0]
    assert "runner = runner.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_core_requirements_are_light(wheel):
    meta_name = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA")][0]
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    names = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip().lower() for r in core}
    assert names <= {"pyyaml", "jsonschema", "referencing", "click", "rich", "jinja2", "pillow", "numpy"}
    assert {"faces", "train", "video", "modal", "serve", "all"} <= set(meta.get_all("Provides-Extra"))


def test_installed_wheel_finds_its_resources(wheel, tmp_path):
    # Unpack the wheel (no install needed) and load the schema and a preset from the unpacked copy.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import sys; sys.path.insert(0, %r);"
        "import runner.resources as r; p = r.schema_path(); assert '_data' in str(p), p;"
        "from runner.spec.resolve import list_presets; assert 'sdxl-character' in list_presets('train');"
        "print('ok')"
    ) % str(target)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
