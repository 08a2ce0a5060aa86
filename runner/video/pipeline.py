"""Video -> per-person identity sets, in numbered steps.

1. Probe and decode the video at a stride (runner.video.decode); unreadable files stop here.
2. Pass 1 over the sampled frames: faces (runner.vision.faces), per-face measures, tracking.
3. Main people: track_score (0.4 size + 0.3 centre + 0.3 length); with references, tracks whose
   identity matches them come first. Other tracks of the same identity that never share a frame
   with the chosen one join it (a person lost at a cut and found again).
4. Per person: strict/loose gates, a medoid identity prototype from strict-gate frames,
   stable(t) for every frame, box smoothing for the crops.
5. Pass 2 over the frames that can still be saved: crops, general-vision embeddings, novelty,
   the selection policy, and the early-stop rule per person.
6. The result (sets, per-person summaries, timelines); runner.video.export writes it.

The main person is defined over the whole clip (track length is a third of the score), so pass 1
always reads the whole clip; the early stop saves pass 2's crops and general-vision embeddings,
the expensive part when a real DINOv2 runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from runner.video import buckets as B
from runner.video.decode import VideoDecodeError, VideoInfo, check_complete, iter_frames, probe_video
from runner.video.gates import GATE_VERSION, make_gates, quality_score
from runner.video.selection import Candidate, Selector, StopRule, conditioning_ratio
from runner.video.stability import l2n, medoid, novelty, stability
from runner.video.tracking import FaceObs, FaceTracker, Track, box_iou, cosine, track_scores

DEFAULTS: dict[str, Any] = {
    "people": 1,
    "stride": 5,
    "tau": None,  # None: the face backend's default identity threshold
    "max_per_bucket": 2,
    "novelty_add": 0.15,
    "anchors_max": 5,
    "challenge_max": 8,
    "pair_max": 10,
    "crop_scale": 2.2,
    "crop_max_side": 512,
    "smoothing": 0.6,
    "min_track_observations": 3,
    "stop_novelty": 0.08,
    "stop_window": 20,
    "early_stop": True,
    "conditioning_ratio": [20, 70, 10],
    "adjust_ratio": True,
    "full_detect_every": 3,
}


@dataclass
class PersonResult:
    person_id: int
    track_ids: list[int]
    track_score: dict[str, float]
    prototype_type: str
    tau: float
    reference_similarity: float | None
    anchors: list[Candidate]
    coverage: list[Candidate]
    challenge: list[Candidate]
    stop_reason: str
    stopped_early: bool
    filled: dict[str, int]
    timeline: list[dict[str, Any]]
    gate_counts: dict[str, int]
    actions: dict[str, int]
    observations: int
    candidates: int


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
    )


def _roi_faces(backend: Any, rgb: np.ndarray, boxes: Sequence[Sequence[float]], margin: float) -> list[Any]:
    """Faces found in regions around ``boxes`` (each box grown by ``margin`` x its size on every
    side), in frame coordinates, with pose recomputed for the whole frame's camera model."""
    from runner.vision.faces import pose_from_landmarks

    h, w = rgb.shape[:2]
    found: list[Any] = []
    for x0, y0, x1, y1 in boxes:
        s = max(x1 - x0, y1 - y0)
        rx0, ry0 = max(0, int(x0 - margin * s)), max(0, int(y0 - margin * s))
        rx1, ry1 = min(w, int(np.ceil(x1 + margin * s))), min(h, int(np.ceil(y1 + margin * s)))
        if rx1 - rx0 < 16 or ry1 - ry0 < 16:
            continue
        for f in backend.analyze(np.ascontiguousarray(rgb[ry0:ry1, rx0:rx1])):
            off = np.array([rx0, ry0], dtype=np.float32)
            f.box = (f.box[0] + rx0, f.box[1] + ry0, f.box[2] + rx0, f.box[3] + ry0)
            f.keypoints = (np.asarray(f.keypoints) + off).astype(np.float32)
            if f.landmarks is not None:
                f.landmarks = (np.asarray(f.landmarks) + off).astype(np.float32)
            pts = f.landmarks if f.landmarks is not None else f.keypoints
            f.pose = pose_from_landmarks(pts, (w, h))
            # two regions can overlap: keep one detection per face
            if all(box_iou(f.box, g.box) < 0.5 for g in found):
                found.append(f)
    return found


