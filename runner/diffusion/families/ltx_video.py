"""LTX-Video 0.9 (Lightricks): a 2B DiT on 128-channel video latents (causal VAE, 32x spatial and
8x temporal compression, so clips are 8k+1 frames at multiples of 32 px), conditioned on T5-XXL
(128 tokens, with a mask). Two image-to-video pipelines built from the same five components:
``LTXImageToVideoPipeline`` (0.9.0 / 0.9.1: the first latent frame is the encoded key frame,
strength 1) and ``LTXConditionPipeline`` (0.9.5+: a conditioning strength below 1). From 0.9.1
the VAE is timestep-conditioned at decode (``decode_timestep`` / ``decode_noise_scale``); 0.9.7+
has a 2x latent upsampler.

``builtin:tiny-ltx`` is the tiny model the video stage has always used: same folder
(``builtin-tiny-ltx-v1``), same seeds, same weights — a 1-layer transformer, an 8-channel VAE
with 4x spatial and 4x temporal compression, a 2-layer T5 encoder and a T5 tokenizer built from a
fixed word list. Its clips are noise.

Training (``train_video``) does what ``LTXImageToVideoPipeline.__call__`` does around the
transformer: model latents are the VAE's, normalized per channel as ``_normalize_latents`` does
(``(raw - vae.latents_mean) x scaling_factor / vae.latents_std``; 5-D ``(B, C, F, h, w)`` for the
shared flow loss), packed into tokens only inside :func:`predict` (``_pack_latents`` with the
transformer's patch sizes) and the output unpacked back. The key frame conditions as the
pipeline's conditioning mask does: latent frame 0 stays clean with timestep 0 on its tokens, the
others get ``sigma x 1000`` (per-token timesteps; ``key_frame="clean_first"`` keeps it out of the
loss). The T5 embeddings and their mask are the cached ``encode_prompt`` output (always 128
tokens, padded by the tokenizer, so they stack). RoPE: ``rope_interpolation_scale`` =
(temporal compression / frame rate, spatial, spatial) at the fixed training frame rate
``TRAIN_FPS`` (the family's default 24 fps; clips are not resampled to it). The transformer
predicts the flow velocity ``noise - x0`` (``FlowMatchEulerDiscreteScheduler.step`` adds
``(sigma_next - sigma) x output``), the target of the shared flow loss."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.diffusion.families.base import Family, GenerationArgs, LatentFormat, Objective, SampleDefaults, TextEncoding
from runner.diffusion.families.comfykit import Layout, table
from runner.diffusion.families.videokit import PipelineKind, VideoArgs, encode_prompt_captions

TINY_VERSION = 1
TINY_SEED = 7
_TINY_WORDS = (
    "a the an of and with in on at to his her their face eyes mouth smile smiles smiling slowly subtle "
    "motion cinematic natural character movement high dynamic range man woman person cries crying tears "
    "turns head looks camera glasses beard hat coat neutral expression starts breaks into begins gently "
    "light wind hair moves blinks breathes walks rides laughs portrait close up medium shot wide"
).split()
# the transformer's attention projections, as the diffusers LTX-Video LoRA example (finetrainers) trains
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_t5_tokenizer(dest: Path):
    """A T5 tokenizer (Unigram) over a fixed vocabulary: special tokens, bytes-as-chars, words."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(chr(c), -6.0) for c in range(33, 127)]
    vocab += [("\u2581" + w, -2.0) for w in dict.fromkeys(_TINY_WORDS)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(dest))
    return T5Tokenizer.from_pretrained(str(dest))


