"""Typed, frozen views of resolved spec sections; the JSON Schema is the one source of defaults.

A config class declares its fields and their Python types. The schema says which keys exist and
gives every default: :func:`schema_config` reads the packaged schema (schemas/, JSON only, once,
at import), makes the class a frozen, keyword-only, dataclass-like class whose defaults are the
schema's, and refuses a field the schema does not have or a default written in Python.
tests/test_typed_config.py walks the schema and fails on a property without a field, a default
that differs, or a type that does not fit. The classes of every section are in
:mod:`runner.spec.sections` (``spec_config(spec.data)`` reads a whole resolved spec).

Usage::

    from runner.spec.config import node_field, schema_config

    @schema_config("train", "lora")          # the schema node at train.lora
    class LoraConfig:
        rank: int                            # default 16: the schema's
        alpha: float | None                  # default null -> None
        target_modules: tuple[str, ...]      # lists are tuples, mappings read-only dicts

    lora = LoraConfig.from_dict({"rank": 32})  # absent keys take the schema default
    lora.rank, lora.alpha                      # 32, None
    lora.to_dict()                             # plain JSON-able dict again

    @schema_config("train")                  # a node config: the section plus stage keys
    class TrainNode(TrainConfig):
        trigger: str = node_field("")        # not a schema key; its default is the stage's

    replace(lora, rank=8)                      # a changed copy; fields(LoraConfig) lists them

Rules: a nested object is a nested config class (``buckets: BucketsConfig``), a list of objects a
tuple of them (``phases: tuple[PhaseConfig, ...]``), named entries ``Mapping[str, X]``, a oneOf a
union (``mlflow: bool | MlflowConfig``). A property without a schema default is required when the
schema says so, else None when absent. Values keep their JSON type (an integer given for a number
stays an int), so a node config rebuilt from typed fields has the same cache key. Typed objects
are read views: node configs (cache keys) stay the dicts ``expand()`` builds. ``from_dict``
refuses keys the class does not declare (:class:`ConfigError`), so a typo cannot pass silently.
No code is generated per class (plan time imports all of them); a module of config classes reads
fastest without ``from __future__ import annotations`` (declare nested classes first).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Callable, TypeVar

from runner.core.errors import UserError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(UserError):
    """A mapping does not fit its config class (unknown key, missing required key, wrong shape)."""


class FrozenDict(dict):
    """A read-only dict: still a dict for ``json`` and ``==``, but refuses every change."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config mapping is read-only; build a new one (dict(m) copies it)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))


# --------------------------------------------------------------------------- the schema, JSON only


@lru_cache(maxsize=None)
def _document(name: str) -> dict[str, Any]:
    """A schema file by its path under schemas/ ('character.schema.json', 'sections/train.schema.json');
    section files come from runner.spec.schema's cache, which validation fills anyway."""
    from runner.resources import resource_dir
    from runner.spec.schema import section_schema

    folder, _, file = name.rpartition("/")
    if folder == "sections" and file.endswith(".schema.json"):
        return section_schema(file[: -len(".schema.json")])
    return json.loads((resource_dir("schemas") / name).read_text(encoding="utf-8"))


ROOT_DOCUMENT = "character.schema.json"


def _resolve(node: dict[str, Any], doc: str) -> tuple[dict[str, Any], str]:
    """Follow ``$ref`` (a JSON pointer in the same file, or a sibling file) to its target."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        file, _, pointer = ref.partition("#")
        if file:
            doc = "/".join([*doc.split("/")[:-1], file]) if "/" in doc else file
        node = _document(doc)
        for part in filter(None, pointer.split("/")):
            node = node[part]
    return node, doc


def _object_branch(node: dict[str, Any], doc: str) -> tuple[dict[str, Any], str]:
    """The object form of a property: itself, or the oneOf/anyOf branch that has properties."""
    node, doc = _resolve(node, doc)
    if "properties" in node or "items" in node or isinstance(node.get("additionalProperties"), dict):
        return node, doc
    for keyword in ("oneOf", "anyOf"):
        for branch in node.get(keyword, []):
            b, d = _resolve(branch, doc)
            if "properties" in b or isinstance(b.get("additionalProperties"), dict):
                return b, d
    return node, doc


def schema_node(*path: str) -> dict[str, Any]:
    """The schema of the value at ``path`` from the spec's root: section and key names, '[]' for
    the items of a list, '<name>' for the entries of a mapping. ``schema_node()`` is the root."""
    return _locate(path)[0]


@lru_cache(maxsize=None)
def _locate(path: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """(schema, the file it is in) of the value at ``path``."""
    if not path:
        return _resolve(_document(ROOT_DOCUMENT), ROOT_DOCUMENT)
    node, doc = _object_branch(*_locate(path[:-1]))
    key = path[-1]
    if key == "[]":
        sub = node.get("items")
    elif key == "<name>":
        sub = node.get("additionalProperties")
    else:
        sub = node.get("properties", {}).get(key)
    if not isinstance(sub, dict):
        raise KeyError(f"the spec schema has no {'.'.join(path)}")
    return _resolve(sub, doc)


def schema_default(*path: str) -> Any:
    """The schema's default at ``path`` (a fresh copy); KeyError when it has none."""
    node = schema_node(*path)
    if "default" not in node:
        raise KeyError(f"the spec schema gives no default for {'.'.join(path)}")
    return json.loads(json.dumps(node["default"]))


