"""Train variants: how a variant's overrides combine with the train section and its phases.

Precedence, highest first: **variant, phase, section, preset, schema default.**

- A variant's values replace the section's, key by key (mappings merge, lists are replaced
  whole, as everywhere in a spec): ``higher_rank: {lora: {rank: 64}}`` keeps the rest of ``lora``.
- A variant's ``lr`` also replaces every phase's ``lr``: ``lower_lr: {lr: 8.0e-5}`` trains every
  phase at 8e-5, whatever the phases say. A phase whose ``lr`` is null uses the section's.
- ``steps`` is the length of the one default phase, so it is unused when ``phases`` are given:
  there each phase's ``steps`` decide.

:func:`effective` is what the trainer actually uses from a resolved train section: the values
above applied, and the values that cannot change the LoRA dropped (``steps`` beside phases,
settings of a disabled regularization or bucketing, a text-encoder rate without text-encoder
training, scheduler settings the schedule ignores, caption-shuffle settings without shuffle_tags,
phase names). Two stages with the same effective config would train the same LoRA, so
:func:`variant_problems` refuses a variant whose effective config equals another stage's, and
:func:`differences` says what a variant changes (``runner plan`` prints it).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from runner.spec import schema as S
from runner.spec.resolve import _get, deep_merge

# Keys of the train section that shape the plan (which nodes exist), not what one node computes.
PLAN_ONLY = ("variants", "include_base_variant", "preset")
# Keys a variant sets for every phase as well (variant over phase).
PHASE_KEYS = ("lr",)
BASE = "base"


def apply_variant(section: dict[str, Any], overrides: dict[str, Any] | None, *,
                  name: str = "train") -> dict[str, Any]:
    """The train section of one stage: ``section`` with ``overrides`` (see the module doc), plan-only
    keys removed, schema defaults filled (of the section ``name``: train, or train_video)."""
    cfg = {k: v for k, v in section.items() if k not in PLAN_ONLY}
    if overrides:
        cfg = deep_merge(cfg, {k: v for k, v in overrides.items() if k not in PLAN_ONLY})
        phase_values = {k: overrides[k] for k in PHASE_KEYS if k in overrides}
        if phase_values and "phases" not in overrides:
            cfg["phases"] = [{**p, **phase_values} for p in cfg.get("phases") or []]
    cfg = S.fill_defaults(cfg, S.section_schema(name), S.section_uri(name))
    for k in PLAN_ONLY:
        cfg.pop(k, None)
    return cfg


def effective(cfg: dict[str, Any]) -> dict[str, Any]:
    """What training uses from a resolved train section (defaults filled): see the module doc."""
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in PLAN_ONLY + ("variant",)}
    phases = out.get("phases") or [{"name": "main", "steps": out.get("steps"), "lr": None, "mix": "natural"}]
    # a phase's name is a label (logs, file metadata): the same phases under other names train the same LoRA
    out["phases"] = [{**{k: v for k, v in p.items() if k != "name"},
                      "lr": p.get("lr") if p.get("lr") is not None else out.get("lr")} for p in phases]
    out.pop("steps", None)
    lora = out.get("lora") or {}
    if not lora.get("train_text_encoder"):
        out["lora"] = {k: v for k, v in lora.items() if k != "text_encoder_lr"}
    if not (lora.get("train_text_encoder") and lora.get("text_encoder_lr") is not None):
        out.pop("lr", None)  # then only the phases' rates are used
    for switch in ("regularization", "buckets"):
        part = out.get(switch)
        if isinstance(part, dict) and not part.get("enabled"):
            out[switch] = {"enabled": False}
    for path, _ in _unused_settings(out):
        parent = out if len(path) == 1 else out.get(path[0]) or {}
        parent.pop(path[-1], None)
    for key in OPTIONAL_OBJECTS:  # absent means all defaults: compare leaf by leaf
        out[key] = {**_object_defaults(key), **(out.get(key) or {})}
    return out


# train objects the resolver leaves out while they hold only defaults (their node configs, and
# so the cache keys of specs that never set them, stay as they were)
OPTIONAL_OBJECTS = ("memory", "objective")


def _object_defaults(key: str) -> dict[str, Any]:
    from runner.spec.config import schema_node

    return {k: copy.deepcopy(sub.get("default")) for k, sub in schema_node("train", key)["properties"].items()}


def _unused_settings(cfg: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(key path, why) of the settings the trainer does not read in ``cfg``: the scheduler's
    restarts and warm-up where diffusers' get_scheduler ignores them, the caption-shuffle
    settings without shuffle_tags (runner.diffusion.trainer reads them only then)."""
    sched = (cfg.get("lr_scheduler") or {}).get("name")
    out = []
    if sched != "cosine_with_restarts":
        out.append((("lr_scheduler", "num_cycles"), f"'lr_scheduler.num_cycles' is unused by the {sched} schedule"))
    if sched in ("constant", "piecewise_constant"):
        out.append((("lr_scheduler", "warmup_steps"), f"'lr_scheduler.warmup_steps' is unused by the {sched} schedule"))
    if not cfg.get("shuffle_tags"):
        out += [((k,), f"'{k}' is unused without shuffle_tags") for k in ("keep_tokens", "caption_variants")]
    return out


