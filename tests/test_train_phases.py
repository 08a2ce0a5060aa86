"""Train phases given in steps or in epochs: the schema takes either (one of the two), the trainer
turns epochs into steps from the dataset it trains on, the plan shows both (steps per epoch from
the captioned dataset when the store holds it), and a resumed run continues the same steps."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from runner.diffusion.data import Example
from runner.diffusion.trainer import describe_phases, epoch_steps, phases_of
from runner.core import contract
from runner.stages import train as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset, two_photo_project  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_phases(rng: random.Random) -> list[dict]:
    out = []
    for i in range(rng.randint(1, 4)):
        p = {"name": f"p{i}", "lr": rng.choice([None, 1e-4])}
        p["epochs" if rng.random() < 0.5 else "steps"] = rng.randint(1, 9)
        out.append(p)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_epochs_become_steps_contiguously(seed: int) -> None:
    rng = random.Random(seed)
    cfg = {"lr": 2e-4, "steps": 50, "phases": random_phases(rng)}
    images = [Example(id=str(i), image=Path("x.png"), caption="c", shot="medium", categories=["medium"],
                      repeats=rng.randint(1, 4)) for i in range(rng.randint(1, 12))]
    bs, ga = rng.randint(1, 4), rng.randint(1, 3)
    spe = epoch_steps(images, bs, ga)
    assert spe == -(-sum(e.repeats for e in images) // (bs * ga))  # ceil: the last batch may be partial
    phases = phases_of(cfg, spe)
    start = 0
    for raw, ph in zip(cfg["phases"], phases):
        assert ph.start == start
        assert ph.steps == (raw["epochs"] * spe if "epochs" in raw else raw["steps"])
        assert ph.epochs == raw.get("epochs")
        assert ph.lr == (raw["lr"] or 2e-4)
        start = ph.end
    line = describe_phases(cfg, spe, "how")
    for ph in phases:
        assert f"{ph.name} steps {ph.start + 1}-{ph.end}" in line
        if ph.epochs and ph.start % spe == 0:
            first = ph.start // spe + 1
            assert (f"epochs {first}-{first + ph.epochs - 1}" if ph.epochs > 1 else f"epoch {first}") in line
    # before the dataset is known, epoch phases (and what follows them) have no step range yet
    unknown = phases_of(cfg, None)
    first_epoch = next((i for i, p in enumerate(cfg["phases"]) if "epochs" in p), None)
    for i, ph in enumerate(unknown):
        assert (ph.end is None) == (first_epoch is not None and i >= first_epoch)
    assert "known once the caption stage has run" in describe_phases(cfg, None) or first_epoch is None


def test_the_guides_plan_in_epochs() -> None:
    cfg = {"lr": 1e-4, "steps": 1, "phases": [{"name": "foundation", "epochs": 6}, {"name": "refinement", "epochs": 6},
                                            {"name": "polish", "epochs": 4}]}
    assert describe_phases(cfg, 6, "6 images").startswith(
        "phases: foundation steps 1-36 = epochs 1-6; refinement steps 37-72 = epochs 7-12; "
        "polish steps 73-96 = epochs 13-16")


@pytest.mark.parametrize("phase, message", [
    ({"name": "a", "steps": 3, "epochs": 2}, "needs exactly one of 'steps', 'epochs' (has both steps and epochs)"),
    ({"name": "a"}, "needs exactly one of 'steps', 'epochs' (has none of them)"),
    ({"name": "a", "epochs": 0}, "epochs"),
])
def test_schema_takes_steps_or_epochs(phase, message, tmp_path: Path) -> None:
    import yaml

    from runner.spec import load_spec
    from runner.spec.errors import SpecError

    (tmp_path / "runner.toml").write_text("")
    spec = tmp_path / "hero.yaml"
    spec.write_text(yaml.safe_dump({"version": 1, "character": {"name": "hero", "trigger": "hrochr"},
                                    "train": {"phases": [{"name": "ok", "epochs": 2}, phase]}}))
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "train.phases[1]" in str(err.value) and message in str(err.value)
    spec.write_text(yaml.safe_dump({"version": 1, "character": {"name": "hero", "trigger": "hrochr"},
                                    "train": {"phases": [{"name": "ok", "epochs": 2}, {"name": "b", "steps": 4}]}}))
    assert load_spec(spec).data["train"]["phases"][0]["epochs"] == 2


@pytest.fixture(scope="module")
def dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(shared_data, tmp_path_factory.mktemp("ds") / "dataset")  # 6 images, repeats 1


def _cfg(**over) -> dict:
    from runner.spec.resolve import deep_merge

    section = {"base_model": "builtin:tiny-sd", "resolution": 64,
               "buckets": {"min_side": 32, "max_side": 128, "step": 16},
               "lora": {"rank": 4, "alpha": 2}, "lr": 1e-3, "batch_size": 2, "mixed_precision": "no",
               "phases": [{"name": "foundation", "epochs": 1}, {"name": "polish", "epochs": 1, "lr": 2e-4}],
               "checkpoints": {"every_steps": 100, "keep_last": 2, "sample_prompts": [], "validation_fraction": 0.2}}
    return T.train_config(deep_merge(section, over), character="demo", trigger="sks", class_word="person")


@pytest.mark.slow  # about 5 s: trains twice
def test_trainer_runs_epoch_phases_and_resumes_them(dataset: Path, tmp_path: Path) -> None:
    from runner.diffusion.trainer import LoraTrainer, dataset_steps_per_epoch

    cfg = _cfg()
    spe, how = dataset_steps_per_epoch(dataset, cfg)
    assert spe == 3 and "5 training images" in how  # 6 images, one held out, batch 2: ceil(5 / 2)

    def trainer(root: Path, **kw) -> LoraTrainer:
        return LoraTrainer(cfg, dataset_dir=dataset, out_dir=root / "out", scratch_dir=root / "scratch",
                           cache_dir=tmp_path / "cache", device="cpu", **kw)

    ref = trainer(tmp_path / "ref").run()
    assert [(p["name"], p["start"], p["steps"], p["epochs"]) for p in ref["phases"]] == \
        [("foundation", 0, 3, 1), ("polish", 3, 3, 1)]
    assert ref["total_steps"] == 6 and ref["steps_per_epoch"] == 3
    assert [(c["step"], c["phase"]) for c in ref["checkpoints"]] == [(3, "foundation"), (6, "polish")]
    rows = [json.loads(x) for x in (tmp_path / "ref" / "scratch" / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["phase"] for r in rows] == ["foundation"] * 3 + ["polish"] * 3
    assert [r["epoch"] for r in rows][2::3] == [1.0, 2.0]

    # a run stopped after the first phase resumes at step 3 and trains the same steps
    assert trainer(tmp_path / "run", stop_after_step=3).run() == {"stopped_at": 3}
    assert T.resume_info(tmp_path / "run" / "scratch") == "resume at step 3 of 6 (phase foundation, epoch 1 of 2)"
    index = trainer(tmp_path / "run").run()
    assert index["resumed_from_step"] == 3 and index["total_steps"] == 6
    again = [json.loads(x) for x in (tmp_path / "run" / "scratch" / "logs" / "metrics.jsonl").read_text().splitlines()]
    again = [r for r in again if "loss" in r]
    assert [r["step"] for r in again] == list(range(1, 7))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-4, abs=1e-6)


def test_plan_shows_steps_and_epochs(dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(phases=[{"name": "foundation", "epochs": 2}, {"name": "polish", "steps": 4}])
    waiting = T.plan_notes(cfg, {"dataset": None})
    assert waiting[1].startswith("model: Stable Diffusion 1.5 (sd15): LoRA on the unet")
    assert waiting[:1] == ["phases: foundation 2 epochs; polish 4 steps (steps of phases in epochs are known once the "
                       "caption stage has run: ceil(images x repeats after the validation hold-out / "
                       "(batch_size x gradient_accumulation)) per epoch)"]
    known = T.plan_notes(cfg, {"dataset": contract.Artifact("dataset", dataset)})
    assert known[:1] == ["phases: foundation steps 1-6 = epochs 1-2; polish steps 7-10 = 1.3 epochs "
                         "(3 steps per epoch: 5 training images, 6 with repeats, / (batch 2 x accumulation 1))"]
    # the plan line label names the length as given
    assert T._length(cfg) == "4 steps + 2 epochs"


def test_runner_plan_prints_the_phases_from_the_stored_dataset(project: Path, shared_data: Path) -> None:
    from runner.engine.executor import ApplyOptions, apply, plan_specs
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    spec = two_photo_project(project, shared_data,
                             "train:\n  preset: tiny-demo\n  batch_size: 1\n  checkpoints: {validation_fraction: 0}\n"
                             "  phases: [{name: foundation, epochs: 3}, {name: polish, epochs: 1}]\n")

    def phases_note() -> str:
        plan, ws = plan_specs([load_spec(spec)])
        ws.close()
        return next(n for n in plan.by_id("hero:train").notes if n.startswith("phases:"))

    assert "known once the caption stage has run" in phases_note()
    res = apply([load_spec(spec)], ApplyOptions(only=["caption"]), QuietReporter())
    assert res.status == "succeeded", [(r.stage_id, r.error) for r in res.failed]
    assert phases_note().startswith(
        "phases: foundation steps 1-6 = epochs 1-3; polish steps 7-8 = epoch 4 (2 steps per epoch")
