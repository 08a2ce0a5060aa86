"""Per-face and per-image measurements: expression from landmarks, sharpness, exposure, framing.

All functions take numpy arrays (RGB uint8 images, (68, 2) iBUG landmarks) and return plain floats
so records stay JSON. The rules that turn these numbers into labels (shot type, expression words
in captions) live in :mod:`runner.vision.shots` and are documented in docs/analysis.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: Side of the square face crop on which blur and exposure are measured, so that values compare
#: across image sizes (a small face upscaled to this size reads as blurry, which it is).
FACE_CROP_PX = 128


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.hypot(*(np.asarray(a, float) - np.asarray(b, float))))


def eye_aspect_ratio(lm: np.ndarray) -> dict[str, float]:
    """Eye aspect ratio (Soukupova & Cech 2016) per eye and their mean.

    Open eyes read about 0.25-0.35, closed below about 0.18.
    """

    def ear(p: np.ndarray) -> float:
        width = _dist(p[0], p[3])
        if width <= 0:
            return float("nan")
        return (_dist(p[1], p[5]) + _dist(p[2], p[4])) / (2.0 * width)

    left = ear(lm[36:42])  # image-left eye
    right = ear(lm[42:48])
    return {"left": round(left, 4), "right": round(right, 4), "mean": round((left + right) / 2.0, 4)}


def mouth_openness(lm: np.ndarray) -> float:
    """Inner-lip gap over inner mouth width: ~0 closed, >0.3 clearly open (talking, laughing)."""
    width = _dist(lm[60], lm[64])
    if width <= 0:
        return float("nan")
    gap = (_dist(lm[61], lm[67]) + _dist(lm[62], lm[66]) + _dist(lm[63], lm[65])) / 3.0
    return round(gap / width, 4)


def smile_proxy(lm: np.ndarray) -> dict[str, float]:
    """A smile score from mouth width and mouth-corner lift (no classifier involved).

    - ``width``: outer mouth width (48-54) over the distance between the eye centres; about
      0.75-0.9 for a neutral mouth, above 0.95 when the mouth is stretched by a smile.
    - ``lift``: how far the corners sit above the mid-line of the lips, over the eye distance.
    - ``score``: 0..1, ``0.5 * clip((width - 0.9) / 0.25) + 0.5 * clip(lift / 0.15)``. On the
      shared test photos, broad smiles score 0.8-1.0 and neutral or talking mouths below 0.4.
    """
    eye_l = lm[36:42].mean(0)
    eye_r = lm[42:48].mean(0)
    iod = _dist(eye_l, eye_r)
    if iod <= 0:
        return {"width": float("nan"), "lift": float("nan"), "score": float("nan")}
    width = _dist(lm[48], lm[54]) / iod
    # Distances along the face's own vertical axis (perpendicular to the eye line), so roll does
    # not read as a smile.
    ex = (eye_r - eye_l) / iod
    down = np.array([-ex[1], ex[0]])
    mid = float(np.dot((lm[51] + lm[57]) / 2.0, down))
    corners = float(np.dot((lm[48] + lm[54]) / 2.0, down))
    lift = (mid - corners) / iod
    def clip01(v: float) -> float:
        return min(1.0, max(0.0, v))

    score = 0.5 * clip01((width - 0.9) / 0.25) + 0.5 * clip01(lift / 0.15)
    return {"width": round(width, 4), "lift": round(lift, 4), "score": round(score, 4)}


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(0, int(math.floor(x0))), max(0, int(math.floor(y0))),
            min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1))))


def truncation(box: Sequence[float], width: int, height: int) -> float:
    """Fraction of the face box that lies outside the frame (0: fully inside)."""
    x0, y0, x1, y1 = box
    area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    if area <= 0:
        return 0.0
    ix = max(0.0, min(x1, width) - max(x0, 0.0))
    iy = max(0.0, min(y1, height) - max(y0, 0.0))
    return round(1.0 - ix * iy / area, 4)


def face_crop(rgb: np.ndarray, box: Sequence[float], size: int = FACE_CROP_PX) -> np.ndarray | None:
    """The face box (clipped to the frame) resized to ``size`` x ``size`` RGB."""
    import cv2

    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = clip_box(box, w, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    crop = rgb[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if (x1 - x0) > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def blur_laplacian(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grayscale crop (higher is sharper)."""
    import cv2

    gray = cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2GRAY)
    return round(float(cv2.Laplacian(gray, cv2.CV_64F).var()), 2)