def _analyze_frames(frames: Any, backends: Sequence[Any], *, full_every: int = 1,
                    roi_margin: float = 1.0) -> Any:
    """Yield (frame, [FaceObs]) in frame order, analyzing one frame per backend at a time.

    Every ``full_every``-th sampled frame (a key frame) is searched whole; the frames between
    are searched only around the faces of the key frame before them (regions grown by
    ``roi_margin`` x the face size), which costs a fraction of a full-frame detection. A face
    that enters the picture is found at the next key frame.
    """
    import queue
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    full_every = max(1, int(full_every))

    def one(backend: Any, frame: Any, key_boxes: list | None) -> tuple[Any, list[FaceObs]]:
        if key_boxes is None:
            faces = backend.analyze(frame.rgb)
        else:
            faces = _roi_faces(backend, frame.rgb, key_boxes, roi_margin) if key_boxes else []
        obs = [_face_obs(frame.index, frame.timestamp_ms, frame.rgb, f) for f in faces]
        frame.rgb = None  # pass 1 keeps no pixels
        return frame, obs

    workers = len(backends)
    if workers <= 1:
        key_boxes: list = []
        for n, frame in enumerate(frames):
            is_key = n % full_every == 0
            fr, obs = one(backends[0], frame, None if is_key else key_boxes)
            if is_key:
                key_boxes = [o.box for o in obs]
            yield fr, obs
        return

    pool_backends: queue.Queue = queue.Queue()
    for b in backends:
        pool_backends.put(b)

    def task(frame: Any, key: Future | None) -> tuple[Any, list[FaceObs]]:
        # Waiting happens before a backend is taken; the key frame was submitted earlier, so it
        # is already running or done (the pool runs tasks in submission order): no deadlock.
        boxes = None if key is None else [o.box for o in key.result()[1]]
        backend = pool_backends.get()
        try:
            return one(backend, frame, boxes)
        finally:
            pool_backends.put(backend)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="video-faces") as ex:
        pending: deque = deque()
        key_future: Future | None = None
        for n, frame in enumerate(frames):
            if n % full_every == 0:
                key_future = ex.submit(task, frame, None)
                pending.append(key_future)
            else:
                pending.append(ex.submit(task, frame, key_future))
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


def _score01(score: float, backend_name: str) -> float:
    """Detector score on [0, 1]: insightface/CNN give a confidence; HOG an SVM margin (~0-3)."""
    if backend_name == "dlib":
        return float(np.clip(score / 1.5, 0.0, 1.0))
    return float(np.clip(score, 0.0, 1.0))


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


