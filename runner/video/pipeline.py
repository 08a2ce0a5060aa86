"""Video -> per-person identity sets, in numbered steps.

1. Probe and decode the video at a stride (runner.video.decode); unreadable files stop here.
2. Pass 1 over the sampled frames: faces (runner.vision.faces), per-face measures, tracking.
   Where the HOG detector finds nothing (a whole key frame, or the region where a face was),
   dlib's CNN detector looks again at reduced resolution: it finds profiles that HOG misses.
3. Main people: track_score (0.4 size + 0.3 centre + 0.3 length); with references, tracks whose
   identity matches them come first. Other tracks of the same identity that never share a frame
   with the chosen one join it (a person lost at a cut and found again).
4. Per person (a :class:`PersonPlan`): strict/loose gates, a medoid identity prototype from
   strict-gate frames, stable(t) for every frame, box smoothing for the crops.
5. Pass 2 over the frames that can still be saved: crops, general-vision embeddings, novelty,
   the selection policy, and the early-stop rule per person.
6. The result (sets, per-person summaries, timelines); runner.video.export writes it.

The main person is defined over the whole clip (track length is a third of the score), so pass 1
always reads the whole clip; the early stop saves pass 2's crops and general-vision embeddings,
the expensive part when a real DINOv2 runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np

from runner.spec.config import schema_default
from runner.video import buckets as B
from runner.video.decode import VideoDecodeError, VideoInfo, check_complete, iter_frames, probe_video
from runner.video.gates import GATE_VERSION, Gate, make_gates, quality_score
from runner.video.selection import Candidate, Selector, StopRule, conditioning_ratio
from runner.video.stability import l2n, mark_continuity_admissions, medoid, novelty, profile_floor, stability
from runner.video.tracking import FaceObs, FaceTracker, Track, TrackScore, box_iou, cosine, track_scores

def _source_default(name: str) -> Any:
    return schema_default("dataset", "sources", "[]", name)


def _video_default(name: str) -> Any:
    return schema_default("dataset", "sources", "[]", "video_options", name)


@dataclass(frozen=True)
class PipelineOptions:
    """How :func:`build_identity_sets` runs. What a spec sets (``dataset.sources[].people``,
    ``stride`` and ``video_options``, under the names the steps use) defaults to the schema's
    value; smoothing, min_track_observations and stop_window are tunables of the method."""

    people: int = _source_default("people")
    stride: int = _source_default("stride")
    tau: float | None = _video_default("tau")  # None: the face backend's default identity threshold
    max_per_bucket: int = _video_default("max_per_bucket")
    novelty_add: float = _video_default("novelty_add")
    anchors_max: int = _video_default("anchors")
    challenge_max: int = _video_default("challenge")
    pair_max: int = _video_default("pair_max")
    crop_scale: float = _video_default("crop_scale")
    crop_max_side: int = _video_default("crop_max_side")
    smoothing: float = 0.6
    min_track_observations: int = 3
    stop_novelty: float = _video_default("stop_novelty")
    stop_window: int = 20
    early_stop: bool = _video_default("early_stop")
    conditioning_ratio: tuple[int, ...] = tuple(_video_default("conditioning_ratio"))
    adjust_ratio: bool = _video_default("adjust_ratio")
    full_detect_every: int = _video_default("full_detect_every")
    profile_detector: str = _video_default("profile_detector")

    @classmethod
    def of(cls, options: Mapping[str, Any] | PipelineOptions) -> PipelineOptions:
        """The options of a mapping (None means the default for every key but tau); an unknown key
        is a ValueError naming it."""
        if isinstance(options, PipelineOptions):
            return options
        names = [f.name for f in fields(cls)]
        unknown = sorted(k for k in options if k not in names)
        if unknown:
            raise ValueError(f"build_identity_sets: unknown option {unknown[0]!r} (options: {', '.join(names)})")
        given = {k: v for k, v in options.items() if v is not None or k == "tau"}
        if "conditioning_ratio" in given:
            given["conditioning_ratio"] = tuple(given["conditioning_ratio"])
        return cls(**given)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (VideoResult.options, written with the result)."""
        out = asdict(self)
        out["conditioning_ratio"] = list(self.conditioning_ratio)
        return out


#: The options' defaults as plain data.
DEFAULTS: dict[str, Any] = PipelineOptions().as_dict()
#: Sampled frames a track may miss before it ends.
MAX_GAP_SAMPLES = 3

#: Why a person's selection ended (``stop_reason`` in meta.json); ``stop_detail`` says more.
STOP_REASONS = {
    "coverage_satisfied": "the early-stop rule fired: buckets filled, enough anchors, novelty low",
    "video_exhausted": "the whole video was read and the early-stop rule was not met",
    "video_truncated": "the readable part of a truncated video was read (on_truncated: use_partial)",
    "decode_error": "the second pass could not decode a frame that the first pass read",
    "no_candidates": "no frame of the person passed the loose gate with stable identity",
}

