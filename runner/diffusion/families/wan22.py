"""Wan 2.2 image-to-video (Alibaba), two families on ``WanImageToVideoPipeline``:

- ``wan22_i2v`` (Wan2.2-I2V-A14B): two 14B experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the low-noise ones, split at ``boundary_ratio`` (0.9) of the schedule;
  16-channel latents of the Wan 2.1 VAE (8x spatial, 4x temporal: 4k+1 frames), the key frame's
  latents concatenated to the noise as channels (36 in), sides multiples of 16.
- ``wan22_ti2v`` (Wan2.2-TI2V-5B): one 5B transformer, ``expand_timesteps`` (the key frame's
  latent frame is kept clean with per-token timesteps), its own VAE with z_dim 48 and 16x spatial
  compression (sides multiples of 32), 4x temporal.

Captions: UMT5-XXL's last hidden state (512 tokens, trimmed to each caption's length). Flow
matching (UniPC flow sampler at inference, shift 5 / 3). No frame-rate keyword (16 / 24 fps is
the mp4's). Tiny models: ``builtin:tiny-wan22-i2v`` (two 1-layer experts, boundary 0.875) and
``builtin:tiny-wan22-ti2v`` (one 1-layer transformer, a z_dim 48 VAE), a 1-layer UMT5 and the
tinykit T5 tokenizer; random weights, their clips are noise.

Training (train_video): the TI2V keeps the key frame's latent frame clean and out of the loss; the
A14B caches the pipeline's key-frame condition with each clip and sends each example through the
expert its noise level belongs to (:func:`predict_i2v`; ``train_video.experts`` picks both or
one). ComfyUI files in the original checkpoints' names, one per A14B expert."""

from __future__ import annotations

from pathlib import Path

from runner.diffusion.families.base import Family, GenerationArgs, LatentFormat, Objective, SampleDefaults, TextEncoding
from runner.diffusion.families.base import pad_text
from runner.diffusion.families.comfykit import Layout, table
from runner.diffusion.families.videokit import PipelineKind, VideoArgs, encode_prompt_captions

TINY_VERSION = 1
TINY_SEED = 13
# the attention and feed-forward projections of every block (self and cross attention), as
# musubi-tuner and diffusers' Wan LoRA examples train
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _transformer(in_channels: int, out_channels: int):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=32,
                                 ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def _build(dest: Path, *, two_experts: bool) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline

    from runner.diffusion.families import tinykit, videokit

    tokenizer = tinykit.t5_tokenizer(dest / "_tok", model_max_length=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if two_experts:
            vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])
        else:
            vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                                   patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                                   dim_mult=[1, 1, 1, 1], num_res_blocks=1, scale_factor_spatial=16,
                                   scale_factor_temporal=4, temperal_downsample=[False, True, True])
        torch.manual_seed(TINY_SEED + 1)
        text_encoder = videokit.umt5_encoder(len(tokenizer), d_model=32)
        torch.manual_seed(TINY_SEED + 2)
        transformer = _transformer(36, 16) if two_experts else _transformer(48, 48)
        torch.manual_seed(TINY_SEED + 3)
        transformer_2 = _transformer(36, 16) if two_experts else None
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if two_experts else 3.0)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   transformer=transformer, transformer_2=transformer_2,
                                   boundary_ratio=0.875 if two_experts else None, expand_timesteps=not two_experts)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


def build_tiny_i2v(dest: Path) -> None:
    _build(dest, two_experts=True)


def build_tiny_ti2v(dest: Path) -> None:
    _build(dest, two_experts=False)


def prepare(pipe) -> None:
    """Wan's prompt cleaning calls ``ftfy.fix_text``, and diffusers imports ftfy only when it is
    installed; without it the prompt is only HTML-unescaped and whitespace-cleaned (what ftfy
    does to a clean prompt: nothing)."""
    import importlib
    import types

    mod = importlib.import_module(type(pipe).__module__)
    if not hasattr(mod, "ftfy"):
        mod.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


# ---------------------------------------------------------------------------------------------
# training: the TI2V 5B (one transformer, the key frame kept clean) and the A14B (two experts by
# noise level, the key frame's latents and a frame mask as 20 extra input channels)


