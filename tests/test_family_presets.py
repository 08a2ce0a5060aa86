"""Model families as the spec sees them: train.model_family is the registry, every family has a
training preset `runner init --family` starts from, every shipped preset validates and resolves,
train.objective mirrors the registry's Objective, and SD specs keep their node configs (cache keys)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from runner.core.errors import UserError
from runner.diffusion import families
from runner.diffusion.families import base as family_base
from runner.spec import load_spec
from runner.spec import schema as S
from runner.spec.resolve import list_presets
from runner.spec.sections import TrainConfig
from runner.spec.starter import family_starters, starter_for, write_starter

REPO = Path(__file__).resolve().parents[1]
TRAIN_PRESETS = sorted(list_presets("train"))
INFERENCE_PRESETS = sorted(list_presets("inference"))

SPEC = """\
version: 1
character: {{name: hero, trigger: hrochr, class_word: man}}
dataset:
  sources: [{{images: ../photos}}]
{sections}"""


def train_schema() -> dict:
    return S.section_schema("train")["properties"]


def preset_data(folder: str, name: str) -> dict:
    return yaml.safe_load(list_presets(folder)[name].read_text(encoding="utf-8"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "runner.toml").write_text("")
    (tmp_path / "photos").mkdir()
    (tmp_path / "specs").mkdir()
    return tmp_path


def spec_with(project: Path, sections: str):
    path = project / "specs" / "hero.yaml"
    path.write_text(SPEC.format(sections=sections))
    return load_spec(path)


# --------------------------------------------------------------------------- the schema and the registry


def test_model_family_enum_is_auto_and_the_registry():
    enum = train_schema()["model_family"]["enum"]
    assert len(enum) == len(set(enum))
    assert enum[0] == "auto"
    assert set(enum[1:]) == set(families.names()), "train.model_family must list every family in the registry"


def test_base_model_description_names_every_tiny_model():
    text = train_schema()["base_model"]["description"]
    missing = [f"builtin:{f.tiny}" for f in families.all_families() if f"builtin:{f.tiny}" not in text]
    assert not missing, f"train.base_model's description lacks {missing}"


def test_objective_keys_mirror_the_registry_objective():
    """train.objective's keys are fields of families.Objective, its enums within the registry's,
    and every key defaults to null (the family's value): the trainer maps it onto the family's
    Objective with dataclasses.replace."""
    props = train_schema()["objective"]["properties"]
    fields = {f.name for f in dataclasses.fields(family_base.Objective)}
    assert set(props) <= fields
    assert set(props["timestep_sampling"]["enum"]) - {None} <= set(family_base.TIMESTEP_SAMPLING)
    assert set(props["weighting"]["enum"]) - {None} <= set(family_base.WEIGHTINGS)
    assert all(p["default"] is None for p in props.values())
    assert "default" not in train_schema()["objective"], "absent from SD node configs: their keys stay the same"


def test_sd_node_configs_keep_their_keys(project):
    """The demo's SD settings reach the train node exactly as before families: the UNet targets,
    no objective key (a key there would change every SD cache key)."""
    from runner.plan.graph import expand_spec

    spec = spec_with(project, "train: {base_model: 'builtin:tiny-sd'}\n")
    (node,) = [n for n in expand_spec(spec) if n.kind == "train"]
    assert node.config["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert "objective" not in node.config


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_train_preset_validates_and_resolves(project, preset):
    spec = spec_with(project, f"train: {{preset: {preset}}}\n")
    values = preset_data("train", preset)["values"]
    train = spec.config.train
    assert train.base_model == values["base_model"] and train.model_family == values["model_family"]
    assert train.model_family in families.names()
    fam = families.get(train.model_family)
    if fam.denoiser != "unet":  # DiT presets train the family's own targets (null)
        assert train.lora.target_modules is None
    assert train.resolution % fam.size_multiple == 0


def test_every_character_preset_fits_an_80_gb_gpu_by_the_plans_estimate():
    from runner.diffusion import memory

    for preset in TRAIN_PRESETS:
        values = preset_data("train", preset)["values"]
        if str(values["base_model"]).startswith("builtin:"):
            continue
        fam = families.get(values["model_family"])
        est = memory.estimate(fam, memory.Settings.of(TrainConfig.from_dict(values)))
        assert est.peak <= 80 * 2**30, f"{preset}: ~{est.peak / 2**30:.1f} GiB by the plan's estimate"


@pytest.mark.parametrize("preset", INFERENCE_PRESETS)
def test_inference_preset_validates_and_resolves(project, preset):
    spec = spec_with(project, f"evaluate: {{preset: {preset}}}\n")
    values = preset_data("inference", preset)["values"]
    assert spec.config.evaluate.steps == values["steps"]


def test_every_family_has_one_starter_preset():
    starters = family_starters()
    named = [preset_data("train", p)["init"].get("family") for p in TRAIN_PRESETS
             if "init" in preset_data("train", p)]
    for family in families.names():
        assert named.count(family) == 1, f"{family}: one training preset's init block must name it"
        s = starters[family]
        assert s.family == family, f"{s.train}: init.family {family} but model_family {s.family}"
        assert s.evaluate in INFERENCE_PRESETS, f"{s.train}: init.evaluate {s.evaluate!r} is not an inference preset"
    for key, s in starters.items():
        assert s.family in families.names(), f"--family {key}: preset {s.train} has no registry family"
    keys = [k for p in TRAIN_PRESETS for init in [preset_data("train", p).get("init") or {}]
            for k in ([init["family"]] if init.get("family") else []) + list(init.get("names") or [])]
    assert len(keys) == len(set(keys)), f"a --family name is listed by two presets: {sorted(keys)}"


# --------------------------------------------------------------------------- runner init --family


@pytest.mark.parametrize("family", [*families.names(), "flux"])
def test_init_family_writes_a_spec_that_validates_and_plans(project, family):
    from runner.engine.executor import plan_specs

    path = write_starter("hero", project / "specs", family=family)
    for folder in ("photos", "references"):
        (project / "data" / "hero" / folder).mkdir(parents=True)
    spec = load_spec(path)
    want = starter_for(family)
    assert spec.config.train.preset == want.train and spec.config.train.model_family == want.family
    assert spec.config.evaluate.preset == want.evaluate
    plan, ws = plan_specs([spec])
    try:
        trains = [st for st in plan.stages if st.node.kind == "train"]
        assert len(trains) == 1 and trains[0].node.config["model_family"] == want.family
        assert any(st.node.kind == "evaluate" for st in plan.stages)
    finally:
        ws.close()


def test_init_without_family_keeps_training_commented(project):
    text = write_starter("hero", project / "specs").read_text()
    assert "\n# train:\n#   preset: sdxl-character\n" in text and "\ntrain:" not in text


def test_init_unknown_family_names_the_known_ones(project):
    with pytest.raises(UserError) as exc:
        write_starter("hero", project / "specs", family="flux3")
    assert "flux1" in exc.value.hint and "flux" in exc.value.hint
    assert not (project / "specs" / "hero.yaml").exists()


# --------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("doc", ["README.md", "docs/families.md"])
def test_docs_list_every_family_and_its_presets(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    missing = [f"`{n}`" for n in families.names() if f"`{n}`" not in text]
    missing += [f"`builtin:{f.tiny}`" for f in families.all_families() if f"`builtin:{f.tiny}`" not in text]
    missing += [f"`{p}`" for p in TRAIN_PRESETS if "init" in preset_data("train", p) and f"`{p}`" not in text]
    evaluate = {s.evaluate for s in family_starters().values()}
    missing += [f"`{p}`" for p in sorted(evaluate) if f"`{p}`" not in text]
    assert not missing, f"{doc} does not list {missing}"


# --------------------------------------------------------------------------- demo specs per DiT family

DIT_FAMILIES = [f.name for f in families.all_families() if f.denoiser != "unet"]


def demo_spec(family: str) -> Path:
    return REPO / "specs" / f"demo-{family.replace('_', '-')}.yaml"


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_demo_spec_of_each_dit_family_validates_and_plans(family):
    from runner.plan.graph import expand_spec

    spec = load_spec(demo_spec(family))
    fam = families.get(family)
    assert spec.config.train.base_model == f"builtin:{fam.tiny}" and spec.config.train.model_family == family
    kinds = {n.kind for n in expand_spec(spec)}
    assert {"train", "evaluate", "storyboard", "video", "report"} <= kinds


# FLUX.1 (the headline) is also among the cheapest DiT demos: 34 s of CPU from a cold
# cache with the tiny models built (docs/families.md); here the session's own cache builds them
# first (89 s wall measured at load 5 on 2 cores). The other demos validate and plan above.
@pytest.mark.slow  # a whole apply: analysis, training, evaluation, storyboard, clip and report
def test_demo_flux1_applies_end_to_end(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    root = tmp_path / "project"
    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    shutil.copy(demo_spec("flux1"), root / "specs" / "demo.yaml")
    shutil.copytree(REPO / "specs" / "demo", root / "specs" / "demo")
    r = subprocess.run([sys.executable, "-m", "runner.cli", "apply", "specs/demo.yaml"], cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Report for demo_flux1:" in r.stdout
    indexes = list((root / ".runner" / "store").glob("*/lora/index.json"))
    assert indexes and json.loads(indexes[0].read_text())["model_family"] == "flux1"


def test_a_flux1_folder_with_the_flux_preset_plans_the_same_stages_as_sdxl(project):
    """The issue's user: a FLUX.1 diffusers folder (here its model index only: planning reads no
    weights), photos, `train.preset: flux-character`: the same stages as `sdxl-character`."""
    import json
    import shutil

    from runner.plan.graph import expand_spec

    (project / "models" / "FLUX.1-dev").mkdir(parents=True)
    (project / "models" / "FLUX.1-dev" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (project / "refs").mkdir()
    shutil.copy(REPO / "specs" / "demo" / "references" / "obama_01.jpg", project / "refs" / "r.jpg")
    common = "evaluate: {preset: tiny-demo}\ngenerate: {storyboard: {story: He walks in. He smiles.}}\n"

    def stages(train: str) -> tuple[dict, set]:
        path = project / "specs" / "hero.yaml"
        path.write_text(SPEC.format(sections=f"train: {train}\n{common}").replace("class_word: man", "class_word: man, "
                                                                                   "references: [../refs]"))
        nodes = expand_spec(load_spec(path))
        return next(n for n in nodes if n.kind == "train").config, {n.id.split(":", 1)[1] for n in nodes}

    flux, flux_stages = stages("{preset: flux-character, base_model: ../models/FLUX.1-dev}")
    _, sdxl_stages = stages("{preset: sdxl-character}")
    assert flux_stages == sdxl_stages
    assert flux["model_family"] == "flux1" and flux["lora"]["target_modules"] is None
