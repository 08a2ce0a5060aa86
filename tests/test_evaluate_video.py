"""evaluate_video (issue 16 part 3): clips per video LoRA checkpoint x scale on the tiny random Wan 2.2
TI2V 5B, checked by the video stage's suite, the best cell, ``generate.video.lora: best | step-N``.

Selection is tested on constructed cells (each tie-break decides once); the plan's refusals on a
small graph; and one engine run: a stand-in train_video stage writes two real LoRA checkpoints
(peft on the tiny transformer, random non-zero B so the scale matters), then the real
evaluate_video, video (``lora: best``) and report stages run. Tiny random models: the clips are
noise, no face is found, so every cell fails its targets and the figures only show the pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.core import contract
from runner.eval import video as EV
from runner.generate import video_lora as VL

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "builtin:tiny-wan22-ti2v"


# --------------------------------------------------------------------------- selection


def _cell(step, scale, *, distance=20.0, frozen=0, met=True, index=0) -> dict:
    return {"cell": f"step{step}_scale{scale}", "step": step, "lora_scale": scale, "checkpoint_index": index,
            "summary": {"distance": distance, "frozen": frozen}, "targets_met": met, "targets_passed": int(met),
            "targets_total": 1}


@pytest.mark.parametrize("cells, best, decided", [
    # meets the targets beats a closer face
    ([_cell(100, 1.0, distance=10, met=False), _cell(200, 1.0, distance=25)], 1, "targets"),
    ([_cell(100, 1.0, distance=22), _cell(200, 1.0, distance=18)], 1, "face distance"),
    ([_cell(100, 1.0, frozen=2), _cell(200, 1.0, frozen=1)], 1, "frozen clips"),
    ([_cell(100, 1.0), _cell(100, 0.8)], 1, "LoRA scale"),
    ([_cell(200, 1.0), _cell(100, 1.0)], 1, "step"),
])
def test_selection_order_each_tie_break(cells, best, decided):
    choice = EV.select_best(cells)
    assert choice["index"] == best and choice["decided_by"] == decided, choice


def test_selection_skips_the_baseline_and_says_when_no_cell_meets_the_targets():
    baseline = {**_cell(0, 0.0, distance=1.0), "step": None, "checkpoint_index": None, "cell": "baseline"}
    cells = [baseline, _cell(100, 1.0, distance=40, met=False), _cell(200, 1.0, distance=35, met=False)]
    choice = EV.select_best(cells)
    assert choice["index"] == 2 and choice["targets_met"] is False and "no cell meets every target" in choice["reason"]
    with pytest.raises(contract.StageError, match="no checkpoint cell"):
        EV.select_best([baseline])


def _clip(distance, grade, *, frozen=False, blinks=1, drift=10.0) -> dict:
    return {"fidelity": {"distance": distance, "worst": distance + 5, "grade": grade},
            "dynamics": {"frozen": frozen, "blinks": blinks, "mouth_spread": 0.1,
                         "identity_drift": {"distance": drift}},
            "motion": {"pct_diag_per_frame": 0.5}}


def test_targets_per_cell_use_the_20_30_grades_blinks_frozen_and_drift():
    clips = [_clip(15, "excellent"), _clip(25, "ok", blinks=0, drift=35.0)]
    s = EV.cell_summary(clips)
    assert (s["distance"], s["worst_distance"], s["excellent"], s["ok"], s["fail"]) == (20.0, 30.0, 1, 1, 0)
    assert s["blinks_min"] == 0 and s["drift_max"] == 35.0
    t = EV.evaluate_targets(clips, {"fidelity": "ok", "min_blinks": 1, "not_frozen": True, "max_drift": 30})
    assert {k: v["pass"] for k, v in t.items()} == {"fidelity": True, "min_blinks": False, "not_frozen": True,
                                                    "max_drift": False}
    assert EV.evaluate_targets(clips, {"fidelity": "excellent", "not_frozen": False, "max_drift": None}) \
        ["fidelity"]["pass"] is False
    unread = [_clip(15, "excellent", frozen=None, blinks=None)]
    t = EV.evaluate_targets(unread, {"fidelity": "any", "min_blinks": 1, "not_frozen": True, "max_drift": None})
    assert set(t) == {"min_blinks", "not_frozen"} and not any(v["pass"] for v in t.values())
    assert "without landmarks" in t["not_frozen"]["note"]


def test_kept_steps_follow_the_trainer():
    assert VL.kept_steps([6], 3, 2) == [3, 6]
    assert VL.kept_steps([5, 9], 4, 10) == [4, 5, 8, 9]
    assert VL.kept_steps([10], 3, 2) == [9, 10]
    assert VL.step_of("step-40") == 40 and VL.step_of("best") is None and VL.step_of("loras/a.safetensors") is None


# --------------------------------------------------------------------------- planning


class Graph:
    def __init__(self, root: Path, nodes=()):
        self.character, self.project_root, self.spec_file = "hero", root, root / "specs" / "hero.yaml"
        self.nodes = list(nodes)

    def nodes_of(self, kind: str):
        return [n for n in self.nodes if n.kind == kind]

    def node(self, stage_id: str):
        return next((n for n in self.nodes if n.id == stage_id), None)


def spec(root: Path, *, ev: dict | None = None, video: dict | None = None, steps: int = 2) -> dict:
    return {
        "character": {"name": "hero", "trigger": "hrochr", "class_word": "man", "references": ["refs"]},
        "train_video": {"base_model": MODEL, "resolution": 32, "frame_buckets": [1], "steps": steps,
                        "checkpoints": {"every_steps": 1, "keep_last": 2, "validation_fraction": 0.0}},
        "evaluate": {"face_model": "dlib", "video": {"lora_scales": [0, 0.5, 1.0], "prompts": ["he smiles"],
                                                     "frames": 5, "steps": 2, **(ev or {})}},
        "generate": {"video": {"model": MODEL, "source": "still.jpg", "lora": "best", "frames": 9, "fps": 8,
                               "width": 32, "height": 32, "steps": 2, "guidance": 1.0, "image_conditioning": 1.0,
                               "prompt_prefix": "", "prompt_suffix": "", "fidelity": {"frames": 3},
                               **(video or {})}},
        "hardware": {"device": "cpu"},
    }


def train_nodes(s: dict, variants=(None,)) -> list[contract.PlanNode]:
    from runner.stages import train_video as TV

    return [contract.PlanNode(id=contract.node_id("hero", "train_video", v), kind="train_video", character="hero",
                              config=TV.node_config(s["train_video"], s, variant=v, overrides={}),
                              outputs=("lora", "logs")) for v in variants]


def test_plan_one_node_per_variant_and_the_refusals(tmp_path: Path):
    from runner.stages import evaluate_video as E

    s = spec(tmp_path)
    nodes = E.expand(s, Graph(tmp_path, train_nodes(s, (None, "wide"))))
    assert [n.id for n in nodes] == ["hero:evaluate_video", "hero:evaluate_video[wide]"]
    n = nodes[1]
    assert n.inputs["lora"] == contract.StageOutputRef("hero:train_video[wide]", "lora") and "reference0" in n.inputs
    assert n.config["lora_scales"] == [0.0, 0.5, 1.0] and n.config["frames"] == 5 and n.config["width"] == 32
    assert n.config["prompts"] == ["he smiles"] and n.config["fidelity"]["on_fail"] == "flag"
    assert n.label.startswith("1 clip (5 frames 32x32, 2 steps) per checkpoint (all)")
    assert "key_frame0" not in n.inputs  # no key frames, no canonical reference: the first reference image
    listed = E.expand(spec(tmp_path, ev={"key_frames": ["a.png", "b.png"]}), Graph(tmp_path, train_nodes(s)))[0]
    assert [listed.inputs[f"key_frame{i}"].root for i in (0, 1)] == [tmp_path / "a.png", tmp_path / "b.png"]
    assert listed.label.startswith("2 clips")
    assert E.work_units(n.config) is None  # all: only the train output tells how many checkpoints
    assert E.work_units({**listed.config, "checkpoints": [1, 2]}) == (2 * (1 + 2 * 2), "clip")
    json.dumps(n.config)
    assert E.expand({**s, "evaluate": {}}, Graph(tmp_path, train_nodes(s))) == []
    with pytest.raises(contract.StageError, match="the spec has no train_video"):
        E.expand(s, Graph(tmp_path))
    with pytest.raises(contract.StageError, match="only 0"):
        E.expand(spec(tmp_path, ev={"lora_scales": [0]}), Graph(tmp_path, train_nodes(s)))
    with pytest.raises(contract.StageError, match=r"will not keep step\(s\) 5; it keeps 1, 2"):
        E.expand(spec(tmp_path, ev={"checkpoints": [2, 5]}), Graph(tmp_path, train_nodes(s)))


def test_video_lora_best_and_step_are_resolved_at_plan_time(tmp_path: Path):
    from runner.stages import evaluate_video as E
    from runner.stages import video as V

    (tmp_path / "still.jpg").write_bytes(b"")
    s = spec(tmp_path)
    trains = train_nodes(s)
    graph = Graph(tmp_path, trains + E.expand(s, Graph(tmp_path, trains)))
    node = V.expand(s, graph)[0]
    assert node.inputs["lora_best0"] == contract.StageOutputRef("hero:evaluate_video", "best")
    assert node.config["lora_from"] == "hero:evaluate_video" and "lora_files" not in node.inputs
    step = V.expand(spec(tmp_path, video={"lora": "step-1"}), graph)[0]
    assert step.inputs["lora_train"] == contract.StageOutputRef("hero:train_video", "lora")
    with pytest.raises(contract.StageError, match="will not keep step 7; it keeps step-1, step-2"):
        V.expand(spec(tmp_path, video={"lora": "step-7"}), graph)
    with pytest.raises(contract.StageError, match="best needs evaluate.video"):
        V.expand(s, Graph(tmp_path, trains))
    with pytest.raises(contract.StageError, match="the spec has no train_video"):
        V.expand(s, Graph(tmp_path))
    # variants: best reads every variant's pick; step-N would be ambiguous
    trains = train_nodes(s, (None, "wide"))
    graph = Graph(tmp_path, trains + E.expand(s, Graph(tmp_path, trains)))
    node = V.expand(s, graph)[0]
    assert [node.inputs[f"lora_best{i}"].stage_id for i in (0, 1)] == ["hero:evaluate_video",
                                                                      "hero:evaluate_video[wide]"]
    with pytest.raises(contract.StageError, match="step-1 is ambiguous: train_video has 2 variants"):
        V.expand(spec(tmp_path, video={"lora": "step-1"}), graph)


def test_best_across_variants_ranks_their_picks_as_the_cells_are_ranked(tmp_path: Path):
    """generate.video.lora: best with variants: the variant whose pick meets the targets wins over
    a closer face that misses one; among those that meet them, the lower mean face distance."""
    from types import SimpleNamespace

    from runner.stages import video as V

    def pick(name: str, distance: float, met: bool, step: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "best.json").write_text(json.dumps({
            "stage_id": f"hero:evaluate_video[{name}]", "step": step, "lora_scale": 1.0, "file": "w.safetensors",
            "experts": {"transformer": "w.safetensors"}, "targets_met": met, "targets_passed": 3 if met else 2,
            "targets_total": 3, "summary": {"distance": distance, "frozen": 0}}))
        return folder

    ctx = SimpleNamespace(log=lambda *_: None)
    folders = [pick("close_but_frozen", 9.0, False, 4), pick("good", 14.0, True, 6), pick("better", 12.0, True, 8)]
    chosen = V._best_of(folders, ctx)
    assert (chosen.source, chosen.step) == ("evaluate_video hero:evaluate_video[better]", 8)
    (folders[2] / "best.json").write_text(json.dumps({"step": 8, "lora_scale": 1.0, "file": "w.safetensors",
                                                      "experts": {}}))
    with pytest.raises(contract.StageError, match="written by an older evaluate_video"):
        V._best_of(folders, ctx)


# --------------------------------------------------------------------------- one engine run


def _write_checkpoints(out: Path, cache: Path, steps=(1, 2)) -> dict:
    """train_video's lora output: index.json + a diffusers LoRA file per step (random, non-zero)."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion import families
    from runner.generate import video_models as VM

    vp = VM.load_video_model(MODEL, cache_dir=cache)
    c = families.components_of(vp.pipe, vp.family)
    families.add_lora(c, rank=4, seed=0)
    checkpoints = []
    for i, step in enumerate(steps):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + i)
            for name, p in c.denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(c.denoiser))
        type(vp.pipe).save_lora_weights(str(out / f"step-{step:06d}"), transformer_lora_layers=sd)
        checkpoints.append({"step": step, "phase": "main",
                            "diffusers": f"step-{step:06d}/pytorch_lora_weights.safetensors"})
    index = {"base_model": MODEL, "model_family": "wan22_ti2v", "tiny_random_model": True, "modality": "video",
             "checkpoints": checkpoints, "final": len(checkpoints) - 1}
    (out / "index.json").write_text(json.dumps(index))
    return index


