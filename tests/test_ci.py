"""CI runs the command the README names, and that command lints before it tests."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _expand(text: str, variables: dict[str, str]) -> str:
    """$(NAME) replaced by the Makefile's value of NAME, until nothing changes (functions stay)."""
    for _ in range(10):
        text, before = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text), text
        if text == before:
            break
    return text


def _make_rules() -> dict[str, tuple[list[str], str]]:
    """target -> (prerequisites, recipe text with the Makefile's variables expanded) for its plain rules."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*)$", text, flags=re.MULTILINE))
    rules: dict[str, tuple[list[str], str]] = {}
    target = None
    for line in _expand(text, variables).splitlines():
        head = re.match(r"^([\w.-]+):(?!=)\s*(.*)$", line)
        if head:
            target = head.group(1)
            rules[target] = (head.group(2).split(), "")
        elif target and line.startswith("\t"):
            prereqs, recipe = rules[target]
            rules[target] = (prereqs, recipe + line + "\n")
        elif line.strip() and not line.startswith("#"):
            target = None
    return rules


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = re.findall(r"^ {4}(make [\w-]+)\s+#.*CI runs exactly this", readme, flags=re.MULTILINE)
    assert len(named) == 1, "README.md names no command (or several) as the one CI runs"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == named[0], f".ci/run runs {ci[-1]!r}, README.md says CI runs {named[0]!r}"


def test_make_test_and_test_fast_lint_first():
    rules = _make_rules()
    lint = rules["lint"][1]
    assert "ruff check" in lint and "tests/test_layers.py" in lint
    assert "lint" in rules["test"][0] and "pytest" in rules["test"][1]
    assert not re.search(r"pytest\b.*\s-m\s", rules["test"][1]), "make test runs the whole suite, no marker filter"
    assert "lint" in rules["test-fast"][0] and '-m "not slow"' in rules["test-fast"][1]
