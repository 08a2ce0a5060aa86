"""bench/scale/plan.py: `runner plan` time and peak memory as a spec grows to fleet size (issue 18).

    python bench/scale/plan.py [--videos 100,1000] [--images 0,10000] [--repeat 3] [--work DIR]

For each size, a fresh project: a spec whose dataset lists N video sources (hard links of one
short clip, so the files are real but cost no disk), or one image folder of N small JPEGs. The
first plan digests every file; the later ones (``--repeat``) find nothing changed. Each plan runs
`runner plan` in a subprocess (what a user waits for, Python start-up included) and reports wall
seconds, CPU seconds and the child's peak RSS. Sizes are interleaved across repetitions, so a
busy machine slows every size alike; quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "video" / "carphone.mp4"
HEAD = "version: 1\ncharacter:\n  name: rides\n  trigger: rdrs\ndataset:\n  sources:\n"
MEASURE = ("import resource, sys, time; from runner.cli import main; t = time.perf_counter(); sys.argv = "
           "['runner', 'plan', 'specs/bench.yaml']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
           "r = resource.getrusage(resource.RUSAGE_SELF)\n"
           "print('BENCH', time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss, file=sys.stderr)")


def make_videos(project: Path, n: int) -> None:
    videos = project / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dest = videos / f"ride_{i:06d}.mp4"
        if not dest.exists():
            os.link(CLIP, dest)
    lines = "".join(f"    - video: ../videos/ride_{i:06d}.mp4\n" for i in range(n))
    (project / "specs" / "bench.yaml").write_text(HEAD + lines)


def make_images(project: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder = project / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        dest = folder / f"img_{i:06d}.jpg"
        if not dest.exists():
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(dest, quality=70)
    (project / "specs" / "bench.yaml").write_text(HEAD + "    - images: ../images\n")


def plan_once(project: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURE], cwd=project, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("BENCH")), None)
    if r.returncode != 0 or line is None:
        sys.exit(f"runner plan failed in {project}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    _, inner, cpu, rss_kib = line.split()
    return {"wall_s": wall, "in_process_s": float(inner), "cpu_s": float(cpu), "peak_rss_mib": int(rss_kib) / 1024}


def summary(runs: list[dict[str, float]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                    "max": round(max(values), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", default="100,1000", help="comma-separated numbers of video sources ('' for none)")
    ap.add_argument("--images", default="", help="comma-separated numbers of images in one folder")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "_work" / "scale_plan")
    args = ap.parse_args()
    cases = [("videos", int(n)) for n in args.videos.split(",") if n] + \
            [("images", int(n)) for n in args.images.split(",") if n]
    projects = {}
    for what, n in cases:
        project = args.work.resolve() / f"{what}_{n}"
        (project / "specs").mkdir(parents=True, exist_ok=True)
        (project / "runner.toml").write_text("")
        (make_videos if what == "videos" else make_images)(project, n)
        for state in (project / ".runner",):
            if state.exists():
                import shutil

                shutil.rmtree(state)
        projects[(what, n)] = project
    first = {case: plan_once(p) for case, p in projects.items()}
    later: dict[tuple[str, int], list[dict[str, float]]] = {case: [] for case in projects}
    for _ in range(args.repeat):  # interleaved: every size once per round
        for case, p in projects.items():
            later[case].append(plan_once(p))
    result = {"machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d")},
              "cases": [{"what": what, "n": n, "first_plan": {k: round(v, 3) for k, v in first[(what, n)].items()},
                         "unchanged_plan": summary(later[(what, n)])} for what, n in projects]}
    print(json.dumps(result, indent=2))
    (args.work / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if not CLIP.is_file():
        sys.exit(f"{CLIP} not found (../shared/data, see its README)")
    main()
