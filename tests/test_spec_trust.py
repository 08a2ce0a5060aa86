"""Issue 12, parts 1, 2 and 6: a spec cannot crash the loader, name a file it should not, or reach
outside the project.

- Every hostile YAML input exits 2 with file:line (never 70 with a traceback).
- Every value that becomes a file or folder name refuses '/', '\\', '..', NUL, control characters
  and a leading dot at validate time; the keys are found from the schema (``format: file-name``).
- Every path-valued key (found from the schema's ``x-path`` markers) obeys the outside-project
  rule after resolving symlinks, including symlinks inside dataset folders.
"""

from __future__ import annotations

import os
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
@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
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
    "x" * 101, " lead", "trail ", "\u00e9" * 60, "trail.", "a..", "CON", "nul", "Com1", "lpt9.txt", "aux.tar.gz",
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

        def problem_at(spec: Path, line: int, out: str, about: str = "", key: str = key) -> bool:
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

    for name in ["vlntna", "ohwx_man", "3d cartoon boy", "Алдар", "sks-1", "v1.5", "a.b.c", "", "console", "com10",
                 "nulled", "lpt", "icon"]:
        assert file_name_problem(name) is None, name
    for name in HOSTILE_NAMES:
        assert file_name_problem(name), repr(name)


# --------------------------------------------------------------------------- part 1: paths


def _path_keys() -> list[tuple[tuple, str]]:
    """(key path, x-path kind) of every path-valued key of the schema (oneOf branches included)."""
    from runner.spec import schema as S

    found = []
    for path, sub, uri in S.walk_fields(S.root_schema(), S.root_uri()):
        for branch in S.branches(sub, uri):
            if branch.get("x-path"):
                found.append((path, branch["x-path"]))
            for kw, step in (("items", "[]"), ("additionalProperties", "<name>")):  # lists of paths
                inner = branch.get(kw)
                if isinstance(inner, dict) and S._walk_ref(inner, uri)[0].get("x-path"):
                    found.append((path + (step,), S._walk_ref(inner, uri)[0]["x-path"]))
    return sorted(set(found))


def test_every_path_key_is_marked_and_of_a_known_kind():
    import re

    from runner.spec import schema as S
    from runner.spec.paths import CHECKED_KINDS, EXEMPT_KINDS

    keys = _path_keys()
    kinds = {kind for _, kind in keys}
    assert kinds <= set(CHECKED_KINDS + EXEMPT_KINDS), kinds
    # exempt keys are shared caches outside any project; a new one must be added here on purpose
    exempt = {".".join(map(str, p)) for p, kind in keys if kind in EXEMPT_KINDS}
    assert exempt == {"dataset.analysis.insightface_root", "evaluate.insightface_root"}
    # a string key whose description speaks of a path, folder or file carries x-path or a format
    unmarked = []
    for path, sub, uri in S.walk_fields(S.root_schema(), S.root_uri()):
        branches = S.branches(sub, uri)
        strings = [b for b in branches
                   if "string" in (b.get("type") if isinstance(b.get("type"), list) else [b.get("type")])]
        if not strings or sub.get("enum"):
            continue
        if re.search(r"\b(path|folder|file|directory)s?\b", sub.get("description", ""), re.I):
            if not any(b.get("x-path") or b.get("format") for b in branches):
                unmarked.append(".".join(map(str, path)))
    assert not unmarked, unmarked
    # named-or-data keys say which names they accept; everything else is a path
    for path, kind in keys:
        if kind == "named-or-data":
            sub = _schema_at(path)
            assert sub.get("x-names") or sub.get("x-names-dir"), path


def _schema_at(path: tuple) -> dict:
    from runner.spec import schema as S

    sch, uri = S.root_schema(), S.root_uri()
    for p in path:
        sch, uri = S.child_schema(sch, uri, 0 if p == "[]" else "any" if p == "<name>" else p)
    return next(b for b in S.branches(sch, uri) if b.get("x-path"))