# --------------------------------------------------------------------------- converters


def _freeze(value: Any) -> Any:
    """Lists -> tuples and dicts -> FrozenDict, all the way down."""
    if isinstance(value, Mapping) and not isinstance(value, FrozenDict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "__schema_path__")


def _converter(tp: Any, where: str) -> Callable[[Any], Any]:
    """The function that makes a JSON value into the value of a field typed ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_config_class(tp):
        return lambda v: v if isinstance(v, tp) else tp.from_dict(v, where=where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a plain record of a node config
        return lambda v: tp(**v) if isinstance(v, Mapping) else v
    if origin in (typing.Union, types.UnionType):
        return _union_converter(args, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0], where + "[]")
        return lambda v: tuple(item(x) for x in v) if isinstance(v, (list, tuple)) else _freeze(v)
    if origin in (Mapping, dict) and len(args) == 2:
        entry = _converter(args[1], where + ".<name>")
        return lambda v: FrozenDict({k: entry(x) for k, x in v.items()}) if isinstance(v, Mapping) else _freeze(v)
    return _freeze


def _union_converter(members: tuple, where: str) -> Callable[[Any], Any]:
    configs = [m for m in members if is_config_class(m)]
    others = [m for m in members if m is not type(None) and not is_config_class(m)]
    mapping = configs[0] if configs else next((m for m in others if typing.get_origin(m) in (Mapping, dict)), None)
    sequence = next((m for m in others if typing.get_origin(m) is tuple), None)
    on_map = _converter(mapping, where) if mapping is not None else _freeze
    on_seq = _converter(sequence, where) if sequence is not None else _freeze

    def convert(v: Any) -> Any:
        if isinstance(v, Mapping) or (configs and isinstance(v, configs[0])):
            return on_map(v)
        if isinstance(v, (list, tuple)):
            return on_seq(v)
        return v

    return convert


def to_plain(value: Any) -> Any:
    """A typed value as plain JSON data: config objects and mappings -> dicts, tuples -> lists."""
    if is_config_class(type(value)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- the decorator


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a config class: its default (the schema's, converted; MISSING when required),
    the converter of its values, and whether it is a stage key rather than a schema key."""

    name: str
    type: Any
    default: Any
    convert: Callable[[Any], Any]
    node: bool = False

    @property
    def required(self) -> bool:
        return self.default is _MISSING


class _NodeField:
    def __init__(self, default: Any) -> None:
        self.default = default


def node_field(default: Any = _MISSING) -> Any:
    """A field of a node config that is not a schema key (character, trigger, variant, device):
    the stage adds it in ``expand()``, and ``default`` is the stage's, not the spec's."""
    return _NodeField(default)


_RESERVED = ("from_dict", "to_dict")
# Type checkers read decorated classes as frozen keyword-only dataclasses (PEP 681; Python 3.11+).
_dataclass_transform = getattr(typing, "dataclass_transform", lambda **kw: (lambda f: f))


def _own_fields(cls: type, path: tuple[str, ...], hints: dict[str, Any]) -> list[Field]:
    """The fields ``cls`` declares itself, defaults from the schema at ``path``."""
    node, _ = _object_branch(*_locate(path))
    props, required = node.get("properties", {}), set(node.get("required", []))
    where = ".".join(path) or "(root)"
    out = []
    for name in cls.__dict__.get("__annotations__", {}):
        attr = cls.__dict__.get(name, _MISSING)
        conv = _converter(hints[name], f"{where}.{name}")
        if name in _RESERVED or name.startswith("_"):
            raise TypeError(f"{cls.__qualname__}.{name}: that name is taken by the config machinery")
        if isinstance(attr, _NodeField):
            out.append(Field(name, hints[name], attr.default, conv, node=True))
            continue
        if attr is not _MISSING:
            raise TypeError(f"{cls.__qualname__}.{name}: a schema field takes its default from the schema; "
                            "do not write one here (node_field() declares a stage key)")
        if name not in props:
            raise TypeError(f"{cls.__qualname__}.{name}: the schema at {where} has no such key "
                            f"(its keys: {', '.join(props) or '(none)'}); node_field() declares a stage key")
        sub = schema_node(*path, name)
        default = conv(sub["default"]) if "default" in sub else _MISSING if name in required else None
        out.append(Field(name, hints[name], default, conv))
    return out


