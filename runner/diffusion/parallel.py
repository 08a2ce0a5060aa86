"""Data-parallel training: one :class:`runner.diffusion.trainer.LoraTrainer` per process.

:func:`train_data_parallel` runs ``python -m torch.distributed.run --standalone`` (the launcher
accelerate's own ``multi_gpu`` launch calls; standalone: its rendezvous on a free local port) with
N processes of :func:`main`. Each builds the same trainer from a job file; accelerate's
``Accelerator`` reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
process group: nccl with one CUDA device per process, gloo on the CPU. The trainer splits each
step's micro-batches across the ranks and wraps the denoiser in DDP (LoRA gradients only), so the
run trains what one process trains (see ``docs/training.md``, "Several GPUs"). With
``hardware.parallel`` resolved to fsdp (the node config's ``parallel``) the trainer shards the
denoiser over the ranks instead of wrapping it in DDP; the launch is the same.

Rank 0 alone writes logs, checkpoints, the resume state and the outputs; every rank reads the
same resume state. What rank 0 reports (log lines, warnings, metrics, progress bars) comes back to
the launching process as JSON lines on its standard output, marked with :data:`EVENT`, and goes
to the stage's callbacks there. A :class:`TrainError` in rank 0 comes back as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from runner.diffusion.trainer import Callbacks, TrainError

EVENT = "@@runner-train@@ "  # the prefix of rank 0's event lines
JOB_DIR = "parallel"  # under the trainer's scratch folder: the job file and the launcher's log


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(EVENT + json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


class _Bar:
    def __init__(self, n: int) -> None:
        self.n = n

    def update(self, n: int = 1, **fields: Any) -> None:
        _emit({"bar": self.n, "update": n, "fields": fields})

    def close(self) -> None:
        _emit({"bar": self.n, "close": True})


def _rank_callbacks() -> Callbacks:
    """Rank 0's callbacks: every report an event line for the launching process."""
    bars = iter(range(1 << 30))

    def progress(total: int, desc: str) -> _Bar:
        bar = _Bar(next(bars))
        _emit({"bar": bar.n, "total": total, "desc": desc})
        return bar

    return Callbacks(log=lambda msg, **kw: _emit({"log": msg}), warn=lambda msg, **kw: _emit({"warn": msg}),
                     metric=lambda name, value, step=None: _emit({"metric": name, "value": value, "step": step}),
                     progress=progress)


def main(argv: list[str] | None = None) -> int:
    """One rank: the trainer of the job file ``argv[0]`` (rank 0 with the event callbacks)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from runner.diffusion.trainer import LoraTrainer

    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    paths = {k: (Path(v) if v is not None else None) for k, v in job["paths"].items()}
    trainer = LoraTrainer(job["config"], **paths, device=job["device"],
                          callbacks=_rank_callbacks() if rank0 else Callbacks(),
                          stop_after_step=job.get("stop_after_step"))
    try:
        result = record(trainer.run)()
    except TrainError as exc:
        if rank0:
            _emit({"error": exc.message, "hint": exc.hint})
        return 3
    if rank0:
        _emit({"stopped_at": result["stopped_at"]} if "stopped_at" in result else {"done": True})
    return 0


def _launch_env(device: str, processes: int) -> dict[str, str]:
    """The ranks' environment: the package importable, gloo on loopback, the cores shared out
    (torch.distributed.run would give each rank one thread)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the runner package, importable in every rank
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if device == "cpu":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback (hostname lookup is flaky on CI)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def _check_devices(processes: int, device: str, setting: str) -> None:
    if device.startswith("cuda"):
        import torch

        have = torch.cuda.device_count()
        if processes > have:
            raise TrainError(f"{setting} asks for {processes} processes, one per CUDA GPU, but this machine has {have}",
                             hint=f"Set {setting} to {have} or fewer, or run where {processes} GPUs are.")
    elif device != "cpu":
        raise TrainError(f"{setting}: data-parallel training runs on CUDA GPUs or the CPU, not on {device}",
                         hint=f"Set {setting} to 1.")


def train_data_parallel(config: Any, processes: int, *, paths: dict[str, Path | None], device: str,
                        callbacks: Callbacks, stop_after_step: int | None = None,
                        setting: str = "hardware.local_processes") -> dict[str, Any]:
    """Train with ``processes`` data-parallel ranks; rank 0's result (the output index, or
    ``{"stopped_at": step}``). ``paths``: the trainer's folders (dataset_dir, out_dir,
    scratch_dir, cache_dir, project_root, regularization_dir); ``setting`` names where the count
    came from, for the messages."""
    from runner.diffusion.trainer import LoraTrainer

    _check_devices(processes, device, setting)
    config = LoraTrainer.config_class.from_dict(config).to_dict()  # as the stage passes it: the same resume digest
    folder = Path(paths["scratch_dir"]) / JOB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.json"
    job.write_text(json.dumps({"config": config, "device": device, "stop_after_step": stop_after_step,
                               "paths": {k: (str(v) if v is not None else None) for k, v in paths.items()}},
                              default=str), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "runner.diffusion.parallel", str(job)]
    log = folder / "launcher.log"
    with log.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=_launch_env(device, processes),
                                text=True, bufsize=1)
        try:
            result = _relay(proc, callbacks)
            rc = proc.wait()
        except BaseException:  # interrupted (Ctrl-C, a cancelled call): the launcher stops its ranks on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if result.get("error"):
        raise TrainError(result["error"], hint=result.get("hint", ""))
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise TrainError(f"data-parallel training ({processes} processes) failed with exit status {rc}: {tail}",
                         hint=f"The whole launcher log is {log}.")
    if "stopped_at" in result:
        return {"stopped_at": result["stopped_at"]}
    if not result.get("done"):
        raise TrainError(f"data-parallel training ({processes} processes) ended without its result",
                         hint=f"See the launcher log {log}.")
    return json.loads((Path(paths["out_dir"]) / "lora" / "index.json").read_text(encoding="utf-8"))


def _relay(proc: subprocess.Popen, cb: Callbacks) -> dict[str, Any]:
    """Rank 0's events to ``cb`` while the ranks run (other output lines to the log); its last
    event (error, done or stopped_at), if one came."""
    bars: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for line in proc.stdout:
        try:
            ev = json.loads(line[len(EVENT):]) if line.startswith(EVENT) else None
        except ValueError:  # a line another rank's output cut into
            ev = None
        if not isinstance(ev, dict):
            if line.strip():
                cb.log(line.rstrip())
            continue
        if "bar" in ev:
            if "total" in ev:
                bars[ev["bar"]] = cb.bar(ev["total"], ev["desc"])
            elif ev.get("close"):
                bars.pop(ev["bar"]).close()
            else:
                bars[ev["bar"]].update(ev["update"], **ev["fields"])
        elif "log" in ev:
            cb.log(ev["log"])
        elif "warn" in ev:
            cb.warn(ev["warn"])
        elif "metric" in ev:
            cb.metric(ev["metric"], ev["value"], ev["step"])
        else:  # the end: an error, done, or stopped_at
            out = ev
    return out


if __name__ == "__main__":
    sys.exit(main())
