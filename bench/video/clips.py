"""Benchmark cutting training clips (the video_clips stage's work) against real time.

For each clip in ../shared/data/video (short_hamilton_clip.mp4 640x360 9.2 s, carphone.mp4 176x144
4.8 s, bigbuckbunny_no_faces.mp4: no face, so no clip) the main person's track is built once with
the video_identity stage (dlib HOG, every 5th frame, the fallback novelty descriptor; not timed),
then runner.video.clips.cut_clips cuts the clips with the schema's defaults for train_video.clips
(33 frames, stride 1, at most 24 per source, margin 0.6, longest side 512), --repeat times,
the videos interleaved (a, b, c, a, b, c, ...) so a busy moment of a shared machine falls on all.

Besides it, the floor: decoding the same frames only (PyAV, RGB conversion of the frames the
clips take), what cutting cannot beat. Reported per video: the median and range of wall seconds,
and the real-time ratios ``source seconds / wall seconds`` (the video's duration: the source a
video_clips run gets through) and ``clip seconds / wall seconds`` (the seconds of clips written).
Ratio >= 1.0: faster than real time.

The peer, when an ``ffmpeg`` binary is on PATH (Debian's package; not a project dependency):
the same clips cut by the ffmpeg command line, one process per clip as a script would run it,
unmodified: ``ffmpeg -ss <start> -i <video> -vf select=not(mod(n,<stride>)),crop=..,scale=..
-frames:v <frames> -c:v libx264 -preset veryfast -crf 20 -pix_fmt yuv420p`` with each clip's
start, crop box and size read from clips.jsonl (the same encoder settings as ours). It runs right
after ours on each video in each repetition; the ratio ours / ffmpeg is taken per repetition.

    taskset -c 0,1 .venv/bin/python bench/video/clips.py [--repeat 5] [--videos short_hamilton_clip,carphone]
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
DATA = REPO.parent / "shared" / "data" / "video"
WORK = REPO / "bench" / "_work" / "clips"
VIDEOS = ("short_hamilton_clip", "carphone", "bigbuckbunny_no_faces")


def identity_of(video: Path) -> Path:
    """The video_identity stage's ``identity`` output for ``video`` (built once, then reused)."""
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.stages import video_identity as V

    folder = WORK / f"identity-v{V.VERSION}" / video.stem
    done = folder / "out" / "identity" / "summary.json"
    if done.exists():
        return done.parent
    shutil.rmtree(folder, ignore_errors=True)
    ctx = LocalStageContext.for_folder(folder, stage_id="bench:video_identity[0]", project_root=video.parent)
    opts = {k: v for k, v in V.video_option_defaults().items() if k != "upsample"}
    opts["general_fallback"] = "always"
    cfg = {"video": video.name, "source_index": 0, "label": "", "people": 1, "stride": 5,
           "face": {"backend": "dlib", "dlib_detector": "hog", "upsample": 1, "insightface_pack": "buffalo_l",
                    "insightface_root": "~/.insightface"}, "options": opts, "references": []}
    out = V.run(cfg, {"video": contract.Artifact("video", video.parent, files=(video,))}, ctx)
    return out["identity"].path


def clip_defaults() -> dict:
    """train_video.clips as a spec gets it (the schema's defaults), less ``enabled``."""
    from runner.spec.sections import TrainVideoClipsConfig

    d = TrainVideoClipsConfig.from_dict({}).to_dict()
    d.pop("enabled")
    return d


def cut(video: Path, identity: Path, out: Path, opts: dict) -> tuple[float, float, dict]:
    """(wall s, CPU s of this process, summary) of one cut_clips run."""
    from runner.video.clips import cut_clips

    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    summary = cut_clips(video, identity, out, trigger="hrochr", class_word="man", source=video.name, **opts)
    return time.perf_counter() - t, time.process_time() - c, summary


def decode_only(video: Path, out: Path) -> float:
    """Decode the frames the clips took (read back from clips.jsonl) and convert them to RGB."""
    from runner.video.decode import iter_frames

    records = [json.loads(x) for x in (out / "clips.jsonl").read_text().splitlines() if x.strip()]
    wanted = {f for r in records for f in range(r["start_frame"], r["end_frame"] + 1, r.get("stride", 1))}
    t = time.perf_counter()
    if wanted:
        sum(1 for _ in iter_frames(video, wanted=wanted))
    return time.perf_counter() - t


