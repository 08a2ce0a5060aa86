"""Train benchmark, part (a): the trainer vs a plain loop that encodes at every step (CPU).

Same data (the photos of ../shared/data/faces, stored at up to 512 px as a caption-stage
dataset), same tiny model, LoRA, batch size, steps and seed, in one run:

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
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def plain_loop(cfg: dict, dataset: Path, steps: int, device: str) -> float:
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
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = [examples[i] for i in rng.choice(len(examples), size=bs)]
        imgs = [load_bucketed(e.image, (res, res))[0] for e in batch]
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in imgs])).permute(0, 3, 1, 2)
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
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="builtin:tiny-sd")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin contention on shared cores)")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from runner.diffusion.trainer import LoraTrainer
    from runner.stages.train import train_config
    from train_helpers import make_dataset

    work = REPO / "bench" / "_work" / "train"
    shutil.rmtree(work, ignore_errors=True)
    dataset = make_dataset(REPO.parent / "shared" / "data", work / "dataset", max_side=512)
    cfg = train_config({
        "base_model": args.model, "resolution": 64, "buckets": {"enabled": False},
        "lora": {"rank": 4, "alpha": 4}, "steps": args.steps, "lr": 1e-4, "batch_size": args.batch_size,
        "mixed_precision": "no", "lr_scheduler": {"name": "constant"}, "min_snr_gamma": None,
        "checkpoints": {"every_steps": args.steps, "sample_prompts": [], "validation_fraction": 0.0},
    }, character="bench", trigger="sks", class_word="person")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # warm-up: build the tiny model and import everything outside the timed regions
    plain_loop(cfg, dataset, 2, device)

    plain_s = plain_loop(cfg, dataset, args.steps, device)
    runs = {}
    for name in ("cold", "warm"):
        tr = LoraTrainer(cfg, dataset_dir=dataset, out_dir=work / name / "out", scratch_dir=work / name / "scratch",
                         cache_dir=work / "cache", device=device)
        index = tr.run()
        runs[name] = {"train_s": index["timings"]["train_s"], "cache_s": index["timings"]["cache_s"],
                      "checkpoint_s": index["timings"].get("checkpoint_s", 0.0), "cache": index["cache"]}
    # steps/s of the training loop: checkpoint time (one LoRA save) taken out
    def sps(r: dict) -> float:
        return args.steps / max(1e-9, r["train_s"] - r["checkpoint_s"])

    result = {
        "model": args.model + (" (tiny random model)" if args.model.startswith("builtin:") else ""),
        "device": device, "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
        "images": 6, "resolution": 64,
        "plain_loop_steps_per_s": round(args.steps / plain_s, 2),
        "trainer_steps_per_s": round(sps(runs["warm"]), 2),
        "trainer_cold_cache_fill_s": round(runs["cold"]["cache_s"], 2),
        "trainer_cold_steps_per_s_incl_cache_fill": round(args.steps / (runs["cold"]["train_s"] - runs["cold"]["checkpoint_s"] + runs["cold"]["cache_s"]), 2),
        "speedup_loop": round(sps(runs["warm"]) / (args.steps / plain_s), 2),
        "speedup_incl_cold_cache": round((args.steps / (runs["cold"]["train_s"] - runs["cold"]["checkpoint_s"] + runs["cold"]["cache_s"])) / (args.steps / plain_s), 2),
        "warm_cache": runs["warm"]["cache"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
