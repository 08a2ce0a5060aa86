"""Through the `runner` command: plan previews the scenes without a GPU, apply runs storyboard ->
video with tiny random models (a LoRA given by path, so no training), the report shows both,
and a second apply does nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_cli import runner
from test_storyboard import make_lora

SPEC = """\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  references: [../refs]
  traits: {fixed: ["short grey hair"]}
evaluate: {face_model: dlib, clip_model: "builtin:tiny-clip"}
generate:
  checkpoint: ../lora/checkpoint-10/pytorch_lora_weights.safetensors
  base_model: "builtin:tiny-sd"
  storyboard:
    planner: rules
    story: "Hero walks into the old market. He smiles at a child! Then he rides away across the fields."
    min_scenes: 3
    max_scenes: 4
    steps: 2
    width: 64
    height: 64
    validation: {face_similarity: 0.7, retries: 1}
  video:
    model: "builtin:tiny-ltx"
    preset: baseline
    key_frames: [2]
    frames: 9
    fps: 8
    width: 64
    height: 64
    steps: 2
    fidelity: {frames: 3}
    targets: {max_seconds: 120, max_cost: 1}
hardware: {device: cpu}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("sbapply") / "project"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    (root / "refs").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", root / "refs")
    make_lora(root / "lora", root / ".cache")
    (root / "specs" / "hero.yaml").write_text(SPEC)
    return root


@pytest.mark.slow
def test_plan_preview_apply_report_noop(project: Path) -> None:
    prev = runner("storyboard-preview", "specs/hero.yaml", cwd=project)
    assert prev.returncode == 0, prev.stderr
    lines = prev.stdout.splitlines()
    assert lines[0] == "  1. [full_body] Hero walks into the old market."
    assert lines[1] == "     character: in the scene (names the character ('hero'))"
    assert lines[5] == "     prompt: hrochr man, close-up portrait, He smiles at a child, short grey hair"
    scenes = json.loads(runner("storyboard-preview", "specs/hero.yaml", "--json", cwd=project).stdout)
    assert [s["shot"] for s in scenes] == ["full_body", "close_up", "wide"]

    plan = json.loads(runner("plan", "specs/hero.yaml", "--json", cwd=project).stdout)
    assert [s["stage"] for s in plan["stages"]] == ["hero:storyboard", "hero:video", "hero:report"]

    r = runner("apply", "specs/hero.yaml", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    report_line = [line for line in r.stdout.splitlines() if line.startswith("Report for hero:")]
    html = (project / report_line[0].split(": ", 1)[1]).read_text()
    assert 'id="storyboard"' in html and 'id="video"' in html
    assert "He smiles at a child!" in html and html.count('src="data:video/mp4;base64,') == 1
    assert html.count("Tiny random models.") >= 2
    again = runner("apply", "specs/hero.yaml", cwd=project)
    assert again.returncode == 0 and "No changes" in again.stdout
    # a new story re-runs the storyboard and the clip made from it
    spec = project / "specs" / "hero.yaml"
    spec.write_text(spec.read_text().replace("smiles at a child", "waves at a child"))
    plan = json.loads(runner("plan", "specs/hero.yaml", "--json", cwd=project).stdout)
    assert {s["stage"]: s["action"] for s in plan["stages"]} == {
        "hero:storyboard": "rerun", "hero:video": "rerun", "hero:report": "rerun"}
