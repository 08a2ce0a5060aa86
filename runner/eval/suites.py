"""Prompt suites: prompts grouped by category, with {trigger} / {class} placeholders and negatives.

A suite is YAML (or the same mapping inline in the spec under ``evaluate.suite``)::

    description: optional text
    categories:
      close_up:
        negative: "blurry, deformed face"      # optional; evaluate.negative_prompt otherwise
        prompts:
          - "close-up portrait of {trigger} {class}, soft light"
      my_own_category:
        prompts: [...]

``evaluate.suite`` is ``builtin`` (or the name of another suite shipped in runner/presets/suites),
a path to a suite file (relative to the spec; the resolved spec holds it relative to the project
root), or the inline mapping. The rendered prompts go into the evaluate stage's config, so editing
a suite file re-runs evaluation and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core.errors import StageError

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
KNOWN_PLACEHOLDERS = ("trigger", "class")
CATEGORY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


@dataclass
class SuiteCategory:
    prompts: list[str]
    negative: str = ""


@dataclass
class Suite:
    source: str  # "builtin", "inline" or the suite file's path
    categories: dict[str, SuiteCategory]
    description: str = ""


@dataclass(frozen=True)
class SuitePrompt:
    category: str
    index: int  # position in its category
    template: str
    prompt: str  # placeholders filled
    negative: str

    @property
    def key(self) -> str:
        """Stable id of the prompt across runs: ``<category>/<index>``."""
        return f"{self.category}/{self.index:02d}"

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "index": self.index, "template": self.template,
                "prompt": self.prompt, "negative": self.negative}


@dataclass
class RenderedSuite:
    source: str
    prompts: list[SuitePrompt] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        out: dict[str, None] = {}
        for p in self.prompts:
            out.setdefault(p.category, None)
        return list(out)


def builtin_suites() -> dict[str, Path]:
    from runner.resources import resource_dir

    folder = resource_dir("presets") / "suites"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_suite(value: str | dict[str, Any], *, project_root: Path | None = None,
               spec_key: str = "evaluate.suite") -> Suite:
    """A suite from a built-in name, a file path, or an inline mapping (see module docstring)."""
    if isinstance(value, dict):
        return _parse(value, source="inline", where=spec_key)
    if not isinstance(value, str) or not value.strip():
        raise StageError(f"{spec_key}: expected a suite name, a path or a mapping, got {value!r}",
                         hint="Use 'builtin', a path to a suite .yaml, or {categories: {...}}.")
    shipped = builtin_suites()
    if value in shipped:
        return _parse(_read_yaml(shipped[value], spec_key), source=value, where=str(shipped[value]))
    path = Path(value).expanduser()
    if not path.is_absolute() and project_root is not None:
        path = project_root / path
    if not path.is_file():
        raise StageError(
            f"{spec_key}: suite {value!r} is neither a built-in suite nor an existing file ({path})",
            hint=f"Built-in suites: {', '.join(shipped)}. Paths are relative to the spec file.",
        )
    return _parse(_read_yaml(path, spec_key), source=value, where=str(path))


def _read_yaml(path: Path, spec_key: str) -> Any:
    """A suite file's data, read like the spec itself (runner.spec.yamlio: bounded nesting and
    size, aliases capped, NUL and tags refused), so any broken file is a message with file:line."""
    from runner.spec.yamlio import YamlError, load_yaml_file

    try:
        return load_yaml_file(path).data
    except YamlError as exc:
        raise StageError(f"{spec_key}: suite file {exc.mark} is not valid YAML: {exc.message}",
                         hint=exc.hint or "Check indentation and quote prompts that contain ':' or '#'.") from None


def _parse(data: Any, *, source: str, where: str) -> Suite:
    def bad(key: str, msg: str, hint: str = "") -> StageError:
        return StageError(f"{where}: {key}: {msg}",
                          hint=hint or "See runner/presets/suites/builtin.yaml for the format.")

    if not isinstance(data, dict):
        raise bad("(top level)", "a suite must be a mapping with a 'categories:' key")
    unknown = set(data) - {"categories", "description"}
    if unknown:
        raise bad(", ".join(sorted(unknown)), "unknown key(s); a suite has 'categories' and optional 'description'")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise bad("categories", "needs at least one category: {name: {prompts: [...]}}")
    out: dict[str, SuiteCategory] = {}
    for name, body in cats.items():
        key = f"categories.{name}"
        if not isinstance(name, str) or not CATEGORY_NAME.match(name):
            raise bad(key, "category names are letters, digits, '_' and '-'")
        if not isinstance(body, dict):
            raise bad(key, "expected {prompts: [...], negative: '...'}")
        extra = set(body) - {"prompts", "negative"}
        if extra:
            raise bad(key, f"unknown key(s) {', '.join(sorted(map(str, extra)))}; expected prompts and negative")
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise bad(f"{key}.prompts", "needs a non-empty list of prompt strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise bad(f"{key}.prompts[{i}]", f"expected a non-empty string, got {p!r}")
            for ph in PLACEHOLDER.findall(p):
                if ph not in KNOWN_PLACEHOLDERS:
                    raise bad(f"{key}.prompts[{i}]", f"unknown placeholder {{{ph}}}",
                              hint="Prompts may use {trigger} and {class}.")
        negative = body.get("negative", "")
        if not isinstance(negative, str):
            raise bad(f"{key}.negative", "expected a string")
        out[name] = SuiteCategory(prompts=list(prompts), negative=negative)
    description = data.get("description", "")
    return Suite(source=source, categories=out, description=description if isinstance(description, str) else "")


def fill(template: str, *, trigger: str, class_word: str) -> str:
    values = {"trigger": trigger, "class": class_word}
    text = PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return re.sub(r"\s{2,}", " ", text).strip()


def render_suite(
    suite: Suite,
    *,
    trigger: str,
    class_word: str,
    categories: list[str] | None = None,
    prompts_per_category: int | None = None,
    default_negative: str = "",
    spec_key: str = "evaluate.categories",
) -> RenderedSuite:
    """The prompts to generate, placeholders filled, in suite order.

    ``categories`` keeps only those (in the suite's order); an unknown name is an error.
    """
    wanted = list(suite.categories)
    if categories:
        missing = [c for c in categories if c not in suite.categories]
        if missing:
            raise StageError(
                f"{spec_key}: categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} not in suite "
                f"{suite.source!r}",
                hint=f"The suite has: {', '.join(suite.categories)}.",
            )
        wanted = [c for c in suite.categories if c in categories]
    out = RenderedSuite(source=suite.source)
    for cat in wanted:
        body = suite.categories[cat]
        templates = body.prompts[:prompts_per_category] if prompts_per_category else body.prompts
        for i, t in enumerate(templates):
            out.prompts.append(SuitePrompt(
                category=cat, index=i, template=t,
                prompt=fill(t, trigger=trigger, class_word=class_word),
                negative=body.negative or default_negative,
            ))
    return out
