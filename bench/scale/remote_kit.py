"""What bench/scale/fanout.py and bench/scale/remote_overhead.py share (issue 18).

Both benches run every `runner apply` in a child process of their own (``python <bench> --child
JSON``), so each one starts with nothing imported and nothing cached, as a user's apply does, and
a local run pays the same imports and model loads as the worker of a remote one. The remote path
is the one the test suite uses: ``hardware.stage_backend`` sends the CPU stages to "Modal", and
:class:`runner.backends.remote.FolderTransport` runs the worker entry point in a subprocess with
a folder standing in for the Modal Volume. Every run starts from an empty store and an empty
volume (``.runner/`` and the volume folder removed), so nothing is cached or reused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CLIP = DATA / "video" / "carphone.mp4"
REFERENCE = DATA / "faces" / "obama" / "obama_01.jpg"
PHOTOS = [DATA / "faces" / p for p in ("obama/obama_02.jpg", "kit_harington/kit_02.jpg", "biden/biden_01.jpg",
                                       "rose_leslie/rose_01.jpg")]

HEAD = """\
version: 1
character:
  name: {name}
  trigger: {name}chr
  class_word: man
  references: [../refs]
dataset:
  analysis: {{backend: dlib, workers: 1}}
  sources:
"""
HARDWARE = """\
hardware:
  stage_backend: {{{kinds}}}
  modal: {{max_parallel: {max_parallel}, retries: 0}}
"""


def _project(root: Path, name: str) -> Path:
    """A fresh project folder with its reference photo; returns the spec path to write."""
    shutil.rmtree(root, ignore_errors=True)
    for d in ("specs", "refs"):
        (root / d).mkdir(parents=True)
    (root / "runner.toml").write_text("# character-runner project\n")
    shutil.copy(REFERENCE, root / "refs")
    return root / "specs" / f"{name}.yaml"


def video_project(root: Path, n: int, stride: int | None, max_parallel: int = 1) -> Path:
    """``n`` video sources, each a copy of carphone.mp4 under its own name (so ``n`` distinct
    video_identity stages of the same cost), sent to the remote backend."""
    spec = _project(root, "fan")
    (root / "videos").mkdir()
    lines = []
    for i in range(n):
        shutil.copyfile(CLIP, root / "videos" / f"clip_{i:03d}.mp4")
        lines.append(f"    - video: ../videos/clip_{i:03d}.mp4\n" + (f"      stride: {stride}\n" if stride else ""))
    spec.write_text(HEAD.format(name="fan") + "".join(lines)
                    + HARDWARE.format(kinds="video_identity: modal", max_parallel=max_parallel))
    return spec


def photo_project(root: Path) -> Path:
    """One folder of four photos: ingest and analyze (dlib, one worker), sent to the remote backend."""
    spec = _project(root, "pho")
    (root / "photos").mkdir()
    for p in PHOTOS:
        shutil.copy(p, root / "photos" / p.name)
    spec.write_text(HEAD.format(name="pho") + "    - images: ../photos\n"
                    + HARDWARE.format(kinds="ingest: modal, analyze: modal", max_parallel=1))
    return spec


def fresh(project: Path, volume: Path) -> None:
    """Nothing cached: no store, no state database, no digest cache, no volume."""
    shutil.rmtree(project / ".runner", ignore_errors=True)
    shutil.rmtree(volume, ignore_errors=True)


def apply_once(spec: Path, only: list[str], remote: Any) -> dict[str, Any]:
    """One apply in this process: ``remote`` is a transport or backend (None: everything local,
    ``--backend local``). Returns its wall time and the execution rows it recorded."""
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import PlainReporter
    from runner.spec import load_specs

    opts = (ApplyOptions(only=only, backend="local", command="bench") if remote is None
            else ApplyOptions(only=only, remote=remote, command="bench"))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = apply(load_specs([str(spec)]), opts, PlainReporter(io.StringIO()))
    wall = time.perf_counter() - t0
    if result.status != "succeeded":
        raise SystemExit(f"apply failed: {[(r.stage_id, r.error) for r in result.results if r.error]}")
    return {"wall_s": wall, "load": [load0, os.getloadavg()[0]], "rows": executions(spec.parent.parent, result.run_id)}


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (the workers of a remote apply)."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def executions(project: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's execution rows that ran (stage id -> duration, backend, metrics)."""
    db = sqlite3.connect(project / ".runner" / "state.db")
    try:
        rows = db.execute("SELECT stage_id, kind, status, duration, backend, metrics FROM executions"
                          " WHERE run_id=? AND status='succeeded'", (run_id,)).fetchall()
    finally:
        db.close()
    return {sid: {"kind": kind, "duration": dur, "backend": backend, "metrics": json.loads(metrics or "{}")}
            for sid, kind, _status, dur, backend, metrics in rows}


def child(script: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child JOB`` in a fresh interpreter; its last stdout line is the JSON answer."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    r = subprocess.run([sys.executable, str(script), "--child", json.dumps(job)], capture_output=True,
                       text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"child {job} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def fmt(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    """``median (min-max)`` of a :func:`spread`."""
    f = f"{{:.{digits}f}}"
    dash = " to " if s["min"] < 0 else "-"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}{dash}{f.format(s['max'])})"


def machine() -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "shared": "2 cores shared with other sessions and test runs",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def bench_args(ap: Any, work: str) -> None:
    """The options both benches share: --work, --summarize and the hidden --child."""
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / work)
    ap.add_argument("--summarize", action="store_true", help="reprint the table of the last results.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)


def dispatch(args: Any, run_child: Callable[[dict], None], resummarize: Callable[[Path], dict],
             table: Callable[[dict], str]) -> bool:
    """Answer --child or --summarize; True when one was (then the bench has nothing left to do)."""
    if args.child:
        run_child(json.loads(args.child))
    elif args.summarize:
        print(table(resummarize(args.work / "results.json")))
    return bool(args.child or args.summarize)


def write_results(args: Any, result: dict, table: Callable[[dict], str]) -> None:
    print(table(result))
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.work / 'results.json'}")


def check_data() -> None:
    missing = [p for p in (CLIP, REFERENCE, *PHOTOS) if not p.is_file()]
    if missing:
        raise SystemExit(f"test data missing: {', '.join(map(str, missing))} (../shared/data, see its README)")
