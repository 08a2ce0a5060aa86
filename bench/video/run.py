"""Benchmark the video_identity stage against the clip's duration, beside decode-only time.

For ../shared/data/video/short_hamilton_clip.mp4 (640x360, 9.2 s, 275 frames):

1. decode only: every frame decoded with PyAV, the sampled ones converted to RGB (the floor:
   the stage cannot be faster than reading the clip);
2. the stage itself (runner.stages.video_identity.run with a LocalStageContext), warm: the face
   models are loaded once before timing, as they are after the first video of an apply;
   the first (cold) run, model loading included, is reported separately.

Each configuration runs --repeat times; the median is reported. Ratio = clip duration / time
(>= 1.0: faster than real time). Pin the process to 2 cores with ``taskset -c 0,1`` to measure the
target setting; the script records the CPU count it saw and the load average.

    taskset -c 0,1 .venv/bin/python bench/video/run.py [--repeat 3] [--configs default,stride3,...]
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
CLIP = REPO.parent / "shared" / "data" / "video" / "short_hamilton_clip.mp4"
WORK = REPO / "bench" / "_work" / "video"

# name -> (stride, upsample, threads, general_model or None for the fallback, full_detect_every, profile_detector)
CONFIGS = {
    "default": (5, 1, None, "facebook/dinov2-small", 3, "cnn"),  # what a spec gets; offline -> labelled fallback
    "noprofile": (5, 1, None, None, 3, "off"),  # HOG only: no CNN where HOG finds nothing
    "fullframe": (5, 1, None, None, 1, "cnn"),  # every analyzed frame searched whole
    "2threads": (5, 1, 2, None, 3, "cnn"),
    "upsample0": (5, 0, None, None, 3, "cnn"),
    "stride3": (3, 1, None, None, 3, "cnn"),
    "stride10": (10, 1, None, None, 3, "cnn"),
}


def decode_only(stride: int) -> float:
    from runner.video.decode import iter_frames

    t = time.perf_counter()
    n = sum(1 for _ in iter_frames(CLIP, stride=stride))
    assert n > 0
    return time.perf_counter() - t


def run_stage(stride: int, upsample: int, general: str | None, full_every: int, profile: str,
              out: Path) -> tuple[float, dict]:
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.stages import video_identity as V

    shutil.rmtree(out, ignore_errors=True)
    ctx = LocalStageContext.for_folder(out, stage_id="bench:video_identity[0]", project_root=CLIP.parent)
    opts = {k: v for k, v in V.video_option_defaults().items() if k != "upsample"}
    opts["general_model"] = general
    opts["general_fallback"] = "auto" if general else "always"
    opts["full_detect_every"] = full_every
    opts["profile_detector"] = profile
    cfg = {"video": CLIP.name, "source_index": 0, "label": "", "people": 1, "stride": stride,
           "face": {"backend": "dlib", "dlib_detector": "hog", "upsample": upsample, "insightface_pack": "buffalo_l",
                    "insightface_root": "~/.insightface"}, "options": opts, "references": []}
    t, c = time.perf_counter(), time.process_time()
    res = V.run(cfg, {"video": contract.Artifact("video", CLIP.parent, files=(CLIP,))}, ctx)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    summary = json.loads((res["identity"].path / "summary.json").read_text())
    summary["_cpu_s"] = cpu
    return dt, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(WORK / "results.json"))
    args = ap.parse_args()
    from runner.video.decode import probe_video

    info = probe_video(CLIP)
    duration = info.duration_s or (info.frame_count / info.fps)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    names = [c for c in args.configs.split(",") if c]
    cold = None
    for name in names:
        stride, upsample, threads, general, full_every, profile = CONFIGS[name]
        if threads:
            os.environ["CHARACTER_RUNNER_VIDEO_THREADS"] = str(threads)
        else:
            os.environ.pop("CHARACTER_RUNNER_VIDEO_THREADS", None)
        dec = statistics.median(decode_only(stride) for _ in range(args.repeat))
        times, cpus, summary = [], [], {}
        for i in range(args.repeat + 1):
            dt, summary = run_stage(stride, upsample, general, full_every, profile, WORK / name)
            if i == 0:
                if cold is None:
                    cold = {"config": name, "seconds": round(dt, 3)}
                continue  # the first run loads models (and imports torch when a model is tried)
            times.append(dt)
            cpus.append(summary["_cpu_s"])
        t = statistics.median(times)
        cpu = statistics.median(cpus)
        p = summary["persons"][0] if summary["persons"] else {}
        rows.append({
            "config": name, "stride": stride, "upsample": upsample, "full_detect_every": full_every,
            "profile_detector": profile, "cnn_runs": summary["detections"].get("cnn_runs"),
            "cnn_faces": summary["detections"].get("cnn_faces"),
            "threads": threads or 1, "general": summary["embedding_model"]["general"],
            "decode_s": round(dec, 3), "stage_s": round(t, 3), "stage_runs_s": [round(x, 3) for x in times],
            "pass1_s": summary["timings"].get("pass1_s"), "pass2_s": summary["timings"].get("pass2_s"),
            "ratio": round(duration / t, 2), "decode_ratio": round(duration / dec, 2),
            # the fastest run: the least disturbed by other jobs on a shared machine
            "stage_min_s": round(min(times), 3), "ratio_best": round(duration / min(times), 2),
            # CPU seconds of this process (all threads) are far less sensitive to other jobs on a
            # shared machine than wall time: duration / cpu_s is the ratio one idle core would
            # reach running it serially; threads on idle cores can only do better.
            "cpu_s": round(cpu, 3), "ratio_cpu": round(duration / cpu, 2),
            "sampled": summary["sampled_frames"], "anchors": p.get("anchor_count"),
            "coverage": p.get("coverage_count"), "challenge": p.get("challenge_count"),
            "yaw_filled": (p.get("coverage_buckets_filled") or {}).get("yaw"),
        })
        print(json.dumps(rows[-1]), flush=True)
    result = {"clip": CLIP.name, "duration_s": round(duration, 3), "cores": cores,
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "cold_first_run": cold, "rows": rows,
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| config | stride | upsample | full search every | profiles | threads | novelty descriptor "
          "| decode-only s | stage s (median) | ratio | best run s | best ratio | stage CPU s | duration / CPU s "
          "| sampled | CNN runs / faces | anchors/coverage/challenge | yaw bins |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['stride']} | {r['upsample']} | {r['full_detect_every']} "
              f"| {r['profile_detector']} | {r['threads']} | {r['general']} | {r['decode_s']} | "
              f"{r['stage_s']} | {r['ratio']} | {r['stage_min_s']} | {r['ratio_best']} | {r['cpu_s']} "
              f"| {r['ratio_cpu']} | {r['sampled']} | "
              f"{r['cnn_runs']} / {r['cnn_faces']} | {r['anchors']}/{r['coverage']}/{r['challenge']} "
              f"| {r['yaw_filled']} |")
    print(f"\nclip {duration:.2f} s; {cores} cores; load average at the end {result['loadavg_end']}; "
          f"cold first run {cold}")


if __name__ == "__main__":
    main()
