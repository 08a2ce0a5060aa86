"""The spec language: safe YAML, schema validation with every problem at once, presets, paths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.spec import SpecError, load_spec, load_specs
from runner.spec import schema as S
from runner.spec.yamlio import YamlError, load_yaml_text

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
version: 1
character:
  name: hero
  trigger: hrochr
"""


def write(project: Path, text: str, name: str = "hero.yaml") -> Path:
    p = project / "specs" / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("name", ["valentina", "luca", "aldar_kose", "demo"])
def test_user_specs_validate(name):
    spec = load_spec(REPO / "specs" / f"{name}.yaml", require_files=(name == "demo"))
    assert spec.name == name
    # fully explicit: defaults filled in everywhere
    assert "analysis" in spec.data["dataset"]
    assert spec.data["hardware"]["backend"] in ("local", "modal")


def test_user_specs_use_their_features():
    luca = load_spec(REPO / "specs" / "luca.yaml", require_files=False).data
    assert [p["name"] for p in luca["train"]["phases"]] == ["foundation", "refinement", "polish"]
    assert set(luca["train"]["variants"]) == {"higher_rank", "lower_lr"}
    assert luca["dataset"]["shots"]["strategy"] == "augment"
    aldar = load_spec(REPO / "specs" / "aldar_kose.yaml", require_files=False).data
    assert aldar["generate"]["storyboard"]["planner"] == "rules"
    assert aldar["generate"]["video"]["fidelity"]["fail"] == 30
    assert aldar["generate"]["video"]["family"] == "wan22_ti2v"
    assert aldar["generate"]["video"]["model"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # from the preset
    assert aldar["train_video"]["frame_buckets"] == [1, 17, 33] and aldar["train_video"]["base_model"] is None
    val = load_spec(REPO / "specs" / "valentina.yaml", require_files=False).data
    assert val["train"]["resolution"] == 1024  # from the sdxl-character preset
    assert val["train"]["steps"] == 2400  # the spec overrides the preset key by key
    assert val["train"]["lora"]["rank"] == 32 and val["train"]["lora"]["alpha"] == 16


def test_every_schema_field_is_documented():
    missing = []
    for path, sub in S.iter_schema_fields(S.root_schema(), S.root_uri()):
        if "description" not in sub:
            missing.append((".".join(map(str, path)), "description"))
        if "type" not in sub and "oneOf" not in sub and "const" not in sub and "$ref" not in sub:
            missing.append((".".join(map(str, path)), "type"))
    assert not missing, missing


def test_schema_is_valid_draft_2020_12():
    from jsonschema import Draft202012Validator

    for f in sorted((REPO / "schemas").rglob("*.schema.json")):
        Draft202012Validator.check_schema(json.loads(f.read_text()))


def test_all_problems_reported_at_once_with_positions(project):
    p = write(project, """\
        version: 1
        character:
          name: Hero Name
          trigger: hrochr
          clas_word: man
        dataset:
          shots:
            strategy: balance
            targets: {closeup: [0.1, 0.2]}
        train:
          lorra: {rank: 4}
          lr: fast
        """)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    probs = {pr.key_path: pr for pr in ei.value.problems}
    assert set(probs) >= {"character.name", "character.clas_word", "dataset.shots.strategy",
                          "dataset.shots.targets.closeup", "train.lorra", "train.lr"}
    assert probs["character.clas_word"].line == 5 and probs["character.clas_word"].col == 3
    assert "did you mean 'class_word'" in probs["character.clas_word"].hint
    assert "did you mean 'lora'" in probs["train.lorra"].hint
    assert "close_up" in probs["dataset.shots.targets.closeup"].hint
    assert probs["train.lr"].line == 12
    assert "report, select, reweight, augment" in probs["dataset.shots.strategy"].expected
    text = ei.value.render()
    assert f"{p}:5:3: character.clas_word: unknown key" in text


def test_missing_required_and_wrong_type(project):
    p = write(project, """\
        version: 1
        character:
          name: hero
        dataset:
          sources: {images: photos}
        """)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msgs = [(pr.key_path, pr.message) for pr in ei.value.problems]
    assert ("character", "missing required key 'trigger'") in msgs
    assert any(k == "dataset.sources" and "not a list" in m for k, m in msgs)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: !!python/object/apply:os.system ['echo hi']\n", "is not allowed"),
        ("a: !custom 1\n", "is not allowed"),
        ("a: [1, 2\n", "YAML syntax error"),
        ("a: 1\n---\nb: 2\n", "several YAML documents"),
    ],
)
def test_unsafe_or_broken_yaml_is_refused(text, needle):
    with pytest.raises(YamlError) as ei:
        load_yaml_text(text, "x.yaml")
    assert needle in str(ei.value)
    assert str(ei.value).startswith("x.yaml:")


