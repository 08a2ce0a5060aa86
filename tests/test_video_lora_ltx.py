"""Video LoRA training on LTX-Video 0.9 and LTX-2 (tiny random models, CPU): what the families do
around the transformer is what their image-to-video pipelines do (normalization, packing, the
conditioning mask's per-token timesteps), the transformer predicts the velocity the scheduler
steps with (the flow loss's target ``noise - x0``), LTX-2's video prediction does not depend on
the audio stream, and the train_video trainer lowers the loss of what it trained on, resumes a
stopped run to the same LoRA, and writes a file the pipeline's own ``load_lora_weights`` reads and
that changes the transformer's output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_video import _config, _trainer, make_clips  # noqa: E402
from train_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFS = {"ltx_video": "builtin:tiny-ltx", "ltx2": "builtin:tiny-ltx2"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The session's model cache (conftest's): the tiny models built once for every test using them."""
    return tmp_path_factory.getbasetemp() / "model-cache"


@pytest.fixture(scope="module")
def loaded(cache: Path):
    from runner.diffusion import families

    out = {}

    def get(name: str):
        if name not in out:
            fam = families.get(name)
            pipe = families.load_pipeline(fam, families.tiny_path(REFS[name], cache))
            out[name] = (fam, pipe, families.components_of(pipe, fam))
        return out[name]

    return get


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(REFS))
def test_latents_tokens_and_timesteps_are_the_pipelines(name: str, loaded):
    """to_model_latents is the pipeline's _normalize_latents (non-trivial mean/std), pack/unpack
    its _pack_latents/_unpack_latents, and the per-token timesteps its ``t x (1 - mask)`` with the
    mask prepare_latents builds for given latents."""
    import torch

    from runner.diffusion.families import ltx_video

    fam, pipe, c = loaded(name)
    vae = pipe.vae
    ch = vae.latents_mean.shape[0]
    before = vae.latents_mean.clone(), vae.latents_std.clone()
    try:
        vae.latents_mean.copy_(torch.randn(ch, generator=_gen(0)))
        vae.latents_std.copy_(torch.rand(ch, generator=_gen(1)) + 0.5)
        raw = torch.randn(2, ch, 3, 4, 6, generator=_gen(2))
        want = pipe._normalize_latents(raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        torch.testing.assert_close(fam.to_model_latents(pipe, raw), want)
    finally:
        vae.latents_mean.copy_(before[0])
        vae.latents_std.copy_(before[1])
    x = torch.randn(2, ch, 3, 4, 6, generator=_gen(3))
    for p, pt in ((1, 1), (2, 1)):
        tokens = ltx_video.pack(x, p, pt)
        torch.testing.assert_close(tokens, pipe._pack_latents(x, p, pt))
        torch.testing.assert_close(ltx_video.unpack(tokens, 3, 4 // p, 6 // p, p, pt), x)
    sp = pipe.vae_spatial_compression_ratio
    frames = (3 - 1) * pipe.vae_temporal_compression_ratio + 1
    args = (None, 2, ch, 4 * sp, 6 * sp, frames) + (() if name == "ltx_video" else (0.0,))
    _, mask = pipe.prepare_latents(*args, torch.float32, "cpu", None, pipe._pack_latents(x, 1, 1))
    sigmas = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(ltx_video.token_timesteps(sigmas, x.shape, 1, 1, "cpu"),
                               (sigmas * 1000.0)[:, None] * (1 - mask))
    still = ltx_video.token_timesteps(sigmas, (2, ch, 1, 4, 6), 1, 1, "cpu")
    assert bool((still == (sigmas * 1000.0)[:, None]).all())  # a still has no key frame


def _pipeline_call(pipe, name: str):
    """The keywords and the output of the transformer's first call in one step of the pipeline's
    image-to-video ``__call__`` (9 frames, 32 px, 24 fps), row ``-1`` (the prompt's, after CFG's
    negative one where the pipeline batches both)."""
    import numpy as np
    import torch
    from PIL import Image

    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    try:
        with torch.no_grad():
            pipe(image=image, prompt="sks person smiles", num_frames=9, height=32, width=32, num_inference_steps=1,
                 guidance_scale=1.0, output_type="latent", frame_rate=24, generator=_gen(0),
                 **({"image_crf": 0} if name == "ltx2" else {}))
    finally:
        hook.remove()
    kw, out = seen[0]
    rows = kw["hidden_states"].shape[0]
    kw = {k: v[-1:] if torch.is_tensor(v) and v.ndim and v.shape[0] == rows else v for k, v in kw.items()}
    return kw, out[0][-1:]


@pytest.mark.parametrize("name", sorted(REFS))
def test_predict_is_the_pipelines_transformer_call(name: str, loaded):
    """The cached captions are what the pipeline's __call__ hands the transformer (LTX-2: after
    its connectors), and predict on the pipeline's noisy latents at its sigma gives the pipeline's
    transformer output (LTX-2: the same call with the audio stream isolated)."""
    import torch

    from runner.diffusion.families import Batch, ltx_video

    fam, pipe, c = loaded(name)
    kw, out = _pipeline_call(pipe, name)
    text = fam.collate(fam.encode_captions(pipe, ["sks person smiles"]))
    torch.testing.assert_close(text["prompt_embeds"], kw["encoder_hidden_states"])
    torch.testing.assert_close(text["mask"], kw["encoder_attention_mask"].float())
    f, h, w = kw["num_frames"], kw["height"], kw["width"]
    noisy = ltx_video.unpack(kw["hidden_states"], f, h, w, 1, 1)
    sigma = kw["timestep"].amax(dim=1) / 1000.0
    audio = None
    if name == "ltx2":
        audio = (kw["audio_hidden_states"], kw["audio_coords"], kw["audio_encoder_hidden_states"])
        with torch.no_grad():
            out = pipe.transformer(**{**kw, "isolate_modalities": True})[0]
    with torch.no_grad():
        mine = fam.predict(c, noisy, sigma, Batch(latents=noisy, text=text), **({"audio": audio} if audio else {}))
    assert f > 1 and bool((kw["timestep"][:, :h * w] == 0).all())  # the key frame's tokens: timestep 0
    torch.testing.assert_close(mine, ltx_video.unpack(out, f, h, w, 1, 1))


@pytest.mark.parametrize("name", sorted(REFS))
def test_the_velocity_noise_minus_x0_is_what_the_scheduler_steps_with(name: str, loaded):
    """x_sigma = (1 - sigma) x0 + sigma noise; the pipeline's scheduler step from sigma with the
    model output noise - x0 lands on x_sigma_next exactly (the flow loss's target is the model's)."""
    import torch

    fam, pipe, _ = loaded(name)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=[0.8, 0.5, 0.2], device="cpu", **({"mu": 1.0} if sched.config.use_dynamic_shifting
                                                                  else {}))
    s, s_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=_gen(4)), torch.randn(1, 4, 2, 3, 3, generator=_gen(5))
    step = sched.step(noise - x0, sched.timesteps[0], (1 - s) * x0 + s * noise, return_dict=False)[0]
    torch.testing.assert_close(step, (1 - s_next) * x0 + s_next * noise)
    assert fam.objective.prediction == "flow" and fam.video.key_frame == "clean_first"


def test_ltx2_video_prediction_does_not_depend_on_the_audio_stream(loaded):
    """The audio stream is isolated: five random audio tokens with a random caption give the same
    video prediction as the one silent token training uses."""
    import torch

    from runner.diffusion.families import Batch

    fam, pipe, c = loaded("ltx2")
    text = fam.collate(fam.encode_captions(pipe, ["sks person smiles"]))
    noisy = torch.randn(1, pipe.transformer.config.in_channels, 3, 4, 4, generator=_gen(6))
    batch = Batch(latents=noisy, text=text)
    tr = pipe.transformer
    width = tr.audio_caption_projection.linear_1.in_features
    audio = (torch.randn(1, 5, tr.config.audio_in_channels, generator=_gen(7)),
             tr.audio_rope.prepare_audio_coords(1, 5, "cpu"), torch.randn(1, 7, width, generator=_gen(8)))
    with torch.no_grad():
        silent = fam.predict(c, noisy, torch.tensor([0.6]), batch)
        noisy_audio = fam.predict(c, noisy, torch.tensor([0.6]), batch, audio=audio)
    assert silent.shape == noisy.shape
    torch.testing.assert_close(silent, noisy_audio)


@pytest.mark.slow  # per family: the tiny model (built once), 4 + 2 + 2 steps on 9-frame 32 px clips and stills
@pytest.mark.parametrize("name", sorted(REFS))
def test_ltx_lora_trains_resumes_and_loads(name: str, shared_data: Path, tmp_path: Path, cache: Path, loaded):
    import torch
    from safetensors.torch import load_file

    from runner.diffusion.families import Batch

    dataset = make_dataset(shared_data, tmp_path / "ds", n=1)
    clips = make_clips(shared_data, tmp_path / "clips", n=1)
    cfg = _config(REFS[name], steps=4, checkpoints={"every_steps": 2, "keep_last": 2, "validation_fraction": 0.0})
    ref = _trainer(cfg, dataset, [clips], tmp_path / "ref", cache)
    index = ref.run()
    assert index["model_family"] == name and index["tiny_random_model"] and index["modality"] == "video"
    assert index["dataset"]["frames"] == {"1": 1, "9": 1} and [c["step"] for c in index["checkpoints"]] == [2, 4]
    assert all(ck["kohya"] for ck in index["checkpoints"])  # the ComfyUI file, from the family's layout
    trained = ref.validation_loss(ref.train_ex)  # fixed noise and timesteps per item
    for m in ref.trained:
        m.disable_adapters()
    untrained = ref.validation_loss(ref.train_ex)
    for m in ref.trained:
        m.enable_adapters()
    assert trained < untrained, (trained, untrained)

    assert _trainer(cfg, dataset, [clips], tmp_path / "run", cache, stop_after_step=2).run() == {"stopped_at": 2}
    again = _trainer(cfg, dataset, [clips], tmp_path / "run", cache).run()
    assert again["resumed_from_step"] == 2 and again["cache"]["misses"] == {"latents": 0, "text": 0}
    lora = tmp_path / "ref" / "out" / "lora"
    a = load_file(str(tmp_path / "run" / "out" / "lora" / again["checkpoints"][-1]["diffusers"]))
    b = load_file(str(lora / index["checkpoints"][-1]["diffusers"]))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    # the pipeline's own loader reads the file, and the LoRA changes what the transformer predicts
    fam, pipe, c = loaded(name)
    noisy = torch.randn(1, pipe.transformer.config.in_channels, 3, 4, 4, generator=_gen(9))
    batch = Batch(latents=noisy, text=fam.collate(fam.encode_captions(pipe, ["sks person"])))
    path = lora / index["checkpoints"][-1]["diffusers"]
    with torch.no_grad():
        before = fam.predict(c, noisy, torch.tensor([0.5]), batch)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="hl")
        after = fam.predict(c, noisy, torch.tensor([0.5]), batch)
        pipe.delete_adapters("hl")
    assert not torch.allclose(before, after)
