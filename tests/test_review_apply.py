"""`runner apply` honours the storyboard's review decisions with real (tiny) generation: the
checkpoint a reviewer picked is the LoRA the storyboard loads, and a rejected frame is made again
from seeds it never used while the other frames keep theirs. Every stage upstream of the storyboard is
written into the store at its planned key (tests/review_fixture.py), so only the storyboard runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from review_fixture import promote
from runner.review import decisions
from test_cli import runner

pytestmark = pytest.mark.slow

SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man, references: [../refs]}
dataset: {sources: [{images: ../photos}]}
train: {preset: tiny-demo}
evaluate: {preset: tiny-demo, face_model: dlib}
generate:
  storyboard:
    planner: manual
    scenes: [{text: He waves., shot: close_up}, {text: He walks away., shot: full_body}]
    seed: 7
    steps: 2
    width: 64
    height: 64
    validation: {face_similarity: 0.0, retries: 0}
hardware: {device: cpu}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data: Path) -> Path:
    from test_eval_stage import _make_lora_artifact

    from runner.engine.executor import plan_specs
    from runner.spec import load_spec

    root = tmp_path_factory.mktemp("review_apply") / "project"
    for d in ("specs", "photos", "refs"):
        (root / d).mkdir(parents=True)
    (root / "runner.toml").write_text("")
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", root / "refs")
    shutil.copy(shared_data / "faces" / "obama" / "obama_02.jpg", root / "photos")
    (root / "specs" / "hero.yaml").write_text(SPEC)
    plan, ws = plan_specs([load_spec(root / "specs" / "hero.yaml")])
    try:
        for ps in plan.stages:
            if ps.node.kind == "train":
                promote(ws, ps, lambda out: _make_lora_artifact(out / "lora", root / ".cache", steps=(4, 8)))
            elif ps.node.kind == "evaluate":
                lora = ws.store_path(next(p.key for p in plan.stages if p.node.kind == "train")) / "lora"
                promote(ws, ps, lambda out, lora=lora: _best_of(out / "evaluation", lora))
            elif ps.node.kind not in ("storyboard", "report"):
                promote(ws, ps, lambda out: None)
    finally:
        ws.close()
    return root


def _best_of(folder: Path, lora: Path) -> None:
    """An evaluation whose best is the first checkpoint (step 4)."""
    index = json.loads((lora / "index.json").read_text())
    (folder / "best").mkdir(parents=True)
    shutil.copy(lora / index["checkpoints"][0]["diffusers"], folder / "best" / "pytorch_lora_weights.safetensors")
    (folder / "evaluation.json").write_text(json.dumps({
        "base_model": "builtin:tiny-sd", "model_family": "sd15", "tiny_random": {"diffusion": True, "any": True},
        "cells": [], "best": {"cell": "step000004_scale1", "step": 4, "lora_scale": 1.0,
                              "lora_diffusers": "best/pytorch_lora_weights.safetensors"}}))


def _storyboard_report(project: Path) -> dict:
    from runner.engine.executor import plan_specs
    from runner.spec import load_spec

    plan, ws = plan_specs([load_spec(project / "specs" / "hero.yaml")])
    try:
        ps = next(p for p in plan.stages if p.node.kind == "storyboard")
        assert ws.store_has(ps.key), "the storyboard did not run"
        folder = ws.store_path(ps.key) / "storyboard"
        return json.loads((folder / "report.json").read_text())
    finally:
        ws.close()


def test_apply_uses_the_picked_checkpoint_and_regenerates_a_rejected_frame(project: Path) -> None:
    # Evaluation's best is step 4; the reviewer picks step 8 and rejects the frame of scene 2 (the
    # frame's hash is only its key in the file: what the stage uses is the scene).
    review = decisions.review_path(project / "specs" / "hero.yaml")
    decisions.save(review, [("checkpoints", "hero:evaluate",
                             {"cell": "step000008_scale1", "step": 8, "lora_scale": 1.0}),
                            ("frames", "ab" * 32, {"verdict": "reject", "scene": 2, "note": "not him"})], by="Ada")
    r = runner("apply", "specs/hero.yaml", "--only", "storyboard", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _storyboard_report(project)
    assert rep["lora"]["step"] == 8 and rep["lora"]["picked"]
    assert rep["lora_file"].endswith("checkpoint-8/pytorch_lora_weights.safetensors")
    seeds = {f["index"]: [a["seed"] for a in f["attempts"]] for f in rep["frames"]}
    # seed + attempt * n_scenes + position: scene 1 as before (7); scene 2 past its one attempt (7 + 1)
    assert seeds[1] == [7] and seeds[2] == [7 + 1 * 2 + 1]
    assert [f["rejected_by_reviewer"] for f in rep["frames"]] == [0, 1]
