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
At M evenly spaced frames, the face backend's 68 landmarks give the mouth opening
(:func:`mouth_opening`: the inner-lip gap over the distance between the eye centres, so free of
the face's size and of how wide the mouth is stretched) and the eye aspect ratio
(:mod:`runner.vision.measures`). The mouth moves when the spread of its opening (10th to 90th
percentile, so a single misfit of the landmarks does not count) reaches ``frozen_below``
(default 0.06: the landmarks of one still frame re-rendered with a pixel of shift and JPEG noise
spread 0.01-0.05 on the shared clips' 44-108 px faces, carphone.mp4's talking 0.35, the Hamilton
clip's singing 0.12). Blinks are counted on a denser sample (every frame at up to 12 per second of
the clip, :func:`blink_indices`) with :func:`runner.vision.measures.blinks_in_track` (both eyes'
openings lose their white and iris against the track's own open-eye median); a run of shut
frames is one blink. A clip is "frozen" when its face is found, its mouth does not move and it
does not blink (the failure of the seed clips: a still face carried by the camera). The standard
deviations of both series are reported beside (``mouth_std``, ``eye_std``). ``frozen`` is None
when fewer than two frames have landmarks.

Identity drift
--------------
The identity similarity between the main faces of the first and the last analysed frame that
have one, and its 0-100 distance as for fidelity (:func:`identity_drift`).

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


def mouth_opening(lm: np.ndarray) -> float:
    """Inner-lip gap (mean of the three inner pairs 61-67, 62-66, 63-65) over the distance between
    the eye centres: ~0 closed, 0.1-0.2 talking, 0.3-0.55 wide open. Divided by the eyes rather
    than the mouth's width, it does not shrink when a smile or a wide-open jaw stretches the mouth."""
    lm = np.asarray(lm, dtype=np.float64)
    iod = float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0)))
    if iod <= 0:
        return float("nan")
    gap = float(np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in ((61, 67), (62, 66), (63, 65))]))
    return round(gap / iod, 4)


def blink_indices(n_frames: int, fps: float, max_per_second: float = 12.0) -> list[int]:
    """The frames blinks are looked for on: every frame, or every k-th so that at most
    ``max_per_second`` are read per second of the clip (a blink shuts the eyes 100-400 ms)."""
    step = max(1, int(round(float(fps) / max_per_second))) if fps and fps > 0 else 1
    return list(range(0, max(0, int(n_frames)), step))


