"""Shot types, attribute words and shot balance (the rules are documented in docs/analysis.md).

Shot type is read from the main face box, in units of the face box height ``fh`` (dlib's box runs
from the eyebrows to the chin; a standing adult is about 9 such boxes tall):

- ``below`` = face heights of frame visible below the chin, ``(H - y1) / fh``;
- ``scale`` = face height over frame height, ``fh / H``.

Each gives a category and the *wider* of the two wins, so a small face at the bottom of a tall
frame is not called a close-up:

=================  ================  ==================
shot               by ``below``      by ``scale``
=================  ================  ==================
extreme_close_up   < 0.25            >= 0.55
close_up           < 2.0             >= 0.25
medium             < 6.0             >= 0.11
full_body          >= 6.0            >= 0.05
wide               (never)           < 0.05
=================  ================  ==================

Flags (not exclusive, images may carry several): ``multi_character`` when two or more faces are at
least half the main face's height; ``occluded`` when the main face is cut by the frame edge (more
than 5% of its box or its landmarks outside) or covered by another face box (>15% overlap);
``complex_background`` when the Canny edge density outside the estimated person regions exceeds
0.08. An image without a face is ``wide`` (no person at a recognizable size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

SHOT_TYPES: tuple[str, ...] = ("extreme_close_up", "close_up", "medium", "full_body", "wide")
FLAGS: tuple[str, ...] = ("multi_character", "complex_background", "occluded")
CATEGORIES: tuple[str, ...] = SHOT_TYPES + FLAGS

SHOT_WORDS = {
    "extreme_close_up": "extreme close-up",
    "close_up": "close-up",
    "medium": "medium shot",
    "full_body": "full body shot",
    "wide": "wide shot",
}

# (shot, minimum ``below``) and (shot, minimum ``scale``), narrowest first.
BELOW_LIMITS = (("extreme_close_up", 0.25), ("close_up", 2.0), ("medium", 6.0))
SCALE_LIMITS = (("extreme_close_up", 0.55), ("close_up", 0.25), ("medium", 0.11), ("full_body", 0.05))
SUBSTANTIAL_FACE = 0.5  # relative to the main face height, for multi_character
OCCLUSION_TRUNCATION = 0.05
OCCLUSION_OVERLAP = 0.15
COMPLEX_BACKGROUND_EDGES = 0.08


def shot_by_below(below: float) -> str:
    for shot, limit in BELOW_LIMITS:
        if below < limit:
            return shot
    return "full_body"


def shot_by_scale(scale: float) -> str:
    for shot, limit in SCALE_LIMITS:
        if scale >= limit:
            return shot
    return "wide"


def classify_shot(box: Sequence[float], image_height: int) -> str:
    """The shot type of an image from its main face box (x0, y0, x1, y1)."""
    fh = max(1e-6, box[3] - box[1])
    below = (image_height - box[3]) / fh
    scale = fh / float(image_height)
    a, b = shot_by_below(below), shot_by_scale(scale)
    return a if SHOT_TYPES.index(a) > SHOT_TYPES.index(b) else b


def image_flags(faces: Sequence[Mapping[str, Any]], main: int | None, background_edges: float) -> dict[str, bool]:
    """multi_character / occluded / complex_background from an image's face records."""
    from runner.vision.measures import box_overlap

    flags = {f: False for f in FLAGS}
    flags["complex_background"] = background_edges > COMPLEX_BACKGROUND_EDGES
    if main is None:
        return flags
    m = faces[main]
    mh = m["box"][3] - m["box"][1]
    substantial = [f for f in faces if (f["box"][3] - f["box"][1]) >= SUBSTANTIAL_FACE * mh]
    flags["multi_character"] = len(substantial) >= 2
    cut = m.get("truncation", 0.0) > OCCLUSION_TRUNCATION or (m.get("landmarks_outside") or 0.0) > OCCLUSION_TRUNCATION
    covered = any(box_overlap(m["box"], f["box"]) > OCCLUSION_OVERLAP for i, f in enumerate(faces) if i != main)
    flags["occluded"] = bool(cut or covered)
    return flags


