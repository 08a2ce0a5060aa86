"""Z-Image (Turbo and Base): a 6B single-stream DiT on 16-channel latents of the FLUX.1 VAE
(``(x - 0.1159) x 0.3611``); the transformer patchifies 2x2 itself and takes lists (one
``(C, 1, H, W)`` latent and one caption sequence per image). Captions in the Qwen chat template,
encoded by Qwen3; the second-to-last hidden state of the caption's real tokens (no padding,
lengths differ, up to 512). Rectified flow; the transformer is given ``1 - sigma`` as its time
and predicts ``x0 - noise``, so the prediction is negated. Static shift 3 as its scheduler."""

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
    scale_shift,
)
from runner.diffusion.families.comfykit import Layout, table

MAX_TOKENS = 512
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def encode_captions(pipe, captions: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(captions), device=pipe.transformer.device,
                                       do_classifier_free_guidance=False, max_sequence_length=MAX_TOKENS)
    return [{"prompt_embeds": e.detach().float().cpu()} for e in embeds]


def list_text(items: list[dict]) -> dict:
    return {"prompt_embeds": [it["prompt_embeds"] for it in items]}


def predict(c, noisy, sigmas, batch):
    import torch

    x = list(noisy.to(c.dtype).unsqueeze(2).unbind(0))
    caps = [e.to(c.device, c.dtype) for e in batch.text["prompt_embeds"]]
    out = c.denoiser(x, (1.0 - sigmas).to(c.dtype), caps, return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


def build_tiny(dest) -> None:
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from runner.diffusion.families import tinykit

    tok = tinykit.qwen_tokenizer(dest / "_tok")
    tinykit.seeded(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64],
    )
    with torch.no_grad():  # the pad tokens start as torch.empty: give them seeded values
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    vae = tinykit.kl_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, seed=1)
    tinykit.seeded(2)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=pad, eos_token_id=pad,
        pad_token_id=pad,
    ))
    scheduler = tinykit.flow_scheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                          transformer=transformer)
    tinykit.save_pipeline(pipe, dest)
    tinykit.remove(dest / "_tok")


# The real model's sizes for the GPU memory estimate (runner.diffusion.memory), computed on the
# meta device by bench/memory/real_sizes.py from the published configs; activations per image
# token and per image at bf16, batch 1, a caption of 128 tokens.
# Z-Image: transformer 6.15B, Qwen3-4B.
SIZES = memory.sizes({"transformer": 6154.9e6, "text_encoder": 4022.5e6, "vae": 83.8e6},
                     denoiser="transformer", linear_share=0.9998, lora_per_rank=1044480,
                     activations=(8357636.0, 1070760448.0), checkpointed=(245768.0, 31465984.0),
                     block=(262136.0, 33584128.0),
                     source="computed on the meta device (bench/memory/real_sizes.py)")


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI (runner.diffusion.comfy): the Lumina-2 checkpoint names (q, k, v fused
# into ``attention.qkv``).
def _zimage_qkv(cfg) -> tuple[int, int, int]:
    dim, heads = int(cfg["dim"]), int(cfg["n_heads"])
    kv = int(cfg.get("n_kv_heads") or heads) * (dim // heads)
    return (dim, kv, kv)


_ZIMAGE_BLOCK = {
    "attention.to_q": ("attention.qkv", 0, _zimage_qkv), "attention.to_k": ("attention.qkv", 1, _zimage_qkv),
    "attention.to_v": ("attention.qkv", 2, _zimage_qkv), "attention.to_out.0": "attention.out",
    "feed_forward.w1": "feed_forward.w1", "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
_ZIMAGE = {rf"({kind})\.(\d+)": ("{}.{}", _ZIMAGE_BLOCK) for kind in ("layers", "noise_refiner", "context_refiner")}


COMFY = Layout(table("ZImageTransformer2DModel", _ZIMAGE), {}, lambda cfg: "Z-Image", "z_image",
               "https://github.com/Tongyi-MAI/Z-Image", None)


FAMILY = Family(
    name="z_image",
    sizes=SIZES,
    title="Z-Image",
    pipeline="ZImagePipeline",
    components={"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "Qwen3Model",
                "tokenizer": "Qwen2Tokenizer", "scheduler": "FlowMatchEulerDiscreteScheduler"},
    denoiser="transformer",
    text=TextEncoding(encoders=("text_encoder",),
                      outputs="Qwen3 second-to-last hidden state of the caption's tokens (chat template)",
                      pooled=False, max_tokens=MAX_TOKENS, masked=True),
    latents=LatentFormat(channels=16, downscale=8, patch=2,
                         normalization="(raw - vae.shift_factor) x vae.scaling_factor; the transformer patchifies"),
    objective=Objective(prediction="flow", timestep_sampling="logit_normal"),
    lora_targets=LORA_TARGETS,
    class_names=("ZImagePipeline",),
    hub_patterns=(r"z-image",),
    sample=SampleDefaults(steps=8, guidance=0.0),  # ZImagePipeline: pos + g (pos - neg), so 0 is no CFG (Turbo)
    size_multiple=16,
    tiny="tiny-z-image",
    tiny_version=1,
    build_tiny=build_tiny,
    encode_captions=encode_captions,
    to_model_latents=scale_shift,
    predict=predict,
    collate_text=list_text,
    single_file_types=("z-image-turbo",),
    generation=GenerationArgs(controlnet=ControlNetArgs("ZImageControlNetModel", "ZImageControlNetPipeline")),
    extra_conditioning="none besides the caption (positions come from the lists' shapes)",
    variants={"turbo": "distilled, 8 steps, guidance_scale 0 (the pipeline's CFG is pos + g (pos - neg))",
              "base": "undistilled, ~30-50 steps with CFG"},
    comfy=COMFY,
)
