"""Stable Diffusion XL: a UNet on 4-channel latents (VAE x8) conditioned on the penultimate
hidden states of two CLIP text encoders concatenated, plus the second encoder's pooled
projection and six time ids (original size, crop top-left, target size) through the UNet's
``added_cond_kwargs``. Objective as SD 1.5. The tiny model is ``builtin:tiny-sdxl``."""

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
)
