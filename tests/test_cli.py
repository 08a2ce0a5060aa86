"""End to end through the `runner` command, as a user runs it, on a copy of the demo project."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def runner(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"runner {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "project"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    shutil.copy(REPO / "specs" / "demo.yaml", root / "specs" / "demo.yaml")
    shutil.copytree(REPO / "specs" / "demo", root / "specs" / "demo")
    return root


@pytest.mark.slow  # the whole demo apply: about 90 s
def test_demo_apply_then_noop_then_change(demo_project):
    r = runner("apply", "specs/demo.yaml", cwd=demo_project, check=True)
    assert "Plan:" in r.stdout and "Apply complete" in r.stdout
    report_line = [line for line in r.stdout.splitlines() if line.startswith("Report for demo:")]
    assert report_line, r.stdout
    report = demo_project / report_line[0].split(": ", 1)[1]
    assert report.is_file() and report.stat().st_size > 10_000
    assert "Traceback" not in r.stderr

    again = runner("apply", "specs/demo.yaml", cwd=demo_project, check=True)
    assert "No changes" in again.stdout

    assert runner("plan", "specs/demo.yaml", "--detailed-exitcode", cwd=demo_project).returncode == 0
    plan = json.loads(runner("plan", "specs/demo.yaml", "--json", cwd=demo_project, check=True).stdout)
    assert plan["changes"] is False
    assert {s["action"] for s in plan["stages"]} == {"cached"}
    assert {"stage", "kind", "action", "reason"} <= set(plan["stages"][0])

    spec = demo_project / "specs" / "demo.yaml"
    spec.write_text(spec.read_text().replace("max_side: 1024", "max_side: 800"))
    r = runner("plan", "specs/demo.yaml", "--detailed-exitcode", cwd=demo_project)
    assert r.returncode == 2
    assert "config max_side changed: 1024 -> 800" in r.stdout

    status = runner("status", "specs/demo.yaml", cwd=demo_project, check=True)
    assert "lock:      free" in status.stdout and "out of date" in status.stdout
    runs = runner("runs", cwd=demo_project, check=True)
    assert "succeeded" in runs.stdout and "no-op" in runs.stdout


def test_plan_resolved_and_presets(demo_project):
    r = runner("plan", "--resolved", "specs/demo.yaml", cwd=demo_project, check=True)
    assert "trigger: dmochr" in r.stdout and "max_pixels: 64000000" in r.stdout
    sc = runner("plan", "--scenes", "specs/demo.yaml", cwd=demo_project, check=True)
    assert "Storyboard scenes for demo (rules planner):" in sc.stdout
    assert "prompt: dmochr man, close-up portrait, He greets the reporters with a smile" in sc.stdout
    p = runner("presets", cwd=demo_project, check=True)
    assert "sdxl-character" in p.stdout and "aggressive-quality" in p.stdout


def test_bad_input_messages(demo_project, tmp_path):
    r = runner("apply", "specs/nope.yaml", cwd=demo_project)
    assert r.returncode == 2 and "spec file not found" in r.stderr and "Traceback" not in r.stderr
    r = runner("plan", "specs/demo.yaml", "--only", "nosuchstage", cwd=demo_project)
    assert r.returncode == 2 and "no stage matches 'nosuchstage'" in r.stderr
    r = runner("runs", "--project", str(tmp_path), cwd=demo_project)
    assert r.returncode == 2 and "nothing has been applied here yet" in r.stderr


def test_init_then_validate(tmp_path):
    (tmp_path / "runner.toml").write_text("")
    r = runner("init", "valentina2", cwd=tmp_path, check=True)
    assert "wrote specs/valentina2.yaml" in r.stdout
    v = runner("validate", "specs/valentina2.yaml", cwd=tmp_path, check=True)
    assert "ok (valentina2)" in v.stdout
    first = (tmp_path / "specs" / "valentina2.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=schema/character.schema.json"  # a copy committed with the spec
