"""Spec file -> fully explicit, validated spec: presets merged, defaults filled, paths resolved.

Every problem found is collected and raised at once as a :class:`SpecError`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.resources import resource_dir
from runner.spec import schema as S
from runner.spec.errors import Problem, SpecError, format_key_path
from runner.paths import glob_walks_folders, split_glob
from runner.spec.paths import EXEMPT_KINDS, OUTSIDE_HINT, PathRules, declared_names, is_path
from runner.spec.yamlio import LoadedYaml, YamlError, load_yaml_file

# Which preset folder serves which section (key path of the 'preset' field -> folder).
if TYPE_CHECKING:
    from runner.spec.sections import SpecConfig

PRESET_FOLDERS: dict[tuple[str, ...], str] = {
    ("train",): "train",
    ("evaluate",): "inference",
    ("generate", "video"): "video",
}

PROJECT_MARKERS = (".git", "runner.toml", ".runner")
LINKS_HINT = ("Remove the links or copy what they point at into the project, "
              "or pass --allow-outside-project if this is intended.")
GLOB_HINT = ("A video source names a video file, a folder of videos, or a glob relative to the spec file "
             "(../rides/*.mp4, ../rides/**/*.mp4) whose part before the first wildcard is an existing folder.")


@dataclass
class Spec:
    """A loaded, validated and resolved spec."""

    file: Path
    project_root: Path
    data: dict[str, Any]  # fully resolved (presets + defaults + normalized paths)
    raw: dict[str, Any]  # as written
    loaded: LoadedYaml
    presets_used: dict[str, str] = field(default_factory=dict)  # section -> preset file
    allow_outside: bool = False  # --allow-outside-project: paths may lead outside project_root

    @property
    def name(self) -> str:
        return self.data["character"]["name"]

    @property
    def config(self) -> "SpecConfig":
        """The typed, frozen view of ``data``: a field per key, the schema's defaults
        (runner.spec.sections)."""
        from runner.spec.sections import spec_config

        return spec_config(self.data)

    def abspath(self, value: str) -> Path:
        """Absolute path of a normalized path value from the resolved spec."""
        p = Path(value)
        return p if p.is_absolute() else (self.project_root / p)


def find_project_root(spec_file: Path) -> Path:
    """Nearest ancestor of the spec's folder holding .git, runner.toml or .runner."""
    start = spec_file.resolve().parent
    for folder in (start, *start.parents):
        if any((folder / m).exists() for m in PROJECT_MARKERS):
            return folder
    return start


def _spec_link_problems(spec_file: Path, project_root: Path) -> list[Problem]:
    """A spec reached through a symbolic link that leads out of the project it was named in (its
    workspace, reports and relative paths would be those of another folder) is refused."""
    given = Path(os.path.abspath(spec_file)).parent
    named_in = next((f for f in (given, *given.parents) if any((f / m).exists() for m in PROJECT_MARKERS)), None)
    if named_in is None or Path(os.path.realpath(named_in)) == project_root:
        return []
    return [Problem(str(spec_file), 1, 1, "(file)",
                    f"the spec file is a symbolic link to {spec_file.resolve()}, outside the project folder "
                    f"{named_in} (its workspace and paths would be those of {project_root})",
                    hint="Copy the spec into the project, or pass --allow-outside-project if this is intended.")]


