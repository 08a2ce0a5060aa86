"""Spec(s) -> a graph of stage instances.

Every registered stage kind contributes its nodes through its ``expand`` function, called in
pipeline order; the graph is then checked (unique ids, known inputs, no cycles) and ordered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.spec import schema as S
from runner.spec.errors import format_key_path
from runner.spec.resolve import Spec
from runner.core import contract
from runner.core.errors import UserError


class GraphError(UserError):
    """The stages a spec expands to do not fit together (a bug or an unsupported combination), or
    a file the spec names cannot be used: exit 2, like the spec's own problems."""

    exit_code = 2


@dataclass
class _View:
    character: str
    project_root: Path
    spec_file: Path
    _nodes: list[contract.PlanNode] = field(default_factory=list)
    _by_id: dict[str, contract.PlanNode] = field(default_factory=dict)
    _memo: dict[Any, Any] = field(default_factory=dict)

    def add(self, node: contract.PlanNode) -> None:
        self._nodes.append(node)
        self._by_id[node.id] = node

    def nodes_of(self, kind: str) -> list[contract.PlanNode]:
        return [n for n in self._nodes if n.kind == kind]

    def node(self, stage_id: str) -> contract.PlanNode | None:
        return self._by_id.get(stage_id)  # a ride day's clip nodes each look up their identity node

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def nodes(self) -> list[contract.PlanNode]:
        return list(self._nodes)


@dataclass
class Graph:
    nodes: dict[str, contract.PlanNode]  # in topological (execution) order
    specs: dict[str, Spec]  # character -> spec
    # The stage kinds the nodes were expanded by (the planner and engine look kinds up here).
    registry: contract.Registry = field(default_factory=contract.Registry)

    def upstream(self, stage_id: str) -> list[str]:
        return self.nodes[stage_id].upstream_ids()

    def downstream(self, stage_id: str) -> list[str]:
        return [n.id for n in self.nodes.values() if stage_id in n.upstream_ids()]

    def closure_up(self, ids: set[str]) -> set[str]:
        out: set[str] = set()
        todo = list(ids)
        while todo:
            i = todo.pop()
            if i in out:
                continue
            out.add(i)
            todo.extend(self.upstream(i))
        return out


def builtin_registry(registry: contract.Registry | None = None) -> contract.Registry:
    """``registry``, or the built-in stage kinds and plugins when None (callers at the top pass
    ``runner.stages.registry()``; helpers default to it)."""
    if registry is not None:
        return registry
    from runner.stages import registry as stage_registry

    return stage_registry()


def expand_spec(spec: Spec, registry: contract.Registry | None = None) -> list[contract.PlanNode]:
    """The nodes every kind of ``registry`` contributes for ``spec``, in pipeline order."""
    view = _View(character=spec.name, project_root=spec.project_root, spec_file=spec.file)
    models = local_models(spec)
    for kind in builtin_registry(registry):
        for node in _expand(kind, spec, view):
            if node.kind != kind.kind:
                raise GraphError(f"stage kind {kind.kind!r} expanded a node of kind {node.kind!r}")
            node.inputs.update(model_inputs(node, models))
            view.add(node)
    return view.nodes


def _expand(kind: contract.StageKind, spec: Spec, view: "_View") -> list[contract.PlanNode]:
    """A kind's nodes; a file the spec names that cannot be used (a suite with a bad case name,
    broken YAML) is a problem with the spec, exit 2, like the spec's own problems."""
    try:
        return list(kind.expand(spec.data, view))
    except contract.StageError as exc:
        hint = f"\n  hint: {exc.hint}" if exc.hint else ""
        raise GraphError(f"{spec.file}: {exc}{hint}") from None


@dataclass(frozen=True)
class LocalModel:
    """A spec value naming a local model file or folder (``"x-path": "model"`` in the schema)."""

    spec_key: str  # "train.base_model"
    value: str  # as in the resolved spec (project-relative)
    path: Path
    affects: Any  # the key's "x-affects" declaration


