"""GPU stage kinds for the Modal backend tests (fan-out, resume, upload/download).

Inert unless FAKE_GPU_VARIANTS is set (comma-separated variant names), so importing this module
in the pytest process changes no other test's plan. With it set, a spec gets:

    ingest -> fake_gpu_train[<v>] -> fake_gpu_eval[<v>]     for every variant v

fake_gpu_train writes one checkpoint per step into ctx.scratch_dir and resumes from the last one;
FAKE_GPU_CRASH_ONCE=<marker file> makes the first attempt die (os._exit, like a preempted
container) after FAKE_GPU_CRASH_AT steps. A variant whose name contains FAIL raises StageError.
Each run appends "<stage id> <start> <end> <pid>" to $FAKE_GPU_TIMES when set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from runner.core import contract

STEPS = 5


def _variants() -> list[str]:
    return [v for v in os.environ.get("FAKE_GPU_VARIANTS", "").split(",") if v]


def _gpu(spec, kind):
    hw = spec.get("hardware", {})
    return hw.get("stage_gpu", {}).get(kind) or hw.get("gpu") or "A10G"


def expand_train(spec, graph):
    ingest = graph.nodes_of("ingest")
    nodes = []
    for v in _variants():
        nodes.append(contract.PlanNode(
            id=contract.node_id(graph.character, "fake_gpu_train", v), kind="fake_gpu_train",
            character=graph.character,
            config={"variant": v, "steps": STEPS, "sleep": float(os.environ.get("FAKE_GPU_SLEEP", "0.3")),
                    "note": spec["character"].get("description", "")},
            inputs={"images": contract.StageOutputRef(ingest[0].id, "images")}, outputs=("lora",),
            gpu=_gpu(spec, "fake_gpu_train")))
    return nodes


def expand_eval(spec, graph):
    nodes = []
    for t in graph.nodes_of("fake_gpu_train"):
        v = t.config["variant"]
        nodes.append(contract.PlanNode(
            id=contract.node_id(graph.character, "fake_gpu_eval", v), kind="fake_gpu_eval",
            character=graph.character, config={"variant": v},
            inputs={"lora": contract.StageOutputRef(t.id, "lora")}, outputs=("evaluation",),
            gpu=_gpu(spec, "fake_gpu_eval")))
    return nodes


def _last_step(scratch: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in scratch.glob("step-*.json")] if scratch.is_dir() else []
    return max(steps, default=0)


def resume_info(scratch: Path) -> str | None:
    n = _last_step(scratch)
    return f"resume at step {n}" if n else None


def _times(stage_id: str, start: float) -> None:
    path = os.environ.get("FAKE_GPU_TIMES")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{stage_id} {start} {time.time()} {os.getpid()}\n")


@contract.register("fake_gpu_train", version=1, order=55, expand=expand_train, resume_info=resume_info)
def run_train(config, inputs, ctx):
    start = time.time()
    if "FAIL" in config["variant"]:
        time.sleep(config["sleep"])
        raise contract.StageError(f"variant {config['variant']} was asked to fail", hint="rename the variant")
    images = sorted(p.name for p in Path(inputs["images"].path).rglob("*.png"))
    first = _last_step(ctx.scratch_dir) + 1
    crash_marker = os.environ.get("FAKE_GPU_CRASH_ONCE")
    crash_at = int(os.environ.get("FAKE_GPU_CRASH_AT", "3"))
    done_now = []
    bar = ctx.progress(config["steps"], "training")
    bar.update(first - 1)
    for step in range(first, config["steps"] + 1):
        time.sleep(config["sleep"])
        bar.update(1)
        (ctx.scratch_dir / f"step-{step}.json").write_text(json.dumps({"step": step}))
        done_now.append(step)
        ctx.metric("loss", 1.0 / step, step=step)
        if crash_marker and step == crash_at and not Path(crash_marker).exists():
            Path(crash_marker).write_text(str(os.getpid()))
            os._exit(137)  # the container is gone: no cleanup, no result
    bar.close()
    out = ctx.out_dir / "lora"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"variant": config["variant"], "images": images,
                                                "resumed_from": first - 1, "steps_run_here": done_now}))
    # the same bytes in every variant: content addressing stores (and fetches) them once
    (out / "shared.bin").write_bytes(b"\x00" * 4096)
    ctx.log(f"trained {config['variant']}")
    _times(ctx.stage_id, start)
    return {"lora": contract.Artifact("lora", out)}


@contract.register("fake_gpu_eval", version=1, order=65, expand=expand_eval)
def run_eval(config, inputs, ctx):
    start = time.time()
    index = json.loads((Path(inputs["lora"].path) / "index.json").read_text())
    out = ctx.out_dir / "evaluation"
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps({"variant": config["variant"], "from": index["variant"]}))
    ctx.metric("score", 0.5)
    _times(ctx.stage_id, start)
    return {"evaluation": contract.Artifact("evaluation", out)}