def build_tiny(dest: Path) -> None:
    import torch
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(dest / "_tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32)
        torch.manual_seed(TINY_SEED + 1)
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False)
        torch.manual_seed(TINY_SEED + 2)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    pipe = LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(str(dest), safe_serialization=True)
    shutil.rmtree(dest / "_tok", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# training (shared with LTX-2, whose pipeline packs, normalizes and conditions the same way)

TRAIN_FPS = 24.0  # the frame rate RoPE is scaled for in training (the family's default clip fps)


def encode_video(pipe, pixels) -> dict:
    """Raw latents of clips (B, 3, F, H, W) in [-1, 1]: the video VAE's distribution (mean, std),
    float32 on the CPU. The causal encoder makes the first latent frame the first frame's alone."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu()}


def to_model_latents(pipe, raw):
    """``_normalize_latents`` of the LTX pipelines: per channel, with the VAE's latents_mean and
    latents_std buffers and its scaling_factor (what the pipeline undoes before decoding)."""
    vae = pipe.vae
    mean = vae.latents_mean.detach().to(raw.device, raw.dtype).view(1, -1, 1, 1, 1)
    std = vae.latents_std.detach().to(raw.device, raw.dtype).view(1, -1, 1, 1, 1)
    return (raw - mean) * float(vae.config.scaling_factor) / std


def pack(latents, p: int, pt: int):
    """``_pack_latents``: (B, C, F, H, W) -> (B, F/pt x H/p x W/p, C x pt x p x p) tokens."""
    b, _, f, h, w = latents.shape
    x = latents.reshape(b, -1, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens, f: int, h: int, w: int, p: int, pt: int):
    """``_unpack_latents``, the inverse of :func:`pack` (``f, h, w`` in tokens)."""
    x = tokens.reshape(tokens.shape[0], f, h, w, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def patches(denoiser) -> tuple[int, int]:
    cfg = denoiser.config
    return int(cfg.patch_size), int(cfg.patch_size_t)


def token_timesteps(sigmas, shape, p: int, pt: int, device):
    """The pipeline's ``t x (1 - conditioning_mask)`` per token: ``sigma x 1000`` everywhere but
    on latent frame 0 of a clip of more than one latent frame (the clean key frame: 0). A still
    (one latent frame) has no key frame: it trains as text-to-video."""
    import torch

    b, _, f, h, w = shape
    mask = torch.zeros(b, 1, f, h, w, device=device)
    if f > 1:
        mask[:, :, 0] = 1.0
    mask = pack(mask, p, pt).amax(-1)
    return (sigmas.to(device, torch.float32) * 1000.0).view(b, 1) * (1.0 - mask)


def predict(c, noisy, sigmas, batch):
    """The LTX-Video transformer on a noisy clip (B, C, F, h, w), called as the image-to-video
    pipeline's denoising loop calls it; returns the velocity (B, C, F, h, w)."""
    import torch

    device, dtype = c.device, c.dtype  # read once: each read walks the model's modules
    _, _, f, h, w = noisy.shape
    p, pt = patches(c.denoiser)
    pipe = c.pipe
    scale = (pipe.vae_temporal_compression_ratio / TRAIN_FPS, pipe.vae_spatial_compression_ratio,
             pipe.vae_spatial_compression_ratio)
    out = c.denoiser(hidden_states=pack(noisy.to(device, dtype), p, pt),
                     encoder_hidden_states=batch.text["prompt_embeds"].to(device, dtype),
                     timestep=token_timesteps(sigmas, noisy.shape, p, pt, device),
                     encoder_attention_mask=batch.text["mask"].to(device, torch.long),
                     num_frames=f // pt, height=h // p, width=w // p, rope_interpolation_scale=scale,
                     return_dict=False)[0]
    return unpack(out, f // pt, h // p, w // p, p, pt)


# The LoRA file for ComfyUI (runner.diffusion.comfy): the original LTX checkpoints (and ComfyUI's
# LTXV model, comfy/ldm/lightricks/model.py) name the blocks' attention and feed-forward
# projections as diffusers does; only the stem differs (patchify_proj, adaln_single), not trained.
BLOCK = {name: name for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                 "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}
COMFY = Layout(table("LTXVideoTransformer3DModel", {r"transformer_blocks\.(\d+)": ("transformer_blocks.{}", BLOCK)}),
               {}, lambda cfg: "LTX-Video", "ltxv", "https://github.com/Lightricks/LTX-Video", None)


VIDEO = VideoArgs(
    kinds={"image-to-video": PipelineKind("LTXImageToVideoPipeline"),
           "condition": PipelineKind("LTXConditionPipeline", strength_keyword="strength", partial_strength=True)},
    default_kind="image-to-video", temporal=8, spatial=32, size_multiple=32, fps_keyword="frame_rate",
    decode_noise=True, presets=("baseline", "aggressive-quality"),
    defaults={"frames": 97, "fps": 24, "width": 704, "height": 480}, latent_upsampler=True,
    lora_loader="LTXVideoLoraLoaderMixin", key_frame="clean_first",
)

FAMILY = Family(
    name="ltx_video",
    title="LTX-Video 0.9",
    modality="video",
    video=VIDEO,
    pipeline="LTXImageToVideoPipeline",
    components={"transformer": "LTXVideoTransformer3DModel", "vae": "AutoencoderKLLTXVideo",
                "text_encoder": "T5EncoderModel", "tokenizer": "T5TokenizerFast",
                "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder",), outputs="T5-XXL last hidden state with its mask", pooled=False,
                      max_tokens=128, masked=True),
    latents=LatentFormat(channels=128, downscale=32, patch=1,
                         normalization="(raw - vae.latents_mean) / vae.latents_std x scaling_factor, packed "
                                       "into 1x1x1 tokens; 8x temporal compression (8k+1 frames)"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"),
    lora_targets=LORA_TARGETS,
    class_names=("LTXImageToVideoPipeline", "LTXConditionPipeline", "LTXPipeline"),
    hub_patterns=(r"lightricks/ltx-video", r"ltx-?video", r"ltxv"),
    sample=SampleDefaults(steps=10, guidance=1.0),
    size_multiple=32,
    tiny="tiny-ltx",
    tiny_version=TINY_VERSION,
    build_tiny=build_tiny,
    encode_captions=encode_prompt_captions,
    to_model_latents=to_model_latents,
    predict=predict,
    encode_images=encode_video,
    comfy=COMFY,
    generation=GenerationArgs(guidance="guidance_scale", cfg=True, negative="given"),
    extra_conditioning="the key frame's latents as the first latent frame (image-to-video) or a condition "
                       "with a strength (condition pipeline); the frame rate (RoPE scaling)",
    variants={"0.9.0/0.9.1": "LTXImageToVideoPipeline, strength 1", "0.9.5+": "LTXConditionPipeline, "
              "partial strength, timestep-conditioned decode", "0.9.7+": "2x latent upsampler"},
)
