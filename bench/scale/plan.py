"""bench/scale/plan.py: `runner plan` time and peak memory as a spec grows to fleet size (issue 18).

    python bench/scale/plan.py [--videos 100,1000] [--folder 1000,10000] [--images 0,10000]
                               [--repeat 3] [--cached] [--before DIR] [--work DIR]

For each size, a fresh project: a spec whose dataset lists N video sources (``--videos``), one
video source naming a folder of N videos (``--folder``: a ride day), or one image folder of N
small JPEGs (``--images``); the videos are hard links of one short clip, so the files are real
but cost no disk. The first plan digests every file; the later ones (``--repeat``) find nothing
changed. With ``--cached`` every stage of the first plan is then recorded as run (an empty output
folder promoted into the store under its key and made the stage's current key, which is all a
plan reads of an earlier run), so the later plans are the no-op plan a user sees the morning after,
every stage ``cached``, and a no-op ``runner apply`` is timed too. With ``--before DIR`` (a
checkout of an older commit, e.g. ``git worktree add /tmp/before <commit>``) every case is also
planned by that code, in a project of its own, interleaved with today's. Each command runs in a
subprocess (what a user waits for, Python start-up included) and reports wall seconds, CPU seconds
and the child's peak RSS. Sizes are interleaved across repetitions, so a busy machine slows every
size alike; quote the ratios.
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
           "['runner', sys.argv[1], 'specs/bench.yaml']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
           "r = resource.getrusage(resource.RUSAGE_SELF)\n"
           "print('BENCH', time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss, file=sys.stderr)")


# Bytecode as an installed package has it: pip compiles a wheel's modules at install time, but this
# machine sets PYTHONDONTWRITEBYTECODE, which would add ~0.5 s of compiling to every command.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def make_videos(project: Path, n: int) -> None:
    videos = project / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dest = videos / f"ride_{i:06d}.mp4"
        if not dest.exists():
            os.link(CLIP, dest)
    lines = "".join(f"    - video: ../videos/ride_{i:06d}.mp4\n" for i in range(n))
    (project / "specs" / "bench.yaml").write_text(HEAD + lines)


def make_folder(project: Path, n: int) -> None:
    """One video source naming a folder of ``n`` ride videos (one video_identity stage each)."""
    videos = project / "rides"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dest = videos / f"guest_{i:06d}.mp4"
        if not dest.exists():
            os.link(CLIP, dest)
    (project / "specs" / "bench.yaml").write_text(HEAD + "    - video: ../rides/\n")


def plant_cached(project: Path) -> int:
    """Record every stage of the project's plan as run: an empty output folder per promised output
    promoted into the store under the stage's key, and the key made the stage's current one. The
    plan reads nothing else of an earlier run, so the next plan is the no-op plan at this size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from runner.engine.executor import plan_specs
    from runner.spec import load_specs
    from runner.stages import registry

    plan, ws = plan_specs(load_specs([project / "specs" / "bench.yaml"]), registry=registry())
    try:
        run_id = ws.start_run("bench plant", ["specs/bench.yaml"])
        for ps in plan.stages:
            tmp = ws.new_tmp_dir(ps.key)
            for out in ps.node.outputs:
                (tmp / out).mkdir()
            ws.promote(tmp, ps.key, {"stage_id": ps.id, "kind": ps.node.kind, "key": ps.key, "run_id": run_id,
                                     "outputs": {o: o for o in ps.node.outputs}, "meta": {},
                                     "components": ps.components})
            ws.set_current(ps.id, ps.key, ps.components, run_id, ps.fileset_digests)
        ws.finish_run(run_id, "succeeded", {})
    finally:
        ws.close()
    return len(plan.stages)


def code_env(code: Path | None) -> dict[str, str]:
    """The children's environment; with ``code``, its ``runner`` package is imported first."""
    return CHILD_ENV if code is None else {**CHILD_ENV, "PYTHONPATH": str(code)}