def encode_video(pipe, pixels) -> dict:
    """Raw latents of clips (B, 3, F, H, W) in [-1, 1]: the Wan VAE's distribution, float32 on
    the CPU (its causal encoder makes the first latent frame the first frame's alone)."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu()}


def encode_i2v(pipe, pixels) -> dict:
    """The A14B's cache entry of clips (B, 3, F, H, W) in [-1, 1]: the VAE distribution of the clip
    ("mean", "std") and its ``condition`` (B, 20, f, h, w), what WanImageToVideoPipeline.prepare_latents
    builds from the key frame: the first frame followed by F - 1 black (zero) frames through the
    VAE (its mode), normalized per channel, after a 4-channel frame mask (1 on the key frame's
    latent frame, 0 after). A still (F = 1) is its own condition, mask 1, as the pipeline does for
    a 1-frame clip."""
    import torch

    vae = pipe.vae
    x = pixels.to(vae.device, vae.dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        first = torch.cat([x[:, :, :1], x.new_zeros(x.shape[0], x.shape[1], x.shape[2] - 1, *x.shape[3:])], dim=2)
        cond = to_model_latents(pipe, vae.encode(first).latent_dist.mode().float())
    b, _, frames, h, w = cond.shape
    mask = torch.zeros(b, pipe.vae_scale_factor_temporal, frames, h, w)
    mask[:, :, 0] = 1.0
    return {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu(),
            "condition": torch.cat([mask, cond.cpu()], dim=1)}


def predict_i2v(c, noisy, sigmas, batch):
    """The A14B on a noisy clip: each example through the expert its sigma belongs to (the
    pipeline's rule: t = 1000 sigma >= boundary_ratio x 1000 -> ``transformer``, the high-noise
    expert, else ``transformer_2``), the batch split by expert and put back in order; the input is
    the noisy latents and the cached condition (mask + key-frame latents) concatenated as channels
    (16 + 20 = 36), one timestep per example, the UMT5 embeddings zero-padded to 512 tokens."""
    import torch

    from runner.diffusion.families.videokit import expert_of

    device = noisy.device
    cond = batch.extra["condition"].to(device)
    emb = _padded(batch.text["prompt_embeds"].to(device))
    owners = expert_of(c, sigmas)
    outs, order = [], []
    for name in dict.fromkeys(owners):
        idx = [i for i, o in enumerate(owners) if o == name]
        model = getattr(c.pipe, name)
        sel = torch.tensor(idx, device=device)
        x = torch.cat([noisy[sel], cond[sel].to(noisy.dtype)], dim=1).to(model.dtype)
        t = (sigmas.to(device, torch.float32) * 1000.0)[sel]
        outs.append(model(hidden_states=x, timestep=t, encoder_hidden_states=emb[sel].to(model.dtype),
                          return_dict=False)[0])
        order += idx
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order != sorted(order):
        out = out[torch.tensor(order, device=device).argsort()]
    return out


def _padded(emb):
    """UMT5 embeddings (B, L, D) zero-padded to the 512 tokens the pipeline passes."""
    import torch

    pad = MAX_TOKENS - emb.shape[1]
    return torch.cat([emb, emb.new_zeros(emb.shape[0], pad, emb.shape[2])], dim=1) if pad > 0 else emb


def to_model_latents(pipe, raw):
    """(raw - latents_mean) / latents_std per channel, as WanImageToVideoPipeline normalizes."""
    import torch

    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=raw.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=raw.dtype).view(1, -1, 1, 1, 1)
    return (raw - mean) / std


def predict_ti2v(c, noisy, sigmas, batch):
    """The TI2V transformer on a noisy clip: per-token timesteps (expand_timesteps), 0 on the
    clean key frame's tokens when the clip conditions on it (more than one latent frame), the
    UMT5 embeddings zero-padded to 512 tokens as the pipeline pads them."""
    import torch

    device, dtype = c.device, c.dtype  # read once: each read walks the model's modules
    b, _, frames, h, w = noisy.shape
    patch = c.denoiser.config.patch_size
    t = (sigmas.to(device, torch.float32) * 1000.0).view(b, 1, 1, 1)
    grid = torch.ones(b, frames, h // patch[1], w // patch[2], device=device) * t
    if frames > 1:
        grid[:, 0] = 0.0
    emb = _padded(batch.text["prompt_embeds"].to(device, dtype))
    return c.denoiser(hidden_states=noisy.to(dtype), timestep=grid.flatten(1), encoder_hidden_states=emb,
                      return_dict=False)[0]


MAX_TOKENS = 512


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): the original Wan checkpoints' names, which
# ComfyUI's WanModel keeps (blocks.N.self_attn.q/k/v/o, cross_attn.*, ffn.0 / ffn.2; diffusers'
# convert_wan_transformer_to_diffusers renames them to attn1.to_q ... ffn.net.2). The A14B's two
# experts are two files (high noise / low noise), loaded into ComfyUI's two Wan models.
_WAN_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_WAN = {r"blocks\.(\d+)": ("blocks.{}", _WAN_BLOCK)}


def _layout(arch: str, version: str) -> Layout:
    return Layout(table("WanTransformer3DModel", _WAN), {}, lambda cfg: arch, version,
                  "https://github.com/Wan-Video/Wan2.2", None)


def _two_experts(index) -> bool:
    """A14B's model index names a ``transformer_2`` (the 5B's is null) and no expand_timesteps."""
    second = index.get("transformer_2")
    return bool(second and second[0]) and not index.get("expand_timesteps")


_KINDS = {"image-to-video": PipelineKind("WanImageToVideoPipeline")}
_COMPONENTS = {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel",
               "tokenizer": "T5TokenizerFast", "scheduler": "UniPCMultistepScheduler"}
_TEXT = TextEncoding(encoders=("text_encoder",), outputs="UMT5-XXL last hidden state, trimmed per caption",
                     pooled=False, max_tokens=512, masked=True)
_COMMON = dict(
    modality="video", pipeline="WanImageToVideoPipeline", denoiser="transformer", text=_TEXT,
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"), lora_targets=LORA_TARGETS,
    class_names=("WanImageToVideoPipeline",), encode_captions=encode_prompt_captions, collate_text=pad_text,
    generation=GenerationArgs(guidance="guidance_scale", cfg=True, negative="given"),
    tiny_version=TINY_VERSION,
)

I2V = Family(
    name="wan22_i2v",
    title="Wan 2.2 I2V A14B",
    video=VideoArgs(kinds=_KINDS, default_kind="image-to-video", temporal=4, spatial=8, size_multiple=16,
                    fps_keyword=None, experts=("transformer", "transformer_2"),
                    expert_note="transformer: high-noise steps, transformer_2: low-noise steps, split at "
                                "boundary_ratio of the schedule; guidance_scale_2 for the low-noise expert",
                    presets=("wan22-i2v-baseline", "wan22-i2v-quality"),
                    defaults={"frames": 81, "fps": 16, "width": 832, "height": 480}, lora_loader="WanLoraLoaderMixin",
                    prepare=prepare, index_match=_two_experts),
    components={**_COMPONENTS, "transformer_2": "WanTransformer3DModel"},
    latents=LatentFormat(channels=16, downscale=8, patch=2,
                         normalization="(raw - vae.latents_mean) / vae.latents_std; 4x temporal (4k+1 frames); "
                                       "the key frame's latents and mask concatenated as channels (36 in)"),
    hub_patterns=(r"wan-?ai/wan2\.2-i2v", r"wan2\.?2.*i2v.*a14b", r"wan2\.?2-i2v"),
    sample=SampleDefaults(steps=40, guidance=3.5),
    size_multiple=16,
    tiny="tiny-wan22-i2v",
    build_tiny=build_tiny_i2v,
    extra_conditioning="the key frame's latents and a frame mask as extra input channels; two experts by noise level",
    variants={"A14B": "two 14B experts (MoE by timestep), 480p/720p"},
    comfy=_layout("Wan2.2-I2V-A14B", "wan22_i2v_a14b"),
    to_model_latents=to_model_latents,
    predict=predict_i2v,
    encode_images=encode_i2v,
    **_COMMON,
)

TI2V = Family(
    name="wan22_ti2v",
    title="Wan 2.2 TI2V 5B",
    video=VideoArgs(kinds=_KINDS, default_kind="image-to-video", temporal=4, spatial=16, size_multiple=32,
                    fps_keyword=None, presets=("wan22-ti2v-baseline", "wan22-ti2v-quality"),
                    defaults={"frames": 121, "fps": 24, "width": 1280, "height": 704},
                    lora_loader="WanLoraLoaderMixin", prepare=prepare, index_match=lambda i: not _two_experts(i),
                    key_frame="clean_first"),
    components=_COMPONENTS,
    latents=LatentFormat(channels=48, downscale=16, patch=2,
                         normalization="(raw - vae.latents_mean) / vae.latents_std (z_dim 48, 2x2 pixel patches in "
                                       "the VAE); 4x temporal (4k+1 frames); the key frame kept clean "
                                       "(expand_timesteps)"),
    hub_patterns=(r"wan-?ai/wan2\.2-ti2v", r"wan2\.?2-ti2v", r"ti2v-5b"),
    sample=SampleDefaults(steps=50, guidance=5.0),
    size_multiple=32,
    tiny="tiny-wan22-ti2v",
    build_tiny=build_tiny_ti2v,
    extra_conditioning="the key frame's clean latent frame with per-token timesteps (expand_timesteps)",
    variants={"TI2V-5B": "text and image to video, 720p 24 fps, z_dim 48 VAE"},
    comfy=_layout("Wan2.2-TI2V-5B", "wan22_ti2v_5b"),
    to_model_latents=to_model_latents,
    predict=predict_ti2v,
    encode_images=encode_video,
    **_COMMON,
)

FAMILIES = (I2V, TI2V)