#: The CNN (profile) detector searches whole frames at most this size on the long side: it finds
#: faces of about 80 px at its own scale, so a 640x360 frame is searched for faces of 160 px and
#: more, at a quarter of the full-resolution cost.
PROFILE_FRAME_SIDE = 320
#: Around a face the HOG detector lost, the CNN searches the face box grown by this much of its
#: size on every side (HOG's regions grow by a whole face size: the CNN costs ~10x more per pixel),
#: scaled so that a face of the lost one's size is PROFILE_FACE_PX (never enlarged).
PROFILE_ROI_MARGIN = 0.5
PROFILE_FACE_PX = 90
#: The smallest face the CNN finds without upsampling (its 80 px detection window): a lost face
#: smaller than this is not looked for again (upsampling would cost 4x; a crowd of small faces
#: HOG loses would cost a CNN run each).
PROFILE_MIN_FACE_PX = 80
#: At most this many faceless key frames pass between two whole-frame CNN searches.
PROFILE_MAX_SKIP = 3


@dataclass
class PersonPlan:
    """Step 4's decisions for one person, filled in by step 5 (selection)."""

    person_id: int
    members: list[Track]
    score: TrackScore
    reference_similarity: float | None
    prototype_type: str  # medoid_strict | medoid_loose | medoid_all
    prototype_frames: int  # how many frames the medoid was chosen among
    prototype_frame_idx: int  # the frame whose embedding is the prototype
    observations: list[FaceObs]
    smoothed: dict[int, tuple]  # frame -> smoothed face box (crops are centred on it)
    strict_ids: set[int]  # id() of the observations that passed the strict gate
    timeline: list[dict[str, Any]]  # one entry per observation: stable, gates, novelty, action
    candidates: list[tuple[FaceObs, float]]  # (observation, stable) that may be saved
    gate_counts: dict[str, int]
    selector: Selector
    stopped_at: Candidate | None = None  # the candidate after which the early stop fired
    _by_frame: dict[int, dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_frame = {e["frame_idx"]: e for e in self.timeline}

    def timeline_entry(self, frame_idx: int) -> dict[str, Any]:
        return self._by_frame[frame_idx]


@dataclass
class PersonResult:
    person_id: int
    track_ids: list[int]
    track_score: TrackScore
    prototype_type: str
    prototype_frames: int
    prototype_frame_idx: int
    tau: float
    reference_similarity: float | None
    anchors: list[Candidate]
    coverage: list[Candidate]
    challenge: list[Candidate]
    stop_reason: str  # a key of STOP_REASONS
    stop_detail: str
    filled: dict[str, int]
    timeline: list[dict[str, Any]]
    gate_counts: dict[str, int]
    actions: dict[str, int]
    observations: int
    candidates: int

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "coverage_satisfied"


@dataclass
class VideoResult:
    info: VideoInfo | None
    persons: list[PersonResult] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    empty_reason: str = ""
    quarantine: dict[str, str] | None = None  # {"reason", "detail"} when the file is not usable
    truncated: str = ""
    sampled_frames: int = 0
    decoded_frames: int = 0
    tracks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    detections: dict[str, float] = field(default_factory=dict)  # faces per detector, CNN runs and time
    pass2_error: str = ""


def _smooth_boxes(obs: Sequence[FaceObs], alpha: float, max_gap_frames: int) -> dict[int, tuple]:
    """Exponential smoothing of the face box along a person's frames (reset at gaps and cuts)."""
    out: dict[int, tuple] = {}
    prev = None
    prev_idx = None
    for o in obs:
        b = np.asarray(o.box, dtype=np.float64)
        if prev is None or o.frame_idx - prev_idx > max_gap_frames or box_iou(prev, b) < 0.2:
            s = b
        else:
            s = alpha * b + (1.0 - alpha) * prev
        out[o.frame_idx] = tuple(float(v) for v in s)
        prev, prev_idx = s, o.frame_idx
    return out


def crop_box_for(box: Sequence[float], frame_w: int, frame_h: int, scale: float) -> tuple[int, int, int, int]:
    """A square around the (smoothed) face box, ``scale`` times its size, kept inside the frame."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * scale
    side = min(side, frame_w, frame_h)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = min(max(0.0, cx - side / 2.0), frame_w - side)
    top = min(max(0.0, cy - side / 2.0), frame_h - side)
    return int(round(left)), int(round(top)), int(round(left + side)), int(round(top + side))


def _crop(rgb: np.ndarray, cb: tuple[int, int, int, int], max_side: int) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = cb
    crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    side = max(crop.shape[:2])
    if side > max_side:
        s = max_side / side
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                          interpolation=cv2.INTER_AREA)
    return crop


def _face_obs(frame_idx: int, ts: float, rgb: np.ndarray, face: Any) -> FaceObs:
    from runner.video.measures import face_measures

    pose = face.pose
    return FaceObs(
        frame_idx=frame_idx,
        timestamp_ms=ts,
        box=tuple(float(v) for v in face.box),
        score=float(face.score),
        embedding=np.asarray(face.embedding, dtype=np.float32),
        yaw=float(pose.yaw) if pose is not None and np.isfinite(pose.yaw) else None,
        pitch=float(pose.pitch) if pose is not None and np.isfinite(pose.pitch) else None,
        roll=float(pose.roll) if pose is not None and np.isfinite(pose.roll) else None,
        landmarks=getattr(face, "landmarks", None),
        measures=face_measures(rgb, face),
        detector=str((getattr(face, "extra", None) or {}).get("detector", "")),
    )


def _side(box: Sequence[float]) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


def _region(box: Sequence[float], margin: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    """``box`` grown by ``margin`` x its size on every side, inside the frame (None if tiny)."""
    x0, y0, x1, y1 = box
    s = max(x1 - x0, y1 - y0)
    rx0, ry0 = max(0, int(x0 - margin * s)), max(0, int(y0 - margin * s))
    rx1, ry1 = min(w, int(np.ceil(x1 + margin * s))), min(h, int(np.ceil(y1 + margin * s)))
    if rx1 - rx0 < 16 or ry1 - ry0 < 16:
        return None
    return rx0, ry0, rx1, ry1


def _shift_faces(faces: list[Any], rx0: int, ry0: int, w: int, h: int) -> list[Any]:
    """Faces found in a region, moved to frame coordinates, pose recomputed for the frame."""
    from runner.vision.faces import pose_from_landmarks

    off = np.array([rx0, ry0], dtype=np.float32)
    for f in faces:
        f.box = (f.box[0] + rx0, f.box[1] + ry0, f.box[2] + rx0, f.box[3] + ry0)
        f.keypoints = (np.asarray(f.keypoints) + off).astype(np.float32)
        if f.landmarks is not None:
            f.landmarks = (np.asarray(f.landmarks) + off).astype(np.float32)
        pts = f.landmarks if f.landmarks is not None else f.keypoints
        f.pose = pose_from_landmarks(pts, (w, h))
    return faces


class FrameDetector:
    """Faces of one frame for pass 1: HOG (the backend's own detector) first, and the CNN
    (``backend.analyze_cnn``, dlib only) where HOG found nothing: on a whole key frame without a
    face (at most :data:`PROFILE_FRAME_SIDE` px), and in the region of a face that HOG lost (scaled
    so the face is about :data:`PROFILE_FACE_PX` px). Counts what each detector found."""

    def __init__(self, *, roi_margin: float = 1.0, profile: bool = True) -> None:
        self.roi_margin = roi_margin
        self.profile = profile
        self._misses = 0  # whole-frame CNN searches in a row that found nothing
        self._skip = 0  # faceless key frames left to pass before the next whole-frame CNN search
        self.counts: dict[str, float] = {"faces": 0, "cnn_faces": 0, "cnn_runs": 0, "cnn_s": 0.0}
        self._lock = threading.Lock()

    def _cnn(self, backend: Any, rgb: np.ndarray, scale: float) -> list[Any]:
        if not (self.profile and hasattr(backend, "analyze_cnn")):
            return []
        t = time.perf_counter()
        faces = backend.analyze_cnn(rgb, scale=min(1.0, scale))
        self._count(cnn_runs=1, cnn_s=time.perf_counter() - t)
        return faces

    def _whole_frame_cnn(self, backend: Any, rgb: np.ndarray) -> list[Any]:
        """The CNN on a faceless key frame, backing off while it keeps finding nothing: after n
        fruitless searches in a row the next min(2^n - 1, PROFILE_MAX_SKIP) faceless key frames
        are passed (a clip without faces costs a quarter of a search per key frame; a profile
        that appears is found within PROFILE_MAX_SKIP + 1 key frames)."""
        if self._skip:
            self._skip -= 1
            return []
        faces = self._cnn(backend, rgb, PROFILE_FRAME_SIDE / max(rgb.shape[:2]))
        self._misses = 0 if faces else self._misses + 1
        self._skip = min(2 ** self._misses - 1, PROFILE_MAX_SKIP)
        return faces

    def _in_regions(self, backend: Any, rgb: np.ndarray, boxes: Sequence[Sequence[float]],
                    hog: bool = True) -> list[Any]:
        """HOG around each box (unless ``hog`` is False: it already failed there); the CNN around
        the largest box where HOG found nothing, if that face is at least PROFILE_MIN_FACE_PX (one
        CNN run per frame at most: the main person is usually the largest face)."""
        h, w = rgb.shape[:2]
        regions = [(box, r) for box in boxes if (r := _region(box, self.roi_margin, w, h)) is not None]
        rois = [np.ascontiguousarray(rgb[r[1]:r[3], r[0]:r[2]]) for _, r in regions]
        per_region = [backend.analyze(roi) if hog else [] for roi in rois]
        lost = [i for i, faces in enumerate(per_region) if not faces and _side(regions[i][0]) >= PROFILE_MIN_FACE_PX]
        if lost:
            i = max(lost, key=lambda j: _side(regions[j][0]))
            box = regions[i][0]
            r = _region(box, PROFILE_ROI_MARGIN, w, h) or regions[i][1]
            roi = np.ascontiguousarray(rgb[r[1]:r[3], r[0]:r[2]])
            regions[i] = (box, r)
            per_region[i] = self._cnn(backend, roi, PROFILE_FACE_PX / max(1.0, _side(box)))
        found: list[Any] = []
        for (_, r), faces in zip(regions, per_region):
            for f in _shift_faces(faces, r[0], r[1], w, h):
                if all(box_iou(f.box, g.box) < 0.5 for g in found):  # regions can overlap
                    found.append(f)
        return found

    def faces(self, backend: Any, rgb: np.ndarray, boxes: Sequence[Sequence[float]], key: bool) -> list[Any]:
        """A key frame is searched whole (``boxes``: the previous key frame's faces, looked for
        again where HOG lost them); another frame only around ``boxes`` (its key frame's faces)."""
        if not key:
            faces = self._in_regions(backend, rgb, boxes)
        else:
            faces = backend.analyze(rgb)
            if faces:
                self._misses = self._skip = 0
            else:
                faces = self._whole_frame_cnn(backend, rgb)
            lost = [b for b in boxes if not any(box_iou(b, f.box) > 0 for f in faces)]
            faces += [f for f in self._in_regions(backend, rgb, lost, hog=False)
                      if all(box_iou(f.box, g.box) < 0.5 for g in faces)]
        self._count(faces=len(faces), cnn_faces=sum(1 for f in faces if f.extra.get("detector") == "cnn"))
        return faces

    def _count(self, **add: float) -> None:
        with self._lock:  # frames between key frames run in parallel threads
            for k, v in add.items():
                self.counts[k] += v


def _analyze_frames(frames: Any, backends: Sequence[Any], *, full_every: int = 1, roi_margin: float = 1.0,
                    detector: FrameDetector | None = None) -> Any:
    """Yield (frame, [FaceObs]) in frame order, analyzing one frame per backend at a time.

    Every ``full_every``-th sampled frame (a key frame) is searched whole; the frames between
    are searched only around the faces of the key frame before them, which costs a fraction of a
    full-frame detection (see :class:`FrameDetector`). A face that enters the picture is found at
    the next key frame.
    """
    import queue
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    full_every = max(1, int(full_every))
    detector = detector or FrameDetector(roi_margin=roi_margin)

    def one(backend: Any, frame: Any, boxes: list, key: bool) -> tuple[Any, list[FaceObs]]:
        faces = detector.faces(backend, frame.rgb, boxes, key)
        obs = [_face_obs(frame.index, frame.timestamp_ms, frame.rgb, f) for f in faces]
        frame.rgb = None  # pass 1 keeps no pixels
        return frame, obs

    workers = len(backends)
    if workers <= 1:
        key_boxes: list = []
        for n, frame in enumerate(frames):
            is_key = n % full_every == 0
            fr, obs = one(backends[0], frame, key_boxes, is_key)
            if is_key:
                key_boxes = [o.box for o in obs]
            yield fr, obs
        return

    pool_backends: queue.Queue = queue.Queue()
    for b in backends:
        pool_backends.put(b)

    def task(frame: Any, key: Future | None, is_key: bool) -> tuple[Any, list[FaceObs]]:
        # Waiting happens before a backend is taken; the key frame waited for was submitted
        # earlier, so it is already running or done (the pool runs tasks in submission order).
        boxes = [] if key is None else [o.box for o in key.result()[1]]
        backend = pool_backends.get()
        try:
            return one(backend, frame, boxes, is_key)
        finally:
            pool_backends.put(backend)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="video-faces") as ex:
        pending: deque = deque()
        key_future: Future | None = None
        for n, frame in enumerate(frames):
            if n % full_every == 0:
                key_future = ex.submit(task, frame, key_future, True)
                pending.append(key_future)
            else:
                pending.append(ex.submit(task, frame, key_future, False))
            while len(pending) >= workers * 2 + full_every:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# Similarity under which two faces are clearly different people, per backend: dlib's published
# same-person rule (Euclidean distance 0.6 on its descriptors, about cosine 0.82 once normalized);
# ArcFace embeddings of different people sit near 0.
VETO_THRESHOLDS = {"dlib": 0.82, "insightface": 0.15}


def veto_threshold(face_backend: Any) -> float:
    name = getattr(face_backend, "name", "")
    if name in VETO_THRESHOLDS:
        return VETO_THRESHOLDS[name]
    return 0.5 * float(getattr(face_backend, "default_identity_threshold", 0.0))


def _score01(o: FaceObs, backend_name: str) -> float:
    """Detector score on [0, 1]: insightface/CNN give a confidence; HOG an SVM margin (~0-3)."""
    if backend_name == "dlib" and o.detector != "cnn":
        return float(np.clip(o.score / 1.5, 0.0, 1.0))
    return float(np.clip(o.score, 0.0, 1.0))


def group_persons(tracks: list[Track], ranked: list[Any], people: int, id_threshold: float,
                  ref_embedding: np.ndarray | None) -> list[tuple[list[Track], Any, float | None]]:
    """Pick ``people`` persons: (their tracks, the primary track's score, reference similarity)."""
    by_id = {t.track_id: t for t in tracks}
    order = list(ranked)
    ref_sims: dict[int, float] = {}
    if ref_embedding is not None:
        for s in order:
            ref_sims[s.track_id] = cosine(by_id[s.track_id].embedding, ref_embedding)
        # Tracks that match the references first (stable sort keeps track_score order within).
        order.sort(key=lambda s: 0 if ref_sims[s.track_id] >= id_threshold else 1)
    used: set[int] = set()
    persons: list[tuple[list[Track], Any, float | None]] = []
    for s in order:
        if len(persons) >= people:
            break
        if s.track_id in used:
            continue
        primary = by_id[s.track_id]
        # A second person must be someone else.
        if any(cosine(primary.embedding, p[0][0].embedding) >= id_threshold for p in persons):
            used.add(s.track_id)
            continue
        members = [primary]
        frames = {o.frame_idx for o in primary.observations}
        for other in sorted(tracks, key=lambda t: -len(t.observations)):
            if other.track_id in used or other is primary or other.track_id == s.track_id:
                continue
            of = {o.frame_idx for o in other.observations}
            if of & frames:
                continue
            if cosine(other.embedding, primary.embedding) >= id_threshold:
                members.append(other)
                frames |= of
        for m in members:
            used.add(m.track_id)
        persons.append((members, s, ref_sims.get(s.track_id)))
    return persons


# ------------------------------------------------------------------------------------------- steps


def resolve_options(options: Mapping[str, Any] | PipelineOptions) -> PipelineOptions:
    """``options`` over the defaults (see :meth:`PipelineOptions.of`)."""
    return PipelineOptions.of(options)


def _unusable(result: VideoResult, reason: str, detail: str, empty_reason: str) -> None:
    """Mark the video as not usable (quarantined with a reason); returns None for _pass1."""
    result.quarantine = {"reason": reason, "detail": detail}
    result.empty_reason = empty_reason


def _pass1(video_path: str, info: VideoInfo, opts: PipelineOptions, backends: Sequence[Any],
           tracker: FaceTracker, result: VideoResult, progress: Any, on_truncated: str) -> int | None:
    """Step 2: detect, measure, track every sampled frame; returns the number of faces seen, or
    None when the video is not usable (``result`` then says why)."""
    stats: dict[str, Any] = {}
    n_faces = 0
    stride = opts.stride
    total_est = -(-info.frame_count // stride) if info.frame_count else None
    detector = FrameDetector(profile=opts.profile_detector == "cnn")
    t0 = time.perf_counter()
    frames_iter = iter_frames(video_path, stride=stride, decoder=info.decoder, stats=stats)
    try:
        for _frame, obs in _analyze_frames(frames_iter, backends, full_every=opts.full_detect_every,
                                           detector=detector):
            tracker.update(obs)
            n_faces += len(obs)
            result.sampled_frames += 1
            if progress:
                progress("detect", result.sampled_frames, total_est)
    except VideoDecodeError as exc:
        if exc.reason != "truncated" or result.sampled_frames == 0 or on_truncated == "quarantine":
            return _unusable(result, exc.reason, exc.detail, f"video not usable ({exc.reason}): {exc.detail}")
        result.truncated = exc.detail
    result.decoded_frames = int(stats.get("decoded", 0))
    result.timings["pass1_s"] = round(time.perf_counter() - t0, 3)
    result.detections = {k: round(v, 3) for k, v in detector.counts.items()}
    if not result.truncated:
        why = check_complete(info, result.decoded_frames)
        if why and on_truncated == "quarantine":
            return _unusable(result, "truncated", why, f"video not usable (truncated): {why}")
        result.truncated = why or ""
    if result.truncated:
        result.notes.append(f"truncated video, using the frames that decoded: {result.truncated}")
    if result.sampled_frames == 0:
        return _unusable(result, "no_frames", "no frame decoded", "no frame could be decoded")
    return n_faces


def _main_people(tracker: FaceTracker, info: VideoInfo, opts: PipelineOptions, tau: float, n_faces: int,
                 reference_embeddings: Sequence[np.ndarray], result: VideoResult) -> list[tuple]:
    """Step 3: rank the tracks and pick the people (empty: ``result.empty_reason`` says why)."""
    sampled, stride = result.sampled_frames, opts.stride
    ranked = track_scores(tracker.tracks, frame_w=info.width, frame_h=info.height, sampled_frames=sampled,
                          min_observations=opts.min_track_observations)
    result.tracks = [_track_record(s, tracker.tracks[s.track_id]) for s in ranked]
    if not ranked:
        if n_faces == 0:
            result.empty_reason = f"no person found: no face in {sampled} sampled frames (every {stride}th frame)"
        else:
            result.empty_reason = (f"no person found: {n_faces} face detection(s) in {sampled} sampled frames "
                                   f"(every {stride}th frame), but no face track lasted "
                                   f"{opts.min_track_observations} sampled frames; isolated detections are "
                                   "treated as false positives")
        return []
    ref_emb = l2n(np.mean([l2n(e) for e in reference_embeddings], axis=0)) if len(reference_embeddings) else None
    groups = group_persons(tracker.tracks, ranked, opts.people, tau, ref_emb)
    if ref_emb is not None and groups and groups[0][2] is not None and groups[0][2] < tau:
        result.notes.append(f"no track matches the references (best similarity {groups[0][2]:.3f} < {tau}); "
                            "the main person was chosen by track_score alone")
    if len(groups) < opts.people:
        result.notes.append(f"asked for {opts.people} people, found {len(groups)} distinct person(s)")
    return groups


def _track_record(score: TrackScore, track: Track) -> dict[str, Any]:
    """A track in summary.json: its score terms, first and last frame, faces per detector."""
    detectors: dict[str, int] = {}
    for o in track.observations:
        detectors[o.detector or "backend"] = detectors.get(o.detector or "backend", 0) + 1
    return {**vars(score), "first_frame": track.observations[0].frame_idx,
            "last_frame": track.observations[-1].frame_idx, "detectors": detectors}


def _prototype(obs: list[FaceObs], strict: list[FaceObs],
               loose: list[FaceObs]) -> tuple[np.ndarray, str, list[FaceObs], int]:
    """The medoid of the strict-gate frames, else of the loose-gate ones, else of all frames."""
    kind, pool = next((k, p) for k, p in (("medoid_strict", strict), ("medoid_loose", loose), ("medoid_all", obs)) if p)
    proto, i = medoid([o.embedding for o in pool])
    return proto, kind, pool, pool[i].frame_idx


def _timeline_entry(o: FaceObs, st: float, strict: bool, loose_failures: list[str], tau: float) -> dict[str, Any]:
    entry = {"frame_idx": o.frame_idx, "t_s": round(o.timestamp_ms / 1000.0, 3), "stable": round(st, 4),
             "strict": strict, "loose": not loose_failures, "detector": o.detector or "backend",
             "novelty": None, "action": "", "identity": "embedding" if o.admitted is None else "track_continuity",
             "box": [round(float(v), 1) for v in o.box]}  # face box, frame pixels (runner/video/clips.py)
    if loose_failures:
        entry["action"] = "gate:" + "; ".join(loose_failures)
    elif st < tau and o.admitted is None:
        entry["action"] = f"unstable ({st:.3f} < tau {tau})"
    elif o.yaw is None or o.pitch is None:
        entry["action"] = "no pose"
    return entry


def _mark_blinks(obs: list[FaceObs]) -> None:
    """Frames whose eyes look shut against the person's own open eyes (runner.vision.measures
    .blinks_in_track) read ``eyes_closed`` "both" where the landmarks alone said "none"."""
    from runner.vision.measures import blinks_in_track

    for o, shut in zip(obs, blinks_in_track([o.measures.get("eye_appearance") for o in obs])):
        if shut and o.measures.get("eyes_closed") == "none":
            o.measures["eyes_closed"] = "both"


def plan_person(pid: int, members: list[Track], score: TrackScore, ref_sim: float | None, *, gates: tuple[Gate, Gate],
                tau: float, backend_name: str, opts: PipelineOptions, max_gap_frames: int, fps: float) -> PersonPlan:
    """Step 4 for one person: gates, prototype, stability per frame, smoothed boxes."""
    strict_gate, loose_gate = gates
    obs = sorted((o for t in members for o in t.observations), key=lambda o: o.frame_idx)
    _mark_blinks(obs)
    strict = [o for o in obs if strict_gate.passes(o.size, _score01(o, backend_name), o.measures)]
    loose_fail = {id(o): loose_gate.failures(o.size, _score01(o, backend_name), o.measures) for o in obs}
    loose = [o for o in obs if not loose_fail[id(o)]]
    proto, proto_type, pool, proto_frame = _prototype(obs, strict, loose)
    strict_ids = {id(o) for o in strict}
    admitted = mark_continuity_admissions(members, proto, tau=tau, floor=profile_floor(backend_name),
                                          max_gap_frames=max_gap_frames)
    timeline, cands = [], []
    for o in obs:
        st = stability(o.embedding, proto)
        entry = _timeline_entry(o, st, id(o) in strict_ids, loose_fail[id(o)], tau)
        if not entry["action"]:
            cands.append((o, st))
        timeline.append(entry)
    half_second = max(1, int(round(fps / 2)))  # anchors and challenge frames are spaced by this
    selector = Selector(max_per_bucket=opts.max_per_bucket, novelty_add=opts.novelty_add,
                        anchors_max=opts.anchors_max, anchor_min_gap=half_second,
                        challenge_max=opts.challenge_max, challenge_min_gap=half_second,
                        stop=StopRule(novelty_window=opts.stop_window, novelty_below=opts.stop_novelty))
    return PersonPlan(
        person_id=pid, members=members, score=score, reference_similarity=ref_sim, prototype_type=proto_type,
        prototype_frames=len(pool), prototype_frame_idx=proto_frame, observations=obs,
        smoothed=_smooth_boxes(obs, opts.smoothing, max_gap_frames), strict_ids=strict_ids,
        timeline=timeline, candidates=cands, selector=selector,
        gate_counts={"observations": len(obs), "strict": len(strict), "loose": len(loose),
                     "stable_candidates": len(cands), "continuity_admitted": admitted})


def _offer(plan: PersonPlan, o: FaceObs, st: float, crop: np.ndarray, g: np.ndarray, crop_box: tuple,
           backend_name: str, early_stop: bool) -> None:
    """One candidate of one person through the selection policy (step 5)."""
    sel = plan.selector
    c = Candidate(person=plan.person_id, frame_idx=o.frame_idx, timestamp_ms=o.timestamp_ms,
                  bins=B.bins_for(o.yaw, o.pitch, o.measures),
                  quality=quality_score(o.size, _score01(o, backend_name), o.measures),
                  stable=st, strict=id(o) in plan.strict_ids, extreme_pose=B.extreme_pose(o.yaw, o.pitch), general=g,
                  crop=crop, face_bbox=o.box, crop_box=crop_box, yaw=o.yaw, pitch=o.pitch, measures=o.measures,
                  detector=o.detector, admitted=o.admitted)
    c.novelty = novelty(g, sel.saved_embeddings()) if sel.saved() else 1.0
    action = sel.offer(c)
    e = plan.timeline_entry(o.frame_idx)
    e["novelty"] = round(c.novelty, 4)
    e["action"] = action
    if early_stop and sel.should_stop():
        plan.stopped_at = c


def _pass2(video_path: str, info: VideoInfo, plans: list[PersonPlan], opts: PipelineOptions, general_embedder: Any,
           backend_name: str, result: VideoResult, progress: Any) -> None:
    """Step 5: decode the frames that can still be saved; crops, novelty, selection, pairs."""
    by_frame: dict[int, list[tuple[PersonPlan, FaceObs, float]]] = {}
    for p in plans:
        for o, st in p.candidates:
            by_frame.setdefault(o.frame_idx, []).append((p, o, st))
    pair_wanted = len(plans) == 2 and opts.pair_max > 0
    t0, done = time.perf_counter(), 0
    if by_frame:
        try:
            for frame in iter_frames(video_path, decoder=info.decoder, wanted=set(by_frame)):
                everyone = by_frame.get(frame.index, [])
                entries = [e for e in everyone if e[0].stopped_at is None]
                want_pair = pair_wanted and len({id(e[0]) for e in everyone}) == 2
                if not entries and not want_pair:
                    if all(p.stopped_at is not None for p in plans) and not pair_wanted:
                        break
                    continue
                boxes = [crop_box_for(p.smoothed[o.frame_idx], info.width, info.height, opts.crop_scale)
                         for p, o, _ in everyone]
                live = [(e, b) for e, b in zip(everyone, boxes) if e[0].stopped_at is None]
                crops = [_crop(frame.rgb, b, opts.crop_max_side) for _, b in live]
                gen = l2n(general_embedder.embed(crops)) if crops else []
                for ((p, o, st), b), crop, g in zip(live, crops, gen):
                    _offer(p, o, st, crop, g, b, backend_name, opts.early_stop)
                if want_pair:
                    result.pairs.append(_pair_candidate(frame, [(p.person_id, o, st) for p, o, st in everyone], boxes,
                                                        opts, backend_name, general_embedder))
                    _keep_pairs(result.pairs, opts.pair_max, opts.novelty_add)
                done += 1
                if progress:
                    progress("select", done, len(by_frame))
        except VideoDecodeError as exc:  # pass 1 read these frames; a failure now is worth a note
            result.pass2_error = exc.detail
            result.notes.append(f"second pass stopped early: {exc.detail}")
    result.timings["pass2_s"] = round(time.perf_counter() - t0, 3)


def _stop(plan: PersonPlan, result: VideoResult, tau: float) -> tuple[str, str]:
    """(stop_reason, stop_detail) of one person after step 5."""
    sel = plan.selector
    f = sel.filled()
    if plan.stopped_at is not None:
        c = plan.stopped_at
        return "coverage_satisfied", (
            f"coverage complete at frame {c.frame_idx} (t={c.timestamp_ms / 1000:.2f}s): yaw {f['yaw']}/7, "
            f"pitch {f['pitch']}/5, expression {f['expression']}/4, anchors {len(sel.anchors())}, mean "
            f"novelty of the last {sel.stop.novelty_window} candidates < {sel.stop.novelty_below}")
    if not plan.candidates:
        g = plan.gate_counts
        return "no_candidates", ("no frame of this person passed the loose gate with stable identity "
                                 f"({g['loose']} of {g['observations']} passed the gate, tau {tau})")
    missing = sel.missing()
    rule = ("early-stop rule not met: " + "; ".join(missing)) if missing else "early-stop rule met at the end"
    if result.pass2_error:
        return "decode_error", f"second pass stopped early ({result.pass2_error}); {rule}"
    if result.truncated:
        return "video_truncated", f"end of the readable part of a truncated video; {rule}"
    return "video_exhausted", f"end of video; {rule}"


def person_result(plan: PersonPlan, result: VideoResult, tau: float) -> PersonResult:
    """Step 6 for one person."""
    sel = plan.selector
    reason, detail = _stop(plan, result, tau)
    return PersonResult(
        person_id=plan.person_id, track_ids=[t.track_id for t in plan.members], track_score=plan.score,
        prototype_type=plan.prototype_type, prototype_frames=plan.prototype_frames,
        prototype_frame_idx=plan.prototype_frame_idx, tau=tau, reference_similarity=plan.reference_similarity,
        anchors=sel.anchors(), coverage=sel.coverage(), challenge=sel.challenge(), stop_reason=reason,
        stop_detail=detail, filled=sel.filled(), timeline=plan.timeline, gate_counts=plan.gate_counts,
        actions=dict(sel.actions), observations=len(plan.observations), candidates=len(plan.candidates))


def build_identity_sets(
    video_path: str,
    *,
    face_backend: Any,
    general_embedder: Any,
    options: Mapping[str, Any] | PipelineOptions,
    reference_embeddings: Sequence[np.ndarray] = (),
    progress: Callable[[str, int, int | None], None] | None = None,
    on_truncated: str = "quarantine",
    extra_backends: Sequence[Any] = (),
) -> VideoResult:
    """Run steps 1-6 on one video (see the module docstring).

    ``face_backend`` analyzes frames; ``extra_backends`` (more instances of the same backend:
    dlib's networks are not safe to share between threads) analyze frames in parallel threads,
    one instance per thread, while tracking consumes the results in frame order.
    """
    opts = resolve_options(options)
    t_start = time.perf_counter()
    # 1. probe
    try:
        info = probe_video(video_path)
    except VideoDecodeError as exc:
        return VideoResult(None, quarantine={"reason": exc.reason, "detail": exc.detail},
                           empty_reason=f"not a readable video: {exc.detail}", options=opts.as_dict())
    result = VideoResult(info, options=opts.as_dict())  # early returns keep what was timed
    tau = float(opts.tau) if opts.tau is not None else float(face_backend.default_identity_threshold)
    # 2. pass 1: detect, measure, track
    tracker = FaceTracker(id_threshold=tau, max_gap=MAX_GAP_SAMPLES,
                          veto_threshold=veto_threshold(face_backend))
    n_faces = _pass1(video_path, info, opts, [face_backend, *extra_backends], tracker, result, progress, on_truncated)
    if n_faces is None:
        return result
    # 3. main people
    groups = _main_people(tracker, info, opts, tau, n_faces, reference_embeddings, result)
    # 4. per person: gates, prototype, stability, smoothed boxes
    gates = make_gates(opts.as_dict())
    plans = [plan_person(pid, members, score, ref_sim, gates=gates, tau=tau, backend_name=face_backend.name, opts=opts,
                         max_gap_frames=opts.stride * (tracker.max_gap + 1), fps=info.fps or 25.0)
             for pid, (members, score, ref_sim) in enumerate(groups)]
    # 5. pass 2: crops, general-vision embeddings, novelty, selection
    if plans:
        _pass2(video_path, info, plans, opts, general_embedder, face_backend.name, result, progress)
    # 6. result
    result.persons = [person_result(p, result, tau) for p in plans]
    result.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    return result


def _pair_candidate(frame: Any, entries: list, boxes: list, opts: PipelineOptions,
                    backend_name: str, general_embedder: Any) -> dict[str, Any]:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    cb = (x0, y0, x1, y1)
    crop = _crop(frame.rgb, cb, opts.crop_max_side * 2)
    q = min(quality_score(o.size, _score01(o, backend_name), o.measures) for _, o, _ in entries)
    g = l2n(general_embedder.embed([crop]))[0]
    return {"frame_idx": frame.index, "timestamp_ms": frame.timestamp_ms, "crop": crop, "crop_box": cb,
            "quality": q, "general": g,
            "persons": [{"person_id": pid, "face_bbox": [round(v, 1) for v in o.box], "stable": round(st, 4)}
                        for pid, o, st in entries]}


def _keep_pairs(pairs: list[dict[str, Any]], pair_max: int, novelty_add: float) -> None:
    """Keep at most ``pair_max`` pair frames: drop a near-repeat of a better one, else the worst."""
    new = pairs[-1]
    for i, p in enumerate(pairs[:-1]):
        if 1.0 - float(new["general"] @ p["general"]) < novelty_add:
            if new["quality"] > p["quality"]:
                pairs[i] = new
            pairs.pop()
            return
    if len(pairs) > pair_max:
        worst = min(range(len(pairs)), key=lambda i: pairs[i]["quality"])
        pairs.pop(worst)


def filled_strings(filled: dict[str, int]) -> dict[str, str]:
    """Buckets filled per axis as "filled/total" strings ("6/7")."""
    return {axis: f"{filled.get(axis, 0)}/{len(bins)}" for axis, bins in B.AXES.items()}


def person_meta(p: PersonResult, *, conditioning: dict[str, Any]) -> dict[str, Any]:
    """The per-person meta.json (docs/video-identity.md lists every field)."""
    s = p.track_score
    return {
        "person_id": p.person_id,
        "track_ids": p.track_ids,
        "track_score": s.score,
        "track_score_components": {"size": s.size, "centre": s.centre, "length": s.length,
                                   "weights": {"size": 0.4, "centre": 0.3, "length": 0.3}},
        "prototype_type": p.prototype_type,
        "prototype_frames": p.prototype_frames,
        "prototype_frame_idx": p.prototype_frame_idx,
        "tau": p.tau,
        "reference_similarity": None if p.reference_similarity is None else round(p.reference_similarity, 4),
        "anchor_count": len(p.anchors),
        "coverage_count": len(p.coverage),
        "challenge_count": len(p.challenge),
        "coverage_buckets_filled": filled_strings(p.filled),
        "total_saved": len({c.frame_idx for c in [*p.anchors, *p.coverage, *p.challenge]}),
        "stop_reason": p.stop_reason,
        "stop_detail": p.stop_detail,
        "stopped_early": p.stopped_early,
        "observations": p.observations,
        "candidates": p.candidates,
        "gate_counts": p.gate_counts,
        "actions": p.actions,
        "conditioning_ratio": conditioning,
        "gate_version": GATE_VERSION,
    }


def conditioning_for(p: PersonResult, opts: PipelineOptions | Mapping[str, Any]) -> dict[str, Any]:
    """The person's conditioning ratio (``opts``: the options, or VideoResult.options)."""
    opts = PipelineOptions.of(opts)
    return conditioning_ratio(opts.conditioning_ratio, anchors=len(p.anchors), challenge=len(p.challenge),
                              yaw_filled=p.filled["yaw"], adjust=opts.adjust_ratio)
