"""runner/video/clips.py: clips cut around the main person's track (synthetic timeline on a real clip)."""

import json
from pathlib import Path

import pytest

from runner.video.clips import crop_box, cut_clips

CARPHONE = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "carphone.mp4"


def _identity(tmp_path: Path, boxes: dict[int, list[float]], persons: bool = True) -> Path:
    idd = tmp_path / "identity"
    (idd / "person_0").mkdir(parents=True)
    (idd / "summary.json").write_text(json.dumps({"persons": [{"person_id": 0}] if persons else [],
                                                  "empty_reason": "" if persons else "no faces"}))
    (idd / "person_0" / "timeline.json").write_text(json.dumps([{"frame_idx": i, "box": b} for i, b in boxes.items()]))
    return idd


def test_crop_keeps_aspect_and_frame():
    x0, y0, x1, y1 = crop_box([[60, 30, 110, 90]], 176, 144, margin=0.3, aspect=176 / 144)
    assert 0 <= x0 < x1 <= 176 and 0 <= y0 < y1 <= 144
    assert abs((x1 - x0) / (y1 - y0) - 176 / 144) < 0.05
    assert x0 <= 60 and x1 >= 110 and y0 <= 30 and y1 >= 90


@pytest.mark.skipif(not CARPHONE.exists(), reason="shared data missing")
def test_clips_from_carphone(tmp_path):
    import av

    idd = _identity(tmp_path, {i: [60, 30, 110, 90] for i in range(0, 60, 2)})
    s = cut_clips(CARPHONE, idd, tmp_path / "out", frames=9, stride=2, max_per_source=2, trigger="ohwx")
    assert s["clips"] == 2 and not s["reason"]
    recs = [json.loads(x) for x in (tmp_path / "out" / "clips.jsonl").read_text().splitlines()]
    assert recs[0]["caption"].startswith("ohwx person, ") and recs[0]["frames"] == 9 and recs[0]["fps"] == 15
    with av.open(str(tmp_path / "out" / recs[0]["clip"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9


def test_faceless_and_garbage_give_zero_clips(tmp_path):
    idd = _identity(tmp_path, {}, persons=False)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    s = cut_clips(bad, idd, tmp_path / "out", frames=9)
    assert s["clips"] == 0 and s["reason"]


# --------------------------------------------------------------------------- the video_clips stage

SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man}
dataset:
  sources:
%s
train_video:
  base_model: builtin:tiny-wan22-ti2v
  images: {use: false}
  clips: %s
"""
FAST_CLIPS = "{frames: 9, stride: 2, max_per_source: 2, max_side: 64}"


def _spec(project: Path, shared_data: Path, *, sources: str = "", clips: str = FAST_CLIPS) -> Path:
    import shutil

    (project / "rides").mkdir(exist_ok=True)
    shutil.copy(shared_data / "video" / "carphone.mp4", project / "rides" / "ride_001.mp4")
    sources = sources or ("    - video: ../rides/ride_001.mp4\n      stride: 8\n"
                          "      video_options: {general_fallback: always}")
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text(SPEC % (sources, clips))
    return spec_file


def test_plan_chains_video_identity_clips_and_train_video(project, shared_data):
    from runner.core import contract
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    photos = project / "photos"
    photos.mkdir()
    import shutil

    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", photos)
    sources = ("    - images: ../photos\n    - video: ../rides/ride_001.mp4\n      stride: 8\n")
    graph = build_graph([load_spec(_spec(project, shared_data, sources=sources))])
    clips = graph.nodes["hero:video_clips[1]"]  # the source's index, as video_identity's
    assert clips.inputs["identity"] == contract.StageOutputRef("hero:video_identity[1]", "identity")
    assert clips.inputs["video"].spec_key == "dataset.sources[1].video" and clips.outputs == ("clips",)
    assert clips.config["frames"] == 9 and clips.config["margin"] == 0.6 and clips.config["max_gap"] is None
    assert clips.config["trigger"] == "hrochr" and clips.config["class_word"] == "man"
    # 9-frame clips at most 64 px against the default frame buckets (1, 17, 33) and 512 px: said at plan
    assert any("shorter than every frame bucket above 1 ([17, 33])" in n for n in clips.notes), clips.notes
    assert any("max_side 64 is under train_video.resolution 512" in n for n in clips.notes), clips.notes
    train = graph.nodes["hero:train_video"]
    assert train.inputs["clips0"] == contract.StageOutputRef("hero:video_clips[1]", "clips")
    assert not [n for n in graph.nodes if "video_clips[0]" in n]
    off_file = _spec(project, shared_data, sources=sources, clips="{enabled: false}")
    off_file.write_text(off_file.read_text().replace("images: {use: false}", "images: {use: true}"))
    off = build_graph([load_spec(off_file)])
    assert not [n for n in off.nodes.values() if n.kind == "video_clips"]


def test_a_caption_field_that_does_not_exist_is_refused_at_plan(project, shared_data):
    from runner.core.errors import UserError
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    spec = _spec(project, shared_data, clips='{caption: "{trigger} {pose}"}')
    with pytest.raises(UserError, match=r"train_video.clips.caption: unknown field \{pose\}"):
        build_graph([load_spec(spec)])


def _identity_out(tmp_path: Path, boxes: dict[int, list[float]], persons: bool = True):
    from runner.core import contract

    return contract.Artifact("identity", _identity(tmp_path, boxes, persons))


def _run(tmp_path: Path, identity, video: Path, **over):
    from runner.backends.context import LocalStageContext
    from runner.core import contract
    from runner.spec.sections import TrainVideoClipsConfig
    from runner.stages import video_clips as VC

    config = {"video": video.name, "source_index": 3, **TrainVideoClipsConfig.from_dict({}).to_dict(),
              "trigger": "hrochr", "class_word": "man"}
    config.pop("enabled")
    config.update(over)
    ctx = LocalStageContext.for_folder(tmp_path / "stage", stage_id="hero:video_clips[3]", project_root=video.parent)
    out = VC.run(config, {"video": contract.Artifact("video", video.parent, files=(video,)), "identity": identity},
                 ctx)
    return config, out, ctx


@pytest.mark.skipif(not CARPHONE.exists(), reason="shared data missing")
def test_stage_writes_what_read_clips_takes_and_its_report(tmp_path, repo_root):
    import jinja2

    from runner.diffusion.data import read_clips
    from runner.stages import video_clips as VC

    identity = _identity_out(tmp_path, {i: [60, 30, 110, 90] for i in range(0, 80, 4)})
    config, out, ctx = _run(tmp_path, identity, CARPHONE, frames=9, stride=3, max_per_source=3, max_side=64)
    folder = out["clips"].path
    assert folder.name == "clips" and not (ctx.out_dir / "clips.partial").exists()
    examples = read_clips(folder)
    assert len(examples) == 2 == out["clips"].meta["count"]  # 80 tracked frames hold two 25-frame spans
    assert [e.id for e in examples] == ["s3_p0_f000000", "s3_p0_f000027"]  # unique across sources
    assert all(e.clip_frames == 9 and e.caption == "hrochr man, close up, moving naturally" for e in examples)
    assert all(max(e.width, e.height) <= 64 for e in examples)
    s = json.loads((folder / "summary.json").read_text())
    assert s["clips"] == 2 and s["clip_seconds"] == pytest.approx(2 * 9 / 10) and s["source_seconds"] > 3
    assert ctx.metrics["clips"] == 2 and not ctx.warnings
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(repo_root / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    sections = VC.report_sections(config, out, {})
    html = env.get_template(sections[0].template).render(**sections[0].context)
    assert "2 clips of 9 frames (every 3th frame)" in html and "close up 2" in html and "s3_p0_f000027.mp4" in html


@pytest.mark.skipif(not CARPHONE.exists(), reason="shared data missing")
def test_faceless_or_broken_video_gives_zero_clips_and_a_warning(tmp_path):
    from runner.diffusion.data import read_clips

    _, out, ctx = _run(tmp_path / "a", _identity_out(tmp_path / "a", {}, persons=False), CARPHONE)
    assert read_clips(out["clips"].path) == [] and any("no clips cut: no faces" in w for w in ctx.warnings)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(CARPHONE.read_bytes()[:3000])
    _, out, ctx = _run(tmp_path / "b", _identity_out(tmp_path / "b", {i: [60, 30, 110, 90] for i in range(0, 80, 4)}),
                       bad, frames=9)
    assert read_clips(out["clips"].path) == [] and ctx.warnings and out["clips"].meta["count"] == 0
    assert not list((out["clips"].path / "clips").glob("*.mp4"))


@pytest.mark.slow  # video_identity on carphone twice through the engine: about 8 s
def test_apply_cuts_clips_and_a_changed_clips_key_reruns_only_video_clips(project, shared_data, monkeypatch):
    from runner.core import contract
    from runner.diffusion.data import read_clips
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.engine.workspace import Workspace
    from runner.spec import load_spec
    from runner.stages import registry as stage_registry

    stage_registry()
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {k: v for k, v in contract.BUILTIN._kinds.items()
                                                     if k in ("video_identity", "video_clips", "report")})
    spec_file = _spec(project, shared_data)
    first = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
    assert first.status == "succeeded", [(r.stage_id, r.error) for r in first.results]
    assert {r.stage_id: r.status for r in first.results}["hero:video_clips[0]"] == "succeeded"
    ws = Workspace(project)
    try:
        clips = ws.load_outputs(first.plan.by_id("hero:video_clips[0]").key)["clips"].path
    finally:
        ws.close()
    examples = read_clips(clips)
    assert len(examples) == 2 and all(e.clip_frames == 9 and e.caption.startswith("hrochr man, ") for e in examples)
    assert "Training clips from video rides/ride_001.mp4" in first.reports["hero"].read_text()
    spec_file.write_text(spec_file.read_text().replace("max_per_source: 2", "max_per_source: 1"))
    second = apply([load_spec(spec_file)], ApplyOptions(), QuietReporter())
    ran = {r.stage_id: r.status for r in second.results}
    assert ran["hero:video_clips[0]"] == "succeeded" and ran.get("hero:video_identity[0]") in (None, "cached")


def test_plan_notes_count_the_clips_the_track_gives(tmp_path):
    from runner.stages import video_clips as VC

    config = {"frames": 9, "stride": 3, "max_per_source": 5, "max_gap": None}
    assert "once video_identity has run" in VC.plan_notes(config, {"identity": None})[0]
    track = _identity_out(tmp_path / "a", {i: [60, 30, 110, 90] for i in range(0, 80, 4)})
    assert VC.plan_notes(config, {"identity": track}) == ["2 clip(s) of 9 frames along person 0's track"]
    short = _identity_out(tmp_path / "b", {i: [60, 30, 110, 90] for i in range(0, 12, 4)})
    assert "no continuous stretch of 9 frames" in VC.plan_notes(config, {"identity": short})[0]
    nobody = _identity_out(tmp_path / "c", {}, persons=False)
    assert VC.plan_notes(config, {"identity": nobody}) == ["no clips: no faces"]
