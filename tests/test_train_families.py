"""The trainer on the tiny model of every DiT family (FLUX.1, FLUX.2 dev and klein, Qwen-Image,
Z-Image, SD3): the same LoraTrainer the SD families use, through the family registry. A few
steps on CPU lower the loss of the images trained on (at fixed timesteps and noise), a run
stopped after a checkpoint resumes to the same LoRA as an uninterrupted one, and the outputs
name the family. The SD families are covered by tests/test_train.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner.diffusion import families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset  # noqa: E402

DIT = [f.name for f in families.all_families() if f.denoiser != "unet"]
STEPS = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(fam) -> dict:
    from runner.stages import train as T

    return T.train_config({
        "base_model": f"builtin:{fam.tiny}", "resolution": 32, "buckets": {"enabled": False},
        "lora": {"rank": 4, "alpha": 4}, "steps": STEPS, "lr": 2e-2, "batch_size": 2, "mixed_precision": "no",
        "lr_scheduler": {"name": "constant"}, "caption_dropout": 0.2,
        "checkpoints": {"every_steps": 4, "keep_last": 2, "sample_steps": 2, "sample_seeds": [1],
                        "sample_prompts": ["{trigger} {class}, portrait"], "validation_fraction": 0.0},
    }, character="demo", trigger="sks", class_word="person")


def _trainer(cfg: dict, dataset: Path, root: Path, cache: Path, **kw):
    from runner.diffusion.trainer import LoraTrainer

    return LoraTrainer(cfg, dataset_dir=dataset, out_dir=root / "out", scratch_dir=root / "scratch",
                       cache_dir=cache, device="cpu", **kw)


@pytest.mark.slow  # per family: its tiny model built once (~2 s), then 8 + 4 + 4 training steps with checkpoints
@pytest.mark.parametrize("name", DIT)
def test_family_trains_lowers_its_loss_and_resumes_to_the_same_lora(name: str, shared_data: Path, tmp_path: Path):
    from safetensors.torch import load_file

    fam = families.get(name)
    dataset = make_dataset(shared_data, tmp_path / "ds", n=2)
    cfg, cache = _config(fam), tmp_path / "cache"

    ref = _trainer(cfg, dataset, tmp_path / "ref", cache)
    index = ref.run()
    assert index["model_family"] == name and index["tiny_random_model"] is True
    assert [c["step"] for c in index["checkpoints"]] == [4, 8]
    lora = tmp_path / "ref" / "out" / "lora"
    for ck in index["checkpoints"]:
        assert (lora / ck["diffusers"]).is_file() and (lora / ck["kohya"]).is_file()
        assert all((lora / s).is_file() for s in ck["samples"]) and ck["samples"]
    trained = ref.validation_loss(ref.train_ex)  # fixed timesteps and noise per image
    ref.denoiser.disable_adapters()
    untrained = ref.validation_loss(ref.train_ex)
    ref.denoiser.enable_adapters()
    assert trained < untrained, (trained, untrained)

    stopped = _trainer(cfg, dataset, tmp_path / "run", cache, stop_after_step=4).run()
    assert stopped == {"stopped_at": 4}
    resumed = _trainer(cfg, dataset, tmp_path / "run", cache)
    again = resumed.run()
    assert again["resumed_from_step"] == 4 and again["cache"]["misses"] == {"latents": 0, "text": 0}
    a = load_file(str(tmp_path / "run" / "out" / "lora" / again["checkpoints"][-1]["diffusers"]))
    b = load_file(str(lora / index["checkpoints"][-1]["diffusers"]))
    assert a.keys() == b.keys() and a
    import torch

    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "run" / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


def test_text_encoder_training_is_refused_for_families_that_freeze_them(shared_data: Path, tmp_path: Path):
    """Only CLIP text encoders (SD families) train; a DiT family says so naming the key."""
    from runner.diffusion.trainer import TrainError

    fam = families.get("flux1")
    cfg = {**_config(fam), "lora": {**_config(fam)["lora"], "train_text_encoder": True}}
    dataset = make_dataset(shared_data, tmp_path / "ds", n=1)
    with pytest.raises(TrainError, match="train.lora.train_text_encoder: the FLUX.1 text encoders"):
        _trainer(cfg, dataset, tmp_path / "r", tmp_path / "cache").run()


def test_objective_knobs_reach_the_loss_and_are_refused_for_unet_families(shared_data: Path, tmp_path: Path):
    """train.objective sets the flow objective the loss uses; on an epsilon/v family it would
    change nothing, so it is refused naming the keys."""
    from runner.diffusion.trainer import TrainError

    dataset = make_dataset(shared_data, tmp_path / "ds", n=1)
    fam = families.get("flux1")
    cfg = {**_config(fam), "objective": {"timestep_sampling": "mode", "shift": 2.0, "weighting": "cosmap"}}
    tr = _trainer(cfg, dataset, tmp_path / "f", tmp_path / "cache")
    tr._load_model()
    o = tr.c.objective
    assert (o.timestep_sampling, o.shift, o.weighting, o.guidance) == ("mode", 2.0, "cosmap", fam.objective.guidance)
    sd = {**_config(families.get("sd15")), "objective": {"shift": 3.0}}
    with pytest.raises(TrainError, match=r"train.objective.shift: Stable Diffusion 1.5 trains epsilon/v"):
        _trainer(sd, dataset, tmp_path / "s", tmp_path / "cache").run()


def test_a_target_without_a_comfyui_name_is_refused_before_the_first_step(shared_data: Path, tmp_path: Path):
    from runner.diffusion.trainer import TrainError

    fam = families.get("flux1")
    cfg = {**_config(fam), "lora": {"rank": 4, "alpha": 4, "target_modules": ["attn.to_q", "x_embedder"]}}
    dataset = make_dataset(shared_data, tmp_path / "ds", n=1)
    with pytest.raises(TrainError, match=r"train.lora.target_modules: no ComfyUI \(native\) name .*'x_embedder'"):
        _trainer(cfg, dataset, tmp_path / "r", tmp_path / "cache").run()
    assert not (tmp_path / "r" / "scratch" / "logs" / "metrics.jsonl").exists()  # no step ran


def test_a_guidance_far_from_a_distilled_familys_is_a_plan_warning():
    flux, sdxl = families.get("flux1"), families.get("sdxl")
    assert "set it near 3.5" in flux.guidance_note(7.0, "evaluate.guidance")
    assert flux.guidance_note(3.5, "evaluate.guidance") is None and flux.guidance_note(4.5, "x") is None
    assert sdxl.guidance_note(7.0, "evaluate.guidance") is None  # classifier-free: no judgement


@pytest.mark.parametrize("model, says", [("builtin:tiny-nope", "is unknown"),
                                         ("builtin:tiny-ltx", "is LTX-Video 0.9, a video model")])
def test_a_builtin_that_is_no_image_model_fails_the_plan(model: str, says: str):
    from runner.core import contract
    from runner.diffusion.trainer import TrainerConfig
    from runner.stages import train as T

    node = TrainerConfig.from_dict({**_config(families.get("flux1")), "base_model": model, "model_family": "auto"})
    with pytest.raises(contract.StageError, match=f"train.base_model {model} {says}"):
        T._family_of(node)
