"""The reviewer's drops and moves of video identity frames (runner review) applied to a built
result before export (runner/video/review.py): a small result of real carphone.mp4 face crops,
exported the way the stage exports it, decided by the manifest's sha256 like the review page."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.video import buckets as B
from runner.video.review import SETS, apply_identity_decisions

YAWS = (0.0, 20.0, -20.0, 40.0, -44.0, 10.0)


@pytest.fixture(scope="module")
def result(shared_data):
    """Six real frames of carphone.mp4 (centre crops, 48 px) as one person's three sets; frame 0 is
    an anchor and a coverage frame, as the builder makes the best frames."""
    from PIL import Image

    from runner.video.decode import VideoInfo, iter_frames
    from runner.video.pipeline import DEFAULTS, PersonResult, VideoResult
    from runner.video.selection import Candidate
    from runner.video.tracking import TrackScore

    frames = []
    for f in iter_frames(str(shared_data / "video" / "carphone.mp4"), stride=10):
        h, w = f.rgb.shape[:2]
        crop = np.asarray(Image.fromarray(f.rgb[h // 4: 3 * h // 4, w // 4: 3 * w // 4]).resize((48, 48)))
        frames.append((f.index, crop))
        if len(frames) == len(YAWS):
            break
    cands = []
    for (idx, crop), yaw in zip(frames, YAWS):
        measures = {"brightness": 128.0, "occlusion": 0.0}
        cands.append(Candidate(person=0, frame_idx=idx, timestamp_ms=idx * 40.0, bins=B.bins_for(yaw, 0.0, measures),
                               quality=0.5, stable=0.95, strict=True, extreme_pose=B.extreme_pose(yaw, 0.0),
                               general=np.eye(8)[idx % 8], crop=crop, crop_box=(44, 36, 132, 108), yaw=yaw,
                               measures=measures))
    person = PersonResult(person_id=0, track_ids=[0], track_score=TrackScore(0, 0.8, 1.0, 0.5, 0.9, 3),
                          prototype_type="medoid_strict", prototype_frames=3, prototype_frame_idx=0, tau=0.9,
                          reference_similarity=None, anchors=cands[:2], coverage=[cands[0], *cands[2:4]],
                          challenge=cands[4:], stop_reason="video_exhausted", stop_detail="end of video",
                          filled={"yaw": 3, "pitch": 1, "expression": 1, "occlusion": 1, "lighting": 1},
                          timeline=[], gate_counts={}, actions={}, observations=6, candidates=6)
    return VideoResult(VideoInfo("carphone.mp4", 176, 144, 25.0, 382, 15.3, "h264", "pyav"), persons=[person],
                       options=dict(DEFAULTS), sampled_frames=39, decoded_frames=382)


def _export(res, out: Path) -> dict:
    from runner.video.export import export_result

    summary = export_result(res, out / "identity", out / "images", video_rel="video/carphone.mp4",
                            video_sha256="cd" * 32, source_index=0, label="", identity_model="dlib",
                            general_model="fallback", general_is_fallback=True)
    manifest = [json.loads(x) for x in (out / "images" / "manifest.jsonl").read_text().splitlines()]
    pdir = out / "identity" / "person_0"
    sets = {s: [json.loads(m.read_text()) for m in sorted((pdir / s).glob("*_meta.json"))] for s in SETS}
    return {"summary": summary, "manifest": manifest, "sets": sets,
            "person": json.loads((pdir / "meta.json").read_text())}


def _frame_of(manifest: list[dict]) -> dict[int, str]:
    return {r["video"]["frame_idx"]: r["sha256"] for r in manifest}


@pytest.fixture(scope="module")
def plain(result, tmp_path_factory):
    return _export(copy.deepcopy(result), tmp_path_factory.mktemp("plain"))


def test_drop_and_move_reach_sets_counts_manifest_and_buckets(result, plain, tmp_path) -> None:
    frames = sorted(_frame_of(plain["manifest"]))
    sha = _frame_of(plain["manifest"])
    first, second, cov, chal = frames[0], frames[1], frames[2], frames[4]
    decided = {sha[first]: {"decision": "drop"},                     # an anchor that is also coverage
               sha[second]: {"decision": "set", "set": "challenge"},  # anchor -> challenge
               sha[cov]: {"decision": "drop"},
               sha[chal]: {"decision": "set", "set": "coverage"}}
    res = copy.deepcopy(result)
    done = apply_identity_decisions(res, decided)
    assert (done["dropped"], done["moved"], done["applied"]) == (2, 2, sorted(decided))
    got = _export(res, tmp_path)
    in_set = {s: [m["frame_idx"] for m in got["sets"][s]] for s in SETS}
    assert first not in sum(in_set.values(), []) and cov not in sum(in_set.values(), [])
    assert in_set["anchors"] == [] and second in in_set["challenge"] and chal in in_set["coverage"]
    assert {m["type"] for m in got["sets"]["coverage"]} == {"coverage"}
    pm = got["person"]
    assert (pm["anchor_count"], pm["coverage_count"], pm["challenge_count"]) == (0, 2, 2)
    assert pm["total_saved"] == 4 == got["summary"]["images"] == len(got["manifest"])
    assert plain["person"]["total_saved"] == 6
    assert pm["coverage_buckets_filled"]["yaw"] == f"{len({m['bins']['yaw'] for m in got['sets']['coverage']})}/7"
    assert {r["sha256"] for r in got["manifest"]} == set(sha.values()) - {sha[first], sha[cov]}
    assert apply_identity_decisions(copy.deepcopy(result), {}) == {"dropped": 0, "moved": 0, "applied": []}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([None, "drop", "anchors", "coverage", "challenge"]), min_size=6, max_size=6))
def test_any_decisions_leave_exactly_what_the_reviewer_asked(result, plain, choice) -> None:
    sha = _frame_of(plain["manifest"])
    frames = sorted(sha)
    decided = {sha[f]: ({"decision": "drop"} if c == "drop" else {"decision": "set", "set": c})
               for f, c in zip(frames, choice) if c}
    res = copy.deepcopy(result)
    apply_identity_decisions(res, decided)
    with tempfile.TemporaryDirectory() as tmp:
        got = _export(res, Path(tmp))
    before = {s: {m["frame_idx"] for m in plain["sets"][s]} for s in SETS}
    for f, c in zip(frames, choice):
        where = {s for s in SETS if f in {m["frame_idx"] for m in got["sets"][s]}}
        if c == "drop":
            assert not where
        elif c:
            assert where == {c}
        else:
            assert where == {s for s in SETS if f in before[s]}
    pm = got["person"]
    for s, field in (("anchors", "anchor_count"), ("coverage", "coverage_count"), ("challenge", "challenge_count")):
        assert pm[field] == len(got["sets"][s])
    assert pm["total_saved"] == len({m["frame_idx"] for s in SETS for m in got["sets"][s]}) == len(got["manifest"])


def test_only_the_identity_section_enters_video_identitys_key(project: Path, shared_data) -> None:
    from runner.plan.graph import build_graph
    from runner.review import decisions
    from runner.spec import load_spec

    spec_file = project / "specs" / "hero.yaml"
    (project / "clip.mp4").write_bytes((shared_data / "video" / "carphone.mp4").read_bytes())
    spec_file.write_text("version: 1\ncharacter: {name: hero, trigger: hrochr}\n"
                         "dataset: {sources: [{video: ../clip.mp4}]}\n")

    def section(data: dict) -> dict | None:
        decisions.review_path(spec_file).write_text(decisions.dump(data))
        return build_graph([load_spec(spec_file)]).nodes["hero:video_identity[0]"].config.get("review")

    data = decisions.empty()
    data["images"]["aa" * 32] = {"decision": "drop", "reference": True}
    data["ratings"]["bb" * 32] = {"rating": "fail"}
    assert section(data) is None  # dataset and evaluation decisions never re-run the video builder
    data["identity"]["cc" * 32] = {"decision": "drop", "note": "blurred", "person": 0}
    data["identity"]["dd" * 32] = {"decision": "set", "set": "challenge", "person": 0}
    got = section(data)
    assert got == {"identity": {"cc" * 32: {"decision": "drop"}, "dd" * 32: {"decision": "set", "set": "challenge"}}}
    assert decisions.describe_change(None, got) == "review: 1 video frame dropped, 1 video frame moved to another set"
    data["identity"]["ee" * 32] = {"decision": "drop", "origin": "hero:video_identity[3]"}  # another video's frame
    data["identity"]["cc" * 32]["origin"] = "hero:video_identity[0]"
    assert section(data) == got


def _state(tmp: Path, review_file: Path):
    from types import SimpleNamespace

    from runner.review.state import ReviewState, StageOutputs
    from runner.stages import registry

    sid = "hero:video_identity[0]"
    plan = SimpleNamespace(graph=SimpleNamespace(nodes={sid: SimpleNamespace(kind="video_identity")},
                                                 registry=registry()))
    folders = {"identity": tmp / "identity", "images": tmp / "images"}
    return ReviewState(spec=None, review_file=review_file, plan=plan, store_dir=tmp.resolve(),
                       stages={sid: StageOutputs(sid, "k", folders, {}, True)})


def test_the_review_page_keys_exported_frames_as_video_identity_applies_them(result, tmp_path) -> None:
    """The page lists the exporter's real layout (JPEG + meta) under the manifest's PNG sha256,
    the key the post-step matches; a drop the stage applied is not called a vanished frame."""
    from runner.review import decisions

    review_file = tmp_path / "hero.review.yaml"
    first = _export(copy.deepcopy(result), tmp_path / "a")
    items = [i for v in _state(tmp_path / "a", review_file).identity() for p in v["persons"]
             for s in p["sets"].values() for i in s]
    by_sha = {r["sha256"]: r["id"] for r in first["manifest"]}
    assert len(items) == sum(len(v) for v in first["sets"].values()) == 7
    assert all(i["sha"] in by_sha and i["image_id"] == by_sha[i["sha"]] for i in items)
    dropped = items[0]["sha"]
    decisions.save(review_file, [("identity", dropped, {"decision": "drop"})], by="Ada")
    res = copy.deepcopy(result)
    done = apply_identity_decisions(res, decisions.stage_section(decisions.load(review_file), "identity")["identity"])
    _export(res, tmp_path / "b")
    (tmp_path / "b" / "identity" / "review.json").write_text(json.dumps(done))
    st = _state(tmp_path / "b", review_file)
    assert dropped not in {i["sha"] for v in st.identity() for p in v["persons"] for s in p["sets"].values() for i in s}
    assert st.orphans() == []
    (tmp_path / "b" / "identity" / "review.json").unlink()  # without the stage's record it is listed
    assert [o["sha"] for o in st.orphans()] == [dropped]
