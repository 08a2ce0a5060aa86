"""Video LoRA training step: the runner's ``train_video`` trainer against finetrainers (issue 16).

The peer is finetrainers (github a-r-r-o-w/finetrainers, formerly diffusers' own video training
project; ``train.py --model_name wan``), the one official LoRA trainer for Wan on diffusers
folders: diffusers' ``examples/`` has video LoRA scripts for CogVideoX only, and musubi-tuner
(kohya-ss) loads Wan's original checkpoints (``--dit`` / ``--vae`` / ``--t5`` files of the
Wan-AI repositories), not a diffusers folder, so it cannot take the same tiny model. finetrainers
runs UNMODIFIED from a copy outside the repository, beside the runner's
``runner.diffusion.video_trainer.VideoLoraTrainer`` (in a subprocess too), on the same tiny
random Wan 2.2 TI2V 5B folder (``builtin:tiny-wan22-ti2v``), the same clips (cut from
``../shared/data/video/carphone.mp4`` as tests/test_train_video.py cuts them), the same
resolution, frames, batch size, LoRA rank / alpha / target modules (the family's default list,
given to both), learning rate, seed, steps, fp32, one OMP thread per process. ``--family
ltx_video`` does the same on ``builtin:tiny-ltx`` (finetrainers ``--model_name ltx_video``) at
``--batch-size 1``: finetrainers' LTX path views the VAE's per-channel ``latents_mean`` as
``(batch_size, -1)`` and stops at batch 2 ("The size of tensor a (8) must match the size of
tensor b (4)"). Runs are
interleaved (every side once, then the next round in the opposite order) and repeated; ratios
are taken within a round and quoted with their range over the rounds.

What differs, and cannot be made the same with the peer unmodified:

- finetrainers' ``wan`` model trains text-to-video (every latent frame noised, one timestep per
  sample); the runner trains Wan 2.2 TI2V as its pipeline generates, the key frame's latent
  frame clean, per-token timesteps (``expand_timesteps``) and that frame out of the loss. The
  denoiser sees the same tokens; the per-token timestep embedding is the runner's extra work.
- LTX-Video: finetrainers noises the first latent frame less (sigma at most 0.25) in 10 % of its
  steps (unseeded ``random``) and scales RoPE for 25 fps; the runner keeps the key frame clean in every step,
  per-token timesteps, RoPE at 24 fps, as the image-to-video pipeline does.
- finetrainers' default (no ``--enable_precomputation``) is its in-memory path, which decodes
  the clip, T5-encodes the caption and VAE-encodes the clip at every step; its precomputation
  path calls ``torch.cuda.reset_peak_memory_stats(device)`` and stops on a CPU ("Expected a cuda
  device, but got: cpu"), so only the default runs here. The runner encodes once into its cache
  (outside the timed window). The ``bare`` sides (the family's loss + backward + AdamW on one
  batch kept in memory) show what the step alone costs.
- finetrainers cannot train on a CPU as shipped: the first line of its loop logs
  ``get_memory_statistics()``, which rounds None without CUDA or MPS. See ``PEER_SITE`` below:
  the one logging helper is wrapped at import, no file of finetrainers is changed.

Per run, measured from outside the child (``bench/train/official.py``'s ``measure``): steady
steps per wall second and per CPU second of the child, from the first quarter of the steps to the
last (each child prints a tqdm bar per step, ``TQDM_MININTERVAL=0``); wall and CPU time from exec
to exit; peak RSS (``wait4``). All figures are tiny random models on a shared 2-core CPU.

Setup of the peer (outside the repository; nothing of it is copied in). finetrainers' last
commit (f476c37, 2025-06-04) imports private ``torch.distributed`` names that torch 2.14 no
longer has (``_AttentionOp``) and ``torchvision.io.video_reader``, which torchvision 0.29 does
not have, so it runs on the torch of its time, in its own venv, with the project's other pins:

    git --git-dir=<finetrainers mirror> archive f476c3717da6cbfb1070505a99ee989426b46d9c \\
        | tar x -C /tmp/finetrainers && echo f476c3717da6cbfb1070505a99ee989426b46d9c > /tmp/finetrainers/COMMIT
    python3 -m venv /tmp/peers/venv27
    /tmp/peers/venv27/bin/pip install torch==2.7.1 torchvision==0.22.1 datasets==3.6.0 decord \\
        torchdata==0.11.0 wandb pandas psutil <the project's pins of diffusers, transformers, peft,
        accelerate, safetensors, tokenizers, huggingface_hub, numpy, pillow, av, tensorboard, ...>

Run (about 20 min for 3 rounds of 100 steps on the loaded 2-core machine; writes
``bench/_work/video_peer/results.json`` and prints the table):

    .venv/bin/python bench/video/train_peer.py [--runs 3] [--steps 100] [--resolution 64]
        [--frames 17] [--batch-size 2] [--rank 4] [--threads 1]
        [--sides official,runner,runner-peer,bare-main,bare-peer,base-main,base-peer]
        [--runner-src <a git-archive snapshot of the runner>]
        [--peer-python /tmp/peers/venv27/bin/python] [--finetrainers /tmp/finetrainers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "_work" / "video_peer"
CAPTION = "sks person, close up, moving naturally"
# the runner's family -> finetrainers' --model_name (both load the family's tiny diffusers folder)
PEER_MODEL = {"wan22_ti2v": "wan", "ltx_video": "ltx_video"}

sys.path.insert(0, str(REPO / "bench" / "train"))
import official  # noqa: E402  (the image benchmark's measuring code and tables, reused as they are)

# finetrainers' bar is "Training steps: ..."; the runner child's is "Steps: ..."
official.STEP_LINE = re.compile(r"^(?:Steps|Training steps):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
SIDES = official.SIDES  # official (here: finetrainers), runner, runner-peer, bare-*, base-*


# ---------------------------------------------------------------------------------------------
# data


def make_data(shared: Path, *, clips: int, frames: int, side: int) -> tuple[Path, Path]:
    """The clips of tests/test_train_video.py (``clips`` clips of ``frames`` frames of carphone.mp4
    at ``side`` px, H.264), as a video_clips-stage folder for the runner, and the same mp4 files
    (hard links) each beside a caption .txt, as finetrainers' VideoCaptionFilePairDataset reads them."""
    import av

    sys.path.insert(0, str(REPO / "tests"))
    from test_train_video import make_clips

    with av.open(str(shared / "video" / "carphone.mp4")) as src:
        have = sum(1 for _ in src.decode(video=0))
    if clips * frames > have:
        raise SystemExit(f"--clips {clips} x --frames {frames} needs {clips * frames} frames; carphone.mp4 has {have}")
    root = WORK / f"clips-{clips}x{frames}x{side}"
    if not (root / "clips.jsonl").is_file():
        make_clips(shared, root, n=clips, frames=frames, side=side)
    pairs = WORK / f"pairs-{clips}x{frames}x{side}"
    pairs.mkdir(parents=True, exist_ok=True)
    for line in (root / "clips.jsonl").read_text().splitlines():
        rec = json.loads(line)
        src = root / rec["clip"]
        dst = pairs / src.name
        if not dst.exists():
            os.link(src, dst)
        dst.with_suffix(".txt").write_text(rec["caption"])
    return root, pairs