def exposure(crop_rgb: np.ndarray, *, dark: int = 8, bright: int = 247) -> dict[str, float]:
    """Mean luminance (0..1), fractions of clipped dark/bright pixels, and left/right balance."""
    y = (0.299 * crop_rgb[..., 0] + 0.587 * crop_rgb[..., 1] + 0.114 * crop_rgb[..., 2])
    half = y.shape[1] // 2
    left, right = float(y[:, :half].mean()), float(y[:, half:].mean())
    return {
        "mean": round(float(y.mean()) / 255.0, 4),
        "contrast": round(float(y.std()) / 255.0, 4),
        "clipped_dark": round(float((y <= dark).mean()), 4),
        "clipped_bright": round(float((y >= bright).mean()), 4),
        # > 0: the image-right half of the face is brighter (side light from image right).
        "side_balance": round((right - left) / 255.0, 4),
    }


def background_edge_density(rgb: np.ndarray, face_boxes: Sequence[Sequence[float]], *, work_side: int = 320) -> float:
    """Canny edge density outside the estimated person regions (a clutter measure, 0..1).

    A person region is estimated from each face box: 1.8 face widths either side of the face
    centre, from 0.6 face heights above the face down to the bottom of the frame.
    """
    import cv2

    h, w = rgb.shape[:2]
    s = min(1.0, work_side / float(max(h, w)))
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA) if s < 1 else rgb
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 80, 160) > 0
    mask = np.ones_like(edges, dtype=bool)
    for x0, y0, x1, y1 in face_boxes:
        fw, fh = (x1 - x0), (y1 - y0)
        cx = (x0 + x1) / 2.0
        px0, px1 = int(max(0, (cx - 1.8 * fw) * s)), int(min(small.shape[1], (cx + 1.8 * fw) * s))
        py0 = int(max(0, (y0 - 0.6 * fh) * s))
        mask[py0:, px0:px1] = False
    if mask.sum() < 0.05 * mask.size:  # the person fills the frame: no background to judge
        return 0.0
    return round(float(edges[mask].mean()), 4)


def perceptual_hash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(rgb)))


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def box_overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area over the area of ``a``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(1e-9, (a[2] - a[0]) * (a[3] - a[1]))
    return ix * iy / area


def face_measures(rgb: np.ndarray, face: Any) -> dict[str, Any]:
    """Everything measured on one face (a :class:`runner.vision.faces.Face`)."""
    h, w = rgb.shape[:2]
    out: dict[str, Any] = {
        "height_rel": round(face.height / float(h), 4),
        "width_rel": round(face.width / float(w), 4),
        "truncation": truncation(face.box, w, h),
    }
    if face.landmarks is not None:
        lm = np.asarray(face.landmarks, dtype=np.float64)
        out["eyes"] = eye_aspect_ratio(lm)
        out["mouth_open"] = mouth_openness(lm)
        out["smile"] = smile_proxy(lm)
        inside = (lm[:, 0] >= 0) & (lm[:, 0] < w) & (lm[:, 1] >= 0) & (lm[:, 1] < h)
        out["landmarks_outside"] = round(1.0 - float(inside.mean()), 4)
    else:
        out["eyes"] = None
        out["mouth_open"] = None
        out["smile"] = None
        out["landmarks_outside"] = None
    crop = face_crop(rgb, face.box)
    if crop is not None:
        out["blur"] = blur_laplacian(crop)
        out["exposure"] = exposure(crop)
    else:
        out["blur"] = 0.0
        out["exposure"] = None
    return out