def local_models(spec: Spec) -> list[LocalModel]:
    """Every model-valued key whose value is a file or folder (hub ids and builtin: are not),
    train variants' overrides included (they are train sections in part)."""
    out = []
    train = S.section_schema("train")
    variants = (spec.data.get("train") or {}).get("variants") or {}
    values = list(S.iter_instance(spec.data))
    for name, override in variants.items():
        values += S.iter_instance(override, train, train["$id"], ("train", "variants", name))
    for path, value, sch in values:
        if sch.get("x-path") != "model" or not isinstance(value, str) or value.startswith("builtin:"):
            continue
        p = spec.abspath(value)
        if p.exists():
            out.append(LocalModel(format_key_path(path), value, p, sch.get("x-affects")))
    return out


def model_inputs(node: contract.PlanNode, models: list[LocalModel]) -> dict[str, contract.FileSetRef]:
    """File-set inputs for the local models a node reads, so their content is in its key.

    A node reads a model when the key declares an effect on its kind and the value is in its
    config; models the stage already takes as an input (same folder or file) are not added twice.
    """
    if not models:  # most specs name hub models only: no walk over every node's config
        return {}
    have = {Path(r.root).resolve() for r in node.inputs.values() if isinstance(r, contract.FileSetRef)}
    strings = set(_strings(node.config))
    out: dict[str, contract.FileSetRef] = {}
    for m in models:
        reads = m.affects == "all" or (isinstance(m.affects, list) and node.kind in m.affects)
        if reads and m.value in strings and m.path.resolve() not in have:
            have.add(m.path.resolve())
            out[f"model:{m.spec_key}"] = contract.FileSetRef(root=m.path, patterns=("*",), recursive=True,
                                                         spec_key=m.spec_key)
    return out


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def build_graph(specs: list[Spec], registry: contract.Registry | None = None) -> Graph:
    """Expand ``specs`` with the kinds of ``registry`` (default: the built-in ones) and check that
    the nodes fit together."""
    registry = builtin_registry(registry)
    by_char: dict[str, Spec] = {}
    for spec in specs:
        if spec.name in by_char:
            raise GraphError(
                f"two specs define the character '{spec.name}': {by_char[spec.name].file} and {spec.file}; "
                "character.name must be unique in a batch"
            )
        by_char[spec.name] = spec
    nodes: list[contract.PlanNode] = []
    for spec in specs:
        nodes.extend(expand_spec(spec, registry))
    return graph_of(nodes, by_char, registry)


def graph_of(nodes: list[contract.PlanNode], specs: dict[str, Spec], registry: contract.Registry) -> Graph:
    """A checked, ordered graph of ``nodes`` (unique ids, known inputs and outputs, no cycles)."""
    by_id: dict[str, contract.PlanNode] = {}
    for node in nodes:
        if node.id in by_id:
            raise GraphError(f"duplicate stage id {node.id!r}")
        by_id[node.id] = node
    for node in by_id.values():
        _check_edges(node, by_id)
    return Graph(nodes=_toposort(by_id), specs=specs, registry=registry)


def _check_edges(node: contract.PlanNode, nodes: dict[str, contract.PlanNode]) -> None:
    for name, ref in node.inputs.items():
        if isinstance(ref, contract.StageOutputRef):
            if ref.stage_id not in nodes:
                raise GraphError(f"{node.id}: input {name!r} refers to unknown stage {ref.stage_id!r}")
            up = nodes[ref.stage_id]
            if up.outputs and ref.output not in up.outputs:
                raise GraphError(
                    f"{node.id}: input {name!r} wants output {ref.output!r} of {up.id}, "
                    f"which only has {', '.join(up.outputs)}"
                )
    for after in node.after:
        if after not in nodes:
            raise GraphError(f"{node.id}: runs after unknown stage {after!r}")


def _toposort(nodes: dict[str, contract.PlanNode]) -> dict[str, contract.PlanNode]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(i: str, trail: list[str]) -> None:
        s = state.get(i)
        if s == 2:
            return
        if s == 1:
            raise GraphError("stage cycle: " + " -> ".join(trail + [i]))
        state[i] = 1
        for up in nodes[i].upstream_ids():
            visit(up, trail + [i])
        state[i] = 2
        order.append(i)

    for i in nodes:  # insertion order = pipeline order per character: stable output
        visit(i, [])
    return {i: nodes[i] for i in order}
