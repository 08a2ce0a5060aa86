"""Run a stage in this process (the default backend)."""

from __future__ import annotations

from typing import Any

from runner.stages import base


class LocalBackend:
    name = "local"

    def run_stage(self, kind: base.StageKind, node: base.PlanNode, inputs: dict[str, base.Artifact],
                  ctx: Any) -> dict[str, base.Artifact]:
        return kind.run(node.config, inputs, ctx)
