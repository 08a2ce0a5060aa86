"""Sizes of the REAL models of each family, computed on the meta device (no weights, no download):
parameter counts per component, the share of the denoiser's parameters in ``nn.Linear`` weights
(what an 8-bit base quantizes), LoRA parameters per unit of rank on the family's default
targets, and the activations autograd keeps for one image through the family's own ``predict``
with the LoRA attached, as :mod:`runner.diffusion.memory` models them.

    .venv/bin/python bench/memory/real_sizes.py            # every family, prints a table and the
    .venv/bin/python bench/memory/real_sizes.py flux1 sd15  # `sizes=` lines to paste

The configurations below are those of the published checkpoints (their config.json files),
written out here because nothing can be downloaded; diffusers' class defaults are the real
configurations for FLUX.1, FLUX.2 dev, Qwen-Image and Z-Image. How activations are counted is
:func:`runner.diffusion.memory.measure_activations`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CLIP_L = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
CLIP_L_PROJ = ("CLIPTextModelWithProjection", CLIP_L[1])
CLIP_G_PROJ = ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                   num_hidden_layers=32, num_attention_heads=20,
                                                   max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
T5_XXL = ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN25_VL_7B = ("Qwen2_5_VLForConditionalGeneration", dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False))
MISTRAL_SMALL_31 = ("Mistral3ForConditionalGeneration", dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=1540, patch_size=14),
    spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=False))
SD_VAE = ("AutoencoderKL", dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
FLUX_VAE = ("AutoencoderKL", dict(SD_VAE[1], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False))
UNET_SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, sample_size=64)
UNET_SDXL = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 layers_per_block=2, sample_size=128, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
KLEIN_4B = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, mlp_ratio=3.0, guidance_embeds=False)

# family -> components {name: (class, config)}, the denoiser's inputs for the measurement
# (text: {name: shape of one caption's cached tensor}; latents: (channels, downscale) of the model
# latents when the family folds 2x2 patches into channels)
REAL = {
    "sd15": dict(components={"unet": ("UNet2DConditionModel", UNET_SD15), "text_encoder": CLIP_L, "vae": SD_VAE},
                 text={"prompt_embeds": (77, 768)}),
    "sdxl": dict(components={"unet": ("UNet2DConditionModel", UNET_SDXL), "text_encoder": CLIP_L,
                             "text_encoder_2": CLIP_G_PROJ, "vae": SD_VAE},
                 text={"prompt_embeds": (77, 2048), "pooled": (1280,)}),
    "sd3": dict(components={"transformer": ("SD3Transformer2DModel", SD35_LARGE), "text_encoder": CLIP_L_PROJ,
                            "text_encoder_2": CLIP_G_PROJ, "text_encoder_3": T5_XXL,
                            "vae": ("AutoencoderKL", FLUX_VAE[1])},
                text={"prompt_embeds": (77 + 256, 4096), "pooled": (2048,)}),
    "flux1": dict(components={"transformer": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
                              "text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "vae": FLUX_VAE},
                  text={"prompt_embeds": (512, 4096), "pooled": (768,)}),
    "flux2": dict(components={"transformer": ("Flux2Transformer2DModel", {}), "text_encoder": MISTRAL_SMALL_31,
                              "vae": ("AutoencoderKLFlux2", {})},
                  text={"prompt_embeds": (512, 15360)}, latents=(128, 16)),
    "flux2_klein": dict(components={"transformer": ("Flux2Transformer2DModel", KLEIN_4B),
                                    "text_encoder": ("Qwen3ForCausalLM", QWEN3_4B), "vae": ("AutoencoderKLFlux2", {})},
                        text={"prompt_embeds": (512, 7680)}, latents=(128, 16)),
    "qwen_image": dict(components={"transformer": ("QwenImageTransformer2DModel", {}), "text_encoder": QWEN25_VL_7B,
                                   "vae": ("AutoencoderKLQwenImage", {})},
                       text={"prompt_embeds": (128, 3584), "mask": None}),
    "z_image": dict(components={"transformer": ("ZImageTransformer2DModel", {}),
                                "text_encoder": ("Qwen3Model", QWEN3_4B), "vae": FLUX_VAE},
                    text={"prompt_embeds": (128, 2560)}),
}


def build(cls_name: str, config: dict):
    """The module of class ``cls_name`` with ``config``, on the meta device."""
    import diffusers
    import torch
    import transformers

    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
    with torch.device("meta"):
        if cls.__module__.startswith("transformers"):
            return cls(cls.config_class(**config))
        return cls(**config)


def sizes_of(name: str, resolutions=(512, 1024)) -> dict:
    from runner.diffusion import families
    from runner.diffusion.memory import count_params, linear_share, lora_params_per_rank, measure_activations

    fam = families.get(name)
    real = REAL[name]
    params, denoiser = {}, None
    for comp, (cls_name, config) in real["components"].items():
        module = build(cls_name, config)
        params[comp] = count_params(module)
        if comp == fam.denoiser:
            denoiser = module
    out = {"params": params, "linear_share": linear_share(denoiser),
           "lora_per_rank": lora_params_per_rank(denoiser, fam.lora_targets)}
    out["activations"] = measure_activations(fam, denoiser, real["text"], resolutions, latents=real.get("latents"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", default=list(REAL))
    args = ap.parse_args()
    for name in args.families:
        s = sizes_of(name)
        print(f"# {name}")
        print(sizes_line(name, s))


def sizes_line(name: str, s: dict) -> str:
    """The ``SIZES = memory.sizes(...)`` statement of a family module."""
    from runner.diffusion import families

    params = ", ".join(f'"{k}": {v / 1e6:.1f}e6' for k, v in s["params"].items())
    a = s["activations"]
    return (f"SIZES = memory.sizes({{{params}}}, denoiser=\"{families.get(name).denoiser}\",\n"
            f"                     linear_share={s['linear_share']}, lora_per_rank={s['lora_per_rank']:.0f},\n"
            f"                     activations={a['activations']}, checkpointed={a['checkpointed']},\n"
            f"                     block={a['block']}, source=SOURCE)")


if __name__ == "__main__":
    main()
