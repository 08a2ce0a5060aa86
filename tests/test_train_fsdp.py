"""FSDP training (hardware.parallel, runner.diffusion.trainer._sharded): 2 processes on the CPU
(gloo, torch's fully_shard) with the denoiser sharded train what one process trains at the same
global batch, through a stop after the first checkpoint and a resume; the plan picks FSDP for a
model whose estimated peak does not fit one GPU of H100:8 and DDP for one that does."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from runner.core import contract
from runner.stages import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_train_ddp as ddp  # noqa: E402  (its spec, contexts and metrics reader; no tests collected here)
from train_helpers import make_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow  # ~40 s on 2 idle cores: one run in-process, two launches of 2 ranks
def test_two_fsdp_processes_train_what_one_trains_through_a_stop_and_resume(shared_data: Path,
                                                                             tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from runner.diffusion.parallel import train_data_parallel
    from runner.diffusion.trainer import STATE_DIR, STATE_FILE, Callbacks

    dataset = make_dataset(shared_data, tmp_path / "dataset", max_side=48)
    cache = tmp_path / "cache"
    one = T.run(ddp._cfg(), {"dataset": contract.Artifact("dataset", dataset)}, ddp._ctx(tmp_path / "one", cache))
    ref = json.loads((one["lora"].path / "index.json").read_text())

    two = tmp_path / "two"
    ctx = ddp._ctx(two, cache)
    paths = {"dataset_dir": dataset, "out_dir": ctx.out_dir, "scratch_dir": ctx.scratch_dir, "cache_dir": cache,
             "project_root": None, "regularization_dir": None}
    logs: list[str] = []
    stopped = train_data_parallel({**ddp._cfg(), "parallel": "fsdp"}, 2, paths=paths, device="cpu",
                                  callbacks=Callbacks(log=lambda m, **k: logs.append(m)), stop_after_step=2)
    assert stopped == {"stopped_at": 2}
    assert any("checkpoint at step 2" in m for m in logs)
    (line,) = [m for m in logs if m.startswith("FSDP: denoiser sharded over 2 processes")]
    mine, total = (int(x.replace(",", "")) for x in line.split("holds ")[1].split(" parameters")[0].split(" of its "))
    assert 0.4 * total < mine < 0.6 * total  # rank 0 holds about half of every weight, frozen or LoRA
    # the resume state is one process's layout: the LoRA and its Adam moments gathered whole
    state = torch.load(ctx.scratch_dir / STATE_DIR / STATE_FILE, map_location="cpu", weights_only=False)
    lora = [t for sd in state["lora"].values() for t in sd.values()]
    moments = [v for st in state["optimizer"]["state"].values() for k, v in st.items() if k != "step"]
    assert lora and len(moments) == 2 * len(lora)
    assert all(type(t) is torch.Tensor for t in lora + moments)  # not DTensor shards
    assert sorted(tuple(t.shape) for t in moments) == sorted(tuple(t.shape) for t in lora + lora)

    shutil.copytree(two, tmp_path / "three")  # the same stopped run, to resume in one process below
    out = T.run({**ddp._cfg(), "processes": 2, "parallel": "fsdp"},
                {"dataset": contract.Artifact("dataset", dataset)}, ctx)
    index = json.loads((out["lora"].path / "index.json").read_text())
    assert index["processes"] == 2 and index["resumed_from_step"] == 2 and index["global_batch"] == 2
    assert index["parallel"] == "fsdp" and ref["parallel"] is None
    a, b = ddp._losses(two), ddp._losses(tmp_path / "one")
    assert [s for s, *_ in a] == [1, 2, 3, 4] == [s for s, *_ in b]
    for (_, la, pa), (_, lb, pb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-7) and pa == pytest.approx(pb, rel=1e-5, abs=1e-7)
    assert len({round(x, 6) for _, x, _ in b}) > 1  # the curve moves: the LoRA trains
    assert [h["val_loss"] for h in index["history"]] == pytest.approx([h["val_loss"] for h in ref["history"]],
                                                                      rel=1e-5)
    wa = load_file(str(out["lora"].path / index["checkpoints"][-1]["diffusers"]))
    wb = load_file(str(one["lora"].path / ref["checkpoints"][-1]["diffusers"]))
    assert wa.keys() == wb.keys() and wa
    for k in wa:  # the same file and keys, gathered whole on rank 0
        assert wa[k].shape == wb[k].shape, k
        assert float((wa[k] - wb[k]).norm()) <= 1e-4 * float(wb[k].norm()) + 1e-9, k
    assert sorted(p.name for p in (out["lora"].path / "step-000004").glob("*.safetensors")) == sorted(
        p.name for p in (one["lora"].path / "step-000004").glob("*.safetensors"))
    assert len(a) == 4  # only rank 0 wrote metrics
    # the state FSDP wrote resumes in one process too, to the same LoRA
    solo = T.run(ddp._cfg(), {"dataset": contract.Artifact("dataset", dataset)}, ddp._ctx(tmp_path / "three", cache))
    si = json.loads((solo["lora"].path / "index.json").read_text())
    assert si["resumed_from_step"] == 2 and si["processes"] == 1
    wc = load_file(str(solo["lora"].path / si["checkpoints"][-1]["diffusers"]))
    assert wc.keys() == wb.keys()
    for k in wc:
        assert float((wc[k] - wb[k]).norm()) <= 1e-4 * float(wb[k].norm()) + 1e-9, k


SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man}
dataset:
  sources: [{images: ../photos}]
train: {base_model: Qwen/Qwen-Image, model_family: qwen_image, gradient_accumulation: 8, TRAIN}
hardware: {backend: modal, stage_gpu: {train: GPU}HW}
"""


