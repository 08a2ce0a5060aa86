"""The spec's JSON Schema (draft 2020-12): loading, validation into :class:`Problem` s, defaults."""

from __future__ import annotations

import copy
import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from runner.paths import file_name_problem, storage_url_problem, sub_path_problem
from runner.resources import resource_dir, schema_path
from runner.tracking.uri import tracking_uri_problem
from runner.spec.errors import Problem, format_key_path
from runner.spec.yamlio import LoadedYaml

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@lru_cache(maxsize=1)
def _registry_and_root() -> tuple[Any, dict[str, Any]]:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    root_file = schema_path()
    schemas_dir = resource_dir("schemas")
    resources = []
    for path in sorted(schemas_dir.rglob("*.schema.json")):
        contents = json.loads(path.read_text(encoding="utf-8"))
        resources.append((path.resolve().as_uri(), Resource.from_contents(contents, DRAFT202012)))
    registry = Registry().with_resources(resources)
    root = json.loads(root_file.read_text(encoding="utf-8"))
    root["$id"] = root_file.resolve().as_uri()
    return registry, root


def root_schema() -> dict[str, Any]:
    return _registry_and_root()[1]


@lru_cache(maxsize=None)
def section_schema(section: str) -> dict[str, Any]:
    """The schema of one top-level section (refs inside it stay resolvable via the registry)."""
    path = resource_dir("schemas") / "sections" / f"{section}.schema.json"
    contents = json.loads(path.read_text(encoding="utf-8"))
    contents["$id"] = path.resolve().as_uri()
    return contents


# Formats the schema uses on user strings: format -> (the rule in runner.paths, what it is, hint).
FORMATS = {
    "file-name": (file_name_problem, "a file or folder name",
                  "This value becomes part of a file or folder name: use letters, digits, spaces, '_' or '-'."),
    "sub-path": (sub_path_problem, "a path inside its folder",
                 "Give a relative path that stays inside the folder, e.g. 'models' or 'models/image_encoder'."),
    "storage-url": (storage_url_problem, "a storage URL",
                    "Give s3://bucket/prefix or file:///absolute/folder; credentials go in the environment."),
    "tracking-uri": (tracking_uri_problem, "an MLflow tracking URI",
                     "e.g. http://127.0.0.1:5000 or sqlite:///mlflow.db; passwords go in the environment."),
}


@lru_cache(maxsize=1)
def format_checker() -> Any:
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())
    for name, (rule, _, _) in FORMATS.items():
        def check(instance: Any, rule=rule) -> bool:
            problem = rule(instance) if isinstance(instance, str) else None
            if problem:
                raise ValueError(problem)
            return True

        checker.checks(name, raises=ValueError)(check)
    return checker


def section_validator(section: str) -> Any:
    """A validator of one section's values (its refs to other sections resolve offline)."""
    return _validator(section_schema(section))


def _validator(schema: dict[str, Any]) -> Any:
    from jsonschema import Draft202012Validator

    registry, _ = _registry_and_root()
    return Draft202012Validator(schema, registry=registry, format_checker=format_checker())


def _walk_ref(schema: dict[str, Any], doc_uri: str) -> tuple[dict[str, Any], str]:
    """Resolve $ref in the context of the document it appears in."""
    if not isinstance(schema, dict) or "$ref" not in schema:
        return schema, doc_uri
    contents, base = _resolved_ref(doc_uri, schema["$ref"])
    return dict(contents), base


@lru_cache(maxsize=None)
def _resolved_ref(doc_uri: str, ref: str) -> tuple[dict[str, Any], str]:
    """(subschema, its document) of ``ref`` in ``doc_uri``: the packaged schemas never change in a
    process, and a spec of 300 sources walks the same few refs 100,000 times."""
    from urllib.parse import urljoin

    registry, _ = _registry_and_root()
    target = urljoin(doc_uri, ref)
    return registry.resolver(base_uri=doc_uri).lookup(target).contents, target.split("#", 1)[0]


