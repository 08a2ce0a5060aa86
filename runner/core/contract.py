"""The stage contract every stage kind implements, and the registry that maps kind -> stage kind.

A stage is a pure function::

    run(config: dict, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Artifact]

- ``config`` is the stage's resolved, JSON-serializable configuration (part of its cache key).
- ``inputs`` maps an input name to an :class:`Artifact` (an upstream stage output or a set of
  files from the user's project), already digested by the engine.
- The stage writes *only* into ``ctx.out_dir``; the engine promotes that folder atomically when
  ``run`` returns. Long stages checkpoint into ``ctx.scratch_dir`` (kept across attempts with the
  same cache key) so a new apply resumes them.
- It reports progress and metrics through ``ctx``, never by printing. It knows nothing of the
  engine, the CLI, Modal or the state database.

How a spec turns into stage instances is also the stage kind's business: ``expand(spec, graph)``
returns the :class:`PlanNode` s it contributes. The planner calls every registered kind's
``expand`` in pipeline order, so adding a stage kind never touches the planner.

Modules in ``runner.stages`` must keep heavy imports (torch, diffusers, dlib, cv2) inside
functions: the CLI imports every stage module to build a plan, and a no-op ``runner apply`` has to
stay well under a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from runner.core.errors import StageError, UserError  # noqa: F401  (part of the contract)


@dataclass(frozen=True)
class Artifact:
    """One named input or output of a stage: a file or a folder.

    For a file-set input (the user's photo folders), ``path`` is the folder and ``files`` lists
    the files the engine digested, so the stage sees exactly what the cache key covered.
    """

    name: str
    path: Path
    digest: str = ""
    files: tuple[Path, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutputRef:
    """An input that is another stage's output."""

    stage_id: str
    output: str


@dataclass(frozen=True)
class FileSetRef:
    """An input that is a set of files in the user's project (digested with a stat cache)."""

    root: Path
    patterns: tuple[str, ...] = ("*",)
    recursive: bool = True
    # The spec key this input came from, for messages ("dataset.sources[0].images").
    spec_key: str = ""


InputRef = StageOutputRef | FileSetRef


@dataclass
class PlanNode:
    """One stage instance in a plan, before the engine decides whether it runs."""

    id: str  # "<character>:<kind>" or "<character>:<kind>[<variant>]"
    kind: str
    character: str
    config: dict[str, Any]
    inputs: dict[str, InputRef] = field(default_factory=dict)
    # Names of outputs the stage promises (checked after run).
    outputs: tuple[str, ...] = ()
    # "gpu" stages may run on a remote backend; the value is the GPU type asked for, or None.
    gpu: str | None = None
    # Extra edges that carry no artifact (ordering only).
    after: tuple[str, ...] = ()
    # A human label shown in the plan.
    label: str = ""
    # Top-level config entries the stage reads that change none of its outputs (worker counts,
    # prices): passed to ``run`` but left out of the cache key. Which spec keys may be unkeyed is
    # declared in the schema ("x-affects", see docs/architecture.md, "Cache keys").
    unkeyed: tuple[str, ...] = ()
    # Lines the plan prints under the stage (a variant's effective differences).
    notes: tuple[str, ...] = ()

    def keyed_config(self) -> dict[str, Any]:
        """The part of the config that is in the cache key: all of it but ``unkeyed``."""
        return {str(k): jsonable(v) for k, v in self.config.items() if k not in self.unkeyed}

    def upstream_ids(self) -> list[str]:
        ids = [ref.stage_id for ref in self.inputs.values() if isinstance(ref, StageOutputRef)]
        ids.extend(self.after)
        seen: dict[str, None] = {}
        for i in ids:
            seen.setdefault(i, None)
        return list(seen)


class ProgressHandle(Protocol):
    def update(self, advance: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


class StageContext(Protocol):
    """What the engine hands a running stage."""

    stage_id: str
    character: str
    out_dir: Path  # write outputs here and nowhere else
    scratch_dir: Path  # survives a crash; same cache key -> same folder (checkpoints)
    cache_dir: Path  # shared caches (models, latents); key your own entries by content
    project_root: Path
    run_id: str

    def progress(self, total: int | None, desc: str) -> ProgressHandle: ...

    def log(self, message: str, **fields: Any) -> None: ...

    def metric(self, name: str, value: float, step: int | None = None) -> None: ...

    def warn(self, message: str, **fields: Any) -> None: ...

    def map_items(self, fn: str, items: list[dict[str, Any]], shared: dict[str, Any], *,
                  containers: int | None = None) -> Iterator[dict[str, Any]]:
        """``fn`` ("module:function", called as ``fn(items, shared)``, yielding one JSON record per
        item in order) over ``items``, results in input order. Here it runs in this process; a stage
        on Modal with ``containers`` > 1 splits the items into that many chunks, one container each
        (runner.backends.mapping: item strings naming the stage's files are carried over)."""
        ...


class GraphView(Protocol):
    """What ``expand`` may ask about the nodes planned so far (same character).

    ``expand(spec_data, graph)`` gets the resolved spec as a dict (paths in it are relative to
    ``graph.project_root``, or absolute when outside it) and returns its nodes.
    """

    character: str
    project_root: Path
    spec_file: Path

    @property
    def nodes(self) -> list[PlanNode]: ...  # every node planned so far for this character

    def nodes_of(self, kind: str) -> list[PlanNode]: ...

    def node(self, stage_id: str) -> PlanNode | None: ...

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per key for this spec's expansion (several kinds reading one
        folder of videos walk it once)."""
        ...


RunFn = Callable[[dict[str, Any], dict[str, Artifact], StageContext], dict[str, Artifact]]
ExpandFn = Callable[[dict[str, Any], GraphView], Iterable[PlanNode]]
ResumeFn = Callable[[Path], str | None]


@dataclass
class ReportSection:
    """What a stage contributes to the HTML report.

    ``template`` names a Jinja template under templates/sections/ (autoescaped); ``context`` is
    what it renders with. Use :mod:`runner.report.embed` for images (data URIs) and
    :mod:`runner.report.charts` for inline SVG charts, so the report stays one offline file.
    """

    title: str
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    anchor: str = ""


# report(node_config, outputs, env) -> list of sections. ``env`` carries report settings
# (thumbnail_px, gallery_limit) and the character; outputs are this stage's promoted artifacts.
ReportFn = Callable[[dict[str, Any], dict[str, Artifact], dict[str, Any]], list[ReportSection]]
# publish(node_config, outputs, dest): after an apply, copy what users point other tools at out of
# the store into ``dest`` (<project>/.runner/exports/<character>/), where those tools may write.
# Called for succeeded and cached stages; it must be idempotent and cheap when nothing changed.
PublishFn = Callable[[dict[str, Any], dict[str, Artifact], Path], Any]
# plan_notes(node_config, upstream) -> lines `runner plan` prints under the stage; ``upstream``
# maps each stage-output input to its artifact when the store already holds it, else None.
PlanNotesFn = Callable[[dict[str, Any], dict[str, "Artifact | None"]], Iterable[str]]
# track(node_config, outputs, env) -> runs logged to experiment trackers (runner.tracking), each a
# JSON dict the engine keeps in executions.tracking. Called in the apply's process after the stage
# succeeded and was promoted (remote stages too); ``env`` has stage_id, character, run_id, key,
# project_root and workspace_dir. It must not raise for a tracker's failure (runner.tracking
# turns those into a warning on the run entry).
TrackFn = Callable[[dict[str, Any], dict[str, Artifact], dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class StageKind:
    """A registered stage kind: its hooks, and the traits the engine and planner go by (they never
    compare kind names)."""

    kind: str
    version: int
    run: RunFn
    expand: ExpandFn
    order: int  # pipeline position; expand() is called in this order
    description: str = ""
    # Given a scratch folder, say how the stage would resume ("resume at step 120"), or None.
    resume_info: ResumeFn | None = None
    # Sections this stage adds to the report (None: nothing beyond the timeline).
    report: ReportFn | None = None
    # Copies of its outputs published outside the store (None: nothing).
    publish: PublishFn | None = None
    # Plan-time lines computed from upstream outputs already in the store (None: nothing).
    plan_notes: PlanNotesFn | None = None
    # Logs a finished execution to experiment trackers (None: never tracked).
    track: TrackFn | None = None
    # Traits. ``summarizes``: the stage summarizes its character's run (the report): it re-runs
    # whenever another stage of its character runs, runs after them, is not counted as pending
    # work of its own, and its first declared output (its document, a file) is copied to the
    # spec's report folder as ``<run id><suffix>`` and ``latest<suffix>``.
    summarizes: bool = False
    # Typical wall time of one remote execution, for `runner plan` cost estimates while the state
    # database has no earlier run of the stage (None: the engine's fallback).
    typical_seconds: float | None = None
    # The work one execution does, from its node config: (how many, unit), e.g. (12, "clip") or
    # (1500, "step"); None: not known from the config. Estimates learn seconds per unit from
    # earlier runs (runner.engine.cost); a stage may report the units it really did with
    # ``ctx.metric("work_units", n)``. None: estimates go by whole executions.
    work_units: Callable[[dict[str, Any]], tuple[float, str] | None] | None = None
    # One row of this kind's table in the report, from a node's config and outputs (a few short
    # fields, no images; key "attention": a short text for a stage that needs a look), used when a
    # character has more stages of the kind than report.max_sections_per_kind (None: every stage
    # keeps its own sections, however many).
    report_row: Callable[[dict[str, Any], dict[str, Artifact]], dict[str, Any]] | None = None
    # What `runner review` shows of this kind's outputs (None: nothing): "analysis" (records.jsonl
    # in output ``analysis``), "curation" (output ``curated``), "identity" (per-person sets),
    # "evaluation" (evaluation.json), "frames" (storyboard report.json), "clips" (mp4 files).
    # The review pages find their stages by this, so a plugin kind can appear there too.
    review_view: str | None = None


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def _origin(sk: StageKind) -> tuple[str, str]:
    return sk.run.__module__, sk.run.__qualname__


class Registry:
    """Stage kinds by name. The built-in kinds register into :data:`BUILTIN` (see
    ``runner.stages.registry()``); planner and engine take a registry as an argument, so tests can
    plan against a registry of fake kinds."""

    def __init__(self, kinds: Iterable[StageKind] = ()) -> None:
        self._kinds: dict[str, StageKind] = {}
        for k in kinds:
            self.add(k)

    def add(self, sk: StageKind) -> StageKind:
        prev = self._kinds.get(sk.kind)
        if prev is not None and _origin(prev) != _origin(sk):
            raise RuntimeError(f"stage kind {sk.kind!r} registered twice "
                               f"({prev.run.__module__} and {sk.run.__module__})")
        self._kinds[sk.kind] = sk
        return sk

    def remove(self, kind: str) -> None:
        self._kinds.pop(kind, None)

    def kinds(self) -> dict[str, StageKind]:
        """Every kind, in pipeline order."""
        return dict(sorted(self._kinds.items(), key=lambda kv: kv[1].order))

    def get(self, kind: str) -> StageKind:
        if kind not in self._kinds:
            raise KeyError(f"unknown stage kind {kind!r}; known: {', '.join(self.kinds())}")
        return self._kinds[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def __iter__(self) -> Iterator[StageKind]:
        return iter(self.kinds().values())

    def __len__(self) -> int:
        return len(self._kinds)

    def register(self, kind: str, *, version: int, order: int, expand: ExpandFn, description: str = "",
                 **hooks_and_traits: Any) -> Callable[[RunFn], RunFn]:
        """Decorator: ``@register("ingest", version=1, order=10, expand=expand_ingest)``; further
        keywords are the optional hooks and traits of :class:`StageKind`.

        Bump ``version`` whenever the stage's behaviour changes in a way that should invalidate
        cached outputs: the version is part of every cache key.
        """

        def deco(fn: RunFn) -> RunFn:
            self.add(StageKind(kind=kind, version=version, run=fn, expand=expand, order=order,
                               description=description or _first_line(fn.__doc__), **hooks_and_traits))
            return fn

        return deco


# The built-in stage kinds (and plugins) register here; ``runner.stages.registry()`` loads them.
BUILTIN = Registry()
register = BUILTIN.register


def node_id(character: str, kind: str, variant: str | None = None) -> str:
    return f"{character}:{kind}" + (f"[{variant}]" if variant else "")


_PLAIN = (str, int, float, bool, type(None))


def jsonable(obj: Any) -> Any:
    """Convert paths/dataclasses/tuples into plain JSON types (for configs and manifests).

    Plain values are tested first by exact type: every plan runs this over every node's config
    (10,000 video nodes at fleet size), and the dataclass test is the slow one."""
    kind = type(obj)
    if kind in _PLAIN:
        return obj
    if kind is dict:  # plain leaves kept without a call: most of a config's values are
        return {k if type(k) is str else str(k): v if type(v) in _PLAIN else jsonable(v) for k, v in obj.items()}
    if kind is list or kind is tuple:
        return [v if type(v) in _PLAIN else jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