def _checked_path_keys():
    from runner.spec.paths import CHECKED_KINDS

    return [(p, k) for p, k in _path_keys() if k in CHECKED_KINDS]


def _outside_cases(project: Path) -> list[tuple[str, str]]:
    """(how, value) pairs that all lead outside the project; the values are relative to specs/."""
    outside = project.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "t.yaml").write_text("values: {}\n")
    link = project / "specs" / "lnk.yaml"
    if not link.is_symlink():
        link.symlink_to(outside / "t.yaml")
    inner = project / "data" / "via"
    inner.mkdir(parents=True, exist_ok=True)
    if not (inner / "up").is_symlink():
        (inner / "up").symlink_to(outside)
    return [("relative", "../../outside/t.yaml"), ("absolute", str(outside / "t.yaml")),
            ("home", "~/t.yaml"), ("symlinked file", "lnk.yaml"),
            ("through a symlinked folder", "../data/via/up/t.yaml")]


def _outside_problem(spec: Path, line: int, key: str, out: str) -> bool:
    import re

    pattern = rf"^{re.escape(str(spec))}:{line}:\d+: {re.escape(key)}: .*outside the project"
    return re.search(pattern, out, re.M) is not None


def test_every_path_key_refuses_paths_outside_the_project(project, capsys):
    from runner.spec.errors import format_key_path

    cases = _outside_cases(project)
    (project / "specs" / "inside.yaml").write_text("values: {}\n")
    keys = _checked_path_keys()
    assert len(keys) >= 20, keys  # sources, references, models, LoRA files, suites, output_dir, ...
    for path, _kind in keys:
        key = format_key_path(tuple(0 if p == "[]" else "okname1" if p == "<name>" else p for p in path))
        for how, value in cases:
            text, where = _spec_text(_instance_at(path, value, False))
            spec = write_bytes(project, text.encode())
            code, out = run_cli("validate", str(spec), capsys=capsys)
            assert code == 2 and _outside_problem(spec, where[path[0]], key, out), (key, how, out)
            if how == "symlinked file":  # --allow-outside-project lets it through
                code, out = run_cli("validate", "--allow-outside-project", str(spec), capsys=capsys)
                assert not _outside_problem(spec, where[path[0]], key, out), (key, how, out)
        text, where = _spec_text(_instance_at(path, "inside.yaml", False))
        spec = write_bytes(project, text.encode())
        code, out = run_cli("validate", str(spec), capsys=capsys)
        assert not _outside_problem(spec, where[path[0]], key, out), (key, "inside", out)


def _folder_with_links(project: Path, outside: Path) -> Path:
    """A data folder whose real photos sit beside symlinks that lead outside in every way."""
    (outside / "secret").mkdir(parents=True, exist_ok=True)
    (outside / "secret" / "passwd.jpg").write_bytes(b"private")
    folder = project / "data" / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(b"photo")
    (folder / "file_link.jpg").symlink_to(outside / "secret" / "passwd.jpg")
    (folder / "dir_link").symlink_to(outside / "secret")
    (folder / "sub" / "deeper" / "relative.jpg").symlink_to(Path("../../../../../outside/secret/passwd.jpg"))
    (folder / "etc").symlink_to("/etc")
    return folder


