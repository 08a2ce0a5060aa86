"""Unit tests of runner.video on synthetic inputs (no face model involved): decode, tracking,
track_score, buckets, gates, stability/novelty, selection policy, early stop, export, expand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.video import buckets as B
from runner.video.decode import VideoDecodeError, check_complete, iter_frames, probe_video
from runner.video.descriptors import FALLBACK_NAME, FallbackDescriptor, load_general_embedder
from runner.video.gates import make_gates, quality_score
from runner.video.selection import Candidate, Selector, StopRule, conditioning_ratio
from runner.video.stability import medoid, novelty, stability
from runner.video.tracking import FaceObs, FaceTracker, box_iou, track_scores


# ------------------------------------------------------------------------------ helpers


def write_video(path: Path, n: int = 30, *, fps: int = 10, size: tuple[int, int] = (64, 48),
                faststart: bool = True) -> Path:
    import av

    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((size[1], size[0], 3), (i * 8) % 256, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def emb(seed: int, noise: float = 0.0, rng_seed: int = 0) -> np.ndarray:
    base = np.random.default_rng(seed).normal(size=16)
    if noise:
        base = base + np.random.default_rng(1000 + rng_seed).normal(size=16) * noise
    return unit(base)


def obs(frame: int, box, e, *, yaw=0.0, pitch=0.0, size_measures=None) -> FaceObs:
    return FaceObs(frame_idx=frame, timestamp_ms=frame * 100.0, box=tuple(map(float, box)), score=1.0,
                   embedding=np.asarray(e, np.float32), yaw=yaw, pitch=pitch, measures=size_measures or {})


def cand(frame: int, *, yaw=0.0, pitch=0.0, expr=None, quality=0.5, general=None, strict=True,
         lighting=128.0, occlusion=0.0) -> Candidate:
    measures = {"brightness": lighting, "occlusion": occlusion, **(expr or {})}
    bins = B.bins_for(yaw, pitch, measures)
    g = unit(general if general is not None else np.eye(8)[frame % 8])
    return Candidate(person=0, frame_idx=frame, timestamp_ms=frame * 33.0, bins=bins, quality=quality, stable=0.95,
                     strict=strict, extreme_pose=B.extreme_pose(yaw, pitch), general=g,
                     crop=np.full((8, 8, 3), frame % 255, np.uint8), yaw=yaw, pitch=pitch, measures=measures)


# ------------------------------------------------------------------------------ decode


def test_decode_stride_timestamps_and_both_decoders(tmp_path):
    video = write_video(tmp_path / "clip.mp4", 30, fps=10)
    info = probe_video(video)
    assert (info.width, info.height, info.decoder) == (64, 48, "pyav")
    assert round(info.fps) == 10
    stats: dict = {}
    frames = list(iter_frames(video, stride=3, stats=stats))
    assert [f.index for f in frames] == list(range(0, 30, 3))
    assert [f.timestamp_ms for f in frames] == [i * 100.0 for i in range(0, 30, 3)]
    assert frames[0].rgb.shape == (48, 64, 3) and frames[0].rgb.dtype == np.uint8
    assert stats["decoded"] == 30 and check_complete(stats["info"], stats["decoded"]) is None
    cv_frames = list(iter_frames(video, stride=3, decoder="opencv"))
    assert [f.index for f in cv_frames] == [f.index for f in frames]
    picked = list(iter_frames(video, wanted={4, 7, 20}))
    assert [f.index for f in picked] == [4, 7, 20]


def test_decode_bad_files_have_reasons(tmp_path):
    with pytest.raises(VideoDecodeError) as e:
        probe_video(tmp_path / "missing.mp4")
    assert e.value.reason == "missing"
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoDecodeError) as e:
        list(iter_frames(text))
    assert e.value.reason in ("unreadable", "no_video_stream")
    # moov at the front, data cut: opens, decodes fewer frames than the container declares
    video = write_video(tmp_path / "clip.mp4", 30)
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    stats: dict = {}
    try:
        n = len(list(iter_frames(cut, stats=stats)))
        assert n < 30
        assert "truncated" in check_complete(stats["info"], stats["decoded"])
    except VideoDecodeError as exc:  # some builds stop with an error instead: also a reason
        assert exc.reason in ("truncated", "unreadable", "no_frames")


def test_display_rotation_is_applied_like_a_player(tmp_path):
    import av

    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)  # a phone held upright
        for _ in range(3):
            img = np.zeros((32, 64, 3), np.uint8)
            img[:8, :8] = 255  # a mark in the stored image's top-left corner
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (32, 64, 90)
    rgb = next(iter_frames(path)).rgb
    assert rgb.shape[:2] == (64, 32)
    ys, xs = np.nonzero(rgb[:, :, 0] > 200)
    assert ys.min() >= 48 and xs.max() <= 12, "counterclockwise: top-left goes to bottom-left"
    cv = next(iter_frames(path, decoder="opencv")).rgb  # OpenCV rotates by itself: the same picture
    assert cv.shape == rgb.shape and np.abs(cv.astype(int) - rgb.astype(int)).mean() < 8


# ------------------------------------------------------------------------------ tracking


def test_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_tracker_keeps_identities_through_crossing_and_cut():
    a, b = emb(1), emb(2)
    tr = FaceTracker(id_threshold=0.9, max_gap=2, veto_threshold=0.5)
    ids = []
    # two faces walk towards each other and cross (boxes overlap at the crossing)
    for t in range(8):
        xa, xb = 10 + 10 * t, 90 - 10 * t
        ids.append(tr.update([obs(t, (xa, 10, xa + 30, 40), emb(1, 0.05, t)),
                              obs(t, (xb, 12, xb + 30, 42), emb(2, 0.05, 100 + t))]))
    first = ids[0]
    assert all(i == first for i in ids), "identity must win over box overlap at the crossing"
    # a cut: person a reappears far away after a gap longer than max_gap
    for t in range(8, 12):
        tr.update([])
    got = tr.update([obs(12, (200, 100, 240, 140), emb(1, 0.05, 50))])
    assert got == [first[0]], "a lost track is found again by identity"
    # a stranger starts a new track
    got = tr.update([obs(13, (200, 100, 240, 140), emb(3))])
    assert got[0] not in first
    assert len(tr.tracks) == 3
    assert tr.tracks[0].embedding @ a > 0.95 and tr.tracks[1].embedding @ b > 0.95


def test_track_score_formula_and_order():
    tr = FaceTracker(id_threshold=0.9)
    # big centred face in all 4 frames; small off-centre face in 2 frames
    for t in range(4):
        faces = [obs(t, (80, 40, 120, 80), emb(1))]
        if t < 2:
            faces.append(obs(t, (0, 0, 20, 20), emb(2)))
        tr.update(faces)
    scores = track_scores(tr.tracks, frame_w=200, frame_h=120, sampled_frames=4)
    assert [s.track_id for s in scores] == [0, 1]
    s0, s1 = scores
    assert s0.size == 1.0 and s0.centre == pytest.approx(1.0) and s0.length == 1.0
    assert s0.score == pytest.approx(1.0)
    half_diag = np.hypot(100, 60)
    centre1 = 1 - np.hypot(100 - 10, 60 - 10) / half_diag
    assert s1.size == pytest.approx(0.5)
    assert s1.score == pytest.approx(0.4 * 0.5 + 0.3 * centre1 + 0.3 * 0.5, abs=1e-5)
    assert track_scores(tr.tracks, frame_w=200, frame_h=120, sampled_frames=4, min_observations=3)[0].track_id == 0
    assert len(track_scores(tr.tracks, frame_w=200, frame_h=120, sampled_frames=4, min_observations=3)) == 1


# ------------------------------------------------------------------------------ buckets and gates


def test_buckets():
    assert [B.yaw_bin(v) for v in (-60, -40, -20, -10, 0, 4.9, 10, 20, 40, 60)] == [0, 0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert [B.pitch_bin(v) for v in (-30, -10, 0, 8, 9, 30)] == [0, 1, 2, 2, 3, 4]
    assert B.expression_bin({"eye_open": 0.1, "mouth_open": 0.6, "smile": 1.0}) == 3  # eyes closed wins
    assert B.expression_bin({"eye_open": 0.3, "mouth_open": 0.6, "smile": 1.0}) == 2
    assert B.expression_bin({"eye_open": 0.3, "mouth_open": 0.1, "smile": 0.7}) == 1
    assert B.expression_bin({"eye_open": 0.3, "mouth_open": 0.1, "smile": 0.1}) == 0
    assert [B.occlusion_bin(v) for v in (0.0, 0.09, 0.1, 0.4, 0.41)] == [0, 0, 1, 1, 2]
    assert [B.lighting_bin(v) for v in (59, 60, 200, 201)] == [1, 0, 0, 2]
    b = B.bins_for(0, 0, {"brightness": 30, "occlusion": 0.5})
    assert b.labels() == {"yaw": "[-5,5]", "pitch": "neutral", "expression": "neutral", "occlusion": "heavy",
                          "lighting": "dark"}
    assert b.near_frontal and not B.bins_for(35, 0, {}).near_frontal
    assert B.extreme_pose(31, 0) and B.extreme_pose(0, -25) and not B.extreme_pose(20, 10)


def test_gates_and_quality():
    strict, loose = make_gates({})
    good = {"blur": 150.0, "brightness": 120.0, "clipped": 0.0, "occlusion": 0.0}
    assert strict.passes(100, 1.0, good) and loose.passes(100, 1.0, good)
    small_dark = {"blur": 150.0, "brightness": 40.0, "clipped": 0.0, "occlusion": 0.5}
    reasons = strict.failures(50, 1.0, small_dark)
    assert any("face 50px" in r for r in reasons) and any("brightness" in r for r in reasons)
    assert any("occlusion" in r for r in reasons)
    assert loose.passes(50, 1.0, small_dark), "the loose gate keeps dark, occluded faces for the challenge set"
    assert not loose.passes(20, 1.0, good)
    assert quality_score(150, 1.0, good) > quality_score(150, 1.0, {**good, "blur": 10.0})
    assert quality_score(150, 1.0, good) > quality_score(60, 1.0, good)
    assert 0.0 <= quality_score(10, 0.0, small_dark) <= 1.0


# ------------------------------------------------------------------------------ stability, novelty


def test_medoid_resists_outliers_and_stability():
    members = [emb(1, 0.1, i) for i in range(6)]
    outlier = emb(9)
    proto, idx = medoid([outlier, *members])
    assert idx != 0
    assert stability(members[0], proto) > 0.9 > stability(outlier, proto)
    assert stability(proto, proto) == pytest.approx(1.0)


def test_novelty_is_min_distance_to_saved():
    e = np.eye(4)
    assert novelty(e[0], []) == 1.0
    assert novelty(e[0], [e[1], e[2]]) == pytest.approx(1.0)
    assert novelty(e[0], [e[1], e[0]]) == pytest.approx(0.0)
    v = unit([1, 1, 0, 0])
    assert novelty(v, [e[0], e[2]]) == pytest.approx(1 - np.sqrt(0.5))


def test_fallback_descriptor_is_labelled_normalized_and_discriminative(tmp_path):
    d = FallbackDescriptor()
    assert d.is_fallback and d.name == FALLBACK_NAME
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)
    b = np.zeros((80, 60, 3), np.uint8)
    b[:, :30] = (200, 30, 30)
    out = d.embed([a, a.copy(), b])
    assert out.shape[0] == 3 and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out[0] @ out[1] == pytest.approx(1.0, abs=1e-6)
    assert out[0] @ out[2] < 0.9
    emb_, note = load_general_embedder("org/does-not-exist", cache_dir=tmp_path, fallback="auto")
    assert emb_.is_fallback and "could not be loaded" in note and FALLBACK_NAME in note
    with pytest.raises(Exception):
        load_general_embedder("org/does-not-exist", cache_dir=tmp_path, fallback="never")
    emb_, note = load_general_embedder("facebook/dinov2-small", cache_dir=tmp_path, fallback="always")
    assert emb_.is_fallback and "not requested" in note


# ------------------------------------------------------------------------------ selection


def test_selection_policy_actions():
    sel = Selector(max_per_bucket=2, novelty_add=0.15)
    g = np.eye(8)
    assert sel.offer(cand(1, quality=0.5, general=g[0])).startswith("save:new_bucket")
    # same look, better quality: replaces
    assert sel.offer(cand(2, quality=0.7, general=g[0] + 0.01 * g[1])).startswith("replace:better_quality")
    # same look, worse: skipped
    assert sel.offer(cand(3, quality=0.2, general=g[0])).startswith("skip:not_novel")
    # novel: added (bucket has room for 2)
    assert sel.offer(cand(4, quality=0.3, general=g[2])).startswith("add:novel")
    # novel but full: replaces the worst only when better
    assert sel.offer(cand(5, quality=0.1, general=g[3])).startswith("skip:bucket_full")
    assert sel.offer(cand(6, quality=0.9, general=g[4])).startswith("replace:novel_better_than_worst")
    kept = sorted(c.frame_idx for c in sel.coverage())
    assert kept == [2, 6]
    assert sel.coverage()[0].frame_idx == 6, "best first within a bucket"
    # another bucket
    assert sel.offer(cand(7, yaw=35, general=g[5])).startswith("save:new_bucket")
    assert sel.filled()["yaw"] == 2


def test_anchors_challenge_and_early_stop():
    sel = Selector(anchors_max=5, anchor_min_gap=10, challenge_max=3,
                   stop=StopRule(novelty_window=5, novelty_below=0.08))
    g = np.eye(64)
    f = 0
    # near-frontal strict frames: anchor pool; two within the minimum gap count once
    for q in (0.9, 0.85, 0.8, 0.7):
        f += 10
        sel.offer(cand(f, yaw=0, quality=q, general=g[f % 64]))
    sel.offer(cand(f + 3, yaw=0, quality=0.95, general=g[1]))
    anchors = sel.anchors()
    assert [a.frame_idx for a in anchors][:1] == [f + 3]
    assert all(abs(a.frame_idx - b.frame_idx) >= 10 for a in anchors for b in anchors if a is not b)
    assert f not in [a.frame_idx for a in anchors]  # too close to the better f+3
    # non-strict or turned faces never become anchors
    sel.offer(cand(200, yaw=40, quality=1.0, general=g[2]))
    sel.offer(cand(210, yaw=0, quality=1.0, strict=False, general=g[3]))
    assert 200 not in [a.frame_idx for a in sel.anchors()] and 210 not in [a.frame_idx for a in sel.anchors()]
    # challenge: extreme pose, dark, heavy occlusion, round robin
    sel.offer(cand(300, yaw=-44, quality=0.3, general=g[4]))
    sel.offer(cand(310, yaw=0, lighting=40, quality=0.3, general=g[5]))
    sel.offer(cand(320, yaw=0, occlusion=0.6, quality=0.3, general=g[6]))
    kinds = {k for c in sel.challenge() for k in c.challenge_kinds()}
    assert {"extreme_pose", "dark", "heavy_occlusion"} <= kinds and len(sel.challenge()) == 3
    assert not sel.should_stop()
    missing = " ".join(sel.missing())
    assert "pitch buckets" in missing and "expression buckets" in missing
    # fill the axes, then a run of repeats (novelty 0) lets the rule fire
    fr = 400
    for yaw in (-40, -20, -10, 0, 10, 20, 40):
        for pitch in (-30, -10, 0, 10):
            fr += 1
            sel.offer(cand(fr, yaw=yaw, pitch=pitch, general=g[(fr * 7) % 64]))
    for expr in ({"smile": 0.9}, {"mouth_open": 0.5}):
        fr += 1
        sel.offer(cand(fr, expr=expr, general=g[(fr * 3) % 64]))
    assert not sel.should_stop()  # the recent candidates were novel
    for _ in range(5):
        fr += 1
        c = cand(fr, general=g[7])
        c.novelty = 0.0
        sel.offer(c)
    assert sel.missing() == [] and sel.should_stop()


def test_conditioning_ratio_adjustments():
    r = conditioning_ratio([20, 70, 10], anchors=5, challenge=6, yaw_filled=6)
    assert (r["anchor"], r["coverage"], r["challenge"]) == (20.0, 70.0, 10.0) and r["adjustments"] == []
    r = conditioning_ratio([20, 70, 10], anchors=0, challenge=0, yaw_filled=6)
    assert (r["anchor"], r["coverage"], r["challenge"]) == (0.0, 100.0, 0.0) and len(r["adjustments"]) == 2
    r = conditioning_ratio([20, 70, 10], anchors=4, challenge=3, yaw_filled=2)
    assert (r["anchor"], r["coverage"], r["challenge"]) == (30.0, 60.0, 10.0)
    r = conditioning_ratio([20, 70, 10], anchors=0, challenge=0, yaw_filled=2, adjust=False)
    assert (r["anchor"], r["coverage"], r["challenge"]) == (20.0, 70.0, 10.0)


# ------------------------------------------------------------------------------ export


INGEST_KEYS = {"id", "file", "source", "source_index", "label", "sha256", "width", "height", "orig_width",
               "orig_height", "orig_format", "orig_mode", "exif_transposed", "scale"}


def test_export_layout_and_meta(tmp_path):
    from runner.video.decode import VideoInfo
    from runner.video.export import export_result
    from runner.video.pipeline import DEFAULTS, PersonResult, VideoResult

    a = cand(10, quality=0.9)
    c1 = cand(20, yaw=20)
    ch = cand(30, yaw=-44)
    person = PersonResult(person_id=0, track_ids=[0], track_score={"score": 0.8, "size": 1, "centre": 0.5, "length": 0.9},
                          prototype_type="medoid of 3 strict-gate frames", tau=0.92, reference_similarity=None,
                          anchors=[a], coverage=[a, c1], challenge=[ch], stop_reason="end of video",
                          stopped_early=False, filled={"yaw": 2, "pitch": 1, "expression": 1, "occlusion": 1, "lighting": 1},
                          timeline=[{"frame_idx": 10, "t_s": 0.33, "stable": 0.95, "novelty": 1.0, "action": "save"}],
                          gate_counts={}, actions={}, observations=3, candidates=3)
    info = VideoInfo("v.mp4", 320, 240, 30.0, 90, 3.0, "h264", "pyav")
    res = VideoResult(info, persons=[person], options=dict(DEFAULTS), sampled_frames=18, decoded_frames=90)
    summary = export_result(res, tmp_path / "identity", tmp_path / "images", video_rel="rides/v.mp4",
                            video_sha256="ab" * 32, source_index=2, label="ride", identity_model="dlib-x",
                            general_model=FALLBACK_NAME, general_is_fallback=True)
    p = tmp_path / "identity" / "person_0"
    assert sorted(x.name for x in (p / "anchors").iterdir()) == ["f000010.png", "f000010_meta.json"]
    assert len(list((p / "coverage").glob("*.png"))) == 2 and len(list((p / "challenge").glob("*.png"))) == 1
    meta = json.loads((p / "anchors" / "f000010_meta.json").read_text())
    for key in ("type", "person_id", "frame_idx", "timestamp_ms", "bins", "quality", "novelty", "stable", "face_bbox",
                "crop_box", "embedding_model", "gate_version"):
        assert key in meta, key
    assert meta["type"] == "anchor" and meta["embedding_model"]["general_is_fallback"] is True
    pm = json.loads((p / "meta.json").read_text())
    for key in ("track_score", "prototype_type", "anchor_count", "buckets_filled", "challenge_count", "total_saved",
                "stop_reason", "conditioning_ratio"):
        assert key in pm, key
    assert pm["total_saved"] == 3 and pm["anchor_count"] == 1
    records = [json.loads(x) for x in (tmp_path / "images" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 3, "an image in two sets is written once"
    for r in records:
        assert INGEST_KEYS <= set(r) and (tmp_path / "images" / r["file"]).is_file()
        assert r["source"] == "rides/v.mp4" and r["source_index"] == 2 and r["label"] == "ride"
    both = [r for r in records if r["video"]["frame_idx"] == 10][0]
    assert sorted(both["video"]["sets"]) == ["anchor", "coverage"]
    assert summary["images"] == 3 and summary["embedding_model"]["general"] == FALLBACK_NAME


# ------------------------------------------------------------------------------ spec -> nodes


def test_expand_one_node_per_video_source(tmp_path):
    from runner.stages.video_identity import expand

    class View:
        character = "hero"
        project_root = tmp_path
        spec_file = tmp_path / "specs" / "hero.yaml"

    (tmp_path / "refs").mkdir()
    spec = {"character": {"name": "hero", "references": ["refs", "refs2/one.png"]},
            "dataset": {"sources": [{"images": "photos"},
                                    {"video": "rides/ride [1].mp4", "people": 2, "stride": 4,
                                     "video_options": {"tau": 0.9, "pair_set": False}}],
                        "analysis": {"backend": "dlib", "upsample": 0}}}
    nodes = expand(spec, View())
    assert [n.id for n in nodes] == ["hero:video_identity[1]"]
    n = nodes[0]
    assert n.outputs == ("identity", "images", "quarantine")
    json.dumps(n.config)  # JSON-serializable
    assert n.config["people"] == 2 and n.config["stride"] == 4 and n.config["options"]["tau"] == 0.9
    assert n.config["face"]["upsample"] == 0 and n.config["options"]["pair_set"] is False
    assert n.config["video"] == "rides/ride [1].mp4" and not Path(n.config["video"]).is_absolute()
    v = n.inputs["video"]
    assert v.root == tmp_path / "rides" and v.recursive is False
    import fnmatch

    assert fnmatch.fnmatch("ride [1].mp4", v.patterns[0])
    assert n.inputs["references0"].recursive and n.inputs["references1"].patterns == ("one.png",)


# ------------------------------------------------------------------------------ key-frame / ROI detection


class SquareBackend:
    """A stand-in face backend: every bright square is a 'face' (records the input sizes it saw)."""

    name = "fake"
    default_identity_threshold = 0.9

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def analyze(self, rgb):
        from runner.vision.faces import Face, Pose

        self.sizes.append(rgb.shape[:2])
        ys, xs = np.nonzero(rgb[:, :, 0] > 200)
        if not len(xs):
            return []
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        w, h = x1 - x0, y1 - y0
        kps = np.array([[x0 + 0.3 * w, y0 + 0.35 * h], [x0 + 0.7 * w, y0 + 0.35 * h], [x0 + 0.5 * w, y0 + 0.55 * h],
                        [x0 + 0.35 * w, y0 + 0.75 * h], [x0 + 0.65 * w, y0 + 0.75 * h]], np.float32)
        return [Face(box=(x0, y0, x1, y1), score=1.0, keypoints=kps, pose=Pose(0.0, 0.0, 0.0),
                     embedding=unit(np.ones(8)).astype(np.float32))]


def square_frames(n: int):
    from runner.video.decode import Frame

    for i in range(n):
        rgb = np.zeros((120, 200, 3), np.uint8)
        x = 20 + 8 * i
        rgb[40:80, x:x + 40] = 255
        yield Frame(i * 5, i * 166.0, rgb)


@pytest.mark.parametrize("threads", [1, 2])
def test_key_frames_search_whole_frames_and_the_rest_only_around_faces(threads):
    from runner.video.pipeline import _analyze_frames

    backends = [SquareBackend() for _ in range(threads)]
    out = list(_analyze_frames(square_frames(7), backends, full_every=3, roi_margin=1.0))
    assert [f.index for f, _ in out] == [0, 5, 10, 15, 20, 25, 30]
    for i, (_, obs) in enumerate(out):
        assert len(obs) == 1
        assert obs[0].box == (20 + 8 * i, 40, 60 + 8 * i, 80), "boxes are in frame coordinates"
    sizes = sorted(s for b in backends for s in b.sizes)
    assert sizes.count((120, 200)) == 3  # key frames 0, 3, 6 searched whole
    assert len(sizes) == 7 and all(s[0] <= 120 and s[1] < 200 for s in sizes[:4])
    every = list(_analyze_frames(square_frames(7), [SquareBackend()], full_every=1))
    assert [o[0].box for _, o in every] == [o[0].box for _, o in out]


@pytest.mark.parametrize("policy", ["quarantine", "use_partial"])
def test_truncated_video_policy(tmp_path, policy):
    from runner.video.descriptors import FallbackDescriptor
    from runner.video.pipeline import build_identity_sets

    data = write_video(tmp_path / "clip.mp4", 40).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    res = build_identity_sets(str(cut), face_backend=SquareBackend(), general_embedder=FallbackDescriptor(),
                              options={"stride": 2}, on_truncated=policy)
    if policy == "quarantine":
        assert res.quarantine and res.quarantine["reason"] in ("truncated", "unreadable", "no_frames")
        assert res.empty_reason and res.persons == []
    elif res.quarantine is None:  # the readable part was used, and the result says so
        assert res.truncated and any("truncated" in n for n in res.notes)
        assert 0 < res.sampled_frames < 20
