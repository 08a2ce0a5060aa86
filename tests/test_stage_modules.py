"""Stage modules share helpers through runner/stages/common.py only: no stage module imports
another stage module (a helper two stages need moves to common, so a stage can change or go
without breaking another). The package itself (``runner.stages.registry``) is not a stage."""

from __future__ import annotations

import ast
from pathlib import Path

import runner.stages

STAGES = Path(runner.stages.__file__).parent
SHARED = {"common"}  # the one module stage kinds share


def stage_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every runner.stages.<module> a file imports, at the top or in a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "runner.stages":
                found += [(node.lineno, a.name) for a in node.names if (STAGES / f"{a.name}.py").is_file()]
            elif node.module.startswith("runner.stages."):
                found.append((node.lineno, node.module.split(".")[2]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[2]) for a in node.names if a.name.startswith("runner.stages.")]
    return found


def test_no_stage_module_imports_another():
    modules = sorted(p for p in STAGES.glob("*.py") if p.name != "__init__.py")
    assert len(modules) > 10  # the walk sees the stage modules
    bad = [f"{p.name}:{line} imports runner.stages.{mod}" for p in modules for line, mod in stage_imports(p)
           if mod not in SHARED and mod != p.stem]
    assert not bad, ("stage modules share helpers through runner/stages/common.py, not through each other: "
                     + "; ".join(bad))


def test_the_walk_sees_every_import_form(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from runner.stages.storyboard import a\nfrom runner.stages import curate\n"
                 "import runner.stages.analyze\ndef g():\n    from runner.stages.common import b\n")
    assert [m for _, m in stage_imports(f)] == ["storyboard", "curate", "analyze", "common"]
