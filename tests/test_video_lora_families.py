"""train_video on Wan 2.2 I2V A14B (builtin:tiny-wan22-i2v: two 1-layer experts, boundary 0.875;
random weights): its cache entries (the VAE latents plus the 20-channel condition the pipeline
builds), its two experts (each example through the one its noise level belongs to), the experts
switch (both / high_noise / low_noise), the two LoRA files the pipeline loads, kill -9 resume.

- a few steps lower the loss of what was trained on, at fixed noise and timesteps;
- experts=both writes one diffusers file per expert; WanImageToVideoPipeline.load_lora_weights
  reads both (the second with load_into_transformer_2=True), each changes its own expert's output,
  and runner.generate.video_models.load_lora loads both from the index;
- experts=high_noise trains only ``transformer``: one file, its sampled sigmas all >= the boundary,
  transformer_2 never called;
- a run stopped after a checkpoint resumes to the same two LoRA files as an uninterrupted one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_video import _config, _trainer, make_clips  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "builtin:tiny-wan22-i2v"


def _cfg(**over):
    return _config(MODEL, **{"steps": 4, "checkpoints": {"every_steps": 2, "keep_last": 2,
                                                          "validation_fraction": 0.0}, **over})


def _outputs(pipe, seed: int = 0):
    """Each expert's prediction on one fixed input (36 channels: noisy 16 + condition 20)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, pipe.transformer.config.in_channels, 3, 4, 4, generator=g)
    emb = torch.randn(1, 8, pipe.transformer.config.text_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        return [m(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
                for m in (pipe.transformer, pipe.transformer_2)]


def test_condition_is_what_the_pipeline_builds(tmp_path: Path):
    """encode_i2v's condition equals WanImageToVideoPipeline.prepare_latents' (mask + normalized
    first-frame latents), for a clip and for a still."""
    import torch

    from runner.diffusion import families

    fam = families.get("wan22_i2v")
    pipe = families.load_pipeline(fam, families.tiny_path(MODEL, tmp_path / "cache"))
    g = torch.Generator().manual_seed(3)
    for frames in (9, 1):
        clip = torch.rand(1, 3, frames, 32, 32, generator=g) * 2 - 1
        raw = fam.images_to_raw(pipe, clip)
        _, want = pipe.prepare_latents(clip[:, :, 0], 1, 16, 32, 32, frames, torch.float32, "cpu")
        assert raw["condition"].shape == want.shape == (1, 20, (frames - 1) // 4 + 1, 4, 4)
        torch.testing.assert_close(raw["condition"], want, rtol=1e-4, atol=1e-5)
        assert raw["mean"].shape == (1, 16, (frames - 1) // 4 + 1, 4, 4)


@pytest.mark.slow  # the tiny A14B built once; 4 + 2 + 2 + 2 steps on 9-frame 32 px clips
def test_two_experts_train_save_load_and_resume(shared_data: Path, tmp_path: Path):
    import torch
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import load_file

    from runner.diffusion import families

    clips = make_clips(shared_data, tmp_path / "clips", n=2)
    cache = tmp_path / "cache"
    ref = _trainer(_cfg(), None, [clips], tmp_path / "ref", cache)
    index = ref.run()
    assert index["model_family"] == "wan22_i2v" and index["experts"] == ["transformer", "transformer_2"]
    trained = ref.validation_loss(ref.train_ex)  # fixed timesteps (both experts') and noise
    for m in ref.trained:
        m.disable_adapters()
    untrained = ref.validation_loss(ref.train_ex)
    assert trained < untrained, (trained, untrained)

    lora = tmp_path / "ref" / "out" / "lora"
    last = index["checkpoints"][-1]
    assert set(last["experts"]) == {"transformer", "transformer_2"}
    assert last["diffusers"] == last["experts"]["transformer"]
    assert last["diffusers_2"] == last["experts"]["transformer_2"]
    assert last["kohya"].endswith("-high_noise.safetensors") and last["kohya_2"].endswith("-low_noise.safetensors")
    for key in ("diffusers", "diffusers_2"):  # diffusers' layout: the transformer prefix in both files
        sd = load_file(str(lora / last[key]))
        assert sd and all(k.startswith("transformer.blocks.") for k in sd)

    # diffusers' own loader: the first file into transformer, the second with load_into_transformer_2
    pipe = WanImageToVideoPipeline.from_pretrained(str(families.tiny_path(MODEL, cache)))
    before = _outputs(pipe)
    high, low = lora / last["diffusers"], lora / last["diffusers_2"]
    pipe.load_lora_weights(str(high.parent), weight_name=high.name, adapter_name="high")
    mid = _outputs(pipe)
    pipe.load_lora_weights(str(low.parent), weight_name=low.name, adapter_name="low", load_into_transformer_2=True)
    after = _outputs(pipe)
    assert not torch.allclose(before[0], mid[0]) and torch.equal(before[1], mid[1])
    assert torch.equal(mid[0], after[0]) and not torch.allclose(mid[1], after[1])

    # the video stage's loader finds the second file through the index and loads both
    from runner.generate import video_models

    fresh = WanImageToVideoPipeline.from_pretrained(str(families.tiny_path(MODEL, cache)))
    vp = video_models.VideoPipeline(pipe=fresh, kind="image-to-video", model=MODEL, tiny_random=True,
                                    spatial_ratio=8, temporal_ratio=4, family=families.get("wan22_i2v"))
    video_models.load_lora(vp, high, 1.0)
    got = _outputs(vp.pipe)
    torch.testing.assert_close(got[0], after[0])
    torch.testing.assert_close(got[1], after[1])
    copied = tmp_path / "copied"  # files moved out of the lora folder: the caller names both
    copied.mkdir()
    for f in (high, low):
        (copied / f.name).write_bytes(f.read_bytes())
    vp.pipe = WanImageToVideoPipeline.from_pretrained(str(families.tiny_path(MODEL, cache)))
    video_models.load_lora(vp, copied / high.name, 1.0,
                           experts={"transformer": copied / high.name, "transformer_2": copied / low.name})
    torch.testing.assert_close(_outputs(vp.pipe)[1], after[1])

    # kill after the first checkpoint, resume: the same two files as the uninterrupted run
    assert _trainer(_cfg(), None, [clips], tmp_path / "run", cache, stop_after_step=2).run() == {"stopped_at": 2}
    again = _trainer(_cfg(), None, [clips], tmp_path / "run", cache).run()
    assert again["resumed_from_step"] == 2
    for key in ("diffusers", "diffusers_2"):
        a = load_file(str(tmp_path / "run" / "out" / "lora" / again["checkpoints"][-1][key]))
        b = load_file(str(lora / last[key]))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_high_noise_trains_only_the_first_expert_above_the_boundary(shared_data: Path, tmp_path: Path,
                                                                     monkeypatch):
    import torch

    from runner.diffusion.families import base, videokit

    seen, owners = [], []
    real_sample, real_owner = base.sample_sigmas, videokit.expert_of

    def sample(c, *a, **kw):
        seen.append(real_sample(c, *a, **kw))
        return seen[-1]

    def owner(c, sigmas):
        owners.extend(real_owner(c, sigmas))
        return owners[-len(sigmas):]

    monkeypatch.setattr(base, "sample_sigmas", sample)
    monkeypatch.setattr(videokit, "expert_of", owner)
    clips = make_clips(shared_data, tmp_path / "clips", n=1)
    tr = _trainer(_cfg(experts="high_noise", steps=2, checkpoints={"every_steps": 2, "validation_fraction": 0.0}),
                  None, [clips], tmp_path / "r", tmp_path / "cache")
    index = tr.run()
    assert index["experts"] == ["transformer"]
    assert owners and set(owners) == {"transformer"}  # transformer_2 never ran (training or validation)
    ck = index["checkpoints"][-1]
    assert set(ck["experts"]) == {"transformer"} and not ck.get("diffusers_2")
    assert ck["kohya"].endswith("-high_noise.safetensors")
    sig = torch.cat(seen)
    assert len(sig) and bool((sig >= 0.875).all()), sig
    assert not any(p.requires_grad for p in tr.pipe.transformer_2.parameters())
    assert any(p.requires_grad for p in tr.pipe.transformer.parameters())


def test_expert_ranges_and_the_mixed_batch_split(tmp_path: Path):
    """Sigmas restricted to a range keep the unrestricted shape inside it (rejection), and a batch
    mixing both experts' noise levels gives each example its own expert's output."""
    import torch

    from runner.diffusion import families
    from runner.diffusion.families import Batch, base, videokit

    fam = families.get("wan22_i2v")
    pipe = families.load_pipeline(fam, families.tiny_path(MODEL, tmp_path / "cache"))
    c = families.components_of(pipe, fam)
    videokit.select_experts(c, "low_noise")
    assert c.experts == ("transformer_2",) and c.sigma_range == (0.0, 0.875)
    s = base.sample_sigmas(c, 512, 64, torch.Generator().manual_seed(0))
    assert s.shape == (512,) and bool((s < 0.875).all())
    videokit.select_experts(c, "both")
    assert c.sigma_range is None and videokit.expert_of(c, [0.9, 0.5]) == ["transformer", "transformer_2"]

    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 16, 3, 4, 4, generator=g)
    batch = Batch(latents=noisy, text={"prompt_embeds": torch.randn(2, 8, 32, generator=g)},
                  extra={"condition": torch.randn(2, 20, 3, 4, 4, generator=g)})
    with torch.no_grad():
        both = fam.predict(c, noisy, torch.tensor([0.5, 0.95]), batch)
        for i, sigma in enumerate((0.5, 0.95)):
            one = Batch(latents=noisy[i:i + 1], text={"prompt_embeds": batch.text["prompt_embeds"][i:i + 1]},
                        extra={"condition": batch.extra["condition"][i:i + 1]})
            torch.testing.assert_close(fam.predict(c, noisy[i:i + 1], torch.tensor([sigma]), one), both[i:i + 1])
    x = torch.cat([noisy[1:], batch.extra["condition"][1:]], dim=1)
    emb = torch.cat([batch.text["prompt_embeds"][1:], torch.zeros(1, 504, 32)], dim=1)
    with torch.no_grad():
        hi = pipe.transformer(hidden_states=x, timestep=torch.tensor([950.0]), encoder_hidden_states=emb,
                              return_dict=False)[0]
    torch.testing.assert_close(both[1:], hi)
    assert videokit.expert_ranges(c)["transformer"][0] == 0.875


def test_experts_take_turns_with_offload_idle_expert(shared_data: Path, tmp_path: Path, monkeypatch):
    """offload_idle_expert with both experts (what it does on CUDA, its moves recorded here on
    the CPU): each micro-batch trains one expert, its sigmas all in that expert's range, the
    expert made resident before it runs; validation swaps at most once per expert; both LoRAs
    train."""
    from runner.diffusion import memory
    from runner.diffusion.families import base, videokit

    real_init, real_sample = memory.Placement.__init__, base.sample_sigmas
    swaps, drawn, state = [], [], {"resident": None}

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.offload_expert = bool(self.trained)  # as on CUDA

    def swap_to(self, pipe, name):
        moved = self.resident != (name,)
        if moved:
            swaps.append(name)
        self.resident = (name,)
        state["resident"] = name
        return moved

    def sample(c, n, *a, **kw):
        out = real_sample(c, n, *a, **kw)
        if n > 1 or c.sigma_range is not None:  # the batch's sigmas (not the one that picks the expert)
            drawn.append((state["resident"], c.sigma_range, out))
        return out

    monkeypatch.setattr(memory.Placement, "__init__", init)
    monkeypatch.setattr(memory.Placement, "swap_to", swap_to)
    monkeypatch.setattr(base, "sample_sigmas", sample)
    clips = make_clips(shared_data, tmp_path / "clips", n=2)
    cfg = _cfg(steps=6, memory={"offload_idle_expert": True},
               checkpoints={"every_steps": 6, "validation_fraction": 0.5})
    tr = _trainer(cfg, None, [clips], tmp_path / "r", tmp_path / "cache")
    index = tr.run()
    assert index["experts"] == ["transformer", "transformer_2"] and tr.swapping
    ranges = videokit.expert_ranges(tr.c)
    assert len(drawn) == 6
    for resident, r, s in drawn:  # the expert on the device is the one whose range the batch is drawn from
        assert r == ranges[resident] and bool(((s >= r[0]) & (s < r[1])).all()), (resident, r, s)
    assert {resident for resident, _, _ in drawn} == {"transformer", "transformer_2"}  # this seed: both
    tail = swaps[-2:]  # validation: the 900 timestep (high noise) first, then 100-700 (low noise)
    assert tail == ["transformer", "transformer_2"] or tail[-1] == "transformer_2"
    for name in ("transformer", "transformer_2"):
        lora = [p for n, p in getattr(tr.pipe, name).named_parameters() if "lora_B" in n]
        assert lora and any(float(p.detach().abs().sum()) > 0 for p in lora), name  # lora_B starts at 0
