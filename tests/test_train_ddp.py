"""Data-parallel training (runner.diffusion.parallel): 2 processes on the CPU (gloo, launched by
torch.distributed.run) train what one process trains at the same global batch, through a stop and
a resume; the GPU count of ``<type>:<n>`` prices the plan n times and sets the processes on Modal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**over: Any) -> dict[str, Any]:
    section = {
        "base_model": "builtin:tiny-sd", "resolution": 32,
        "buckets": {"min_side": 32, "max_side": 64, "step": 16},
        "lora": {"rank": 4, "alpha": 2, "dropout": 0.1},  # dropout masks seeded by step position, as the noise
        "steps": 4, "lr": 1e-2, "batch_size": 1, "gradient_accumulation": 2,
        "mixed_precision": "no", "lr_scheduler": {"name": "constant"},
        "checkpoints": {"every_steps": 2, "keep_last": 2, "sample_prompts": [], "validation_fraction": 0.2},
        # prior preservation: two forwards per micro-batch (DDP takes one backward each)
        "regularization": {"enabled": True, "count": 2, "steps": 1, "prior_loss_weight": 0.5},
    }
    from runner.spec.resolve import deep_merge

    cfg = T.train_config(deep_merge(section, over), character="demo", trigger="sks", class_word="person")
    cfg["device"] = "cpu"
    return cfg


def _ctx(root: Path, cache: Path) -> LocalStageContext:
    ctx = LocalStageContext.for_folder(root, stage_id="demo:train")
    ctx.cache_dir = cache
    return ctx


def _losses(root: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (root / "out" / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"], r["prior_loss"]) for r in rows if "loss" in r]


@pytest.mark.slow  # ~35 s on 2 idle cores: one run in-process, two launches of 2 ranks (each imports torch + diffusers)
def test_two_processes_train_what_one_trains_through_a_stop_and_resume(shared_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from runner.diffusion.parallel import train_data_parallel
    from runner.diffusion.trainer import Callbacks

    dataset = make_dataset(shared_data, tmp_path / "dataset", max_side=48)
    cache = tmp_path / "cache"
    one = T.run(_cfg(), {"dataset": contract.Artifact("dataset", dataset)}, _ctx(tmp_path / "one", cache))
    ref = json.loads((one["lora"].path / "index.json").read_text())
    assert ref["processes"] == 1 and ref["global_batch"] == 2

    # two ranks (each one micro-batch of every step), stopped after the checkpoint at step 2
    two = tmp_path / "two"
    ctx = _ctx(two, cache)
    paths = {"dataset_dir": dataset, "out_dir": ctx.out_dir, "scratch_dir": ctx.scratch_dir, "cache_dir": cache,
             "project_root": None, "regularization_dir": None}
    logs: list[str] = []
    stopped = train_data_parallel(_cfg(processes=2), 2, paths=paths, device="cpu",
                                  callbacks=Callbacks(log=lambda m, **k: logs.append(m)), stop_after_step=2)
    assert stopped == {"stopped_at": 2}
    assert any("checkpoint at step 2" in m for m in logs)  # rank 0's reports reach the stage
    assert not (two / "out" / "lora" / "index.json").exists()
    # the stage resumes it in two processes (the unkeyed count is no part of the resume state)
    out = T.run({**_cfg(), "processes": 2}, {"dataset": contract.Artifact("dataset", dataset)}, ctx)
    index = json.loads((out["lora"].path / "index.json").read_text())
    assert index["processes"] == 2 and index["resumed_from_step"] == 2 and index["global_batch"] == 2

    assert index["dataset"]["regularization_images"] == 2
    a, b = _losses(two), _losses(tmp_path / "one")
    assert [s for s, *_ in a] == [1, 2, 3, 4] == [s for s, *_ in b]
    for (_, la, pa), (_, lb, pb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-7) and pa == pytest.approx(pb, rel=1e-5, abs=1e-7)
    assert len({round(x, 6) for _, x, _ in b}) > 1  # the curve moves: the LoRA trains
    assert [h["val_loss"] for h in index["history"]] == pytest.approx([h["val_loss"] for h in ref["history"]],
                                                                      rel=1e-5)
    wa = load_file(str(out["lora"].path / index["checkpoints"][-1]["diffusers"]))
    wb = load_file(str(one["lora"].path / ref["checkpoints"][-1]["diffusers"]))
    assert wa.keys() == wb.keys() and wa
    for k in wa:  # per tensor: Adam magnifies the float reduction order of a gradient that nearly cancels
        assert float((wa[k] - wb[k]).norm()) <= 1e-4 * float(wb[k].norm()) + 1e-9, k
    # the report says how it was trained
    import jinja2

    from runner.resources import resource_dir

    (sec,) = T.report_sections(_cfg(), out, {"thumbnail_px": 32})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))), autoescape=True)
    assert "2 data-parallel processes, global batch 2" in env.get_template(sec.template).render(**sec.context)
    # only rank 0 wrote: one metrics line per step, one kohya file per kept checkpoint
    assert len(a) == 4
    assert sorted(p.name for p in (out["lora"].path / "step-000004").glob("*.safetensors")) == sorted(
        p.name for p in (one["lora"].path / "step-000004").glob("*.safetensors"))


def test_gpu_count_sets_price_memory_plan_line_and_remote_processes() -> None:
    from types import SimpleNamespace

    from runner.backends.remote import remote_config
    from runner.cli import _plan_line
    from runner.core import pricing
    from runner.engine import cost as C

    assert pricing.parse_gpu("H100:8") == ("H100", 8) and pricing.parse_gpu("L40S") == ("L40S", 1)
    assert pricing.price_per_hour("H100:8", {})[0] == pytest.approx(8 * pricing.price_per_hour("H100", {})[0])
    assert pricing.gpu_memory_gib("H100:8", {}) == pricing.GPU_MEMORY_GIB["H100"]  # memory per GPU
    for bad in ("H100:9", "H100:0", "H100:x", ":2"):
        with pytest.raises(pricing.GpuSpecError, match=r"hardware\.stage_gpu\.train: .* count of 1 to 8"):
            pricing.parse_gpu(bad, "hardware.stage_gpu.train")

    node = contract.PlanNode(id="demo:train", kind="train", character="demo", config={"processes": 1}, gpu="A10G",
                             unkeyed=("processes",))
    hw = {"stage_gpu": {"train": "H100:8"}}
    eight = C.estimate_stage(node, hw, "modal", typical_seconds=3600.0)
    one = C.estimate_stage(node, {"stage_gpu": {"train": "H100"}}, "modal", typical_seconds=3600.0)
    assert eight.gpu == "H100:8" and eight.priced and eight.cost == pytest.approx(8 * one.cost, abs=0.01)
    line = _plan_line(SimpleNamespace(action="run", id=node.id, reasons=["new"], node=node), eight)
    assert f"modal H100:8, ~{eight.cost:.2f} USD" in line and "8 x H100 at 3.95 USD/h each" in line
    # on Modal the stage runs one process per GPU of its function; the key does not change
    assert remote_config(node, "H100:8")["processes"] == 8 and node.config["processes"] == 1
    assert "processes" not in node.keyed_config()
    other = contract.PlanNode(id="demo:evaluate", kind="evaluate", character="demo", config={"a": 1}, gpu="L4")
    assert remote_config(other, "L4:2") == {"a": 1}


def test_process_counts_are_checked_at_plan_time(project: Path) -> None:
    from types import SimpleNamespace

    from runner.spec import load_spec
    from runner.spec.errors import SpecError

    spec = project / "specs" / "demo.yaml"
    base = "version: 1\ncharacter:\n  name: demo\n  trigger: sks\n  description: d\n"
    spec.write_text(base + "hardware:\n  stage_gpu:\n    train: H100:16\n")
    with pytest.raises(SpecError, match=r"hardware\.stage_gpu\.train"):
        load_spec(spec)
    spec.write_text(base + "hardware:\n  local_processes: 9\n")
    with pytest.raises(SpecError, match=r"hardware\.local_processes"):
        load_spec(spec)
    spec.write_text(base + "hardware:\n  backend: modal\n  stage_gpu:\n    train: H100:8\n")
    assert load_spec(spec).data["hardware"]["local_processes"] == 1

    hw = SimpleNamespace(local_processes=1, backend="modal", stage_gpu={"train": "H100:8"}, gpu="A10G")
    refused = r"hardware\.stage_gpu\.train gives 8 .* train\.gradient_accumulation is 2"
    with pytest.raises(contract.StageError, match=refused):
        T._processes(_cfg(), hw, "H100:8")
    assert T._processes(_cfg(gradient_accumulation=8), hw, "H100:8") == 1
    here = SimpleNamespace(local_processes=2, backend="local", stage_gpu={}, gpu="A10G")
    assert T._processes(_cfg(), here, "A10G") == 2
    with pytest.raises(contract.StageError, match="train_text_encoder"):
        T._processes(_cfg(lora={"train_text_encoder": True}), here, "A10G")


SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man}
dataset:
  sources: [{images: ../photos}]
train: {base_model: black-forest-labs/FLUX.1-dev, resolution: 512, gradient_checkpointing: true, ACCUM}
hardware: {backend: modal, stage_gpu: {train: H100:8}}
"""


