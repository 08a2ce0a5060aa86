"""Typed section configs (runner.spec.sections): the schema is the one source of keys and defaults.

The walk below goes over the schema with the validator's own walker (runner.spec.schema.walk_fields:
nested objects, list items, named entries, oneOf branches) and checks, for every property of
every section, that the typed view has a field for it, that the field's default is the schema's
(objects compared with their defaults filled) and that its Python type fits the schema's type.
"""

import copy
import json
import pickle
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import pytest

from runner.spec import schema as S
from runner.spec import sections as T
from runner.spec.config import (ConfigError, FrozenDict, fields, is_config_class, node_field, replace, schema_config,
                                schema_fields, to_plain)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {f.name: f.type for f in fields(T.SpecConfig) if f.name != "version"}
PY_OF = {"string": str, "integer": int, "number": float, "boolean": bool, "null": type(None),
         "array": tuple, "object": Mapping}


def _members(tp):
    """The types of a union without None (a plain type: itself)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _config_field(tp, key):
    configs = [m for m in _members(tp) if is_config_class(m)]
    assert configs, f"{tp} has no config class to hold {key!r}"
    table = {f.name: f for f in fields(configs[0])}
    assert key in table, f"{configs[0].__name__} has no field {key!r}"
    return table[key]


def _item_type(tp, key):
    """The type of a list's items ('[]') or of a mapping's entries ('<name>')."""
    members = _members(tp)
    if key == "[]":
        return typing.get_args(next(m for m in members if typing.get_origin(m) is tuple))[0]
    configs = [m for m in members if is_config_class(m)]
    if configs:  # a oneOf whose object branch has the named entries, e.g. evaluate.suite
        return configs[0]
    return typing.get_args(next(m for m in members if typing.get_origin(m) is Mapping))[1]


def _walk(section):
    sch = S.section_schema(section)
    yield from S.walk_fields(sch, sch["$id"])


def _field_at(section, path):
    """The typed field for the schema property at ``path`` (walk_fields' key paths)."""
    tp, field = SECTIONS[section], None
    for key in path:
        if key in ("[]", "<name>"):
            tp, field = _item_type(tp, key), None
        else:
            field = _config_field(tp, key)
            tp = field.type
    return field


def _required_paths(section):
    """Key paths the schema requires (an object's 'required', not a oneOf branch's)."""
    sch = S.section_schema(section)
    nodes = [((), sch, sch["$id"]), *_walk(section)]
    out = set()
    for path, sub, uri in nodes:
        forms = [((), b) for b in S.branches(sub, uri) if b.get("properties")]
        for suffix, key, present in ((("[]",), 0, "items"), (("<name>",), "<name>", "additionalProperties")):
            if isinstance(sub.get(present), dict):
                item, item_uri = S.child_schema(sub, uri, key)
                forms += [(suffix, b) for b in S.branches(item, item_uri) if b.get("properties")]
        for suffix, obj in forms:
            out |= {path + suffix + (k,) for k in obj.get("required", [])}
    return out


ALL_PATHS = [(section, path) for section in SECTIONS for path, _, _ in _walk(section)]


def test_the_walk_covers_every_section_and_nested_kind():
    kinds = {part for _, path in ALL_PATHS for part in path if part in ("[]", "<name>")}
    assert kinds == {"[]", "<name>"} and len(ALL_PATHS) > 250
    assert set(SECTIONS) == set(S.root_schema()["properties"]) - {"$schema", "version"}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_schema_property_has_a_typed_field_with_the_schema_default(section):
    required = _required_paths(section)
    checked = 0
    for path, sub, uri in _walk(section):
        f = _field_at(section, path)
        where = f"{section}.{'.'.join(path)}"
        assert f is not None, f"{where}: no typed field"
        if "default" in sub:
            want = S.fill_defaults(copy.deepcopy(sub["default"]), sub, uri)
            assert to_plain(f.default) == want, f"{where}: typed default {f.default!r} != schema {want!r}"
            assert type(to_plain(f.default)) is type(want), f"{where}: {type(f.default)} vs {type(want)}"
        elif path in required:
            assert f.required, f"{where}: required by the schema, but the field has a default"
        else:
            assert f.default is None, f"{where}: no schema default, so absent is None"
        checked += 1
    assert checked


def _schema_types(sub, uri):
    """The JSON types a property allows (a oneOf's branches together); None: any."""
    out = set()
    for b in S.branches(sub, uri)[1:] or [sub]:
        t = b.get("type") or ("object" if b.get("properties") else None)
        if t is None and "$ref" in b:
            t = "object"
        if t is None:
            return None
        out |= set(t if isinstance(t, list) else [t])
    if sub.get("type") and not S.branches(sub, uri)[1:]:
        t = sub["type"]
        out = set(t if isinstance(t, list) else [t])
    return out


def _python_types(tp):
    out = set()
    for m in _members(tp) + ([type(None)] if type(None) in typing.get_args(tp) else []):
        if m is typing.Any:
            return None
        if is_config_class(m) or typing.get_origin(m) is Mapping:
            out.add(Mapping)
        elif typing.get_origin(m) is tuple:
            out.add(tuple)
        else:
            out.add(m)
    return out


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_field_type_fits_the_schema_type(section):
    for path, sub, uri in _walk(section):
        want = _schema_types(sub, uri)
        f = _field_at(section, path)
        got = _python_types(f.type)
        if want is not None and "default" not in sub and not f.required:
            want = want | {"null"}  # an optional key without a default is None when absent
        if want is None or got is None:
            continue
        assert got == {PY_OF[t] for t in want}, f"{section}.{'.'.join(path)}: {got} vs schema {want}"


def test_every_typed_field_is_a_schema_key():
    """The other direction: a class cannot declare a key the schema lacks, or a default of its own."""
    with pytest.raises(TypeError, match="has no such key"):
        @schema_config("train", "lora")
        class Typo:
            rnak: int

    with pytest.raises(TypeError, match="takes its default from the schema"):
        @schema_config("train", "lora")
        class OwnDefault:
            rank: int = 4


def test_the_trainer_defaults_that_drifted_are_the_schema_ones():
    t = T.TrainConfig.from_dict({})
    assert (t.max_grad_norm, t.lr_scheduler.name, t.mixed_precision) == (1.0, "constant_with_warmup", "bf16")


def _specs():
    return sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec_file", _specs(), ids=lambda p: p.stem)
def test_a_resolved_spec_reads_back_the_same_values(spec_file):
    from runner.spec import load_spec

    spec = load_spec(spec_file, require_files=False)
    typed = T.spec_config(spec.data)
    plain = typed.to_dict()

    def same(a, b, where):  # every resolved value is in the typed view, unchanged (absent keys: None)
        if isinstance(a, dict):
            for k, v in a.items():
                same(v, b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b and type(a) is type(b), f"{where}: {a!r} -> {b!r}"

    same({k: v for k, v in spec.data.items() if not k.startswith("$")}, plain, spec_file.name)
    assert json.dumps(T.spec_config(plain).to_dict(), sort_keys=True) == json.dumps(plain, sort_keys=True)


@pytest.mark.parametrize("preset", sorted((ROOT / "runner" / "presets" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_train_presets_read_as_typed_sections(preset):
    import yaml

    values = yaml.safe_load(preset.read_text())["values"]
    t = T.TrainConfig.from_dict(values)
    for key, value in values.items():
        assert to_plain(getattr(t, key)) == S.fill_defaults(value, *S.child_schema(
            S.section_schema("train"), S.section_uri("train"), key)) or isinstance(value, dict)


def test_views_are_frozen_hashable_and_copyable():
    t = T.TrainConfig.from_dict({"phases": [{"name": "a", "steps": 3, "mix": {"close_up": 1}}]})
    with pytest.raises(AttributeError):
        t.lr = 1.0
    with pytest.raises(TypeError):
        t.phases[0].mix["wide"] = 2
    assert isinstance(t.phases, tuple) and isinstance(t.phases[0].mix, FrozenDict)
    assert hash(t) == hash(T.TrainConfig.from_dict(t.to_dict())) and t == T.TrainConfig.from_dict(t.to_dict())
    assert copy.deepcopy(t) == t and pickle.loads(pickle.dumps(t)) == t
    assert json.loads(json.dumps(t.phases[0].mix)) == {"close_up": 1}
    changed = replace(t, lr=0.5)
    assert changed.lr == 0.5 and t.lr == 0.0001 and changed.phases == t.phases


def test_values_keep_their_json_type():
    """An integer given for a number stays an int: a node config rebuilt from typed fields keys the same."""
    crops = T.IdentityCropsConfig.from_dict({"max_yaw": 40})
    assert type(crops.max_yaw) is int and type(crops.max_pitch) is type(S.section_schema("dataset")[
        "properties"]["export"]["properties"]["identity_crops"]["properties"]["max_pitch"]["default"])


def test_unions_pick_the_right_form():
    tr = T.TrackingConfig.from_dict({"mlflow": True, "wandb": {"project": "p"}})
    assert tr.mlflow is True and tr.wandb.project == "p" and tr.wandb.enabled is True
    ev = T.EvaluateConfig.from_dict({"suite": {"categories": {"a": {"prompts": ["x"]}}}})
    assert ev.suite.categories["a"].prompts == ("x",) and ev.suite.categories["a"].negative == ""
    assert T.EvaluateConfig.from_dict({}).suite == "builtin"
    forms = (0.5, None, "backend")
    read = T.StoryboardValidationConfig.from_dict
    assert [read({"face_similarity": v}).face_similarity for v in forms] == list(forms)


@pytest.mark.parametrize("data, message", [
    ({"lora": {"rnak": 3}}, "train.lora: unknown key 'rnak'"),
    ({"phases": [{"steps": 3}]}, "train.phases[]: missing required key 'name'"),
    ({"buckets": [1]}, "train.buckets: expected a mapping"),
])
def test_a_mapping_that_does_not_fit_names_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        T.TrainConfig.from_dict(data)
    assert message in str(info.value) and (info.value.hint or "expected" in message)


def test_a_node_config_adds_stage_keys_beside_the_section():
    @schema_config("train", "lora")
    class LoraNode(T.LoraConfig):
        variant: str | None = node_field(None)
        tags: Mapping[str, str] = node_field(FrozenDict())

    node = LoraNode.from_dict({"rank": 4, "variant": "v", "tags": {"a": "b"}})
    assert (node.rank, node.alpha, node.variant, node.tags) == (4, None, "v", {"a": "b"})
    assert isinstance(node.tags, FrozenDict) and LoraNode.from_dict({}).variant is None
    assert "variant" not in schema_fields(LoraNode) and "rank" in schema_fields(LoraNode)
    with pytest.raises(ConfigError, match="unknown key 'varaint'"):
        LoraNode.from_dict({"varaint": "v"})


def test_a_loaded_spec_has_its_typed_view():
    from runner.spec import load_spec

    spec = load_spec(ROOT / "specs" / "luca.yaml", require_files=False)
    assert spec.config.character.name == spec.name == "luca"
    assert spec.config.train.variants["higher_rank"]["lora"]["rank"] == 64
    assert spec.config.train.phases[1].mix["full_body"] == 0.35 and spec.config.evaluate.lora_scales == (0.7, 0.8, 1.0)
