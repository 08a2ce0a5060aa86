"""One stage execution: open it (tmp output folder, context, first log line), run its body on a
backend, then promote or discard what it wrote.

:func:`run_body` is safe in a worker thread (no database access, nothing promoted); opening and
:func:`settle` happen in the apply's main thread, which alone touches the store.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.core.errors import UserError
from runner.engine.workspace import Workspace
from runner.paths import cache_root
from runner.plan.planner import Plan, PlannedStage


@dataclass
class StageEnv:
    """What every stage execution of one apply shares."""

    ws: Workspace
    run_id: str
    plan: Plan
    reporter: Any

    @property
    def registry(self) -> contract.Registry:
        return self.plan.graph.registry


@dataclass
class Running:
    """A stage execution that was opened and has not been settled yet."""

    ps: PlannedStage
    env: StageEnv
    ctx: LocalStageContext
    tmp: Path  # its output folder until promotion
    started: float  # wall clock
    t0: float  # monotonic
    backend: Any  # runner.backends.local.LocalBackend or runner.backends.remote.RemoteBackend
    remote: bool
    exec_id: int = 0  # its row in the executions table (status running until it ends)

    @property
    def log_path(self) -> Path:
        return Path(self.ctx.log_file) if self.ctx.log_file else Path()

    def duration(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Outcome:
    """What a stage body returned: its outputs, or the exception it raised (and its traceback)."""

    outputs: Any = None
    error: BaseException | None = None
    traceback: str = ""


def safe_name(stage_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stage_id)


def open_stage(env: StageEnv, ps: PlannedStage, backend: Any, *, remote: bool,
               timeline: list[dict[str, Any]]) -> Running:
    """Open a stage execution (main thread): tmp output folder, context, first log line."""
    node, ws = ps.node, env.ws
    env.reporter.stage_started(ps.id, ps.action, "; ".join(ps.reasons))
    tmp = ws.new_tmp_dir(ps.key)
    # A remote stage keeps its resumable state on the volume, not in the local scratch folder.
    scratch = tmp.with_name(tmp.name + ".scratch") if remote else ws.scratch_dir(ps.key)
    ctx = LocalStageContext(
        stage_id=ps.id, character=node.character, out_dir=tmp, scratch_dir=scratch,
        cache_dir=cache_root(), project_root=ws.project_root, run_id=env.run_id,
        log_file=ws.logs_dir / env.run_id / f"{safe_name(ps.id)}.jsonl", reporter=env.reporter,
        extra={"timeline": list(timeline), "run_id": env.run_id, "workspace": ws, "key": ps.key,
               "registry": env.registry,
               "plan": [s.as_json() for s in env.plan.stages if s.node.character == node.character]},
    )
    ctx._write({"event": "start", "action": ps.action, "reasons": ps.reasons, "key": ps.key,
                "config": node.config, "host": socket.gethostname(), "pid": os.getpid(),
                "backend": "modal" if remote else "local"})
    return Running(ps, env, ctx, tmp, time.time(), time.monotonic(), backend, remote)


def run_body(r: Running, in_main_thread: bool = False) -> Outcome:
    """Run the stage body on its backend. Safe in a worker thread (no database access)."""
    kind = r.env.registry.get(r.ps.node.kind)
    try:
        outputs = r.backend.run_stage(kind, r.ps.node, stage_inputs(r.ps, r.env.plan, r.env.ws), r.ctx)
        return Outcome(outputs=outputs)
    except KeyboardInterrupt:
        if in_main_thread:
            raise
        return Outcome(error=RuntimeError("interrupted"))
    except BaseException as exc:  # noqa: BLE001  (reported as the stage's failure)
        return Outcome(error=exc, traceback=traceback.format_exc())


def stage_inputs(ps: PlannedStage, plan: Plan, ws: Workspace) -> dict[str, contract.Artifact]:
    """The stage's inputs: upstream outputs from the store, file sets as the planner digested them."""
    inputs: dict[str, contract.Artifact] = {}
    for name, ref in ps.node.inputs.items():
        if isinstance(ref, contract.StageOutputRef):
            outs = ws.load_outputs(plan.by_id(ref.stage_id).key)
            if ref.output not in outs:
                raise contract.StageError(f"{ref.stage_id} has no output {ref.output!r}")
            inputs[name] = outs[ref.output]
        else:
            fd = ps.fileset_digests[name]
            root = Path(ref.root)
            files = tuple((root / rel) if root.is_dir() else root for rel, _ in fd.files)
            inputs[name] = contract.Artifact(name=name, path=root, digest=fd.digest, files=files,
                                             meta={"spec_key": ref.spec_key})
    return inputs


def settle(r: Running, outcome: Outcome) -> str | None:
    """Promote the stage's outputs into the store, or discard them (main thread only); returns
    the error shown for a failure, None for a success."""
    ps, ctx, ws = r.ps, r.ctx, r.env.ws
    try:
        if outcome.error is not None:
            raise outcome.error
        ws.promote(r.tmp, ps.key, output_manifest(ps, outcome.outputs, r.tmp, r.env.run_id, ctx))
        ws.set_current(ps.id, ps.key, ps.components, r.env.run_id, ps.fileset_digests)
        shutil.rmtree(ctx.scratch_dir, ignore_errors=True)  # a finished stage needs no resumable state
        return None
    except KeyboardInterrupt:
        raise
    except UserError as exc:  # an expected failure: its message and hint
        error = str(exc) + (f" (hint: {exc.hint})" if exc.hint else "")
        ctx._write({"event": "error", "error": error})
    except BaseException as exc:  # a bug or an unexpected library error: keep the traceback in the log
        error = f"{type(exc).__name__}: {exc}"
        ctx._write({"event": "error", "error": error, "traceback": outcome.traceback or traceback.format_exc()})
    shutil.rmtree(r.tmp, ignore_errors=True)
    if r.remote:
        shutil.rmtree(ctx.scratch_dir, ignore_errors=True)
    return error


def discard(r: Running) -> None:
    """An interrupted stage: its half-written outputs go, its resumable state stays."""
    shutil.rmtree(r.tmp, ignore_errors=True)
    r.ctx._write({"event": "interrupted"})


def output_manifest(ps: PlannedStage, outputs: Any, tmp: Path, run_id: str,
                    ctx: LocalStageContext) -> dict[str, Any]:
    """The store manifest of a finished stage; refuses outputs the stage did not promise or that
    lie outside its output folder."""
    if not isinstance(outputs, dict):
        raise contract.StageError(f"stage {ps.id} returned {type(outputs).__name__}, not a dict of artifacts")
    missing = [o for o in ps.node.outputs if o not in outputs]
    if missing:
        raise contract.StageError(f"stage {ps.id} did not produce its outputs: {', '.join(missing)}")
    rel: dict[str, str] = {}
    meta: dict[str, Any] = {}
    tmp_r = tmp.resolve()
    for name, art in outputs.items():
        p = Path(art.path).resolve()
        try:
            rel[name] = p.relative_to(tmp_r).as_posix() or "."
        except ValueError:
            raise contract.StageError(f"stage {ps.id} output {name!r} is outside its output folder: {p}") from None
        if not p.exists():
            raise contract.StageError(f"stage {ps.id} output {name!r} does not exist: {p}")
        meta[name] = contract.jsonable(art.meta)
    return {
        "stage_id": ps.id, "kind": ps.node.kind, "key": ps.key, "run_id": run_id, "created": time.time(),
        "outputs": rel, "meta": meta, "metrics": ctx.metrics, "warnings": ctx.warnings,
        "components": ps.components,
    }
