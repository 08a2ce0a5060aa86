"""Face tracks across sampled frames: box overlap plus identity embedding, Hungarian assignment.

Each sampled frame's faces are matched to the active tracks by minimizing
``1 - (w_iou * IoU + w_id * identity similarity)`` with
:func:`scipy.optimize.linear_sum_assignment`; a pair is only allowed when the identities agree
(similarity >= ``id_threshold``), or when the boxes overlap (IoU >= ``min_iou``) and the
identities do not clearly disagree (similarity >= ``veto_threshold``: a different person who
appears where the last one was, after a cut, starts a new track). Faces left over
are offered to tracks lost earlier (after a cut, or when the person left the frame), this time by
identity alone, so one person who reappears keeps one track. The rest start new tracks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

INFEASIBLE = 1e6


@dataclass
class FaceObs:
    """One detected face in one sampled frame, with what the gates and buckets need."""

    frame_idx: int
    timestamp_ms: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in frame pixels
    score: float
    embedding: np.ndarray = field(repr=False)  # L2-normalized identity embedding
    yaw: float | None = None
    pitch: float | None = None
    roll: float | None = None
    landmarks: np.ndarray | None = field(default=None, repr=False)
    measures: dict[str, Any] = field(default_factory=dict)  # blur, brightness, eyes, mouth, ...
    track_id: int = -1
    detector: str = ""  # "cnn" when dlib's CNN found it (a profile HOG missed); "": the backend's own
    #: Set when the face is under tau but its track carries the identity
    #: (runner.video.stability.mark_continuity_admissions: the chain and the floor); None: by embedding.
    admitted: dict[str, Any] | None = None

    @property
    def size(self) -> float:
        """Face size in pixels (the box's longer side)."""
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass
class Track:
    track_id: int
    observations: list[FaceObs] = field(default_factory=list)
    _emb_sum: np.ndarray | None = field(default=None, repr=False)
    last_sample: int = -1  # index of the sampled frame last seen in

    @property
    def embedding(self) -> np.ndarray:
        assert self._emb_sum is not None
        n = np.linalg.norm(self._emb_sum)
        return self._emb_sum / n if n > 0 else self._emb_sum

    @property
    def last_box(self) -> tuple[float, float, float, float]:
        return self.observations[-1].box

    def add(self, obs: FaceObs, sample_no: int) -> None:
        obs.track_id = self.track_id
        self.observations.append(obs)
        e = np.asarray(obs.embedding, dtype=np.float64)
        self._emb_sum = e.copy() if self._emb_sum is None else self._emb_sum + e
        self.last_sample = sample_no


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    iw, ih = max(0.0, ix1 - ix0), max(0.0, iy1 - iy0)
    inter = iw * ih
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / ua) if ua > 0 else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


class FaceTracker:
    """Online tracker; call :meth:`update` once per sampled frame, then read :attr:`tracks`."""

    def __init__(
        self,
        *,
        id_threshold: float,
        min_iou: float = 0.3,
        iou_weight: float = 0.5,
        max_gap: int = 3,
        veto_threshold: float | None = None,
    ) -> None:
        self.id_threshold = float(id_threshold)
        self.veto_threshold = float(veto_threshold) if veto_threshold is not None else -1.0
        self.min_iou = float(min_iou)
        self.iou_weight = float(iou_weight)
        self.max_gap = int(max_gap)  # sampled frames a track may miss before it counts as lost
        self.tracks: list[Track] = []
        self._sample_no = -1

    def _active(self) -> list[Track]:
        return [t for t in self.tracks if self._sample_no - t.last_sample <= self.max_gap]

    def _lost(self) -> list[Track]:
        return [t for t in self.tracks if self._sample_no - t.last_sample > self.max_gap]

    def update(self, faces: list[FaceObs]) -> list[int]:
        """Assign each face to a track; returns the track id per face (same order)."""
        from scipy.optimize import linear_sum_assignment

        self._sample_no += 1
        assigned: dict[int, Track] = {}
        active = self._active()
        if active and faces:
            cost = np.full((len(faces), len(active)), INFEASIBLE)
            for i, f in enumerate(faces):
                for j, t in enumerate(active):
                    iou = box_iou(f.box, t.last_box)
                    sim = cosine(f.embedding, t.embedding)
                    if sim >= self.id_threshold or (iou >= self.min_iou and sim >= self.veto_threshold):
                        cost[i, j] = 1.0 - (self.iou_weight * iou + (1.0 - self.iou_weight) * max(sim, 0.0))
            rows, cols = linear_sum_assignment(cost)
            for i, j in zip(rows, cols):
                if cost[i, j] < INFEASIBLE:
                    assigned[i] = active[j]
        rest = [i for i in range(len(faces)) if i not in assigned]
        lost = self._lost()
        if rest and lost:
            cost = np.full((len(rest), len(lost)), INFEASIBLE)
            for a, i in enumerate(rest):
                for j, t in enumerate(lost):
                    sim = cosine(faces[i].embedding, t.embedding)
                    if sim >= self.id_threshold:
                        cost[a, j] = 1.0 - sim
            rows, cols = linear_sum_assignment(cost)
            for a, j in zip(rows, cols):
                if cost[a, j] < INFEASIBLE:
                    assigned[rest[a]] = lost[j]
        ids = []
        for i, f in enumerate(faces):
            t = assigned.get(i)
            if t is None:
                t = Track(track_id=len(self.tracks))
                self.tracks.append(t)
            t.add(f, self._sample_no)
            ids.append(t.track_id)
        return ids


@dataclass
class TrackScore:
    track_id: int
    score: float
    size: float  # mean face size relative to the largest mean face size among the tracks
    centre: float  # 1 - mean distance of the face centre from the frame centre / half diagonal
    length: float  # observations / sampled frames
    observations: int


def track_scores(tracks: list[Track], *, frame_w: int, frame_h: int, sampled_frames: int,
                 min_observations: int = 1) -> list[TrackScore]:
    """track_score = 0.4 x mean face size + 0.3 x centre closeness + 0.3 x track length.

    Each term is in [0, 1]: size relative to the largest track's mean size, closeness as
    1 - distance / half diagonal, length as the share of sampled frames the track appears in.
    Sorted best first; tracks with fewer than ``min_observations`` observations are left out.
    """
    kept = [t for t in tracks if len(t.observations) >= min_observations]
    if not kept:
        return []
    sizes = {t.track_id: float(np.mean([o.size for o in t.observations])) for t in kept}
    max_size = max(sizes.values()) or 1.0
    cx, cy = frame_w / 2.0, frame_h / 2.0
    half_diag = float(np.hypot(cx, cy)) or 1.0
    out = []
    for t in kept:
        d = np.mean([np.hypot(o.center[0] - cx, o.center[1] - cy) for o in t.observations])
        centre = float(max(0.0, 1.0 - d / half_diag))
        size = sizes[t.track_id] / max_size
        length = min(1.0, len(t.observations) / max(1, sampled_frames))
        score = 0.4 * size + 0.3 * centre + 0.3 * length
        out.append(TrackScore(t.track_id, round(score, 6), round(size, 6), round(centre, 6),
                              round(length, 6), len(t.observations)))
    out.sort(key=lambda s: (-s.score, s.track_id))
    return out
