"""Generate docs/spec-reference.md from the JSON Schema (so the reference is never stale).

    python -m runner.spec.docgen > docs/spec-reference.md
"""

from __future__ import annotations

import json
from typing import Any

from runner.spec import schema as S



def sections() -> list[str]:
    """The spec's sections in the root schema's order (each a file under schemas/sections/)."""
    return [k for k, v in S.root_schema()["properties"].items() if "$ref" in v]


def _type(sub: dict[str, Any]) -> str:
    t = sub.get("type")
    if t is None and "oneOf" in sub:
        return " or ".join(_type(b) for b in sub["oneOf"])
    if isinstance(t, list):
        return " or ".join(t)
    if t == "array" and isinstance(sub.get("items"), dict) and sub["items"].get("type"):
        return f"list of {_type(sub['items'])}"
    return t or ("object" if "$ref" in sub else "any")


def _default(sub: dict[str, Any]) -> str:
    if "default" not in sub:
        return ""
    d = sub["default"]
    if d == {} and _type(sub) == "object":
        return ""
    return "`" + json.dumps(d) + "`"


def _affects(sub: dict[str, Any]) -> str:
    """Which stages re-run when the key changes (its "x-affects" declaration)."""
    decl = sub.get("x-affects")
    if decl is None:
        return ""
    if decl == "none":
        return "none"
    if decl == "all":
        return "all"
    return ", ".join(decl)


def _marks(sub: dict[str, Any]) -> str:
    """' *path*' / ' *file name*' for the keys the path and name rules cover (see the header)."""
    from runner.spec.paths import CHECKED_KINDS

    kinds = {b.get("x-path") for b in [sub, *sub.get("oneOf", []), sub.get("items") or {}] if isinstance(b, dict)}
    fmts = {sub.get("format"), (sub.get("propertyNames") or {}).get("format")}
    out = " *path*" if kinds & set(CHECKED_KINDS) else ""
    return out + (" *file name*" if "file-name" in fmts else "")


def render() -> str:
    out = [
        "# Spec reference",
        "",
        "Generated from `schemas/` by `python -m runner.spec.docgen`; do not edit by hand.",
        "Paths are relative to the spec file. Presets (`train.preset`, `evaluate.preset`,",
        "`generate.video.preset`) supply values first; keys in the spec override them one by one;",
        "schema defaults fill whatever is left. `runner plan --resolved SPEC` prints the result.",
        "The *re-runs* column names the stages whose cache key the key is part of (and so re-run",
        "when it changes, with everything downstream of them); `none`: no stage, only the report,",
        "which prints the whole spec, is re-rendered.",
        "",
        "Keys marked *path* must stay inside the project folder (the nearest folder above the spec",
        "holding `.git`, `runner.toml` or `.runner`) once every symlink is resolved, and so must every",
        "symlink inside a folder they name; `--allow-outside-project` lifts the rule. Keys marked",
        "*file name* end up in file or folder names: no `/`, `\\`, `..`, control characters, leading",
        "`.` or leading/trailing space, at most 100 bytes.",
        "",
    ]
    root = S.root_schema()
    for section in sections():
        sch = S.section_schema(section)
        required = " (required)" if section in root.get("required", []) else ""
        out += [f"## `{section}`{required}", "", sch.get("description", ""), "",
                "| key | type | default | re-runs | description |", "| --- | --- | --- | --- | --- |"]
        for path, sub in S.iter_schema_fields(sch, sch["$id"]):
            key = ".".join(str(p) for p in path)
            enum = sub.get("enum")
            desc = sub.get("description", "").replace("|", "\\|").replace("\n", " ")
            if enum:
                desc += " One of: " + ", ".join(f"`{e}`" for e in enum) + "."
            desc += _marks(sub)
            out.append(f"| `{key}` | {_type(sub)} | {_default(sub)} | {_affects(sub)} | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
