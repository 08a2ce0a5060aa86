"""The train stage on the tiny models: a short run, overfitting, phases, variants sharing caches,
kill -9 and resume, the report section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(shared_data, tmp_path_factory.mktemp("ds") / "dataset")


def _cfg(**over: Any) -> dict[str, Any]:
    section = {
        "base_model": "builtin:tiny-sd", "resolution": 64,
        "buckets": {"min_side": 32, "max_side": 128, "step": 16},
        "lora": {"rank": 4, "alpha": 2}, "steps": 4, "lr": 1e-3, "batch_size": 2,
        "mixed_precision": "no", "lr_scheduler": {"name": "constant"},
        "checkpoints": {"every_steps": 2, "keep_last": 1, "sample_steps": 2,
                        "sample_prompts": ["{trigger} {class}, portrait"], "sample_seeds": [1]},
    }
    from runner.spec.resolve import deep_merge

    return T.train_config(deep_merge(section, over), character="demo", trigger="sks", class_word="person")


def _run(cfg: dict, dataset: Path, root: Path, cache: Path | None = None) -> tuple[dict, LocalStageContext]:
    ctx = LocalStageContext.for_folder(root, stage_id="demo:train")
    if cache is not None:
        ctx.cache_dir = cache
    out = T.run(cfg, {"dataset": contract.Artifact("dataset", dataset)}, ctx)
    index = json.loads((out["lora"].path / "index.json").read_text())
    return index, ctx


def _metrics(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "out" / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]


class FakeGraph:
    def __init__(self, root: Path, nodes: list[contract.PlanNode]) -> None:
        self.character = "demo"
        self.project_root = root
        self.spec_file = root / "specs" / "demo.yaml"
        self._nodes = {n.id: n for n in nodes}

    def nodes_of(self, kind: str) -> list[contract.PlanNode]:
        return [n for n in self._nodes.values() if n.kind == kind]

    def node(self, stage_id: str) -> contract.PlanNode | None:
        return self._nodes.get(stage_id)


def test_short_run_outputs(dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(shuffle_tags=True, caption_variants=3, caption_dropout=0.2, noise_offset=0.05,
               min_snr_gamma=5.0, gradient_accumulation=2,
               lr_scheduler={"name": "cosine_with_restarts", "warmup_steps": 1, "num_cycles": 2},
               regularization={"enabled": True, "count": 2, "steps": 1, "prior_loss_weight": 0.5})
    index, ctx = _run(cfg, dataset, tmp_path)
    out = tmp_path / "out"
    # interface: index.json for evaluate/generation
    assert index["model_family"] == "sd15" and index["tiny_random_model"] is True
    assert index["trigger"] == "sks" and index["class_word"] == "person" and index["variant"] is None
    assert [c["step"] for c in index["checkpoints"]] == [4]  # keep_last 1
    assert [h["step"] for h in index["history"]] == [2, 4]
    final = index["checkpoints"][index["final"]]
    assert (out / "lora" / final["diffusers"]).is_file() and (out / "lora" / final["kohya"]).is_file()
    assert not (out / "lora" / "step-000002").exists()
    for h in index["history"]:  # samples of every checkpoint stay for the report
        assert h["samples"] and all((out / "lora" / s).is_file() for s in h["samples"])
        assert h["val_loss"] is not None and h["val_loss"] > 0
    assert index["dataset"]["validation_images"] == 1 and index["dataset"]["regularization_images"] == 2
    # caption variants are all in the text cache: shuffling did not disable it
    assert index["cache"]["misses"]["text"] >= index["dataset"]["train_images"] * 2
    # logs: jsonl + tensorboard; lr follows warmup then the cosine-with-restarts curve
    rows = [r for r in _metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)
    assert all("prior_loss" in r for r in rows)
    assert sum(sum(r["shots"].values()) for r in rows) == 4 * 2 * 2  # steps x accumulation x batch
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert ctx.metrics["loss"] > 0
    # kohya metadata carries the real alpha and the training facts
    from safetensors import safe_open

    with safe_open(str(out / "lora" / final["kohya"]), "pt") as f:
        md = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        keys = list(f.keys())
    assert alphas == {2.0} and md["ss_network_alpha"] == "2.0" and md["ss_network_dim"] == "4"
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.trigger_phrase"] == "sks" and md["ss_steps"] == "4"
    assert "sks person" in json.loads(md["ss_tag_frequency"])["dataset"]
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for k in keys)
    # the report section renders
    secs = T.report_sections(cfg, {"lora": contract.Artifact("lora", out / "lora"),
                                   "logs": contract.Artifact("logs", out / "logs")}, {"thumbnail_px": 64})
    import jinja2

    from runner.resources import resource_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))), autoescape=True)
    html = env.get_template(secs[0].template).render(**secs[0].context)
    assert "tiny random model" in html.lower() and "<svg" in html and "data:image/jpeg;base64" in html


def test_overfitting_one_image_lowers_its_loss(shared_data: Path, tmp_path: Path) -> None:
    ds = make_dataset(shared_data, tmp_path / "one", n=1)
    cfg = _cfg(steps=30, lr=1e-2, batch_size=1, min_snr_gamma=None, lora={"rank": 8, "alpha": 8},
               buckets={"enabled": False},
               checkpoints={"every_steps": 30, "sample_prompts": [], "validation_fraction": 0.0})
    from runner.diffusion.trainer import LoraTrainer

    tr = LoraTrainer(cfg, dataset_dir=ds, out_dir=tmp_path / "out", scratch_dir=tmp_path / "scratch",
                     cache_dir=tmp_path / "cache", device="cpu")
    tr.run()
    with_lora = tr.validation_loss(tr.train_ex)
    tr.denoiser.disable_adapters()  # LoRA B starts at zero: the base model is the starting point
    before = tr.validation_loss(tr.train_ex)
    tr.denoiser.enable_adapters()
    assert with_lora < 0.8 * before, (before, with_lora)


def test_phases_switch_lr_and_mix(dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(gradient_checkpointing=True,
               phases=[{"name": "foundation", "steps": 3, "lr": 1e-3, "mix": {"close_up": 1.0}},
                       {"name": "polish", "steps": 3, "lr": 2e-4, "mix": "balanced"}],
               checkpoints={"every_steps": 100, "keep_last": 2, "sample_prompts": [], "validation_fraction": 0.0})
    index, _ = _run(cfg, dataset, tmp_path)
    rows = [r for r in _metrics(tmp_path) if "loss" in r]
    assert [r["phase"] for r in rows] == ["foundation"] * 3 + ["polish"] * 3
    assert {r["lr"] for r in rows[:3]} == {1e-3} and {r["lr"] for r in rows[3:]} == {2e-4}
    assert all(set(r["shots"]) == {"close_up"} for r in rows[:3])
    assert len({s for r in rows[3:] for s in r["shots"]}) > 1
    # a checkpoint closes every phase, and the second phase starts from the first one's weights
    assert [(c["step"], c["phase"]) for c in index["checkpoints"]] == [(3, "foundation"), (6, "polish")]
    shares = {p["name"]: p["shot_share"] for p in index["phases"]}
    assert shares["foundation"] == {"close_up": 1.0, "full_body": 0.0, "medium": 0.0, "wide": 0.0}
    assert len(set(shares["polish"].values())) == 1  # balanced: equal per shot
    assert index["gradient_checkpointing"] is True and index["attention"] == ["AttnProcessor2_0"]


def test_variants_expand_to_nodes_and_share_caches(dataset: Path, tmp_path: Path) -> None:
    section = {"base_model": "builtin:tiny-sd", "resolution": 64, "steps": 2, "lr": 1e-3, "mixed_precision": "no",
               "buckets": {"min_side": 32, "max_side": 128, "step": 16}, "lora": {"rank": 4},
               "checkpoints": {"every_steps": 2, "sample_prompts": [], "validation_fraction": 0.0},
               "variants": {"higher_rank": {"lora": {"rank": 8}}, "lower_lr": {"lr": 5e-4}},
               "include_base_variant": True}
    spec = {"character": {"name": "demo", "trigger": "sks", "class_word": "person"}, "train": section}
    caption = contract.PlanNode(id="demo:caption", kind="caption", character="demo", config={}, outputs=("dataset",))
    nodes = T.expand(spec, FakeGraph(tmp_path, [caption]))
    assert [n.id for n in nodes] == ["demo:train[base]", "demo:train[higher_rank]", "demo:train[lower_lr]"]
    by = {n.id: n for n in nodes}
    assert by["demo:train[higher_rank]"].config["lora"]["rank"] == 8
    assert by["demo:train[base]"].config["lora"]["rank"] == 4
    assert by["demo:train[lower_lr]"].config["lr"] == 5e-4
    assert all(n.inputs["dataset"] == contract.StageOutputRef("demo:caption", "dataset") for n in nodes)
    assert all("variants" not in n.config for n in nodes)
    json.dumps([n.config for n in nodes])  # JSON-serializable configs
    # without the dataset stage there is nothing to train
    assert T.expand(spec, FakeGraph(tmp_path, [])) == []
    # one node without variants
    plain = T.expand({**spec, "train": {k: v for k, v in section.items() if k != "variants"}},
                     FakeGraph(tmp_path, [caption]))
    assert [n.id for n in plain] == ["demo:train"] and plain[0].config["variant"] is None
    # a typo in a variant fails at plan time, naming the key
    bad = {**spec, "train": {**section, "variants": {"oops": {"lora": {"rnak": 8}}}}}
    with pytest.raises(contract.StageError, match="train.variants.oops.lora"):
        T.expand(bad, FakeGraph(tmp_path, [caption]))
    # two variants, one shared cache: the second encodes nothing
    cache = tmp_path / "shared-cache"
    i1, _ = _run(by["demo:train[base]"].config, dataset, tmp_path / "a", cache)
    i2, _ = _run(by["demo:train[higher_rank]"].config, dataset, tmp_path / "b", cache)
    assert i1["cache"]["misses"]["latents"] > 0
    assert i2["cache"]["misses"] == {"latents": 0, "text": 0}
    assert i2["cache"]["hits"]["latents"] == i1["cache"]["misses"]["latents"]
    assert i1["variant"] == "base" and i2["variant"] == "higher_rank" and i2["rank"] == 8
    k1 = i1["checkpoints"][-1]["kohya"]
    k2 = i2["checkpoints"][-1]["kohya"]
    assert k1 != k2 and "demo-base" in k1 and "demo-higher_rank" in k2


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.stages import train as T
    cfg = json.loads(Path(sys.argv[1]).read_text())
    root = Path(sys.argv[2])
    ctx = LocalStageContext.for_folder(root, stage_id="demo:train")
    ctx.cache_dir = Path(sys.argv[4])
    T.run(cfg, {"dataset": contract.Artifact("dataset", Path(sys.argv[3]))}, ctx)
""")


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(steps=16, lora={"rank": 4, "alpha": 2, "dropout": 0.1}, gradient_accumulation=2,
               lr_scheduler={"name": "cosine", "warmup_steps": 3},
               checkpoints={"every_steps": 4, "keep_last": 2, "sample_prompts": [], "validation_fraction": 0.2})
    cache = tmp_path / "cache"
    ref_index, _ = _run(cfg, dataset, tmp_path / "ref", cache)

    # a child process trains and is killed with SIGKILL just after its first resume state
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run_root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "cfg.json"), str(run_root), str(dataset),
                              str(cache)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = run_root / "scratch" / "state" / "resume.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    assert child.poll() is None, ("the child finished (or crashed) before it could be killed: "
                                  + child.stderr.read().decode()[-2000:])
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    stopped = json.loads(meta.read_text())["step"]
    assert 4 <= stopped < 16 and stopped % 4 == 0
    assert not (run_root / "out" / "lora" / "index.json").exists()
    # the plan says where it resumes
    spe = json.loads(meta.read_text())["steps_per_epoch"]
    assert T.resume_info(run_root / "scratch") == \
        f"resume at step {stopped} of 16 (phase main, epoch {stopped / spe:.3g} of {16 / spe:.3g})"
    assert T.resume_info(tmp_path / "nothing") is None

    index, _ = _run(cfg, dataset, run_root, cache)
    assert index["resumed_from_step"] == stopped
    rows = [r for r in _metrics(run_root) if "loss" in r]
    ref_rows = [r for r in _metrics(tmp_path / "ref") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 17))  # nothing repeated, nothing skipped
    for a, b in zip(rows, ref_rows):
        assert a["lr"] == pytest.approx(b["lr"]) and a["shots"] == b["shots"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b, stopped)
    assert [c["step"] for c in index["checkpoints"]] == [12, 16]
    a = load_file(str(run_root / "out" / "lora" / index["checkpoints"][-1]["diffusers"]))
    b = load_file(str(tmp_path / "ref" / "out" / "lora" / ref_index["checkpoints"][-1]["diffusers"]))
    assert a.keys() == b.keys()
    import torch

    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ref_losses = [h["val_loss"] for h in ref_index["history"]]
    assert [h["val_loss"] for h in index["history"]] == pytest.approx(ref_losses, rel=1e-4)


