"""`runner plan --scenes` and `runner storyboard-preview` show, per scene, whether the character
is in it and why, and say how a one-line story was planned (no GPU, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import runner

SPEC = """\
version: 1
character:
  name: aldar_kose
  display_name: Aldar Kose
  trigger: aldrkse
  class_word: man
generate:
  checkpoint: ../lora.safetensors
  base_model: "builtin:tiny-sd"
  storyboard:
    planner: rules
    short_story: {short_story}
    story: "{story}"
    min_scenes: 3
    max_scenes: 4
"""


@pytest.fixture()
def project(tmp_path: Path):
    def make(story: str, short_story: str = "split") -> Path:
        root = tmp_path / "project"
        (root / "specs").mkdir(parents=True, exist_ok=True)
        (root / "runner.toml").write_text("")
        (root / "lora.safetensors").write_bytes(b"not read at plan time")
        (root / "specs" / "aldar.yaml").write_text(SPEC.format(story=story, short_story=short_story))
        return root
    return make


def test_plan_scenes_shows_presence_and_reasons(project) -> None:
    root = project("Aldar rides into the village. The bai shivers in the worn coat. He laughs.")
    r = runner("plan", "--scenes", "specs/aldar.yaml", cwd=root)
    assert r.returncode in (0, 2), r.stdout + r.stderr
    out = r.stdout
    assert "Storyboard scenes for aldar_kose (rules planner):" in out
    assert "character: in the scene (names the character ('Aldar'))" in out
    assert "character: not in the scene (its subject is 'the bai', another character" in out
    assert "prompt: close-up portrait, The bai shivers in the worn coat" in out  # no trigger
    assert "the character is not in scene(s) 2, 3: no trigger" in out  # under the stage in the plan
    scenes = json.loads(runner("storyboard-preview", "specs/aldar.yaml", "--json", cwd=root, check=True).stdout)
    assert [s["hero"] for s in scenes] == [True, False, False]  # 'He' right after the bai is the bai
    assert all(s["hero_reason"] for s in scenes)


def test_one_line_story_split_or_sent_to_the_llm(project) -> None:
    root = project("Aldar Kose rides to the bazaar and trades his old hat for a melon")
    r = runner("storyboard-preview", "specs/aldar.yaml", cwd=root, check=True)
    assert "note: generate.storyboard.story has 1 sentence(s), fewer than min_scenes (3)" in r.stdout
    assert "(short_story: split" in r.stdout and r.stdout.count("     prompt: ") == 3
    root = project("Aldar Kose rides to the bazaar and trades his old hat for a melon", short_story="llm")
    plan = runner("plan", "--scenes", "specs/aldar.yaml", cwd=root)
    assert "the LLM planner makes the scenes (short_story: llm)" in plan.stdout
    assert "Storyboard scenes for aldar_kose (llm planner):" in plan.stdout and "not previewed" in plan.stdout
    prev = runner("storyboard-preview", "specs/aldar.yaml", cwd=root)
    assert prev.returncode == 1 and "short_story: llm" in prev.stderr + prev.stdout
    assert "Traceback" not in prev.stderr