def deep_merge(base: Any, override: Any) -> Any:
    """Override wins; mappings merge key by key; lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def list_presets(folder: str) -> dict[str, Path]:
    d = resource_dir("presets") / folder
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def _get(d: dict, path: tuple) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _section_schema_for(path: tuple[str, ...]) -> tuple[dict, str]:
    sch = S.section_schema(path[0])
    uri = sch["$id"]
    for key in path[1:]:
        sub, uri = S.child_schema(sch, uri, key)
        assert sub is not None
        sch = sub
    return sch, uri


def load_spec(path: str | Path, *, allow_outside: bool = False, require_files: bool = True) -> Spec:
    """Load, validate and resolve one spec file. Raises SpecError with every problem found.

    ``require_files=False`` (``runner validate``) checks the spec's shape and where its paths
    point, but not that the data is already there.
    """
    spec_file = Path(path)
    loaded = _read_mapping(spec_file)
    raw = loaded.data
    # Every phase below runs even when an earlier one found problems, so that the user sees
    # everything at once; only values of the right shape are used.
    problems = S.validate(raw, loaded)
    project_root = find_project_root(spec_file)
    rules = PathRules(spec_file.resolve().parent, project_root, allow_outside)
    if not allow_outside:
        problems += _spec_link_problems(spec_file, project_root)
    data = copy.deepcopy(raw)
    # 1. presets, key by key under the user's values
    presets_used: dict[str, str] = {}
    for section_path, folder in PRESET_FOLDERS.items():
        problems += _apply_preset(data, section_path, folder, loaded, rules, presets_used)
    # 2. train variants: each must be a valid override of the train section
    problems += _variant_problems(data, loaded)
    if problems:
        # Paths are still checked (escapes are worth knowing about), then everything is raised.
        try:
            problems += _resolve_paths(data, loaded, rules, False)
        except Exception:  # a malformed spec can trip the walker; the schema problems say why
            pass
        raise SpecError(problems)
    # 3. defaults
    data = S.fill_defaults(data, S.root_schema(), S.root_uri())
    # 4. paths, 5. checks that a schema cannot express
    problems = _resolve_paths(data, loaded, rules, require_files) + _semantic_checks(data, loaded)
    if problems:
        raise SpecError(problems)
    return Spec(file=spec_file.resolve(), project_root=project_root, data=data, raw=raw, loaded=loaded,
                presets_used=presets_used, allow_outside=allow_outside)


def _read_mapping(spec_file: Path) -> LoadedYaml:
    """The spec file parsed; broken YAML, an empty file or a top level that is not a mapping is
    a SpecError at once (nothing else can be checked)."""
    try:
        loaded = load_yaml_file(spec_file)
    except YamlError as exc:
        raise SpecError([_yaml_problem(exc)]) from None
    if loaded.data is None:
        raise SpecError([Problem(str(spec_file), 1, 1, "(top level)", "the file is empty",
                                 hint="Run `runner init NAME` for a starter spec.")])
    if not isinstance(loaded.data, dict):
        m = loaded.mark_for(())
        raise SpecError([Problem(m.file, m.line, m.col, "(top level)",
                                 "a spec must be a mapping of sections (character:, dataset:, ...)")])
    return loaded


def _apply_preset(data: dict, section_path: tuple[str, ...], folder: str, loaded: LoadedYaml, rules: PathRules,
                  presets_used: dict[str, str]) -> list[Problem]:
    """Merge the preset that the section at ``section_path`` names (or its schema's default
    preset) under the section's own values, in ``data``; record it in ``presets_used``."""
    section = _get(data, section_path)
    if not isinstance(section, dict):
        return []
    if "preset" not in section:
        # A section whose schema names a default preset (generate.video: baseline) gets it.
        default = _section_schema_for(section_path)[0].get("properties", {}).get("preset", {}).get("default")
        if isinstance(default, str):
            section = {"preset": default, **section}
    if not isinstance(section.get("preset"), str):
        return []
    preset_file, problems = _find_preset(section["preset"], folder, rules, loaded, section_path)
    if preset_file is None:
        return problems
    try:
        ploaded = load_yaml_file(preset_file)
    except YamlError as exc:
        return problems + [_yaml_problem(exc)]
    pdata = ploaded.data
    if not isinstance(pdata, dict) or not isinstance(pdata.get("values"), dict):
        return problems + [Problem(str(preset_file), 1, 1, "values", "a preset file needs a 'values:' mapping")]
    values = pdata["values"]
    sch, _ = _section_schema_for(section_path)
    problems += S.validate(values, ploaded, schema=sch, path_prefix=("values",), mark_prefix=("values",))
    _set(data, section_path, deep_merge(values, section))
    presets_used[format_key_path(section_path)] = str(preset_file)
    return problems