def _stand_in_train_video() -> contract.StageKind:
    """train_video as the engine sees it (same node), writing two real checkpoints quickly."""
    reg = contract.Registry()

    def expand(s, graph):
        return train_nodes(s)

    @reg.register("train_video", version=1, order=55, expand=expand)
    def run(config, inputs, ctx):
        (ctx.out_dir / "lora").mkdir()
        (ctx.out_dir / "logs").mkdir()
        _write_checkpoints(ctx.out_dir / "lora", ctx.cache_dir)
        return {"lora": contract.Artifact("lora", ctx.out_dir / "lora"),
                "logs": contract.Artifact("logs", ctx.out_dir / "logs")}

    return reg.get("train_video")


SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man, references: [../refs],
            canonical_reference: ../refs/obama_02.jpg}
train_video:
  base_model: builtin:tiny-wan22-ti2v
  resolution: 32
  frame_buckets: [1]
  steps: 2
  checkpoints: {every_steps: 1, keep_last: 2, validation_fraction: 0.0}
evaluate:
  face_model: dlib
  video: {lora_scales: [0, 0.5, 1.0], prompts: [he smiles], frames: 5, steps: 2}
generate:
  video: {model: builtin:tiny-wan22-ti2v, source: ../still.jpg, lora: best, frames: 9, fps: 8, width: 32,
          height: 32, steps: 2, guidance: 1.0, image_conditioning: 1.0, prompt_prefix: "", prompt_suffix: "",
          fidelity: {frames: 3}}
