"""Issue 12, parts 1, 2 and 6: a spec cannot crash the loader, name a file it should not, or reach
outside the project.

- Every hostile YAML input exits 2 with file:line (never 70 with a traceback).
- Every value that becomes a file or folder name refuses '/', '\\', '..', NUL, control characters
  and a leading dot at validate time; the keys are found from the schema (``format: file-name``).
- Every path-valued key (found from the schema's ``x-path`` markers) obeys the outside-project
  rule after resolving symlinks, including symlinks inside dataset folders.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.cli import main as cli_main

MINIMAL = """\
version: 1
character:
  name: hero
  trigger: hrochr
"""


def run_cli(*args: str, capsys) -> tuple[int, str]:
    """`runner ARGS` in this process: (exit code, stdout + stderr)."""
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_bytes(project: Path, data: bytes, name: str = "hero.yaml") -> Path:
    p = project / "specs" / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- part 6: hostile YAML


def _deep(levels: int, open_: str, close: str) -> str:
    return open_ * levels + "1" + close * levels


def _block_deep(levels: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(levels)) + "  " * levels + "v: 1\n"


def _alias_nest(levels: int) -> str:
    # each anchor holds the previous one 10 levels deeper: composed depth stays small, built depth grows
    lines = ["a0: &a0 1"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} " + "[" * 10 + f"*a{i - 1}" + "]" * 10)
    return "\n".join(lines) + "\n"


# (name, bytes after the 4 MINIMAL lines, the line the problem is on)
HOSTILE = [
    ("flow lists 500 deep", ("x: " + _deep(500, "[", "]") + "\n").encode(), 5),
    ("flow maps 500 deep", ("x: " + _deep(500, "{a: ", "}") + "\n").encode(), 5),
    ("flow lists 20000 deep", ("x: " + _deep(20000, "[", "]") + "\n").encode(), 5),
    ("mixed 300 deep", ("x: " + _deep(300, "[{a: ", "}]") + "\n").encode(), 5),
    ("block maps 600 deep", ("x:\n" + textwrap.indent(_block_deep(600), "  ")).encode(), None),
    ("aliases nest deep", _alias_nest(60).encode(), None),
    ("NUL byte in a value", b"  description: ab\x00cd\n", 5),
    ("NUL byte on a later line", b"  description: ok\n\n\n  display_name: a\x00\n", 8),
    ("bell character", b"  description: ding\x07\n", 5),
    ("escape character", b"  description: \x1b[31mred\n", 5),
    ("DEL character", b"  description: a\x7f\n", 5),
    ("NUL from an escape", b'  description: "a\\0b"\n', 5),
    ("lone surrogate escape", b'  description: "\\ud800"\n', 5),
    ("impossible date", b"  description: 2001-13-45\n", 5),
    ("bad float tag", b"  description: !!float abc\n", 5),
    ("bad int tag", b"  description: !!int abc\n", 5),
    ("5000-digit integer", b"train: {steps: " + b"9" * 5000 + b"}\n", 5),
    ("infinity", b"train: {lr: .inf}\n", 5),
    ("not a number", b"train: {lr: .nan}\n", 5),
    ("merge of a scalar", b"  <<: 5\n", 5),
    ("merge of a list of scalars", b"  <<: [1, 2]\n", 5),
    ("python tag", b"x: !!python/object/apply:os.system ['true']\n", 5),
    ("binary tag", b"x: !!binary AAAA\n", 5),
    ("custom tag", b"x: !env HOME\n", 5),
    ("complex key", b"? [a, b]\n: 1\n", 5),
    ("duplicate key", b"character: {}\n", 5),
    ("second document", b"---\nversion: 1\n", 6),
    ("tab indentation", b"dataset:\n\tsources: []\n", 6),
    ("unclosed bracket", b"x: [1, 2\n", None),
    ("unclosed quote", b'x: "abc\n', None),
    ("invalid UTF-8", b"  description: \xff\xfe\n", 5),
    ("recursive alias", b"x: &r [*r]\n", 5),
]


@pytest.mark.parametrize("name,tail,line", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_hostile_yaml_is_a_spec_error_with_its_line(project, capsys, name, tail, line, command):
    spec = write_bytes(project, MINIMAL.encode() + tail)
    code, out = run_cli(command, str(spec), capsys=capsys)
    assert code == 2, out
    assert "Traceback" not in out and "internal error" not in out, out
    where = f"{spec}:{line}:" if line else f"{spec}:"
    assert where in out, out


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x00", b"", b"- a\n- b\n", b"just text\n", b"42\n"])
def test_files_that_are_no_spec_exit_2(project, capsys, data):
    spec = write_bytes(project, data)
    code, out = run_cli("validate", str(spec), capsys=capsys)
    assert code == 2 and f"{spec}:1:1:" in out and "Traceback" not in out


def test_oversized_and_special_files_exit_2(project, capsys):
    big = write_bytes(project, MINIMAL.encode() + b"#" * (5 * 1024 * 1024) + b"\n")
    for target in (big, Path("/dev/zero"), project / "specs"):
        code, out = run_cli("validate", str(target), capsys=capsys)
        assert code == 2 and "Traceback" not in out, out


def test_merge_keys_let_explicit_keys_win(project):
    from runner.spec import load_spec

    spec = write_bytes(project, (MINIMAL + textwrap.dedent("""\
        train:
          lora: &shape {rank: 8, alpha: 8}
          steps: 5
        evaluate:
          seeds: [1]
        x-shape: &base {rank: 4, alpha: 2}
    """)).encode())
    # x-shape is an unknown key: the spec is refused for that alone, not for the merge
    from runner.spec import SpecError

    with pytest.raises(SpecError) as ei:
        load_spec(spec, require_files=False)
    assert [p.key_path for p in ei.value.problems] == ["x-shape"]
    ok = write_bytes(project, (MINIMAL + textwrap.dedent("""\
        train:
          lora: {<<: {rank: 8, alpha: 8}, rank: 16}
    """)).encode(), "ok.yaml")
    lora = load_spec(ok, require_files=False).data["train"]["lora"]
    assert (lora["rank"], lora["alpha"]) == (16, 8)


# --------------------------------------------------------------------------- part 2: names


def _schema_places(formats: tuple[str, ...]) -> list[tuple[tuple, bool]]:
    """(key path, is_a_mapping_key) of every schema place whose strings carry one of ``formats``."""
    from runner.spec import schema as S

    places = []
    for path, sub in S.iter_schema_fields(S.root_schema(), S.root_uri()):
        if sub.get("format") in formats:
            places.append((path, False))
        if (sub.get("propertyNames") or {}).get("format") in formats:
            places.append((path + ("<name>",), True))
    return sorted(set(places))


def _minimal(sch: dict, uri: str):
    """A small valid instance of a schema (required keys only)."""
    from runner.spec import schema as S

    sch, uri = S._walk_ref(sch, uri)
    t = sch.get("type")
    t = next((x for x in t if x != "null"), None) if isinstance(t, list) else t
    if "enum" in sch:
        return sch["enum"][0]
    if t == "object" or (t is None and "properties" in sch):
        out = {}
        for key in sch.get("required", []):
            sub, suri = S.child_schema(sch, uri, key)
            out[key] = _minimal(sub, suri)
        return out
    if t == "array":
        items = sch.get("items")
        return [_minimal(items, uri)] * sch.get("minItems", 0) if isinstance(items, dict) else []
    if t in ("integer", "number"):
        return max(1, sch.get("minimum", 1))
    if t == "boolean":
        return False
    return "okname1"


def _instance_at(path: tuple, value, is_key: bool) -> dict:
    """The smallest spec section tree that holds ``value`` at ``path`` (as a key when is_key)."""
    from runner.spec import schema as S

    def build(sch, uri, rest):
        sch, uri = S.pick_branch(*S._walk_ref(sch, uri), {})
        if not rest:
            return value
        head, tail = rest[0], rest[1:]
        if head == "[]":
            sub, suri = S.child_schema(sch, uri, 0)
            return [build(sub, suri, tail)]
        if head == "<name>" and is_key and not tail:
            sub, suri = S.child_schema(sch, uri, "any")
            return {value: _minimal(sub, suri) if sub else {}}
        name = "okname1" if head == "<name>" else head
        sub, suri = S.child_schema(sch, uri, name)
        node = _minimal(sch, uri)
        node[name] = build(sub, suri, tail)
        return node

    from runner.spec import schema as S2

    return build(S2.root_schema(), S2.root_uri(), path)


HOSTILE_NAMES = [
    "a/b", "/abs", "a\\b", "..", "../up", "a..b", ".hidden", ".", "a\x00b", "a\x01b", "a\x1fb",
    "a\x7fb", "a\u202eb", "a\u200bb", "a\nb", "a\tb", "a:b", "a*b", "a?b", 'a"b', "a|b", "a<b>",
    "x" * 101, " lead", "trail ", "\u00e9" * 60,
]
HOSTILE_SUB_PATHS = ["../x", "/abs", "~/x", "a/../../b", "a\\b", ".hidden/x", "a\x01/b", "..", "a/.."]


def _spec_text(tree: dict) -> tuple[str, dict[str, int]]:
    """YAML (one JSON flow mapping per section, one section per line) and each section's line."""
    import json

    tree = {"version": 1, **tree}
    tree.setdefault("character", {})
    tree["character"] = {"name": "hero", "trigger": "hrochr", **tree["character"]}
    lines, where = [], {}
    for i, (section, body) in enumerate(tree.items(), start=1):
        lines.append(f"{section}: {json.dumps(body)}")
        where[section] = i
    return "\n".join(lines) + "\n", where


