"""bench/generate: storyboard frames per second, batched vs one frame at a time (CPU, tiny model),
and, when a CUDA GPU is present, seconds per clip with the full-size LTX-Video transformer shape.

    python bench/generate/run.py [--frames 8] [--steps 4] [--side 64] [--batch 8] [--threads 1] [--repeats 5]
                                 [--gpu-frames 97] [--gpu-width 704] [--gpu-height 480]

Part 1 (always): the same storyboard frames (one prompt per scene, seed per scene) generated with
``runner.diffusion.generate.generate_images`` on ``builtin:tiny-sd`` + a LoRA at batch size 1 and
at ``--batch``, side by side in one run, after one warm-up call each, ``--repeats`` interleaved
runs per mode (the median is reported); the script checks that both
give the same images (up to float rounding). Target: at least 2x from batching.
**Figures are from a tiny random model**: they time the per-call overhead batching removes
(text encoding, scheduler and Python per call), not a real SD 1.5/SDXL UNet.

Part 2 (only with CUDA): ``LTXVideoTransformer3DModel`` with the LTX-Video 0.9.x config (28 layers,
32 heads x 64, 128 latent channels) and random weights in bf16; one denoising step is timed at the
token count of a ``--gpu-frames`` x ``--gpu-width`` x ``--gpu-height`` clip (VAE 32x spatial, 8x
temporal compression), with the batch doubled when guidance > 1 (classifier-free guidance); seconds
per clip = steps x step time at each preset's settings (baseline: 10 steps, guidance 1.0;
aggressive-quality: 20 steps, guidance 3.0). VAE decode and text encoding are not included.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "bnchchr man, wide establishing shot, rides into a steppe village",
    "bnchchr man, medium shot, meets a greedy bai",
    "bnchchr man, full body shot, tells of a magic coat",
    "bnchchr man, medium shot, trades his horse",
    "bnchchr man, close-up portrait, laughs",
    "bnchchr man, wide establishing shot, rides away across the snow",
    "bnchchr man, close-up portrait, shivers in the cold",
    "bnchchr man, medium shot, drinks tea",
    "bnchchr man, full body shot, walks home",
    "bnchchr man, close-up portrait, smiles",
]


def make_lora(pipe, folder: Path) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="bench")
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="bench"))
    pipe.unet.delete_adapters("bench")
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=sd)
    return folder / "pytorch_lora_weights.safetensors"


def storyboard_part(args, work: Path) -> dict:
    import numpy as np

    from runner.diffusion.generate import generate_images
    from runner.diffusion.lora import load_lora
    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd", cache_dir=work / "cache")
    pipe.set_progress_bar_config(disable=True)
    load_lora(pipe, make_lora(pipe, work / "lora"), adapter_name="character", scale=1.0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.frames)]
    seeds = [1000 + i for i in range(args.frames)]
    kw = dict(negative_prompt="blurry", steps=args.steps, guidance=7.0, width=args.side, height=args.side,
              lora_scale=1.0)
    modes = (("one at a time", 1), (f"batched ({args.batch})", args.batch))
    for _, bs in modes:
        generate_images(pipe, prompts[:bs], seeds=seeds[:bs], batch_size=bs, **kw)  # warm-up
    times: dict[str, list[float]] = {label: [] for label, _ in modes}
    images = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits both modes
        for label, bs in modes:
            t0 = time.perf_counter()
            images[label] = generate_images(pipe, prompts, seeds=seeds, batch_size=bs, **kw)
            times[label].append(time.perf_counter() - t0)
    results = {}
    for label, ts in times.items():
        med = float(np.median(ts))
        results[label] = {"seconds": round(med, 3), "frames_per_s": round(args.frames / med, 3),
                          "runs_s": [round(t, 3) for t in ts]}
    a, b = images.values()
    diff = max(float(np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32)).max())
               for x, y in zip(a, b))
    one, batched = results.values()
    return {"frames": args.frames, "steps": args.steps, "side": args.side, "batch": args.batch,
            "modes": results, "speedup": round(batched["frames_per_s"] / one["frames_per_s"], 2),
            "max_pixel_difference": diff, "model": "builtin:tiny-sd (tiny random) + random LoRA"}


def ltx_gpu_part(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU on this machine"}
    from diffusers import LTXVideoTransformer3DModel

    dev, dtype = "cuda", torch.bfloat16
    model = LTXVideoTransformer3DModel(  # LTX-Video 0.9.x transformer shape, random weights
        in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
        num_layers=28, caption_channels=4096).to(dev, dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    f = (args.gpu_frames - 1) // 8 + 1
    h, w = args.gpu_height // 32, args.gpu_width // 32
    tokens = f * h * w
    text_len = 128
    out = {"gpu": torch.cuda.get_device_name(0), "params_b": round(n_params / 1e9, 3), "latent": [f, h, w],
           "tokens": tokens, "frames": args.gpu_frames, "width": args.gpu_width, "height": args.gpu_height,
           "presets": {}}
    for preset, steps, guidance in (("baseline", 10, 1.0), ("aggressive-quality", 20, 3.0)):
        b = 2 if guidance > 1.0 else 1
        hidden = torch.randn(b, tokens, 128, device=dev, dtype=dtype)
        text = torch.randn(b, text_len, 4096, device=dev, dtype=dtype)
        mask = torch.ones(b, text_len, device=dev, dtype=torch.long)
        t = torch.full((b,), 500.0, device=dev)

        def step(hidden=hidden, text=text, t=t, mask=mask):  # this iteration's tensors, bound now
            with torch.inference_mode():
                model(hidden_states=hidden, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                      num_frames=f, height=h, width=w, return_dict=False)

        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / 3
        out["presets"][preset] = {"steps": steps, "guidance": guidance, "batch": b,
                                  "seconds_per_step": round(per_step, 4),
                                  "seconds_per_clip": round(per_step * steps, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median reported)")
    ap.add_argument("--gpu-frames", type=int, default=97)
    ap.add_argument("--gpu-width", type=int, default=704)
    ap.add_argument("--gpu-height", type=int, default=480)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "generate")
    args = ap.parse_args()
    import os

    import torch

    os.environ.setdefault("CHARACTER_RUNNER_CACHE", str(args.work / "cache"))
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads, "load_average": os.getloadavg()[0]},
              "storyboard": storyboard_part(args, args.work), "ltx_gpu": ltx_gpu_part(args)}
    sb = result["storyboard"]
    print(f"storyboard frames ({sb['frames']} frames, {sb['steps']} steps, {sb['side']} px, TINY RANDOM MODEL):")
    for label, r in sb["modes"].items():
        print(f"  {label:<16} {r['frames_per_s']:8.2f} frames/s  ({r['seconds']} s)")
    print(f"  speedup {sb['speedup']}x (target >= 2x); max pixel difference {sb['max_pixel_difference']}")
    g = result["ltx_gpu"]
    if "skipped" in g:
        print(f"LTX transformer on GPU: skipped ({g['skipped']})")
    else:
        for p, r in g["presets"].items():
            print(f"LTX transformer ({g['params_b']}B params, random weights, {g['tokens']} tokens) on {g['gpu']}: "
                  f"{p}: {r['seconds_per_step']} s/step, {r['seconds_per_clip']} s per clip")
    (args.work / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