def test_alias_bomb_is_bounded():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    prev = "a"
    for name in "bcdefgh":
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
        prev = name
    with pytest.raises(YamlError) as ei:
        load_yaml_text("\n".join(lines) + "\n", "bomb.yaml")
    assert "alias bomb" in str(ei.value)


def test_yaml_problems_become_spec_errors(project):
    p = write(project, MINIMAL + "character:\n  name: again\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "duplicate key 'character'" in ei.value.render()
    empty = write(project, "", "empty.yaml")
    with pytest.raises(SpecError, match="the file is empty"):
        load_spec(empty)
    lst = write(project, "- a\n- b\n", "list.yaml")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(lst)


def test_paths_resolve_relative_to_spec_and_escape_is_refused(project, tmp_path):
    (project / "data" / "photos").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    p = write(project, MINIMAL + "dataset:\n  sources:\n    - images: ../data/photos\n    - images: ../../outside\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    (prob,) = ei.value.problems
    assert prob.key_path == "dataset.sources[1].images"
    assert "outside the project folder" in prob.message and "--allow-outside-project" in prob.hint
    spec = load_spec(p, allow_outside=True)
    assert spec.data["dataset"]["sources"][0]["images"] == "data/photos"  # project-relative
    assert spec.data["dataset"]["sources"][1]["images"] == str(outside.resolve())


def test_missing_data_path(project):
    p = write(project, MINIMAL + "dataset:\n  sources:\n    - images: ../data/nope\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    assert "path not found" in ei.value.render()
    assert load_spec(p, require_files=False).name == "hero"


def test_presets_are_overridden_key_by_key(project):
    p = write(project, MINIMAL + "train:\n  preset: sdxl-character\n  lora: {rank: 8}\n  lr: 2.0e-4\n")
    data = load_spec(p).data["train"]
    assert data["lora"]["rank"] == 8  # user
    assert data["lora"]["alpha"] == 16  # preset (sibling key kept)
    assert data["lr"] == 2e-4
    assert data["resolution"] == 1024  # preset
    assert data["noise_offset"] == pytest.approx(0.0357)
    assert data["seed"] == 42  # schema default


def test_unknown_preset_and_bad_variant(project):
    p = write(project, MINIMAL + "train:\n  preset: sdxl-charactr\n"
              "  variants:\n    big: {lora: {rank: -1}}\n    ok: {lr: 1.0e-5}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    probs = {pr.key_path: pr for pr in ei.value.problems}
    assert "did you mean 'sdxl-character'" in probs["train.preset"].hint
    assert "train.variants.big.lora.rank" in probs
    assert not any(k.startswith("train.variants.ok") for k in probs)


def test_semantic_checks(project):
    p = write(project, MINIMAL + textwrap.dedent("""\
        dataset:
          shots:
            targets: {close_up: [0.5, 0.2]}
        generate:
          storyboard: {planner: manual, min_scenes: 8, max_scenes: 6}
        """))
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    text = ei.value.render()
    assert "min 0.5 is greater than max 0.2" in text
    assert "min_scenes 8 is greater than max_scenes 6" in text
    assert "planner 'manual' needs a list of scenes" in text


def test_batch_reports_problems_of_every_file(project):
    a = write(project, MINIMAL.replace("trigger: hrochr", "trigger: 'two words'"), "a.yaml")
    b = write(project, MINIMAL + "bogus: 1\n", "b.yaml")
    with pytest.raises(SpecError) as ei:
        load_specs([project / "specs"])
    files = {pr.file for pr in ei.value.problems}
    assert files == {str(a), str(b)}


def test_init_writes_a_valid_commented_starter(project, monkeypatch):
    from runner.spec.starter import write_starter

    monkeypatch.chdir(project)
    path = write_starter("my_hero", Path("specs"))
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    schema_ref = (path.parent / first.split("=", 1)[1]).resolve()
    assert schema_ref.is_file() and json.loads(schema_ref.read_text())["title"] == "character-runner spec"
    spec = load_spec(path, require_files=False)
    assert spec.name == "my_hero"
    with pytest.raises(SpecError, match="already exists"):
        write_starter("my_hero", Path("specs"))
    with pytest.raises(SpecError, match="not a valid character name"):
        write_starter("My Hero", Path("specs"))


def test_cli_validate_exit_code_and_no_traceback(project):
    bad = write(project, MINIMAL + "bogus: 1\n")
    r = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}:5:1: bogus: unknown key 'bogus'" in r.stderr


def test_a_sections_default_preset_is_applied(project):
    p = write(project, MINIMAL + "generate:\n  video: {frames: 17}\n")
    video = load_spec(p).data["generate"]["video"]
    assert video["preset"] == "baseline"
    assert (video["steps"], video["guidance"], video["image_conditioning"]) == (10, 1.0, 1.0)
    assert video["frames"] == 17
