"""Stable Diffusion 3 / 3.5: an MMDiT on 16-channel latents (VAE x8, ``(x - 0.0609) x 1.5305``),
patchified 2x2 inside the transformer. Captions: the penultimate hidden states of two CLIPs
(concatenated, zero-padded to T5's width) followed by T5-XXL's last hidden state (256 tokens);
pooled: both CLIPs' projections concatenated. Rectified flow with logit-normal sigmas and the
scheduler's static shift 3; the transformer takes the time on the 0..1000 scale.

This module is the whole of the family: the registry finds it, nothing else names it."""

from __future__ import annotations

from runner.diffusion import memory
from runner.diffusion.families.base import (
    ControlNetArgs,
    Family,
    GenerationArgs,
    IPAdapterArgs,
    LatentFormat,
    Objective,
    SampleDefaults,
    TextEncoding,
    scale_shift,
    split_batch,
)
from runner.diffusion.families.comfykit import Layout, table, three

MAX_TOKENS = 256
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    caps = list(captions)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=caps, prompt_2=None, prompt_3=None,
                                              device=pipe.transformer.device, do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_TOKENS)
    return split_batch({"prompt_embeds": pe, "pooled": pooled})


def predict(c, noisy, sigmas, batch):
    return c.denoiser(hidden_states=noisy.to(c.dtype), timestep=(sigmas * 1000).to(c.dtype),
                      encoder_hidden_states=batch.text["prompt_embeds"].to(c.device, c.dtype),
                      pooled_projections=batch.text["pooled"].to(c.device, c.dtype), return_dict=False)[0]


def build_tiny(dest) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from runner.diffusion.families import tinykit
    from runner.diffusion.tiny import _text_config

    clip_tok = tinykit.tiny_clip_tokenizer(dest / "_clip")
    t5_tok = tinykit.t5_tokenizer(dest / "_t5", model_max_length=MAX_TOKENS)
    tinykit.seeded(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    encoders = []
    for k in (1, 2):
        tinykit.seeded(k)
        encoders.append(CLIPTextModelWithProjection(_text_config(len(clip_tok), hidden_act="gelu")))
    tinykit.seeded(3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = tinykit.kl_vae(latent_channels=4, scaling_factor=1.5305, shift_factor=0.0609, seed=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=tinykit.flow_scheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=clip_tok, text_encoder_2=encoders[1], tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_clip", dest / "_t5")


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, 77 + 256 tokens.
# SD 3.5 Large: transformer 8.1B, CLIP-L, CLIP-G, T5-XXL; Medium is 2.5B.
SIZES = memory.sizes({"transformer": 8056.6e6, "text_encoder": 123.7e6, "text_encoder_2": 694.7e6,
                      "text_encoder_3": 4762.3e6, "vae": 83.8e6},
                     denoiser="transformer", linear_share=0.9996, lora_per_rank=1473792,
                     activations=(3719440.0, 1230137952.0), checkpointed=(184840.0, 59934208.0),
                     block=(97880.0, 32671864.0),
                     source="computed on the meta device (bench/memory/real_sizes.py)")


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): Stability's MMDiT checkpoint names (sd3.5).

_SD3 = {
    r"transformer_blocks\.(\d+)": ("joint_blocks.{}", {
        "attn.to_q": ("x_block.attn.qkv", 0, three), "attn.to_k": ("x_block.attn.qkv", 1, three),
        "attn.to_v": ("x_block.attn.qkv", 2, three),
        "attn.add_q_proj": ("context_block.attn.qkv", 0, three),
        "attn.add_k_proj": ("context_block.attn.qkv", 1, three),
        "attn.add_v_proj": ("context_block.attn.qkv", 2, three),
        "attn2.to_q": ("x_block.attn2.qkv", 0, three), "attn2.to_k": ("x_block.attn2.qkv", 1, three),
        "attn2.to_v": ("x_block.attn2.qkv", 2, three),
        "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
        "attn2.to_out.0": "x_block.attn2.proj",
        "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
        "norm1.linear": "x_block.adaLN_modulation.1",
        # norm1_context.linear: not mapped (the last block's is stored with scale and shift swapped)
    }),
}


def _sd3_arch(cfg) -> str:
    if int(cfg.get("num_layers", 0)) == 38:
        return "stable-diffusion-3-5-large"
    if cfg.get("dual_attention_layers"):
        return "stable-diffusion-3-5-medium"
    return "stable-diffusion-3-medium" if int(cfg.get("num_layers", 0)) == 24 else "stable-diffusion-3"


# ComfyUI numbers the encoders it holds: CLIP-L te1, CLIP-G te2, then T5 (OneTrainer's naming)
_SD3_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", True),
           "text_encoder_3": ("lora_te3_", False)}
COMFY = Layout(table("SD3Transformer2DModel", _SD3), _SD3_TE, _sd3_arch, "sd3", "https://github.com/Stability-AI/sd3.5",
               None)


FAMILY = Family(
    name="sd3",
    sizes=SIZES,
    title="Stable Diffusion 3.5",
    pipeline="StableDiffusion3Pipeline",
    components={"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                "text_encoder_3": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
                "tokenizer_3": "T5TokenizerFast", "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                      outputs="both CLIPs' penultimate states (padded to T5 width) then T5's; both CLIP projections "
                              "(pooled)", pooled=True, max_tokens=MAX_TOKENS),
    latents=LatentFormat(channels=16, downscale=8, patch=2,
                         normalization="(raw - vae.shift_factor) x vae.scaling_factor; the transformer patchifies"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"),
    lora_targets=LORA_TARGETS,
    class_names=("StableDiffusion3Pipeline",),
    hub_patterns=(r"stable-diffusion-3",),
    sample=SampleDefaults(steps=28, guidance=4.5),
    size_multiple=16,
    tiny="tiny-sd3",
    tiny_version=1,
    build_tiny=build_tiny,
    encode_captions=encode_captions,
    to_model_latents=scale_shift,
    predict=predict,
    single_file_types=("sd3", "sd35_large", "sd35_medium"),
    generation=GenerationArgs(ip_adapter=IPAdapterArgs("", "ip-adapter.safetensors"),
                              controlnet=ControlNetArgs("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline")),
    extra_conditioning="the pooled CLIP projections",
    comfy=COMFY,
)
