"""Benchmark the analyze stage on CPU with the dlib backend.

1. Speed: the same K images analyzed with 1 worker process and with N workers (default: every
   core), images per second for each and the ratio.
2. Memory: all M images (default 2,000) analyzed with N workers while a sampler thread reads the
   resident memory of this process and its worker processes (/proc); the peak over the first and
   the last 10% of the images shows whether memory stays flat.

The M images are made from the real photos in ../shared/data/faces (random crop, mirror,
brightness, longest side --side px), written under bench/_work/analyze/ (ignored by git).

    .venv/bin/python bench/analyze/run.py [--images 2000] [--speed-images 200] [--side 640] [--workers 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_images(dest: Path, n: int, side: int, seed: int = 0) -> Path:
    """n augmented copies of the shared face photos as an `images` artifact (manifest.jsonl)."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    marker = dest / f".done-{n}-{side}-{seed}"
    if marker.exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    faces = REPO.parent / "shared" / "data" / "faces"
    photos = sorted(p for p in faces.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    rng = np.random.default_rng(seed)
    sources = []
    for p in photos:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side * 2, side * 2))
            sources.append((p, im.copy()))
    with (dest / "manifest.jsonl").open("w") as fh:
        for i in range(n):
            p, im = sources[i % len(sources)]
            w, h = im.size
            f = rng.uniform(0.75, 1.0)
            cw, ch = int(w * f), int(h * f)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = im.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                out = ImageOps.mirror(out)
            out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
            out.thumbnail((side, side))
            rid = hashlib.sha256(f"{p.name}:{i}".encode()).hexdigest()[:16]
            out.save(dest / "images" / f"{rid}.png", compress_level=1)
            fh.write(json.dumps({"id": rid, "file": f"images/{rid}.png", "source": f"{p.parent.name}/{p.name}#{i}",
                                 "label": "", "width": out.size[0], "height": out.size[1]}) + "\n")
    marker.touch()
    return dest


def subset(src: Path, dest: Path, k: int) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    os.symlink(src / "images", dest / "images")
    lines = (src / "manifest.jsonl").read_text().splitlines()[:k]
    (dest / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (Linux /proc)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1024.0


class Sampler:
    """Samples (images done, tree RSS) while the stage runs."""

    def __init__(self) -> None:
        self.done = 0
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def progress(self, stage_id, desc, completed, total):  # Reporter protocol
        self.done = completed

    def log(self, stage_id, level, message):
        pass

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append((self.done, tree_rss_mb(os.getpid())))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_analyze(images: Path, workers: int, work: Path, reporter=None) -> tuple[float, int, float]:
    """(wall seconds, images, CPU seconds of this process and its finished workers)."""
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.stages import analyze

    shutil.rmtree(work, ignore_errors=True)
    ctx = LocalStageContext(stage_id="bench:analyze", character="bench", out_dir=work / "out", scratch_dir=work / "s",
                            cache_dir=work / "c", project_root=work, reporter=reporter)
    cfg = {"name": "dlib", "dlib_detector": "hog", "upsample": 1, "insightface_pack": "buffalo_l",
           "insightface_root": "~/.insightface", "max_side": 1600, "workers": workers, "references": []}
    c0 = os.times()
    t0 = time.perf_counter()
    out = analyze.run(cfg, {"images": contract.Artifact("images", images)}, ctx)
    dt = time.perf_counter() - t0
    c1 = os.times()
    cpu = ((c1.user - c0.user) + (c1.system - c0.system)
           + (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system))
    n = sum(1 for _ in open(out["analysis"].path / "records.jsonl"))
    return dt, n, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images for the memory run")
    ap.add_argument("--speed-images", type=int, default=200, help="images for the 1-vs-N-worker speed runs")
    ap.add_argument("--side", type=int, default=640, help="longest side of the generated images")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    ap.add_argument("--skip-memory", action="store_true", help="only the 1-vs-N-worker speed runs")
    args = ap.parse_args()

    from runner.vision.analysis import default_workers

    workers = default_workers(args.workers)
    work = REPO / "bench" / "_work" / "analyze"
    t = time.perf_counter()
    full = make_images(work / "images_all", args.images, args.side)
    print(f"dataset: {args.images} images, longest side {args.side}px ({time.perf_counter() - t:.0f} s to make)")

    small = subset(full, work / "images_speed", args.speed_images)
    # N workers first, then 1: neither run gets a warmer page cache than the other.
    dtn, nn, cpun = run_analyze(small, workers, work / "runN")
    dt1, n1, cpu1 = run_analyze(small, 1, work / "run1")
    load = os.getloadavg()[0]
    # "cores used" = CPU seconds / wall seconds: what the scheduler actually gave the run. On a
    # shared machine (sched autogroup: one share per session) it stays near the same value
    # whatever the worker count, and then only the CPU cost per image is comparable.
    print(f"speed, {n1} images: 1 worker {n1 / dt1:.2f} images/s "
          f"({cpu1 / n1:.3f} CPU-s/image, {cpu1 / dt1:.2f} cores used); "
          f"{workers} workers {nn / dtn:.2f} images/s ({cpun / nn:.3f} CPU-s/image, {cpun / dtn:.2f} cores used); "
          f"wall ratio {dt1 / dtn:.2f}x (1-min load average at the end: {load:.1f} on {os.cpu_count()} cores)")
    speed = {"speed_images": n1, "images_per_s_1_worker": round(n1 / dt1, 3),
             "images_per_s_n_workers": round(nn / dtn, 3),
             "speedup": round(dt1 / dtn, 3), "cpu_s_per_image_1_worker": round(cpu1 / n1, 4),
             "cpu_s_per_image_n_workers": round(cpun / nn, 4), "cores_used_1_worker": round(cpu1 / dt1, 3),
             "cores_used_n_workers": round(cpun / dtn, 3), "load_average_1min": round(load, 2)}
    if args.skip_memory:
        (work / "result_speed.json").write_text(json.dumps(speed, indent=1))
        return

    with Sampler() as sampler:
        dtm, nm, cpum = run_analyze(full, workers, work / "runM", reporter=sampler)
    tenth = max(1, nm // 10)
    early = [r for d, r in sampler.samples if 0 < d <= tenth]
    late = [r for d, r in sampler.samples if d >= nm - tenth]
    peak = max(r for _, r in sampler.samples)
    result = {
        "images": nm, "side": args.side, "workers": workers, "cores": os.cpu_count(),
        **speed, "memory_run_s": round(dtm, 1), "memory_run_images_per_s": round(nm / dtm, 3),
        "memory_run_cores_used": round(cpum / dtm, 3),
        "rss_peak_mb": round(peak, 1), "rss_peak_first_10pct_mb": round(max(early), 1) if early else None,
        "rss_peak_last_10pct_mb": round(max(late), 1) if late else None,
        "samples": [(d, round(r, 1)) for d, r in sampler.samples[:: max(1, len(sampler.samples) // 40)]],
    }
    print(f"memory, {nm} images with {workers} workers: {dtm:.0f} s ({nm / dtm:.2f} images/s); "
          f"peak RSS (parent + workers) {peak:.0f} MiB; first 10% {result['rss_peak_first_10pct_mb']} MiB, "
          f"last 10% {result['rss_peak_last_10pct_mb']} MiB")
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {work / 'result.json'}")


if __name__ == "__main__":
    main()
