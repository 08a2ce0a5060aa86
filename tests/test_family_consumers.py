"""Every consumer of a trained LoRA on every model family (issue 14 part 6): generate_images
(checkpoint samples, evaluation, storyboard and serve all call it), in-context references, the
evaluate stage comparing LoRA / references / both, the storyboard's in-context reference mode
and `runner serve`, on the tiny random models of the DiT families (their images are noise: the
tests show that the pipelines run and what changes the output, nothing about quality).

LoRAs are made here with families.add_lora + families.save_lora on the tiny models (random,
non-zero lora_B), the file the trainer writes through the same writer.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runner.core import contract
from runner.core.errors import UserError
from runner.diffusion import families

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIT = ("flux1", "flux2", "flux2_klein", "qwen_image", "sd3", "z_image")
SIDE = 64  # FLUX.2's image processor refuses reference images under 64 px


def _sig(cls_name: str, method: str = "__call__") -> inspect.Signature:
    import diffusers

    return inspect.signature(getattr(getattr(diffusers, cls_name), method))


@pytest.mark.slow  # 10-25 s: importing every family's pipeline classes (diffusers and transformers modules)
def test_generation_args_name_what_the_installed_pipelines_take():
    """Each family's GenerationArgs against the diffusers 0.42 signatures: the guidance keyword,
    the negative prompt, the ControlNet classes and map keyword, the IP-Adapter loader's
    encoder keyword, the reference pipeline's image, area and fixed keywords."""
    import diffusers

    for fam in families.all_families():
        g = fam.generation
        params = _sig(fam.pipeline).parameters
        assert g.guidance in params, (fam.name, g.guidance)
        assert (g.negative != "none") <= ("negative_prompt" in params), fam.name
        if g.controlnet:
            assert hasattr(diffusers, g.controlnet.model), g.controlnet.model
            assert g.controlnet.image_keyword in _sig(g.controlnet.pipeline).parameters, fam.name
        if g.ip_adapter:
            assert g.ip_adapter.encoder_keyword in _sig(fam.pipeline, "load_ip_adapter").parameters, fam.name
        if g.references:
            rparams = _sig(g.references.pipeline).parameters
            assert "image" in rparams and g.guidance in rparams, fam.name
            assert all(k in rparams for k in g.references.call_kwargs(64, 64)), fam.name
        assert fam.generation.describe().startswith(f"guidance: {g.guidance}")


def test_sampler_keywords_and_the_pipeline_family():
    from runner.diffusion.generate import ignored_settings, pipeline_family, sampler_kwargs

    kw = {name: sampler_kwargs(families.get(name), guidance=3.0, negative_prompt="", n=2) for name in families.names()}
    assert kw["sd15"] == {"guidance_scale": 3.0}  # no negative prompt: the pipeline's empty default, as before
    assert kw["qwen_image"] == {"true_cfg_scale": 3.0, "negative_prompt": ["", ""]}  # true CFG needs one
    neg = sampler_kwargs(families.get("flux1"), guidance=3.5, negative_prompt="blurry", n=1)
    assert neg == {"guidance_scale": 3.5}  # the embedded guidance; FLUX.1 takes no negative prompt here
    assert ignored_settings(families.get("flux1"), negative_prompt="blurry")
    assert sampler_kwargs(families.get("z_image"), guidance=0.0, negative_prompt="x", n=1)["negative_prompt"] == ["x"]
    for cls, name in (("FluxKontextPipeline", "flux1"), ("StableDiffusionXLControlNetPipeline", "sdxl"),
                      ("Flux2KleinPipeline", "flux2_klein"), ("QwenImageControlNetPipeline", "qwen_image")):
        assert pipeline_family(type(cls, (), {})()) is families.get(name)
    with pytest.raises(UserError, match="KandinskyPipeline"):
        pipeline_family(type("KandinskyPipeline", (), {})())