def test_every_key_that_names_files_is_marked():
    marked = {".".join(map(str, p)) for p, _ in _schema_places(("file-name",))}
    must = {"character.name", "character.trigger", "character.class_word", "train.phases.[].name",
            "train.variants.<name>", "evaluate.suite.categories.<name>"}
    assert must <= marked, must - marked


@pytest.mark.parametrize("fmt,hostile,safe", [("file-name", HOSTILE_NAMES, "okname1"),
                                              ("sub-path", HOSTILE_SUB_PATHS, "models/image_encoder")])
def test_hostile_names_are_refused_at_validate_with_their_position(project, capsys, fmt, hostile, safe):
    import re

    from runner.spec.errors import format_key_path

    places = _schema_places((fmt,))
    assert places, f"no schema key carries format {fmt}"
    for path, is_key in places:
        concrete = tuple(0 if p == "[]" else "okname1" if p == "<name>" else p for p in path)
        key = format_key_path(concrete[:-1] if is_key else concrete)

        def problem_at(spec: Path, line: int, out: str, about: str = "") -> bool:
            pattern = rf"^{re.escape(str(spec))}:{line}:\d+: {re.escape(key)}.*{about}"
            return re.search(pattern, out, re.M) is not None

        ok_text, where = _spec_text(_instance_at(path, safe, is_key))
        ok = write_bytes(project, ok_text.encode(), "ok.yaml")
        code, out = run_cli("validate", str(ok), capsys=capsys)
        # the builder makes specs whose value at this key is fine: the refusals below are the names'
        assert not problem_at(ok, where[path[0]], out, "(cannot be used as|pattern)"), (key, out)
        for bad in hostile:
            text, where = _spec_text(_instance_at(path, bad, is_key))
            spec = write_bytes(project, text.encode())
            code, out = run_cli("validate", str(spec), capsys=capsys)
            assert code == 2 and "Traceback" not in out, (key, bad, out)
            assert problem_at(spec, where[path[0]], out), (key, bad, out)


def test_file_name_rule_keeps_ordinary_names():
    from runner.paths import file_name_problem

    for name in ["vlntna", "ohwx_man", "3d cartoon boy", "Алдар", "sks-1", "v1.5", "a.b.c", ""]:
        assert file_name_problem(name) is None, name
    for name in HOSTILE_NAMES:
        assert file_name_problem(name), repr(name)