def _variant_problems(data: dict, loaded: LoadedYaml) -> list[Problem]:
    """Each train variant merged over the train section must be a valid train section; only the
    problems the override itself brings in are reported (the base section is checked already)."""
    train = data.get("train")
    variants = train.get("variants") if isinstance(train, dict) else None
    if not isinstance(variants, dict):
        return []
    problems: list[Problem] = []
    sch, _ = _section_schema_for(("train",))
    base = {k: v for k, v in train.items() if k not in ("variants", "include_base_variant")}
    for vname, override in variants.items():
        if not isinstance(override, dict):
            continue
        if "variants" in override or "include_base_variant" in override:
            m = loaded.mark_for(("train", "variants", vname))
            problems.append(Problem(m.file, m.line, m.col, f"train.variants.{vname}",
                                    "a variant cannot contain 'variants' or 'include_base_variant'"))
            continue
        prefix = ("train", "variants", vname)
        for p in S.validate(deep_merge(base, override), loaded, schema=sch, path_prefix=prefix, mark_prefix=prefix):
            rest = p.key_path[len(format_key_path(prefix)) + 1 :]
            if rest.split(".", 1)[0].split("[", 1)[0] in override:
                problems.append(p)
    return problems


def _yaml_problem(exc: YamlError) -> Problem:
    where = format_key_path(exc.key_path) if exc.key_path else "(file)"
    return Problem(exc.mark.file, exc.mark.line, exc.mark.col, where, exc.message, hint=exc.hint)


def _find_preset(
    name: str, folder: str, rules: PathRules, loaded: LoadedYaml, section_path: tuple
) -> tuple[Path | None, list[Problem]]:
    shipped = list_presets(folder)
    if name in shipped:
        return shipped[name], []
    candidate, trouble = rules.locate(name)
    if trouble:
        m = loaded.mark_for(section_path + ("preset",))
        return None, [Problem(m.file, m.line, m.col, format_key_path(section_path + ("preset",)), trouble,
                              hint=OUTSIDE_HINT if candidate is not None else "")]
    if (name.endswith((".yaml", ".yml")) or "/" in name) and candidate.is_file():
        return candidate, []
    import difflib

    close = difflib.get_close_matches(name, list(shipped), n=1, cutoff=0.5)
    m = loaded.mark_for(section_path + ("preset",))
    return None, [
        Problem(
            m.file, m.line, m.col, format_key_path(section_path + ("preset",)),
            f"unknown preset '{name}'",
            expected="one of: " + ", ".join(shipped) + " (or a path to a preset .yaml file)",
            hint=f"did you mean '{close[0]}'?" if close else "Run `runner presets` to list them.",
        )
    ]


# --------------------------------------------------------------------------- paths


def _resolve_paths(data: dict, loaded: LoadedYaml, rules: PathRules, require_files: bool = True) -> list[Problem]:
    """Normalize every ``x-path`` value of the schema and apply the outside-project rule to it
    (runner.spec.paths: one check for every path key, found from the schema)."""
    walk = _PathWalk(loaded, rules, require_files)
    walk.visit(data, S.root_schema(), S.root_uri(), (), None, None)
    return walk.problems


