"""The model family registry (runner/diffusion/families): every family's tiny model builds
offline, is detected from its folder, encodes real photos and captions, gives a finite loss that
falls when a LoRA on the family's default targets overfits one batch, and generates an image;
the objectives' maths is checked on exact predictors without any model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from runner.core.errors import UserError
from runner.diffusion import families
from runner.diffusion.families import base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPECTED = {"sd15", "sdxl", "sd3", "flux1", "flux2", "flux2_klein", "qwen_image", "z_image"}
HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "black-forest-labs/FLUX.1-dev": "flux1",
    "black-forest-labs/FLUX.1-schnell": "flux1",
    "black-forest-labs/FLUX.2-dev": "flux2",
    "black-forest-labs/FLUX.2-klein-4B": "flux2_klein",
    "black-forest-labs/FLUX.2-klein-base-9B": "flux2_klein",
    "Qwen/Qwen-Image": "qwen_image",
    "Tongyi-MAI/Z-Image-Turbo": "z_image",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
}
SIDE = 32  # pixels: every tiny model's latents are 8x8 or 16x16 at this size
LR, STEPS = 5e-2, 15  # overfitting one batch: enough for every tiny family's LoRA to cut its loss by 10%


def test_registry_holds_every_family():
    assert EXPECTED <= set(families.names())
    for fam in families.all_families():
        assert families.get(fam.name) is fam
        assert fam.pipeline in fam.class_names
        line = fam.describe()
        assert line.startswith(f"{fam.title} ({fam.name})") and fam.components[fam.denoiser] in line
        assert ("flow matching" in line) == (fam.objective.prediction == "flow")
        assert fam.lora_targets and fam.text.max_tokens > 0 and fam.size_multiple % 8 == 0
        assert families.by_tiny_name(f"builtin:{fam.tiny}") is fam


@pytest.mark.slow
def test_family_classes_exist_in_the_installed_libraries():
    import diffusers
    import transformers

    for fam in families.all_families():
        assert hasattr(diffusers, fam.pipeline), fam.pipeline
        for comp, cls in fam.components.items():
            assert hasattr(diffusers, cls) or hasattr(transformers, cls), f"{fam.name}.{comp}: {cls}"


def test_registry_import_is_light():
    import subprocess
    import sys

    code = ("import sys, runner.diffusion.families as f; f.all_families(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_family_and_unknown_pipeline_say_what_exists(tmp_path: Path):
    with pytest.raises(UserError) as exc:
        families.get("chroma")
    assert "flux1" in exc.value.hint
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(UserError) as exc:
        families.detect_folder(tmp_path)
    assert "model_index.json" in str(exc.value) and "KandinskyPipeline" in str(exc.value)
    assert "FluxPipeline" in exc.value.hint
    with pytest.raises(UserError, match="model_index.json"):
        families.detect_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="builtin:tiny-nope"):
        families.tiny_path("builtin:tiny-nope", tmp_path)


@pytest.mark.parametrize("hub_id", sorted(HUB_IDS))
def test_hub_ids_name_exactly_one_family(hub_id: str):
    import re

    matches = [f.name for f in families.all_families() if any(re.search(p, hub_id, re.I) for p in f.hub_patterns)]
    assert matches == [HUB_IDS[hub_id]]
    assert families.detect_hub_id(hub_id).name == HUB_IDS[hub_id]


def test_unmatched_targets_reports_names_that_match_no_module():
    import torch

    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.Module())
    model.attn.add_module("to_q", torch.nn.Linear(2, 2))
    model.attn.add_module("to_out", torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    assert base.unmatched_targets(model, ["to_q", "attn.to_q", "to_out.0", "to_k", "o_q"]) == ["to_k", "o_q"]


# ---------------------------------------------------------------------------------------------
# the objectives, on exact predictors (no model)


class _Exact:
    """A denoiser stand-in whose prediction is exactly the objective's target."""

    def __init__(self, target):
        self.target = target
        self.device, self.dtype = "cpu", None


