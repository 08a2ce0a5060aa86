"""What an apply is asked to do (:class:`ApplyOptions`), and where each stage runs under it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.core import contract
from runner.core.errors import UserError
from runner.core.pricing import stage_backend
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
    """Whether ``node`` runs on Modal: its kind's ``hardware.stage_backend`` entry when set, else a
    GPU stage of a spec whose backend is modal; CPU stages stay here unless sent; ``--backend
    local`` keeps everything here (runner.core.pricing.stage_backend)."""
    hardware = graph.specs[node.character].data.get("hardware", {})
    return stage_backend(node.kind, node.gpu, hardware, options.backend) == "modal"


def check_stage_backends(graph: Graph) -> None:
    """Refuse a ``hardware.stage_backend`` / ``hardware.stage_cpu`` entry naming a kind that is not
    registered (a typo would silently run the stage here), or sending a kind that summarizes the
    run (the report reads this machine's state database) to Modal."""
    kinds = {k.kind: k for k in graph.registry}
    for spec in graph.specs.values():
        hardware = spec.data.get("hardware", {})
        for key in ("stage_backend", "stage_cpu"):
            for kind, value in (hardware.get(key) or {}).items():
                where = f"{spec.file}: hardware.{key}.{kind}"
                if kind not in kinds:
                    raise ApplyError(f"{where}: no stage kind is called {kind!r}",
                                     hint="Known kinds: " + ", ".join(sorted(kinds)) + ".")
                if key == "stage_backend" and value == "modal" and kinds[kind].summarizes:
                    raise ApplyError(f"{where}: the {kind} stage summarizes the run from this machine's "
                                     "state database and cannot run on Modal",
                                     hint=f"Remove {kind} from hardware.stage_backend (it runs here).")