def child_schema(
    schema: dict[str, Any], doc_uri: str, key: str | int, instance: Any = None
) -> tuple[dict[str, Any] | None, str]:
    """The subschema that governs ``instance[key]`` (properties, additionalProperties, items)."""
    schema, doc_uri = _walk_ref(schema, doc_uri)
    if isinstance(key, int):
        items = schema.get("items")
        if isinstance(items, dict):
            return _walk_ref(items, doc_uri)
        return None, doc_uri
    props = schema.get("properties", {})
    if key in props:
        return _walk_ref(props[key], doc_uri)
    addl = schema.get("additionalProperties")
    if isinstance(addl, dict):
        return _walk_ref(addl, doc_uri)
    return None, doc_uri


def pick_branch(schema: dict[str, Any], doc_uri: str, instance: Any) -> tuple[dict[str, Any], str]:
    """For oneOf/anyOf schemas, the branch whose type fits the instance (for walking)."""
    schema, doc_uri = _walk_ref(schema, doc_uri)
    for keyword in ("oneOf", "anyOf"):
        if keyword in schema:
            for branch in schema[keyword]:
                b, u = _walk_ref(branch, doc_uri)
                if _type_fits(b.get("type"), instance):
                    merged = {k: v for k, v in schema.items() if k != keyword}
                    merged.update(b)
                    return merged, u
    return schema, doc_uri


def _branch_type(branch: Any) -> Any:
    """The declared type of a oneOf/anyOf branch (None for a $ref or an untyped branch)."""
    return branch.get("type") if isinstance(branch, dict) else None


def _format_problem(schema: dict[str, Any], instance: Any) -> str | None:
    fmt = schema.get("format")
    if fmt not in FORMATS or not isinstance(instance, str):
        return None
    return FORMATS[fmt][0](instance)


def _type_fits(t: Any, instance: Any) -> bool:
    if t is None:
        return True
    types = t if isinstance(t, list) else [t]
    for name in types:
        if name == "object" and isinstance(instance, dict):
            return True
        if name == "array" and isinstance(instance, list):
            return True
        if name == "string" and isinstance(instance, str):
            return True
        if name == "integer" and isinstance(instance, int) and not isinstance(instance, bool):
            return True
        if name == "number" and isinstance(instance, (int, float)) and not isinstance(instance, bool):
            return True
        if name == "boolean" and isinstance(instance, bool):
            return True
        if name == "null" and instance is None:
            return True
    return False


def root_uri() -> str:
    return _registry_and_root()[1]["$id"]


def section_uri(section: str) -> str:
    return section_schema(section)["$id"]


# --------------------------------------------------------------------------- validation


def validate(
    instance: Any,
    loaded: LoadedYaml,
    *,
    schema: dict[str, Any] | None = None,
    path_prefix: tuple = (),
    mark_prefix: tuple = (),
) -> list[Problem]:
    """All schema problems of ``instance``, each with file:line:col from ``loaded``.

    ``path_prefix`` is prepended to key paths in messages; ``mark_prefix`` to key paths looked up
    in ``loaded`` (they differ when a sub-document is validated, e.g. a preset's values).
    """
    validator = _validator(schema or root_schema())
    problems: list[Problem] = []
    for error in validator.iter_errors(instance):
        problems.extend(_to_problems(error, loaded, path_prefix, mark_prefix))
    # de-duplicate (oneOf can report the same thing twice)
    seen: set[tuple] = set()
    unique = []
    for p in problems:
        k = (p.file, p.line, p.col, p.key_path, p.message)
        if k not in seen:
            seen.add(k)
            unique.append(p)
    return unique