def _components(prediction: str, **objective):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    sched = (DDPMScheduler(num_train_timesteps=1000) if prediction == "scheduler"
             else FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    fam = families.get("flux1" if prediction == "flow" else "sd15")
    return base.Components(family=fam, pipe=None, denoiser=None, scheduler=sched,
                           objective=base.Objective(prediction=prediction, **objective))


@pytest.mark.parametrize("seed", range(3))
def test_flow_loss_is_zero_for_the_velocity_and_positive_otherwise(seed: int):
    import dataclasses

    import torch

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([50.0, 500.0, 950.0])
    c = _components("flow")
    exact = dataclasses.replace(c.family, predict=lambda c_, noisy, sigmas, b: noise - x0)
    c.family = exact
    batch = base.Batch(latents=x0, text={}, noise=noise, timesteps=t)
    assert torch.allclose(base.training_loss(c, batch), torch.zeros(3), atol=1e-6)
    c.family = dataclasses.replace(exact, predict=lambda c_, noisy, sigmas, b: noisy)  # not the velocity
    per = base.training_loss(c, batch)
    assert per.shape == (3,) and bool((per > 0).all())


def test_scheduler_loss_is_zero_for_epsilon_and_v_targets():
    import dataclasses

    import torch

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([10, 700])
    for ptype in ("epsilon", "v_prediction"):
        c = _components("scheduler", min_snr_gamma=5.0)
        c.scheduler.register_to_config(prediction_type=ptype)
        target = noise if ptype == "epsilon" else c.scheduler.get_velocity(x0, noise, t)
        c.family = dataclasses.replace(c.family, predict=lambda c_, noisy, tt, b, target=target: target)
        loss = base.training_loss(c, base.Batch(latents=x0, text={}, noise=noise, timesteps=t))
        assert torch.allclose(loss, torch.zeros(2), atol=1e-6), ptype


def test_sigma_sampling_follows_density_and_shift():
    import torch

    def mean_sigma(seq_len: int, **objective) -> float:
        c = _components("flow", **objective)
        return float(base.sample_sigmas(c, 4000, seq_len, torch.Generator().manual_seed(0)).mean())

    uniform = mean_sigma(256, shift=1.0)
    assert abs(uniform - 0.5) < 0.02
    assert mean_sigma(256, shift=3.0) > uniform + 0.1  # a shift > 1 spends more steps at high noise
    assert mean_sigma(4096) > mean_sigma(256) + 0.05  # dynamic: more image tokens, more noise
    s = base.sample_sigmas(_components("flow", timestep_sampling="logit_normal"), 1000, 1024,
                           torch.Generator().manual_seed(1))
    assert bool(((s > 0) & (s < 1)).all())


def test_dynamic_mu_matches_the_pipeline_formula():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (64, 256, 1024, 4096):
        assert math.isclose(base.dynamic_mu(cfg, n), calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_objective_rejects_unknown_names():
    with pytest.raises(ValueError, match="timestep_sampling"):
        base.Objective(prediction="flow", timestep_sampling="cosine")


# ---------------------------------------------------------------------------------------------
# every family's tiny model


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "model-cache"


def _pixels(shared_data: Path):
    import numpy as np
    import torch
    from PIL import Image

    photos = [shared_data / "faces" / "obama" / "obama_01.jpg", shared_data / "faces" / "biden" / "biden_01.jpg"]
    arrays = []
    for p in photos:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB").resize((SIDE, SIDE)), dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _batch(fam, pipe, pixels, captions, seed: int):
    import torch

    raw = fam.images_to_raw(pipe, pixels)
    assert raw["mean"].shape[0] == len(captions) and raw["mean"].ndim == 4
    gen = torch.Generator().manual_seed(seed)
    sample = raw["mean"] + raw["std"] * torch.randn(raw["mean"].shape, generator=gen)
    latents = fam.to_model_latents(pipe, sample)
    text = fam.encode_captions(pipe, captions)
    assert len(text) == len(captions)
    noise = torch.randn(latents.shape, generator=gen)
    return base.Batch(latents=latents, text=fam.collate(text), generator=gen, noise=noise,
                      timesteps=torch.tensor([300.0, 700.0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_family_detects_trains_and_generates(name: str, tiny_cache: Path, shared_data: Path, tmp_path: Path):
    import numpy as np
    import torch

    fam = families.get(name)
    folder = families.tiny_path(f"builtin:{fam.tiny}", tiny_cache)
    assert families.tiny_path(f"builtin:{fam.tiny}", tiny_cache) == folder  # built once
    assert families.detect_folder(folder) is fam
    pipe = families.load_pipeline(fam, folder)
    c = families.components_of(pipe, fam)

    images = pipe(prompt="a photo of a man", num_inference_steps=2, height=SIDE, width=SIDE, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, SIDE, SIDE, 3) and np.isfinite(images).all()

    families.add_lora(c, rank=4, seed=0)
    lora_modules = [n for n, _ in c.denoiser.named_modules() if n.endswith(".lora_A")]
    for target in fam.lora_targets:
        assert any(n.removesuffix(".lora_A").endswith(target) for n in lora_modules), target

    empty = fam.encode_captions(pipe, [""])  # caption dropout trains on the empty caption
    assert len(empty) == 1 and all(torch.isfinite(v).all() for v in empty[0].values())
    batch = _batch(fam, pipe, _pixels(shared_data), ["a photo of the man, portrait", "a man smiling in the park"], 0)
    params = [p for p in c.denoiser.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in c.denoiser.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = families.training_loss(c, batch).mean()
        assert math.isfinite(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses

    with torch.no_grad():  # the same batch, weighted or not, gives the same finite loss twice
        again = families.training_loss(c, batch, weighted=False)
        assert torch.equal(again, families.training_loss(c, batch, weighted=False))
        assert again.shape == (2,) and bool(torch.isfinite(again).all())
    _check_lora_round_trip(fam, folder, c, batch, tmp_path)


def _check_lora_round_trip(fam, folder: Path, c, batch, tmp_path: Path):
    """The diffusers file of the trained LoRA loads into a fresh pipeline through the public
    ``load_lora_weights`` with no warning, adapts every trained module, and reproduces the
    trained prediction (which differs from the base model's)."""
    import logging
    import re
    import warnings

    import torch

    file = families.save_lora(c, tmp_path / "lora")
    fresh = families.load_pipeline(fam, folder)
    fc = families.components_of(fresh, fam)
    t = torch.tensor([500.0]) if fam.objective.prediction == "flow" else torch.tensor([500])
    t = t.expand(batch.latents.shape[0]).clone()
    noisy = batch.noise.float()
    sigmas = t.float() / 1000 if fam.objective.prediction == "flow" else t
    with torch.no_grad():
        trained, base_pred = fam.predict(c, noisy, sigmas, batch), fam.predict(fc, noisy, sigmas, batch)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="char")
    finally:
        logger.removeHandler(handler)
    # diffusers notes each text encoder the file has no keys for (only the denoiser is trained):
    # that note, naming a text encoder, is the one message allowed
    untrained = [r for r in records if re.match(r"No LoRA keys associated to \w+ found with the prefix='text_encoder",
                                                 r.getMessage())]
    others = [r.getMessage() for r in records if r not in untrained]
    others += [str(w.message) for w in caught if "lora" in str(w.message).lower()]
    assert not others, others
    adapted = {n.removesuffix(".lora_A") for n, _ in c.denoiser.named_modules() if n.endswith(".lora_A")}
    loaded = {n.removesuffix(".lora_A") for n, _ in fc.denoiser.named_modules() if n.endswith(".lora_A")}
    assert adapted and loaded == adapted
    with torch.no_grad():
        reloaded = fam.predict(fc, noisy, sigmas, batch)
    assert torch.allclose(reloaded, trained, atol=1e-4), float((reloaded - trained).abs().max())
    assert not torch.allclose(reloaded, base_pred, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# training predicts what the family's own sampler steps with


def _pipeline_layouts(name: str):
    """(model latents -> the pipeline's ``latents=`` input, its ``output_type="latent"`` output
    -> model latents) for one flow family: each pipeline keeps latents in its own layout."""
    import diffusers

    def flux1(pipe, x):
        return diffusers.FluxPipeline._pack_latents(x, *x.shape)

    def flux1_back(pipe, out, x):
        vsf = pipe.vae_scale_factor
        return diffusers.FluxPipeline._unpack_latents(out, x.shape[2] * vsf, x.shape[3] * vsf, vsf)

    def qwen(pipe, x):
        return diffusers.QwenImagePipeline._pack_latents(x, *x.shape)

    def qwen_back(pipe, out, x):
        vsf = pipe.vae_scale_factor
        return diffusers.QwenImagePipeline._unpack_latents(out, x.shape[2] * vsf, x.shape[3] * vsf, vsf).squeeze(2)

    same = lambda pipe, x: x  # noqa: E731
    return {
        "flux1": (flux1, flux1_back),
        "flux2": (same, lambda pipe, out, x: type(pipe)._unpack_latents_with_ids(out, pipe._prepare_latent_ids(x))),
        "flux2_klein": (same, lambda pipe, out, x: families.get("flux2_klein").to_model_latents(pipe, out)),
        "qwen_image": (qwen, qwen_back),
        "z_image": (same, lambda pipe, out, x: out),
        "sd3": (same, lambda pipe, out, x: out),
    }[name]


NO_CFG = {"z_image": 0.0}  # the guidance_scale that means no classifier-free guidance (else 1: none or embedded 1)
FLOW = sorted(n for n in EXPECTED if families.get(n).objective.prediction == "flow")


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOW)
def test_flow_prediction_is_what_the_pipeline_steps_with(name: str, tiny_cache: Path):
    """One Euler step of the pipeline from pure noise (sigma 1 -> 0) lands on noise - v; the
    family's ``predict`` on the same noise, caption and sigma 1 must give that v. This checks
    packing, position ids, the time scale and sign, and the text conditioning against diffusers'
    own sampler."""
    import torch

    fam = families.get(name)
    pipe = families.load_pipeline(fam, families.tiny_path(f"builtin:{fam.tiny}", tiny_cache))
    if pipe.scheduler.config.get("shift_terminal"):  # one step cannot be stretched to a terminal sigma
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift_terminal=None)
    c = families.components_of(pipe, fam)
    raw = fam.images_to_raw(pipe, torch.zeros(1, 3, SIDE, SIDE))["mean"]
    noise = torch.randn(fam.to_model_latents(pipe, raw).shape, generator=torch.Generator().manual_seed(3))
    to_pipe, from_pipe = _pipeline_layouts(name)
    prompt = "a photo of the man smiling"
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=1, guidance_scale=NO_CFG.get(name, 1.0), height=SIDE, width=SIDE,
                   latents=to_pipe(pipe, noise.clone()), output_type="latent").images
        stepped = from_pipe(pipe, out, noise)
        batch = base.Batch(latents=noise, text=fam.collate(fam.encode_captions(pipe, [prompt])))
        v = fam.predict(c, noise, torch.ones(1), batch)
    assert stepped.shape == noise.shape
    assert torch.allclose(stepped, noise - v, atol=1e-4), float((stepped - (noise - v)).abs().max())


def _checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize("model_type,family", [("v1", "sd15"), ("xl_base", "sdxl"), ("flux-dev", "flux1"),
                                               ("flux-schnell", "flux1"), ("flux2", "flux2"), ("z-image", "z_image")])
def test_single_files_are_detected_by_the_keys_diffusers_reads(model_type: str, family: str, tmp_path: Path):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES as K

    def first(name: str) -> str:
        return K[name][0] if isinstance(K[name], list) else K[name]

    shapes = {
        "v1": {K["v1"]: (4, 4, 1, 1)},
        "xl_base": {K["xl_base"]: (4,)},
        "flux-dev": {first("flux"): (4,), "guidance_in.in_layer.bias": (4,), "img_in.weight": (8, 64)},
        "flux-schnell": {first("flux"): (4,), "img_in.weight": (8, 64)},
        "flux2": {first("flux2"): (4,)},
        "z-image": {first("z-image-turbo"): (4,)},
    }[model_type]
    assert families.detect_file(_checkpoint(tmp_path / "model.safetensors", shapes)).name == family


def test_single_file_that_is_no_base_model_is_refused(tmp_path: Path):
    lora = _checkpoint(tmp_path / "char.safetensors", {"unet.down.0.lora_A.weight": (4, 4)})
    with pytest.raises(UserError, match="char.safetensors: a LoRA"):
        families.detect_file(lora)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="broken.safetensors"):
        families.detect_file(tmp_path / "broken.safetensors")