def video_offset(video: Path) -> float:
    """Seconds from the file's start to its first video frame (ffmpeg's -ss counts from the file's
    start; an audio stream may start before the video, as in short_hamilton_clip.mp4)."""
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        first = float((s.start_time or 0) * s.time_base) if s.time_base is not None else 0.0
        return first - (c.start_time or 0) / 1e6


def peer_ffmpeg(video: Path, out: Path, fps: float, max_side: int) -> float | None:
    """Wall seconds of the ffmpeg command line cutting the clips listed in ``out``/clips.jsonl."""
    import subprocess

    ffmpeg = shutil.which("ffmpeg")
    records = [json.loads(x) for x in (out / "clips.jsonl").read_text().splitlines() if x.strip()]
    if ffmpeg is None or not records:
        return None
    dest = out.with_name(out.name + "-ffmpeg")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    offset = video_offset(video)
    t = time.perf_counter()
    for r in records:
        x0, y0, x1, y1 = r["crop_box"]
        select = f"select=not(mod(n\\,{r['stride']}))," if r["stride"] > 1 else ""
        # as cut_clips does: the crop scaled to at most max_side, then cut to even sides
        scale = min(1.0, max_side / max(x1 - x0, y1 - y0))
        sw, sh = max(2, int((x1 - x0) * scale)), max(2, int((y1 - y0) * scale))
        vf = (f"{select}setpts=N/({r['fps']}*TB),crop={x1 - x0}:{y1 - y0}:{x0}:{y0}:exact=1,"
              f"scale={sw}:{sh},crop={r['width']}:{r['height']}:0:0")
        start = max(0.0, offset + (r["start_frame"] - 0.5) / fps)  # mid-way before the frame: no rounding miss
        subprocess.run([ffmpeg, "-v", "error", "-y", "-ss", f"{start:.6f}", "-i", str(video),
                        "-vf", vf, "-frames:v", str(r["frames"]), "-an", "-c:v", "libx264", "-preset", "veryfast",
                        "-crf", "20", "-pix_fmt", "yuv420p", "-r", str(r["fps"]), str(dest / f"{r['id']}.mp4")],
                       check=True)
    elapsed = time.perf_counter() - t
    _same_frames(records, dest)
    return elapsed