def plant_in_child(project: Path, code: Path | None = None) -> int:
    """plant_cached in a child process: Linux carries a process's peak RSS across exec, so a
    parent that planned 10,000 stages itself would lend its peak to every command measured after."""
    r = subprocess.run([sys.executable, __file__, "--plant", str(project)], capture_output=True, text=True,
                       env=code_env(code))
    if r.returncode != 0:
        sys.exit(f"planting the cached state failed in {project}:\n{r.stderr[-2000:]}")
    return int(r.stdout.split()[-1])


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


def plan_once(project: Path, command: str = "plan", code: Path | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURE, command], cwd=project, capture_output=True, text=True,
                       env=code_env(code))
    wall = time.perf_counter() - t0
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("BENCH")), None)
    if r.returncode != 0 or line is None:
        sys.exit(f"runner {command} failed in {project}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    _, inner, cpu, rss_kib = line.split()
    return {"wall_s": wall, "in_process_s": float(inner), "cpu_s": float(cpu), "peak_rss_mib": int(rss_kib) / 1024}


def summary(runs: list[dict[str, float]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                    "max": round(max(values), 3)}
    return out


def ratios(later: dict[tuple, list[dict[str, float]]], case: tuple[str, int]) -> dict[str, object]:
    """Per round, the older code's wall and CPU seconds over today's (same round: same load)."""
    before, today = later[(*case, "before")], later[(*case, "today")]
    out: dict[str, object] = {}
    for key in ("wall_s", "cpu_s"):
        r = [b[key] / t[key] for b, t in zip(before, today)]
        out[key] = {"median": round(statistics.median(r), 2), "min": round(min(r), 2), "max": round(max(r), 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", default="100,1000", help="comma-separated numbers of video sources ('' for none)")
    ap.add_argument("--folder", default="", help="comma-separated numbers of videos in one folder source")
    ap.add_argument("--images", default="", help="comma-separated numbers of images in one folder")
    ap.add_argument("--cached", action="store_true",
                    help="after the first plan, record every stage as run: later plans are no-op plans")
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of older code: every case is planned by it too, interleaved")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "_work" / "scale_plan")
    args = ap.parse_args()
    makers = {"videos": make_videos, "folder": make_folder, "images": make_images}
    codes = {"today": None, **({"before": args.before.resolve()} if args.before else {})}
    cases = [(what, int(n), code) for what in makers for n in getattr(args, what).split(",") if n for code in codes]
    projects = {}
    for what, n, code in cases:
        project = args.work.resolve() / f"{what}_{n}" / code
        (project / "specs").mkdir(parents=True, exist_ok=True)
        (project / "runner.toml").write_text("")
        makers[what](project, n)
        for state in (project / ".runner",):
            if state.exists():
                import shutil

                shutil.rmtree(state)
        projects[(what, n, code)] = project
    first = {case: plan_once(p, code=codes[case[2]]) for case, p in projects.items()}
    stages = {case: plant_in_child(p, codes[case[2]]) for case, p in projects.items()} if args.cached else {}
    later: dict[tuple, list[dict[str, float]]] = {case: [] for case in projects}
    applies: dict[tuple, list[dict[str, float]]] = {case: [] for case in projects}
    for _ in range(args.repeat):  # interleaved: every size (and code) once per round
        for case, p in projects.items():
            later[case].append(plan_once(p, code=codes[case[2]]))
            if args.cached:
                applies[case].append(plan_once(p, "apply", codes[case[2]]))
    result = {"machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d")},
              "cached": args.cached,
              "cases": [{"what": what, "n": n, "code": code, "stages": stages.get((what, n, code)),
                         "first_plan": {k: round(v, 3) for k, v in first[(what, n, code)].items()},
                         "unchanged_plan": summary(later[(what, n, code)]),
                         **({"noop_apply": summary(applies[(what, n, code)])} if args.cached else {}),
                         **({"before_over_today": ratios(later, (what, n))} if code == "today" and args.before else {})}
                        for what, n, code in projects]}
    print(json.dumps(result, indent=2))
    (args.work / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plant"]:
        print(plant_cached(Path(sys.argv[2])))
        sys.exit(0)
    if not CLIP.is_file():
        sys.exit(f"{CLIP} not found (../shared/data, see its README)")
    main()
