"""bench/scale/remote_overhead.py: what the remote path costs per stage, against the work itself (issue 18).

    python bench/scale/remote_overhead.py [--cases photos,video] [--repeat 7] [--stride 5] [--quick] [--summarize]

The same stages run here (``--backend local``) and through the remote path
(``hardware.stage_backend`` sends them to "Modal"; :class:`runner.backends.remote.FolderTransport`
runs the worker entry point in a subprocess, a folder standing in for the volume), each apply in
a fresh child process on an empty store and volume (bench/scale/remote_kit.py), local and remote
alternated (local first in odd rounds, remote first in even ones), ``--repeat`` rounds:

- ``photos``: ingest + analyze (dlib, one worker) of four photos of ../shared/data/faces: small
  stages, where a fixed cost per call weighs most;
- ``video``: video_identity of ../shared/data/video/carphone.mp4 (dlib, one thread).

Each stage's wall time is what the state database records for its execution (``duration``: the
engine's open, run and promote, the same measure on both paths). The remote wall time is split
into phases. What the runner records is used where it exists (the execution's metrics, measured
by the worker: ``remote.queue_s`` from the call's submission to the worker's attempt starting,
``remote.billed_s`` the attempt, ``remote.duration_s`` the stage body in it); the rest is timed by
this bench around the backend's own methods, in a subclass of
:class:`runner.backends.remote.RemoteBackend` (no runner code is changed):

- upload: ``build_manifest`` (sha256 of every input, the content addressing) + ``_upload`` (which
  blobs the volume lacks, and copying them there);
- call: ``call.result()`` of the transport's call, split by the recorded figures into worker
  start (``queue_s``: process, interpreter, runner import), inputs materialized on the worker
  (``billed_s - duration_s``), the stage's run (``duration_s``), and outputs stored as blobs +
  worker exit (the rest of the call);
- download: ``_download`` (outputs fetched from the volume into the stage's tmp folder);
- rest: what is left of the recorded wall (the engine's open and promote, which a local stage
  pays too; the backend's result check on the volume and the replay of the worker's log).

Reports, per stage, overhead = (remote wall - local wall) / local wall, the seconds of the remote
path (every phase but the run) and each phase's share of the remote wall, and per case the same
overhead on the CPU seconds of the whole apply (its workers included); median and min-max over the
rounds. Writes bench/_work/scale_remote/results.json (every trial's figures: ``--summarize``
reprints the table from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import remote_kit as K  # noqa: E402

SCRIPT = Path(__file__).resolve()
CASES = {"photos": (["analyze"], ["pho:ingest", "pho:analyze"]),
         "video": (["video_identity*"], ["fan:video_identity[0]"])}
PHASES = ("upload", "worker_start", "materialize", "run", "store_exit", "download", "rest")


def timed_backend(transport: Any, ws_dir: Path, hardware: dict[str, Any]) -> Any:
    """A RemoteBackend whose phases are timed per stage (``backend.phases[stage id]``)."""
    from runner.backends.remote import RemoteBackend
    from runner.engine.cost import stage_gpu

    class TimedCall:
        def __init__(self, call: Any, backend: "TimedBackend") -> None:
            self.call, self.backend, self.call_id = call, backend, call.call_id

        def result(self) -> dict[str, Any]:
            with self.backend.timed("call"):
                return self.call.result()

        def cancel(self) -> None:
            self.call.cancel()

    class TimedTransport:
        def __init__(self, inner: Any, backend: "TimedBackend") -> None:
            self.inner, self.backend = inner, backend

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def invoke(self, *args: Any) -> TimedCall:
            return TimedCall(self.inner.invoke(*args), self.backend)

    class TimedBackend(RemoteBackend):
        def __init__(self) -> None:
            super().__init__(TimedTransport(transport, self), ws_dir,
                             lambda node: stage_gpu(node, hardware, "modal"))
            self.phases: dict[str, dict[str, float]] = {}
            self._here = threading.local()

        @contextmanager
        def timed(self, phase: str) -> Iterator[None]:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                ph = self._here.phases
                ph[phase] = ph.get(phase, 0.0) + time.perf_counter() - t0

        def run_stage(self, kind: Any, node: Any, inputs: Any, ctx: Any) -> Any:
            self._here.phases = self.phases.setdefault(node.id, {})
            with self.timed("backend"):
                return super().run_stage(kind, node, inputs, ctx)

        def build_manifest(self, *args: Any) -> Any:
            with self.timed("digest"):
                return super().build_manifest(*args)

        def _upload(self, *args: Any) -> None:
            with self.timed("copy_up"):
                super()._upload(*args)

        def _download(self, *args: Any) -> Any:
            with self.timed("download"):
                return super()._download(*args)

    return TimedBackend()


def run_child(job: dict[str, Any]) -> None:
    """One apply of a case, local or remote, in this (fresh) process; prints its figures as JSON."""
    from runner.backends.remote import FolderTransport
    from runner.spec import load_specs

    spec, volume = Path(job["spec"]), Path(job["volume"])
    project = spec.parent.parent
    K.fresh(project, volume)
    only, stages = CASES[job["case"]]
    backend = None
    if job["mode"] == "remote":
        hardware = load_specs([str(spec)])[0].data.get("hardware", {})
        backend = timed_backend(FolderTransport(volume, retries=0), project / ".runner", hardware)
    out = K.apply_once(spec, only, backend)
    want = "modal" if backend is not None else "local"
    figures = {}
    for sid in stages:
        row = out["rows"].get(sid)
        if row is None or row["backend"] != want:
            raise SystemExit(f"{sid}: expected a {want} execution, got {row}")
        figures[sid] = {"wall_s": row["duration"], "metrics": row["metrics"],
                        "timed": backend.phases[sid] if backend is not None else {}}
    print(json.dumps({"stages": figures, "load": out["load"], "cpu_s": K.cpu_seconds()}))


def phases_of(stage: dict[str, Any]) -> dict[str, float]:
    """The remote wall time of one execution, split into PHASES (seconds; they sum to the wall)."""
    m, t, wall = stage["metrics"], stage["timed"], stage["wall_s"]
    queue, billed, run = m.get("remote.queue_s", 0.0), m["remote.billed_s"], m["remote.duration_s"]
    out = {"upload": t.get("digest", 0.0) + t.get("copy_up", 0.0), "worker_start": queue,
           "materialize": max(0.0, billed - run), "run": run,
           "store_exit": max(0.0, t.get("call", 0.0) - queue - billed), "download": t.get("download", 0.0)}
    out["rest"] = wall - sum(out.values())
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work.resolve()
    machine = K.machine()
    specs = {"photos": K.photo_project(work / "photos"), "video": K.video_project(work / "video", 1, args.stride)}
    trials: list[dict[str, Any]] = []
    for rnd in range(args.repeat):
        for case in args.cases:
            for mode in (("local", "remote") if rnd % 2 == 0 else ("remote", "local")):
                r = K.child(SCRIPT, {"spec": str(specs[case]), "volume": str(work / f"volume_{case}"),
                                     "case": case, "mode": mode})
                trials.append({"round": rnd, "case": case, "mode": mode, **r})
                walls = ", ".join(f"{sid} {s['wall_s']:.2f} s" for sid, s in r["stages"].items())
                print(f"round {rnd + 1}/{args.repeat} {case:6s} {mode:6s}: {walls} (load {r['load'][0]:.1f})",
                      file=sys.stderr)
    return {"bench": "scale/remote_overhead", "machine": machine, "quick": args.quick, "repeat": args.repeat,
            "stride": args.stride, "rows": summarize(args, trials), "trials": trials}


def summarize(args: argparse.Namespace, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for case in args.cases:
        stages = CASES[case][1]
        for group in [[s] for s in stages] + ([stages] if len(stages) > 1 else []):
            per_round = []
            for rnd in range(args.repeat):
                pick = {t["mode"]: t["stages"] for t in trials if t["round"] == rnd and t["case"] == case}
                local = sum(pick["local"][s]["wall_s"] for s in group)
                remote = sum(pick["remote"][s]["wall_s"] for s in group)
                split = [phases_of(pick["remote"][s]) for s in group]
                path = sum(x[p] for x in split for p in PHASES if p != "run")
                per_round.append({"local": local, "remote": remote, "overhead": (remote - local) / local,
                                  "path_s": path, "path_share": path / remote,
                                  "run_vs_local": sum(x["run"] for x in split) / local,
                                  **{p: sum(x[p] for x in split) for p in PHASES}})
            row = row_of(" + ".join(group), per_round)
            if group == stages:  # the whole apply: its CPU seconds (the workers' included), remote against local
                cpu = [{t["mode"]: t["cpu_s"] for t in trials if t["round"] == rnd and t["case"] == case}
                       for rnd in range(args.repeat)]
                row["cpu_overhead"] = K.spread([(c["remote"] - c["local"]) / c["local"] for c in cpu])
                row["cpu_s"] = {m: K.spread([c[m] for c in cpu]) for m in ("local", "remote")}
            rows.append(row)
    return rows


def row_of(name: str, per_round: list[dict[str, float]]) -> dict[str, Any]:
    return {"stages": name, "local_wall_s": K.spread([r["local"] for r in per_round]),
            "remote_wall_s": K.spread([r["remote"] for r in per_round]),
            "overhead": K.spread([r["overhead"] for r in per_round]),
            "run_vs_local": K.spread([r["run_vs_local"] for r in per_round]),
            "path_s": K.spread([r["path_s"] for r in per_round]),
            "path_share": K.spread([r["path_share"] for r in per_round]),
            "phase_s": {p: K.spread([r[p] for r in per_round]) for p in PHASES},
            "share": {p: K.spread([r[p] / r["remote"] for r in per_round]) for p in PHASES}}


def resummarize(path: Path) -> dict[str, Any]:
    """A finished run's results, summarized again from its trials (the table as this script prints it)."""
    result = json.loads(path.read_text())
    cases = list(dict.fromkeys(t["case"] for t in result["trials"]))
    result["rows"] = summarize(argparse.Namespace(cases=cases, repeat=result["repeat"]), result["trials"])
    return result


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    heads = ["upload", "worker start", "materialize", "run", "store + exit", "download", "rest"]
    lines = [f"{result['repeat']} rounds, local and remote alternated; {m['cpu_cores']} CPU cores ({m['shared']}). "
             "Shares are of the remote wall.",
             "| stages | local wall | remote wall | overhead | CPU overhead | remote path (all but the run) "
             "| run in worker / local wall | "
             + " | ".join(heads) + " |",
             "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in heads) + " |"]
    for r in result["rows"]:
        shares = " | ".join(pct(r["share"][p]) for p in PHASES)
        lines.append(f"| {r['stages']} | {K.fmt(r['local_wall_s'], ' s')} | {K.fmt(r['remote_wall_s'], ' s')} | "
                     f"{pct(r['overhead'])} | {pct(r['cpu_overhead']) if 'cpu_overhead' in r else ''} | "
                     f"{K.fmt(r['path_s'], ' s')}, {pct(r['path_share'])} | "
                     f"{K.fmt(r['run_vs_local'], 'x')} | {shares} |")
    return "\n".join(lines)


def pct(s: dict[str, float]) -> str:
    """A :func:`remote_kit.spread` of fractions, in percent."""
    return K.fmt({k: 100 * v for k, v in s.items()}, "%", 0 if max(map(abs, s.values())) >= 0.1 else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="photos,video", help="comma-separated: photos, video")
    ap.add_argument("--repeat", type=int, default=7, help="rounds (each: every case, local and remote)")
    ap.add_argument("--stride", type=int, default=None, help="the video source's stride (default: the schema's)")
    ap.add_argument("--quick", action="store_true", help="2 rounds (under 2 minutes)")
    K.bench_args(ap, "scale_remote")
    args = ap.parse_args()
    if K.dispatch(args, run_child, resummarize, table):
        return
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.quick:
        args.repeat = 2
    K.check_data()
    K.write_results(args, measure(args), table)


if __name__ == "__main__":
    main()
