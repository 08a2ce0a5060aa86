"""Identity stability against a medoid prototype, and novelty of general-vision embeddings.

Two embeddings are kept apart on purpose: the identity embedding (ArcFace or dlib) answers only
"is this the same person?"; the general-vision embedding (DINOv2, or the labelled fallback
descriptor) answers only "does this frame look new?".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def medoid(embeddings: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """The member with the smallest summed cosine distance to the others, and its index.

    A medoid is an actual frame's embedding (unlike a mean), so a few off frames cannot pull the
    prototype somewhere no real face is.
    """
    if len(embeddings) == 0:
        raise ValueError("medoid of an empty set")
    e = l2n(np.stack([np.asarray(x) for x in embeddings]))
    dist = 1.0 - e @ e.T
    i = int(np.argmin(dist.sum(axis=1)))
    return e[i], i


def stability(embedding: np.ndarray, prototype: np.ndarray) -> float:
    """stable(t) = cos(e_id(t), prototype)."""
    return float(l2n(embedding) @ l2n(prototype))


def novelty(embedding: np.ndarray, saved: np.ndarray | Sequence[np.ndarray]) -> float:
    """min over saved images of (1 - cos); 1.0 when nothing is saved yet."""
    if saved is None or len(saved) == 0:
        return 1.0
    s = l2n(np.asarray(saved))
    return float(np.min(1.0 - s @ l2n(embedding)))


#: Beyond this |yaw| (degrees; the extreme-pose boundary of runner.video.buckets) a face's identity
#: embedding may fall under tau and the face still be admitted, when its track carries the identity
#: (:func:`mark_continuity_admissions`).
PROFILE_YAW = 30.0
#: A link of a continuity chain: the larger face box at most this many times the smaller (a face does
#: not double in size between two sampled frames; a cut or a swap to a nearer or farther face does).
LINK_MAX_SIZE_RATIO = 1.5


def profile_floor(backend_name: str) -> float | None:
    """The backend's calibrated profile floor (runner.vision.faces.PROFILE_FLOORS); None: none is
    calibrated, and no face under tau is admitted."""
    from runner.vision.faces import PROFILE_FLOORS

    return PROFILE_FLOORS.get(backend_name)


def _linked(a: Any, b: Any, tau: float, max_gap_frames: int, min_iou: float) -> float | None:
    """The cosine of two consecutive observations of one track when they are one continuous face
    (frames at most ``max_gap_frames`` apart, boxes overlapping at least ``min_iou`` and of sizes
    within LINK_MAX_SIZE_RATIO, embeddings at least ``tau`` alike); else None."""
    from runner.video.tracking import box_iou

    if abs(b.frame_idx - a.frame_idx) > max_gap_frames or box_iou(a.box, b.box) < min_iou:
        return None
    if max(a.size, b.size) > LINK_MAX_SIZE_RATIO * max(1e-6, min(a.size, b.size)):
        return None
    sim = float(l2n(a.embedding) @ l2n(b.embedding))
    return sim if sim >= tau else None


def _segments(obs: list[Any], tau: float, max_gap_frames: int, min_iou: float) -> list[list[tuple[Any, float]]]:
    """A track's observations split where a link breaks; each (observation, cosine of the link to
    the one before it, 1.0 for a segment's first)."""
    out: list[list[tuple[Any, float]]] = []
    for prev, o in zip([None, *obs], obs):
        sim = None if prev is None else _linked(prev, o, tau, max_gap_frames, min_iou)
        if sim is None:
            out.append([(o, 1.0)])
        else:
            out[-1].append((o, sim))
    return out


def _admission(seg: list[tuple[Any, float]], i: int, stable: list[float], tau: float) -> dict[str, Any] | None:
    """How observation ``i`` of a segment is tied to the nearest verified frame of it (None: none)."""
    verified = [j for j in range(len(seg)) if stable[j] >= tau]
    if not verified:
        return None
    j = min(verified, key=lambda k: (abs(k - i), k))
    lo, hi = min(i, j), max(i, j)
    links = [seg[k][1] for k in range(lo + 1, hi + 1)]
    return {"rule": "track_continuity", "via_frame": seg[j][0].frame_idx, "via_stable": round(stable[j], 4),
            "links": len(links), "min_link": round(min(links), 4)}


def mark_continuity_admissions(tracks: Sequence[Any], prototype: np.ndarray, *, tau: float, floor: float | None,
                               max_gap_frames: int, min_iou: float = 0.3, min_yaw: float = PROFILE_YAW) -> int:
    """Admit turned faces whose identity the track carries; sets ``obs.admitted`` and returns how many.

    A face under tau (``stable < tau``) is admitted when all of these hold:

    1. an unbroken chain of its track's consecutive observations ties it to a frame of the same
       track that passed tau; each link: at most ``max_gap_frames`` apart, boxes overlapping at
       least ``min_iou`` (the tracker's IoU) with sizes within LINK_MAX_SIZE_RATIO, and the two
       embeddings at least ``tau`` alike (the
       calibrated same-person rule, applied between neighbours, whose pose and light differ little;
       a cut to someone else breaks it);
    2. ``|yaw| >= min_yaw``: the embedding is known to fall with the turn; a frontal face under tau
       is not excused;
    3. ``stable >= floor``, the backend's calibrated profile floor (the median stranger's score on
       the held-out pairs); no floor (an uncalibrated backend): nothing is admitted.

    ``obs.admitted`` records the chain: the verified frame, its score, the links and the weakest.
    """
    n = 0
    if floor is None:
        return n
    for t in tracks:
        obs = sorted(t.observations, key=lambda o: o.frame_idx)
        for seg in _segments(obs, tau, max_gap_frames, min_iou):
            stable = [stability(o.embedding, prototype) for o, _ in seg]
            for i, (o, _) in enumerate(seg):
                if stable[i] >= tau or stable[i] < floor or o.yaw is None or abs(o.yaw) < min_yaw:
                    continue
                a = _admission(seg, i, stable, tau)
                if a is not None:
                    o.admitted = {**a, "stable": round(stable[i], 4), "floor": floor, "yaw": round(float(o.yaw), 2),
                                  "min_yaw": min_yaw}
                    n += 1
    return n
