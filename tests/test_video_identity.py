"""The video_identity stage on the shared clips (../shared/data/video) with the dlib backend.

- short_hamilton_clip.mp4: the main person's anchors are lin_manuel_miranda by identity; the
  over-the-shoulder profile (frames 20-45), which dlib's HOG detector misses, is found;
- carphone.mp4: one person, with mouth_open frames saved;
- both: the output layout downstream tools read (anchors/anchor_001.jpg, coverage/cov_yaw.._pitch.._
  <expression>.jpg, challenge/challenge_001.jpg, each with its _meta.json; meta.json's fields and
  types) and a challenge set spread over the clip;
- bigbuckbunny_no_faces.mp4: an empty result with a clear reason;
- a truncated copy and a text file named .mp4: quarantined with a reason;
- a side-by-side clip made from two of them: two people and a pair/ set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import registry as stage_registry
from runner.stages import video_identity as V

REQUIRED_META = ("type", "person_id", "file", "frame_idx", "timestamp_ms", "bins", "bucket", "quality", "novelty",
                 "stable", "face_bbox", "crop_box", "embedding_model", "gate_version", "detector")
SET_NAMES = {"anchors": r"anchor_\d{3}", "challenge": r"challenge_\d{3}",
             "coverage": r"cov_yaw-?\d+_pitch-?\d+_(neutral|smile|mouth_open|eyes_closed)(_\d+)?"}


def config_for(video: Path, *, people: int = 1, stride: int = 5, upsample: int = 1, **options) -> dict:
    opts = {k: v for k, v in V.video_option_defaults().items() if k != "upsample"}
    opts["general_fallback"] = "always"  # the labelled fallback descriptor: no model load in most tests
    opts.update(options)
    return {"video": video.name, "source_index": 0, "label": "clip", "people": people, "stride": stride,
            "face": {"backend": "dlib", "dlib_detector": "hog", "upsample": upsample, "insightface_pack": "buffalo_l",
                     "insightface_root": "~/.insightface"},
            "options": opts, "references": []}


def run_stage(tmp: Path, video: Path, refs: list[Path] = (), **kw) -> tuple[dict, LocalStageContext]:
    ctx = LocalStageContext.for_folder(tmp, stage_id="hero:video_identity[0]", character="hero",
                                       project_root=video.parent)
    inputs = {"video": contract.Artifact("video", video.parent, files=(video,))}
    if refs:
        inputs["references0"] = contract.Artifact("references0", Path(refs[0]).parent, files=tuple(refs))
    out = V.run(config_for(video, **kw), inputs, ctx)
    return out, ctx


def summary_of(out: dict) -> dict:
    return json.loads((out["identity"].path / "summary.json").read_text())


def metas(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*_meta.json"))]


def render(sections: list[contract.ReportSection], repo_root: Path) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(repo_root / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return "".join(env.get_template(s.template).render(**s.context) for s in sections)


@pytest.fixture(scope="module")
def dlib_backend():
    from runner.vision.faces import get_face_backend

    return get_face_backend("dlib", upsample=1)


@pytest.fixture(scope="module")
def hamilton(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("hamilton")
    video = folder / "short_hamilton_clip.mp4"
    shutil.copy(shared_data / "video" / video.name, video)
    out, ctx = run_stage(folder / "stage", video)
    return out, ctx


@pytest.mark.slow  # the hamilton fixture: about 24 s
def test_hamilton_anchors_are_lin_manuel_miranda(hamilton, shared_data, dlib_backend, repo_root):
    from PIL import Image

    from runner.vision.faces import identity_similarity

    out, ctx = hamilton
    s = summary_of(out)
    assert s["empty_reason"] == "" and s["quarantine"] is None and len(s["persons"]) == 1
    lmm = Image.open(shared_data / "faces/lin_manuel_miranda/lmm_01.png").convert("RGB")
    ref = dlib_backend.analyze(np.asarray(lmm))
    person = out["identity"].path / "person_0"
    anchors = sorted((person / "anchors").glob("*.jpg"))
    assert len(anchors) >= 2
    for a in anchors:
        faces = dlib_backend.analyze(np.asarray(Image.open(a).convert("RGB")))
        assert faces, f"no face in anchor {a.name}"
        sim = identity_similarity(faces[0].embedding, ref[0].embedding)
        assert sim >= dlib_backend.default_identity_threshold, (a.name, sim)
    for set_name in ("anchors", "coverage", "challenge"):
        for m in metas(person / set_name):
            for key in REQUIRED_META:
                assert key in m, (set_name, key)
            # under tau only when the track carries the identity (runner.video.stability)
            assert m["stable"] >= s["persons"][0]["tau"] or m["identity"]["basis"] == "track_continuity"
            assert m["embedding_model"]["general_is_fallback"] is True
    pm = json.loads((person / "meta.json").read_text())
    assert pm["anchor_count"] == len(anchors) and int(pm["coverage_buckets_filled"]["yaw"].split("/")[0]) >= 4
    assert pm["stop_reason"] and pm["conditioning_ratio"]["anchor"] + pm["conditioning_ratio"]["coverage"] \
        + pm["conditioning_ratio"]["challenge"] == pytest.approx(100.0)
    # the images artifact in the ingest layout
    records = [json.loads(x) for x in (out["images"].path / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == pm["total_saved"] and all((out["images"].path / r["file"]).is_file() for r in records)
    assert {r["source"] for r in records} == {"short_hamilton_clip.mp4"}
    # the report section renders, says which novelty descriptor it used, and shows the grid
    html = render(V.report_sections(config_for(Path("x.mp4")), out, {"thumbnail_px": 96}), repo_root)
    assert "Coverage grid" in html and "cheap fallback descriptor" in html and "data:image/jpeg;base64," in html
    assert "<svg" in html and pm["stop_reason"] in html and pm["stop_detail"].split(";")[0] in html


@pytest.fixture(scope="module")
def carphone(tmp_path_factory, shared_data):
    video = shared_data / "video" / "carphone.mp4"
    return run_stage(tmp_path_factory.mktemp("carphone"), video, refs=[shared_data / "faces/obama/obama_01.jpg"],
                     stride=4)


def check_layout(identity: Path, fps: float) -> list[dict]:
    """The layout and meta.json of every person; returns the person metas."""
    import re

    from PIL import Image

    from runner.video.pipeline import STOP_REASONS

    persons = []
    for pdir in sorted(identity.glob("person_*")):
        pm = json.loads((pdir / "meta.json").read_text())
        for key, kind in (("person_id", int), ("track_score", float), ("track_score_components", dict),
                          ("prototype_type", str), ("anchor_count", int), ("coverage_buckets_filled", dict),
                          ("challenge_count", int), ("total_saved", int), ("stop_reason", str), ("stop_detail", str)):
            assert isinstance(pm[key], kind), (pdir.name, key, pm.get(key))
        assert pdir.name == f"person_{pm['person_id']}" and 0.0 <= pm["track_score"] <= 1.0
        c = pm["track_score_components"]
        assert pm["track_score"] == pytest.approx(0.4 * c["size"] + 0.3 * c["centre"] + 0.3 * c["length"], abs=1e-5)
        assert pm["prototype_type"] in ("medoid_strict", "medoid_loose", "medoid_all")
        assert pm["stop_reason"] in STOP_REASONS
        assert set(pm["coverage_buckets_filled"]) == {"yaw", "pitch", "expression", "occlusion", "lighting"}
        for axis, filled in pm["coverage_buckets_filled"].items():
            n, total = re.fullmatch(r"(\d+)/(\d+)", filled).groups()
            assert 0 <= int(n) <= int(total) and int(total) == {"yaw": 7, "pitch": 5, "expression": 4}.get(axis, 3)
        frames = set()
        for set_name, pattern in SET_NAMES.items():
            images = sorted(x.name for x in (pdir / set_name).glob("*.jpg"))
            metas_ = sorted(x.name for x in (pdir / set_name).glob("*_meta.json"))
            assert sorted(m.replace("_meta.json", ".jpg") for m in metas_) == images, set_name
            assert all(re.fullmatch(pattern + r"\.jpg", n) for n in images), (set_name, images)
            if set_name != "coverage":  # numbered from 001 without holes
                assert images == [f"{set_name[:-1] if set_name == 'anchors' else set_name}_{i:03d}.jpg"
                                  for i in range(1, len(images) + 1)]
            for name in images:
                m = json.loads((pdir / set_name / name.replace(".jpg", "_meta.json")).read_text())
                assert m["file"] == name and m["person_id"] == pm["person_id"]
                if set_name == "coverage":
                    b = m["bucket"]
                    assert name.startswith(f"cov_yaw{b['yaw']}_pitch{b['pitch']}_{b['expression']}")
                with Image.open(pdir / set_name / name) as im:
                    assert im.format == "JPEG" and list(im.size) == m["image_size"]
                frames.add(m["frame_idx"])
        assert pm["anchor_count"] == len(list((pdir / "anchors").glob("*.jpg")))
        assert pm["challenge_count"] == len(list((pdir / "challenge").glob("*.jpg")))
        assert pm["total_saved"] == len(frames)
        challenge = sorted(json.loads(x.read_text())["frame_idx"] for x in (pdir / "challenge").glob("*_meta.json"))
        assert len(challenge) <= 8
        half_second = round(fps / 2)
        assert (np.diff(challenge) >= half_second).all(), f"challenge frames {challenge} are not spread out"
        # ... and none left out: every hard stable frame not taken is within a second of one taken
        # (too close to it), unless the set is full
        timeline = json.loads((pdir / "timeline.json").read_text())
        hard = [e["frame_idx"] for e in timeline if "+challenge:" in e["action"]]
        if hard and len(challenge) < 8:
            for f in set(hard) - set(challenge):
                assert min(abs(f - c) for c in challenge) < 2 * half_second, (f, challenge)
        assert set(challenge) <= set(hard)
        # a short set says so (the clip's distinct hard moments), instead of padding with repeats
        ch = pm["challenge"]
        assert ch["wanted"] == "5-8" and ch["hard_frames"] == len(set(hard)) and (ch["moments"] >= 1) == bool(hard)
        assert bool(ch["note"]) == (len(challenge) < 5) and (not ch["note"] or f"{ch['moments']} moment" in ch["note"])
        persons.append(pm)
    return persons


@pytest.mark.parametrize("clip", ["hamilton", "carphone"])
@pytest.mark.slow  # both clips' fixtures: 6-24 s
def test_layout_meta_and_challenge_spacing_on_real_clips(clip, request):
    out, _ = request.getfixturevalue(clip)
    s = summary_of(out)
    persons = check_layout(out["identity"].path, s["info"]["fps"])
    assert [p["person_id"] for p in persons] == [p["person_id"] for p in s["persons"]] == [0]


@pytest.mark.slow  # the hamilton fixture: about 24 s
def test_hamilton_profile_segment_is_found(hamilton):
    """Frames 20-45 of the clip are an over-the-shoulder profile (a face of about 200 px) that the
    HOG detector does not find in any of them; the CNN fallback does."""
    out, _ = hamilton
    s = summary_of(out)
    profile = [t for t in s["tracks"] if t["first_frame"] <= 45 and t["last_frame"] >= 20
               and t["detectors"].get("cnn", 0) >= 2]
    assert profile, s["tracks"]
    assert s["detections"]["cnn_faces"] >= 3 and s["detections"]["cnn_runs"] >= 1
    timeline = json.loads((out["identity"].path / "person_0" / "timeline.json").read_text())
    found = [e["frame_idx"] for e in timeline if 20 <= e["frame_idx"] <= 45 and e["detector"] == "cnn"]
    assert len(found) >= 2, "the profile is the main person's (its track joins theirs)"
    # Barack Obama, in the audience after the cut between frames 210 and 215, sits in the main person's track
    # (boxes overlap across the cut) at 0.85-0.87: never taken for them, by embedding or track
    assert all(e["frame_idx"] <= 210 or (e["identity"] == "embedding" and e["action"].startswith("unstable"))
               for e in timeline)


@pytest.mark.slow  # the carphone fixture: about 6 s
def test_carphone_one_person_with_mouth_open_frames(carphone):
    out, ctx = carphone
    s = summary_of(out)
    assert len(s["persons"]) == 1
    person = out["identity"].path / "person_0"
    saved = [m for name in ("anchors", "coverage", "challenge") for m in metas(person / name)]
    assert any(m["bins"]["expression"] == "mouth_open" for m in saved)
    # an unrelated reference: recorded, said, and the track_score choice stands
    assert s["persons"][0]["reference_similarity"] < s["persons"][0]["tau"]
    assert any("no track matches the references" in n for n in s["notes"])


def test_no_face_clip_is_an_empty_result_with_a_reason(tmp_path, shared_data, repo_root):
    # 1280x720: no upsampling keeps the test short (a face would be over 80 px here anyway)
    out, ctx = run_stage(tmp_path, shared_data / "video" / "bigbuckbunny_no_faces.mp4", stride=10, upsample=0)
    s = summary_of(out)
    assert s["persons"] == [] and s["empty_reason"].startswith("no person found")
    assert not list(out["identity"].path.glob("person_*")) and s["tracks"] == [] and s["images"] == 0
    assert s["detections"]["faces"] == 0 and s["detections"]["cnn_runs"] >= 1, "profiles were looked for"
    assert (out["images"].path / "manifest.jsonl").read_text() == ""
    assert (out["quarantine"].path / "quarantine.jsonl").read_text() == ""
    assert any("empty result" in w for w in ctx.warnings)
    html = render(V.report_sections(config_for(Path("x.mp4")), out, {}), repo_root)
    assert "No identity sets: no person found" in html


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_truncated_and_non_video_files_are_quarantined(tmp_path, shared_data, kind, repo_root):
    video = tmp_path / "broken.mp4"
    if kind == "truncated":
        data = (shared_data / "video" / "short_hamilton_clip.mp4").read_bytes()
        video.write_bytes(data[: len(data) // 2])
    else:
        video.write_text("not a video\n" * 100)
    out, ctx = run_stage(tmp_path / "stage", video)
    q = [json.loads(x) for x in (out["quarantine"].path / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and q[0]["source"] == "broken.mp4" and q[0]["reason"] and q[0]["detail"]
    s = summary_of(out)
    assert s["persons"] == [] and s["empty_reason"]
    assert (out["images"].path / "manifest.jsonl").read_text() == ""
    html = render(V.report_sections(config_for(video), out, {}), repo_root)
    assert "broken.mp4" in html and q[0]["reason"] in html


def test_missing_video_is_a_stage_error(tmp_path):
    ctx = LocalStageContext.for_folder(tmp_path)
    with pytest.raises(contract.StageError) as e:
        V.run(config_for(tmp_path / "nope.mp4"), {"video": contract.Artifact("video", tmp_path, files=())}, ctx)
    assert "nope.mp4" in str(e.value) and e.value.hint


def _side_by_side(shared_data: Path, dest: Path) -> Path:
    """carphone (scaled x2) beside a crop of the hamilton clip: two people in every frame."""
    import av
    import cv2

    from runner.video.decode import iter_frames

    left = [f.rgb for f in iter_frames(shared_data / "video" / "carphone.mp4", stride=1)][:40]
    right = [f.rgb for f in iter_frames(shared_data / "video" / "short_hamilton_clip.mp4", wanted=set(range(95, 135)))]
    with av.open(str(dest), "w") as out:
        s = out.add_stream("libx264", rate=10, options={"crf": "16", "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = 704, 288, "yuv420p"
        for a, b in zip(left, right):
            frame = np.concatenate([cv2.resize(a, (352, 288)), b[0:288, 100:452]], axis=1)
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return dest


@pytest.mark.slow  # about 5 s
def test_two_people_and_pair_set(tmp_path, shared_data):
    video = _side_by_side(shared_data, tmp_path / "two.mp4")
    out, ctx = run_stage(tmp_path / "stage", video, people=2, stride=4)
    s = summary_of(out)
    assert len(s["persons"]) == 2, s["notes"]
    root = out["identity"].path
    for k in (0, 1):
        assert (root / f"person_{k}" / "meta.json").is_file()
    pairs = metas(root / "pair")
    assert pairs and all(len(p["persons"]) == 2 for p in pairs)
    assert s["pairs"] == len(pairs)


@pytest.mark.slow  # imports torch and builds the tiny DINO model once
def test_general_vision_model_path_is_labelled(tmp_path, shared_data, repo_root):
    video = shared_data / "video" / "carphone.mp4"
    out, ctx = run_stage(tmp_path, video, stride=8, general_model="builtin:tiny-dino", general_fallback="never")
    s = summary_of(out)
    assert s["embedding_model"]["general"] == "builtin:tiny-dino" and s["general_is_tiny_random"] is True
    assert s["embedding_model"]["general_is_fallback"] is False
    html = render(V.report_sections(config_for(video), out, {"thumbnail_px": 64}), repo_root)
    assert "tiny random model" in html


@pytest.mark.slow  # about 3 s
def test_spec_to_report_through_the_engine(project, shared_data, monkeypatch):
    """A video source in a spec: planned as hero:video_identity[0], run by the engine, cached on the
    second apply, its images offered downstream, its section in the report."""
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    stage_registry()
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {k: v for k, v in contract.BUILTIN._kinds.items()
                                            if k in ("video_identity", "report")})
    (project / "rides").mkdir()
    shutil.copy(shared_data / "video" / "carphone.mp4", project / "rides" / "ride_001.mp4")
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(
        "version: 1\n"
        "character: {name: hero, trigger: hrochr, class_word: man}\n"
        "dataset:\n"
        "  sources:\n"
        "    - video: ../rides/ride_001.mp4\n"
        "      stride: 8\n"
        "      video_options: {general_fallback: always}\n"
    )
    first = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
    assert first.status == "succeeded", [(r.stage_id, r.error) for r in first.results]
    ran = {r.stage_id: r.status for r in first.results}
    assert ran["hero:video_identity[0]"] == "succeeded"
    html = first.reports["hero"].read_text()
    assert "Identity sets from video rides/ride_001.mp4" in html and "Coverage grid" in html
    second = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
    assert {r.stage_id: r.status for r in second.results}.get("hero:video_identity[0]") in (None, "cached")


@pytest.mark.slow  # the carphone fixture: about 6 s
def test_reviewer_drop_and_move_reach_the_stage_outputs(carphone, tmp_path, shared_data):
    """The stage applies its config's review section (runner review's identity decisions, keyed
    by the frame PNG's sha256 in the images manifest) to the real carphone sets."""
    out, _ = carphone
    manifest = [json.loads(x) for x in (out["images"].path / "manifest.jsonl").read_text().splitlines()]
    by_set = {s: [r for r in manifest if r["video"]["sets"] == [s]] for s in ("anchor", "coverage", "challenge")}
    drop = (by_set["coverage"] or by_set["challenge"])[0]
    move = next(r for r in manifest if r is not drop and "coverage" not in r["video"]["sets"])
    review = {"identity": {drop["sha256"]: {"decision": "drop"},
                           move["sha256"]: {"decision": "set", "set": "coverage"}}}
    before = json.loads((out["identity"].path / "person_0" / "meta.json").read_text())
    ctx = LocalStageContext.for_folder(tmp_path / "r2", stage_id="hero:video_identity[0]", character="hero",
                                       project_root=shared_data / "video")
    video = shared_data / "video" / "carphone.mp4"
    ref = shared_data / "faces/obama/obama_01.jpg"
    got = V.run({**config_for(video, stride=4), "review": review},
                {"video": contract.Artifact("video", video.parent, files=(video,)),
                 "references0": contract.Artifact("references0", ref.parent, files=(ref,))}, ctx)
    after_manifest = {r["sha256"]: r for r in
                      (json.loads(x) for x in (got["images"].path / "manifest.jsonl").read_text().splitlines())}
    assert drop["sha256"] not in after_manifest
    assert "coverage" in after_manifest[move["sha256"]]["video"]["sets"]
    pm = json.loads((got["identity"].path / "person_0" / "meta.json").read_text())
    assert pm["total_saved"] == before["total_saved"] - 1 == len(after_manifest)
    assert pm["coverage_count"] == len(list((got["identity"].path / "person_0" / "coverage").glob("*.jpg")))
    assert json.loads((got["identity"].path / "review.json").read_text())["applied"] == sorted(review["identity"])
