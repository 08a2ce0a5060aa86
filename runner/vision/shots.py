"""Shot types, attribute words and crop geometry (the rules are documented in docs/analysis.md).

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
from typing import Any, Mapping, Sequence

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
    """smiling (smile score >= 0.5), mouth_open (> 0.3), eyes_closed (both eyes under the size-aware
    closed-eye ratio of runner.vision.measures.eye_aspect_ratio), winking (one eye). Eyes too small
    to judge (``eyes`` None) read open."""
    out = {"smiling": False, "mouth_open": False, "eyes_closed": False, "winking": False}
    if not face:
        return out
    smile = face.get("smile") or {}
    if smile.get("score") is not None and not math.isnan(smile["score"]):
        out["smiling"] = smile["score"] >= 0.5
    mo = face.get("mouth_open")
    if mo is not None and not math.isnan(mo):
        out["mouth_open"] = mo > 0.3
    closed = (face.get("eyes") or {}).get("closed")
    out["eyes_closed"] = closed == "both"
    out["winking"] = closed in ("left", "right")
    return out


def expression_words(expr: Mapping[str, bool]) -> str:
    words = []
    if expr.get("smiling"):
        words.append("smiling")
    if expr.get("mouth_open") and not expr.get("smiling"):
        words.append("open mouth")
    if expr.get("eyes_closed"):
        words.append("eyes closed")
    elif expr.get("winking"):
        words.append("winking")
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


# --------------------------------------------------------------------------- crops (balance: runner/vision/balance.py)


# Crop geometry for augment: face heights of frame above the face box and below the chin.
CROP_LAYOUT = {"medium": (0.6, 3.2), "close_up": (0.5, 1.2), "extreme_close_up": (0.1, 0.1)}
CROP_ASPECT = 0.8  # width / height


def crop_box_for(face_box: Sequence[float], image_size: tuple[int, int], shot: str) -> tuple[int, int, int, int] | None:
    """A crop of the image around the face that frames it as ``shot`` (a key of CROP_LAYOUT).

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
