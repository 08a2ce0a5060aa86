"""Train benchmark, part (c): the runner's trainer against diffusers' official example scripts.

For each family with an official DreamBooth LoRA script in diffusers' ``examples/dreambooth``
(SD 1.5 ``train_dreambooth_lora.py``, ``train_dreambooth_lora_sdxl.py``, ``..._flux.py``,
``..._flux2.py``, ``..._flux2_klein.py``, ``..._qwen_image.py``, ``..._z_image.py``), the
script is run UNMODIFIED as a subprocess beside the runner's trainer
(``runner.diffusion.trainer.LoraTrainer``, driven as ``bench/train/run.py`` drives it, in a
subprocess too), on the same tiny random model (``builtin:tiny-<family>``; its folder is passed
to both), the same photos, resolution, batch size, LoRA rank/alpha/target modules, learning
rate, seed and steps. Runs are interleaved (peer, runner, bare step, ... then the next round in
the opposite order) and repeated; every figure is quoted as a range over the runs.

Per run, measured by this driver from outside the process:

- steady-state steps/s: each child prints a tqdm bar per step (``TQDM_MININTERVAL=0``); the
  driver timestamps the step counter as it reads it and takes the rate from the first quarter of
  the steps to the last (start-up, caches and the final save are outside that window);
- wall time from ``exec`` to exit (Python start-up, imports, model load, caches, the loop, the
  final save; the official scripts also reload the pipeline and load the LoRA into it at the
  end, which is what they do);
- CPU time (user + system) of the child, and its peak RSS (``wait4``'s ``ru_maxrss``: the
  largest resident set of the child and anything it waited for). On CPU, RSS is the memory
  figure; there is no GPU here.

And the bare step: the family's denoiser forward + backward + AdamW step on one batch already in
memory (latents and text embeddings computed once; ``runner.diffusion.families.training_loss``,
which is the family's ``predict`` plus the noise and the MSE), with the same LoRA: the limit for
any trainer on the machine. It is timed in both virtual environments, since the peer runs on a
different torch build (see below).

All figures are from tiny random models on a shared 2-core CPU: they time code paths and
per-step overhead, not real SD / Flux / Qwen-Image models.

Setup of the peers (outside the repository; nothing of them is copied in):

    # diffusers' examples at the commit recorded in /work/peers/diffusers-examples/COMMIT
    # (the installed diffusers 0.42.1's sdist ships no examples/; the newest stored snapshot of
    # huggingface/diffusers main is 58eb52c0803ea9af3abec60841c2a093bdf1f951, 0.40.0.dev0,
    # whose scripts require diffusers >= 0.40.0.dev0):
    git -C <diffusers clone> archive 58eb52c0803ea9af3abec60841c2a093bdf1f951 examples/dreambooth \
        | tar x -C /work/peers/diffusers-examples
    # their own venv: PyPI's torchvision does not import beside the project's CPU torch 2.13
    python3 -m venv /work/peers/venv
    /work/peers/venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # from local disk here
    grep -vE '^(torch|torchvision)==' constraints.txt > /work/peers/constraints-peer.txt
    /work/peers/venv/bin/pip install -c /work/peers/constraints-peer.txt diffusers==0.42.1 \
        transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 sentencepiece tensorboard Jinja2 psutil

The scripts run with plain ``python`` (one process; ``accelerate launch`` with one CPU process
only adds a launcher process around the same script) and ``--mixed_precision no``; their
defaults otherwise (``--report_to tensorboard``, no validation prompt, no latent or text cache
unless a script does it by default).

    .venv/bin/python bench/train/official.py [--families sd15,sdxl,flux1,flux2,flux2_klein,qwen_image]
        [--runs 3] [--steps 60] [--resolution 64] [--batch-size 2] [--rank 4] [--threads 1]
        [--sides official,runner,runner-peer,bare-main,bare-peer,base-main,base-peer]
        [--runner-src <a git-archive snapshot of the runner>]
        [--peer-python /work/peers/venv/bin/python]
        [--examples /work/peers/diffusers-examples/examples/dreambooth]
    # z_image at --batch-size 1 (its script's prompt list doubles per step at batch > 1, see PEERS)

The figures of the last run and what each script needed are in bench/README.md, train (c).

Writes ``bench/_work/official/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "_work" / "official"
PROMPT = "a photo of sks person"
STEP_LINE = re.compile(r"^(?:Steps|training):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass(frozen=True)
class Peer:
    """An official script and what it trains by default (its LoRA target modules, as data: the
    runner is given the same ones)."""

    script: str
    targets: tuple[str, ...]
    alpha_flag: bool = True  # the script takes --lora_alpha (the SD ones use alpha = rank)
    seq_flag: bool = True  # the script takes --max_sequence_length
    extra: tuple[str, ...] = ()
    fixup: str = ""  # a key of FIXUPS: what the script needs in the model folder that the tiny one lacks


# What an official script needs in the model folder that the tiny model lacks, added to a copy
# (hard links, except the files it rewrites) by the peer's own python; the weights are the same.
# pixtral_processor: train_dreambooth_lora_flux2.py loads tokenizer/ as a transformers
# PixtralProcessor (tokenizer + image processor, as the FLUX.2-dev repository ships it, with
# model_index.json naming PixtralProcessor), while builtin:tiny-flux2 saves a plain tokenizer
# there: without it the script stops with "Can't load image processor ...
# preprocessor_config.json". The processor wraps the same tokenizer; its image part is unused.
FIXUPS = {"pixtral_processor": (("tokenizer", "model_index.json"), """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer, PixtralImageProcessor, PixtralProcessor
root = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(root / "tokenizer")
PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok,
                 chat_template=tok.chat_template).save_pretrained(root / "tokenizer")
