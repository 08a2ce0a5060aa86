"""bench/scale/fanout.py: remote fan-out through the folder transport with 1, 2 and 4 workers (issue 18).

    python bench/scale/fanout.py [--n 8] [--workers 1,2,4] [--repeat 3] [--stride 5] [--quick] [--summarize]

A batch of ``--n`` stages of the same cost: one spec whose dataset lists ``n`` copies of
../shared/data/video/carphone.mp4 under different names, so ``n`` video_identity stages (dlib,
one thread each) with distinct cache keys, sent to the remote backend by
``hardware.stage_backend: {video_identity: modal}`` and run by
:class:`runner.backends.remote.FolderTransport` (the worker entry point in a subprocess per call,
a folder as the volume), ``hardware.modal.max_parallel`` of them at once. One project per worker
count; the counts are interleaved (1, 2, 4, 1, 2, 4, ...) ``--repeat`` times, each apply in a
fresh child process on an empty store and volume (bench/scale/remote_kit.py).

Reports throughput (stages per second of the apply's wall time), the ratio of each count's
throughput to one worker's in the same round (median and min-max over the rounds), the calls in
flight (the stages' summed remote wall time over the apply's: how far the calls overlapped), and
per stage the median remote wall time, the run inside the worker (recorded as
``remote.duration_s``; it grows when more calls than free cores run at once), the worker start
(``remote.queue_s``) and the CPU seconds of the apply, its workers included, per stage (the work,
which the worker count should not change), and the cores the apply used (its CPU seconds over
its wall time). The speed-up is bounded by the free cores: the table prints the core count and
the load average around each apply.
Writes bench/_work/scale_fanout/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import remote_kit as K  # noqa: E402

SCRIPT = Path(__file__).resolve()


def run_child(job: dict) -> None:
    """One apply of the batch, in this (fresh) process; prints its figures as JSON."""
    from runner.backends.remote import FolderTransport

    spec, volume = Path(job["spec"]), Path(job["volume"])
    K.fresh(spec.parent.parent, volume)
    out = K.apply_once(spec, ["video_identity*"], FolderTransport(volume, retries=0))
    rows = [r for r in out["rows"].values() if r["kind"] == "video_identity"]
    if len(rows) != job["n"] or any(r["backend"] != "modal" for r in rows):
        raise SystemExit(f"expected {job['n']} remote video_identity executions, got {len(rows)}")
    print(json.dumps({"wall_s": out["wall_s"], "load": out["load"], "cpu_s": K.cpu_seconds(),
                      "stage_wall_s": [r["duration"] for r in rows],
                      "stage_run_s": [r["metrics"]["remote.duration_s"] for r in rows],
                      "queue_s": [r["metrics"].get("remote.queue_s", 0.0) for r in rows]}))


def measure(args: argparse.Namespace) -> dict:
    workers = [int(w) for w in args.workers.split(",")]
    args.machine = K.machine()
    work = args.work.resolve()
    specs = {w: K.video_project(work / f"workers_{w}", args.n, args.stride, max_parallel=w) for w in workers}
    runs: dict[int, list[dict]] = {w: [] for w in workers}
    for rnd in range(args.repeat):
        for w in workers:  # interleaved: every count once per round
            r = K.child(SCRIPT, {"spec": str(specs[w]), "volume": str(work / f"volume_{w}"), "n": args.n})
            r["throughput"] = args.n / r["wall_s"]
            runs[w].append(r)
            print(f"round {rnd + 1}/{args.repeat}  workers {w}: {r['wall_s']:6.1f} s, "
                  f"{r['throughput']:.3f} stages/s, load {r['load'][0]:.1f}", file=sys.stderr)
    return summarize(args, workers, runs)


def summarize(args: argparse.Namespace, workers: list[int], runs: dict[int, list[dict]]) -> dict:
    base = runs[workers[0]]
    rows = []
    for w in workers:
        ratios = [r["throughput"] / b["throughput"] for r, b in zip(runs[w], base)]
        rows.append({"workers": w, "throughput": K.spread([r["throughput"] for r in runs[w]], 4),
                     "apply_wall_s": K.spread([r["wall_s"] for r in runs[w]], 2),
                     "ratio_vs_1": K.spread(ratios, 3),
                     "stage_wall_s": K.spread([statistics.median(r["stage_wall_s"]) for r in runs[w]], 2),
                     "stage_run_s": K.spread([statistics.median(r["stage_run_s"]) for r in runs[w]], 2),
                     "queue_s": K.spread([statistics.median(r["queue_s"]) for r in runs[w]], 2),
                     "in_flight": K.spread([sum(r["stage_wall_s"]) / r["wall_s"] for r in runs[w]], 2),
                     "cpu_per_stage_s": K.spread([r["cpu_s"] / args.n for r in runs[w]], 2),
                     "cores_used": K.spread([r["cpu_s"] / r["wall_s"] for r in runs[w]], 2),
                     "load": [r["load"] for r in runs[w]]})
    return {"bench": "scale/fanout", "machine": args.machine, "quick": args.quick, "n": args.n,
            "stride": args.stride, "repeat": args.repeat, "rows": rows, "runs": runs}


def resummarize(path: Path) -> dict:
    """A finished run's results, summarized again from its runs (the table as this script prints it)."""
    old = json.loads(path.read_text())
    runs = {int(w): r for w, r in old["runs"].items()}
    args = argparse.Namespace(machine=old["machine"], quick=old["quick"], n=old["n"], stride=old["stride"],
                              repeat=old["repeat"])
    return summarize(args, list(runs), runs)


def table(result: dict) -> str:
    lines = [f"{result['n']} video_identity stages (carphone.mp4, stride {result['stride'] or 'default'}) "
             f"through the folder transport, {result['repeat']} interleaved rounds; "
             f"{result['machine']['cpu_cores']} CPU cores ({result['machine']['shared']})",
             "| workers | stages/s | ratio vs 1 | calls in flight | per stage: remote wall | run in worker "
             "| worker start | CPU per stage | cores used | load average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['workers']} | {K.fmt(r['throughput'], digits=3)} | {K.fmt(r['ratio_vs_1'], 'x')} | "
                     f"{K.fmt(r['in_flight'])} | "
                     f"{K.fmt(r['stage_wall_s'], ' s', 1)} | "
                     f"{K.fmt(r['stage_run_s'], ' s', 1)} | {K.fmt(r['queue_s'], ' s')} | "
                     f"{K.fmt(r['cpu_per_stage_s'], ' s', 1)} | {K.fmt(r['cores_used'])} | {load_range(r['load'])} |")
    return "\n".join(lines)


def load_range(loads: list[list[float]]) -> str:
    values = [x for pair in loads for x in pair]
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="video_identity stages in the batch")
    ap.add_argument("--workers", default="1,2,4", help="hardware.modal.max_parallel values; the first is the base")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--stride", type=int, default=None, help="dataset.sources[].stride (default: the schema's)")
    ap.add_argument("--quick", action="store_true", help="4 stages at stride 20, one round (under 2 min)")
    K.bench_args(ap, "scale_fanout")
    args = ap.parse_args()
    if K.dispatch(args, run_child, resummarize, table):
        return
    if args.quick:
        args.n, args.repeat, args.stride = 4, 1, 20
    K.check_data()
    K.write_results(args, measure(args), table)


if __name__ == "__main__":
    main()
