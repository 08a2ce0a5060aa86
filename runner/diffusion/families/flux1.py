"""FLUX.1 (dev and schnell): a 12B MMDiT on 16-channel latents (VAE x8, ``(x - 0.1159) x 0.3611``)
packed into 2x2 patches (64 values per token), with (0, row, col) image ids and zero text ids.
Captions: T5-XXL's last hidden state (512 tokens) as the token sequence and CLIP-L's pooled
output as the pooled vector. Rectified flow (target noise - x0), sigmas logit-normal and shifted
by the resolution-dependent shift the pipeline uses at inference. dev is guidance-distilled: its
transformer takes a guidance embedding, fed ``objective.guidance`` while training; schnell has
none (``transformer.config.guidance_embeds`` says which)."""

from __future__ import annotations

from runner.diffusion import memory
from runner.diffusion.families.base import (
    ControlNetArgs,
    Family,
    GenerationArgs,
    IPAdapterArgs,
    LatentFormat,
    Objective,
    ReferenceArgs,
    SampleDefaults,
    TextEncoding,
    scale_shift,
    split_batch,
)
from runner.diffusion.families.comfykit import Layout, hidden, table, three

MAX_TOKENS = 512
# the attention and feed-forward projections of the double-stream blocks (the single-stream
# blocks' attn.to_q/k/v match too), as the diffusers Flux LoRA example trains
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=pipe.transformer.device,
                                           max_sequence_length=MAX_TOKENS)
    return split_batch({"prompt_embeds": pe, "pooled": pooled})


def predict(c, noisy, sigmas, batch):
    import torch
    from diffusers import FluxPipeline

    b, ch, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(c.dtype), b, ch, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, c.device, c.dtype)
    emb = batch.text["prompt_embeds"].to(c.device, c.dtype)
    txt_ids = torch.zeros(emb.shape[1], 3, device=c.device, dtype=c.dtype)
    guidance = None
    if c.denoiser.config.guidance_embeds:
        guidance = torch.full((b,), float(c.objective.guidance or 1.0), device=c.device, dtype=torch.float32)
    out = c.denoiser(hidden_states=packed, timestep=sigmas.to(c.dtype), guidance=guidance,
                     pooled_projections=batch.text["pooled"].to(c.device, c.dtype), encoder_hidden_states=emb,
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    vsf = c.pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)


def build_tiny(dest) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from runner.diffusion.families import tinykit
    from runner.diffusion.tiny import _text_config

    clip_tok = tinykit.tiny_clip_tokenizer(dest / "_clip")
    t5_tok = tinykit.t5_tokenizer(dest / "_t5", model_max_length=MAX_TOKENS)
    tinykit.seeded(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    tinykit.seeded(1)
    text_encoder = CLIPTextModel(_text_config(len(clip_tok), hidden_act="quick_gelu"))
    tinykit.seeded(2)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = tinykit.kl_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, seed=3)
    scheduler = tinykit.flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                       base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_clip", dest / "_t5")


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, 512 T5 tokens.
# FLUX.1-dev: transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L 123M.
SIZES = memory.sizes({"transformer": 11901.4e6, "text_encoder": 123.1e6, "text_encoder_2": 4762.3e6, "vae": 83.8e6},
                     denoiser="transformer", linear_share=0.9997, lora_per_rank=2801664,
                     activations=(6445824.0, 3303053312.0), checkpointed=(350216.0, 179312640.0),
                     block=(141808.0, 72704000.0),
                     source="computed on the meta device (bench/memory/real_sizes.py)")


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): Black Forest Labs' checkpoint names; the
# single blocks' q, k, v and MLP input are one fused ``linear1``.
def _flux1_linear1(cfg) -> tuple[int, int, int, int]:
    h = hidden(cfg)
    return (h, h, h, int(h * float(cfg.get("mlp_ratio", 4.0))))


_FLUX1 = {
    r"transformer_blocks\.(\d+)": ("double_blocks.{}", {
        "attn.to_q": ("img_attn.qkv", 0, three), "attn.to_k": ("img_attn.qkv", 1, three),
        "attn.to_v": ("img_attn.qkv", 2, three),
        "attn.add_q_proj": ("txt_attn.qkv", 0, three), "attn.add_k_proj": ("txt_attn.qkv", 1, three),
        "attn.add_v_proj": ("txt_attn.qkv", 2, three),
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    }),
    r"single_transformer_blocks\.(\d+)": ("single_blocks.{}", {
        "attn.to_q": ("linear1", 0, _flux1_linear1), "attn.to_k": ("linear1", 1, _flux1_linear1),
        "attn.to_v": ("linear1", 2, _flux1_linear1), "proj_mlp": ("linear1", 3, _flux1_linear1),
        "proj_out": "linear2", "norm.linear": "modulation.lin",
    }),
}


def _flux1_arch(cfg) -> str:
    if "guidance_embeds" not in cfg:
        return "flux-1"
    return "flux-1-dev" if cfg["guidance_embeds"] else "flux-1-schnell"


_FLUX1_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", False)}
COMFY = Layout(table("FluxTransformer2DModel", _FLUX1), _FLUX1_TE, _flux1_arch, "flux1",
               "https://github.com/black-forest-labs/flux", None)


FAMILY = Family(
    name="flux1",
    sizes=SIZES,
    title="FLUX.1",
    pipeline="FluxPipeline",
    components={"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5TokenizerFast",
                "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder", "text_encoder_2"),
                      outputs="T5 last hidden state (tokens); CLIP pooled output (pooled)", pooled=True,
                      max_tokens=MAX_TOKENS),
    latents=LatentFormat(channels=16, downscale=8, patch=2,
                         normalization="(raw - vae.shift_factor) x vae.scaling_factor, then 2x2 patches packed"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal", guidance=1.0),
    lora_targets=LORA_TARGETS,
    class_names=("FluxPipeline",),
    hub_patterns=(r"flux\.?1", r"black-forest-labs/flux\.1"),
    sample=SampleDefaults(steps=28, guidance=3.5),
    size_multiple=16,
    tiny="tiny-flux1",
    tiny_version=1,
    build_tiny=build_tiny,
    encode_captions=encode_captions,
    to_model_latents=scale_shift,
    predict=predict,
    single_file_types=("flux-dev", "flux-schnell"),
    generation=GenerationArgs(cfg=False, negative="none",  # guidance_scale is the embedding (true CFG: true_cfg_scale)
                              ip_adapter=IPAdapterArgs("", "ip_adapter.safetensors",
                                                       "image_encoder_pretrained_model_name_or_path"),
                              controlnet=ControlNetArgs("FluxControlNetModel", "FluxControlNetPipeline"),
                              references=ReferenceArgs("FluxKontextPipeline", 1, "a FLUX.1 Kontext checkpoint",
                                                       area_keyword="max_area", fixed={"_auto_resize": False})),
    extra_conditioning="image ids (0, row, col) per 2x2 patch; zero text ids; dev: the guidance embedding",
    variants={"dev": "guidance-distilled: transformer.config.guidance_embeds, 28-50 steps",
              "schnell": "timestep-distilled, no guidance embedding, 1-4 steps, 256 T5 tokens"},
    comfy=COMFY,
)