def _problem(
    loaded: LoadedYaml,
    path: tuple,
    message: str,
    *,
    expected: str = "",
    hint: str = "",
    path_prefix: tuple = (),
    mark_prefix: tuple = (),
    prefer_key: bool = False,
) -> Problem:
    mark = loaded.mark_for(mark_prefix + tuple(path), prefer_key=prefer_key)
    return Problem(
        file=mark.file,
        line=mark.line,
        col=mark.col,
        key_path=format_key_path(path_prefix + tuple(path)),
        message=message,
        expected=expected,
        hint=hint,
    )


def _describe_type(t: Any) -> str:
    types = t if isinstance(t, list) else [t]
    return " or ".join(_TYPE_NAMES.get(x, str(x)) for x in types)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _at_value_or_name(error: Any, loaded: LoadedYaml, message: str, *, hint: str = "", **kw: Any) -> Problem:
    """A problem at the offending value, or at the mapping key when the error is about a key's name
    (propertyNames)."""
    is_key = "propertyNames" in error.schema_path
    path = tuple(error.absolute_path) + ((error.instance,) if is_key else ())
    desc = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
    return _problem(loaded, path, message, expected=desc, hint=hint, prefer_key=is_key, **kw)


def _to_problems(error: Any, loaded: LoadedYaml, pp: tuple, mp: tuple) -> Iterator[Problem]:
    """The problems one jsonschema error stands for, each at its file:line:col. The validator
    keyword picks the wording (an unknown key with "did you mean", a missing key, a wrong type...);
    keywords without a wording of their own (minimum, maxItems, ...) keep jsonschema's message."""
    kw = {"path_prefix": pp, "mark_prefix": mp}
    keyword = error.validator
    if keyword == "enum" and "propertyNames" in error.schema_path:
        keyword = "propertyNames"
    return _WORDINGS.get(keyword, _as_reported)(error, loaded, kw)


def _schema_of(error: Any) -> dict[str, Any]:
    return error.schema if isinstance(error.schema, dict) else {}


