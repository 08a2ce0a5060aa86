"""Train benchmark, part (a): the trainer vs a plain loop that encodes at every step (CPU).

Same data (six photos of ../shared/data/faces, stored at up to 1024 px as a caption-stage
dataset, as the demo's ingest keeps them), same tiny model, LoRA, batch size, steps and seed, in one run:

- plain loop: what diffusers' example training scripts do per step: open and decode the images,
  resize and crop, VAE-encode, tokenize and text-encode the captions, then the UNet forward,
  backward and optimizer step;
- trainer: runner.diffusion.trainer.LoraTrainer, which encodes every image and caption once
  into the on-disk caches and then only runs the UNet per step. Timed twice: cold caches (the
  encode pass included) and warm caches (what a second variant or phase sees).

Both use the same square 64 px crop (buckets off) so the per-step work is identical apart from
the caching. Figures are from builtin:tiny-sd, a tiny random model: they time the code paths,
not a real SD 1.5.

    .venv/bin/python bench/train/run.py [--steps 40] [--model builtin:tiny-sd] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def plain_loop(cfg: dict, dataset: Path, steps: int, device: str) -> tuple[float, float]:
    """Encode-every-step LoRA loop in the style of diffusers' train_text_to_image_lora.py."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from runner.diffusion.data import load_bucketed, read_dataset
    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline(cfg["base_model"], device=device)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    torch.manual_seed(cfg["seed"])
    unet.add_adapter(LoraConfig(r=cfg["lora"]["rank"], lora_alpha=cfg["lora"]["alpha"], init_lora_weights="gaussian",
                                target_modules=cfg["lora"]["target_modules"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = get_scheduler("constant", opt)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    examples = read_dataset(dataset)
    res = cfg["resolution"]
    rng = np.random.default_rng(cfg["seed"])
    bs = cfg["batch_size"]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = [examples[i] for i in rng.choice(len(examples), size=bs)]
        imgs = [load_bucketed(e.image, (res, res))[0] for e in batch]
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in imgs])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        with torch.no_grad():
            latents = vae.encode(x.to(device)).latent_dist.sample() * vae.config.scaling_factor
            ids = tok([e.caption for e in batch], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            emb = te(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (bs,), device=device)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, emb, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="builtin:tiny-sd")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin contention on shared cores)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=1024,
                    help="longest side of the stored dataset images (the demo ingests at 1024)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from runner.diffusion.trainer import LoraTrainer
    from runner.stages.train import train_config
    from train_helpers import make_dataset

    work = REPO / "bench" / "_work" / "train"
    shutil.rmtree(work, ignore_errors=True)
    dataset = make_dataset(REPO.parent / "shared" / "data", work / "dataset", max_side=args.max_side)
    cfg = train_config({
        "base_model": args.model, "resolution": args.resolution, "buckets": {"enabled": False},
        "lora": {"rank": 4, "alpha": 4}, "steps": args.steps, "lr": 1e-4, "batch_size": args.batch_size,
        "mixed_precision": "no", "lr_scheduler": {"name": "constant"}, "min_snr_gamma": None,
        "checkpoints": {"every_steps": args.steps, "sample_prompts": [], "validation_fraction": 0.0},
    }, character="bench", trigger="sks", class_word="person")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # warm-up: build the tiny model and import everything outside the timed regions
    plain_loop(cfg, dataset, 2, device)

    # Rounds alternate the two loops so that load from other processes hits both alike; each
    # figure is the median over rounds, in wall time and in CPU time of this process (with one
    # thread the CPU time is the work done, whatever else runs on the machine).
    plain_w, plain_c, tr_w, tr_c, cold = [], [], [], [], None
    for r in range(args.rounds):
        w, c = plain_loop(cfg, dataset, args.steps, device)
        plain_w.append(w)
        plain_c.append(c)
        cache = work / "cache"
        if r == 0:
            shutil.rmtree(cache, ignore_errors=True)
        tr = LoraTrainer(cfg, dataset_dir=dataset, out_dir=work / f"r{r}" / "out",
                         scratch_dir=work / f"r{r}" / "scratch",
                         cache_dir=cache, device=device)
        index = tr.run()
        t = index["timings"]
        tr_w.append(t["train_s"] - t.get("checkpoint_s", 0.0))
        tr_c.append(t["train_cpu_s"] - t.get("checkpoint_cpu_s", 0.0))
        if r == 0:
            cold = {"cache_s": t["cache_s"], "cache_cpu_s": t["cache_cpu_s"], "cache": index["cache"]}
        else:
            warm_cache = index["cache"]
    med = statistics.median
    n = args.steps
    result = {
        "model": args.model + (" (tiny random model)" if args.model.startswith("builtin:") else ""),
        "device": device, "threads": args.threads, "steps": n, "rounds": args.rounds, "batch_size": args.batch_size,
        "images": 6, "stored_image_max_side": args.max_side, "resolution": args.resolution,
        "plain_loop_steps_per_s": {"wall": round(n / med(plain_w), 2), "cpu": round(n / med(plain_c), 2)},
        "trainer_steps_per_s": {"wall": round(n / med(tr_w), 2), "cpu": round(n / med(tr_c), 2)},
        "speedup": {"wall": round(med(plain_w) / med(tr_w), 2), "cpu": round(med(plain_c) / med(tr_c), 2)},
        "cold_cache_fill_s": {"wall": round(cold["cache_s"], 2), "cpu": round(cold["cache_cpu_s"], 2)},
        "speedup_incl_cold_cache_fill": {"cpu": round(med(plain_c) / (med(tr_c) + cold["cache_cpu_s"]), 2)},
        "cold_cache": cold["cache"],
        "warm_cache": warm_cache if args.rounds > 1 else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