def peer_dataset_config(pairs: Path, frames: int, side: int) -> Path:
    cfg = {"datasets": [{"data_root": str(pairs), "dataset_type": "video",
                         "video_resolution_buckets": [[frames, side, side]], "reshape_mode": "bicubic"}]}
    path = pairs.parent / f"{pairs.name}.training.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# the sides


def flow_shift(model: Path) -> float:
    """The shift of the model's own scheduler (Wan: flow_shift, LTX: shift), which the runner
    trains with; finetrainers is given the same (its default is 1)."""
    cfg = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    return float(cfg.get("flow_shift") or cfg.get("shift") or 1.0)


def peer_cmd(args, model: Path, dataset_config: Path, targets: list[str], out: Path) -> list[str]:
    """finetrainers' train.py as its README runs it, on one process (accelerate backend,
    WORLD_SIZE=1), fp32, no validation, no checkpoint before the end, no tracker."""
    cmd = [args.peer_python, str(Path(args.finetrainers) / "train.py"),
           "--parallel_backend", "accelerate", "--model_name", PEER_MODEL[args.family],
           "--pretrained_model_name_or_path", str(model), "--text_encoder_dtype", "fp32",
           "--transformer_dtype", "fp32", "--vae_dtype", "fp32", "--dataset_config", str(dataset_config),
           "--dataloader_num_workers", "0", "--flow_weighting_scheme", "logit_normal",
           "--flow_shift", str(flow_shift(model)),
           "--training_type", "lora", "--seed", "0", "--batch_size", str(args.batch_size),
           "--train_steps", str(args.steps), "--rank", str(args.rank), "--lora_alpha", str(args.rank),
           "--target_modules", *targets, "--checkpointing_steps", str(10 ** 9), "--optimizer", "adamw",
           "--lr", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--validation_steps", str(10 ** 9), "--output_dir", str(out), "--report_to", "none"]
    if args.peer_precompute:
        cmd += ["--enable_precomputation", "--precomputation_once", "--precomputation_items", str(args.clips)]
    return cmd


def run_runner_child(spec: dict[str, Any]) -> None:
    """In the child: VideoLoraTrainer on the clips, a bar per step on stderr, timings to work/."""
    from tqdm import tqdm

    from runner.diffusion.trainer import Callbacks
    from runner.diffusion.video_trainer import VideoLoraTrainer
    from runner.spec.variants import apply_variant

    work = Path(spec["work"])
    n = spec["steps"]
    section = {"base_model": spec["model"], "resolution": spec["resolution"], "buckets": {"enabled": False},
               "frame_buckets": [spec["frames"]], "images": {"use": False},
               "lora": {"rank": spec["rank"], "alpha": spec["rank"], "target_modules": spec["targets"]},
               "steps": n, "lr": 1e-4, "batch_size": spec["batch_size"], "mixed_precision": "no",
               "lr_scheduler": {"name": "constant"}, "gradient_checkpointing": False, "seed": 0,
               "checkpoints": {"every_steps": n, "validation_fraction": 0.0}}
    cfg = apply_variant(section, None, name="train_video")
    cfg.update({"character": "bench", "trigger": "sks", "class_word": "person", "variant": None, "device": "cpu"})

    class Bar(tqdm):
        def update(self, n: int = 1, **kw: Any) -> None:  # the trainer passes loss=..., lr=...
            if kw:
                self.set_postfix(kw, refresh=False)
            super().update(n)

    def bar(total: int, desc: str):
        return Bar(total=total, desc="Steps" if desc == "training" else desc)

    tr = VideoLoraTrainer(cfg, dataset_dir=None, clips_dirs=[Path(spec["clips"])], out_dir=work / "out",
                          scratch_dir=work / "scratch", cache_dir=work / "cache", device="cpu",
                          callbacks=Callbacks(progress=bar))
    index = tr.run()
    (work / "timings.json").write_text(json.dumps(index.get("timings", {})))


def _clip_pixels(clips: Path, n: int):
    """(n, 3, F, H, W) in [-1, 1]: the first n clips of the folder, decoded with PyAV."""
    import av
    import numpy as np
    import torch

    recs = [json.loads(ln) for ln in (clips / "clips.jsonl").read_text().splitlines() if ln.strip()]
    out = []
    for i in range(n):
        with av.open(str(clips / recs[i % len(recs)]["clip"])) as src:
            frames = [np.asarray(f.to_image().convert("RGB"), dtype=np.float32) for f in src.decode(video=0)]
        out.append(np.stack(frames) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out)).permute(0, 4, 1, 2, 3)