def test_dataset_folders_with_links_leading_outside_are_refused_and_never_read(project, capsys, monkeypatch):
    from runner.engine import workspace as W
    from runner.spec import SpecError, load_spec

    outside = project.parent / "outside"
    folder = _folder_with_links(project, outside)
    reads: list[str] = []
    real_digest = W.file_digest
    monkeypatch.setattr(W, "file_digest", lambda p: reads.append(str(p)) or real_digest(p))
    folder_keys = [p for p, kind in _checked_path_keys() if kind in ("data", "named-or-data", "model")]
    for path in folder_keys:
        text, where = _spec_text(_instance_at(path, "../data/photos", False))
        spec = write_bytes(project, text.encode())
        for command in ("validate", "plan"):
            code, out = run_cli(command, str(spec), capsys=capsys)
            assert code == 2, (path, out)
            for link in ("file_link.jpg", "dir_link", "sub/deeper/relative.jpg", "etc ->"):
                assert link in out, (path, link, out)
    assert not [r for r in reads if not r.startswith(str(project))], reads
    # a hidden link is never read, so it is not refused; links that stay inside are fine
    for name in ("file_link.jpg", "dir_link", "etc"):
        (folder / name).unlink()
    (folder / "sub" / "deeper" / "relative.jpg").unlink()
    (folder / ".hidden_link").symlink_to("/etc")
    (folder / "loop").symlink_to(folder)
    (folder / "also_ok.jpg").symlink_to(folder / "ok.jpg")
    spec = write_bytes(project, (MINIMAL + "dataset:\n  sources: [{images: ../data/photos}]\n").encode())
    load_spec(spec)
    # --allow-outside-project lets a link out on purpose
    (folder / "file_link.jpg").symlink_to(outside / "secret" / "passwd.jpg")
    with pytest.raises(SpecError, match="file_link.jpg"):
        load_spec(spec)
    load_spec(spec, allow_outside=True)


def test_non_recursive_sources_only_check_what_they_read(project):
    from runner.spec import load_spec

    folder = _folder_with_links(project, project.parent / "outside")
    for name in ("file_link.jpg", "dir_link", "etc"):
        (folder / name).unlink()
    spec = write_bytes(project,
                       (MINIMAL + "dataset:\n  sources: [{images: ../data/photos, recursive: false}]\n").encode())
    load_spec(spec)  # the link two folders down is never read


def _report_only(monkeypatch):
    from runner.core import contract
    from runner.stages import registry as stage_registry

    stage_registry()
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {k: v for k, v in contract.BUILTIN._kinds.items() if k == "report"})


def test_report_output_dir_is_relative_to_the_spec_file(project, monkeypatch):
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    _report_only(monkeypatch)
    (project / "specs" / "team").mkdir()
    spec = project / "specs" / "team" / "hero.yaml"
    spec.write_text(MINIMAL + "report: {output_dir: out}\n")
    res = apply([load_spec(spec)], ApplyOptions(), QuietReporter())
    assert res.reports["hero"].parent == project / "specs" / "team" / "out" / "hero"
    spec.write_text(MINIMAL + "report: {output_dir: ../../shared-reports}\n")
    res = apply([load_spec(spec)], ApplyOptions(), QuietReporter())
    assert res.reports["hero"].parent == project / "shared-reports" / "hero"
    spec.write_text(MINIMAL)  # the default: the project's reports/ folder, wherever the spec is
    res = apply([load_spec(spec)], ApplyOptions(), QuietReporter())
    assert res.reports["hero"].parent == project / "reports" / "hero"


@pytest.mark.parametrize("output_dir", ["../..", "../../..", "{tmp}/abs-escape", "~/reports",
                                        "link-out", "../reports/../../x"])
def test_report_output_dir_outside_the_project_is_refused(project, capsys, monkeypatch, output_dir):
    _report_only(monkeypatch)
    monkeypatch.setenv("HOME", str(project.parent / "home"))  # '~' stays in the test's folder
    outside = project.parent / "outside-reports"
    outside.mkdir(exist_ok=True)
    (project / "specs" / "link-out").symlink_to(outside)
    output_dir = output_dir.format(tmp=project.parent)
    spec = write_bytes(project, (MINIMAL + f"report: {{output_dir: {output_dir!r}}}\n").encode())
    for command in ("validate", "plan", "apply"):
        code, out = run_cli(command, str(spec), capsys=capsys)
        assert code == 2 and f"{spec}:5:" in out and "report.output_dir" in out, out
    assert sorted(p.name for p in project.parent.iterdir()) == ["outside-reports", "proj"]
    assert not list(outside.iterdir())