def categories_of(shot: str, flags: Mapping[str, bool]) -> list[str]:
    return [shot] + [f for f in FLAGS if flags.get(f)]


# --------------------------------------------------------------------------- attribute words


def pose_words(pose: Mapping[str, float] | None) -> str:
    """'frontal view', 'three-quarter view', 'profile view', plus looking up/down."""
    if not pose or pose.get("yaw") is None or math.isnan(pose["yaw"]):
        return ""
    yaw, pitch = abs(pose["yaw"]), pose.get("pitch", 0.0)
    view = "frontal view" if yaw < 15 else ("three-quarter view" if yaw < 45 else "profile view")
    if pitch > 15:
        view += ", looking up"
    elif pitch < -15:
        view += ", looking down"
    return view


def expression_of(face: Mapping[str, Any] | None) -> dict[str, bool]:
    """smiling (smile score >= 0.5), mouth_open (> 0.3), eyes_closed (mean EAR < 0.16)."""
    out = {"smiling": False, "mouth_open": False, "eyes_closed": False}
    if not face:
        return out
    smile = face.get("smile") or {}
    if smile.get("score") is not None and not math.isnan(smile["score"]):
        out["smiling"] = smile["score"] >= 0.5
    mo = face.get("mouth_open")
    if mo is not None and not math.isnan(mo):
        out["mouth_open"] = mo > 0.3
    eyes = face.get("eyes") or {}
    if eyes.get("mean") is not None and not math.isnan(eyes["mean"]):
        out["eyes_closed"] = eyes["mean"] < 0.16
    return out


def expression_words(expr: Mapping[str, bool]) -> str:
    words = []
    if expr.get("smiling"):
        words.append("smiling")
    if expr.get("mouth_open") and not expr.get("smiling"):
        words.append("open mouth")
    if expr.get("eyes_closed"):
        words.append("eyes closed")
    return ", ".join(words) or "neutral expression"


def lighting_words(exposure: Mapping[str, float] | None) -> str:
    """bright / dim / side lighting from the face crop's exposure, else ''."""
    if not exposure:
        return ""
    words = []
    if exposure["mean"] > 0.68:
        words.append("bright lighting")
    elif exposure["mean"] < 0.3:
        words.append("dim lighting")
    if abs(exposure.get("side_balance", 0.0)) > 0.15:
        words.append("side lighting")
    return ", ".join(words)


# --------------------------------------------------------------------------- balance


@dataclass
class BalanceRow:
    category: str
    count: float  # effective count (repeats counted)
    share: float
    target: tuple[float, float] | None
    status: str  # ok | under | over | "" (no target)


def status_of(share: float, target: Sequence[float] | None, tol: float = 1e-9) -> str:
    if not target:
        return ""
    lo, hi = target
    if share < lo - tol:
        return "under"
    if share > hi + tol:
        return "over"
    return "ok"


def shot_balance_table(items: Iterable[tuple[Sequence[str], float]], targets: Mapping[str, Sequence[float]]) -> list[BalanceRow]:
    """Rows for every shot type plus every flag with a target or a non-zero count.

    ``items`` are (categories, weight) per image; weight is the repeat count (1 without reweighting).
    """
    counts = {c: 0.0 for c in CATEGORIES}
    total = 0.0
    for cats, w in items:
        total += w
        for c in cats:
            counts[c] = counts.get(c, 0.0) + w
    rows = []
    for c in CATEGORIES:
        if c in FLAGS and c not in targets and counts[c] == 0:
            continue
        share = counts[c] / total if total else 0.0
        tgt = tuple(targets[c]) if c in targets else None
        rows.append(BalanceRow(c, counts[c], round(share, 4), tgt, status_of(share, tgt)))  # type: ignore[arg-type]
    return rows


def table_json(rows: list[BalanceRow]) -> list[dict[str, Any]]:
    return [{"category": r.category, "count": r.count, "share": r.share,
             "target": list(r.target) if r.target else None, "status": r.status} for r in rows]


