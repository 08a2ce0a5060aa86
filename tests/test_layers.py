"""Guards that keep the architecture of docs/architecture.md so (issue 13, part 6).

Imports go down the layers only. Every module under runner/ is parsed with ``ast``; every import is
read, at module level and inside functions alike (a lazy import is still a dependency), plus
``importlib.import_module("runner...")`` calls with a literal name. Each module belongs to the
package of the longest matching entry of ``LAYERS``. An import may go to a lower layer, or stay in
its own package; an import to another package of the same layer must be an edge of ``SIDEWAYS``,
which is a DAG. A new package has to be placed in ``LAYERS`` (and in docs/architecture.md) before
anything passes. Within runner/stages/, a stage kind imports no other kind: what kinds share lives
in runner/stages/common.py; and no module outside runner/stages/ names a stage kind.

Functions stay short: none in runner/engine/ over 60 lines, none in runner/ over 100 (def line to
last line, decorators not counted).

Run them alone with ``make lint`` (ruff and this file).
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runner"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# The layer of each package, low -> high. One line per package; a module belongs to the longest
# entry its dotted name starts with.
LAYERS = {
    "runner.core": 0,  # the floor: stage contract, UserError, atomic writes, hashes, pricing
    "runner.paths": 1,
    "runner.resources": 1,
    "runner.hub": 1,
    "runner.buildcache": 1,
    "runner.tracking": 1,
    "runner.report": 1,  # embed (data URIs), charts (SVG)
    "runner.spec": 2,
    "runner.vision": 3,
    "runner.video": 3,
    "runner.diffusion": 3,
    "runner.metrics": 3,
    "runner.eval": 3,
    "runner.generate": 3,
    "runner.review.decisions": 3,
    "runner.review.agreement": 3,
    "runner.review.summary": 3,
    "runner.stages": 4,
    "runner.plan": 5,
    "runner.backends": 6,
    "runner.engine": 7,
    "runner.cli": 8,
    "runner.serve": 8,
    "runner.publish": 8,
    "runner.review.app": 8,
    "runner.review.state": 8,
}

# Package __init__ files whose submodules sit on different layers: they match exactly, never as
# a prefix (``runner`` holds only __version__, ``runner.review`` only its docstring).
PACKAGE_INITS = {
    "runner": 0,
    "runner.review": 3,
}

# Imports between two packages of the same layer, allowed only along these edges (importer ->
# what it may import). Today's imports, written down; test_sideways_edges_form_a_dag refuses a cycle.
SIDEWAYS = {
    # layer 3, the domain
    "runner.video": {"runner.vision", "runner.metrics"},
    "runner.metrics": {"runner.diffusion"},
    "runner.eval": {"runner.metrics"},
    "runner.generate": {"runner.diffusion", "runner.metrics", "runner.vision"},
    "runner.review.agreement": {"runner.eval"},
    "runner.review.summary": {"runner.review.agreement", "runner.review.decisions"},
    # layer 8, the apps
    "runner.cli": {"runner.serve", "runner.publish", "runner.review.app", "runner.review.state"},
    "runner.publish": {"runner.serve"},
    "runner.review.app": {"runner.review.state"},
}

MAX_LINES = 100  # any function under runner/
MAX_LINES_ENGINE = 60  # any function under runner/engine/


@functools.cache
def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module of the runner package under ``root``: dotted name -> file."""
    modules = {}
    for path in sorted((root / "runner").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


@functools.cache
def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _statements(body: list[ast.stmt]):
    """Every statement, nested ones included (function and class bodies, branches, handlers, cases).

    Walking statements only, not every expression, is what keeps this file fast."""
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(stmt, field, None) or [])
        for part in [*getattr(stmt, "handlers", ()), *getattr(stmt, "cases", ())]:
            yield from _statements(part.body)


def package_of(module: str) -> str | None:
    """The LAYERS / PACKAGE_INITS entry a module belongs to, or None when it is not placed."""
    if module in PACKAGE_INITS:
        return module
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix
    return None


def layer_of(package: str) -> int:
    return LAYERS[package] if package in LAYERS else PACKAGE_INITS[package]


def _is_runner(name: str) -> bool:
    return name == "runner" or name.startswith("runner.")


