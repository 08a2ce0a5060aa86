"""Build a Stable Diffusion 1.5-shaped pipeline with random weights as a local diffusers folder.

For bench/train/run.py ``--model <folder>``: the trainer and the plain loop then run on the
published SD 1.5 shapes (UNet 860M, VAE 84M parameters, the CLIP ViT-L/14 text tower), so the
share of a step that caching removes is the real model's, not the tiny model's. Nothing is
downloaded: the UNet config is the one bench/train/gpu.py uses, the VAE and text encoder configs
are SD 1.5's, and the tokenizer is the builtin tiny CLIP tokenizer (the text encoder's compute
does not depend on the vocabulary size). The weights are random: figures from it time the
computation only. The folder takes about 4.3 GB (fp32).

    .venv/bin/python bench/train/fullsize.py [--out bench/_work/sd15-random]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# AutoencoderKL of SD 1.5 (and SDXL): 8x downscale, 4 latent channels.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# CLIP ViT-L/14 text tower (SD 1.5's text encoder).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def build_sd15(dest: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from gpu import SD15_UNET
    from runner.diffusion.tiny import _scheduler_config, tiny_clip_tokenizer

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = tiny_clip_tokenizer(tmp / "_tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=len(tokenizer) - 2,
                                                eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
                                                **CLIP_L_TEXT))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "_tok", ignore_errors=True)
    (tmp / "RANDOM_WEIGHTS.txt").write_text(
        "SD 1.5 shapes with random weights, built by bench/train/fullsize.py: for timing only.\n", encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    counts = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    print(", ".join(f"{n} {c:.0f}M" for n, c in counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "_work" / "sd15-random")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build_sd15(args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