def test_a_character_report_folder_symlinked_outside_is_refused_before_anything_runs(project, capsys, monkeypatch):
    _report_only(monkeypatch)
    outside = project.parent / "outside-reports"
    outside.mkdir()
    (project / "reports").mkdir()
    (project / "reports" / "hero").symlink_to(outside)
    spec = write_bytes(project, MINIMAL.encode())
    code, out = run_cli("apply", str(spec), capsys=capsys)
    assert code == 2 and "report.output_dir" in out and "outside the project" in out, out
    assert not list(outside.iterdir())
    assert not (project / ".runner" / "store").exists()
    code, out = run_cli("apply", "--allow-outside-project", str(spec), capsys=capsys)
    assert code == 0 and (outside / "latest.html").is_file(), out


def test_a_model_value_the_loaders_would_find_in_the_project_root_is_checked_too(project):
    from runner.spec import SpecError, load_spec

    outside = project.parent / "outside-model"
    outside.mkdir()
    (outside / "model_index.json").write_text("{}")
    (project / "models").mkdir()
    (project / "models" / "m").symlink_to(outside)  # 'models/m' looks like a hub id from specs/
    spec = write_bytes(project, (MINIMAL + "train: {base_model: models/m}\n").encode())
    with pytest.raises(SpecError, match="train.base_model"):
        load_spec(spec, require_files=False)
    spec = write_bytes(project, (MINIMAL + "train: {base_model: org/name}\n").encode())
    assert load_spec(spec).data["train"]["base_model"] == "org/name"  # a hub id stays one


@pytest.mark.parametrize("suite", ['cases:\n  - {name: "../evil", prompt: "a {subject}"}\n',
                                   'cases:\n  - {name: ".hidden", prompt: "a {subject}"}\n',
                                   "cases: [[[[\n", "cases:\n  - {name: a, prompt: \"x\\0\"}\n"])
def test_files_a_spec_names_that_cannot_be_used_exit_2_at_plan(project, capsys, suite):
    from PIL import Image

    (project / "data").mkdir()
    Image.new("RGB", (64, 64)).save(project / "data" / "still.png")
    (project / "specs" / "suite.yaml").write_text(suite)
    spec = write_bytes(project, (MINIMAL + "generate:\n  video: {model: builtin:tiny-ltx, source: ../data/still.png,"
                                           " suite: suite.yaml}\n").encode())
    code, out = run_cli("plan", str(spec), capsys=capsys)
    assert code == 2 and "generate.video.suite" in out and "suite.yaml" in out and "Traceback" not in out, out


def test_the_report_lists_references_the_way_the_stages_read_them(project, shared_data, monkeypatch):
    import shutil

    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    _report_only(monkeypatch)
    outside = project.parent / "private"
    outside.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", outside / "secret_face.jpg")
    refs = project / "refs"
    refs.mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_02.jpg", refs / "ref.jpg")
    (refs / ".secret_face.jpg").symlink_to(outside / "secret_face.jpg")  # hidden: never read
    spec = write_bytes(project, (MINIMAL + "  references: [../refs]\n").encode())
    res = apply([load_spec(spec)], ApplyOptions(), QuietReporter())
    html = res.reports["hero"].read_text()
    assert "ref.jpg" in html and "secret_face" not in html


def test_paths_in_train_variants_obey_the_same_rule(project):
    from runner.spec import SpecError, load_spec

    outside = project.parent / "outside"
    outside.mkdir()
    (outside / "m.safetensors").write_bytes(b"x")
    (project / "models").mkdir()
    (project / "models" / "m.safetensors").write_bytes(b"y")
    (project / "class").mkdir()
    for override, key in [("{base_model: ../../outside/m.safetensors}", "train.variants.other.base_model"),
                          ("{regularization: {enabled: true, images: ../../outside}}",
                           "train.variants.other.regularization.images")]:
        spec = write_bytes(project, (MINIMAL + f"train:\n  variants:\n    other: {override}\n").encode())
        with pytest.raises(SpecError) as ei:
            load_spec(spec)
        assert [p.key_path for p in ei.value.problems] == [key] and "outside the project" in str(ei.value)
    spec = write_bytes(project,
                       (MINIMAL + "train:\n  variants:\n    other: {base_model: ../models/m.safetensors}\n").encode())
    # held relative to the project root, like every resolved path
    assert load_spec(spec).data["train"]["variants"]["other"]["base_model"] == "models/m.safetensors"