def build_identity_sets(
    video_path: str,
    *,
    face_backend: Any,
    general_embedder: Any,
    options: dict[str, Any],
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
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None or k == "tau"}}
    for k, v in DEFAULTS.items():
        if opts.get(k) is None and k != "tau":
            opts[k] = v
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. probe ------------------------------------------------------------------------------
    try:
        info = probe_video(video_path, decoder=opts.get("decoder", "auto"))
    except VideoDecodeError as exc:
        return VideoResult(None, quarantine={"reason": exc.reason, "detail": exc.detail},
                           empty_reason=f"not a readable video: {exc.detail}", options=opts)
    result = VideoResult(info, options=opts, timings=timings)  # early returns keep what was timed
    tau = float(opts["tau"]) if opts.get("tau") is not None else float(face_backend.default_identity_threshold)
    strict_gate, loose_gate = make_gates(opts)
    stride = int(opts["stride"])

    # 2. pass 1: detect, measure, track -----------------------------------------------------
    tracker = FaceTracker(id_threshold=tau, max_gap=int(opts.get("max_gap_samples", 3)),
                          veto_threshold=veto_threshold(face_backend))
    stats: dict[str, Any] = {}
    sampled = 0
    faces_per_frame: list[tuple[int, float, int]] = []
    total_est = -(-info.frame_count // stride) if info.frame_count else None
    t0 = time.perf_counter()
    frames_iter = iter_frames(video_path, stride=stride, decoder=info.decoder, stats=stats)
    try:
        for frame, obs in _analyze_frames(frames_iter, [face_backend, *extra_backends],
                                          full_every=int(opts["full_detect_every"])):
            tracker.update(obs)
            faces_per_frame.append((frame.index, frame.timestamp_ms, len(obs)))
            sampled += 1
            if progress:
                progress("detect", sampled, total_est)
    except VideoDecodeError as exc:
        if exc.reason != "truncated" or sampled == 0 or on_truncated == "quarantine":
            result.quarantine = {"reason": exc.reason, "detail": exc.detail}
            result.empty_reason = f"video not usable ({exc.reason}): {exc.detail}"
            result.sampled_frames = sampled
            return result
        result.truncated = exc.detail
    result.decoded_frames = int(stats.get("decoded", 0))
    result.sampled_frames = sampled
    timings["pass1_s"] = round(time.perf_counter() - t0, 3)
    if not result.truncated:
        why = check_complete(info, result.decoded_frames)
        if why:
            if on_truncated == "quarantine":
                result.quarantine = {"reason": "truncated", "detail": why}
                result.empty_reason = f"video not usable (truncated): {why}"
                return result
            result.truncated = why
    if result.truncated:
        result.notes.append(f"truncated video, using the frames that decoded: {result.truncated}")
    if sampled == 0:
        result.quarantine = {"reason": "no_frames", "detail": "no frame decoded"}
        result.empty_reason = "no frame could be decoded"
        return result

    # 3. main people -------------------------------------------------------------------------
    ranked = track_scores(tracker.tracks, frame_w=info.width, frame_h=info.height, sampled_frames=sampled,
                          min_observations=int(opts["min_track_observations"]))
    result.tracks = [vars(s) for s in ranked]
    n_faces = sum(n for _, _, n in faces_per_frame)
    if not ranked:
        if n_faces == 0:
            result.empty_reason = f"no person found: no face in {sampled} sampled frames (every {stride}th frame)"
        else:
            result.empty_reason = (f"no person found: {n_faces} face detection(s) in {sampled} sampled frames "
                                   f"(every {stride}th frame), but no face track lasted "
                                   f"{opts['min_track_observations']} sampled frames; isolated detections are "
                                   "treated as false positives")
        return result
    ref_emb = l2n(np.mean([l2n(e) for e in reference_embeddings], axis=0)) if len(reference_embeddings) else None
    groups = group_persons(tracker.tracks, ranked, int(opts["people"]), tau, ref_emb)
    if ref_emb is not None and groups and groups[0][2] is not None and groups[0][2] < tau:
        result.notes.append(f"no track matches the references (best similarity {groups[0][2]:.3f} < {tau}); "
                            "the main person was chosen by track_score alone")
    if len(groups) < int(opts["people"]):
        result.notes.append(f"asked for {opts['people']} people, found {len(groups)} distinct person(s)")

    # 4. per person: gates, prototype, stability, smoothed crops -----------------------------
    fps = info.fps or 25.0
    plans = []
    for pid, (members, score, ref_sim) in enumerate(groups):
        obs = sorted((o for t in members for o in t.observations), key=lambda o: o.frame_idx)
        strict = [o for o in obs if strict_gate.passes(o.size, _score01(o.score, face_backend.name), o.measures)]
        loose = [o for o in obs if loose_gate.passes(o.size, _score01(o.score, face_backend.name), o.measures)]
        if strict:
            proto, _ = medoid([o.embedding for o in strict])
            proto_type = f"medoid of {len(strict)} strict-gate frames"
        elif loose:
            proto, _ = medoid([o.embedding for o in loose])
            proto_type = f"medoid of {len(loose)} loose-gate frames (no frame passed the strict gate)"
        else:
            proto, _ = medoid([o.embedding for o in obs])
            proto_type = f"medoid of all {len(obs)} frames (no frame passed a gate)"
        smoothed = _smooth_boxes(obs, float(opts["smoothing"]), stride * (tracker.max_gap + 1))
        strict_ids = {id(o) for o in strict}
        loose_ids = {id(o) for o in loose}
        timeline = []
        cands = []
        for o in obs:
            st = stability(o.embedding, proto)
            ok_pose = o.yaw is not None and o.pitch is not None
            entry = {"frame_idx": o.frame_idx, "t_s": round(o.timestamp_ms / 1000.0, 3), "stable": round(st, 4),
                     "strict": id(o) in strict_ids, "loose": id(o) in loose_ids, "novelty": None, "action": ""}
            if id(o) not in loose_ids:
                entry["action"] = "gate:" + "; ".join(loose_gate.failures(o.size, _score01(o.score, face_backend.name), o.measures))
            elif st < tau:
                entry["action"] = f"unstable ({st:.3f} < tau {tau})"
            elif not ok_pose:
                entry["action"] = "no pose"
            else:
                cands.append((o, st))
            timeline.append(entry)
        plans.append({"pid": pid, "members": members, "score": score, "ref_sim": ref_sim, "proto_type": proto_type,
                      "smoothed": smoothed, "strict_ids": strict_ids, "timeline": timeline, "cands": cands,
                      "obs": obs, "gate_counts": {"observations": len(obs), "strict": len(strict), "loose": len(loose),
                                                  "stable_candidates": len(cands)}})

    # 5. pass 2: crops, general-vision embeddings, novelty, selection ------------------------
    stop = StopRule(novelty_window=int(opts["stop_window"]), novelty_below=float(opts["stop_novelty"]))
    selectors = [Selector(max_per_bucket=int(opts["max_per_bucket"]), novelty_add=float(opts["novelty_add"]),
                          anchors_max=int(opts["anchors_max"]), anchor_min_gap=max(1, int(round(fps / 2))),
                          challenge_max=int(opts["challenge_max"]), stop=stop) for _ in plans]
    stopped_at: dict[int, Candidate | None] = {}
    by_frame: dict[int, list[tuple[int, FaceObs, float]]] = {}
    for p in plans:
        for o, st in p["cands"]:
            by_frame.setdefault(o.frame_idx, []).append((p["pid"], o, st))
    timeline_index = {p["pid"]: {e["frame_idx"]: e for e in p["timeline"]} for p in plans}
    pairs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    pair_wanted = len(plans) == 2 and int(opts["pair_max"]) > 0
    wanted = set(by_frame)
    done = 0
    if wanted:
        try:
            for frame in iter_frames(video_path, decoder=info.decoder, wanted=wanted):
                everyone = by_frame.get(frame.index, [])
                entries = [e for e in everyone if e[0] not in stopped_at]
                want_pair = pair_wanted and len({e[0] for e in everyone}) == 2
                if not entries and not want_pair:
                    if len(stopped_at) == len(plans) and not pair_wanted:
                        break
                    continue
                boxes = {}
                for pid, o, st in everyone:
                    boxes[pid] = crop_box_for(plans[pid]["smoothed"][o.frame_idx], info.width, info.height,
                                              float(opts["crop_scale"]))
                crops = [_crop(frame.rgb, boxes[pid], int(opts["crop_max_side"])) for pid, _, _ in entries]
                gen = l2n(general_embedder.embed(crops)) if crops else []
                for (pid, o, st), crop, g in zip(entries, crops, gen):
                    sel = selectors[pid]
                    q = quality_score(o.size, _score01(o.score, face_backend.name), o.measures)
                    bins = B.bins_for(o.yaw, o.pitch, o.measures)
                    c = Candidate(person=pid, frame_idx=o.frame_idx, timestamp_ms=o.timestamp_ms, bins=bins,
                                  quality=q, stable=st, strict=id(o) in plans[pid]["strict_ids"],
                                  extreme_pose=B.extreme_pose(o.yaw, o.pitch), general=g, crop=crop,
                                  face_bbox=o.box, crop_box=boxes[pid], yaw=o.yaw, pitch=o.pitch,
                                  measures=o.measures)
                    c.novelty = novelty(g, sel.saved_embeddings()) if sel.saved() else 1.0
                    action = sel.offer(c)
                    e = timeline_index[pid][o.frame_idx]
                    e["novelty"] = round(c.novelty, 4)
                    e["action"] = action
                    if opts["early_stop"] and sel.should_stop():
                        stopped_at[pid] = c
                if want_pair:
                    pairs.append(_pair_candidate(frame, everyone, [boxes[pid] for pid, _, _ in everyone], info,
                                                 opts, face_backend.name, general_embedder))
                    _keep_pairs(pairs, int(opts["pair_max"]), float(opts["novelty_add"]))
                done += 1
                if progress:
                    progress("select", done, len(wanted))
        except VideoDecodeError as exc:  # pass 1 read these frames; a failure now is worth a note
            result.notes.append(f"second pass stopped early: {exc.detail}")
    timings["pass2_s"] = round(time.perf_counter() - t0, 3)

    # 6. result --------------------------------------------------------------------------------
    for p, sel in zip(plans, selectors):
        pid = p["pid"]
        filled = sel.filled()
        if pid in stopped_at:
            c = stopped_at[pid]
            f = filled
            reason = (f"coverage complete at frame {c.frame_idx} (t={c.timestamp_ms / 1000:.2f}s): yaw {f['yaw']}/7, "
                      f"pitch {f['pitch']}/5, expression {f['expression']}/4, anchors {len(sel.anchors())}, mean "
                      f"novelty of the last {stop.novelty_window} candidates < {stop.novelty_below}")
        elif not p["cands"]:
            reason = ("no frame of this person passed the loose gate with stable identity "
                      f"({p['gate_counts']['loose']} of {p['gate_counts']['observations']} passed the gate, tau {tau})")
        else:
            missing = sel.missing()
            reason = "end of video; early-stop rule not met: " + "; ".join(missing) if missing else "end of video"
        s = p["score"]
        result.persons.append(PersonResult(
            person_id=pid, track_ids=[t.track_id for t in p["members"]],
            track_score={"score": s.score, "size": s.size, "centre": s.centre, "length": s.length},
            prototype_type=p["proto_type"], tau=tau, reference_similarity=p["ref_sim"],
            anchors=sel.anchors(), coverage=sel.coverage(), challenge=sel.challenge(),
            stop_reason=reason, stopped_early=pid in stopped_at, filled=filled, timeline=p["timeline"],
            gate_counts=p["gate_counts"], actions=dict(sel.actions), observations=len(p["obs"]),
            candidates=len(p["cands"]),
        ))
    result.pairs = pairs
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    result.timings = timings
    return result


def _pair_candidate(frame: Any, entries: list, boxes: list, info: VideoInfo, opts: dict[str, Any],
                    backend_name: str, general_embedder: Any) -> dict[str, Any]:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    cb = (x0, y0, x1, y1)
    crop = _crop(frame.rgb, cb, int(opts["crop_max_side"]) * 2)
    q = min(quality_score(o.size, _score01(o.score, backend_name), o.measures) for _, o, _ in entries)
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


def person_meta(p: PersonResult, *, conditioning: dict[str, Any]) -> dict[str, Any]:
    return {
        "person_id": p.person_id,
        "track_ids": p.track_ids,
        "track_score": p.track_score,
        "prototype_type": p.prototype_type,
        "tau": p.tau,
        "reference_similarity": None if p.reference_similarity is None else round(p.reference_similarity, 4),
        "anchor_count": len(p.anchors),
        "coverage_count": len(p.coverage),
        "challenge_count": len(p.challenge),
        "buckets_filled": p.filled,
        "buckets_total": {k: len(v) for k, v in B.AXES.items()},
        "total_saved": len({c.frame_idx for c in [*p.anchors, *p.coverage, *p.challenge]}),
        "stop_reason": p.stop_reason,
        "stopped_early": p.stopped_early,
        "observations": p.observations,
        "candidates": p.candidates,
        "gate_counts": p.gate_counts,
        "actions": p.actions,
        "conditioning_ratio": conditioning,
        "gate_version": GATE_VERSION,
    }


def conditioning_for(p: PersonResult, opts: dict[str, Any]) -> dict[str, Any]:
    return conditioning_ratio(opts["conditioning_ratio"], anchors=len(p.anchors), challenge=len(p.challenge),
                              yaw_filled=p.filled["yaw"], adjust=bool(opts["adjust_ratio"]))