def test_a_family_without_references_or_adapters_is_refused_with_what_has_them():
    from runner.generate import references as R

    with pytest.raises(UserError) as exc:
        R.in_context_args(families.get("z_image"), "generate.storyboard.reference_guided.mode: in_context")
    assert "takes no reference images" in str(exc.value) and "flux2" in exc.value.hint
    assert "ControlNet" in exc.value.hint  # what z_image has instead
    with pytest.raises(UserError) as exc:
        R.require_adapters(families.get("flux2"), ip_adapter=True, controlnet=False, key="k")
    assert "k.ip_adapter" in str(exc.value) and "sd15" in exc.value.hint and "in_context" in exc.value.hint
    R.require_adapters(families.get("sdxl"), ip_adapter=True, controlnet=True, key="k")


# ---------------------------------------------------------------------------------------------
# tiny models with LoRAs, shared by the tests below


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory):
    """name -> (tiny model folder, the LoRA file of a random adapter on it), built on first use."""
    root = tmp_path_factory.mktemp("family-loras")
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            import torch

            fam = families.get(name)
            folder = families.tiny_path(f"builtin:{fam.tiny}")
            c = families.components_of(families.load_pipeline(fam, folder), fam)
            families.add_lora(c, rank=4, seed=0)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                for n, p in c.denoiser.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.5)
            made[name] = folder, families.save_lora(c, root / name)
        return made[name]

    return get