def stage_sections(train: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variant name (``base`` for the section itself) -> that stage's resolved train section."""
    variants = train.get("variants") or {}
    out: dict[str, dict[str, Any]] = {}
    if not variants or train.get("include_base_variant", True):
        out[BASE] = apply_variant(train, None)
    for name, ov in variants.items():
        if isinstance(ov, dict):
            out[name] = apply_variant(train, ov)
    return out


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """'key old -> new' for every value that differs between two configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path} {_short(a)} -> {_short(b)}"]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def variant_notes(train: dict[str, Any], name: str) -> list[str]:
    """What variant ``name`` changes against the train section, as the trainer sees it
    (``phases[0].lr 0.0001 -> 8e-05``)."""
    sections = stage_sections({**train, "include_base_variant": True})
    diff = differences(effective(sections[BASE]), effective(sections[name]))
    return diff or ["no effective difference"]


def duplicate_stages(train: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(variant, the earlier stage it equals, its overridden keys that changed nothing) for every
    variant whose effective config equals an earlier stage's (the base section first)."""
    seen: dict[str, str] = {}
    out = []
    for name, section in stage_sections(train).items():
        key = json.dumps(effective(section), sort_keys=True, default=str)
        if key in seen:
            out.append((name, seen[key], _shadowed(train, name, seen[key])))
        else:
            seen[key] = name
    return out


def _shadowed(train: dict[str, Any], name: str, other: str) -> list[str]:
    """Why a variant's overrides change nothing, key by key (for the message)."""
    ov = (train.get("variants") or {}).get(name) or {}
    reasons = []
    for key in ov:
        if key == "steps" and train.get("phases") and "phases" not in ov:
            reasons.append("'steps' is unused when phases are set (each phase's steps decide)")
        elif key in ("regularization", "buckets") and not deep_merge(train.get(key) or {}, ov[key]).get("enabled"):
            reasons.append(f"'{key}' is not enabled, so its settings are unused")
        elif key == "lora" and "text_encoder_lr" in (ov[key] or {}) and not deep_merge(
                train.get("lora") or {}, ov[key]).get("train_text_encoder"):
            reasons.append("'lora.text_encoder_lr' is unused without lora.train_text_encoder")
    if "phases" in ov and [p.get("name") for p in ov["phases"] or []] != [
            p.get("name") for p in apply_variant(train, None).get("phases") or [{"name": "main"}]]:
        reasons.append("phase names are labels: the same phases under other names train the same LoRA")
    merged = apply_variant(train, ov)
    reasons += [why for path, why in _unused_settings(merged) if _get(ov, path) is not None]
    if not reasons and other != BASE:
        reasons.append(f"its overrides resolve to the same values as variant '{other}'")
    return reasons or ["its values are the ones the section already has"]


def resolved_variants_comment(train: Any) -> str:
    """YAML comment lines for `runner plan --resolved`: how each variant resolves."""
    variants = (train or {}).get("variants") if isinstance(train, dict) else None
    if not variants:
        return ""
    lines = ["# train variants as resolved (variant over phase over section; a variant's lr applies",
             "# to every phase; steps is unused when phases are set):"]
    for name in variants:
        lines.append(f"#   {name}: " + "; ".join(variant_notes(train, name)))
    return "\n".join(lines) + "\n"
