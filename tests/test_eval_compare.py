"""`runner compare`: one self-contained page, deltas with the right colours, improved categories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from runner.eval import compare as C
from runner.core.errors import StageError


def _evaluation(folder: Path, *, fs: dict[str, float], no_face: float = 0.0, tiny: bool = False,
                run_id: str = "r1", extra_prompt: bool = False) -> Path:
    prompts = [{"category": c, "index": 0, "template": f"{{trigger}} {c}", "prompt": f"tok {c}", "negative": ""}
               for c in fs]
    if extra_prompt:
        prompts.append({"category": "close_up", "index": 1, "template": "only here", "prompt": "only here",
                        "negative": ""})
    images = []
    (folder / "images" / "c").mkdir(parents=True)
    for i, p in enumerate(prompts):
        name = f"{p['category']}_{p['index']:02d}_seed1.png"
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 160)).save(folder / "images" / "c" / name)
        images.append({"category": p["category"], "prompt_index": p["index"], "seed": 1, "file": name,
                       "path": f"images/c/{name}", "face_found": True, "face_similarity": fs[p["category"]],
                       "face_box": [2, 2, 20, 20], "clip_t": 0.3})
    cats = {c: {"face_similarity": v, "consistency": v, "no_face_rate": no_face, "clip_t": 0.3, "dino": 0.5,
                "diversity": None} for c, v in fs.items()}
    overall = {"face_similarity": sum(fs.values()) / len(fs), "no_face_rate": no_face, "clip_t": 0.3}
    cell = {"cell": "c", "step": 100, "phase": None, "lora_scale": 1.0, "categories": cats, "overall": overall,
            "images": images, "targets": {}, "targets_passed": 0, "targets_total": 0,
            "score": overall["face_similarity"]}
    ev = {"run_id": run_id, "stage_id": "demo:evaluate", "variant": None, "cells": [cell],
          "best": {"cell": "c", "objective": {"maximize": "face_similarity"}},
          "suite": {"source": "inline", "categories": list(fs), "prompts": prompts},
          "tiny_random": {"diffusion": tiny, "clip": tiny, "dino": tiny, "any": tiny}, "models": {}}
    (folder / "evaluation.json").write_text(json.dumps(ev))
    return folder


def test_comparison_page(tmp_path: Path) -> None:
    a = _evaluation(tmp_path / "a", fs={"close_up": 0.8, "full_body": 0.5, "medium": 0.6}, no_face=0.2)
    b = _evaluation(tmp_path / "b", fs={"close_up": 0.797, "full_body": 0.7, "medium": 0.4}, no_face=0.1,
                    run_id="r2", extra_prompt=True)
    out = C.write_comparison([("trial 3.5", a), (None, b)], tmp_path / "cmp" / "compare.html")
    html = out.read_text()
    assert "trial 3.5" in html and "r2 demo:evaluate" in html
    assert "improved: full_body" in html and "regressed: medium" in html and "unchanged: close_up" in html
    # deltas: close_up face similarity 0.800 -> 0.797 (worse, red); no-face rate 20% -> 10% (better, green)
    assert re.search(r'<span class="delta pass">-10 pp</span>', html)
    assert re.search(r'<span class="delta fail">-0\.003</span>', html)
    # same prompts side by side: the 3 shared prompts, not the one only b has
    assert html.count("data:image/jpeg;base64,") == 6 and "only here" not in html
    assert "3 prompts appear in every evaluation" in html
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert "Tiny random" not in html


def test_tiny_models_labelled_and_bad_inputs(tmp_path: Path) -> None:
    a = _evaluation(tmp_path / "a", fs={"close_up": 0.8}, tiny=True)
    b = _evaluation(tmp_path / "b", fs={"close_up": 0.9}, tiny=True)
    html = C.render_comparison([C.load_evaluation(a), C.load_evaluation(b, "v2")])
    assert "Tiny random models" in html and "meaningless" in html
    with pytest.raises(StageError, match="at least two"):
        C.render_comparison([C.load_evaluation(a)])
    with pytest.raises(StageError, match="no evaluation.json"):
        C.load_evaluation(tmp_path / "nothing")
    assert C.evaluations_in(tmp_path) == [a / "evaluation.json", b / "evaluation.json"]


def test_evaluations_of_run_reads_the_workspace(tmp_path: Path) -> None:
    from runner.core.contract import Artifact

    a = _evaluation(tmp_path / "a", fs={"close_up": 0.8})

    class WS:
        def executions(self, run_id):
            return [{"kind": "train", "key": "k0", "stage_id": "demo:train"},
                    {"kind": "evaluate", "key": "k1", "stage_id": "demo:evaluate[base]"},
                    {"kind": "evaluate", "key": "gone", "stage_id": "demo:evaluate[x]"}]

        def store_has(self, key):
            return key != "gone"

        def load_outputs(self, key):
            return {"evaluation": Artifact("evaluation", a)}

    assert C.evaluations_of_run(WS(), "r9") == [("r9 demo:evaluate[base]", a)]


def test_cli_compare(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from runner.cli import cli

    a = _evaluation(tmp_path / "a", fs={"close_up": 0.8})
    b = _evaluation(tmp_path / "b", fs={"close_up": 0.9})
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "-o", str(tmp_path / "c.html"), "--project",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "2 evaluations" in res.output and (tmp_path / "c.html").is_file()
    res = CliRunner().invoke(cli, ["compare", str(a), "r-unknown", "--project", str(tmp_path)])
    assert res.exit_code == 2 and "neither an evaluation folder nor a run" in res.output
    assert not (tmp_path / ".runner").exists()  # looking up a run id creates no workspace