hardware: {device: cpu}
"""


@pytest.mark.slow  # ~20 s: the tiny Wan 2.2 5B loaded three times, 5 cells of one 5-frame 32 px clip, the video stage
def test_engine_run_best_feeds_the_video_stage_and_the_compare_page(project: Path, shared_data: Path, monkeypatch):
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec
    from runner.stages import registry as stage_registry

    (project / "refs").mkdir()
    for n in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / n, project / "refs" / n)
    shutil.copy(shared_data / "faces" / "obama" / "obama_03.jpg", project / "still.jpg")
    (project / "specs" / "hero.yaml").write_text(SPEC)
    builtin = stage_registry()
    kinds = {k: v for k, v in builtin.kinds().items() if k in ("evaluate_video", "video", "report")}
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {"train_video": _stand_in_train_video(), **kinds})

    res = apply([load_spec(project / "specs" / "hero.yaml")], ApplyOptions(), QuietReporter())
    assert res.status == "succeeded", [(r.stage_id, r.error) for r in res.results]
    from runner.engine.workspace import Workspace

    ws = Workspace(project)
    try:
        outs = {e["stage_id"]: ws.load_outputs(e["key"]) for e in ws.executions(ws.last_run_id())}
    finally:
        ws.close()
    folder = Path(outs["hero:evaluate_video"]["results"].path)
    results = json.loads((folder / "results.json").read_text())
    assert [c["cell"] for c in results["cells"]] == ["baseline", "step000001_scale0.5", "step000001_scale1",
                                                     "step000002_scale0.5", "step000002_scale1"]
    assert results["tiny_random"]["any"] and results["kind"] == "evaluate_video"
    assert results["key_frames"] == ["refs/obama_02.jpg"]  # the canonical reference
    for c in results["cells"]:
        assert len(c["clips"]) == 1 and (folder / c["clips"][0]["file"]).is_file()
        assert (folder / c["clips"][0]["strip"]).is_file() and set(c["targets"]) == {"fidelity", "not_frozen",
                                                                                     "max_drift"}
        assert c["targets_met"] is False  # noise: no face, fidelity 100
    # the LoRA changes the clip (scale 0 is the base model), so do its scale and the next checkpoint
    # (loaded after the first was unloaded)
    clips = [(folder / c["clips"][0]["file"]).read_bytes() for c in results["cells"]]
    assert len(set(clips)) == 5
    best = results["best"]
    assert best["step"] in (1, 2) and best["lora_scale"] == 0.5  # equal (100) distances: the lower scale wins
    best_dir = Path(outs["hero:evaluate_video"]["best"].path)
    chosen = json.loads((best_dir / "best.json").read_text())
    assert chosen["file"] == "pytorch_lora_weights.safetensors" and chosen["experts"] == {"transformer": chosen["file"]}
    assert (best_dir / chosen["file"]).is_file()
    # generate.video.lora: best -> that checkpoint at that scale
    rep = json.loads((Path(outs["hero:video"]["video"].path) / "report.json").read_text())
    assert rep["lora_used"]["step"] == best["step"] and rep["lora_used"]["scale"] == 0.5
    assert rep["lora_used"]["source"] == "evaluate_video hero:evaluate_video"
    # the compare page (written beside the results) and the report show the video rows
    page = (folder / "compare.html").read_text()
    assert page.count("data-cell=") == 5 and page.count('class="video-row best"') == 1
    assert "Tiny random model" in page and "data:video/mp4;base64," in page and 'class="strip"' in page
    html = res.reports["hero"].read_text()
    assert "Video LoRA evaluation" in html and html.count("data-cell=") == 5 and "compare.html" in html

    # The tracked run (mlflow / wandb when enabled): each figure over the steps, per scale
    import runner.tracking as T
    from runner.stages import evaluate_video as E

    sent = []
    monkeypatch.setattr(T, "log_stage", lambda conf, log, ws_dir: sent.append(log) or [])
    env = {"stage_id": "hero:evaluate_video", "run_id": "r", "character": "hero", "key": "k" * 16,
           "workspace_dir": str(project)}
    assert E.track({"variant": None}, outs["hero:evaluate_video"], env) == []
    assert sent[0].series["eval_video/distance/scale_0.5"] == [(1, 100.0), (2, 100.0)]
    assert sent[0].metrics["best_step"] == best["step"] and sent[0].metrics["best_distance"] == 100.0

    # Only the targets change: the cells come from the shared cache. One cell is left as a kill -9
    # mid-cell leaves it (no cell.json, its clip's folder without clip.json): only that clip is made again.
    from runner.generate import clipcheck
    from runner.paths import cache_root

    cells = sorted((cache_root() / "evaluate-video-cells").glob("*/cell.json"))
    assert len(cells) == 5
    cells[0].unlink()
    next(cells[0].parent.glob("clips/*/clip.json")).unlink()
    made, make = [], clipcheck.ClipMaker.make
    monkeypatch.setattr(clipcheck.ClipMaker, "make", lambda self, job, *a: made.append(job.name) or make(self, job, *a))
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(SPEC.replace("frames: 5, steps: 2}", "frames: 5, steps: 2,\n"
                                      "          targets: {fidelity: any, not_frozen: false, max_drift: null}}"))
    again = apply([load_spec(spec_file)], ApplyOptions(only=["evaluate_video"]), QuietReporter())
    assert made == ["p0_kf0_s1"] and cells[0].is_file()
    assert again.status == "succeeded", [(r.stage_id, r.error) for r in again.results]
    ran = {r.stage_id: r.status for r in again.results}
    assert ran["hero:evaluate_video"] == "succeeded" and "hero:video" not in ran
    ws = Workspace(project)
    try:
        e = next(e for e in ws.executions(ws.last_run_id()) if e["stage_id"] == "hero:evaluate_video")
        results = json.loads((Path(ws.load_outputs(e["key"])["results"].path) / "results.json").read_text())
    finally:
        ws.close()
    assert all(c["targets_met"] for c in results["cells"]) and results["best"]["targets_met"]


def test_from_step_and_from_best_read_the_outputs(tmp_path: Path):
    lora = tmp_path / "lora"
    (lora / "step-000002").mkdir(parents=True)
    (lora / "step-000002" / "w.safetensors").write_bytes(b"x")
    (lora / "index.json").write_text(json.dumps({"checkpoints": [{"step": 2,
                                                                  "diffusers": "step-000002/w.safetensors"}]}))
    chosen = VL.from_step(lora, 2, 0.7)
    assert chosen.main == lora / "step-000002" / "w.safetensors" and chosen.scale == 0.7
    assert chosen.experts == {"transformer": chosen.main}
    with pytest.raises(contract.StageError, match="step-3 is not a checkpoint") as refused:
        VL.from_step(lora, 3, 1.0)
    assert refused.value.hint == "Its checkpoints: step-2."
    best = tmp_path / "best"
    best.mkdir()
    experts = {"transformer": "w.safetensors", "transformer_2": "w2.safetensors"}
    (best / "best.json").write_text(json.dumps({"stage_id": "hero:evaluate_video", "step": 2, "lora_scale": 0.8,
                                                "file": "w.safetensors", "experts": experts}))
    chosen = VL.from_best(best)
    assert (chosen.step, chosen.scale, chosen.main) == (2, 0.8, best / "w.safetensors")
    assert chosen.experts == {"transformer": best / "w.safetensors", "transformer_2": best / "w2.safetensors"}
    # a Wan 2.2 A14B checkpoint: each expert's file, as train_video lists them
    (lora / "index.json").write_text(json.dumps({"checkpoints": [{
        "step": 2, "diffusers": "step-000002/w.safetensors", "diffusers_2": "step-000002/w2.safetensors",
        "experts": {"transformer": "step-000002/w.safetensors", "transformer_2": "step-000002/w2.safetensors"}}]}))
    assert VL.from_step(lora, 2, 1.0).experts["transformer_2"] == lora / "step-000002" / "w2.safetensors"
    with pytest.raises(contract.StageError, match="cannot read evaluate_video's choice"):
        VL.from_best(tmp_path)


# --------------------------------------------------------------------------- the compare page


def _results(folder: Path, shared_data: Path) -> Path:
    """An evaluate_video results folder: a baseline and two checkpoint cells of one real 9-frame clip
    each (frames of a real photo, shifted), their strips, and the figures the suite records."""
    import av
    import numpy as np
    from PIL import Image

    photo = Image.open(shared_data / "faces" / "obama" / "obama_01.jpg").convert("RGB").resize((64, 64))
    cells = []
    for i, (name, step, scale) in enumerate([("baseline", None, 0.0), ("step000001_scale1", 1, 1.0),
                                             ("step000002_scale1", 2, 1.0)]):
        dest = folder / "clips" / name
        dest.mkdir(parents=True)
        with av.open(str(dest / "c.mp4"), "w") as out:
            stream = out.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for k in range(9):
                img = Image.fromarray(np.roll(np.asarray(photo), 2 * k * (i + 1), axis=1))
                for packet in stream.encode(av.VideoFrame.from_image(img)):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        photo.save(dest / "c.jpg")
        clip = {**_clip(12.0 + 6 * i, "excellent" if i < 2 else "ok", frozen=i == 2), "name": "c",
                "prompt": "he smiles", "seed": 1, "file": f"clips/{name}/c.mp4", "poster": f"clips/{name}/c.jpg"}
        clip["fidelity"]["frames"] = [{"frame": f} for f in (0, 4, 8)]
        clip["strip"] = f"clips/{name}/" + EV.write_strip(dest / "c.mp4", [0, 4, 8], dest / "c_strip.jpg")
        cell = EV.score_cell({"cell": name, "step": step, "phase": None, "lora_scale": scale,
                              "checkpoint_index": None if step is None else step - 1, "clips": [clip]},
                             {"fidelity": "ok", "not_frozen": True, "max_drift": 30})
        cells.append(cell)
    best = {**EV.select_best(cells), "step": 1, "lora_scale": 1.0, "cell": "step000001_scale1"}
    (folder / "results.json").write_text(json.dumps({
        "kind": "evaluate_video", "stage_id": "hero:evaluate_video", "run_id": "r1", "model": MODEL,
        "family": "wan22_ti2v", "tiny_random": {"video_model": True, "any": True}, "cells": cells, "best": best,
        "generation": {"frames": 9, "fps": 8, "width": 64, "height": 64, "steps": 2, "seeds": [1],
                       "lora_scales": [0, 1.0]}}))
    return folder


def test_compare_page_video_rows(tmp_path: Path, shared_data: Path):
    from runner.eval import compare as C

    folder = _results(tmp_path / "results", shared_data)
    assert C.evaluations_in(tmp_path) == [folder / "results.json"]
    page = C.write_comparison([(None, folder)], tmp_path / "compare.html").read_text()
    assert page.count("data-cell=") == 3 and page.count('class="video-row best"') == 1
    assert page.count('class="strip"') == 3 and page.count("data:video/mp4;base64,") == 3
    assert "baseline (no LoRA)" in page and "Tiny random model" in page and "r1 hero:evaluate_video" in page
    assert "not_frozen fail" in page and "fidelity pass" in page  # step 2's clip is frozen
    import re

    assert not re.search(r'(src|href)="(?!data:|#)', page)  # one self-contained file


@pytest.mark.slow  # Chromium: ~3 s
def test_compare_page_video_rows_in_a_browser(tmp_path: Path, shared_data: Path):
    from test_review_browser import CHROMIUM, _need_browser

    _need_browser()
    from playwright.sync_api import sync_playwright

    from runner.eval import compare as C

    page_file = C.write_comparison([(None, _results(tmp_path / "results", shared_data))], tmp_path / "compare.html")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_file.as_uri())
            rows = page.locator("tr.video-row")
            assert rows.count() == 3
            # every strip decoded (a broken data URI has no natural size), the best row highlighted
            sizes = page.eval_on_selector_all("img.strip", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
            assert len(sizes) == 3 and all(w > 100 and h > 30 for w, h in sizes), sizes
            green = page.eval_on_selector("tr.video-row.best td", "e => getComputedStyle(e).backgroundColor")
            assert green == "rgb(218, 251, 225)"
            shot = tmp_path / "video-rows.png"
            page.locator("table.video-rows").screenshot(path=str(shot))
        finally:
            b.close()
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[1] > 600 and img.std() > 20  # the rows drawn, not a blank box