@dataclass
class _PathWalk:
    """One walk over a spec's values with their schemas, normalizing path values in place."""

    loaded: LoadedYaml
    rules: PathRules
    require_files: bool
    problems: list[Problem] = field(default_factory=list)

    def visit(self, node: Any, sch: dict, uri: str, path: tuple, parent: Any, key: Any) -> None:
        if sch.get("x-override-of"):  # a train variant holds keys of the train section
            sch = S.section_schema(sch["x-override-of"])
            uri = sch["$id"]
        sch, uri = S.pick_branch(sch, uri, node)
        kind = sch.get("x-path")
        if kind:
            new = self.resolve_one(node, kind, sch, path, parent)
            if new is not None:
                parent[key] = new
            return
        children = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        for k in children:
            sub, suri = S.child_schema(sch, uri, k, node)
            if sub is not None:
                self.visit(node[k], sub, suri, path + (k,), node, k)

    def problem(self, path: tuple, message: str, hint: str = "") -> None:
        m = self.loaded.mark_for(path)
        self.problems.append(Problem(m.file, m.line, m.col, format_key_path(path), message, hint=hint))

    def missing(self, value: str, kind: str, sch: dict, p: Path, path: tuple) -> None:
        rules = self.rules
        shadow = rules.project_root / value  # where the loaders would look for a project-relative path
        if kind == "model" and os.path.lexists(shadow):
            self.problem(path, f"'{value}' names nothing next to the spec file, but {shadow} exists",
                         f"Paths are relative to the spec file: write it as {os.path.relpath(shadow, rules.spec_dir)}.")
        elif self.require_files:
            names = sorted(declared_names(sch)) if kind == "named-or-data" else []
            self.problem(path, f"{'model path' if kind == 'model' else 'path'} not found: {p}",
                         f"Paths are relative to the spec file ({rules.spec_dir})."
                         + (f" Or one of: {', '.join(names)}." if names else "")
                         + (" Or a hub id like 'org/name'." if kind == "model" else "")
                         + (f" {GLOB_HINT}" if sch.get("x-glob") else ""))

    def resolve_glob(self, value: str, root_value: str, pattern: str, path: tuple) -> str | None:
        """A glob (keys marked ``x-glob``: dataset.sources[].video), relative to the spec file: its
        folder (the part before the first wildcard) must exist and obeys the rule of a folder
        source: no symlink under it that the match would read may lead outside the project (every
        file it matches lies under that folder). Held as the folder, normalized, / the pattern."""
        rules = self.rules
        root, trouble = rules.locate(root_value or ".")
        if trouble:
            self.problem(path, trouble, OUTSIDE_HINT if root is not None else "")
            return None
        if not os.path.isdir(root) and (self.require_files or os.path.exists(root)):
            what = "is not a folder" if os.path.exists(root) else "does not exist"
            self.problem(path, f"the glob '{value}' looks in {root}, which {what}", GLOB_HINT)
        links = rules.links_out(root, glob_walks_folders(pattern))
        if links:
            self.problem(path, links, LINKS_HINT)
        base = rules.normalize(root)
        return pattern if base == "." else f"{base}/{pattern}"

    def resolve_one(self, value: Any, kind: str, sch: dict, path: tuple, parent: Any) -> str | None:
        rules = self.rules
        if kind == "output" and value is None and sch.get("x-project-default"):
            return rules.normalize(rules.project_root / sch["x-project-default"])
        if kind in EXEMPT_KINDS:  # a shared cache: only '~' is expanded
            try:
                return str(Path(value).expanduser()) if isinstance(value, str) else None
            except RuntimeError as exc:  # ~nosuchuser
                self.problem(path, f"path '{value}' cannot be resolved: {exc}")
                return None
        if kind == "preset" or not isinstance(value, str):  # presets were placed by _find_preset
            return None
        if not is_path(value, kind, sch, rules):
            return None  # a builtin or shipped name, a hub id
        glob = split_glob(value) if sch.get("x-glob") else None
        if glob is not None and not _names_a_file(rules, value):
            return self.resolve_glob(value, *glob, path)
        p, trouble = rules.locate(value)
        if trouble:
            self.problem(path, trouble, OUTSIDE_HINT if p is not None else "")
            return rules.normalize(p) if p is not None else None
        if kind != "output" and not os.path.exists(p):
            self.missing(value, kind, sch, p, path)
        elif os.path.exists(p) and not os.path.isdir(p) and (kind == "output" or not os.path.isfile(p)):
            # a FIFO would hang the digest, a device would be read without end
            self.problem(path, f"{p} is not a {'folder' if kind == 'output' else 'regular file or folder'} "
                               f"(it is a {_file_type(p)})", "Point the key at a plain file or folder.")
            return rules.normalize(p)
        recursive = parent.get("recursive", True) if isinstance(parent, dict) else True
        links = rules.links_out(p, recursive is not False)
        if links:
            self.problem(path, links, LINKS_HINT)
        return rules.normalize(p)


def _names_a_file(rules: PathRules, value: str) -> bool:
    """Whether a value with glob characters names a file or folder as written (``ride[1].mp4``):
    then it is that path, not a glob."""
    try:
        return os.path.lexists(rules.spec_dir / Path(value).expanduser())
    except RuntimeError:  # ~nosuchuser: locate says so
        return True