def _same_frames(records: list[dict], dest: Path) -> None:
    """The peer wrote the clips ours did: as many frames, the same size, the same pictures (mean
    absolute difference of the first frames under 6 of 255: encoder noise, not a shifted frame)."""
    import av
    import numpy as np

    def frames_of(path: Path) -> list:
        with av.open(str(path)) as c:
            return [f.to_ndarray(format="rgb24").astype(np.float32) for f in c.decode(video=0)]

    for r in records:
        theirs, ours = frames_of(dest / f"{r['id']}.mp4"), frames_of(dest.parent / dest.name[:-7] / r["clip"])
        got = (len(theirs), theirs[0].shape[1], theirs[0].shape[0])
        assert got == (r["frames"], r["width"], r["height"]), (r["id"], got)
        diff = float(np.abs(theirs[0] - ours[0]).mean())
        assert diff < 6.0, f"{r['id']}: ffmpeg's first frame differs from ours by {diff:.1f} (a shifted seek?)"


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--videos", default=",".join(VIDEOS))
    ap.add_argument("--out", default=str(WORK / "results.json"))
    args = ap.parse_args()
    from runner.video.decode import probe_video

    opts = clip_defaults()
    videos = [DATA / f"{n}.mp4" for n in args.videos.split(",") if n]
    ids = {v: identity_of(v) for v in videos}
    times: dict[Path, list[float]] = {v: [] for v in videos}
    floors: dict[Path, list[float]] = {v: [] for v in videos}
    cpus: dict[Path, list[float]] = {v: [] for v in videos}
    peers: dict[Path, list[float]] = {v: [] for v in videos}
    fps = {v: probe_video(v).fps or 25.0 for v in videos}
    summaries: dict[Path, dict] = {}
    cut(videos[0], ids[videos[0]], WORK / "warm", opts)  # imports and codec set-up, not timed
    for _ in range(args.repeat):
        for v in videos:
            dt, cpu, summaries[v] = cut(v, ids[v], WORK / "out" / v.stem, opts)
            times[v].append(dt)
            cpus[v].append(cpu)
            floors[v].append(decode_only(v, WORK / "out" / v.stem))
            peer = peer_ffmpeg(v, WORK / "out" / v.stem, fps[v], opts["max_side"])
            if peer is not None:
                peers[v].append(peer)
    rows = []
    for v in videos:
        info = probe_video(v)
        duration = info.duration_s or (info.frame_count or 0) / (info.fps or 25.0)
        s = summaries[v]
        recs = [json.loads(x) for x in (WORK / "out" / v.stem / "clips.jsonl").read_text().splitlines() if x]
        clip_s = sum(r["frames"] / r["fps"] for r in recs)
        t = spread(times[v])
        rows.append({"video": v.name, "size": f"{info.width}x{info.height}", "duration_s": round(duration, 2),
                     "clips": s["clips"], "reason": s["reason"], "shots": s["shots"],
                     "clip_sides": sorted({f"{r['width']}x{r['height']}" for r in recs}),
                     "clip_seconds": round(clip_s, 2), "cut_s": t,
                     # frames decoded: once up to the last clip's end, where one decode per clip from the
                     # start of the video would take the sum of the clips' end frames
                     "decoded_frames": s.get("decoded_frames"),
                     "decoded_if_per_clip": sum(r["end_frame"] + 1 for r in recs),
                     "runs_s": [round(x, 3) for x in times[v]],
                     "decode_only_s": spread(floors[v]), "cpu_s": spread(cpus[v]),
                     # CPU seconds are far less sensitive than wall time to other jobs on a shared machine
                     "source_per_cpu_s": round(duration / statistics.median(cpus[v]), 2),
                     "ffmpeg_s": spread(peers[v]) if peers[v] else None,
                     "ours_over_ffmpeg": spread([a / b for a, b in zip(times[v], peers[v])]) if peers[v] else None,
                     "source_ratio": {k: round(duration / x, 2) for k, x in t.items()},
                     "clip_ratio": {k: round(clip_s / x, 2) for k, x in t.items()}})
        print(json.dumps(rows[-1]), flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"options": opts, "repeat": args.repeat, "cores": cores, "rows": rows,
              "loadavg_end": [round(x, 2) for x in os.getloadavg()],
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| video | size | duration s | clips (shots) | clip s | frames decoded | cut s median [min-max] "
          "| decode-only s median | source s / wall s median [range] | clip s / wall s median | CPU s median "
          "| source s / CPU s | ffmpeg CLI s median [min-max] | ours / ffmpeg median [range] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, sr = r["cut_s"], r["source_ratio"]
        shots = ", ".join(f"{k} {n}" for k, n in r["shots"].items()) or r["reason"]
        cpu = r["cpu_s"]["median"]
        ratios = (f"{sr['median']} [{sr['max']}-{sr['min']}] | {r['clip_ratio']['median']} | {cpu} "
                  f"| {r['source_per_cpu_s']}" if r["clips"] else f"n/a (nothing cut) | n/a | {cpu} | n/a")
        f, q = r["ffmpeg_s"], r["ours_over_ffmpeg"]
        peer = f"{f['median']} [{f['min']}-{f['max']}] | {q['median']} [{q['min']}-{q['max']}]" if f else "n/a | n/a"
        print(f"| {r['video']} | {r['size']} | {r['duration_s']} | {r['clips']} ({shots}) | {r['clip_seconds']} "
              f"| {r['decoded_frames']} | {c['median']} [{c['min']}-{c['max']}] | {r['decode_only_s']['median']} "
              f"| {ratios} | {peer} |")
    print(f"\n{cores} cores; load average at the end {result['loadavg_end']}; {result['when']}")


if __name__ == "__main__":
    main()
