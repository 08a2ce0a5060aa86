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
    key_groups: dict[object, list[str]] = field(default_factory=dict, repr=False)  # while collecting
    stage_set: dict[str, None] = field(default_factory=dict, repr=False)

    def message(self) -> str:
        from runner.hub import offline_setting

        off = offline_setting()
        when = (f"{_some(self.stages)} will fail when it starts ({off}, so nothing is downloaded)" if off else
                f"{_some(self.stages)} will download it when it runs, which needs the network "
                "(offline or with HF_HUB_OFFLINE=1 it fails at that point)")
        return (f"model {self.model!r} ({_some(self.keys)}) is {self.why} and not a local path: {when}. "
                f"Download it first (`hf download {self.model}`) or point the key at a local folder.")

    def as_json(self) -> dict:
        return {"model": self.model, "reason": self.why, "keys": self.keys, "stages": self.stages}


def uncached_models(plan: Plan) -> list[UncachedModel]:
    """The hub models that stages about to run need and the local cache does not hold. Linear in
    keys + stages (a spec with 1,000 video sources names a model in each)."""
    found: dict[str, UncachedModel] = {}
    if not any(ps.will_execute for ps in plan.stages):
        return []  # a no-op plan loads no model
    checked: dict[str, str | None] = {}
    several = len(plan.graph.specs) > 1
    for spec in plan.graph.specs.values():
        # model value -> its keys grouped by the stage kinds they affect (few groups per value)
        wanted: dict[str, dict[object, list[str]]] = {}
        for path, value, sch in S.iter_instance(spec.data):
            if sch.get("x-path") == "model" and isinstance(value, str) and is_hub_id(value, spec.project_root):
                key = format_key_path(path)
                affects = sch.get("x-affects")
                affects = tuple(affects) if isinstance(affects, list) else affects
                wanted.setdefault(value, {}).setdefault(affects, []).append(f"{spec.name}: {key}" if several else key)
        if not wanted:
            continue
        needles = {value: json.dumps(value) for value in wanted}
        for ps in (ps for ps in plan.stages if ps.will_execute and ps.node.character == spec.name):
            config = json.dumps(ps.node.config)
            for value, groups in wanted.items():
                readers = [a for a in groups if _reads(ps.node.kind, a)]
                if not readers or needles[value] not in config:
                    continue
                if value not in checked:
                    checked[value] = uncached_reason(value)
                if checked[value] is None:
                    continue
                entry = found.setdefault(value, UncachedModel(value, checked[value]))
                entry.stage_set[ps.id] = None
                for a in readers:
                    entry.key_groups[a] = groups[a]
    for entry in found.values():
        entry.keys = list(dict.fromkeys(k for keys in entry.key_groups.values() for k in keys))
        entry.stages = list(entry.stage_set)
    return list(found.values())


def _reads(kind: str, affects: object) -> bool:
    return affects is None or affects == "all" or (isinstance(affects, (list, tuple)) and kind in affects)


def _some(items: list[str], shown: int = 3) -> str:
    """``a, b, c and 997 more`` (a model named by a thousand sources' keys stays one line)."""
    if len(items) <= shown + 1:
        return ", ".join(items)
    return f"{', '.join(items[:shown])} and {len(items) - shown} more"