def _file_type(p: Path) -> str:
    import stat

    mode = os.stat(p).st_mode
    return next((name for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                                         (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                                         (stat.S_ISREG, "file")) if test(mode)), "special file")


# --------------------------------------------------------------------------- semantic checks


def _noop_variants(data: dict, loaded: LoadedYaml) -> list[Problem]:
    """A train variant that would train the same LoRA as another stage is refused, naming both
    (precedence and what counts as 'the same': runner.spec.variants)."""
    from runner.spec.variants import duplicate_stages

    char = data.get("character", {}).get("name", "?")
    out = []
    for name, other, why in duplicate_stages(data["train"]):
        m = loaded.mark_for(("train", "variants", name))
        twin = "the train section itself" if other == "base" else f"variant '{other}'"
        out.append(Problem(
            m.file, m.line, m.col, f"train.variants.{name}",
            f"changes nothing: {char}:train[{name}] would train the same LoRA as {char}:train[{other}] "
            f"({twin}): {'; '.join(why)}",
            hint="Override a key that changes training (a variant's lr applies to every phase; with phases, "
                 "give a variant its own phases), or remove the variant. `runner plan --resolved` shows "
                 "each variant's differences."))
    return out


def _gpu_settings(data: dict, loaded: LoadedYaml) -> list[Problem]:
    """hardware.gpu and hardware.stage_gpu.<kind>: a GPU type, or <type>:<n> with n in 1..8
    (runner.core.pricing.parse_gpu)."""
    from runner.core.pricing import GpuSpecError, parse_gpu

    hw = data.get("hardware") or {}
    settings = [(("hardware", "gpu"), hw.get("gpu"))]
    settings += [(("hardware", "stage_gpu", kind), v) for kind, v in (hw.get("stage_gpu") or {}).items()]
    out = []
    for path, value in settings:
        if not isinstance(value, str):
            continue
        try:
            parse_gpu(value, format_key_path(path))
        except GpuSpecError as exc:
            m = loaded.mark_for(path)
            out.append(Problem(m.file, m.line, m.col, format_key_path(path), exc.message, hint=exc.hint))
    return out


def _semantic_checks(data: dict, loaded: LoadedYaml) -> list[Problem]:
    problems: list[Problem] = []

    def add(path: tuple, message: str, hint: str = "") -> None:
        m = loaded.mark_for(path)
        problems.append(Problem(m.file, m.line, m.col, format_key_path(path), message, hint=hint))

    shots = data.get("dataset", {}).get("shots", {}).get("targets", {})
    for cat, rng in shots.items():
        if rng[0] > rng[1]:
            add(("dataset", "shots", "targets", cat), f"min {rng[0]} is greater than max {rng[1]}")
    mins = sum(r[0] for c, r in shots.items() if c not in ("complex_background", "occluded", "multi_character"))
    if mins > 1.0 + 1e-9:
        add(("dataset", "shots", "targets"), f"the minimum shares add up to {mins:.2f}, more than 1")

    train = data.get("train")
    if isinstance(train, dict):
        names = [p["name"] for p in train.get("phases", [])]
        dupes = {n for n in names if names.count(n) > 1}
        for n in sorted(dupes):
            add(("train", "phases"), f"phase name '{n}' is used more than once")
        if "base" in train.get("variants", {}) and train.get("include_base_variant", True):
            add(("train", "variants", "base"), "'base' is the name of the un-overridden variant",
                "Rename the variant, or set include_base_variant: false.")
        else:
            problems += _noop_variants(data, loaded)

    problems += _gpu_settings(data, loaded)
    sb = data.get("generate", {}).get("storyboard")
    if isinstance(sb, dict):
        if sb["min_scenes"] > sb["max_scenes"]:
            add(("generate", "storyboard", "min_scenes"),
                f"min_scenes {sb['min_scenes']} is greater than max_scenes {sb['max_scenes']}")
        if sb["planner"] == "manual" and not sb["scenes"]:
            add(("generate", "storyboard", "scenes"), "planner 'manual' needs a list of scenes")
        if sb["planner"] in ("rules", "llm") and not sb["story"].strip():
            add(("generate", "storyboard", "story"), f"planner '{sb['planner']}' needs a story")
    return problems