def test_bad_input_gives_clear_errors(dataset: Path, tmp_path: Path) -> None:
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(contract.StageError, match="dataset.jsonl not found"):
        _run(_cfg(), empty, tmp_path / "r1")
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "img00.png").write_bytes(b"not a png")
    with pytest.raises(contract.StageError, match="img00.png: cannot read the image") as err:
        _run(_cfg(), broken, tmp_path / "r2")
    assert err.value.hint
    with pytest.raises(contract.StageError, match=r"train.phases\[0\] \(only\).mix"):
        _run(_cfg(phases=[{"name": "only", "steps": 1, "mix": {"nonexistent": 1.0}}]), dataset, tmp_path / "r3")
    with pytest.raises(contract.StageError, match="target_modules"):
        _run(_cfg(lora={"target_modules": ["no_such_layer"]}), dataset, tmp_path / "r4")
    with pytest.raises(contract.StageError, match="train.base_model"):
        _run(_cfg(base_model=str(tmp_path / "missing.safetensors")), dataset, tmp_path / "r5")
    assert not (tmp_path / "r3" / "out" / "lora").exists()  # no half-written output


@pytest.mark.slow  # tiny SDXL training: several seconds
def test_sdxl_with_cached_text_buckets_and_class_image_folder(dataset: Path, shared_data: Path, tmp_path: Path) -> None:
    from PIL import Image

    reg = tmp_path / "class"
    reg.mkdir()
    for i, src in enumerate(sorted((shared_data / "faces" / "kit_harington").glob("*.jpg"))[:2]):
        with Image.open(src) as im:
            im.convert("RGB").resize((80, 48)).save(reg / f"c{i}.png")
    cfg = _cfg(base_model="builtin:tiny-sdxl", steps=2, caption_dropout=0.5,
               regularization={"enabled": True, "images": "class", "prior_loss_weight": 1.0},
               checkpoints={"every_steps": 2, "sample_prompts": ["{trigger} {class}"], "validation_fraction": 0.2})
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id="demo:train")
    out = T.run(cfg, {"dataset": contract.Artifact("dataset", dataset),
                      "regularization": contract.Artifact("regularization", reg)}, ctx)
    index = json.loads((out["lora"].path / "index.json").read_text())
    assert index["model_family"] == "sdxl" and index["dataset"]["regularization_images"] == 2
    assert len(index["dataset"]["buckets"]) > 1  # portrait, landscape and square photos
    assert index["cache"]["misses"]["text"] > 0  # SDXL prompt + pooled embeddings cached
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2 and all("prior_loss" in r for r in rows)
    assert index["history"][-1]["val_loss"] is not None
    # expand() turns the folder into a file-set input of the node
    spec = {"character": {"name": "demo", "trigger": "sks", "class_word": "person"},
            "train": {**{k: v for k, v in cfg.items() if k not in ("character", "trigger", "class_word", "variant")}}}
    caption = contract.PlanNode(id="demo:caption", kind="caption", character="demo", config={}, outputs=("dataset",))
    node = T.expand(spec, FakeGraph(tmp_path, [caption]))[0]
    assert isinstance(node.inputs["regularization"], contract.FileSetRef)
    assert node.inputs["regularization"].root == tmp_path / "class"