def analyse_faces(frames: Sequence[Any], indices: Sequence[int], face_backend) -> list[dict[str, Any]]:
    """Main face of each selected frame: embedding, box, mouth openness (over the mouth's width),
    mouth opening (over the eye distance, :func:`mouth_opening`), eye aspect ratio and the eyes'
    appearance (``eye_appearance``, None where the eyes are too small to read)."""
    from runner.vision.faces import main_face
    from runner.vision.measures import eye_aspect_ratio, eye_openness, mouth_openness

    out = []
    for i in indices:
        rgb = np.asarray(frames[i].convert("RGB")) if hasattr(frames[i], "convert") else np.asarray(frames[i])
        f = main_face(face_backend.analyze(rgb))
        rec: dict[str, Any] = {"frame": int(i), "face": f is not None, "embedding": None, "box": None,
                               "mouth_open": None, "mouth_gap": None, "eye_ratio": None, "eye_appearance": None}
        if f is not None:
            rec["embedding"] = np.asarray(f.embedding, dtype=np.float32)
            rec["box"] = [round(float(v), 1) for v in f.box]
            if f.landmarks is not None:
                lm = np.asarray(f.landmarks, dtype=np.float64)
                rec["mouth_open"] = float(mouth_openness(lm))
                rec["mouth_gap"] = float(mouth_opening(lm))
                ear = eye_aspect_ratio(lm)
                rec["eye_ratio"] = None if ear is None else float(ear["mean"])
                eyes = eye_openness(rgb, lm)
                rec["eye_appearance"] = None if eyes is None else eyes["appearance"]
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


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def count_blinks(blink_records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Blinks over records in frame order (:func:`analyse_faces` on :func:`blink_indices`): runs of
    frames that :func:`runner.vision.measures.blinks_in_track` calls shut. ``count`` None when
    under 5 frames have a readable eye appearance (no open-eye baseline)."""
    from runner.vision.measures import blinks_in_track

    recs = sorted(blink_records, key=lambda r: r["frame"])
    shut = blinks_in_track([r.get("eye_appearance") for r in recs])
    if all(s is None for s in shut):
        return {"count": None, "frames": [], "measured": 0}
    frames, count, prev = [], 0, False
    for r, s in zip(recs, shut):
        if s is None:
            continue  # an unread frame neither ends nor starts a blink
        if s:
            frames.append(r["frame"])
            count += 0 if prev else 1
        prev = bool(s)
    return {"count": count, "frames": frames, "measured": int(sum(s is not None for s in shut))}


def expression_dynamics(face_records: Sequence[dict[str, Any]], frozen_below: float,
                        blink_records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Mouth and eye series over ``face_records``, blinks over ``blink_records`` (denser; the same
    records when None) and the "frozen" verdict of the module docstring."""
    mouth = [r["mouth_open"] for r in face_records if _finite(r.get("mouth_open"))]
    gap = [r["mouth_gap"] for r in face_records if _finite(r.get("mouth_gap"))]
    eyes = [r["eye_ratio"] for r in face_records if _finite(r.get("eye_ratio"))]
    blinks = count_blinks(face_records if blink_records is None else blink_records)
    res: dict[str, Any] = {"frames_with_landmarks": len(gap), "frozen_below": float(frozen_below),
                           "mouth_std": None, "eye_std": None, "mouth_range": None, "eye_range": None,
                           "mouth_spread": None, "mouth_moves": None, "blinks": blinks["count"],
                           "blink_frames": blinks["frames"], "blink_frames_read": blinks["measured"],
                           "frozen": None, "series": {"mouth_open": [round(v, 4) for v in mouth],
                                                      "mouth_gap": [round(v, 4) for v in gap],
                                                      "eye_ratio": [round(v, 4) for v in eyes]}}
    if len(mouth) >= 2:
        res.update(mouth_std=round(float(np.std(mouth)), 5), mouth_range=round(float(np.ptp(mouth)), 5))
    if len(eyes) >= 2:
        res.update(eye_std=round(float(np.std(eyes)), 5), eye_range=round(float(np.ptp(eyes)), 5))
    if len(gap) >= 2:
        p10, p90 = np.percentile(gap, [10, 90])
        res["mouth_spread"] = round(float(p90 - p10), 5)
        res["mouth_moves"] = bool(res["mouth_spread"] >= frozen_below)
        res["frozen"] = bool(not res["mouth_moves"] and not blinks["count"])
    return res


def dynamics_detail(dyn: dict[str, Any]) -> str:
    """One line for a report: why the clip is (not) frozen."""
    if dyn.get("frozen") is None:
        return "no landmarks in 2+ frames"
    blinks = "blinks not read (eyes too small or too few frames)" if dyn.get("blinks") is None else \
        f"{dyn['blinks']} blink(s)"
    return (f"mouth spread {dyn['mouth_spread']} (moves at >= {dyn['frozen_below']}), {blinks}; "
            f"mouth std {dyn['mouth_std']}, eye std {dyn['eye_std']}")


def identity_drift(face_records: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Identity similarity between the first and the last record with a face (in frame order) and
    its 0-100 distance (:func:`fidelity_distance`; 30 = the backend's "same person" threshold)."""
    from runner.vision.faces import identity_similarity

    found = sorted((r for r in face_records if r.get("embedding") is not None), key=lambda r: r["frame"])
    if len(found) < 2:
        return {"first": None, "last": None, "similarity": None, "distance": None}
    a, b = found[0], found[-1]
    sim = float(identity_similarity(a["embedding"], b["embedding"]))
    return {"first": a["frame"], "last": b["frame"], "similarity": round(sim, 5),
            "distance": round(fidelity_distance(sim, threshold), 2)}


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
