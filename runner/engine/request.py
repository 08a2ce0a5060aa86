"""What an apply is asked to do (:class:`ApplyOptions`), and where each stage runs under it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.core import contract
from runner.core.errors import UserError
from runner.plan.graph import Graph
from runner.spec.resolve import Spec


class ApplyError(UserError):
    """A problem with the request itself (not a stage failure)."""

    exit_code = 2


@dataclass
class ApplyOptions:
    force: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)
    keep_going: bool = False
    wait_s: float = 0.0
    backend: str | None = None  # overrides hardware.backend of every spec
    command: str = "runner apply"
    dry_run: bool = False
    # Where remote stages run instead of Modal: a RemoteBackend, or a transport such as
    # runner.backends.remote.FolderTransport (tests; debugging a stage the way Modal runs it).
    remote: Any = None
    # Remote stages at once (default: the smallest hardware.modal.max_parallel of the batch).
    max_parallel: int | None = None
    # The batch's budget, over hardware.budget of every spec (runner.engine.budget).
    max_cost: float | None = None
    max_hours: float | None = None


def backend_of(spec: Spec, options: ApplyOptions) -> str:
    return options.backend or spec.data.get("hardware", {}).get("backend", "local")


def is_remote(node: contract.PlanNode, graph: Graph, options: ApplyOptions) -> bool:
    """GPU stages of a spec whose backend is modal run remotely; everything else stays local."""
    return node.gpu is not None and backend_of(graph.specs[node.character], options) == "modal"
