"""Stable Diffusion 1.5: a UNet on 4-channel latents (VAE x8), conditioned on the last hidden
state of one CLIP text encoder (77 tokens); epsilon or v-prediction as the model's scheduler
config says, optionally min-SNR weighted. The tiny model is ``builtin:tiny-sd``, built by
:mod:`runner.diffusion.tiny` (same folder and cache keys as before the registry)."""

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
from runner.diffusion.families.comfykit import Layout, same
from runner.diffusion.tiny import TINY_VERSION

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def encode_text(pipe, captions: list[str]) -> dict:
    pe, _ = pipe.encode_prompt(list(captions), pipe.unet.device, 1, False)
    return {"prompt_embeds": pe}


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        return split_batch(encode_text(pipe, captions))


def predict(c, noisy, t, batch):
    emb = batch.text["prompt_embeds"].to(c.device, c.dtype)
    return c.denoiser(noisy.to(c.dtype), t, encoder_hidden_states=emb, return_dict=False)[0]


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed by
# bench/memory/real_sizes.py on the meta device from the SD 1.5 configs (UNet 860M, CLIP-L 123M, as
# published); activations per latent pixel and per image (bf16, batch 1).
SIZES = memory.sizes({"unet": 859.5e6, "text_encoder": 123.1e6, "vae": 83.7e6}, denoiser="unet",
                     linear_share=0.3142, lora_per_rank=199296,
                     activations=(217553.9, 7714816.0), checkpointed=(19320.0, 128.0),
                     block=(19480.0, 340160.0), source="computed on the meta device (bench/memory/real_sizes.py)")


# The LoRA file for ComfyUI/A1111 (runner.diffusion.comfy): kohya trains SD 1.x on the diffusers
# UNet, so its modules keep the diffusers names (``lora_unet_down_blocks_0_attentions_0_..._to_q``,
# which ComfyUI maps through ``unet_to_diffusers``); the text encoder's prefix is ``lora_te_``.
COMFY = Layout(same, {"text_encoder": ("lora_te_", True)}, lambda cfg: "stable-diffusion-v1", "sd_v1")


FAMILY = Family(
    name="sd15",
    title="Stable Diffusion 1.5",
    sizes=SIZES,
    pipeline="StableDiffusionPipeline",
    components={"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer", "scheduler": "PNDMScheduler"},
    denoiser="unet",
    text=TextEncoding(encoders=("text_encoder",), outputs="CLIP last hidden state", pooled=False, max_tokens=77),
    latents=LatentFormat(channels=4, downscale=8, patch=1, normalization="raw x vae.scaling_factor (0.18215)"),
    objective=Objective(prediction="scheduler"),
    lora_targets=UNET_LORA_TARGETS,
    class_names=("StableDiffusionPipeline",),
    hub_patterns=(r"stable-diffusion-v1-[45]", r"/sd-?1\.?5", r"runwayml/stable-diffusion"),
    sample=SampleDefaults(steps=25, guidance=6.0),
    size_multiple=64,
    tiny="tiny-sd",
    tiny_version=TINY_VERSION,
    build_tiny=None,
    encode_captions=encode_captions,
    encode_text=encode_text,
    to_model_latents=scale_shift,
    predict=predict,
    single_file_types=("v1",),
    generation=GenerationArgs(ip_adapter=IPAdapterArgs("models", "ip-adapter_sd15.safetensors"),
                              controlnet=ControlNetArgs("ControlNetModel", "StableDiffusionControlNetPipeline",
                                                        "image")),
    pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
    comfy=COMFY,
)
