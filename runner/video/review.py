"""The reviewer's identity-set decisions (``runner review``, section ``identity``) applied to a
built VideoResult, after the builder and before the exporter.

A decision is keyed by the sha256 of the frame's PNG (the ``sha256`` of its record in the images
manifest, see runner/video/export.py): ``{"decision": "drop"}`` removes the frame from every set
of its person (and so from the images artifact), ``{"decision": "set", "set": <name>}`` moves it
to that set of the same person. The person's counts and buckets filled follow, because the
exporter computes them from the sets. Leaf module: the decisions come in as a plain mapping.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

SETS = ("anchors", "coverage", "challenge")


def frame_sha(c: Any) -> str:
    """The key the review file uses for a frame: sha256 of the PNG the exporter writes for it."""
    from runner.video.export import _png_bytes

    return hashlib.sha256(_png_bytes(c.crop)).hexdigest()


def filled(coverage: list[Any]) -> dict[str, int]:
    """Buckets filled per axis by a coverage set (as the selection counts them)."""
    return {axis: len({getattr(c.bins, axis) for c in coverage})
            for axis in ("yaw", "pitch", "expression", "occlusion", "lighting")}


def apply_identity_decisions(result: Any, decided: dict[str, dict[str, Any]],
                             key: Callable[[Any], str] = frame_sha) -> dict[str, Any]:
    """Drop and move frames of ``result``'s persons in place; returns {"dropped": frames left in
    no set, "moved": frames added to another set, "applied": the keys of the decisions used}
    (identity/review.json, so the review page tells an applied drop from a vanished frame). Decisions
    for frames not in the result are ignored here (the review page lists them)."""
    counts: dict[str, Any] = {"dropped": 0, "moved": 0, "applied": []}
    if not decided:
        return counts
    for p in result.persons:
        sets = {name: list(getattr(p, name)) for name in SETS}
        keys = {id(c): key(c) for items in sets.values() for c in items}
        touched: set[str] = set()
        for name in SETS:
            kept = []
            for c in sets[name]:
                d = decided.get(keys[id(c)]) or {}
                target = d.get("set") if d.get("decision") == "set" else None
                if d.get("decision") == "drop" or (target in SETS and target != name):
                    touched.add(keys[id(c)])
                    continue
                kept.append(c)
            sets[name] = kept
        for name in SETS:  # moves: into the target set once, in frame order after what was there
            moved = {}
            for items in (getattr(p, n) for n in SETS):
                for c in items:
                    d = decided.get(keys[id(c)]) or {}
                    if d.get("decision") == "set" and d.get("set") == name:
                        moved.setdefault(keys[id(c)], c)
            have = {keys[id(c)] for c in sets[name]}
            add = sorted((c for k, c in moved.items() if k not in have), key=lambda c: c.frame_idx)
            sets[name] += add
            counts["moved"] += len(add)
        for name in SETS:
            setattr(p, name, sets[name])
        p.filled = filled(p.coverage)
        left = {keys[id(c)] for items in sets.values() for c in items}
        counts["dropped"] += len(touched - left)
        counts["applied"] = sorted({*counts["applied"], *touched})
    return counts
