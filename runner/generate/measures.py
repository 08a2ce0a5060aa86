"""Per-clip measures: face fidelity (0-100 distance), expression dynamics, motion magnitude.

Fidelity distance
-----------------
For a frame whose main face has identity embedding ``e``, ``s`` is the mean cosine between ``e``
and the reference faces (:func:`runner.metrics.definitions.face_similarity_per_image`) and ``t``
is the face backend's identity threshold (``backend.default_identity_threshold``: dlib 0.92,
insightface/ArcFace 0.35)::

    distance = min(100, max(0, 30 * (1 - s) / (1 - t)))

so 0 is the reference itself, 30 is exactly the backend's "same person" threshold, and 100 is far
from it. The defaults ``excellent <= 20`` and ``fail > 30`` therefore read: excellent = at most
two thirds of the threshold's cosine distance; fail = the backend would not call it the same
person. With dlib, s = 0.97 -> 11, 0.947 -> 20, 0.92 -> 30, 0.85 -> 56; with ArcFace, s = 0.6 ->
18, 0.35 -> 30, 0.0 -> 46. A frame without a detected face scores 100. The clip's fidelity is the
mean distance over N evenly spaced frames (first and last included); the worst frame is
reported beside it. Grade: ``excellent`` (mean <= excellent), ``ok``, ``fail`` (mean > fail).

Expression dynamics
-------------------
At M evenly spaced frames, the face backend's 68 landmarks give mouth openness (inner-lip gap
over mouth width) and the eye aspect ratio (:mod:`runner.vision.measures`). Dynamics are their
standard deviations across frames; a clip whose face is found but where both stds are below
``frozen_below`` is flagged "frozen" (the face did not move). ``None`` when fewer than two frames
have landmarks.

Motion magnitude
----------------
Farneback dense optical flow (OpenCV) between consecutive analysed frames, on grayscale frames
scaled so the longest side is ``flow_side`` px; per pair the mean flow vector length, then the
mean over pairs, reported in px per frame at that size and as a percentage of the frame
diagonal per frame (size-independent).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

FAIL_POINT = 30.0  # the distance at the backend's identity threshold


def evenly_spaced(n_frames: int, k: int) -> list[int]:
    """k indices spread over 0..n_frames-1, first and last included (fewer if the clip is short)."""
    if n_frames <= 0:
        return []
    k = max(1, min(int(k), n_frames))
    if k == 1:
        return [0]
    return sorted(set(int(round(i * (n_frames - 1) / (k - 1))) for i in range(k)))


def fidelity_distance(similarity: float | None, threshold: float) -> float:
    """The 0-100 distance of the module docstring (None similarity = no face = 100)."""
    if similarity is None or (isinstance(similarity, float) and math.isnan(similarity)):
        return 100.0
    t = min(float(threshold), 0.999)
    return float(min(100.0, max(0.0, FAIL_POINT * (1.0 - float(similarity)) / (1.0 - t))))


def grade(distance: float, excellent: float, fail: float) -> str:
    if distance > fail:
        return "fail"
    return "excellent" if distance <= excellent else "ok"


def analyse_faces(frames: Sequence[Any], indices: Sequence[int], face_backend) -> list[dict[str, Any]]:
    """Main face of each selected frame: embedding, box, mouth openness, eye aspect ratio."""
    from runner.vision.faces import main_face
    from runner.vision.measures import eye_aspect_ratio, mouth_openness

    out = []
    for i in indices:
        rgb = np.asarray(frames[i].convert("RGB"))
        f = main_face(face_backend.analyze(rgb))
        rec: dict[str, Any] = {"frame": int(i), "face": f is not None, "embedding": None, "box": None,
                               "mouth_open": None, "eye_ratio": None}
        if f is not None:
            rec["embedding"] = np.asarray(f.embedding, dtype=np.float32)
            rec["box"] = [round(float(v), 1) for v in f.box]
            if f.landmarks is not None:
                lm = np.asarray(f.landmarks, dtype=np.float64)
                rec["mouth_open"] = float(mouth_openness(lm))
                rec["eye_ratio"] = float(eye_aspect_ratio(lm)["mean"])
        out.append(rec)
    return out


def fidelity(face_records: Sequence[dict[str, Any]], ref_faces: np.ndarray, threshold: float, *,
             excellent: float, fail: float) -> dict[str, Any]:
    from runner.metrics.definitions import face_similarity_per_image

    sims, _, found = face_similarity_per_image([r["embedding"] for r in face_records], ref_faces)
    per_frame = []
    for r, s, ok in zip(face_records, sims, found):
        sim = float(s) if ok else None
        per_frame.append({"frame": r["frame"], "face": bool(ok), "similarity": None if sim is None else round(sim, 5),
                          "distance": round(fidelity_distance(sim, threshold), 2)})
    dists = [p["distance"] for p in per_frame]
    mean = float(np.mean(dists)) if dists else 100.0
    return {"distance": round(mean, 2), "worst": round(max(dists), 2) if dists else 100.0,
            "grade": grade(mean, excellent, fail), "frames": per_frame, "threshold": float(threshold),
            "excellent": float(excellent), "fail": float(fail),
            "faces_found": int(sum(p["face"] for p in per_frame))}


def expression_dynamics(face_records: Sequence[dict[str, Any]], frozen_below: float) -> dict[str, Any]:
    mouth = [r["mouth_open"] for r in face_records
             if r.get("mouth_open") is not None and not math.isnan(r["mouth_open"])]
    eyes = [r["eye_ratio"] for r in face_records if r.get("eye_ratio") is not None and not math.isnan(r["eye_ratio"])]
    res: dict[str, Any] = {"frames_with_landmarks": min(len(mouth), len(eyes)), "frozen_below": float(frozen_below),
                           "mouth_std": None, "eye_std": None, "mouth_range": None, "eye_range": None,
                           "frozen": None, "series": {"mouth_open": [round(v, 4) for v in mouth],
                                                      "eye_ratio": [round(v, 4) for v in eyes]}}
    if len(mouth) >= 2 and len(eyes) >= 2:
        res.update(mouth_std=round(float(np.std(mouth)), 5), eye_std=round(float(np.std(eyes)), 5),
                   mouth_range=round(float(np.ptp(mouth)), 5), eye_range=round(float(np.ptp(eyes)), 5))
        res["frozen"] = bool(res["mouth_std"] < frozen_below and res["eye_std"] < frozen_below)
    return res


def motion_magnitude(frames: Sequence[Any], indices: Sequence[int], flow_side: int = 256) -> dict[str, Any]:
    import cv2

    if len(indices) < 2:
        return {"px_per_frame": None, "pct_diag_per_frame": None, "pairs": 0, "flow_side": flow_side}
    w, h = frames[0].size
    scale = min(1.0, float(flow_side) / max(w, h))
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    grays = [cv2.cvtColor(np.asarray(frames[i].convert("RGB").resize(size)), cv2.COLOR_RGB2GRAY) for i in indices]
    per_pair = []
    for (ia, a), (ib, b) in zip(zip(indices, grays), zip(indices[1:], grays[1:])):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mag = float(np.linalg.norm(flow, axis=-1).mean())
        per_pair.append(mag / max(1, ib - ia))  # per frame of the clip, between analysed frames
    px = float(np.mean(per_pair))
    diag = math.hypot(*size)
    return {"px_per_frame": round(px, 4), "pct_diag_per_frame": round(100.0 * px / diag, 4), "pairs": len(per_pair),
            "flow_side": int(flow_side), "analysis_size": list(size)}


def text_feature_drift(clip, frames: Sequence[Any], indices: Sequence[int], source,
                       features: Sequence[str]) -> list[dict[str, Any]]:
    """Distinctive features kept: per feature text (e.g. "glasses"), the CLIP similarity of the
    source image and the mean over the clip's frames; ``kept`` when the frames' similarity drops
    by at most 10% of the source's (CLIP's image-text cosine)."""
    if not features:
        return []
    texts = [f"a photo of a person with {f}" for f in features]
    t_emb = clip.embed_texts(texts)
    imgs = [source] + [frames[i] for i in indices]
    i_emb = clip.embed_images(imgs)
    sims = i_emb @ t_emb.T  # both L2-normalized
    out = []
    for j, feat in enumerate(features):
        src = float(sims[0, j])
        clip_mean = float(sims[1:, j].mean())
        out.append({"feature": feat, "source": round(src, 4), "clip": round(clip_mean, 4),
                    "kept": bool(clip_mean >= src - 0.1 * abs(src))})
    return out
