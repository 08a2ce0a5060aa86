"""Pose, expression, occlusion and lighting buckets of one face observation.

Pose follows runner.vision.faces' convention: yaw > 0 when the person turns to their left (face
pointing to image right), pitch > 0 when the person looks up. Expression uses the thresholds of
runner.vision.shots.expression_of, so the analyze stage and the video builder agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Yaw bins in degrees; values beyond +-45 fall into the outer bins (and count as extreme pose).
YAW_EDGES = (-45.0, -30.0, -15.0, -5.0, 5.0, 15.0, 30.0, 45.0)
YAW_BINS = ("[-45,-30]", "[-30,-15]", "[-15,-5]", "[-5,5]", "[5,15]", "[15,30]", "[30,45]")
# Pitch bins: down < -20 <= slight-down < -8 <= neutral <= 8 < slight-up <= 20 < up
PITCH_EDGES = (-20.0, -8.0, 8.0, 20.0)
PITCH_BINS = ("down", "slight-down", "neutral", "slight-up", "up")
EXPRESSION_BINS = ("neutral", "smile", "mouth_open", "eyes_closed")
OCCLUSION_BINS = ("none", "partial", "heavy")
LIGHTING_BINS = ("normal", "dark", "overexposed")

# The bucket values that name coverage files (cov_yaw22_pitch0_neutral.jpg): the midpoint of each
# bin's range in degrees, rounded; the open outer pitch bins are taken as wide as their neighbours.
YAW_NOMINAL = (-38, -22, -10, 0, 10, 22, 38)
PITCH_NOMINAL = (-26, -14, 0, 14, 26)

AXES = {
    "yaw": YAW_BINS,
    "pitch": PITCH_BINS,
    "expression": EXPRESSION_BINS,
    "occlusion": OCCLUSION_BINS,
    "lighting": LIGHTING_BINS,
}

# Landmark-proxy thresholds, the same as runner.vision.shots.expression_of.
EYES_CLOSED_EAR = 0.16  # mean eye aspect ratio below this: eyes closed
MOUTH_OPEN_MAR = 0.30  # inner-lip gap / inner mouth width above this: mouth open
SMILE_SCORE = 0.5  # runner.vision.measures.smile_proxy score at or above this: smile
DARK_MEAN = 60.0
BRIGHT_MEAN = 200.0


def yaw_bin(yaw: float) -> int:
    for i in range(len(YAW_BINS)):
        if yaw < YAW_EDGES[i + 1]:
            return i
    return len(YAW_BINS) - 1


def pitch_bin(pitch: float) -> int:
    for i, edge in enumerate(PITCH_EDGES):
        if pitch < edge or (i == 2 and pitch <= edge):
            return i
    return len(PITCH_BINS) - 1


def expression_bin(measures: dict[str, Any]) -> int:
    """eyes_closed > mouth_open > smile > neutral, from landmark proxies.

    ``eye_open`` (mean eye aspect ratio), ``mouth_open`` (inner-lip gap / mouth width) and
    ``smile`` (score in [0, 1]) come from runner.video.measures (runner.vision.measures).
    """
    closed = measures.get("eyes_closed")
    if closed is not None:  # size-aware (runner.vision.measures.closed_eye_threshold); a wink counts
        if closed != "none":
            return 3
    elif measures.get("eye_open") is not None and measures["eye_open"] < EYES_CLOSED_EAR:
        return 3
    mar = measures.get("mouth_open")
    if mar is not None and mar > MOUTH_OPEN_MAR:
        return 2
    smile = measures.get("smile")
    if smile is not None and float(smile) >= SMILE_SCORE:
        return 1
    return 0


def occlusion_bin(occlusion: float) -> int:
    if occlusion < 0.1:
        return 0
    if occlusion <= 0.4:
        return 1
    return 2


def lighting_bin(brightness: float) -> int:
    if brightness < DARK_MEAN:
        return 1
    if brightness > BRIGHT_MEAN:
        return 2
    return 0


@dataclass(frozen=True)
class Bins:
    yaw: int
    pitch: int
    expression: int
    occlusion: int
    lighting: int

    @property
    def selection_key(self) -> tuple[int, int, int]:
        """What the selection fills: one bucket per (yaw, pitch, expression)."""
        return (self.yaw, self.pitch, self.expression)

    def labels(self) -> dict[str, str]:
        return {
            "yaw": YAW_BINS[self.yaw],
            "pitch": PITCH_BINS[self.pitch],
            "expression": EXPRESSION_BINS[self.expression],
            "occlusion": OCCLUSION_BINS[self.occlusion],
            "lighting": LIGHTING_BINS[self.lighting],
        }

    def bucket(self) -> dict[str, Any]:
        """The selection bucket by value: nominal yaw and pitch in degrees, the expression label."""
        return {"yaw": YAW_NOMINAL[self.yaw], "pitch": PITCH_NOMINAL[self.pitch],
                "expression": EXPRESSION_BINS[self.expression]}

    def bucket_name(self) -> str:
        """``yaw<deg>_pitch<deg>_<expression>``, e.g. ``yaw22_pitch0_neutral``, ``yaw-38_pitch14_smile``."""
        b = self.bucket()
        return f"yaw{b['yaw']}_pitch{b['pitch']}_{b['expression']}"

    @property
    def near_frontal(self) -> bool:
        return 2 <= self.yaw <= 4 and 1 <= self.pitch <= 3


def bins_for(yaw: float, pitch: float, measures: dict[str, Any]) -> Bins:
    return Bins(
        yaw=yaw_bin(yaw),
        pitch=pitch_bin(pitch),
        expression=expression_bin(measures),
        occlusion=occlusion_bin(float(measures.get("occlusion", 0.0))),
        lighting=lighting_bin(float(measures.get("brightness", 128.0))),
    )


def extreme_pose(yaw: float, pitch: float) -> bool:
    return abs(yaw) >= 30.0 or abs(pitch) > 20.0
