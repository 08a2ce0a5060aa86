"""The evaluate stage end to end: tiny SD + real LoRA files, references from ../shared/data.

The train stage's output is made here the way the interface describes it (index.json + diffusers
LoRA files per checkpoint), with LoRA weights that are random but non-zero so the scale matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import evaluate as E


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core runner: one intra-op thread is several times faster than
    two threads fighting other processes for the cores (measured: 8 s vs 100 s for this file)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_lora_artifact(root: Path, cache: Path, steps=(100, 200)) -> contract.Artifact:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd", cache_dir=cache)
    checkpoints = []
    for i, step in enumerate(steps):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + i)
            pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                  adapter_name=f"a{i}")
        pipe.unet.set_adapter(f"a{i}")
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=f"a{i}"))
        folder = root / f"checkpoint-{step}"
        StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=sd)
        (folder / "demo_kohya.safetensors").write_bytes((folder / "pytorch_lora_weights.safetensors").read_bytes())
        checkpoints.append({"step": step, "phase": "main",
                            "diffusers": f"checkpoint-{step}/pytorch_lora_weights.safetensors",
                            "kohya": f"checkpoint-{step}/demo_kohya.safetensors", "val_loss": None, "samples": []})
    (root / "index.json").write_text(json.dumps({
        "base_model": "builtin:tiny-sd", "model_family": "sd15", "resolution": 64, "trigger": "dmochr",
        "class_word": "man", "variant": None, "tiny_random_model": True, "checkpoints": checkpoints,
        "final": len(checkpoints) - 1}))
    return contract.Artifact("lora", root)


def _config(refs: list[str], **over) -> dict:
    cfg = {
        "trigger": "dmochr", "class_word": "man", "variant": None,
        "suite": {"source": "inline", "prompts": [
            {"category": "close_up", "index": 0, "template": "", "prompt": "close-up photo of dmochr man",
             "negative": "blurry"},
            {"category": "full_body", "index": 0, "template": "", "prompt": "full body photo of dmochr man",
             "negative": ""},
        ]},
        "seeds": [1, 2], "lora_scales": [0.0, 1.0], "checkpoints": "all", "steps": 2, "guidance": 2.0,
        "resolution": None, "batch_size": 4,
        "face": {"name": "dlib", "insightface_pack": "buffalo_l", "insightface_root": "~/.insightface",
                 "dlib_detector": "hog", "upsample": 1},
        "clip_model": "builtin:tiny-clip", "dino_model": "builtin:tiny-dino",
        "targets": {"close_up": {"no_face_rate": "<0.5"}, "overall": {"clip_t": ">-1"}},
        "objective": {"maximize": "face_similarity", "constraints": {"clip_t": ">=-1"}},
        "references": refs, "device": "cpu",
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def lora_and_refs(tmp_path_factory, shared_data: Path):
    root = tmp_path_factory.mktemp("evalproj")
    refs = root / "refs"
    refs.mkdir()
    for name in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, refs / name)
    lora = _make_lora_artifact(root / "lora", root / "cache")
    ref_art = contract.Artifact("reference0", refs, files=tuple(sorted(refs.iterdir())))
    return root, lora, ref_art


@pytest.mark.slow  # about 5 s
def test_evaluate_tiny_sd_end_to_end_and_resume(lora_and_refs, tmp_path: Path) -> None:
    root, lora, ref_art = lora_and_refs
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:evaluate", character="demo", project_root=root)
    out = E.run(_config(["refs"]), {"lora": lora, "reference0": ref_art}, ctx)
    folder = out["evaluation"].path
    ev = json.loads((folder / "evaluation.json").read_text())
    assert len(ev["cells"]) == 4  # 2 checkpoints x 2 scales
    assert ev["tiny_random"] == {"diffusion": True, "clip": True, "dino": True, "any": True}
    assert [r["face_found"] for r in ev["references"]] == [True, True]
    cell = ev["cells"][0]
    assert set(cell["categories"]) == {"close_up", "full_body"}
    assert len(cell["images"]) == 4 and all((folder / i["path"]).is_file() for c in ev["cells"] for i in c["images"])
    # tiny SD makes noise: no faces, counted as failures, similarity 0
    assert cell["overall"]["no_face_rate"] == 1.0 and cell["overall"]["face_similarity"] == 0.0
    assert cell["categories"]["close_up"]["diversity"] is not None  # two seeds per prompt
    assert cell["targets"]["close_up"]["no_face_rate"]["pass"] is False
    assert cell["targets"]["overall"]["clip_t"]["pass"] is True
    assert cell["score"] == pytest.approx(0.5)
    # LoRA scale changes the images: scale 0 of both checkpoints is the base model, identical
    by = {(c["step"], c["lora_scale"]): c for c in ev["cells"]}
    a0 = np.asarray(Image.open(folder / by[(100, 0.0)]["images"][0]["path"]), dtype=float)
    b0 = np.asarray(Image.open(folder / by[(200, 0.0)]["images"][0]["path"]), dtype=float)
    a1 = np.asarray(Image.open(folder / by[(100, 1.0)]["images"][0]["path"]), dtype=float)
    assert np.abs(a0 - b0).max() == 0 and np.abs(a0 - a1).mean() > 0.5
    best = ev["best"]
    assert (folder / best["lora_diffusers"]).is_file() and (folder / best["lora_kohya"]).is_file()
    assert best["constraints_met"] is True
    assert ctx.metrics["best_step"] == best["step"]

    # Report section renders, labels tiny random models, highlights the best.
    from runner.stages.report import _jinja_env

    secs = E.report_sections({}, {"evaluation": out["evaluation"]}, {"thumbnail_px": 96})
    html = _jinja_env().get_template(secs[0].template).render(**secs[0].context, stage_id="x", section=secs[0])
    assert "Tiny random models" in html and "tiny random" in html
    assert "best" in html and html.count("data:image/jpeg;base64,") >= 8 and "<svg" in html

    # A second run with the same scratch folder resumes every cell (no generation).
    import runner.diffusion.generate as G

    def boom(*a, **k):
        raise AssertionError("should have resumed")

    mp = pytest.MonkeyPatch()
    mp.setattr(G, "generate_images", boom)
    try:
        shutil.rmtree(ctx.out_dir)
        ctx.out_dir.mkdir()
        out2 = E.run(_config(["refs"]), {"lora": lora, "reference0": ref_art}, ctx)
    finally:
        mp.undo()
    ev2 = json.loads((out2["evaluation"].path / "evaluation.json").read_text())
    assert ev2["best"]["cell"] == ev["best"]["cell"]
    assert E._resume_info(ctx.scratch_dir) == "resume after 4 finished checkpoint x scale cells"


@pytest.mark.slow  # about 6 s
def test_changing_targets_reuses_cached_cells(lora_and_refs, tmp_path: Path, monkeypatch) -> None:
    """Only targets/objective changed: a new stage run (new scratch) re-selects without generating."""
    import runner.diffusion.generate as G

    root, lora, ref_art = lora_and_refs
    cache = tmp_path / "shared-cache"

    def ctx_in(name: str) -> LocalStageContext:
        return LocalStageContext(stage_id="demo:evaluate", character="demo", out_dir=tmp_path / name / "out",
                                 scratch_dir=tmp_path / name / "scratch", cache_dir=cache, project_root=root)

    cfg = _config(["refs"], lora_scales=[1.0], checkpoints="last")
    E.run(cfg, {"lora": lora, "reference0": ref_art}, ctx_in("a"))
    calls = []
    real = G.generate_images
    monkeypatch.setattr(G, "generate_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg2 = {**cfg, "targets": {"full_body": {"clip_t": ">5"}}, "objective": {"maximize": "clip_t", "constraints": {}}}
    out = E.run(cfg2, {"lora": lora, "reference0": ref_art}, ctx_in("b"))
    assert calls == []
    ev = json.loads((out["evaluation"].path / "evaluation.json").read_text())
    assert ev["cells"][0]["targets"]["full_body"]["clip_t"]["pass"] is False and ev["best"]["step"] == 200
    # a different seed list is a different cell: generated again
    E.run({**cfg, "seeds": [3, 4]}, {"lora": lora, "reference0": ref_art}, ctx_in("c"))
    assert calls
    assert not [p for p in (cache / "evaluate-cells").iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.slow  # about 3 s
def test_best_follows_identity_with_real_faces(lora_and_refs, tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    """With a generator that 'draws' the right person only at step 200, scale 1.0, that cell wins."""
    import runner.diffusion.generate as G

    root, lora, ref_art = lora_and_refs
    faces = shared_data / "faces"

    def photo(p: Path) -> Image.Image:
        im = Image.open(p).convert("RGB")
        im.thumbnail((320, 320))
        return im

    right = [photo(faces / "obama" / n) for n in ("obama_03.jpg", "obama_04.jpg")]
    wrong = [photo(faces / "biden" / n) for n in ("biden_01.jpg", "biden_02.jpg")]
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    state = {"step": None}

    import runner.diffusion.lora as L

    orig = L.load_lora

    def tracking_load_lora(pipe, file, adapter_name="default", scale=1.0):
        state["step"] = int(Path(file).parent.name.split("-")[1])
        return orig(pipe, file, adapter_name, scale)

    def fake_generate(pipe, prompts, *, negative_prompt="", seeds, lora_scale=1.0, **kw):
        if state["step"] == 200 and lora_scale == 1.0:
            pool = right
        elif lora_scale == 1.0:
            pool = wrong
        else:
            pool = [blank]  # no face at all
        return [pool[i % len(pool)] for i in range(len(prompts))]

    monkeypatch.setattr(L, "load_lora", tracking_load_lora)
    monkeypatch.setattr(G, "generate_images", fake_generate)
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:evaluate", character="demo", project_root=root)
    cfg = _config(["refs"], targets={"close_up": {"face_similarity": ">=0.9"}},
                  objective={"maximize": "face_similarity", "constraints": {}})
    out = E.run(cfg, {"lora": lora, "reference0": ref_art}, ctx)
    ev = json.loads((out["evaluation"].path / "evaluation.json").read_text())
    by = {(c["step"], c["lora_scale"]): c for c in ev["cells"]}
    assert ev["best"]["step"] == 200 and ev["best"]["lora_scale"] == 1.0
    assert by[(200, 1.0)]["overall"]["face_similarity"] > by[(100, 1.0)]["overall"]["face_similarity"]
    assert by[(100, 0.0)]["overall"]["no_face_rate"] == 1.0
    assert by[(200, 1.0)]["categories"]["close_up"]["consistency"] > 0.9
    assert by[(200, 1.0)]["targets"]["close_up"]["face_similarity"]["pass"] is True
    assert by[(100, 1.0)]["targets"]["close_up"]["face_similarity"]["pass"] is False


def test_bad_inputs_are_clear(lora_and_refs, tmp_path: Path) -> None:
    root, lora, ref_art = lora_and_refs
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:evaluate", character="demo", project_root=root)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text("{not json")
    with pytest.raises(contract.StageError, match="cannot read the train stage's LoRA index"):
        E.run(_config(["refs"]), {"lora": contract.Artifact("lora", broken), "reference0": ref_art}, ctx)
    empty = tmp_path / "norefs"
    empty.mkdir()
    with pytest.raises(contract.StageError, match="no reference images"):
        E.run(_config(["norefs"]), {"lora": lora, "reference0": contract.Artifact("reference0", empty)}, ctx)
    with pytest.raises(contract.StageError, match="evaluate.clip_model"):
        E.run(_config(["refs"], clip_model="builtin:nope"), {"lora": lora, "reference0": ref_art}, ctx)
    assert not any(ctx.out_dir.iterdir())  # nothing half-written


class _Graph:
    def __init__(self, root: Path, trains: list[contract.PlanNode]):
        self.character = "luca"
        self.project_root = root
        self.spec_file = root / "specs" / "luca.yaml"
        self._trains = trains

    def nodes_of(self, kind: str):
        return self._trains if kind == "train" else []

    def node(self, stage_id: str):
        return next((n for n in self._trains if n.id == stage_id), None)


def _train(variant: str | None) -> contract.PlanNode:
    return contract.PlanNode(id=contract.node_id("luca", "train", variant), kind="train", character="luca",
                         config={}, outputs=("lora", "logs"))


def test_expand_one_node_per_train_variant(tmp_path: Path) -> None:
    spec = {
        "character": {"name": "luca", "trigger": "lcachar", "class_word": "3d cartoon boy", "references": ["data/ref"]},
        "dataset": {"analysis": {"insightface_pack": "buffalo_l", "insightface_root": "~/.insightface"}},
        "evaluate": {"suite": "builtin", "categories": ["close_up", "full_body"], "prompts_per_category": 3,
                     "seeds": [1, 2], "lora_scales": [0.7, 1.0], "targets": {"close_up": {"consistency": ">0.9"}},
                     "objective": {"maximize": "face_similarity", "constraints": {"clip_t": ">=0.22"}}},
        "hardware": {"gpu": "A10G", "stage_gpu": {"evaluate": "L40S"}},
    }
    graph = _Graph(tmp_path, [_train("base"), _train("higher_rank")])
    nodes = E.expand(spec, graph)
    assert [n.id for n in nodes] == ["luca:evaluate[base]", "luca:evaluate[higher_rank]"]
    n = nodes[1]
    assert n.inputs["lora"] == contract.StageOutputRef("luca:train[higher_rank]", "lora")
    assert isinstance(n.inputs["reference0"], contract.FileSetRef)
    assert n.inputs["reference0"].root == tmp_path / "data/ref"
    assert n.config["variant"] == "higher_rank" and n.gpu == "L40S"
    prompts = n.config["suite"]["prompts"]
    assert len(prompts) == 6 and all("lcachar 3d cartoon boy" in p["prompt"] for p in prompts)
    json.dumps(n.config)  # JSON-serializable (hashed into the cache key)
    assert "= 24 images per checkpoint" in n.label
    # nothing to evaluate without train nodes or without an evaluate section
    assert E.expand(spec, _Graph(tmp_path, [])) == []
    assert E.expand({k: v for k, v in spec.items() if k != "evaluate"}, graph) == []


@pytest.mark.parametrize("patch, match", [
    ({"targets": {"wide": {"dino": ">0.5"}}}, "category 'wide' is not evaluated"),
    ({"objective": {"maximize": "beauty"}}, "unknown metric 'beauty'"),
    ({"suite": "nope"}, "neither a built-in suite"),
    ({"categories": ["occluded"]}, "occluded not in suite"),
])
def test_expand_rejects_bad_evaluate_sections(tmp_path: Path, patch: dict, match: str) -> None:
    spec = {"character": {"name": "luca", "trigger": "t", "references": ["r"]},
            "evaluate": {"suite": "builtin", **patch}}
    with pytest.raises(contract.StageError, match=match):
        E.expand(spec, _Graph(tmp_path, [_train(None)]))


def test_expand_needs_references(tmp_path: Path) -> None:
    spec = {"character": {"name": "luca", "trigger": "t", "references": []}, "evaluate": {}}
    with pytest.raises(contract.StageError, match="character.references is empty"):
        E.expand(spec, _Graph(tmp_path, [_train(None)]))