def _plan(tmp_path: Path, train: str, gpu: str = "H100:8", hw: str = ""):
    from runner.plan.graph import expand_spec
    from runner.spec import load_spec

    (tmp_path / "runner.toml").write_text("")
    (tmp_path / "photos").mkdir(exist_ok=True)
    (tmp_path / "specs").mkdir(exist_ok=True)
    path = tmp_path / "specs" / "hero.yaml"
    path.write_text(SPEC.replace("TRAIN", train).replace("GPU", gpu).replace("HW", hw))
    (node,) = [n for n in expand_spec(load_spec(path)) if n.kind == "train"]
    return node


def test_auto_picks_fsdp_when_the_whole_model_does_not_fit_one_gpu(tmp_path: Path) -> None:
    from runner.diffusion import families, memory
    from runner.diffusion.trainer import TrainerConfig
    from runner.plan.graph import GraphError

    qwen, h100 = families.get("qwen_image"), 79.6 * memory.GIB
    small = _plan(tmp_path, "resolution: 512")  # Qwen-Image at bf16, 512 px: ~68 GiB, fits one H100
    big = _plan(tmp_path, "resolution: 1024")  # at 1024 px: ~91 GiB, does not; its 1/8 shard does
    for node, res, fits in ((small, 512, True), (big, 1024, False)):  # the estimator's own figures decide
        s = memory.Settings.of(TrainerConfig.from_dict(node.config))
        assert s.resolution == res and (memory.estimate(qwen, s).peak <= h100) is fits
        assert (memory.estimate(qwen, s, 8).peak <= h100) is True
    assert small.config["parallel"] == "ddp" and big.config["parallel"] == "fsdp"
    (line,) = [n for n in big.notes if n.startswith("data-parallel: 8 processes on H100:8")]
    assert "FSDP, the denoiser sharded" in line and "does not fit one GPU's 79.6 GiB" in line
    (mem,) = [n for n in big.notes if n.startswith("peak GPU memory")]
    sharded = memory.estimate(qwen, memory.Settings.of(TrainerConfig.from_dict(big.config)), 8)
    assert f"~{memory.gib(sharded.peak)} GiB on H100:8" in mem and "transformer (1/8 shard)" in mem
    assert "DDP, each process holding the whole model" in next(n for n in small.notes if "data-parallel" in n)
    # the strategy is no part of the key: ddp asked for by name keys the same stage (and fits nowhere)
    assert "parallel" in big.unkeyed and "parallel" not in big.keyed_config()
    whole = memory.gib(memory.estimate(qwen, memory.Settings.of(TrainerConfig.from_dict(big.config))).peak)
    with pytest.raises(memory.GpuMemoryError, match=rf"~{whole} GiB does not fit the H100:8"):
        _plan(tmp_path, "resolution: 1024", hw=", parallel: ddp")
    forced = _plan(tmp_path, "resolution: 1024", hw=", parallel: ddp, memory_check: warn")
    assert forced.keyed_config() == big.keyed_config() and forced.config["parallel"] == "ddp"
    # a larger GPU holds the whole model: ddp again
    assert _plan(tmp_path, "resolution: 1024", gpu="H200:8").config["parallel"] == "ddp"
    # fsdp on one GPU is refused, naming the key
    with pytest.raises(GraphError, match=r"hardware\.parallel: fsdp shards the denoiser over several processes"):
        _plan(tmp_path, "resolution: 512", gpu="H100", hw=", parallel: fsdp")
    with pytest.raises(GraphError, match=r"hardware\.parallel: fsdp does not combine"):
        _plan(tmp_path, "resolution: 512, memory: {quantize_base: int8}", hw=", parallel: fsdp")


