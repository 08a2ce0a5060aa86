"""Targeted re-extraction (runner/stages/extract.py, runner/video/extract.py) on the real clip.

The Hamilton clip's main person is lin_manuel_miranda (faces/lin_manuel_miranda is his reference).
The dataset is close-ups of him cropped from frames of the clip, so it lacks every wider shot;
the video supplies them. In the clip itself the frame cuts him at the thighs (medium by the shot
rule: under 6 face heights of frame below the chin), so the full-body test puts the same frames
at the top of a portrait (9:16) canvas: the pixels of the face are the clip's, and the frame now
holds his whole height below it, which is what the shot rule reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runner.core import contract

from runner.stages import registry as stage_registry
from runner.stages import common
from runner.video import extract as X
from runner.vision import balance as B

CLIP = "video/short_hamilton_clip.mp4"
CLOSE_UP_FRAMES = (90, 114, 138, 162, 186, 210)  # frames where dlib finds his face at about 91 px


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("n,k,lo,hi", [(7, 0, 0.25, 0.30), (20, 2, 0.25, 0.30), (5, 1, 0.5, 0.6), (40, 0, 0.1, 0.9)])
def test_needs_reach_the_middle_of_the_range(n, k, lo, hi):
    tally = B.Tally.of([(["full_body"], 1.0)] * k + [(["close_up"], 1.0)] * (n - k))
    (nd,) = X.needs(tally, {"full_body": [lo, hi]}, max_per_category=1000)
    after = (k + nd.wanted) / (n + nd.wanted)
    assert lo <= after and after >= (lo + hi) / 2 - 1e-9
    before = (k + nd.wanted - 1) / (n + nd.wanted - 1)
    assert before < (lo + hi) / 2  # one fewer would not reach the middle
    assert X.needs(tally, {"full_body": [lo, hi]}, max_per_category=2)[0].cap == min(2, nd.wanted)
    assert nd.reason().startswith(f"full-body: short of target {lo:.0%}-{hi:.0%} by ")


def test_no_need_when_at_target():
    tally = B.Tally.of([(["full_body"], 1.0)] * 3 + [(["close_up"], 1.0)] * 7)
    assert X.needs(tally, {"full_body": [0.25, 0.3], "close_up": [0.5, 0.8]}, 10) == []


def _cand(video, t, q, ph, cats=("full_body",)):
    return X.Candidate(video, int(t * 30), t, {"quality": q, "phash": ph, "categories": list(cats)}, list(cats))


def test_diverse_spaces_frames_and_drops_near_duplicates():
    rng = np.random.default_rng(0)
    hashes = [f"{int(v):016x}" for v in rng.integers(0, 2**63, size=30)]
    cands = [_cand("a.mp4", i * 0.25, 1.0 - i / 100, hashes[i]) for i in range(30)]
    picks, lost = X.diverse(cands, {"full_body": 100}, min_gap_s=1.0, dedupe_hamming=0)
    times = sorted(p.timestamp_s for p in picks)
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:])) and len(picks) >= 7
    assert lost["full_body"] == 30 - len(picks)
    # the same frame in another video is far in time but a near-duplicate by hash
    dup = _cand("b.mp4", 0.0, 0.5, hashes[0])
    picks2, _ = X.diverse([cands[0], dup], {"full_body": 5}, min_gap_s=1.0, dedupe_hamming=4)
    assert picks2 == [cands[0]]
    # a dataset image's hash also blocks, and the cap stops
    assert X.diverse([cands[0]], {"full_body": 5}, min_gap_s=0, dedupe_hamming=4, dataset_hashes=[hashes[0]])[0] == []
    assert len(X.diverse(cands, {"full_body": 2}, min_gap_s=0, dedupe_hamming=0)[0]) == 2
    # a frame of two needed categories counts for the first with room left, and says which
    both = [_cand("c.mp4", i * 2.0, 0.9 - i / 100, hashes[i], ("full_body", "wide")) for i in range(4)]
    picks3, _ = X.diverse(both, {"full_body": 1, "wide": 2}, min_gap_s=1.0, dedupe_hamming=0)
    assert [p.picked_for for p in picks3] == ["full_body", "wide", "wide"]


def test_choose_never_pushes_another_target_farther():
    entries = [{"categories": ["close_up"], "repeats": 1}] * 6 + [{"categories": ["medium"], "repeats": 1}] * 4
    picks = [_cand("a.mp4", i, 0.9, f"{i:016x}", ("full_body", "multi_character")) for i in range(6)]
    targets = {"full_body": [0.25, 0.3], "multi_character": [0.0, 0.1], "close_up": [0.4, 0.7]}
    chosen = X.choose(entries, picks, targets)
    start = B.Tally.of((e["categories"], 1.0) for e in entries)
    end = B.Tally.of([(e["categories"], 1.0) for e in entries] + [(p.record["categories"], 1.0) for p in chosen])
    for c, t in targets.items():
        assert B.distance(end.share(c), t) <= B.distance(start.share(c), t) + 1e-9


# --------------------------------------------------------------------------- the real clip through runner apply


def _frames(path: Path, wanted: set[int] | None = None):
    from runner.video.decode import iter_frames

    return list(iter_frames(path, wanted=wanted))


def _close_ups(clip: Path, dest: Path) -> None:
    """Tight crops around his face (close-ups) from a few frames of the clip."""
    from PIL import Image

    from runner.vision.faces import get_face_backend

    backend = get_face_backend("dlib")
    dest.mkdir(parents=True)
    for fr in _frames(clip, set(CLOSE_UP_FRAMES)):
        x0, y0, x1, y1 = backend.analyze(fr.rgb)[0].box
        fh = y1 - y0
        box = (max(0, x0 - 0.6 * fh), max(0, y0 - 0.7 * fh), min(fr.rgb.shape[1], x1 + 0.6 * fh),
               min(fr.rgb.shape[0], y1 + 0.9 * fh))
        Image.fromarray(fr.rgb).crop(tuple(int(v) for v in box)).save(dest / f"closeup_{fr.index:03d}.png")


def _portrait_clip(clip: Path, dest: Path, first: int, last: int) -> None:
    """Frames first..last of the clip at the top of a 640x1136 canvas (a 9:16 video)."""
    import av

    frames = [f for f in _frames(clip) if first <= f.index <= last]
    with av.open(str(dest), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 1136, "yuv420p"
        for f in frames:
            canvas = np.zeros((1136, 640, 3), np.uint8)
            canvas[: f.rgb.shape[0], : f.rgb.shape[1]] = f.rgb
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _apply(project: Path, video: str, targets: str, monkeypatch):
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    stage_registry()
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {k: v for k, v in contract.BUILTIN._kinds.items()
                                            if k in ("ingest", "analyze", "extract", "curate", "caption", "report")})
    spec_file = project / "specs" / "lin.yaml"
    spec_file.write_text(
        "version: 1\n"
        "character: {name: lin, trigger: lnmr, class_word: man, references: [../refs]}\n"
        "dataset:\n"
        "  sources:\n"
        "    - {images: ../photos}\n"
        f"    - {{video: {video}}}\n"
        "  analysis: {workers: 1}\n"
        "  curation: {min_face_px: 40}\n"
        f"  shots: {{strategy: report, targets: {targets}}}\n"
        "  extract: {sample_fps: 2, min_gap_s: 1.0}\n"
    )
    result = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
    assert result.status == "succeeded", [(r.stage_id, r.error) for r in result.results]
    return result, spec_file


@pytest.fixture
def lin_project(project, shared_data):
    (project / "refs").mkdir()
    shutil.copy(shared_data / "faces" / "lin_manuel_miranda" / "lmm_01.png", project / "refs")
    _close_ups(shared_data / CLIP, project / "photos")
    return project


def _curated(project: Path) -> tuple[list[dict], dict]:
    folders = sorted((project / ".runner" / "store").glob("*/curated"))
    assert folders
    folder = folders[-1]
    entries = [json.loads(x) for x in (folder / "curated.jsonl").read_text().splitlines() if x.strip()]
    return entries, json.loads((folder / "balance.json").read_text())


def _share(balance: dict, part: str, cat: str) -> float:
    return next(r["share"] for r in balance[part] if r["category"] == cat)


@pytest.mark.slow  # about 9 s
def test_full_body_gap_filled_from_a_video_in_one_apply(lin_project, shared_data, monkeypatch):
    """Close-ups only; a video with full-body frames: one apply ends with full-body in 25-30%, every
    added frame with its provenance in the curated records and the report."""
    (lin_project / "clips").mkdir()
    _portrait_clip(shared_data / CLIP, lin_project / "clips" / "portrait.mp4", 84, 216)
    result, _ = _apply(lin_project, "../clips/portrait.mp4", "{full_body: [0.25, 0.30]}", monkeypatch)
    entries, balance = _curated(lin_project)
    added = [e for e in entries if e.get("provenance")]
    assert added, "no extracted frame reached the curated dataset"
    full = sum(1 for e in entries if e["shot"] == "full_body") / len(entries)
    assert 0.25 <= full <= 0.30, (full, [e["shot"] for e in entries])
    assert _share(balance, "before", "full_body") == pytest.approx(full)
    times = sorted(e["provenance"]["timestamp_s"] for e in added)
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:]))
    for e in added:
        p = e["provenance"]
        assert p["video"] == "clips/portrait.mp4" and p["reason"].startswith("full-body: short of target 25%-30% by")
        assert isinstance(p["frame_index"], int) and e["identity"] >= balance["identity_threshold"]
    captioned = {p.stem for p in (lin_project / ".runner" / "store").glob("*/dataset/*.png")}
    assert {e["id"] for e in added} <= captioned  # caption found the frames' pixels
    html = result.reports["lin"].read_text()
    assert "Frames extracted from video" in html and "Where each added frame came from" in html
    for e in added:
        assert f"{e['provenance']['timestamp_s']:.2f} s" in html


@pytest.mark.slow  # about 6 s
def test_what_the_clip_cannot_supply_is_said(lin_project, shared_data, monkeypatch):
    """The clip as it is: medium shots fill medium's gap; it has no full-body frame of him, and the
    report says so instead of claiming the target."""
    (lin_project / "clips").mkdir()
    shutil.copy(shared_data / CLIP, lin_project / "clips" / "hamilton.mp4")
    result, _ = _apply(lin_project, "../clips/hamilton.mp4", "{full_body: [0.25, 0.30], medium: [0.2, 0.4]}",
                       monkeypatch)
    entries, balance = _curated(lin_project)
    added = [e for e in entries if e.get("provenance")]
    assert added and all(e["shot"] == "medium" for e in added)
    assert 0.2 <= _share(balance, "before", "medium") <= 0.4
    summary = json.loads((sorted((lin_project / ".runner" / "store").glob("*/analysis/summary.json"),
                                 key=lambda p: "needs" in p.read_text())[-1]).read_text())
    (line,) = [x for x in summary["could_not_supply"] if x.startswith("full-body")]
    assert "no frame of the character passing the gates is full-body in 1 video" in line
    assert "What the videos could not supply" in result.reports["lin"].read_text()


def _record(i: int, shot: str) -> dict:
    return {"id": f"r{i}", "shot": shot, "categories": [shot], "main_face": 0, "no_face": False, "identity": 0.95,
            "phash": f"{(0x9E3779B97F4A7C15 * (i + 1)) % 2**64:016x}", "flags": {},
            "faces": [{"box": [0, 0, 100, 100], "blur": 80.0,
                       "exposure": {"clipped_dark": 0.0, "clipped_bright": 0.0}}]}


@pytest.mark.parametrize("close,full", [(7, 0), (10, 1), (4, 2)])
def test_plan_notes_say_what_will_be_extracted(tmp_path, close, full):
    from runner.stages import extract as E

    config = {"videos": {"1": "clips/a.mp4", "2": "clips/b.mp4"}, "targets": {"full_body": [0.25, 0.3]},
              "max_per_category": 50, "curation": dict(common.CURATION_DEFAULTS)}
    before = E.plan_notes(config, {"analysis": None})
    assert before == ["after analysis: will look in 2 videos for frames of the categories under target among "
                      "full-body (25%-30%)"]
    adir = tmp_path / "analysis"
    adir.mkdir()
    recs = [_record(i, "close_up") for i in range(close)] + [_record(close + i, "full_body") for i in range(full)]
    (adir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (adir / "summary.json").write_text(json.dumps({"references": 1, "default_identity_threshold": 0.92}))
    notes = E.plan_notes(config, {"analysis": contract.Artifact("analysis", adir)})
    tally = B.Tally.of((r["categories"], 1.0) for r in recs)
    need = X.needs(tally, config["targets"], 50)
    if need:
        assert notes == [f"will extract up to {need[0].cap} full-body from 2 videos to reach targets"]
    else:
        assert "no frames to extract" in notes[0]


class _Ctx:
    """The few StageContext calls scan_video makes."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def log(self, msg: str) -> None:
        pass

    def progress(self, total, desc):
        class _P:
            def update(self, n):
                pass

            def close(self):
                pass

        return _P()


