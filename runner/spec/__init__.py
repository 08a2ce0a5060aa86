"""Spec loading: YAML -> validated, resolved :class:`Spec`."""

from __future__ import annotations

from pathlib import Path

from runner.spec.errors import Problem, SpecError
from runner.spec.resolve import Spec, load_spec

__all__ = ["Spec", "SpecError", "Problem", "load_spec", "load_specs", "collect_spec_files"]


def collect_spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named on the command line; a folder means every *.yaml / *.yml in it."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file()
                           and not q.name.startswith("."))
            if not found:
                problems.append(Problem(str(p), 1, 1, "(folder)", "no .yaml spec files in this folder"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append(Problem(str(p), 1, 1, "(file)", "spec file not found",
                                    hint="Create one with `runner init NAME`."))
    if problems:
        raise SpecError(problems)
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique


def load_specs(paths: list[str | Path], *, allow_outside: bool = False,
               require_files: bool = True) -> list[Spec]:
    """Load every spec; all problems of all files are raised together."""
    specs: list[Spec] = []
    problems: list[Problem] = []
    for f in collect_spec_files(paths):
        try:
            specs.append(load_spec(f, allow_outside=allow_outside, require_files=require_files))
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return specs