@pytest.mark.slow  # ~40 s on 2 idle cores: one run in-process, one launch of 2 ranks
def test_fsdp_shards_a_dit_with_gradient_checkpointing_and_samples_as_one_process(shared_data: Path,
                                                                                tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from runner.diffusion.parallel import train_data_parallel
    from runner.diffusion.trainer import Callbacks, LoraTrainer

    dataset = make_dataset(shared_data, tmp_path / "dataset", max_side=48)
    section = {"base_model": "builtin:tiny-qwen-image", "resolution": 32,
               "buckets": {"min_side": 32, "max_side": 64, "step": 16}, "lora": {"rank": 4, "alpha": 2},
               "steps": 2, "lr": 1e-2, "batch_size": 1, "gradient_accumulation": 2, "mixed_precision": "no",
               "gradient_checkpointing": True, "lr_scheduler": {"name": "constant"},
               "checkpoints": {"every_steps": 2, "keep_last": 1, "sample_prompts": ["a photo of sks"],
                               "sample_seeds": [1], "sample_steps": 2, "validation_fraction": 0.2}}
    cfg = {**T.train_config(section, character="demo", trigger="sks", class_word="person"), "device": "cpu"}

    def paths(name: str) -> dict[str, Path | None]:
        return {"dataset_dir": dataset, "out_dir": tmp_path / name / "out", "scratch_dir": tmp_path / name / "scratch",
                "cache_dir": tmp_path / "cache", "project_root": None, "regularization_dir": None}

    logs: list[str] = []
    one = LoraTrainer(cfg, **paths("one"), device="cpu").run()
    two = train_data_parallel({**cfg, "parallel": "fsdp"}, 2, paths=paths("two"), device="cpu",
                              callbacks=Callbacks(log=lambda m, **k: logs.append(m)))
    assert two["parallel"] == "fsdp" and any(m.startswith("FSDP: denoiser sharded over 2") for m in logs)

    def losses(name: str) -> list[float]:
        rows = (json.loads(x) for x in (tmp_path / name / "out" / "logs" / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in rows if "loss" in r]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-5) and len(losses("one")) == 2
    assert two["history"][-1]["val_loss"] == pytest.approx(one["history"][-1]["val_loss"], rel=1e-5)
    (sample,) = two["checkpoints"][-1]["samples"]  # drawn by every rank over the shards, written by rank 0
    assert sample == one["checkpoints"][-1]["samples"][0]
    a, b = (np.asarray(Image.open(tmp_path / n / "out" / "lora" / sample), dtype=np.int16) for n in ("one", "two"))
    assert int(np.abs(a - b).max()) <= 1
