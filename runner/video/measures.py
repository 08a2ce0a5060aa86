"""Per-face measures the gates and buckets need, from one frame and one runner.vision.faces.Face.

runner.vision.faces gives box, score, 68 landmarks, pose and the identity embedding; the
measures below are computed here from those (landmark proxies for eyes, mouth and smile, image
statistics of the face crop for blur and exposure, and an occlusion proxy).

- ``blur``: variance of the Laplacian of the face box resized to 112 px high (so the number does
  not grow with face size); higher is sharper.
- ``brightness``: mean grey level of the face box; ``clipped``: share of its pixels <= 5 or >= 250.
- ``eye_open``: eye aspect ratio (mean of both eyes; Soukupova & Cech 2016), ~0.25-0.35 open,
  < 0.18 closed.
- ``mouth_open``: inner-lip gap (landmarks 62-66) / mouth width (48-54).
- ``smile``: 1.0 when the mouth is wide relative to the outer eye corners (> 0.9... see SMILE_*)
  and both corners sit above the lip midline, else 0.0.
- ``occlusion``: the larger of (a) the share of the face box outside the frame and (b) the share
  of the landmark hull (eyes and inner mouth left out) whose chroma is far from the skin tone
  sampled on the nose; a proxy, documented as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SMILE_WIDTH_RATIO = 0.62  # mouth width / outer eye-corner distance above this: wide mouth
SMILE_LIFT = 0.02  # corners above the lip midline by this share of the face height
SKIN_CHROMA_DIST = 14.0  # Cr/Cb distance from the nose's skin tone that counts as "not skin"


def _crop(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((1, 1, 3), np.uint8)
    return rgb[y0:y1, x0:x1]


def image_measures(rgb: np.ndarray, box: tuple[float, float, float, float]) -> dict[str, float]:
    import cv2

    face = _crop(rgb, box)
    grey = cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_RGB2GRAY)
    brightness = float(grey.mean())
    clipped = float(((grey <= 5) | (grey >= 250)).mean())
    if grey.shape[0] >= 8 and grey.shape[1] >= 8:
        scale = 112.0 / grey.shape[0]
        norm = cv2.resize(grey, (max(8, round(grey.shape[1] * scale)), 112),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        blur = float(cv2.Laplacian(norm, cv2.CV_64F).var())
    else:
        blur = 0.0
    return {"blur": round(blur, 3), "brightness": round(brightness, 3), "clipped": round(clipped, 4)}


def out_of_frame(box: tuple[float, float, float, float], width: int, height: int) -> float:
    x0, y0, x1, y1 = box
    area = max(1e-6, (x1 - x0) * (y1 - y0))
    iw = max(0.0, min(x1, width) - max(x0, 0.0))
    ih = max(0.0, min(y1, height) - max(y0, 0.0))
    return float(max(0.0, 1.0 - iw * ih / area))


def _ear(eye: np.ndarray) -> float:
    a = np.linalg.norm(eye[1] - eye[5])
    b = np.linalg.norm(eye[2] - eye[4])
    c = np.linalg.norm(eye[0] - eye[3])
    return float((a + b) / (2.0 * c)) if c > 0 else 0.0


def landmark_measures(lm: np.ndarray) -> dict[str, float]:
    """Eye, mouth and smile proxies from 68 iBUG landmarks."""
    lm = np.asarray(lm, dtype=np.float64)
    ear = (_ear(lm[36:42]) + _ear(lm[42:48])) / 2.0
    mouth_w = float(np.linalg.norm(lm[54] - lm[48])) or 1e-6
    gap = float(np.linalg.norm(lm[66] - lm[62]))
    mar = gap / mouth_w
    eye_w = float(np.linalg.norm(lm[45] - lm[36])) or 1e-6
    face_h = float(np.linalg.norm(lm[8] - lm[27])) or 1e-6
    mid_y = (lm[62, 1] + lm[66, 1]) / 2.0
    lift = ((mid_y - lm[48, 1]) + (mid_y - lm[54, 1])) / 2.0 / face_h
    smile = 1.0 if (mouth_w / eye_w > SMILE_WIDTH_RATIO and lift > SMILE_LIFT and mar < 0.3) else 0.0
    return {"eye_open": round(ear, 4), "mouth_open": round(mar, 4), "smile": smile,
            "mouth_width_ratio": round(mouth_w / eye_w, 4), "corner_lift": round(float(lift), 4)}


def skin_occlusion(rgb: np.ndarray, lm: np.ndarray) -> float:
    """Share of the face (landmark hull minus eyes and inner mouth) whose chroma is not skin-like."""
    import cv2

    lm = np.asarray(lm, dtype=np.float64)
    h, w = rgb.shape[:2]
    x0, y0 = np.floor(lm.min(0)).astype(int)
    x1, y1 = np.ceil(lm.max(0)).astype(int)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1 + 1), min(h, y1 + 1)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return 0.0
    patch = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    pts = (lm - [x0, y0]).astype(np.int32)
    mask = np.zeros(patch.shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(pts[np.r_[0:27]]), 1)
    for idx in (np.r_[36:42], np.r_[42:48], np.r_[60:68]):
        cv2.fillConvexPoly(mask, cv2.convexHull(pts[idx]), 0)
    nose = np.zeros_like(mask)
    cv2.fillConvexPoly(nose, cv2.convexHull(pts[np.r_[27:36]]), 1)
    ycc = cv2.cvtColor(patch, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    if nose.sum() < 4 or mask.sum() < 16:
        return 0.0
    ref = np.median(ycc[nose.astype(bool)][:, 1:], axis=0)
    d = np.linalg.norm(ycc[:, :, 1:] - ref, axis=2)
    off = (d > SKIN_CHROMA_DIST) & mask.astype(bool)
    return float(off.sum() / mask.sum())


def face_measures(rgb: np.ndarray, face: Any) -> dict[str, float]:
    """All measures for one face (a runner.vision.faces.Face) in one RGB frame."""
    h, w = rgb.shape[:2]
    m: dict[str, float] = dict(image_measures(rgb, face.box))
    oof = out_of_frame(face.box, w, h)
    occ = oof
    lm = getattr(face, "landmarks", None)
    if lm is not None and len(lm) == 68:
        m.update(landmark_measures(lm))
        occ = max(oof, skin_occlusion(rgb, lm))
    m["out_of_frame"] = round(oof, 4)
    m["occlusion"] = round(float(occ), 4)
    return m
