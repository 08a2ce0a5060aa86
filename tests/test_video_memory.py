"""GPU memory estimates for the video families (runner.diffusion.memory, issue 16 part 4).

The figures are computed from the real models' published configs (parameter counts of the diffusers
classes on the meta device, activations from the block shapes); none was measured on a GPU.
Expected (bf16 LoRA rank 16, checkpointing, latents and captions cached, VAE and text encoder off):
- Wan 2.2 I2V A14B at 81x480x832 (32760 tokens): ~86 GiB with both 14B experts resident (does not
  fit 80 GB), ~57 GiB with the idle expert on the CPU, ~43 GiB adding an int8 base.
- Wan 2.2 TI2V 5B at 121x704x1280: ~24 GiB; LTX-Video 2B at 161x512x768: ~10 GiB;
  LTX-2 19B at 121x512x768: ~45 GiB bf16, ~26 GiB int8.
- Generation of Wan A14B at 81x480x832: ~80 GiB without offload, ~39 with model CPU offload, ~12
  with group offload.
"""

import pytest

from runner.core.errors import UserError
from runner.diffusion import families, memory

H100 = memory.Target("H100", 80.0, "refuse")
L4 = memory.Target("L4", 24.0, "refuse")


def peak(fam, frames, w, h, **kw):
    z = memory.VIDEO_SIZES[fam]
    return memory.video_train_estimate(z, memory.VideoSettings(**kw), frames, w, h).peak / memory.GIB


def test_every_video_family_has_sizes():
    for f in families.all_families() if hasattr(families, "all_families") else []:
        if getattr(f, "modality", "image") == "video":
            assert memory.video_sizes(f) is not None, f.name
    for name in ("ltx_video", "ltx2", "wan22_i2v", "wan22_ti2v"):
        assert memory.video_sizes(name) is not None


def test_tokens():
    z = memory.VIDEO_SIZES["wan22_i2v"]
    assert memory.video_tokens(z, 81, 832, 480) == 21 * 30 * 52
    assert memory.video_tokens(memory.VIDEO_SIZES["ltx_video"], 161, 768, 512) == 21 * 16 * 24


def test_figures_are_sane():
    assert 80 < peak("wan22_i2v", 81, 832, 480) < 95
    assert 50 < peak("wan22_i2v", 81, 832, 480, offload_idle_expert=True) < 65
    assert 38 < peak("wan22_i2v", 81, 832, 480, offload_idle_expert=True, quantize_base="int8") < 50
    assert 18 < peak("wan22_ti2v", 121, 1280, 704) < 30
    assert 6 < peak("ltx_video", 161, 768, 512) < 14
    assert 38 < peak("ltx2", 121, 768, 512) < 50
    assert 20 < peak("ltx2", 121, 768, 512, quantize_base="int8") < 30
    # one expert trained or both: the same resident weights, the LoRA doubles (tiny next to the rest)
    z = memory.VIDEO_SIZES["wan22_i2v"]
    both = memory.video_train_estimate(z, memory.VideoSettings(), 81, 832, 480)
    one = memory.video_train_estimate(z, memory.VideoSettings(), 81, 832, 480, experts_trained=1)
    assert both.lora == 2 * one.lora and both.weights == one.weights


def test_a14b_on_80gb_fits_only_with_idle_expert_offloaded():
    fam = families.get("wan22_i2v")
    with pytest.raises(memory.GpuMemoryError) as exc:
        memory.video_train_note("aldar:train_video", fam, 81, 832, 480, {}, H100)
    assert "offload_idle_expert: true" in exc.value.hint
    note = memory.video_train_note("aldar:train_video", fam, 81, 832, 480, {"offload_idle_expert": True}, H100)
    assert "GiB" in note and "computed from configs" in note


def test_refusal_names_frames_that_fit():
    with pytest.raises(memory.GpuMemoryError) as exc:
        memory.video_train_note("x:train_video", "wan22_i2v", 81, 832, 480, {"offload_idle_expert": True}, L4)
    assert "frames at 832x480" in exc.value.hint, exc.value.hint


def test_block_swap_is_refused_clearly():
    with pytest.raises(UserError, match="block_swap"):
        memory.video_train_note("x:train_video", "wan22_i2v", 81, 832, 480, {"block_swap": 10}, H100)


