"""Unit tests of runner.video on synthetic inputs (no face model involved): decode, tracking,
track_score, buckets, gates, stability/novelty, selection policy, early stop, export, expand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.core.errors import UserError
from runner.video import buckets as B
from runner.video.decode import VideoDecodeError, check_complete, iter_frames, probe_video
from runner.video.descriptors import FALLBACK_NAME, FallbackDescriptor, load_general_embedder
from runner.video.gates import make_gates, quality_score
from runner.video.selection import Candidate, Selector, StopRule, conditioning_ratio
from runner.video.stability import medoid, novelty, stability
from runner.video.tracking import FaceObs, FaceTracker, TrackScore, box_iou, track_scores


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
    for _ in range(8, 12):
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
    with pytest.raises(UserError, match="cannot be loaded"):
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
    sel = Selector(anchors_max=5, anchor_min_gap=10, challenge_max=3, challenge_min_gap=5,
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
    c2 = cand(25, yaw=20, general=np.eye(8)[3])  # a second image of c1's bucket
    person = PersonResult(person_id=0, track_ids=[0], track_score=TrackScore(0, 0.8, 1.0, 0.5, 0.9, 3),
                          prototype_type="medoid_strict", prototype_frames=3, prototype_frame_idx=10, tau=0.92,
                          reference_similarity=None, anchors=[a], coverage=[a, c1, c2], challenge=[ch],
                          stop_reason="video_exhausted", stop_detail="end of video",
                          filled={"yaw": 2, "pitch": 1, "expression": 1, "occlusion": 1, "lighting": 1},
                          timeline=[{"frame_idx": 10, "t_s": 0.33, "stable": 0.95, "novelty": 1.0, "action": "save"}],
                          gate_counts={}, actions={}, observations=3, candidates=3)
    info = VideoInfo("v.mp4", 320, 240, 30.0, 90, 3.0, "h264", "pyav")
    res = VideoResult(info, persons=[person], options=dict(DEFAULTS), sampled_frames=18, decoded_frames=90)
    summary = export_result(res, tmp_path / "identity", tmp_path / "images", video_rel="rides/v.mp4",
                            video_sha256="ab" * 32, source_index=2, label="ride", identity_model="dlib-x",
                            general_model=FALLBACK_NAME, general_is_fallback=True)
    p = tmp_path / "identity" / "person_0"
    assert sorted(x.name for x in (p / "anchors").iterdir()) == ["anchor_001.jpg", "anchor_001_meta.json"]
    assert sorted(x.name for x in (p / "coverage").glob("*.jpg")) == [
        "cov_yaw0_pitch0_neutral.jpg", "cov_yaw22_pitch0_neutral.jpg", "cov_yaw22_pitch0_neutral_2.jpg"]
    assert sorted(x.name for x in (p / "challenge").iterdir()) == ["challenge_001.jpg", "challenge_001_meta.json"]
    meta = json.loads((p / "anchors" / "anchor_001_meta.json").read_text())
    for key in ("type", "person_id", "file", "frame_idx", "timestamp_ms", "bins", "bucket", "quality", "novelty",
                "stable", "face_bbox", "crop_box", "embedding_model", "gate_version", "detector"):
        assert key in meta, key
    assert meta["type"] == "anchor" and meta["embedding_model"]["general_is_fallback"] is True
    assert meta["file"] == "anchor_001.jpg" and meta["frame_idx"] == 10
    from PIL import Image

    with Image.open(p / "anchors" / "anchor_001.jpg") as im:
        assert im.format == "JPEG"
    for m in (p / "coverage").glob("*_meta.json"):  # the name carries the bucket the meta states
        cm = json.loads(m.read_text())
        b = cm["bucket"]
        assert m.name.startswith(f"cov_yaw{b['yaw']}_pitch{b['pitch']}_{b['expression']}")
        assert cm["file"] == m.name.replace("_meta.json", ".jpg")
    pm = json.loads((p / "meta.json").read_text())
    assert pm["person_id"] == 0 and pm["track_score"] == 0.8 and isinstance(pm["track_score"], float)
    assert pm["track_score_components"]["size"] == 1.0 and pm["track_score_components"]["length"] == 0.9
    assert pm["prototype_type"] == "medoid_strict" and pm["prototype_frame_idx"] == 10
    assert pm["coverage_buckets_filled"] == {"yaw": "2/7", "pitch": "1/5", "expression": "1/4", "occlusion": "1/3",
                                             "lighting": "1/3"}
    assert (pm["anchor_count"], pm["coverage_count"], pm["challenge_count"], pm["total_saved"]) == (1, 3, 1, 4)
    assert pm["stop_reason"] == "video_exhausted" and pm["stop_detail"] == "end of video"
    assert pm["stopped_early"] is False and "conditioning_ratio" in pm
    records = [json.loads(x) for x in (tmp_path / "images" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4, "an image in two sets is written once"
    assert all((tmp_path / "identity" / r["video"]["meta"]).is_file() for r in records)
    for r in records:
        assert INGEST_KEYS <= set(r) and (tmp_path / "images" / r["file"]).is_file()
        assert r["source"] == "rides/v.mp4" and r["source_index"] == 2 and r["label"] == "ride"
    both = [r for r in records if r["video"]["frame_idx"] == 10][0]
    assert sorted(both["video"]["sets"]) == ["anchor", "coverage"]
    assert summary["images"] == 4 and summary["embedding_model"]["general"] == FALLBACK_NAME


# ------------------------------------------------------------------------------ spec -> nodes


def test_expand_one_node_per_video_source(tmp_path):
    from runner.stages.video_identity import expand

    class View:
        character = "hero"
        project_root = tmp_path
        spec_file = tmp_path / "specs" / "hero.yaml"

        def memo(self, key, compute):  # contract.GraphView: nothing kept between calls here
            return compute()

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


# ------------------------------------------------------------------------------ issue 15: layout, diversity, profiles


def test_bucket_names_carry_the_bucket_values_for_every_bucket():
    import re

    names = set()
    for yi in range(len(B.YAW_BINS)):
        for pi in range(len(B.PITCH_BINS)):
            for ei in range(len(B.EXPRESSION_BINS)):
                bins = B.Bins(yi, pi, ei, 0, 0)
                name = bins.bucket_name()
                m = re.fullmatch(r"yaw(-?\d+)_pitch(-?\d+)_([a-z_]+)", name)
                assert m, name
                yaw, pitch = int(m.group(1)), int(m.group(2))
                # the value in the name falls in the bucket it names
                assert B.yaw_bin(yaw) == yi and B.pitch_bin(pitch) == pi and m.group(3) == B.EXPRESSION_BINS[ei]
                assert bins.bucket() == {"yaw": yaw, "pitch": pitch, "expression": B.EXPRESSION_BINS[ei]}
                names.add(name)
    assert len(names) == len(B.YAW_BINS) * len(B.PITCH_BINS) * len(B.EXPRESSION_BINS)


def test_set_stems_number_anchors_and_challenge_and_suffix_repeated_buckets():
    from runner.video.export import set_stems

    items = [cand(i, yaw=20 if i % 2 else 0) for i in range(5)]
    assert set_stems("anchors", items) == [f"anchor_{i:03d}" for i in range(1, 6)]
    assert set_stems("challenge", items[:2]) == ["challenge_001", "challenge_002"]
    cov = set_stems("coverage", items)
    assert len(set(cov)) == 5 and cov[:3] == ["cov_yaw0_pitch0_neutral", "cov_yaw22_pitch0_neutral",
                                              "cov_yaw0_pitch0_neutral_2"]


@pytest.mark.parametrize("seed", range(6))
def test_challenge_set_is_spaced_in_time_and_novel(seed):
    rng = np.random.default_rng(seed)
    gap = int(rng.integers(5, 20))
    sel = Selector(challenge_max=8, challenge_min_gap=gap, novelty_add=0.15)
    look = unit(rng.normal(size=32))
    # one moment: a run of consecutive extreme-pose frames that look alike (the old set took 4+ of these)
    for f in range(100, 100 + 2 * gap):
        sel.offer(cand(f, yaw=-44, quality=float(rng.uniform(0.5, 1.0)), general=look + 0.01 * rng.normal(size=32)))
    picked = sel.challenge()
    assert len(picked) == 1, "frames of one moment that look alike count once"
    # ten moments far apart that look different: 5-8 of them are kept
    for k in range(10):
        f = 1000 + k * 3 * gap
        kind = [dict(yaw=44), dict(lighting=30.0), dict(occlusion=0.7)][k % 3]
        for j in range(3):  # each moment is a few consecutive frames
            sel.offer(cand(f + j, quality=float(rng.uniform(0.2, 0.9)), general=unit(rng.normal(size=32)), **kind))
    picked = sel.challenge()
    assert 5 <= len(picked) <= 8
    for a in picked:
        for b in picked:
            if a is not b:
                apart = abs(a.frame_idx - b.frame_idx)
                assert apart >= gap and (apart >= 2 * gap or 1.0 - float(a.general @ b.general) >= 0.15)
    assert {k for c in picked for k in c.challenge_kinds()} >= {"extreme_pose", "dark", "heavy_occlusion"}
    # moments far apart count as diverse even when the descriptor reads them alike (the fallback)
    sel = Selector(challenge_max=8, challenge_min_gap=gap, novelty_add=0.15)
    for k in range(12):
        sel.offer(cand(5000 + k * 2 * gap, yaw=44, general=look))
    assert len(sel.challenge()) == 8


class ProfileBackend(SquareBackend):
    """HOG stand-in that sees only red squares ('frontal'); analyze_cnn sees red and green ones
    ('profiles') and records the scale it was asked for."""

    name = "dlib"

    def __init__(self) -> None:
        super().__init__()
        self.cnn_calls: list[tuple[tuple[int, int], float]] = []

    def analyze(self, rgb):
        return super().analyze(np.where((rgb[:, :, 1:2] > 200), 0, rgb).astype(np.uint8))

    def analyze_cnn(self, rgb, *, scale=1.0):
        self.cnn_calls.append((rgb.shape[:2], scale))
        faces = super().analyze(np.stack([np.maximum(rgb[:, :, 0], rgb[:, :, 1])] * 3, axis=-1))
        self.sizes.pop()
        for f in faces:
            f.extra["detector"] = "cnn"
        return faces


def profile_frames(n: int, turn_at: int, side: int = 100, w: int = 640, h: int = 360):
    from runner.video.decode import Frame

    for i in range(n):
        rgb = np.zeros((h, w, 3), np.uint8)
        x = 100 + 6 * i
        rgb[100:100 + side, x:x + side, 0 if i < turn_at else 1] = 255
        yield Frame(i * 5, i * 166.0, rgb)


@pytest.mark.parametrize("threads", [1, 2])
def test_profiles_hog_misses_are_found_by_the_cnn(threads):
    from runner.video.pipeline import PROFILE_FRAME_SIDE, FrameDetector, _analyze_frames

    backends = [ProfileBackend() for _ in range(threads)]
    det = FrameDetector()
    out = list(_analyze_frames(profile_frames(12, turn_at=4), backends, full_every=3, detector=det))
    assert all(len(obs) == 1 for _, obs in out), "every frame has its face, frontal or profile"
    assert [o[0].detector for _, o in out] == [""] * 4 + ["cnn"] * 8
    calls = [c for b in backends for c in b.cnn_calls]
    assert det.counts["cnn_faces"] == 8 and det.counts["cnn_runs"] == len(calls) == 8
    whole = [s for shape, s in calls if shape == (360, 640)]
    assert whole and all(s == pytest.approx(PROFILE_FRAME_SIDE / 640) for s in whole), "whole frames at reduced size"
    assert all(s <= 1.0 for _, s in calls)
    off = list(_analyze_frames(profile_frames(12, turn_at=4), [ProfileBackend()], full_every=3,
                               detector=FrameDetector(profile=False)))
    assert [len(o) for _, o in off] == [1] * 4 + [0] * 8


def test_profile_search_backs_off_on_faceless_frames_and_skips_small_lost_faces():
    from runner.video.decode import Frame
    from runner.video.pipeline import PROFILE_MAX_SKIP, FrameDetector, _analyze_frames

    b = ProfileBackend()
    empty = (Frame(i, i * 40.0, np.zeros((90, 160, 3), np.uint8)) for i in range(40))
    list(_analyze_frames(empty, [b], full_every=1, detector=FrameDetector()))
    runs = len(b.cnn_calls)
    assert runs <= 40 / (PROFILE_MAX_SKIP + 1) + 3 and runs >= 40 / (PROFILE_MAX_SKIP + 1)
    # a 40 px face that turns: too small for the CNN without upsampling, so no run is spent on it
    b = ProfileBackend()
    out = list(_analyze_frames(profile_frames(6, turn_at=1, side=40), [b], full_every=6, detector=FrameDetector()))
    assert [len(o) for _, o in out] == [1, 0, 0, 0, 0, 0] and b.cnn_calls == []


def test_stop_reason_codes(tmp_path):
    from runner.video.descriptors import FallbackDescriptor
    from runner.video.pipeline import STOP_REASONS, build_identity_sets

    import av

    path = tmp_path / "square.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 200, 120, "yuv420p"
        for frame in square_frames(12):
            for pkt in s.encode(av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    res = build_identity_sets(str(path), face_backend=SquareBackend(), general_embedder=FallbackDescriptor(),
                              options={"stride": 1})
    assert len(res.persons) == 1
    p = res.persons[0]
    # a flat square has no texture: it fails the loose gate's blur limit, so nothing can be saved
    assert p.stop_reason == "no_candidates" and p.stop_reason in STOP_REASONS and "loose gate" in p.stop_detail
    assert p.stopped_early is False
