"""Stage kinds for engine tests, loaded as a plugin (CHARACTER_RUNNER_STAGE_PLUGINS=fake_stages).

They add a small diamond to every spec after ingest:

    ingest -> fake_a -> fake_b
           -> fake_c            (independent of a and b)
           -> fake_slow         (waits for a release file: lets a test kill it mid-write)

Configs come from ordinary spec fields so tests change one parameter at a time:
fake_a <- character.description, fake_b <- character.traits.fixed,
fake_c <- character.traits.variable (fails when it contains "FAIL"), fake_slow <- character.class_word.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from runner.core import contract

KINDS = ("fake_a", "fake_b", "fake_c", "fake_slow")
# The fake kinds in a registry of their own: tests in this process plan with
# contract.Registry([*built-in kinds they want, *REGISTRY]); loaded as a plugin
# (CHARACTER_RUNNER_STAGE_PLUGINS=fake_stages, the CLI tests) they join the built-in registry.
REGISTRY = contract.Registry()


def _ingest(graph: contract.GraphView) -> dict:
    nodes = graph.nodes_of("ingest")
    return {"images": contract.StageOutputRef(nodes[0].id, "images")} if nodes else {}


def expand_a(spec, graph):
    return [contract.PlanNode(id=contract.node_id(graph.character, "fake_a"), kind="fake_a", character=graph.character,
                          config={"value": spec["character"].get("description", "")}, inputs=_ingest(graph),
                          outputs=("out",))]


def expand_b(spec, graph):
    a = graph.nodes_of("fake_a")[0]
    return [contract.PlanNode(id=contract.node_id(graph.character, "fake_b"), kind="fake_b", character=graph.character,
                          config={"value": spec["character"]["traits"]["fixed"]},
                          inputs={"a": contract.StageOutputRef(a.id, "out")}, outputs=("out",))]


def expand_c(spec, graph):
    return [contract.PlanNode(id=contract.node_id(graph.character, "fake_c"), kind="fake_c", character=graph.character,
                          config={"value": spec["character"]["traits"]["variable"]}, inputs=_ingest(graph),
                          outputs=("out",))]


def expand_slow(spec, graph):
    return [contract.PlanNode(id=contract.node_id(graph.character, "fake_slow"), kind="fake_slow",
                          character=graph.character, config={"value": spec["character"]["class_word"]},
                          inputs=_ingest(graph), outputs=("out",))]


def _write(ctx, config, inputs, name):
    out = ctx.out_dir / "out"
    out.mkdir()
    upstream = {k: str(v.path) for k, v in inputs.items()}
    (out / f"{name}.json").write_text(json.dumps({"config": config, "inputs": sorted(upstream)}))
    counter = os.environ.get("FAKE_STAGE_COUNTER")
    if counter:  # lets tests count real executions across processes
        with open(counter, "a") as fh:
            fh.write(ctx.stage_id + "\n")
    return {"out": contract.Artifact("out", out)}


@REGISTRY.register("fake_a", version=1, order=21, expand=expand_a)
def run_a(config, inputs, ctx):
    return _write(ctx, config, inputs, "a")


@REGISTRY.register("fake_b", version=1, order=22, expand=expand_b)
def run_b(config, inputs, ctx):
    return _write(ctx, config, inputs, "b")


@REGISTRY.register("fake_c", version=1, order=23, expand=expand_c)
def run_c(config, inputs, ctx):
    if any("FAIL" in v for v in config["value"]):
        raise contract.StageError("fake_c was asked to fail", hint="remove FAIL from traits.variable")
    return _write(ctx, config, inputs, "c")


@REGISTRY.register("fake_slow", version=1, order=24, expand=expand_slow)
def run_slow(config, inputs, ctx):
    out = ctx.out_dir / "out"
    out.mkdir()
    (out / "part1.txt").write_text("first half")
    signal = os.environ.get("FAKE_SLOW_SIGNAL")
    release = os.environ.get("FAKE_SLOW_RELEASE")
    if signal:
        Path(signal).write_text(str(os.getpid()))
    if release:
        deadline = time.monotonic() + 60
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    (out / "part2.txt").write_text("second half")
    return _write_extra(ctx, out)


def _write_extra(ctx, out):
    counter = os.environ.get("FAKE_STAGE_COUNTER")
    if counter:
        with open(counter, "a") as fh:
            fh.write(ctx.stage_id + "\n")
    return {"out": contract.Artifact("out", out)}


if __name__ in os.environ.get("CHARACTER_RUNNER_STAGE_PLUGINS", "").split(","):
    for _kind in REGISTRY:
        contract.BUILTIN.add(_kind)
    # Engine tests run only ingest, report and these kinds, not the (heavier) real pipeline stages.
    _only = os.environ.get("FAKE_STAGES_ONLY_KINDS")
    if _only:
        keep = set(_only.split(","))
        for _k in [k for k in contract.BUILTIN.kinds() if k not in keep]:
            contract.BUILTIN.remove(_k)