def test_paths_that_cannot_be_resolved_are_spec_errors_for_every_path_key(project, capsys):
    from runner.spec.errors import format_key_path
    from runner.spec.paths import CHECKED_KINDS, EXEMPT_KINDS

    unknown_home = ["~no_such_user_xyz/x.yaml"]
    too_long = ["a" * 300 + ".yaml", "a" * 300, "/".join(["d" * 200] * 30) + ".yaml"]
    for path, kind in [(p, k) for p, k in _path_keys() if k in CHECKED_KINDS + EXEMPT_KINDS]:
        key = format_key_path(tuple(0 if p == "[]" else "okname1" if p == "<name>" else p for p in path))
        for value in unknown_home + (too_long if kind in CHECKED_KINDS else []):
            text, where = _spec_text(_instance_at(path, value, False))
            spec = write_bytes(project, text.encode())
            code, out = run_cli("validate", str(spec), capsys=capsys)
            assert code == 2 and f"{spec}:{where[path[0]]}:" in out and key in out, (key, value[:20], out)
            assert "Traceback" not in out and "internal error" not in out, out


def _refused_by_the_spec_loader(text: bytes) -> bool:
    from runner.spec.yamlio import YamlError, load_yaml_text

    try:
        load_yaml_text(text.decode("utf-8"), "x.yaml")
    except (YamlError, UnicodeDecodeError):
        return True
    return False


# Every hostile input the spec loader refuses on its own, as the whole of another YAML file.
HOSTILE_FILES = [h for h in HOSTILE if _refused_by_the_spec_loader(h[1])]


@pytest.mark.parametrize("name,text,line", HOSTILE_FILES, ids=[h[0] for h in HOSTILE_FILES])
@pytest.mark.parametrize("which", ["evaluate suite", "review file"])
def test_yaml_files_a_spec_names_are_read_like_the_spec(project, capsys, name, text, line, which):
    """A prompt-suite file or the <spec>.review.yaml beside the spec is read by the spec's own
    loader: any input it refuses is exit 2 naming that file and line, never a RecursionError."""
    from PIL import Image

    assert len(HOSTILE_FILES) > 20
    (project / "refs").mkdir()
    Image.new("RGB", (64, 64)).save(project / "refs" / "a.png")
    body = MINIMAL.replace("  trigger: hrochr\n", "  trigger: hrochr\n  references: [../refs]\n")
    body += "dataset: {sources: [{images: ../refs}]}\n"
    if which == "evaluate suite":
        target = project / "specs" / "suite.yaml"
        body += "train: {base_model: builtin:tiny-sd}\nevaluate: {suite: suite.yaml}\n"
    else:
        target = project / "specs" / "hero.review.yaml"
    target.write_bytes(text)
    spec = write_bytes(project, body.encode())
    code, out = run_cli("plan", str(spec), capsys=capsys)
    assert code == 2, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert f"{target.name}:{line - 4 if line else ''}" in out, out