def _literal_prefix(node: ast.expr) -> str | None:
    """``"runner.x"`` -> runner.x; ``f"runner.stages.{name}"`` -> runner.stages (the literal part)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".") or None
    return None


def _dynamic_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """``importlib.import_module("runner.x")`` / ``__import__(...)`` with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = _literal_prefix(node.args[0]) if name in ("import_module", "__import__") else None
            if target:
                found.append((target, node.lineno))
    return found


def _imports(root: pathlib.Path, module: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported runner module, line) for each runner import in a module, wherever it is written.

    ``from runner.x import y`` imports runner.x.y when that is a module, else runner.x."""
    modules = _modules(root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = _tree(path)
    found = []
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    text = path.read_text(encoding="utf-8")
    if "import_module" in text or "__import__" in text:
        found += _dynamic_imports(tree)
    return [(name, line) for name, line in found if _is_runner(name)]


@functools.cache
def _all_imports(root: pathlib.Path) -> tuple[tuple[str, str, str, int], ...]:
    """(importer, imported, file relative to root, line) for every runner import under root/runner."""
    return tuple(
        (module, imported, str(path.relative_to(root)), line)
        for module, path in _modules(root).items()
        for imported, line in _imports(root, module, path)
    )


def unplaced_modules(root: pathlib.Path) -> list[str]:
    return sorted(m for m in _modules(root) if package_of(m) is None)


def missing_imports(root: pathlib.Path) -> list[str]:
    modules = _modules(root)
    return sorted(
        f"{where}:{line} imports {imported}, which does not exist"
        for _module, imported, where, line in _all_imports(root)
        if imported not in modules
    )


def upward_imports(root: pathlib.Path) -> list[str]:
    """Each import that goes up a layer, or sideways to a package SIDEWAYS does not allow."""
    bad = []
    for module, imported, where, line in _all_imports(root):
        src, dst = package_of(module), package_of(imported)
        if src is None or dst is None or src == dst:
            continue  # unplaced modules fail test_every_module_is_placed_on_a_layer
        a, b = layer_of(src), layer_of(dst)
        if b > a:
            bad.append(f"{module} -> {imported} (layer {a} -> layer {b}) at {where}:{line}")
        elif b == a and dst not in SIDEWAYS.get(src, ()):
            bad.append(
                f"{module} -> {imported} (layer {a} -> layer {b}: sideways {src} -> {dst} is not "
                f"in SIDEWAYS) at {where}:{line}"
            )
    return sorted(bad)


def core_imports_from_above(root: pathlib.Path) -> list[str]:
    return sorted(
        f"{module} -> {imported} at {where}:{line}"
        for module, imported, where, line in _all_imports(root)
        if package_of(module) == "runner.core" and package_of(imported) != "runner.core"
    )


# What a stage kind module may import of runner.stages: the package (its registry) and the helpers
# several kinds share. A kind never imports another kind (docs/architecture.md, layer 4).
STAGE_SHARED = {"runner.stages", "runner.stages.common"}


def stage_to_stage_imports(root: pathlib.Path) -> list[str]:
    return sorted({
        f"{module} -> {imported} at {where}:{line}"
        for module, imported, where, line in _all_imports(root)
        if package_of(module) == "runner.stages" and module not in STAGE_SHARED
        and package_of(imported) == "runner.stages" and imported not in STAGE_SHARED and imported != module
    } | {
        f"{module} -> {imported} at {where}:{line} (the shared helpers import no stage kind)"
        for module, imported, where, line in _all_imports(root)
        if module == "runner.stages.common" and package_of(imported) == "runner.stages" and imported not in STAGE_SHARED
    })


def builtin_kinds(root: pathlib.Path) -> set[str]:
    """The built-in stage kinds: BUILTIN_STAGE_MODULES of runner/stages/__init__.py (one kind a module)."""
    for node in _statements(_tree(root / "runner" / "stages" / "__init__.py").body):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BUILTIN_STAGE_MODULES" for t in node.targets):
            return {e.value for e in node.value.elts}
    raise AssertionError("runner/stages/__init__.py defines no BUILTIN_STAGE_MODULES")


def _names_kind(expr: ast.expr) -> bool:
    return getattr(expr, "attr", None) == "kind" or getattr(expr, "id", None) == "kind"


def kind_names_outside_stages(root: pathlib.Path) -> list[str]:
    """Places outside runner/stages/ that name a stage kind: ``kind == "report"``, ``node.kind in
    ("train", ...)``, or a table keyed by kind names. What makes a kind special is a trait it declares."""
    kinds = builtin_kinds(root)
    found = []
    for module, path in _modules(root).items():
        if package_of(module) == "runner.stages":
            continue
        for node in ast.walk(_tree(path)):
            literals: list[str] = []
            if isinstance(node, ast.Compare) and any(_names_kind(e) for e in (node.left, *node.comparators)):
                for e in (node.left, *node.comparators):
                    for v in [e, *getattr(e, "elts", ())]:
                        if isinstance(v, ast.Constant) and v.value in kinds:
                            literals.append(v.value)
            elif isinstance(node, ast.Dict) and len(node.keys) >= 2:  # a table whose every key is a kind
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in kinds]
                literals = keys if len(keys) == len(node.keys) else []
            if literals:
                found.append(f"{path.relative_to(root)}:{node.lineno} names {', '.join(sorted(set(literals)))}")
    return sorted(found)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of a directed graph as [a, b, ..., a], or None when it is a DAG."""
    state: dict[str, str] = {}  # node -> "open" while on the DFS path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def long_functions(root: pathlib.Path, under: str, limit: int) -> list[str]:
    """``file:line name: N lines`` for each function under root/under longer than limit lines."""
    long = []
    for path in sorted((root / under).rglob("*.py")):
        for node in _statements(_tree(path).body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    return long


def _listing(items: list[str]) -> str:
    return "\n  " + "\n  ".join(items)


# --- the guards on this tree -------------------------------------------------------------------


def test_every_module_is_placed_on_a_layer():
    unplaced = unplaced_modules(ROOT)
    assert not unplaced, (
        "modules in no layer: add their package to LAYERS in tests/test_layers.py and to the "
        "layer list in docs/architecture.md:" + _listing(unplaced)
    )


def test_every_layer_entry_names_a_real_package():
    modules = _modules(ROOT)
    stale = sorted(
        package for package in [*LAYERS, *PACKAGE_INITS]
        if not any(m == package or m.startswith(package + ".") for m in modules)
    )
    assert not stale, "LAYERS / PACKAGE_INITS name packages that are gone: " + ", ".join(stale)


def test_imported_runner_modules_exist():
    """A lazy import of a module that moved fails only when its function runs: catch it here."""
    missing = missing_imports(ROOT)
    assert not missing, "imports of runner modules that do not exist:" + _listing(missing)


def test_no_upward_imports():
    bad = upward_imports(ROOT)
    assert not bad, f"imports that go up a layer or sideways ({len(bad)}):" + _listing(bad)


def test_core_imports_nothing_of_runner_outside_core():
    bad = core_imports_from_above(ROOT)
    assert not bad, "runner/core imports runner modules outside runner/core:" + _listing(bad)


def test_no_stage_kind_imports_another():
    bad = stage_to_stage_imports(ROOT)
    assert not bad, ("stage kinds import each other (move what they share to runner/stages/common.py):"
                     + _listing(bad))


def test_no_module_outside_stages_names_a_stage_kind():
    bad = kind_names_outside_stages(ROOT)
    assert not bad, ("modules outside runner/stages/ name stage kinds (declare a trait on the kind instead):"
                     + _listing(bad))


def test_sideways_edges_join_one_layer_and_form_a_dag():
    wrong_layer = sorted(
        f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})"
        for src, targets in SIDEWAYS.items()
        for dst in targets
        if layer_of(src) != layer_of(dst)
    )
    assert not wrong_layer, "SIDEWAYS edges must join packages of one layer:" + _listing(wrong_layer)
    cycle = find_cycle(SIDEWAYS)
    assert cycle is None, "SIDEWAYS has a cycle: " + " -> ".join(cycle)


