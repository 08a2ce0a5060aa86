"""Stable Diffusion XL: a UNet on 4-channel latents (VAE x8) conditioned on the penultimate
hidden states of two CLIP text encoders concatenated, plus the second encoder's pooled
projection and six time ids (original size, crop top-left, target size) through the UNet's
``added_cond_kwargs``. Objective as SD 1.5. The tiny model is ``builtin:tiny-sdxl``."""

from __future__ import annotations

import re
from typing import Any, Mapping

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
from runner.diffusion.families.comfykit import Layout, Target
from runner.diffusion.families.sd15 import UNET_LORA_TARGETS
from runner.diffusion.tiny import TINY_VERSION


def encode_text(pipe, captions: list[str]) -> dict:
    pe, _, pooled, _ = pipe.encode_prompt(prompt=list(captions), device=pipe.unet.device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"prompt_embeds": pe, "pooled": pooled}


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        return split_batch(encode_text(pipe, captions))


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]):
    """SDXL's micro-conditioning of one image: (orig h, orig w, crop top, crop left, target h, target w)."""
    import torch

    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def predict(c, noisy, t, batch):
    import torch

    n = noisy.shape[0]
    ids = batch.extra.get("time_ids")
    if ids is None:  # no micro-conditioning given: the image is its own uncropped target
        h, w = noisy.shape[-2] * c.pipe.vae_scale_factor, noisy.shape[-1] * c.pipe.vae_scale_factor
        ids = torch.stack([time_ids((h, w), (0, 0), (h, w))] * n)
    added = {"text_embeds": batch.text["pooled"].to(c.device, c.dtype), "time_ids": ids.to(c.device, c.dtype)}
    emb = batch.text["prompt_embeds"].to(c.device, c.dtype)
    return c.denoiser(noisy.to(c.dtype), t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed by
# bench/memory/real_sizes.py on the meta device from the SDXL base 1.0 configs (UNet 2.57B, text
# encoders 817M, as published); activations per latent pixel and per image (bf16, batch 1).
SIZES = memory.sizes({"unet": 2567.5e6, "text_encoder": 123.1e6, "text_encoder_2": 694.7e6, "vae": 83.7e6},
                     denoiser="unet", linear_share=0.8696, lora_per_rank=1451520,
                     activations=(391748.0, 70130432.0), checkpointed=(14720.0, 128.0),
                     block=(43595.0, 10299648.0), source="computed on the meta device (bench/memory/real_sizes.py)")


# The LoRA file for ComfyUI/A1111 (runner.diffusion.comfy): UNet modules in Stability's "sgm" (LDM)
# layout, which ComfyUI and A1111 expect for SDXL:
# ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.(1 + i*(L+1) + j).{0,1}``,
# ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.((i+1)*(L+1)).0.op``, ``mid_block`` ->
# ``middle_block.{0,1,2}``, ``up_blocks.i.{resnets,attentions}.j`` -> ``output_blocks.(i*(L+1) + j).{0,1}``
# (L = layers_per_block), with resnet internals renamed (conv1 -> in_layers.2, conv2 ->
# out_layers.3, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection). Text encoders:
# ``lora_te1_`` / ``lora_te2_``.

_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head in _RESNET_SGM:
        return _RESNET_SGM[head] + (("." + tail) if tail else "")
    return rest


def diffusers_unet_module_to_sgm(module: str, unet_config: Mapping[str, Any]) -> str:
    """Map a diffusers UNet module path of an SDXL UNet to its sgm (LDM) path."""
    lpb = int(unet_config.get("layers_per_block", 2))
    if isinstance(unet_config.get("layers_per_block"), (list, tuple)):
        raise ValueError("UNets with a per-block layers_per_block are not supported by the kohya writer")
    up_types = list(unet_config.get("up_block_types", ()))
    for k, v in _TOP_SGM.items():
        if module == k or module.startswith(k + "."):
            return v + module[len(k):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = 1 + i * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0" + ("." + _resnet_rest(rest) if rest else "")
        return f"input_blocks.{idx}.1" + ("." + rest if rest else "")
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(?:\.(.*))?$", module)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op" + ("." + m[2] if m[2] else "")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        if kind == "resnets":
            return f"middle_block.{idx}" + ("." + _resnet_rest(rest) if rest else "")
        return f"middle_block.{idx}" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = i * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0" + ("." + _resnet_rest(rest) if rest else "")
        return f"output_blocks.{idx}.1" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(?:\.(.*))?$", module)
    if m:
        i = int(m[1])
        has_attn = i < len(up_types) and "CrossAttn" in up_types[i]
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv" + ("." + m[2] if m[2] else "")
    raise ValueError(f"no sgm name known for SDXL UNet module {module!r}")


def _sgm(module: str, cfg: Mapping[str, Any]) -> Target:
    return Target(diffusers_unet_module_to_sgm(module, cfg))


_SDXL_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", True)}
COMFY = Layout(_sgm, _SDXL_TE, lambda cfg: "stable-diffusion-xl-v1-base", "sdxl_base_v1-0",
               "https://github.com/Stability-AI/generative-models")


FAMILY = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    sizes=SIZES,
    pipeline="StableDiffusionXLPipeline",
    components={"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
                "tokenizer_2": "CLIPTokenizer", "scheduler": "EulerDiscreteScheduler"},
    denoiser="unet",
    text=TextEncoding(encoders=("text_encoder", "text_encoder_2"),
                      outputs="both CLIPs' penultimate hidden states concatenated; text_encoder_2's pooled projection",
                      pooled=True, max_tokens=77),
    latents=LatentFormat(channels=4, downscale=8, patch=1, normalization="raw x vae.scaling_factor (0.13025)"),
    objective=Objective(prediction="scheduler"),
    lora_targets=UNET_LORA_TARGETS,
    class_names=("StableDiffusionXLPipeline",),
    hub_patterns=(r"stable-diffusion-xl", r"sdxl"),
    sample=SampleDefaults(steps=25, guidance=6.0),
    size_multiple=32,
    tiny="tiny-sdxl",
    tiny_version=TINY_VERSION,
    build_tiny=None,
    encode_captions=encode_captions,
    encode_text=encode_text,
    to_model_latents=scale_shift,
    predict=predict,
    single_file_types=("xl_base",),
    generation=GenerationArgs(ip_adapter=IPAdapterArgs("sdxl_models", "ip-adapter_sdxl.safetensors"),
                              controlnet=ControlNetArgs("ControlNetModel", "StableDiffusionXLControlNetPipeline",
                                                        "image")),
    extra_conditioning="time ids (original size, crop top-left, target size) and the pooled text embedding",
    comfy=COMFY,
)
