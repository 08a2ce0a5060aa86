"""Spec loading: YAML -> validated, resolved :class:`Spec`."""

from __future__ import annotations

from pathlib import Path

from runner.spec.errors import Problem, SpecError
from runner.spec.resolve import Spec, load_spec

__all__ = ["REVIEW_SUFFIX", "Spec", "SpecError", "Problem", "load_spec", "load_specs", "collect_spec_files"]


# ``<spec>.review.yaml``: the decisions `runner review` saves next to a spec
# (runner.review.decisions.review_path), never a spec itself.
REVIEW_SUFFIX = ".review.yaml"
SPEC_SUFFIXES = (".yaml", ".yml")


def collect_spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named on the command line, each once; a folder means every *.yaml / *.yml in it
    (not its sub-folders), hidden files and review files (``*.review.yaml``) left out. Any other
    YAML file is taken as a spec, and one that is not a spec fails validation with its file:line."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = _specs_in(p)
            if not found:
                problems.append(Problem(str(p), 1, 1, "(folder)", "no .yaml spec files in this folder"))
            files.extend(found)
        elif p.name.endswith(REVIEW_SUFFIX) and p.exists():
            spec = p.with_name(p.name[: -len(REVIEW_SUFFIX)] + ".yaml")
            problems.append(Problem(str(p), 1, 1, "(file)", "this is a review file (the decisions `runner review` "
                                    "saves), not a spec", hint=f"Name the spec it belongs to: {spec}."))
        elif p.exists():
            files.append(p)
        else:
            problems.append(Problem(str(p), 1, 1, "(file)", "spec file not found",
                                    hint="Create one with `runner init NAME`."))
    if problems:
        raise SpecError(problems)
    return _unique(files)


def _specs_in(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if q.suffix in SPEC_SUFFIXES and not q.name.startswith(".")
                  and not q.name.endswith(REVIEW_SUFFIX) and q.is_file())


def _unique(files: list[Path]) -> list[Path]:
    """``files`` without a second name for a file already listed (a folder and a file in it)."""
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