def run_bare_child(spec: dict[str, Any]) -> None:
    """In the child: the family's loss (``families.training_loss``: noise, the TI2V key frame,
    predict, MSE) + backward + AdamW on one batch of clips kept in memory: the limit for any
    trainer of this objective."""
    import torch

    from runner.diffusion import families
    from runner.diffusion.families import videokit

    fam = families.get(spec["family"])
    pipe = families.load_pipeline(fam, spec["model"])
    if fam.video.prepare is not None:
        fam.video.prepare(pipe)
    c = families.components_of(pipe, fam)
    videokit.select_experts(c, "both")
    families.add_lora(c, rank=spec["rank"], alpha=spec["rank"], targets=spec["targets"], seed=0)
    raw = fam.images_to_raw(pipe, _clip_pixels(Path(spec["clips"]), spec["batch_size"]))
    latents = fam.to_model_latents(pipe, raw["mean"])
    text = fam.collate(fam.encode_captions(pipe, [CAPTION] * spec["batch_size"]))
    c.denoiser.train()
    params = [p for p in c.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = families.training_loss(c, families.Batch(latents=latents, text=text, generator=gen)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    n = spec["bare_steps"]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"steps": n, "steps_per_s": n / wall, "cpu_steps_per_s": n / cpu, "torch": torch.__version__,
           "lora_params": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
           "latents": list(latents.shape)}
    Path(spec["work"], "bare.json").write_text(json.dumps(out))


# finetrainers' first line of training logs get_memory_statistics(), which rounds None on a
# machine with neither CUDA nor MPS (TypeError: type NoneType doesn't define __round__): it
# cannot train on a CPU as shipped. This sitecustomize, on the peer's PYTHONPATH only, wraps that
# one logging helper (a dict of None, as it means to report "not available") as the module is
# imported; no file of finetrainers is changed and nothing it times or trains runs differently.
PEER_SITE = """\
import importlib.machinery
import sys

TARGET = "finetrainers.utils.memory"
KEYS = ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved")


def _wrap(module):
    stats = module.get_memory_statistics

    def get_memory_statistics(precision=3):
        try:
            return stats(precision)
        except TypeError:  # no CUDA / MPS device: round(None)
            return dict.fromkeys(KEYS)

    module.get_memory_statistics = get_memory_statistics


class _Finder:
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
"""


def _peer_env(args) -> dict[str, str]:
    """The child env of every side, the sitecustomize above, and WORLD_SIZE=1 (what a launcher
    sets: finetrainers reads WORLD_SIZE, else torch.cuda.device_count(), which is 0 on a CPU)."""
    site = WORK / "peer_site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(PEER_SITE)
    env = official._env(args.threads, str(site))
    env.update({"WORLD_SIZE": "1", "WANDB_MODE": "disabled"})
    return env


def one_run(args, side: str, rnd: int, ctx: dict[str, Any]) -> official.RunResult:
    res = official.RunResult(side=side, family=args.family, round=rnd)
    work = WORK / "runs" / f"{args.family}-{side}-{rnd}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {"family": args.family, "model": str(ctx["model"]), "clips": str(ctx["clips"]), "targets": ctx["targets"],
            "resolution": args.resolution, "frames": args.frames, "batch_size": args.batch_size,
            "rank": args.rank, "steps": args.steps, "bare_steps": args.bare_steps, "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    if side == "official":
        cmd = peer_cmd(args, ctx["model"], ctx["dataset_config"], ctx["targets"], work / "out")
        env = _peer_env(args)
    else:
        py = args.peer_python if side.endswith("-peer") else sys.executable
        kind = side.split("-")[0]
        cmd = [py, "-c", official.BASE_IMPORTS] if kind == "base" else [
            py, str(Path(__file__).resolve()), "--child", kind, "--spec", str(work / "spec.json")]
        env = official._env(args.threads, args.runner_src)
    official.measure(cmd, env=env, log=work / "log.txt", total=args.steps, res=res)
    if kind_of(side) in ("official", "runner") and res.rc == 0 and res.steps_seen < args.steps:
        # finetrainers logs an exception and exits 0: a run that stopped short is a failure
        lines = [ln for ln in (work / "log.txt").read_text(errors="replace").splitlines() if "[ERROR]" in ln]
        res.rc, res.error = 1, (lines[0] if lines else f"stopped at step {res.steps_seen}")[-600:]
    if kind_of(side) == "bare" and res.rc == 0:
        bare = json.loads((work / "bare.json").read_text())
        res.steady_steps_per_s, res.steady_cpu_steps_per_s = bare["steps_per_s"], bare["cpu_steps_per_s"]
        res.extra = bare
    if kind_of(side) == "runner" and (work / "timings.json").is_file():
        res.extra = json.loads((work / "timings.json").read_text())
    return res


def kind_of(side: str) -> str:
    return side.split("-")[0]


# ---------------------------------------------------------------------------------------------


def medians(results: list[official.RunResult]) -> str:
    """Median and range over the rounds of each within-round ratio (official.RATIOS), steps per
    wall second and per CPU second of the child."""
    import statistics

    by = {(r.side, r.round): r for r in results if r.rc == 0}
    out = []
    for name, (a, b) in official.RATIOS.items():
        for attr, label in (("steady_cpu_steps_per_s", "per CPU s"), ("steady_steps_per_s", "per wall s")):
            vals = sorted(getattr(by[(a, k)], attr) / getattr(by[(b, k)], attr) for (s, k) in list(by)
                          if s == a and (b, k) in by and getattr(by[(a, k)], attr) and getattr(by[(b, k)], attr))
            if vals:
                out.append(f"{name} steps {label}: median {statistics.median(vals):.2f}x "
                           f"(range {vals[0]:.2f}-{vals[-1]:.2f}x, {len(vals)} rounds)")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["runner", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--family", choices=sorted(PEER_MODEL), default="wan22_ti2v",
                    help="the video family (finetrainers' --model_name: " + ", ".join(
                        f"{k} -> {v}" for k, v in PEER_MODEL.items()) + ")")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bare-steps", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every child (same for all sides)")
    ap.add_argument("--sides", default="official,runner,runner-peer,bare-main,bare-peer,base-main,base-peer",
                    help=f"which of {','.join(SIDES)} (official: finetrainers; -main: this python, -peer: "
                         "--peer-python; runner-peer: the runner on the peer's torch, a control)")
    ap.add_argument("--peer-precompute", action="store_true",
                    help="finetrainers with --enable_precomputation (needs a GPU: it calls torch.cuda)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", "/tmp/peers/venv27/bin/python"))
    ap.add_argument("--finetrainers", default=os.environ.get("FINETRAINERS_DIR", "/tmp/finetrainers"))
    ap.add_argument("--runner-src", default=str(REPO),
                    help="the runner source tree the runner and bare children import (default: this checkout; "
                         "a `git archive <commit>` snapshot keeps a shared, changing work tree out of the runs)")
    ap.add_argument("--out", default=str(WORK / "results.json"))
    ap.add_argument("--summarize", action="store_true", help="print the tables of --out (a finished run) and exit")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    sys.path.insert(0, args.runner_src)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        (run_runner_child if args.child == "runner" else run_bare_child)(spec)
        return
    if args.summarize:
        saved = json.loads(Path(args.out).read_text())
        results = [official.RunResult(**r) for r in saved["runs"]]
        print(json.dumps(saved["meta"]))
        print(official.summarize(results))
        print(medians(results))
        return
    from runner.diffusion import families

    fam = families.get(args.family)
    clips, pairs = make_data(REPO.parent / "shared" / "data", clips=args.clips, frames=args.frames,
                             side=args.resolution)
    ctx = {"model": families.tiny_path(f"builtin:{fam.tiny}"), "clips": clips, "targets": list(fam.lora_targets),
           "dataset_config": peer_dataset_config(pairs, args.frames, args.resolution)}
    results: list[official.RunResult] = []
    for rnd in range(args.runs):
        sides = [s for s in SIDES if s in args.sides.split(",")]
        for side in sides if rnd % 2 == 0 else sides[::-1]:
            r = one_run(args, side, rnd, ctx)
            results.append(r)
            print(f"round {rnd} {side:11s} rc={r.rc} steps/s={r.steady_steps_per_s} cpu-steps/s="
                  f"{r.steady_cpu_steps_per_s} wall={r.wall_s:.1f}s cpu={r.cpu_s:.1f}s rss={r.peak_rss_mib:.0f}MiB "
                  f"first={r.first_step_s} {r.error}", flush=True)
    git = subprocess.run(["git", "-C", args.runner_src, "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or args.runner_src
    meta = {"label": f"tiny random {fam.title} (builtin:{fam.tiny}) on a shared 2-core CPU", "family": args.family,
            "peer": "finetrainers", "peer_commit": official._peer_commit(str(Path(args.finetrainers) / "train.py")),
            "peer_precompute": args.peer_precompute, "runner_tree": git, "threads": args.threads,
            "steps": args.steps, "resolution": args.resolution, "frames": args.frames, "clips": args.clips,
            "batch_size": args.batch_size, "rank": args.rank, "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": [r.__dict__ for r in results]}, indent=1))
    print(json.dumps(meta))
    print(official.summarize(results))
    print(medians(results))


if __name__ == "__main__":
    main()