index = json.loads((root / "model_index.json").read_text())
index["tokenizer"] = ["transformers", "PixtralProcessor"]
(root / "model_index.json").write_text(json.dumps(index, indent=2))
""")}


_ATTN = ("to_k", "to_q", "to_v", "to_out.0")
PEERS: dict[str, Peer] = {
    "sd15": Peer("train_dreambooth_lora.py", (*_ATTN, "add_k_proj", "add_v_proj"), alpha_flag=False,
                 seq_flag=False),
    "sdxl": Peer("train_dreambooth_lora_sdxl.py", _ATTN, alpha_flag=False, seq_flag=False),
    "flux1": Peer("train_dreambooth_lora_flux.py",
                  tuple(f"attn.{m}" for m in (*_ATTN, "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"))
                  + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
    "flux2": Peer("train_dreambooth_lora_flux2.py",
                  (*_ATTN, "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48))),
                  fixup="pixtral_processor"),
    # the klein script's --text_encoder_out_layers default is 10 20 30 (dev's), which a 28-layer
    # text encoder does not have; Flux2KleinPipeline (and the runner) take layers 9 18 27
    "flux2_klein": Peer("train_dreambooth_lora_flux2_klein.py",
                        (*_ATTN, "to_qkv_mlp_proj",
                         *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24))),
                        extra=("--text_encoder_out_layers", "9", "18", "27")),
    "qwen_image": Peer("train_dreambooth_lora_qwen_image.py", _ATTN),
    # With one instance prompt and --train_batch_size > 1 this script doubles its list of prompt
    # embeddings at every step (`prompt_embeds = [pe for pe in prompt_embeds for _ in range(n)]`
    # reassigns the list it reads): steps slow from step ~20 and the process passed 22 GiB RSS
    # by step 30 (killed). Run it with --batch-size 1.
    "z_image": Peer("train_dreambooth_lora_z_image.py", _ATTN),
}


@dataclass
class RunResult:
    side: str
    family: str
    round: int
    rc: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    first_step_s: float | None = None  # exec -> first step seen
    steady_steps_per_s: float | None = None  # wall clock
    steady_cpu_steps_per_s: float | None = None  # per CPU second of the child (load-independent)
    steps_seen: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# measuring a child process


def _env(threads: int, pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def steady_rate(stamps: list[tuple[float, int, float]], total: int) -> tuple[float | None, float | None]:
    """(steps per wall second, steps per CPU second) between the first stamp at or past a
    quarter of the steps and the last one. A stamp is (wall s, step, child CPU s)."""
    k0 = max(1, total // 4)
    first = next((s for s in stamps if s[1] >= k0), None)
    if first is None or stamps[-1][1] <= first[1] or stamps[-1][0] <= first[0]:
        return None, None
    t1, k1, c1 = stamps[-1]
    cpu = (k1 - first[1]) / (c1 - first[2]) if c1 > first[2] else None
    return (k1 - first[1]) / (t1 - first[0]), cpu


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc (clock-tick resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


MAX_RSS_GIB = 8.0  # a child over this is killed (the machine is shared; see z_image above)


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def _watch(proc: subprocess.Popen, res: RunResult) -> None:
    while proc.returncode is None:
        if _rss_gib(proc.pid) > MAX_RSS_GIB:
            res.error = f"killed by the driver: RSS over {MAX_RSS_GIB:g} GiB"
            proc.kill()
            return
        time.sleep(0.5)


def measure(cmd: list[str], *, env: dict[str, str], log: Path, total: int, res: RunResult) -> RunResult:
    """Run ``cmd``; fill wall / CPU / peak RSS / step timestamps into ``res``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stamps: list[tuple[float, int, float]] = []
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, cwd=str(log.parent))

        def read() -> None:
            buf = b""
            while True:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                now = time.perf_counter()
                out.write(chunk)
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for line in parts:
                    m = STEP_LINE.match(line.decode("utf-8", "replace"))
                    if m and int(m.group(1)) > (stamps[-1][1] if stamps else 0):
                        stamps.append((now - t0, int(m.group(1)), _cpu_of(proc.pid)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        threading.Thread(target=_watch, args=(proc, res), daemon=True).start()
        _, status, ru = os.wait4(proc.pid, 0)
        res.wall_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(5)
    res.rc = proc.returncode
    res.cpu_s = ru.ru_utime + ru.ru_stime
    res.peak_rss_mib = ru.ru_maxrss / 1024
    res.steps_seen = stamps[-1][1] if stamps else 0
    res.first_step_s = stamps[0][0] if stamps else None
    res.steady_steps_per_s, res.steady_cpu_steps_per_s = steady_rate(stamps, total)
    if res.rc != 0:
        tail = log.read_bytes()[-4000:].decode("utf-8", "replace")
        lines = [ln for ln in re.split(r"[\r\n]", tail) if ln.strip()]
        res.error = (res.error + " " + " | ".join(lines[-3:])[-600:]).strip()
    return res


# ---------------------------------------------------------------------------------------------
# the three sides


def peer_cmd(args, fam, peer: Peer, model: Path, instance: Path, out: Path) -> list[str]:
    cmd = [args.peer_python, str(Path(args.examples) / peer.script),
           "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance),
           "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(args.resolution),
           "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps),
           "--rank", str(args.rank), "--learning_rate", "1e-4", "--lr_scheduler", "constant",
           "--lr_warmup_steps", "0", "--seed", "0", "--mixed_precision", "no",
           "--checkpointing_steps", str(10 ** 9)]
    if peer.alpha_flag:
        cmd += ["--lora_alpha", str(args.rank)]
    if peer.seq_flag:
        cmd += ["--max_sequence_length", str(fam.text.max_tokens)]
    return cmd + list(peer.extra)


def child_spec(args, family: str, model: Path, dataset: Path, targets: list[str], work: Path) -> dict[str, Any]:
    return {"family": family, "model": str(model), "dataset": str(dataset), "targets": targets,
            "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
            "steps": args.steps, "bare_steps": args.bare_steps, "work": str(work), "prompt": PROMPT}


def run_runner_child(spec: dict[str, Any]) -> None:
    """In the child: LoraTrainer on the spec, bar per step on stderr, timings to work/timings.json."""
    from tqdm import tqdm

    from runner.diffusion.trainer import Callbacks, LoraTrainer
    from runner.stages.train import train_config

    work = Path(spec["work"])
    n = spec["steps"]
    cfg = train_config({
        "base_model": spec["model"], "resolution": spec["resolution"], "buckets": {"enabled": False},
        "lora": {"rank": spec["rank"], "alpha": spec["rank"], "target_modules": spec["targets"]},
        "steps": n, "lr": 1e-4, "batch_size": spec["batch_size"], "mixed_precision": "no",
        "lr_scheduler": {"name": "constant"}, "min_snr_gamma": None, "seed": 0,
        "checkpoints": {"every_steps": n, "sample_prompts": [], "validation_fraction": 0.0},
    }, character="bench", trigger="sks", class_word="person")

    class Bar(tqdm):
        def update(self, n: int = 1, **kw: Any) -> None:  # the trainer passes loss=..., lr=...
            if kw:
                self.set_postfix(kw, refresh=False)
            super().update(n)

    def bar(total: int, desc: str):
        return Bar(total=total, desc="Steps" if desc == "training" else desc)

    tr = LoraTrainer(cfg, dataset_dir=Path(spec["dataset"]), out_dir=work / "out", scratch_dir=work / "scratch",
                     cache_dir=work / "cache", device="cpu", callbacks=Callbacks(progress=bar))
    index = tr.run()
    (work / "timings.json").write_text(json.dumps(index.get("timings", {})))


def _pixels(dataset: Path, n: int, res: int):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    images = sorted(dataset.glob("*.png"))
    out = []
    for i in range(n):
        with Image.open(images[i % len(images)]) as im:
            img = ImageOps.fit(im.convert("RGB"), (res, res), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def run_bare_child(spec: dict[str, Any]) -> None:
    """In the child: the family's loss + backward + AdamW on one batch kept in memory."""
    import torch

    from runner.diffusion import families

    fam = families.get(spec["family"])
    pipe = families.load_pipeline(fam, spec["model"])
    c = families.components_of(pipe, fam)
    families.add_lora(c, rank=spec["rank"], alpha=spec["rank"], targets=spec["targets"], seed=0)
    raw = fam.images_to_raw(pipe, _pixels(Path(spec["dataset"]), spec["batch_size"], spec["resolution"]))
    latents = fam.to_model_latents(pipe, raw["mean"])
    text = fam.collate(fam.encode_captions(pipe, [spec["prompt"]] * spec["batch_size"]))
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
           "lora_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}
    Path(spec["work"], "bare.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# setup


def make_data(shared: Path) -> tuple[Path, Path]:
    """The six photos of tests/train_helpers.py at up to 1024 px (as the demo's ingest keeps
    them): a caption-stage dataset for the runner, every caption the instance prompt, and the
    same PNG files (hard links) in a folder of images only, as the official scripts read them."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_helpers import make_dataset

    dataset = WORK / "dataset"
    if not (dataset / "dataset.jsonl").is_file():
        make_dataset(shared, dataset, max_side=1024)
        recs = [json.loads(ln) for ln in (dataset / "dataset.jsonl").read_text().splitlines() if ln.strip()]
        for r in recs:
            r["caption"] = PROMPT
            r["repeats"] = 1
            (dataset / f"{r['id']}.txt").write_text(PROMPT)
        (dataset / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    instance = WORK / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    for p in sorted(dataset.glob("*.png")):
        if not (instance / p.name).exists():
            os.link(p, instance / p.name)
    return dataset, instance


def peer_model(args, family: str, model: Path) -> Path:
    """The folder the official script gets: the tiny model itself, or a copy with its fix-up."""
    fixup = PEERS[family].fixup
    if not fixup:
        return model
    copied, code = FIXUPS[fixup]
    dest = WORK / "models" / f"{model.name}-{fixup}"
    if not (dest / "FIXUP_DONE").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(model, dest, copy_function=os.link, ignore=shutil.ignore_patterns(*copied))
        for name in copied:  # real copies: the fix-up rewrites them
            (shutil.copytree if (model / name).is_dir() else shutil.copy)(model / name, dest / name)
        subprocess.run([args.peer_python, "-c", code, str(dest)], check=True, env=_env(1))
        (dest / "FIXUP_DONE").write_text(fixup + "\n")
    return dest


def runner_targets(fam, model: Path, targets: tuple[str, ...]) -> list[str]:
    """The peer's targets that name a module of this (tiny) denoiser: peft on the peer side
    silently skips the rest (e.g. single_transformer_blocks.40 of a 2-block model); the runner
    refuses a target that matches nothing, so it gets the same set of modules without them."""
    import diffusers

    from runner.diffusion.families import unmatched_targets

    cls = getattr(diffusers, fam.components[fam.denoiser])
    with_meta = cls.from_pretrained(str(model), subfolder=fam.denoiser)
    missing = set(unmatched_targets(with_meta, list(targets)))
    return [t for t in targets if t not in missing]


# ---------------------------------------------------------------------------------------------
# summary


def _rng(vals: list[float], fmt: str = "{:.2f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


COLUMNS = ("steady steps/s (wall)", "steady steps per CPU s", "wall s", "CPU s", "peak RSS MiB", "first step s")


def _cells(rs: list[RunResult]) -> list[str]:
    kind = rs[0].side.split("-")[0]
    cells = [_rng([r.steady_steps_per_s for r in rs]), _rng([r.steady_cpu_steps_per_s for r in rs])]
    if kind == "bare":
        return cells + [""] * 4
    if kind == "base":
        return ["", "", _rng([r.wall_s for r in rs], "{:.1f}"), _rng([r.cpu_s for r in rs], "{:.1f}"),
                _rng([r.peak_rss_mib for r in rs], "{:.0f}"), ""]
    return cells + [_rng([r.wall_s for r in rs], "{:.1f}"), _rng([r.cpu_s for r in rs], "{:.1f}"),
                    _rng([r.peak_rss_mib for r in rs], "{:.0f}"), _rng([r.first_step_s for r in rs], "{:.1f}")]


def summarize(results: list[RunResult]) -> str:
    rows = ["| family | side | " + " | ".join(COLUMNS) + " | runs ok |", "| --- " * (len(COLUMNS) + 3) + "|"]
    for f in dict.fromkeys(r.family for r in results):
        for side in SIDES:
            rs = [r for r in results if r.family == f and r.side == side]
            ok = [r for r in rs if r.rc == 0]
            if rs:
                cells = _cells(ok) if ok else ["-"] * len(COLUMNS)
                rows.append(f"| {f} | {side} | " + " | ".join(cells) + f" | {len(ok)}/{len(rs)} |")
        for name, (a, b) in RATIOS.items():
            cells = _ratio_cells(results, f, a, b)
            if cells:
                rows.append(f"| {f} | {name} | " + " | ".join(cells) + " | |")
        excess = _excess(results, f)
        if excess:
            rows.append(f"| {f} | peak RSS over the venv's import baseline | | | | | {excess} | | |")
    return "\n".join(rows)


def _excess(results: list[RunResult], fam: str) -> str:
    """Peak RSS minus the same round's import baseline of the side's venv (the torch builds
    differ: the peer's CUDA build maps more library memory before any model is loaded)."""
    by = {(r.side, r.round): r for r in results if r.family == fam and r.rc == 0}
    out = []
    for side, base in (("runner", "base-main"), ("official", "base-peer"), ("runner-peer", "base-peer")):
        vals = [by[(side, k)].peak_rss_mib - by[(base, k)].peak_rss_mib for (s, k) in list(by)
                if s == side and (base, k) in by]
        if vals:
            out.append(f"{side} {_rng(vals, '{:.0f}')}")
    return ", ".join(out)


# ratio rows: name -> (numerator side, denominator side); per round (the runs next to each other)
RATIOS = {"runner / official": ("runner", "official"), "runner-peer / official": ("runner-peer", "official"),
          "runner / bare-main": ("runner", "bare-main"), "runner-peer / bare-peer": ("runner-peer", "bare-peer"),
          "official / bare-peer": ("official", "bare-peer")}


def _ratio_cells(results: list[RunResult], fam: str, a: str, b: str) -> list[str] | None:
    by = {(r.side, r.round): r for r in results if r.family == fam and r.rc == 0}
    pairs = [(by[(a, k)], by[(b, k)]) for (s, k) in list(by) if s == a and (b, k) in by]
    if not pairs:
        return None

    def ratio(attr: str) -> str:
        vals = [getattr(x, attr) / getattr(y, attr) for x, y in pairs if getattr(x, attr) and getattr(y, attr)]
        return _rng(vals) + "x" if vals else ""

    cells = [ratio("steady_steps_per_s"), ratio("steady_cpu_steps_per_s")]
    if b.startswith("bare"):
        return cells + [""] * 4
    return cells + [ratio("wall_s"), ratio("cpu_s"), ratio("peak_rss_mib"), ratio("first_step_s")]


# ---------------------------------------------------------------------------------------------


SIDES = ("official", "runner", "runner-peer", "bare-main", "bare-peer", "base-main", "base-peer")
# the import baseline: what the libraries alone hold (the same imports in both venvs)
BASE_IMPORTS = "import torch, diffusers, transformers, peft, accelerate; print('Steps: 100%|x| 1/1')"


def _sides(args, rnd: int) -> list[str]:
    sides = [s for s in SIDES if s in args.sides.split(",")]
    return sides if rnd % 2 == 0 else sides[::-1]


def one_run(args, side: str, family: str, rnd: int, ctx: dict[str, Any]) -> RunResult:
    from runner.diffusion import families

    fam = families.get(family)
    res = RunResult(side=side, family=family, round=rnd)
    work = WORK / "runs" / f"{family}-{side}-{rnd}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = child_spec(args, family, ctx["model"], ctx["dataset"], ctx["targets"], work)
    (work / "spec.json").write_text(json.dumps(spec))
    me = str(Path(__file__).resolve())
    if side == "official":
        cmd = peer_cmd(args, fam, PEERS[family], ctx["peer_model"], ctx["instance"], work / "out")
        env = _env(args.threads)
    else:
        py = args.peer_python if side.endswith("-peer") else sys.executable
        kind = side.split("-")[0]
        cmd = [py, "-c", BASE_IMPORTS] if kind == "base" else [py, me, "--child", kind, "--spec",
                                                                 str(work / "spec.json")]
        env = _env(args.threads, args.runner_src)
    measure(cmd, env=env, log=work / "log.txt", total=args.steps, res=res)
    if side.startswith("bare") and res.rc == 0:
        bare = json.loads((work / "bare.json").read_text())
        res.steady_steps_per_s, res.steady_cpu_steps_per_s = bare["steps_per_s"], bare["cpu_steps_per_s"]
        res.extra = bare
    if side.startswith("runner") and (work / "timings.json").is_file():
        res.extra = json.loads((work / "timings.json").read_text())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["runner", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bare-steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every child (same for all sides)")
    ap.add_argument("--sides", default="official,runner,bare-main,bare-peer,base-main,base-peer",
                    help=f"which of {','.join(SIDES)} to run (-main: this python, -peer: --peer-python; runner-peer: "
                         "the runner on the peer's torch build, a control)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", "/work/peers/venv/bin/python"))
    ap.add_argument("--examples", default=os.environ.get(
        "DIFFUSERS_EXAMPLES", "/work/peers/diffusers-examples/examples/dreambooth"))
    ap.add_argument("--runner-src", default=str(REPO),
                    help="the runner source tree the runner and bare children import (default: this checkout; "
                         "a `git archive <commit>` snapshot keeps a shared, changing work tree out of the runs)")
    ap.add_argument("--out", default=str(WORK / "results.json"))
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.runner_src)
        spec = json.loads(Path(args.spec).read_text())
        (run_runner_child if args.child == "runner" else run_bare_child)(spec)
        return
    sys.path.insert(0, args.runner_src)
    from runner.diffusion import families

    dataset, instance = make_data(REPO.parent / "shared" / "data")
    ctx_by: dict[str, dict[str, Any]] = {}
    for f in args.families.split(","):
        fam = families.get(f)
        model = families.tiny_path(f"builtin:{fam.tiny}")
        ctx_by[f] = {"model": model, "peer_model": peer_model(args, f, model), "dataset": dataset,
                     "instance": instance, "targets": runner_targets(fam, model, PEERS[f].targets)}
    results: list[RunResult] = []
    for rnd in range(args.runs):
        for f in ctx_by:
            for side in _sides(args, rnd):
                r = one_run(args, side, f, rnd, ctx_by[f])
                results.append(r)
                print(f"round {rnd} {f:12s} {side:9s} rc={r.rc} steps/s={r.steady_steps_per_s} "
                      f"wall={r.wall_s:.1f}s cpu={r.cpu_s:.1f}s rss={r.peak_rss_mib:.0f}MiB "
                      f"first={r.first_step_s} {r.error}", flush=True)
    git = subprocess.run(["git", "-C", args.runner_src, "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip() or args.runner_src  # a snapshot: git archive <commit>
    meta = {"label": "tiny random models (builtin:tiny-<family>) on a shared 2-core CPU",
            "runner_tree": git, "peer_commit": _peer_commit(args.examples), "threads": args.threads,
            "steps": args.steps, "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": [r.__dict__ for r in results]}, indent=1))
    print(json.dumps(meta))
    print(summarize(results))


def _peer_commit(examples: str) -> str:
    for p in Path(examples).resolve().parents:
        if (p / "COMMIT").is_file():
            return (p / "COMMIT").read_text().strip()
    return "unknown"


if __name__ == "__main__":
    main()