def select_to_targets(items: list[dict[str, Any]], targets: Mapping[str, Sequence[float]],
                      score_key: str = "quality") -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """Subsample categories that are over their target's max, lowest quality first.

    Returns (kept, dropped); dropped holds (item, the over-target category it was cut for). A
    removal is skipped when it would push a category that meets its min under it; selection
    cannot fix an under-target category (augment or reweight can).
    """
    kept = {id(it): it for it in items}
    counts = {c: 0 for c in CATEGORIES}
    for it in items:
        for c in it["categories"]:
            counts[c] += 1
    dropped: list[tuple[dict[str, Any], str]] = []
    order = sorted(items, key=lambda it: (it.get(score_key, 0.0), str(it.get("id", ""))))

    def ok_to_remove(it: dict[str, Any], n: int) -> bool:
        if n <= 1:
            return False
        for c, (lo, _) in targets.items():
            before = counts[c] / n
            after = (counts[c] - (c in it["categories"])) / (n - 1)
            if before >= lo - 1e-9 and after < lo - 1e-9:
                return False
        return True

    while True:
        n = len(kept)
        over = sorted(((counts[c] / n - t[1], c) for c, t in targets.items() if n and counts[c] / n > t[1] + 1e-9),
                      reverse=True)
        removed = False
        for _, cat in over:
            for cand in order:
                if id(cand) in kept and cat in cand["categories"] and ok_to_remove(cand, n):
                    del kept[id(cand)]
                    for c in cand["categories"]:
                        counts[c] -= 1
                    dropped.append((cand, cat))
                    removed = True
                    break
            if removed:
                break
        if not removed:
            break
    return [it for it in items if id(it) in kept], dropped


def reweight_to_targets(items: list[dict[str, Any]], targets: Mapping[str, Sequence[float]], *,
                        max_repeats: int = 20) -> dict[str, int]:
    """Per-shot-type repeat counts (>= 1) so the effective shares approach the target midpoints.

    Only the exclusive shot types are reweighted; a shot type without a target keeps its current
    share. Returns {shot: repeats}.
    """
    counts = {s: 0 for s in SHOT_TYPES}
    for it in items:
        counts[it["shot"]] += 1
    present = [s for s in SHOT_TYPES if counts[s] > 0]
    if not present:
        return {}
    n = sum(counts.values())
    want = {s: ((targets[s][0] + targets[s][1]) / 2.0 if s in targets else counts[s] / n) for s in present}
    total_want = sum(want.values())
    if total_want <= 0:
        return {s: 1 for s in present}
    want = {s: v / total_want for s, v in want.items()}
    raw = {s: (want[s] / counts[s]) if want[s] > 0 else 0.0 for s in present}
    base = min(v for v in raw.values() if v > 0) if any(v > 0 for v in raw.values()) else 1.0
    return {s: max(1, min(max_repeats, round(raw[s] / base))) for s in present}


# Crop geometry for augment: face heights of frame above the face box and below the chin.
CROP_LAYOUT = {"medium": (0.6, 3.2), "close_up": (0.5, 1.2)}
CROP_ASPECT = 0.8  # width / height


def crop_box_for(face_box: Sequence[float], image_size: tuple[int, int], shot: str) -> tuple[int, int, int, int] | None:
    """A crop of the image around the face that frames it as ``shot`` (medium or close_up).

    None when the crop does not fit inside the image.
    """
    w, h = image_size
    above, below = CROP_LAYOUT[shot]
    x0, y0, x1, y1 = face_box
    fh = y1 - y0
    ch = (above + 1.0 + below) * fh
    cw = ch * CROP_ASPECT
    if ch > h or cw > w:
        return None
    top = max(0.0, y0 - above * fh)  # a face near the top edge gets more room below instead
    if top + ch > h:
        return None
    cx = (x0 + x1) / 2.0
    left = min(max(0.0, cx - cw / 2.0), w - cw)
    return (int(round(left)), int(round(top)), int(round(left + cw)), int(round(top + ch)))
