"""Run a stage in this process (the default backend)."""

from __future__ import annotations

from typing import Any

from runner.core import contract


class LocalBackend:
    name = "local"

    def run_stage(self, kind: contract.StageKind, node: contract.PlanNode, inputs: dict[str, contract.Artifact],
                  ctx: Any) -> dict[str, contract.Artifact]:
        return kind.run(node.config, inputs, ctx)
