"""bench/noop_apply: first apply vs an unchanged second apply on 10,000 small images.

Targets (issue 2): the second apply under 1 second and at least 50x faster than the first.

    python bench/noop_apply/run.py [--images 10000] [--work bench/_work/noop_apply]

Both applies run the `runner` command in a subprocess, so the figures include Python start-up:
what a user waits for. The dataset is deterministic noise (96x96 JPEG, no faces), so the first
apply runs every stage the spec expands to (ingest, analysis, curation, ...) on 10,000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = """\
version: 1
character:
  name: bench
  trigger: bnchchr
dataset:
  sources:
    - images: ../images
report:
  gallery_limit: 60
"""


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    if existing == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, size=(96, 96, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=80)


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dt, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "_work" / "noop_apply")
    args = ap.parse_args()
    work = args.work.resolve()
    project = work / "project"
    (project / "specs").mkdir(parents=True, exist_ok=True)
    (project / "runner.toml").write_text("")
    t0 = time.perf_counter()
    make_images(project / "images", args.images)
    gen = time.perf_counter() - t0
    (project / "specs" / "bench.yaml").write_text(SPEC)
    for d in (project / ".runner", project / "reports"):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    cmd = [sys.executable, "-m", "runner.cli", "apply", "--quiet", "specs/bench.yaml"]
    first, out1 = timed(cmd, project)
    second, out2 = timed(cmd, project)
    third, _ = timed(cmd, project)
    noop = min(second, third)
    result = {
        "images": args.images,
        "first_apply_s": round(first, 2),
        "second_apply_s": round(second, 3),
        "third_apply_s": round(third, 3),
        "ratio_first_over_noop": round(first / noop, 1),
        "noop_under_1s": noop < 1.0,
        "ratio_at_least_50x": first / noop >= 50,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "dataset_generation_s": round(gen, 1),
        "first_apply_output": out1.strip().splitlines()[-3:],
        "second_apply_output": out2.strip().splitlines()[-2:],
    }
    print(json.dumps(result, indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
