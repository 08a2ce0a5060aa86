"""Qwen-Image: a 20B MMDiT on 16-channel latents of a causal 3D VAE (x8, one frame), normalized
per channel by the VAE config's ``latents_mean`` / ``latents_std`` and packed into 2x2 patches.
Captions are wrapped in Qwen-Image's chat template, encoded by Qwen2.5-VL; the last hidden state
of the caption's tokens (the template's first 34 tokens dropped) conditions the transformer, with
a mask since lengths differ (up to 1024 tokens). Rectified flow, logit-normal sigmas, shifted as
its scheduler shifts (resolution-dependent, ``max_shift`` 0.9). No guidance embedding."""

from __future__ import annotations

from runner.diffusion import memory
from runner.diffusion.families.base import (
    ControlNetArgs,
    Family,
    GenerationArgs,
    LatentFormat,
    Objective,
    SampleDefaults,
    TextEncoding,
    pad_text,
)
from runner.diffusion.families.comfykit import Layout, same

MAX_TOKENS = 1024
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        pe, mask = pipe.encode_prompt(list(captions), device=pipe.transformer.device, max_sequence_length=MAX_TOKENS)
    out = []
    for i in range(pe.shape[0]):
        e = pe[i] if mask is None else pe[i][mask[i].bool()]
        out.append({"prompt_embeds": e.detach().float().cpu()})
    return out


def encode_images(pipe, pixels) -> dict:
    """The 3D VAE takes one-frame videos: (B, 3, 1, H, W) in, (B, C, 1, h, w) out, frame squeezed."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist
    return {"mean": dist.mean.squeeze(2).float().cpu(), "std": dist.std.squeeze(2).float().cpu()}


def to_model_latents(pipe, raw):
    import torch

    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=raw.dtype, device=raw.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=raw.dtype, device=raw.device).view(1, -1, 1, 1)
    return (raw - mean) / std


def predict(c, noisy, sigmas, batch):
    from diffusers import QwenImagePipeline

    b, ch, h, w = noisy.shape
    packed = QwenImagePipeline._pack_latents(noisy.to(c.dtype), b, ch, h, w)
    out = c.denoiser(hidden_states=packed, timestep=sigmas.to(c.dtype),
                     encoder_hidden_states=batch.text["prompt_embeds"].to(c.device, c.dtype),
                     encoder_hidden_states_mask=batch.text["mask"].to(c.device),
                     img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    vsf = c.pipe.vae_scale_factor
    return QwenImagePipeline._unpack_latents(out, h * vsf, w * vsf, vsf).squeeze(2)


def build_tiny(dest) -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from runner.diffusion.families import tinykit

    tok = tinykit.qwen_tokenizer(dest / "_tok")
    vocab = len(tok) + 4  # + the vision markers, never in a caption
    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = {"bos_token_id": end, "eos_token_id": im_end, "pad_token_id": end}
    tinykit.seeded(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    tinykit.seeded(1)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                                 latents_std=[1.5, 2.0, 1.2, 1.8])
    tinykit.seeded(2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab, **ids,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, **ids, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
        vision_token_id=vocab - 2, image_token_id=vocab - 2, video_token_id=vocab - 1,
    )).eval()
    scheduler = tinykit.flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                       base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                       time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, a caption of 128 tokens.
# Qwen-Image: transformer 20B, Qwen2.5-VL-7B 8.3B.
SIZES = memory.sizes({"transformer": 20430.4e6, "text_encoder": 8292.2e6, "vae": 126.9e6},
                     denoiser="transformer", linear_share=0.9997, lora_per_rank=2949120,
                     activations=(7399232.0, 954237952.0), checkpointed=(368648.0, 46405632.0),
                     block=(123312.0, 15882240.0),
                     source="computed on the meta device (bench/memory/real_sizes.py)")


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): Qwen-Image's original names are the diffusers ones.
COMFY = Layout(same, {}, lambda cfg: "Qwen-Image", "qwen_image", "https://github.com/QwenLM/Qwen-Image", None)


FAMILY = Family(
    name="qwen_image",
    sizes=SIZES,
    title="Qwen-Image",
    pipeline="QwenImagePipeline",
    components={"transformer": "QwenImageTransformer2DModel", "vae": "AutoencoderKLQwenImage",
                "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer",
                "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder",),
                      outputs="Qwen2.5-VL last hidden state of the caption tokens (chat template, first 34 dropped)",
                      pooled=False, max_tokens=MAX_TOKENS, masked=True),
    latents=LatentFormat(channels=16, downscale=8, patch=2,
                         normalization="(raw - vae.latents_mean) / vae.latents_std per channel; 2x2 patches packed"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"),
    lora_targets=LORA_TARGETS,
    class_names=("QwenImagePipeline",),
    hub_patterns=(r"qwen-image(?!-edit)",),
    sample=SampleDefaults(steps=30, guidance=4.0),
    size_multiple=16,
    tiny="tiny-qwen-image",
    tiny_version=1,
    build_tiny=build_tiny,
    encode_captions=encode_captions,
    encode_images=encode_images,
    to_model_latents=to_model_latents,
    predict=predict,
    collate_text=pad_text,
    generation=GenerationArgs(guidance="true_cfg_scale", negative="always",
                              controlnet=ControlNetArgs("QwenImageControlNetModel", "QwenImageControlNetPipeline")),
    extra_conditioning="image shapes (frames, rows, cols) for its 3D RoPE; the text mask",
    comfy=COMFY,
)
