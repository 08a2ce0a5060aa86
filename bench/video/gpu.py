"""Video LoRA training step at full model size (random weights) on a GPU: steps/s and peak memory.

For each of Wan 2.2 TI2V 5B, LTX-Video 0.9 (2B) and LTX-2 (19B, its video stream trained) at each
clip shape: the diffusers transformer built from the published config in bf16 (random weights,
nothing downloaded), a rank-16 LoRA on the family's targets through peft (fp32 LoRA weights),
gradient checkpointing, AdamW, and one training step exactly as ``train_video`` runs it:
``families.training_loss`` with the family's own ``predict`` (packing, per-token timesteps, the
clean key frame, LTX-2's isolated audio stream) on latents of the clip's shape and cached-caption
shaped embeddings. Reports steps/s after warm-up, peak GPU memory (``torch.cuda.max_memory_allocated``)
and the plan's estimate for the same settings (``runner.diffusion.memory.video_train_estimate``,
the caching phase aside), so the estimate can be checked against a measurement.

    .venv/bin/python bench/video/gpu.py [--only wan22_ti2v ltx2] [--shapes 33x512x512 121x704x1280]
        [--rank 16] [--steps 5] [--warmup 2] [--no-gradient-checkpointing]
    .venv/bin/python bench/video/gpu.py --smoke-cpu    # 1-layer shapes on the CPU: the script runs
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

# the published transformer configs (bench/memory/video_sizes.py counts their parameters)
FULL = {
    "wan22_ti2v": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                       out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6),
    "ltx_video": {},  # LTXVideoTransformer3DModel's defaults are LTX-Video 0.9's config
    "ltx2": {},  # LTX2VideoTransformer3DModel's defaults are LTX-2's
}
SMOKE = {
    "wan22_ti2v": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=48,
                       out_channels=48, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads"),
    "ltx_video": dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=8,
                      cross_attention_dim=16, num_layers=1, caption_channels=32),
    "ltx2": dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                 audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=4,
                 audio_cross_attention_dim=8, num_layers=1, caption_channels=32),
}
CLASSES = {"wan22_ti2v": "WanTransformer3DModel", "ltx_video": "LTXVideoTransformer3DModel",
           "ltx2": "LTX2VideoTransformer3DModel"}
TEXT_TOKENS = {"wan22_ti2v": 512, "ltx_video": 128, "ltx2": 1024}


def latent_shape(fam, cfg, frames: int, height: int, width: int) -> tuple[int, ...]:
    v = fam.video
    return (1, int(cfg.in_channels), (frames - 1) // v.temporal + 1, height // v.spatial, width // v.spatial)


def text_inputs(name: str, cfg, device) -> dict:
    import torch

    width = cfg.text_dim if name.startswith("wan") else cfg.caption_channels
    n = TEXT_TOKENS[name]
    return {"prompt_embeds": torch.randn(1, n, width, device=device, dtype=torch.bfloat16),
            "mask": torch.ones(1, n, device=device, dtype=torch.long)}


def build(name: str, smoke: bool, device: str):
    import diffusers
    import torch

    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = getattr(diffusers, CLASSES[name])(**(SMOKE if smoke else FULL)[name])
    finally:
        torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False)


def bench_one(name: str, shape: tuple[int, int, int], *, rank: int, steps: int, warmup: int, ckpt: bool,
              smoke: bool, device: str) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params

    from runner.diffusion import families, memory
    from runner.diffusion.families.base import Batch, Components

    fam = families.get(name)
    model = build(name, smoke, device)
    pipe = SimpleNamespace(transformer=model, vae_temporal_compression_ratio=fam.video.temporal,
                           vae_spatial_compression_ratio=fam.video.spatial)
    c = Components(family=fam, pipe=pipe, denoiser=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                   objective=fam.objective)
    families.add_lora(c, rank=rank, alpha=rank, seed=0)
    cast_training_params([model], dtype=torch.float32)
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    frames, height, width = shape
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(latent_shape(fam, model.config, frames, height, width), generator=gen).to(device)
    text = text_inputs(name, model.config, device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = families.training_loss(c, Batch(latents=latents, text=text, generator=gen)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    z = memory.video_sizes(fam)
    est = memory.video_train_estimate(z, memory.VideoSettings.of({}, rank=rank, gradient_checkpointing=ckpt),
                                      frames, width, height)
    peak = torch.cuda.max_memory_allocated() / memory.GIB if device == "cuda" else None
    out = {"family": name, "shape": f"{frames}x{height}x{width}", "tokens": memory.video_tokens(z, frames, width,
                                                                                               height),
           "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3), "steps_per_s": round(1 / dt, 4),
           "s_per_step": round(dt, 3), "peak_gib": None if peak is None else round(peak, 2),
           "estimated_loop_gib": round(est.loop / memory.GIB, 2), "loss": round(loss, 4),
           "gradient_checkpointing": ckpt, "rank": rank, "device": device, "random_weights": True,
           "smoke": smoke}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=list(FULL))
    ap.add_argument("--shapes", nargs="*", default=["33x512x512", "121x704x1280"], help="FRAMESxHEIGHTxWIDTH")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--smoke-cpu", action="store_true", help="1-layer models on the CPU, 1 step: the script runs")
    args = ap.parse_args()
    import torch

    device = "cpu" if args.smoke_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke-cpu)")
    shapes = ["9x64x64"] if args.smoke_cpu else args.shapes
    steps, warmup = (1, 1) if args.smoke_cpu else (args.steps, args.warmup)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for name in args.only:
        for s in shapes:
            f, h, w = (int(x) for x in s.split("x"))
            row = bench_one(name, (f, h, w), rank=args.rank, steps=steps, warmup=warmup,
                            ckpt=not args.no_gradient_checkpointing, smoke=args.smoke_cpu, device=device)
            print(json.dumps({**row, "gpu": gpu}), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()  # the model of this row is gone with bench_one's frame


if __name__ == "__main__":
    main()