@pytest.mark.parametrize("target", ["outside", "etc", "inside", "chain"])
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_review_file_that_is_a_symlink_is_never_read_through(project, capsys, tmp_path, target, command):
    """<spec>.review.yaml is a file the runner writes itself: a symlink there (to a file outside the
    project, /etc, or anything else) is refused (exit 2) without showing what it points at."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("format: 1\nimages:\n  TOPSECRET:\n    decision: drop\n")
    inner = project / "specs" / "elsewhere.yaml"
    inner.write_text(secret.read_text())
    link = project / "specs" / "hero.review.yaml"
    dest = {"outside": secret, "etc": Path("/etc/passwd"), "inside": inner}.get(target)
    if dest is None:  # a link to a link to the secret
        (project / "specs" / "hop.yaml").symlink_to(secret)
        dest = project / "specs" / "hop.yaml"
    link.symlink_to(dest)
    spec = write_bytes(project, MINIMAL.encode())
    code, out = run_cli(command, str(spec), capsys=capsys)
    assert code == 2 and "hero.review.yaml" in out and "symbolic link" in out, out
    assert "TOPSECRET" not in out and "root:" not in out and "Traceback" not in out, out
    assert link.is_symlink() and dest.read_text()  # nothing was written through or over it


@pytest.mark.parametrize("how", ["file link", "folder link", "relative link"])
def test_a_spec_linked_out_of_its_project_is_refused(project, capsys, tmp_path, how):
    """A spec named inside a project but whose file is elsewhere (a symlink to it, or to its folder)
    would get that folder's workspace and paths: refused (exit 2) unless --allow-outside-project;
    links into a project from outside any project, and a project reached through a link, are fine."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "specs").mkdir(parents=True)
    (elsewhere / "specs" / "hero.yaml").write_text(MINIMAL)
    if how == "folder link":
        (project / "specs" / "linked").symlink_to(elsewhere / "specs")
        spec = project / "specs" / "linked" / "hero.yaml"
    else:
        target = elsewhere / "specs" / "hero.yaml"
        spec = project / "specs" / "hero.yaml"
        spec.symlink_to(os.path.relpath(target, spec.parent) if how == "relative link" else target)
    code, out = run_cli("plan", str(spec), capsys=capsys)
    assert code == 2 and f"{spec}:1:1:" in out and "symbolic link" in out and str(project) in out, out
    assert not (elsewhere / ".runner").exists() and not (tmp_path / ".runner").exists()
    code, out = run_cli("plan", "--allow-outside-project", str(spec), capsys=capsys)
    assert code == 0, out


def test_a_spec_reached_through_links_that_stay_in_its_project_is_accepted(project, capsys, tmp_path):
    (project / "specs" / "hero.yaml").write_text(MINIMAL)
    (project / "specs" / "alias.yaml").symlink_to("hero.yaml")
    (tmp_path / "project_link").symlink_to(project)
    (tmp_path / "loose.yaml").symlink_to(project / "specs" / "hero.yaml")  # from outside any project
    for spec in (project / "specs" / "alias.yaml", tmp_path / "project_link" / "specs" / "hero.yaml",
                 tmp_path / "loose.yaml"):
        code, out = run_cli("validate", str(spec), capsys=capsys)
        assert code == 0, out


def test_every_path_key_refuses_a_fifo_or_device(project, capsys):
    """A path key naming a FIFO (whose digest would wait forever) or a device is a spec error at
    its key; report.output_dir naming a file likewise (it must be a folder)."""
    from runner.spec.errors import format_key_path

    os.mkfifo(project / "specs" / "pipe.yaml")
    (project / "specs" / "plain.yaml").write_text("values: {}\n")
    keys = [(p, k) for p, k in _checked_path_keys() if k != "preset"]  # a preset must be a .yaml file
    assert len(keys) >= 20, keys
    for path, kind in keys:
        key = format_key_path(tuple(0 if p == "[]" else "okname1" if p == "<name>" else p for p in path))
        for value, what in [("pipe.yaml", "FIFO"), ("/dev/null", "character device"), ("plain.yaml", "file")]:
            if what == "file" and kind != "output":
                continue
            text, where = _spec_text(_instance_at(path, value, False))
            spec = write_bytes(project, text.encode())
            code, out = run_cli("validate", "--allow-outside-project", str(spec), capsys=capsys)  # for /dev
            assert code == 2 and f":{where[path[0]]}:" in out and key in out and f"(it is a {what})" in out, (key, out)


@pytest.mark.parametrize("name", ["con", "nul", "com1", "lpt9", "aux"])
def test_runner_init_never_writes_a_spec_whose_name_fails_validation(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli("init", name, capsys=capsys)
    assert code == 2 and "device name on Windows" in out and not (tmp_path / "specs" / f"{name}.yaml").exists(), out
