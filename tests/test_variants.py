"""Train variants: precedence (variant over phase over section) and no-op variants refused.

The no-op cases are generated from the train schema: every key overridden with the value the
section already has must be refused (exit 2, file:line:col, naming both stages), and every key
overridden with another value must be accepted, unless the key is one the trainer does not use
in that configuration (steps beside phases, settings of a disabled regularization, ...).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.spec import load_spec
from runner.spec import schema as S
from runner.spec.errors import SpecError
from runner.spec.variants import PLAN_ONLY, variant_notes

REPO = Path(__file__).resolve().parents[1]

HEAD = """\
version: 1
character: {name: hero, trigger: hrochr}
"""
PHASED = {
    "lr": 1.0e-4,
    "phases": [{"name": "first", "steps": 10, "lr": 2.0e-4, "mix": "balanced"},
               {"name": "second", "steps": 10}],
}


def write_spec(project: Path, train: dict[str, Any], name: str = "hero.yaml") -> Path:
    p = project / "specs" / name
    p.write_text(HEAD + yaml.safe_dump({"train": train}, sort_keys=False))
    return p


def train_leaves() -> list[tuple[tuple, dict]]:
    """(path inside train, schema) of every overridable leaf key of the train section."""
    sch = S.section_schema("train")
    out = []
    for path, sub in S.iter_schema_fields(sch, sch["$id"]):
        if path[0] in PLAN_ONLY or "[]" in path or "<name>" in path or sub.get("properties"):
            continue
        out.append((path, sub))
    return out


def nested(path: tuple, value: Any) -> dict:
    out: Any = value
    for k in reversed(path):
        out = {k: out}
    return out


def resolved_value(section: dict, path: tuple) -> Any:
    """The key's value in the resolved section; an object the resolver leaves out while it holds
    only defaults (train.memory, train.objective: node configs unchanged) gives the default."""
    for k in path:
        if k not in section:
            return _default(path)
        section = section[k]
    return section


def _default(path: tuple) -> Any:
    from runner.spec.config import schema_default

    return schema_default("train", *path)


def other_value(value: Any, sub: dict) -> Any:
    if "enum" in sub:
        return next(o for o in sub["enum"] if o != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if sub.get("multipleOf") else value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value + [value[0] if value else 1]
    if value is None:
        types = sub.get("type") if isinstance(sub.get("type"), list) else [sub.get("type")]
        return 3 if "integer" in types else 0.5 if "number" in types else "x"
    raise AssertionError(f"no other value for {value!r}")


def problems_of(spec_file: Path) -> list[str]:
    try:
        load_spec(spec_file, require_files=False)
    except SpecError as exc:
        return [p.render() for p in exc.problems]
    return []


# Keys the trainer does not read with PHASED (phases set; regularization, text encoder off).
UNUSED_WITH_PHASES = {("steps",), ("lora", "text_encoder_lr"), ("keep_tokens",), ("caption_variants",),
                      ("lr_scheduler", "num_cycles")} | {
    ("regularization", k) for k in ("images", "count", "prompt", "prior_loss_weight", "steps")}


# A variant's lr is every phase's lr: the section's own lr differs from the first phase's, so it
# is a change (test_a_variant_lr_equal_to_every_phase_is_refused covers the no-op).
@pytest.mark.parametrize("path", [p for p, _ in train_leaves() if p != ("lr",)], ids=lambda p: ".".join(p))
def test_a_variant_with_the_sections_own_value_is_refused(project, path):
    base_spec = load_spec(write_spec(project, PHASED, "base.yaml"), require_files=False)
    same = resolved_value(base_spec.data["train"], path)
    spec_file = write_spec(project, {**PHASED, "variants": {"same": nested(path, same)}})
    probs = [p for p in problems_of(spec_file) if "train.variants.same" in p]
    assert len(probs) == 1, f"train.variants.same: {{{'.'.join(path)}: {same!r}}} must be refused: {probs}"
    text = probs[0]
    assert re.match(rf"{re.escape(str(spec_file))}:\d+:\d+: train\.variants\.same: ", text), text
    assert "hero:train[same]" in text and "hero:train[base]" in text


@pytest.mark.parametrize("path", [p for p, _ in train_leaves()], ids=lambda p: ".".join(p))
def test_a_variant_that_changes_a_used_key_is_accepted_and_shown(project, path):
    sub = dict(train_leaves())[path]
    base_spec = load_spec(write_spec(project, PHASED, "base.yaml"), require_files=False)
    value = other_value(resolved_value(base_spec.data["train"], path), sub)
    spec_file = write_spec(project, {**PHASED, "variants": {"changed": nested(path, value)}})
    probs = [p for p in problems_of(spec_file) if "train.variants.changed" in p]
    if path in UNUSED_WITH_PHASES:
        assert probs and "changes nothing" in probs[0] and "unused" in probs[0], probs
        return
    assert not probs, probs
    notes = variant_notes(load_spec(spec_file, require_files=False).data["train"], "changed")
    assert notes != ["no effective difference"] and any(n.startswith(".".join(path)) or "phases" in n for n in notes)


def test_a_variant_lr_equal_to_every_phase_is_refused(project):
    phases = [{"name": "a", "steps": 5, "lr": 3.0e-5}, {"name": "b", "steps": 5, "lr": 3.0e-5}]
    probs = problems_of(write_spec(project, {"lr": 1.0e-4, "phases": phases, "variants": {"v": {"lr": 3.0e-5}}}))
    assert len(probs) == 1 and "hero:train[v]" in probs[0] and "hero:train[base]" in probs[0], probs


def test_two_identical_variants_name_each_other(project):
    spec_file = write_spec(project, {**PHASED, "include_base_variant": False,
                                     "variants": {"a": {"lora": {"rank": 64}}, "b": {"lora": {"rank": 64}}}})
    probs = problems_of(spec_file)
    assert len(probs) == 1 and "hero:train[b]" in probs[0] and "hero:train[a]" in probs[0], probs


def test_precedence_variant_over_phase_over_section(project):
    from runner.stages.train import train_config

    spec = load_spec(write_spec(project,
                                {**PHASED, "variants": {"low": {"lr": 5.0e-5}, "rank": {"lora": {"rank": 8}}}}),
                     require_files=False)
    section = spec.data["train"]
    cfg = lambda v: train_config(section, character="hero", trigger="t", class_word="c", variant=v,  # noqa: E731
                                 overrides=section["variants"].get(v))
    assert [p["lr"] for p in cfg("low")["phases"]] == [5.0e-5, 5.0e-5]  # variant over phase
    assert [p.get("lr") for p in cfg("rank")["phases"]] == [2.0e-4, None]  # a phase's own, else the section's
    assert variant_notes(section, "low") == ["phases[0].lr 0.0002 -> 5e-05", "phases[1].lr 0.0001 -> 5e-05"]
    # an unchanged variant keeps the exact config it had before variants had precedence rules
    assert cfg("rank")["lora"]["rank"] == 8 and cfg("rank")["lr"] == 1.0e-4


def test_cli_validate_exits_2_and_plan_resolved_shows_the_differences(project):
    spec_file = write_spec(project, {**PHASED, "variants": {"low": {"lr": 5.0e-5}, "more": {"steps": 99}}})
    run = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(spec_file)],
                         capture_output=True, text=True, cwd=project)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "train.variants.more" in run.stderr and "steps" in run.stderr and "Traceback" not in run.stderr
    write_spec(project, {**PHASED, "variants": {"low": {"lr": 5.0e-5}}})
    run = subprocess.run([sys.executable, "-m", "runner.cli", "plan", "--resolved", str(spec_file)],
                         capture_output=True, text=True, cwd=project)
    assert run.returncode == 0, run.stderr
    assert "#   low: phases[0].lr 0.0002 -> 5e-05; phases[1].lr 0.0001 -> 5e-05" in run.stdout


def test_shipped_luca_variants_each_change_training():
    spec = load_spec(REPO / "specs" / "luca.yaml", require_files=False)
    train = spec.data["train"]
    for name in train["variants"]:
        assert variant_notes(train, name) != ["no effective difference"], name
    assert variant_notes(train, "lower_lr") == ["phases[0].lr 0.0001 -> 8e-05", "phases[1].lr 6e-05 -> 4.8e-05",
                                                "phases[2].lr 2e-05 -> 1.6e-05"]


def test_plan_prints_each_variants_effective_differences(tmp_path):
    """`runner plan` on the demo with two variants: each variant's line is followed by what it changes."""
    import shutil

    root = tmp_path / "proj"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    shutil.copytree(REPO / "specs" / "demo", root / "specs" / "demo")
    text = (REPO / "specs" / "demo.yaml").read_text()
    assert "train:\n  preset: tiny-demo\n" in text
    text = text.replace("train:\n  preset: tiny-demo\n", "train:\n  preset: tiny-demo\n" + yaml.safe_dump(
        {"phases": PHASED["phases"], "variants": {"low": {"lr": 5.0e-5}, "rank8": {"lora": {"rank": 8}}}},
        sort_keys=False).replace("\n", "\n  ").join(["  ", ""]).rstrip() + "\n", 1)
    (root / "specs" / "demo.yaml").write_text(text)
    run = subprocess.run([sys.executable, "-m", "runner.cli", "plan", "specs/demo.yaml"],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    low = next(i for i, line in enumerate(lines) if "demo:train[low]" in line)
    assert lines[low + 1].strip() == ("variant low vs the train section: "
                                      "phases[0].lr 0.0002 -> 5e-05; phases[1].lr 0.001 -> 5e-05")
    rank = next(i for i, line in enumerate(lines) if "demo:train[rank8]" in line)
    assert lines[rank + 1].strip() == "variant rank8 vs the train section: lora.rank 4 -> 8"


def _integer_leaves() -> list[tuple]:
    return [p for p, sub in train_leaves() if "integer" in (sub.get("type") if isinstance(sub.get("type"), list)
                                                              else [sub.get("type")])]


@pytest.mark.parametrize("path", _integer_leaves(), ids=lambda p: ".".join(p))
def test_an_integer_written_as_a_float_is_the_same_value(project, path):
    """``steps: 8.0`` resolves to 8: a variant that only rewrites an integer key as a float is
    refused, and the train stage's config (its cache key) is the same as with the integer."""
    base_spec = load_spec(write_spec(project, PHASED, "base.yaml"), require_files=False)
    same = resolved_value(base_spec.data["train"], path)
    if same is None:
        same = 3
        base_spec = load_spec(write_spec(project, {**PHASED, **nested(path, 3)}, "base.yaml"), require_files=False)
    spec_file = write_spec(project, {**PHASED, **nested(path, same),
                                     "variants": {"as_float": nested(path, float(same))}})
    probs = [p for p in problems_of(spec_file) if "train.variants.as_float" in p]
    assert probs and "changes nothing" in probs[0], probs
    as_float = load_spec(write_spec(project, {**PHASED, **nested(path, float(same))}, "f.yaml"), require_files=False)
    assert resolved_value(as_float.data["train"], path) == same
    assert type(resolved_value(as_float.data["train"], path)) is int


@pytest.mark.parametrize("name", S.section_schema("train")["properties"]["lr_scheduler"]["properties"]["name"]["enum"])
def test_scheduler_settings_called_unused_are_the_ones_get_scheduler_ignores(name):
    """What variants call unused for each schedule is checked against diffusers' own schedules:
    a setting is unused exactly when changing it leaves every step's learning rate the same."""
    import torch
    from diffusers.optimization import get_scheduler

    from runner.spec.variants import _unused_settings

    def rates(warmup: int, cycles: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        kw = {"step_rules": "1:10,0.1"} if name == "piecewise_constant" else {}
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=40, num_cycles=cycles, **kw)
        out = []
        for _ in range(40):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    unused = {path[-1] for path, _ in _unused_settings({"lr_scheduler": {"name": name}, "shuffle_tags": True})}
    assert ("warmup_steps" in unused) == (rates(0, 1) == rates(10, 1))
    assert ("num_cycles" in unused) == (rates(5, 1) == rates(5, 3))


@pytest.mark.parametrize("names", [["renamed", "second"], ["first", "other"], ["x", "y"]])
def test_a_variant_that_only_renames_phases_is_refused(project, names):
    """Phase names are labels (logs, LoRA metadata): the same phases under other names train the
    same LoRA; changing a phase's steps, lr or mix next to the rename is still a change."""
    renamed = [{**p, "name": n} for p, n in zip(PHASED["phases"], names)]
    spec_file = write_spec(project, {**PHASED, "variants": {"renamed": {"phases": renamed}}})
    probs = [p for p in problems_of(spec_file) if "train.variants.renamed" in p]
    assert probs and "phase names are labels" in probs[0], probs
    changed = [{**renamed[0], "mix": "natural"}, renamed[1]]
    spec_file = write_spec(project, {**PHASED, "variants": {"renamed": {"phases": changed}}})
    assert not [p for p in problems_of(spec_file) if "train.variants.renamed" in p]