def test_a_spec_on_eight_h100s_plans_eight_processes_priced_eight_times(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from runner.cli import _plan_line
    from runner.engine import cost as C
    from runner.plan.graph import GraphError, expand_spec
    from runner.spec import load_spec

    (tmp_path / "runner.toml").write_text("")
    (tmp_path / "photos").mkdir()
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "hero.yaml"
    path.write_text(SPEC.replace("ACCUM", "gradient_accumulation: 8"))
    spec = load_spec(path)
    (node,) = [n for n in expand_spec(spec) if n.kind == "train"]
    assert node.gpu == "H100:8" and node.config["processes"] == 1 and "processes" in node.unkeyed
    assert any(n.startswith("data-parallel: 8 processes on H100:8") and "global batch 8" in n for n in node.notes)
    assert any("on H100:8 (79.6 GiB)" in n for n in node.notes)  # the memory check is per GPU
    est = C.estimate_stage(node, spec.data["hardware"], "modal", typical_seconds=3600.0)
    assert est.gpu == "H100:8" and est.cost == pytest.approx(8 * 3.95, abs=0.01)
    line = _plan_line(SimpleNamespace(action="run", id=node.id, reasons=["new"], node=node), est)
    assert "[modal H100:8, ~31.60 USD:" in line and "8 x H100 at 3.95 USD/h each" in line

    path.write_text(SPEC.replace("ACCUM", "gradient_accumulation: 4"))
    with pytest.raises(GraphError, match=r"hero\.yaml: hardware\.stage_gpu\.train gives 8 data-parallel processes"):
        expand_spec(load_spec(path))