def _doc_layers_section() -> str:
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    match = re.search(r"^## Layers.*?(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, f"{ARCHITECTURE_DOC.relative_to(ROOT)} has no '## Layers' section"
    return match.group(0)


def _numbered_layers(section: str) -> dict[str, set[int]]:
    """Package (dotted, without ``runner.``) -> the layer numbers of the lines that name it, for a
    list written as ``  3 domain: vision, video, ..., review.decisions/agreement/summary``."""
    found: dict[str, set[int]] = {}
    for number, text in re.findall(r"^\s*(\d+)\s+(\S.*)$", section, flags=re.MULTILINE):
        for token in re.findall(r"[A-Za-z_][\w.]*(?:/[\w.]+)*", text.replace("runner/", "")):
            parts = [t.removesuffix(".py") for t in token.strip("/").split("/") if t]
            if len(parts) > 1 and "." in parts[0]:  # review.decisions/agreement: siblings
                prefix = parts[0].rpartition(".")[0]
                names = [parts[0], *(f"{prefix}.{p}" for p in parts[1:])]
            else:  # review/app: a path
                names = [".".join(parts)]
            for name in names:
                found.setdefault(name, set()).add(int(number))
    return found


def test_architecture_doc_lists_the_same_packages():
    """docs/architecture.md's layer list names each package of LAYERS, and only paths that exist.

    A package is named by its path (``runner/core/``, ``runner/paths.py``, ``runner/review/app.py``)
    or its dotted name (``runner.review.app``). Where the list numbers its layers (lines such as
    ``  1 paths, resources, hub``), each package is on the line of its number in LAYERS."""
    section = _doc_layers_section()
    problems = []
    numbered = _numbered_layers(section)
    if len(re.findall(r"^\s*\d+\s+\S", section, flags=re.MULTILINE)) >= 3:
        for package, layer in LAYERS.items():
            short = package.removeprefix("runner.")
            there = sorted(numbered.get(short, ()))
            if there != [layer]:
                problems.append(f"{short} is on layer {layer} in LAYERS, on {there or 'no line'} there")
    else:
        unnamed = [package.replace(".", "/") for package in LAYERS
                   if not re.search(rf"{re.escape(package.replace('.', '/'))}(/|\.py\b|\b)|\b{re.escape(package)}\b",
                                    section)]
        if unnamed:
            problems.append("packages it does not name: " + ", ".join(unnamed))
    named = set(re.findall(r"\brunner/[\w/]*\w(?:\.py)?", section))
    # runner/_data/ exists only inside the wheel (schemas/ and templates/ are copied there).
    stale = sorted(p for p in named if not (ROOT / p).exists() and not p.startswith("runner/_data"))
    if stale:
        problems.append("paths it names that do not exist: " + ", ".join(stale))
    assert not problems, f"{ARCHITECTURE_DOC.relative_to(ROOT)}, '## Layers': " + "; ".join(problems)


def test_numbered_layer_lists_are_read_like_the_plan():
    section = """
  0 core
  1 paths, resources, hub, buildcache, tracking, report (embed/charts)
  3 domain: vision, video, review.decisions/agreement/summary
  8 apps: cli, serve, publish, runner/review/app.py, review/state
"""
    found = _numbered_layers(section)
    assert found["core"] == {0} and found["report"] == {1} and found["tracking"] == {1}
    assert found["review.decisions"] == found["review.agreement"] == found["review.summary"] == {3}
    assert found["review.app"] == found["review.state"] == {8} and found["cli"] == {8}


def test_no_engine_function_over_60_lines():
    long = long_functions(ROOT, "runner/engine", MAX_LINES_ENGINE)
    assert not long, f"functions in runner/engine/ over {MAX_LINES_ENGINE} lines:" + _listing(long)


def test_no_runner_function_over_100_lines():
    long = long_functions(ROOT, "runner", MAX_LINES)
    assert not long, f"functions in runner/ over {MAX_LINES} lines:" + _listing(long)


# --- the checkers themselves, on a small made-up tree ------------------------------------------


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _function(name: str, lines: int) -> str:
    return f"def {name}():\n" + "    x = 1\n" * (lines - 2) + "    return x\n"


def test_checkers_find_every_kind_of_upward_import(tmp_path):
    root = _write(tmp_path, {
        "runner/__init__.py": "",
        "runner/core/__init__.py": "",
        # inside a function, a spec import from the floor: upward and out of core
        "runner/core/a.py": "def f():\n    from runner.spec import x\n    return x\n",
        "runner/spec/__init__.py": "",
        # relative, two levels up: runner.engine.y
        "runner/spec/x.py": "from ..engine import y\nfrom . import z\n",
        "runner/spec/z.py": "import runner.core.a\n",
        "runner/engine/__init__.py": "",
        "runner/engine/y.py": "from runner.stages import load\nfrom runner import core\n",
        "runner/vision/__init__.py": "import runner.video\n",  # sideways, not in SIDEWAYS
        "runner/video/__init__.py": "from runner.vision import q\n",  # sideways, listed
        "runner/stages/__init__.py": (
            "import importlib\n"
            "def load(n):\n"
            "    importlib.import_module(f'runner.engine.{n}')\n"
            "    importlib.import_module('runner.gone')\n"
        ),
        "runner/newpkg/__init__.py": "",
    })
    assert upward_imports(root) == sorted([
        "runner.core.a -> runner.spec.x (layer 0 -> layer 2) at runner/core/a.py:2",
        "runner.spec.x -> runner.engine.y (layer 2 -> layer 7) at runner/spec/x.py:1",
        "runner.stages -> runner.engine (layer 4 -> layer 7) at runner/stages/__init__.py:3",
        (
            "runner.vision -> runner.video (layer 3 -> layer 3: sideways runner.vision -> runner.video "
            "is not in SIDEWAYS) at runner/vision/__init__.py:1"
        ),
    ])
    assert core_imports_from_above(root) == ["runner.core.a -> runner.spec.x at runner/core/a.py:2"]
    assert unplaced_modules(root) == ["runner.newpkg"]
    assert missing_imports(root) == [
        "runner/stages/__init__.py:4 imports runner.gone, which does not exist",
    ]


def test_stage_checker_finds_a_kind_importing_another(tmp_path):
    root = _write(tmp_path, {
        "runner/__init__.py": "",
        "runner/stages/__init__.py": (
            "import importlib\ndef load(n):\n    importlib.import_module(f'runner.stages.{n}')\n"
        ),
        "runner/stages/common.py": "from runner.stages import load\n",
        "runner/stages/a.py": "from runner.stages.common import load\nfrom runner.stages import registry\n",
        "runner/stages/b.py": "def f():\n    from runner.stages.a import g\n    return g\n",
        "runner/stages/c.py": "from . import a\n",
    })
    assert stage_to_stage_imports(root) == [
        "runner.stages.b -> runner.stages.a at runner/stages/b.py:2",
        "runner.stages.c -> runner.stages.a at runner/stages/c.py:1",
    ]


def test_kind_checker_finds_comparisons_and_tables_of_kind_names(tmp_path):
    root = _write(tmp_path, {
        "runner/__init__.py": "",
        "runner/stages/__init__.py": 'BUILTIN_STAGE_MODULES = ("train", "report")\n',
        "runner/stages/report.py": 'def f(node):\n    return node.kind == "report"\n',  # a stage may
        "runner/engine/__init__.py": "",
        "runner/engine/x.py": (
            'def f(ps, kind):\n'
            '    if ps.node.kind == "report":\n'
            '        return kind in ("train", "other")\n'
            '    section = spec["report"]  # a spec section of that name is no kind\n'
            '    row = {"train": 1, "name": "x"}  # a row with a field of that name is no table of kinds\n'
            '    return {"train": 60, "report": 1}\n'
        ),
    })
    assert kind_names_outside_stages(root) == [
        "runner/engine/x.py:2 names report",
        "runner/engine/x.py:3 names train",
        "runner/engine/x.py:6 names report, train",
    ]


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_long_functions_counts_def_to_last_line(tmp_path):
    root = _write(tmp_path, {
        "runner/engine/e.py": _function("ok", 60) + _function("too_long", 61),
        "runner/other.py": (
            "class C:\n    @staticmethod\n" + "".join("    " + line + "\n" for line in _function("m", 101).splitlines())
            + _function("fits", 100)
        ),
    })
    assert long_functions(root, "runner/engine", 60) == ["runner/engine/e.py:61 too_long: 61 lines"]
    assert long_functions(root, "runner", 100) == ["runner/other.py:3 m: 101 lines"]
