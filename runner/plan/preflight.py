"""Checks `runner plan` makes before anything runs: the hub models the plan's stages will load that
are not in the local Hugging Face cache (they need the network when the stage starts).

Every model-valued key is found by walking the resolved spec against the schema (``"x-path":
"model"``), so a new model key is checked without a line here; ``builtin:`` models and local
paths are not hub ids. A model counts for a stage when the stage will execute, the key declares
an effect on the stage's kind (``"x-affects"``, as for cache keys) and its config carries the
value. The cache is only looked at (no network), through :mod:`runner.hub`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from runner.hub import is_hub_id, uncached_reason
from runner.plan.planner import Plan
from runner.spec import schema as S
from runner.spec.errors import format_key_path


@dataclass
class UncachedModel:
    model: str
    why: str  # "not in the Hugging Face cache (/root/.cache/huggingface/hub)"
    keys: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)

    def message(self) -> str:
        from runner.hub import offline_setting

        off = offline_setting()
        when = (f"{', '.join(self.stages)} will fail when it starts ({off}, so nothing is downloaded)" if off else
                f"{', '.join(self.stages)} will download it when it runs, which needs the network "
                "(offline or with HF_HUB_OFFLINE=1 it fails at that point)")
        return (f"model {self.model!r} ({', '.join(self.keys)}) is {self.why} and not a local path: {when}. "
                f"Download it first (`hf download {self.model}`) or point the key at a local folder.")

    def as_json(self) -> dict:
        return {"model": self.model, "reason": self.why, "keys": self.keys, "stages": self.stages}


def uncached_models(plan: Plan) -> list[UncachedModel]:
    """The hub models that stages about to run need and the local cache does not hold."""
    found: dict[str, UncachedModel] = {}
    checked: dict[str, str | None] = {}
    for spec in plan.graph.specs.values():
        wanted = [(format_key_path(path), value, sch.get("x-affects"))
                  for path, value, sch in S.iter_instance(spec.data)
                  if sch.get("x-path") == "model" and isinstance(value, str) and is_hub_id(value, spec.project_root)]
        if not wanted:
            continue
        running = [ps for ps in plan.stages if ps.will_execute and ps.node.character == spec.name]
        for ps in running:
            config = json.dumps(ps.node.config)
            for key, value, affects in wanted:
                if not _reads(ps.node.kind, affects) or json.dumps(value) not in config:
                    continue
                if value not in checked:
                    checked[value] = uncached_reason(value)
                if checked[value] is None:
                    continue
                entry = found.setdefault(value, UncachedModel(value, checked[value]))
                _add(entry.keys, f"{spec.name}: {key}" if len(plan.graph.specs) > 1 else key)
                _add(entry.stages, ps.id)
    return list(found.values())


def _reads(kind: str, affects: object) -> bool:
    return affects is None or affects == "all" or (isinstance(affects, list) and kind in affects)


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)
