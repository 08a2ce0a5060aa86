"""Parameter counts of the real video models (issue 16 part 4): the diffusers classes built on the meta
device (no weights, no download) with the numbers of the published config.json files (Wan-AI/Wan2.2-I2V-A14B
and Wan-AI/Wan2.2-TI2V-5B transformer configs; LTX-Video 0.9 and LTX-2: the diffusers classes' defaults,
which are those checkpoints' configs). Prints what runner.diffusion.memory.VIDEO_SIZES holds.
Run: .venv/bin/python bench/memory/video_sizes.py
"""

import torch
from diffusers import (AutoencoderKLLTX2Video, AutoencoderKLLTXVideo, AutoencoderKLWan, LTX2VideoTransformer3DModel,
                       LTXVideoTransformer3DModel, WanTransformer3DModel)

WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6)


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    with torch.device("meta"):
        models = {
            "wan22_i2v transformer (one expert)": WanTransformer3DModel(num_attention_heads=40, in_channels=36,
                                                                        out_channels=16, ffn_dim=13824, num_layers=40,
                                                                        **WAN),
            "wan22_ti2v transformer": WanTransformer3DModel(num_attention_heads=24, in_channels=48, out_channels=48,
                                                            ffn_dim=14336, num_layers=30, **WAN),
            "ltx_video transformer": LTXVideoTransformer3DModel(),
            "ltx2 transformer": LTX2VideoTransformer3DModel(),
            "wan 2.1 vae (A14B)": AutoencoderKLWan(),
            "wan 2.2 vae (5B)": AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                                 in_channels=12, out_channels=12, scale_factor_spatial=16,
                                                 scale_factor_temporal=4, patch_size=2),
            "ltx_video vae": AutoencoderKLLTXVideo(),
            "ltx2 vae": AutoencoderKLLTX2Video(),
        }
    for name, m in models.items():
        print(f"{name}: {count(m) / 1e6:.1f}e6")


if __name__ == "__main__":
    main()
