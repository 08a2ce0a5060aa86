"""Graph + workspace state -> a plan: per stage, its cache key, what will happen, and why.

Pure logic: file digests and the state of earlier runs come in through two small interfaces
(:class:`FileDigester`, :class:`PlanState`), so this module never touches the disk itself.

A stage's cache key is the hash of its kind, version, resolved config and input digests. An input
that is another stage's output is digested as that stage's key (input-addressed, as Nix does), so
a change anywhere upstream changes every key downstream of it, and the plan can be computed before
anything runs. Each "did this change?" question is a small predicate that states its reason.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from runner.core import contract
from runner.plan.graph import Graph

ACTIONS = ("run", "rerun", "resume", "cached")


def canonical_json(obj: Any) -> str:
    """The text a cache key hashes: sorted keys, no spaces, paths and dataclasses as plain JSON.
    Configs are plain JSON already (every node's, 10,000 of them at fleet size): json encodes them
    in one pass, and only a value it cannot encode, or keys it cannot sort, take the full
    conversion of :func:`runner.core.contract.jsonable`."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    except TypeError:
        return json.dumps(contract.jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_default(value: Any) -> Any:
    converted = contract.jsonable(value)
    if converted is value:
        raise TypeError(f"{type(value).__name__} is not JSON")
    return converted


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FileSetDigest:
    digest: str
    files: tuple[tuple[str, str], ...]  # (path relative to root, content digest), sorted
    root: Path

    @property
    def count(self) -> int:
        return len(self.files)


class FileDigester(Protocol):
    def digest_fileset(self, ref: contract.FileSetRef) -> FileSetDigest: ...


@dataclass(frozen=True)
class PriorRecord:
    key: str
    # the key's components as JSON text, or a function that reads it: read and parsed only when
    # the key changed and the plan explains why (a no-op plan of 10,000 stages reads none)
    components_json: str | Callable[[], str] = field(compare=False, repr=False)
    run_id: str
    finished_at: float

    @property
    def components(self) -> dict[str, Any]:
        text = self.components_json
        return json.loads(text() if callable(text) else text)


class PlanState(Protocol):
    def last_success(self, stage_id: str) -> PriorRecord | None: ...

    def store_has(self, key: str) -> bool: ...

    def load_outputs(self, key: str) -> dict[str, contract.Artifact]: ...

    def scratch_dir(self, key: str) -> Path: ...

    def fileset_listing(self, digest: str) -> dict[str, str] | None: ...


@dataclass
class PlannedStage:
    node: contract.PlanNode
    key: str
    components: dict[str, Any]
    action: str  # run | rerun | resume | cached
    reasons: list[str]
    fileset_digests: dict[str, FileSetDigest] = field(default_factory=dict)
    # Lines the plan prints under the stage: the node's notes, then the stage kind's plan_notes.
    notes: list[str] = field(default_factory=list)
    # Its kind summarizes the character's run (the report): it re-runs whenever another stage of
    # its character runs and is not pending work of its own.
    summarizes: bool = False

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def will_execute(self) -> bool:
        return self.action != "cached"

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.node.id,
            "kind": self.node.kind,
            "character": self.node.character,
            "action": self.action,
            "reason": "; ".join(self.reasons),
            "reasons": self.reasons,
            "key": self.key,
            "gpu": self.node.gpu,
            "notes": self.notes,
        }


@dataclass
class Plan:
    stages: list[PlannedStage]
    graph: Graph

    def by_id(self, stage_id: str) -> PlannedStage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    @property
    def has_changes(self) -> bool:
        return any(s.will_execute for s in self.stages)

    def pending_work(self) -> list[PlannedStage]:
        """The stages that will execute, without the summaries that re-run because of them."""
        return [s for s in self.stages if s.will_execute and not s.summarizes]

    def counts(self) -> dict[str, int]:
        out = {a: 0 for a in ACTIONS}
        for s in self.stages:
            out[s.action] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        if not self.has_changes:
            return f"No changes. {c['cached']} stage{'s' if c['cached'] != 1 else ''} up to date."
        parts = []
        if c["run"]:
            parts.append(f"{c['run']} to run")
        if c["rerun"]:
            parts.append(f"{c['rerun']} to re-run")
        if c["resume"]:
            parts.append(f"{c['resume']} to resume")
        parts.append(f"{c['cached']} cached")
        return "Plan: " + ", ".join(parts) + "."

    def as_json(self) -> dict[str, Any]:
        return {
            "stages": [s.as_json() for s in self.stages],
            "summary": self.counts(),
            "changes": self.has_changes,
        }


# --------------------------------------------------------------------------- selection


def select_stages(graph: Graph, patterns: list[str]) -> set[str]:
    """Stage ids matching any pattern: a stage id, a kind, or a glob ('luca:train*')."""
    chosen: set[str] = set()
    for pat in patterns:
        hits = {
            i
            for i, n in graph.nodes.items()
            if i == pat or n.kind == pat or fnmatch.fnmatchcase(i, pat)
            or fnmatch.fnmatchcase(i.split(":", 1)[1], pat)
        }
        if not hits:
            raise KeyError(
                f"no stage matches {pat!r}; stages are: " + ", ".join(graph.nodes)
            )
        chosen |= hits
    return chosen


# --------------------------------------------------------------------------- planning


def make_plan(
    graph: Graph,
    state: PlanState,
    digester: FileDigester,
    *,
    force: list[str] | None = None,
    only: list[str] | None = None,
    registry: contract.Registry | None = None,
) -> Plan:
    """Decide, per node of ``graph``, what happens and why. Kinds are looked up in ``registry``
    (default: the one the graph was built with)."""
    registry = registry if registry is not None else graph.registry
    forced = select_stages(graph, force) if force else set()
    targets = graph.closure_up(select_stages(graph, only)) if only else None

    keys: dict[str, str] = {}
    planned: dict[str, PlannedStage] = {}
    for sid, node in graph.nodes.items():
        kind = registry.get(node.kind)
        components, filesets = key_components(node, kind.version, keys, digester)
        key = sha256_text(canonical_json(components))
        keys[sid] = key
        if targets is not None and sid not in targets:
            continue
        action, reasons = _decide(node, key, components, kind, state, planned, sid in forced, filesets)
        notes = list(node.notes) + _plan_notes(node, kind, keys, state)
        planned[sid] = PlannedStage(node, key, components, action, reasons, filesets, notes, kind.summarizes)
    _rerun_summaries(planned.values())
    return Plan(stages=list(planned.values()), graph=graph)


def _rerun_summaries(stages: Iterable[PlannedStage]) -> None:
    """A summarizing stage (the report) re-runs whenever another stage of its character executes
    in this run, so its timeline shows the run that produced it."""
    stages = list(stages)
    for ps in stages:
        if ps.summarizes and ps.action == "cached":
            ran = [o.id for o in stages if o.node.character == ps.node.character
                   and not o.summarizes and o.will_execute]
            if ran:
                ps.action = "rerun"
                ps.reasons = [f"{len(ran)} stage{'s' if len(ran) != 1 else ''} of this character run"]


def _plan_notes(node: contract.PlanNode, kind: contract.StageKind, keys: dict[str, str], state: PlanState) -> list[str]:
    """The stage kind's plan_notes, given its upstream outputs that the store already holds."""
    if kind.plan_notes is None:
        return []
    upstream: dict[str, contract.Artifact | None] = {}
    for name, ref in node.inputs.items():
        if isinstance(ref, contract.StageOutputRef):
            upstream[name] = _stored_output(state, keys.get(ref.stage_id, ""), ref.output)
    return list(kind.plan_notes(node.config, upstream))


def _stored_output(state: PlanState, key: str, output: str) -> contract.Artifact | None:
    """An upstream output from the store, or None (not there, or unreadable: a note never stops a plan)."""
    if not key or not state.store_has(key):
        return None
    try:
        return state.load_outputs(key).get(output)
    except (OSError, ValueError, KeyError):
        return None


def key_components(
    node: contract.PlanNode, version: int, upstream_keys: dict[str, str], digester: FileDigester
) -> tuple[dict[str, Any], dict[str, FileSetDigest]]:
    """What a node's cache key hashes: kind, version, keyed config, and a digest per input (an
    upstream stage by its key, a file set by its content)."""
    input_digests: dict[str, Any] = {}
    filesets: dict[str, FileSetDigest] = {}
    for name, ref in sorted(node.inputs.items()):
        if isinstance(ref, contract.StageOutputRef):
            input_digests[name] = {"stage": ref.stage_id, "output": ref.output,
                                   "key": upstream_keys.get(ref.stage_id, "")}
        else:
            fd = digester.digest_fileset(ref)
            filesets[name] = fd
            input_digests[name] = {"files": fd.count, "digest": fd.digest}
    components = {"kind": node.kind, "version": version, "config": node.keyed_config(), "inputs": input_digests}
    return components, filesets


def _decide(
    node: contract.PlanNode,
    key: str,
    components: dict[str, Any],
    kind: contract.StageKind,
    state: PlanState,
    planned: dict[str, PlannedStage],
    forced: bool,
    filesets: dict[str, FileSetDigest],
) -> tuple[str, list[str]]:
    prior = state.last_success(node.id)
    resume = kind.resume_info(state.scratch_dir(key)) if kind.resume_info else None

    def executing(default_action: str, reasons: list[str]) -> tuple[str, list[str]]:
        if resume:
            return "resume", [resume] + reasons
        return default_action, reasons

    if forced:
        return executing("rerun" if prior else "run", ["forced (--force)"])
    if state.store_has(key):
        if prior is None or prior.key == key:
            return "cached", ["up to date"]
        return "cached", ["outputs for these inputs exist from an earlier run"]
    if prior is None:
        return executing("run", ["new stage"])
    if prior.key == key:
        return executing("rerun", ["outputs missing from the store"])
    return executing("rerun", explain_change(prior.components, components, planned, state, filesets))


def explain_change(
    old: dict[str, Any],
    new: dict[str, Any],
    planned: dict[str, PlannedStage] | None = None,
    state: PlanState | None = None,
    filesets: dict[str, FileSetDigest] | None = None,
) -> list[str]:
    """Human reasons why two key components differ (which key changed)."""
    reasons: list[str] = []
    if old.get("kind") != new.get("kind") or old.get("version") != new.get("version"):
        reasons.append(f"stage version changed ({old.get('version')} -> {new.get('version')})")
    old_cfg, new_cfg = dict(old.get("config", {})), dict(new.get("config", {}))
    old_review, new_review = old_cfg.pop("review", None), new_cfg.pop("review", None)
    if old_review != new_review:  # the reviewer's decisions (runner review): one summary reason
        from runner.review.decisions import describe_change

        reasons.append(describe_change(old_review, new_review))
    for path, a, b in _diff(old_cfg, new_cfg):
        if a is _MISSING:
            reasons.append(f"config {path} added ({_short(b)})")
        elif b is _MISSING:
            reasons.append(f"config {path} removed (was {_short(a)})")
        else:
            reasons.append(f"config {path} changed: {_short(a)} -> {_short(b)}")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    reasons += _inputs_come_and_gone(old_in, new_in)
    changed = [name for name in sorted(set(old_in) & set(new_in)) if old_in[name] != new_in[name]]
    for name in changed[:NAMED_INPUTS] if len(changed) > NAMED_INPUTS + 1 else changed:
        a, b = old_in[name], new_in[name]
        if "stage" in b:
            up = (planned or {}).get(b["stage"])
            if up is not None and up.will_execute:
                reasons.append(f"input {name}: {b['stage']} {'re-runs' if up.action != 'run' else 'runs'}")
            else:
                reasons.append(f"input {name}: {b['stage']} changed")
        else:
            reasons.append(f"input {name}: " + _fileset_change(a, b, name, state, filesets))
    if len(changed) > NAMED_INPUTS + 1:
        reasons.append(f"and {len(changed) - NAMED_INPUTS} more inputs changed")
    return reasons or ["key changed"]


#: Inputs added (or removed) named one by one in a reason; more are counted (a report reading a
#: ride day's thousand new videos).
NAMED_INPUTS = 3


def _inputs_come_and_gone(old_in: dict[str, Any], new_in: dict[str, Any]) -> list[str]:
    """``input X added`` / ``input X removed``, or past NAMED_INPUTS of either, one counting line."""
    reasons = []
    for what, names in (("added", sorted(set(new_in) - set(old_in))), ("removed", sorted(set(old_in) - set(new_in)))):
        if len(names) <= NAMED_INPUTS:
            reasons += [f"input {n} {what}" for n in names]
        else:
            shown = ", ".join(names[:NAMED_INPUTS])
            reasons.append(f"{len(names)} inputs {what} ({shown} and {len(names) - NAMED_INPUTS} more)")
    return reasons


def _fileset_change(a: dict, b: dict, name: str, state: PlanState | None,
                    filesets: dict[str, FileSetDigest] | None) -> str:
    old_listing = state.fileset_listing(a.get("digest", "")) if state else None
    new = (filesets or {}).get(name)
    if old_listing is None or new is None:
        return f"files changed ({a.get('files')} -> {b.get('files')} files)"
    new_listing = dict(new.files)
    added = len(set(new_listing) - set(old_listing))
    removed = len(set(old_listing) - set(new_listing))
    modified = sorted(p for p in set(new_listing) & set(old_listing) if new_listing[p] != old_listing[p])
    bits = [f"{n} {w}" for n, w in ((added, "added"), (removed, "removed"), (len(modified), "modified")) if n]
    if modified:  # name them: "a model file changed" is worth seeing which
        bits[-1] += " (" + ", ".join(modified[:3]) + (", ..." if len(modified) > 3 else "") + ")"
    return "files " + ", ".join(bits) if bits else "files changed"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _diff(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            out.extend(_diff(a.get(k, _MISSING), b.get(k, _MISSING), p))
        return out
    if a != b or canonical_json(a) != canonical_json(b):  # 0 == 0.0, but the key spells them apart
        return [(path or "(all)", a, b)]
    return []


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, _Missing) else "<missing>"
    return s if len(s) <= 48 else s[:45] + "..."