@_dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(node_field,))
def schema_config(*path: str) -> Callable[[type[T]], type[T]]:
    """Make ``cls`` the frozen, typed view of the schema object at ``path`` (see the module doc).

    No code is generated per class (plan time imports every section's classes): the methods are
    shared ones that read the class's field table."""

    def wrap(cls: type[T]) -> type[T]:
        hints = typing.get_type_hints(cls)
        inherited = dict(getattr(cls, "__config_fields__", {}))
        for f in _own_fields(cls, tuple(path), hints):
            inherited[f.name] = f
        for name in inherited:
            if name in cls.__dict__:
                delattr(cls, name)  # node_field markers: the instance holds the value
        cls.__config_fields__ = inherited  # type: ignore[attr-defined]
        cls.__schema_path__ = tuple(path)  # type: ignore[attr-defined]
        for name, fn in _METHODS.items():
            setattr(cls, name, fn)
        cls.from_dict = classmethod(_from_dict)  # type: ignore[attr-defined]
        return cls

    return wrap


def _init(self: Any, **values: Any) -> None:
    table = type(self).__config_fields__
    unknown = [k for k in values if k not in table]
    if unknown:
        raise TypeError(f"unknown key {unknown[0]!r}")
    for name, f in table.items():
        if name in values:
            value = f.convert(values[name])
        elif f.required:
            raise TypeError(f"missing required key {name!r}")
        else:
            value = f.default
        object.__setattr__(self, name, value)


def _refuse_change(self: Any, name: str, value: Any = None) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot change {type(self).__name__}.{name}: a config is frozen "
                                          "(runner.spec.config.replace makes a changed copy)")


def _values(self: Any) -> tuple:
    return tuple(getattr(self, n) for n in type(self).__config_fields__)


def _eq(self: Any, other: Any) -> bool:
    return _values(self) == _values(other) if type(other) is type(self) else NotImplemented


def _hash(self: Any) -> int:
    return hash((type(self).__qualname__, _values(self)))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self).__config_fields__)
    return f"{type(self).__name__}({shown})"


def _to_dict(self: Any) -> dict[str, Any]:
    """Every field as plain JSON data (the inverse of ``from_dict``)."""
    return {n: to_plain(getattr(self, n)) for n in type(self).__config_fields__}


def _reduce(self: Any) -> tuple:
    return (_rebuild, (type(self), {n: getattr(self, n) for n in type(self).__config_fields__}))


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    return cls(**values)


_METHODS = {"__init__": _init, "__setattr__": _refuse_change, "__delattr__": _refuse_change, "__eq__": _eq,
            "__hash__": _hash, "__repr__": _repr, "__reduce__": _reduce, "to_dict": _to_dict}


def _from_dict(cls: type[T], data: Mapping[str, Any] | None = None, *, where: str = "") -> T:
    """The typed view of ``data`` (a resolved section or a node config); absent keys take their
    default. Unknown keys and missing required ones are a :class:`ConfigError`."""
    where = where or ".".join(cls.__schema_path__) or "spec"  # type: ignore[attr-defined]
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r:.60}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc} for {cls.__name__}",
                          hint="keys: " + ", ".join(cls.__config_fields__)) from None  # type: ignore[attr-defined]


def fields(cls_or_obj: Any) -> list[Field]:
    """The fields of a config class (or object), in declaration order."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return list(cls.__config_fields__.values())


def replace(obj: T, **changes: Any) -> T:
    """A copy of config ``obj`` with ``changes`` (converted like ``from_dict`` values)."""
    return type(obj)(**{**{n: getattr(obj, n) for n in type(obj).__config_fields__}, **changes})


def schema_fields(cls: type) -> list[str]:
    """The names of the fields of ``cls`` that are schema keys (not stage keys of a node config)."""
    return [f.name for f in cls.__config_fields__.values() if not f.node]  # type: ignore[attr-defined]


def view_of(cls: type[T], data: Mapping[str, Any]) -> T:
    """The typed view of the keys of ``data`` that are fields of ``cls``, the rest left out: for a
    mapping that holds a section's settings beside other things (a report hook's ``env`` holds
    thumbnail_px and gallery_limit of the report section); absent fields take their default."""
    table = cls.__config_fields__  # type: ignore[attr-defined]
    return cls.from_dict({k: v for k, v in data.items() if k in table})  # type: ignore[attr-defined]
