"""Per-face measures the video gates and buckets need.

Everything that runner.vision.measures already measures is taken from there (the same numbers
the analyze stage records for still images): eye aspect ratio, mouth openness, the smile proxy,
sharpness (``blur``: 100 / sigma^2 of the face resampled to 40 px between the eyes; None when the
face is too small), exposure, and truncation at the frame edge. Added here, for the occlusion
bucket only, is a skin-chroma proxy (see :func:`skin_occlusion`).

Keys returned by :func:`face_measures`:
``blur``, ``brightness`` (0-255 mean grey of the face), ``clipped`` (share of clipped dark +
bright pixels), ``eye_open`` (mean EAR), ``eyes_closed`` ("none", "left", "right", "both" with the
size-aware threshold, a wink by eye appearance; None when the eyes are too small),
``eye_appearance`` (per eye, for a track's open-eye baseline: VM.blinks_in_track), ``mouth_open``,
``smile`` (score 0-1), ``out_of_frame`` (truncation), ``occlusion`` (max of truncation and the skin proxy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.vision import measures as VM

# Cr/Cb distance from the skin tone sampled on the nose that counts as "not skin".
SKIN_CHROMA_DIST = 18.0


def skin_occlusion(rgb: np.ndarray, lm: np.ndarray) -> float:
    """Share of the lower face (hull of the jaw line, eyes and lips left out) whose chroma is far
    from the skin tone sampled on the nose: a microphone, a phone, a scarf, a visor read high;
    a hand (skin-coloured) does not. A proxy, and documented as one.
    """
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
    cv2.fillConvexPoly(mask, cv2.convexHull(pts[np.r_[0:17]]), 1)
    for idx in (np.r_[36:42], np.r_[42:48], np.r_[48:60]):
        cv2.fillConvexPoly(mask, cv2.convexHull(pts[idx]), 0)
    nose = np.zeros_like(mask)
    cv2.fillConvexPoly(nose, cv2.convexHull(pts[np.r_[27:36]]), 1)
    if nose.sum() < 4 or mask.sum() < 16:
        return 0.0
    ycc = cv2.cvtColor(patch, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    ref = np.median(ycc[nose.astype(bool)][:, 1:], axis=0)
    d = np.linalg.norm(ycc[:, :, 1:] - ref, axis=2)
    off = (d > SKIN_CHROMA_DIST) & mask.astype(bool)
    return float(off.sum() / mask.sum())


def face_measures(rgb: np.ndarray, face: Any) -> dict[str, Any]:
    """The measures of one face (a runner.vision.faces.Face) in one RGB frame."""
    h, w = rgb.shape[:2]
    m: dict[str, Any] = {}
    lm = getattr(face, "landmarks", None)
    m["blur"] = VM.face_sharpness(rgb, lm if lm is not None else face.keypoints)[0]
    crop = VM.face_crop(rgb, face.box)
    if crop is not None:
        ex = VM.exposure(crop)
        m["brightness"] = round(ex["mean"] * 255.0, 3)
        m["clipped"] = round(ex["clipped_dark"] + ex["clipped_bright"], 4)
    else:
        m.update(brightness=0.0, clipped=1.0)
    oof = float(VM.truncation(face.box, w, h))
    occ = oof
    if lm is not None and len(lm) == 68:
        lm = np.asarray(lm, dtype=np.float64)
        eyes = VM.eye_openness(rgb, lm)
        m["eye_open"] = None if eyes is None else float(eyes["mean"])
        m["eyes_closed"] = None if eyes is None else eyes["closed"]
        m["eye_appearance"] = None if eyes is None else eyes["appearance"]
        m["mouth_open"] = float(VM.mouth_openness(lm))
        m["smile"] = float(VM.smile_proxy(lm)["score"])
        occ = max(oof, skin_occlusion(rgb, lm))
    m["out_of_frame"] = round(oof, 4)
    m["occlusion"] = round(float(occ), 4)
    return {k: (0.0 if isinstance(v, float) and not np.isfinite(v) else v) for k, v in m.items()}