def _did_you_mean(word: Any, options: list[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return f"did you mean '{close[0]}'?" if close else ""


def _as_reported(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    # minimum, maximum, minItems, multipleOf, ...: jsonschema's message is already precise.
    yield _problem(loaded, tuple(error.absolute_path), error.message, expected=_schema_of(error).get("description", ""),
                   **kw)


def _unknown_keys(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    if not isinstance(error.instance, dict):
        yield from _as_reported(error, loaded, kw)
        return
    allowed = list(_schema_of(error).get("properties", {}))
    for extra in (k for k in error.instance if k not in allowed):
        yield _problem(loaded, tuple(error.absolute_path) + (extra,), f"unknown key '{extra}'",
                       expected="one of: " + ", ".join(allowed), hint=_did_you_mean(extra, allowed),
                       prefer_key=True, **kw)


def _unknown_name(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    # error.instance is the offending key name; its parent is at error.absolute_path
    bad = error.instance
    allowed = [str(x) for x in error.validator_value]
    yield _problem(loaded, tuple(error.absolute_path) + (bad,), f"unknown name '{bad}'",
                   expected=("one of: " + ", ".join(allowed)) if allowed else error.message,
                   hint=_did_you_mean(str(bad), allowed), prefer_key=True, **kw)


def _bad_format(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    if error.validator_value not in FORMATS:
        yield from _as_reported(error, loaded, kw)
        return
    _, what, hint = FORMATS[error.validator_value]
    message = f"{_short(error.instance)} cannot be used as {what}: {error.cause or error.message}"
    yield _at_value_or_name(error, loaded, message, hint=hint, **kw)


def _missing_keys(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    properties = _schema_of(error).get("properties", {})
    for key in (k for k in error.validator_value if k not in (error.instance or {})):
        yield _problem(loaded, tuple(error.absolute_path), f"missing required key '{key}'",
                       expected=properties.get(key, {}).get("description", ""), **kw)


def _wrong_type(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    yield _problem(loaded, tuple(error.absolute_path),
                   f"is {_short(error.instance)}, which is not {_describe_type(error.validator_value)}",
                   expected=_schema_of(error).get("description", ""), **kw)


def _not_allowed(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    options = [str(o) for o in error.validator_value]
    hint = _did_you_mean(error.instance, options, cutoff=0.5) if isinstance(error.instance, str) else ""
    yield _problem(loaded, tuple(error.absolute_path), f"{_short(error.instance)} is not allowed",
                   expected="one of: " + ", ".join(options), hint=hint or _schema_of(error).get("description", ""),
                   **kw)


def _no_branch_fits(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    """oneOf / anyOf: "exactly one of these keys" when the branches only require one key each;
    else what the best-fitting branch (one whose type fits the value) says is wrong."""
    from jsonschema.exceptions import best_match

    path, desc, branches = tuple(error.absolute_path), _schema_of(error).get("description", ""), error.validator_value
    if all(set(b) == {"required"} and len(b["required"]) == 1 for b in branches):
        keys = [b["required"][0] for b in branches]
        present = [k for k in keys if isinstance(error.instance, dict) and k in error.instance]
        what = "both " + " and ".join(present) if present else "none of them"
        yield _problem(loaded, path, f"needs exactly one of {', '.join(repr(k) for k in keys)} (has {what})",
                       expected=desc, **kw)
        return
    # Only the branches whose type fits the value can say what is wrong with it.
    fitting = [e for e in error.context
               if _type_fits(_branch_type(branches[e.relative_schema_path[0]]), error.instance)]
    best = best_match(fitting or error.context) if error.context else None
    if best is not None and best.validator not in ("oneOf", "anyOf"):
        yield from _to_problems(best, loaded, kw["path_prefix"], kw["mark_prefix"])
        return
    yield _problem(loaded, path, f"{_short(error.instance)} does not fit", expected=desc, **kw)


def _no_match(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    if _format_problem(_schema_of(error), error.instance):
        return  # the format's message says exactly what is wrong
    message = f"{_short(error.instance)} does not match the pattern {error.validator_value}"
    yield _at_value_or_name(error, loaded, message, **kw)


def _not_const(error: Any, loaded: LoadedYaml, kw: dict) -> Iterator[Problem]:
    yield _problem(loaded, tuple(error.absolute_path), f"must be {_short(error.validator_value)}",
                   expected=_schema_of(error).get("description", ""), **kw)


_WORDINGS = {
    "additionalProperties": _unknown_keys, "propertyNames": _unknown_name, "format": _bad_format,
    "required": _missing_keys, "type": _wrong_type, "enum": _not_allowed, "oneOf": _no_branch_fits,
    "anyOf": _no_branch_fits, "pattern": _no_match, "const": _not_const,
}


# --------------------------------------------------------------------------- defaults


def fill_defaults(instance: Any, schema: dict[str, Any], doc_uri: str) -> Any:
    """Return a copy of ``instance`` with every schema default filled in, recursively.

    Objects that are absent but have ``"default": {}`` are created and filled too, so the
    resolved spec is fully explicit.
    """
    schema, doc_uri = pick_branch(schema, doc_uri, instance)
    if isinstance(instance, dict):
        out = dict(instance)
        props = schema.get("properties", {})
        for key, sub in props.items():
            sub_r, sub_uri = _walk_ref(sub, doc_uri)
            if key not in out and "default" in sub_r:
                out[key] = copy.deepcopy(sub_r["default"])
            if key in out:
                out[key] = fill_defaults(out[key], sub_r, sub_uri)
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            addl_r, addl_uri = _walk_ref(addl, doc_uri)
            for key in out:
                if key not in props:
                    out[key] = fill_defaults(out[key], addl_r, addl_uri)
        return out
    if isinstance(instance, list):
        items = schema.get("items")
        if isinstance(items, dict):
            items_r, items_uri = _walk_ref(items, doc_uri)
            return [fill_defaults(x, items_r, items_uri) for x in instance]
        return list(instance)
    if isinstance(instance, float) and instance.is_integer() and _integer_only(schema.get("type")):
        return int(instance)  # 8.0 where the schema asks for an integer: the same value, the same key
    return instance


def _integer_only(t: Any) -> bool:
    types = t if isinstance(t, list) else [t]
    return "integer" in types and "number" not in types


def iter_instance(instance: Any, schema: dict[str, Any] | None = None, doc_uri: str | None = None,
                  path: tuple = ()) -> Iterator[tuple[tuple, Any, dict]]:
    """(key path, value, governing schema) of every value in a spec, depth first (the root
    schema when none is given). Values no schema governs are skipped."""
    if schema is None:
        schema, doc_uri = root_schema(), root_uri()
    schema, doc_uri = pick_branch(schema, doc_uri, instance)
    yield path, instance, schema
    children = (instance.items() if isinstance(instance, dict)
                else enumerate(instance) if isinstance(instance, list) else ())
    for key, value in children:
        sub, sub_uri = child_schema(schema, doc_uri, key, instance)
        if sub is not None:
            yield from iter_instance(value, sub, sub_uri, path + (key,))


def without_effect_free(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of a spec without the values whose key changes no output (``"x-affects": "none"``)."""
    out = copy.deepcopy(spec)
    drop = [path for path, _, sch in iter_instance(spec) if path and sch.get("x-affects") == "none"]
    for path in sorted(drop, key=len, reverse=True):
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return out


def iter_schema_fields(schema: dict[str, Any], doc_uri: str, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every property schema in the tree (for docs and the 'every field documented' test)."""
    for field_path, sub, _ in walk_fields(schema, doc_uri, path):
        yield field_path, sub


def walk_fields(schema: dict[str, Any], doc_uri: str, path: tuple = (),
                affects: Any = None) -> Iterator[tuple[tuple, dict, str]]:
    """(key path, property schema, URI of the document it lives in) for every property in the
    tree; lists add "[]" to the path and named entries (additionalProperties) "<name>".

    A property that reuses another section's definition (``$ref``) with an ``x-affects`` of its
    own next to it (train_video's lora, phases, memory: train's keys, train_video's stage)
    declares that effect for itself and every key below it."""
    schema, doc_uri = _walk_ref(schema, doc_uri)
    for key, sub in schema.get("properties", {}).items():
        sub_r, sub_uri = _walk_ref(sub, doc_uri)
        here = sub.get("x-affects") if isinstance(sub, dict) and "$ref" in sub and "x-affects" in sub else affects
        yield path + (key,), _with_affects(sub_r, here), sub_uri
        yield from walk_fields(sub_r, sub_uri, path + (key,), here)
    for kw in ("oneOf", "anyOf"):
        for branch in schema.get(kw, []):
            b, u = _walk_ref(branch, doc_uri)
            if b.get("properties") or b.get("items") or b.get("additionalProperties"):
                yield from walk_fields(b, u, path, affects)
    items = schema.get("items")
    if isinstance(items, dict):
        yield from walk_fields(items, doc_uri, path + ("[]",), affects)
    addl = schema.get("additionalProperties")
    if isinstance(addl, dict):
        yield from walk_fields(addl, doc_uri, path + ("<name>",), affects)


def _with_affects(sub: dict[str, Any], affects: Any) -> dict[str, Any]:
    """``sub`` with the ``x-affects`` of the reusing property (a copy), or as it is."""
    if affects is None or "x-affects" not in sub:
        return sub
    return {**sub, "x-affects": affects}


def branches(schema: dict[str, Any], doc_uri: str) -> list[dict[str, Any]]:
    """A property schema and its oneOf/anyOf branches, each resolved (where x-path may live)."""
    out = [schema]
    for kw in ("oneOf", "anyOf"):
        out += [_walk_ref(b, doc_uri)[0] for b in schema.get(kw, [])]
    return out


def schema_file(section: str | None = None) -> Path:
    if section is None:
        return schema_path()
    return resource_dir("schemas") / "sections" / f"{section}.schema.json"
