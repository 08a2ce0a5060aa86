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
fixed word list. Its clips are noise."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.diffusion.families.base import Family, GenerationArgs, LatentFormat, Objective, SampleDefaults, TextEncoding
from runner.diffusion.families.videokit import PipelineKind, VideoArgs, encode_prompt_captions, not_trained

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


VIDEO = VideoArgs(
    kinds={"image-to-video": PipelineKind("LTXImageToVideoPipeline"),
           "condition": PipelineKind("LTXConditionPipeline", strength_keyword="strength", partial_strength=True)},
    default_kind="image-to-video", temporal=8, spatial=32, size_multiple=32, fps_keyword="frame_rate",
    decode_noise=True, presets=("baseline", "aggressive-quality"),
    defaults={"frames": 97, "fps": 24, "width": 704, "height": 480}, latent_upsampler=True,
    lora_loader="LTXVideoLoraLoaderMixin",
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
    to_model_latents=not_trained,
    predict=not_trained,
    generation=GenerationArgs(guidance="guidance_scale", cfg=True, negative="given"),
    extra_conditioning="the key frame's latents as the first latent frame (image-to-video) or a condition "
                       "with a strength (condition pipeline); the frame rate (RoPE scaling)",
    variants={"0.9.0/0.9.1": "LTXImageToVideoPipeline, strength 1", "0.9.5+": "LTXConditionPipeline, "
              "partial strength, timestep-conditioned decode", "0.9.7+": "2x latent upsampler"},
)