def _fake_analyze(rgb):
    return {"categories": ["full_body"], "quality": float(rgb.mean()) / 255.0, "phash": "0" * 16}


@pytest.mark.parametrize("cut", [None, 0.5, 0.01])
def test_scan_video_survives_truncated_and_unreadable_files(tmp_path, shared_data, cut):
    """A truncated clip gives the frames before the break; a file that is no video is skipped with a
    warning naming its source, never an exception."""
    from runner.stages.extract import scan_video

    data = (shared_data / "video" / "carphone.mp4").read_bytes()
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(data if cut is None else data[: int(len(data) * cut)])
    ctx = _Ctx()
    st, found = scan_video(3, "clips/clip.mp4", clip, 5.0, _fake_analyze, lambda r: None, {"full_body"}, ctx)
    assert st.sampled == len(found) == st.candidates
    if cut is None:
        assert st.error is None and st.sampled >= 20 and not ctx.warnings
    else:
        assert st.error and ctx.warnings and ctx.warnings[0].startswith("dataset.sources[3].video: ")
        assert st.sampled < 20
    missing, none = scan_video(0, "clips/gone.mp4", tmp_path / "gone.mp4", 5.0, _fake_analyze, lambda r: None,
                               {"full_body"}, ctx)
    assert none == [] and missing.error.startswith("missing")
