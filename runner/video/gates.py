"""Strict and loose quality gates, and the quality score used to rank frames.

The strict gate decides what may become an anchor (and what the identity prototype is built
from); the loose gate decides what may be saved at all. Both look only at numbers measured per
face (runner.video.measures): blur (sharpness, 100 / sigma^2 of the face resampled to 40 px
between the eyes), brightness (mean grey level of the face), clipped (share of face pixels at 0 or 255),
face size in pixels, and the detector's score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GATE_VERSION = "video-gates-v1"


@dataclass(frozen=True)
class Gate:
    name: str
    min_face_px: float
    min_blur: float
    min_brightness: float
    max_brightness: float
    max_clipped: float
    min_score: float
    max_occlusion: float

    def failures(self, face_px: float, score: float, measures: dict[str, Any]) -> list[str]:
        """Reasons this face fails the gate (empty list: it passes)."""
        out = []
        if face_px < self.min_face_px:
            out.append(f"face {face_px:.0f}px < {self.min_face_px:.0f}px")
        blur = measures.get("blur", 0.0)
        if blur is None:
            out.append("sharpness not measurable (face too small)")
        elif float(blur) < self.min_blur:
            out.append(f"blur {float(blur):.1f} < {self.min_blur:.1f}")
        b = float(measures.get("brightness", 128.0))
        if not (self.min_brightness <= b <= self.max_brightness):
            out.append(f"brightness {b:.0f} outside [{self.min_brightness:.0f}, {self.max_brightness:.0f}]")
        c = float(measures.get("clipped", 0.0))
        if c > self.max_clipped:
            out.append(f"clipped {c:.2f} > {self.max_clipped:.2f}")
        if score < self.min_score:
            out.append(f"detection score {score:.2f} < {self.min_score:.2f}")
        occ = float(measures.get("occlusion", 0.0))
        if occ > self.max_occlusion:
            out.append(f"occlusion {occ:.2f} > {self.max_occlusion:.2f}")
        return out

    def passes(self, face_px: float, score: float, measures: dict[str, Any]) -> bool:
        return not self.failures(face_px, score, measures)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_gates(options: dict[str, Any]) -> tuple[Gate, Gate]:
    """(strict, loose) from the stage options (``strict_min_face_px``, ``loose_min_face_px``, ...)."""
    strict = Gate(
        "strict",
        min_face_px=float(options.get("strict_min_face_px", 64)),
        min_blur=float(options.get("strict_min_blur", 40.0)),
        min_brightness=60.0,
        max_brightness=200.0,
        max_clipped=0.10,
        # detector score on [0, 1] (pipeline._score01: HOG margin / 1.5, else the confidence)
        min_score=float(options.get("strict_min_score", 0.1)),
        max_occlusion=0.10,
    )
    loose = Gate(
        "loose",
        min_face_px=float(options.get("loose_min_face_px", 32)),
        min_blur=float(options.get("loose_min_blur", 12.0)),
        min_brightness=25.0,
        max_brightness=235.0,
        max_clipped=0.40,
        min_score=float(options.get("loose_min_score", 0.0)),
        max_occlusion=1.0,  # heavy occlusion is kept for the challenge set
    )
    return strict, loose


def quality_score(face_px: float, score01: float, measures: dict[str, Any]) -> float:
    """A [0, 1] score to rank frames: sharpness, size, exposure and detector confidence.

    0.35 x sharpness (log of runner.vision.measures.face_sharpness, 1.0 at 100) + 0.25 x size (1.0 at 160 px)
    + 0.25 x exposure (1 at mid-grey, minus the clipped share) + 0.15 x detector score in [0, 1].
    """
    import math

    blur = max(0.0, float(measures.get("blur") or 0.0))
    sharp = min(1.0, math.log1p(blur) / math.log1p(100.0))
    size = min(1.0, face_px / 160.0)
    b = float(measures.get("brightness", 128.0))
    exposure = max(0.0, 1.0 - abs(b - 128.0) / 128.0 - float(measures.get("clipped", 0.0)))
    det = min(1.0, max(0.0, score01))
    return round(0.35 * sharp + 0.25 * size + 0.25 * exposure + 0.15 * det, 6)