def test_cpu_and_off():
    cpu = memory.Target("a GPU", None, "warn", cpu=True)
    assert "not checked" in memory.video_train_note("x", "wan22_i2v", 81, 832, 480, {}, cpu)
    assert memory.video_train_note("x", "wan22_i2v", 81, 832, 480, {}, memory.Target("H100", 80, "off")) is None
    warn = memory.Target("L4", 24.0, "warn")
    assert "DOES NOT FIT" in memory.video_train_note("x", "wan22_i2v", 81, 832, 480, {}, warn)


def test_generate_note():
    z = memory.VIDEO_SIZES["wan22_i2v"]
    none = memory.video_generate_estimate(z, 81, 832, 480, offload="none") / memory.GIB
    model = memory.video_generate_estimate(z, 81, 832, 480, offload="model") / memory.GIB
    group = memory.video_generate_estimate(z, 81, 832, 480, offload="group") / memory.GIB
    assert group < model < none and 70 < none < 90 and 30 < model < 45
    ltx = memory.VIDEO_SIZES["ltx_video"]
    assert (memory.video_generate_estimate(ltx, 161, 768, 512, vae_tiling=False)
            > 3 * memory.video_generate_estimate(ltx, 161, 768, 512, vae_tiling=True))
    note = memory.video_generate_note("x:video", families.get("wan22_i2v"), 81, 832, 480, L4, offload="none")
    assert "DOES NOT FIT" in note and "offload group" in note
    assert "DOES NOT FIT" not in memory.video_generate_note("x:video", "wan22_i2v", 81, 832, 480, H100)


def test_apply_memory_switches():
    from types import SimpleNamespace

    from runner.generate import video_models

    calls = []
    vae = SimpleNamespace(enable_tiling=lambda: calls.append("tiling"))
    pipe = SimpleNamespace(vae=vae, enable_model_cpu_offload=lambda device: calls.append(("model", device)),
                           enable_group_offload=lambda **kw: calls.append(("group", kw["offload_type"])))
    vp = SimpleNamespace(pipe=pipe)
    assert video_models.apply_memory(vp, offload="model", device="cpu") == ["vae tiling"]  # no offload on CPU
    assert video_models.apply_memory(vp, offload="model", vae_tiling=False, device="cuda") == ["model cpu offload"]
    assert video_models.apply_memory(vp, offload="group", vae_tiling=False, device="cuda")
    assert calls == ["tiling", ("model", "cuda"), ("group", "block_level")]
    with pytest.raises(UserError, match="offload"):
        video_models.apply_memory(vp, offload="disk", vae_tiling=False, device="cuda")


def test_video_stage_notes():
    spec = {"character": {"name": "a"}, "hardware": {"backend": "modal", "gpu": "H100"}}
    cfg = {"model": "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "frames": 81, "width": 832, "height": 480}
    (note,) = memory.video_stage_notes(spec, cfg, families.get("wan22_i2v"))
    assert "generating 81x480x832" in note and "offload none" in note
    assert memory.video_stage_notes(spec, {**cfg, "model": "builtin:tiny-wan22-i2v"}, families.get("wan22_i2v")) == ()


def test_auto_offload_takes_the_first_setting_that_fits_the_gpu():
    """generate.video.offload / vae_tiling auto: nothing for tiny models and CPU runs; on a GPU the
    first of none, model, group (tiling on with any offload) whose estimate fits; what the spec
    sets is kept."""
    wan = families.get("wan22_i2v")
    cfg = {"model": "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "frames": 81, "width": 832, "height": 480,
           "offload": "auto", "vae_tiling": "auto"}

    def on(gpu, **over):
        spec = {"character": {"name": "a"}, "hardware": {"backend": "modal", "gpu": gpu}}
        return memory.video_generate_memory(spec, {**cfg, **over}, wan)

    assert on("H200") == {"offload": "none", "vae_tiling": False}  # 2 x 14B bf16 + UMT5 fit 141 GB
    assert on("L40S") == {"offload": "model", "vae_tiling": True}  # one 14B expert at a time
    assert on("L4") == {"offload": "group", "vae_tiling": True}  # not even one expert: block by block
    assert on("L40S", offload="none") == {"offload": "none", "vae_tiling": True}  # untiled decode too big
    assert on("H200", vae_tiling=False, offload="group") == {"offload": "group", "vae_tiling": False}
    assert on("L4", model="builtin:tiny-wan22-i2v") == {"offload": "none", "vae_tiling": False}
    local = {"character": {"name": "a"}, "hardware": {"backend": "local", "device": "cpu"}}
    assert memory.video_generate_memory(local, cfg, wan) == {"offload": "none", "vae_tiling": False}