def _arr(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.mark.slow  # 1-9 s per family (FLUX.1's in-context pass is the longest)
@pytest.mark.parametrize("name", DIT)
def test_generate_images_with_lora_and_references(name: str, tiny_loras, shared_data: Path):
    from PIL import Image

    from runner.diffusion.generate import generate_images
    from runner.diffusion.lora import load_lora
    from runner.generate import references as R

    folder, lora = tiny_loras(name)
    fam = families.get(name)
    pipe = families.load_pipeline(fam, folder)
    kw = dict(seeds=[1, 2], steps=2, guidance=2.0, width=SIDE, height=SIDE, negative_prompt="blurry")
    base = _arr(generate_images(pipe, ["a photo of a man"], **kw))
    load_lora(pipe, lora, adapter_name="character")
    with_lora = _arr(generate_images(pipe, ["a photo of a man"], lora_scale=1.0, **kw))
    at_zero = _arr(generate_images(pipe, ["a photo of a man"], lora_scale=0.0, **kw))
    assert base.shape == (2, SIDE, SIDE, 3)
    assert np.abs(with_lora - base).max() > 0, "the LoRA changes the images"
    assert np.array_equal(at_zero, base), "LoRA scale 0 is the base model"
    alone = _arr(generate_images(pipe, ["a photo of a man"], lora_scale=1.0, **{**kw, "seeds": [2]}))
    assert np.abs(alone[0] - with_lora[1]).max() <= 2  # batched or alone: the same image (float rounding)
    if fam.generation.references is None:
        return
    rpipe = R.reference_pipeline(pipe, fam)
    with Image.open(shared_data / "faces" / "obama" / "obama_01.jpg") as im:
        ref = im.convert("RGB")
    plain = _arr(generate_images(rpipe, ["a photo of a man"], lora_scale=1.0,
                                 pipe_kwargs=R.plain_kwargs(rpipe, fam, SIDE, SIDE), **kw))
    conditioned = _arr(generate_images(rpipe, ["a photo of a man"], lora_scale=1.0,
                                       pipe_kwargs=R.in_context_kwargs(fam, [ref], SIDE, SIDE), **kw))
    assert plain.shape == conditioned.shape == (2, SIDE, SIDE, 3)
    assert np.array_equal(plain, with_lora), "the reference pipeline shares the modules and the LoRA"
    assert np.abs(conditioned - plain).max() > 0, "the reference image conditions the output"


# ---------------------------------------------------------------------------------------------
# evaluate, storyboard and serve on a non-SD checkpoint


def _lora_artifact(root: Path, name: str, tiny_loras) -> contract.Artifact:
    """The train stage's ``lora`` output (index.json + one checkpoint) for a family's tiny model."""
    _, file = tiny_loras(name)
    fam = families.get(name)
    (root / "checkpoint-10").mkdir(parents=True)
    shutil.copy(file, root / "checkpoint-10" / file.name)
    (root / "index.json").write_text(json.dumps({
        "base_model": f"builtin:{fam.tiny}", "model_family": name, "resolution": SIDE, "trigger": "dmochr",
        "class_word": "man", "variant": None, "tiny_random_model": True, "final": 0,
        "checkpoints": [{"step": 10, "phase": "main", "val_loss": None, "samples": [], "kohya": None,
                         "diffusers": f"checkpoint-10/{file.name}"}]}))
    return contract.Artifact("lora", root)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, shared_data: Path) -> tuple[Path, contract.Artifact]:
    root = tmp_path_factory.mktemp("consumers")
    folder = root / "refs"
    folder.mkdir()
    for n in ("obama_01.jpg", "obama_02.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / n, folder / n)
    return root, contract.Artifact("reference0", folder, files=tuple(sorted(folder.iterdir())))


def _eval_config(**over) -> dict:
    from test_eval_stage import _config

    return _config(["refs"], seeds=[1], lora_scales=[1.0], resolution=SIDE,
                   suite={"source": "inline", "prompts": [{"category": "close_up", "index": 0, "template": "",
                                                           "prompt": "close-up photo of dmochr man", "negative": ""}]},
                   targets={}, objective={"maximize": "clip_t"}, **over)


@pytest.mark.slow  # about 6 s: three conditions of one tiny FLUX.2 klein cell each
def test_evaluate_compares_lora_references_and_both(refs, tiny_loras, tmp_path: Path):
    from PIL import Image

    from runner.backends.context import LocalStageContext
    from runner.stages import evaluate as E

    root, ref_art = refs
    lora = _lora_artifact(tmp_path / "lora", "flux2_klein", tiny_loras)
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:evaluate", character="demo", project_root=root)
    ctx.cache_dir = tmp_path / "cache"
    config = _eval_config(conditions=["lora", "references", "lora+references"])
    out = E.run(config, {"lora": lora, "reference0": ref_art}, ctx)
    folder = out["evaluation"].path
    ev = json.loads((folder / "evaluation.json").read_text())
    assert ev["model_family"] == "flux2_klein" and ev["tiny_random"]["diffusion"]
    by = {c["cell"]: c for c in ev["cells"]}
    assert set(by) == {"references", "step000010_scale1", "step000010_scale1_refs"}
    assert by["references"]["checkpoint_index"] is None
    assert by["step000010_scale1_refs"]["condition"] == "lora+references"
    assert ev["best"]["cell"] != "references"  # the best names a LoRA file
    assert set(ev["conditions"]) == {"lora", "references", "lora+references"}
    images = {c: np.asarray(Image.open(folder / by[c]["images"][0]["path"]), dtype=np.int16)
              for c in by}
    assert np.abs(images["step000010_scale1"] - images["step000010_scale1_refs"]).max() > 0
    assert np.abs(images["references"] - images["step000010_scale1_refs"]).max() > 0
    assert "condition references: best references" in ctx.log_file.read_text()

    from runner.eval.report import evaluation_context

    labels = [r["label"] for r in evaluation_context(ev, folder, thumb_px=32)["rows"]]
    assert "references alone (base model, no LoRA)" in labels and "step 10 main @ 1 + references" in labels


@pytest.mark.slow  # about 2 s (a LoRA cell of tiny Z-Image, then the refusal)
def test_evaluate_references_on_a_family_without_them_is_refused(refs, tiny_loras, tmp_path: Path):
    from runner.backends.context import LocalStageContext
    from runner.stages import evaluate as E

    root, ref_art = refs
    lora = _lora_artifact(tmp_path / "lora", "z_image", tiny_loras)
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:evaluate", character="demo", project_root=root)
    ctx.cache_dir = tmp_path / "cache"
    out = E.run(_eval_config(), {"lora": lora, "reference0": ref_art}, ctx)  # LoRA alone works on Z-Image
    assert json.loads((out["evaluation"].path / "evaluation.json").read_text())["model_family"] == "z_image"
    with pytest.raises(contract.StageError) as exc:
        E.run(_eval_config(conditions=["lora", "references"]), {"lora": lora, "reference0": ref_art},
              LocalStageContext.for_folder(tmp_path / "run2", stage_id="demo:evaluate", character="demo",
                                           project_root=root))
    assert "evaluate.conditions" in str(exc.value) and "flux2_klein" in exc.value.hint


def _storyboard_node(root: Path, **guided):
    from test_storyboard import Graph, _node, spec

    from runner.stages import storyboard as SB

    s = spec(width=SIDE, height=SIDE, validation={"face_similarity": None, "clip_i": None, "retries": 0},
             reference_guided={"enabled": True, **guided})
    s["train"]["base_model"] = "builtin:tiny-flux2-klein"
    s["train"]["model_family"] = "flux2_klein"
    return SB.expand(s, Graph(root, [_node("train")]))[0]


@pytest.mark.slow  # about 4 s: three tiny FLUX.2 klein frames, twice
def test_storyboard_in_context_references_with_and_without_the_lora(refs, tiny_loras, tmp_path: Path):
    from PIL import Image

    from runner.backends.context import LocalStageContext
    from runner.stages import storyboard as SB

    root, ref_art = refs
    lora = _lora_artifact(tmp_path / "lora", "flux2_klein", tiny_loras)
    frames = {}
    for with_lora in (True, False):
        node = _storyboard_node(root, lora=with_lora)
        assert ("lora" in node.inputs) == with_lora
        ctx = LocalStageContext.for_folder(tmp_path / f"run{with_lora}", stage_id=node.id, character="demo",
                                           project_root=root)
        ctx.cache_dir = tmp_path / "cache"
        inputs = {"reference0": ref_art, **({"lora": lora} if with_lora else {})}
        out = SB.run(node.config, inputs, ctx)
        folder = out["storyboard"].path
        rep = json.loads((folder / "report.json").read_text())
        g = rep["reference_guided"]
        assert g["mode"] == "in_context" and g["pipeline"] == "Flux2KleinPipeline" and g["lora"] is with_lora
        assert g["frame1_conditioned_on_references"] and g["images_per_frame"] == 3  # frame 1 + two references
        assert rep["model_family"] == "flux2_klein" and rep["tiny_random"]["any"]
        frames[with_lora] = np.asarray(Image.open(folder / "frames/02.png"), dtype=np.int16)
    assert np.abs(frames[True] - frames[False]).max() > 0  # the LoRA matters


@pytest.mark.slow  # about 1 s
def test_storyboard_reference_mode_a_family_lacks_is_refused(refs, tiny_loras, tmp_path: Path):
    from runner.backends.context import LocalStageContext
    from runner.stages import storyboard as SB

    root, ref_art = refs
    lora = _lora_artifact(tmp_path / "lora", "flux2_klein", tiny_loras)
    node = _storyboard_node(root, mode="adapters", ip_adapter="builtin:tiny-ip-adapter")
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=root)
    with pytest.raises(contract.StageError) as exc:
        SB.run(node.config, {"reference0": ref_art, "lora": lora}, ctx)
    assert "IP-Adapter" in str(exc.value) and "in_context" in exc.value.hint


@pytest.mark.slow  # about 2 s
def test_serve_engine_on_a_non_sd_checkpoint(tiny_loras):
    from runner.serve.character import ServeTarget
    from runner.serve.engine import ImageEngine, ImageJob, ImageParams

    _, lora = tiny_loras("z_image")
    target = ServeTarget(character="hero", trigger="hrochr", class_word="man", base_model="builtin:tiny-z-image",
                         family="z_image", lora_file=str(lora), lora_source="test", lora_scale=1.0, resolution=SIDE,
                         steps=2, guidance=2.0, tiny_random=True)
    engine = ImageEngine(target, device="cpu")
    out = {}
    for scale in (1.0, 0.0):
        params = ImageParams("blurry", 2, 2.0, 32, 32, scale)
        images = engine.run_images([ImageJob("hrochr man", 3, params)])
        out[scale] = [np.asarray(im, dtype=np.int16) for im, _ in images]
    assert out[1.0][0].shape == (32, 32, 3)
    assert np.abs(out[1.0][0] - out[0.0][0]).max() > 0
