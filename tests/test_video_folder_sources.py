"""A video source naming a folder or a glob (dataset.sources[].video, docs/video-identity.md, "A
folder of videos"): one video_identity node per video file, ``video_identity[<i>:<path in the
folder>]``, each keyed by its own file only, so a video added to the folder plans one run and the
others stay cached; video_clips pairs with each, extract reads them all; bad globs, links leading
out of the project and paths that name nothing are spec errors naming the key.

Real clips from ../shared/data/video (carphone.mp4, copied under other names); the apply runs
video_identity with a big stride (4 analyzed frames of 120) and the fallback novelty descriptor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.cli import main as cli_main
from runner.core import contract
from runner.spec import load_spec
from runner.stages import registry as stage_registry

HEAD = "version: 1\ncharacter: {name: hero, trigger: hrochr, class_word: man}\n"
FAST = "      stride: 30\n      video_options: {general_fallback: always, profile_detector: 'off'}\n"


def _spec(project: Path, video: str, *, extra: str = "", source: str = FAST, name: str = "hero.yaml") -> Path:
    spec = project / "specs" / name
    spec.write_text(HEAD + "dataset:\n  sources:\n" + f"    - video: {video}\n" + source + extra)
    return spec


def _rides(project: Path, shared_data: Path, names: list[str]) -> Path:
    rides = project / "rides"
    for name in names:
        (rides / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "video" / "carphone.mp4", rides / name)
    return rides


def _graph(spec: Path):
    from runner.plan.graph import build_graph

    return build_graph([load_spec(spec)])


def _kinds(monkeypatch, *kinds: str) -> None:
    stage_registry()
    monkeypatch.setattr(contract.BUILTIN, "_kinds", {k: v for k, v in contract.BUILTIN._kinds.items() if k in kinds})


def _plan(spec: Path) -> dict[str, tuple[str, str]]:
    """video_identity stage id -> (action, key) of a plan of ``spec``."""
    from runner.engine.executor import plan_specs

    p, ws = plan_specs([load_spec(spec)], registry=stage_registry())
    ws.close()
    return {s.id: (s.action, s.key) for s in p.stages if s.node.kind == "video_identity"}


def run_cli(*args: str, capsys) -> tuple[int, str]:
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- planning


def test_a_folder_plans_one_node_per_video_file(project, shared_data):
    rides = _rides(project, shared_data, ["ride_001.mp4", "ride_002.MOV", "cam 2/ride_003.mp4", ".hidden.mp4"])
    (rides / "notes.txt").write_text("not a video")
    (rides / ".trash").mkdir()
    shutil.copy(rides / "ride_001.mp4", rides / ".trash" / "old.mp4")
    graph = _graph(_spec(project, "../rides/"))
    ids = [n for n in graph.nodes if ":video_identity" in n]
    assert ids == ["hero:video_identity[0:cam 2/ride_003.mp4]", "hero:video_identity[0:ride_001.mp4]",
                   "hero:video_identity[0:ride_002.MOV]"]
    node = graph.nodes["hero:video_identity[0:cam 2/ride_003.mp4]"]
    assert node.config["video"] == "rides/cam 2/ride_003.mp4" and node.config["source_index"] == 0
    assert node.config["member"] == "cam 2/ride_003.mp4" and "member" not in node.keyed_config()
    ref = node.inputs["video"]  # its own file only: a sibling added or removed changes nothing here
    assert ref.root == rides / "cam 2" and ref.patterns == ("ride_003.mp4",) and not ref.recursive
    assert ref.spec_key == "dataset.sources[0].video"
    assert node.label == "rides/cam 2/ride_003.mp4: 1 person, every 30th frame"
    # the frames of every video reach analyze under names safe as folder names, one per node
    names = [n for n in graph.nodes["hero:analyze"].inputs if n.startswith("images:video_identity")]
    assert names == ["images:video_identity.0:cam%202%2Fride_003.mp4", "images:video_identity.0:ride_001.mp4",
                     "images:video_identity.0:ride_002.MOV"]
    top = _graph(_spec(project, "../rides", source=FAST + "      recursive: false\n"))
    assert [n for n in top.nodes if ":video_identity" in n] == ["hero:video_identity[0:ride_001.mp4]",
                                                                "hero:video_identity[0:ride_002.MOV]"]


def test_a_glob_matches_by_its_pattern_and_a_single_file_keeps_its_id(project, shared_data):
    _rides(project, shared_data, ["a.mp4", "b.mp4", "b.mov", "day2/c.mp4", "day2/deep/d.mp4"])
    flat = _graph(_spec(project, "../rides/*.mp4"))
    assert [n for n in flat.nodes if ":video_identity" in n] == ["hero:video_identity[0:a.mp4]",
                                                                 "hero:video_identity[0:b.mp4]"]
    deep = _graph(_spec(project, "../rides/**/*.mp4"))
    assert [n for n in deep.nodes if ":video_identity" in n] == [
        "hero:video_identity[0:a.mp4]", "hero:video_identity[0:b.mp4]", "hero:video_identity[0:day2/c.mp4]",
        "hero:video_identity[0:day2/deep/d.mp4]"]
    one_level = _graph(_spec(project, "../rides/day*/*.mp4"))
    assert [(n.id, n.config["video"]) for n in one_level.nodes.values() if n.kind == "video_identity"] == [
        ("hero:video_identity[0:day2/c.mp4]", "rides/day2/c.mp4")]
    single = _graph(_spec(project, "../rides/a.mp4"))
    node = single.nodes["hero:video_identity[0]"]
    assert node.config["video"] == "rides/a.mp4" and "member" not in node.config
    assert "images:video_identity.0" in single.nodes["hero:analyze"].inputs
    # the same file from a folder, a glob or by name: the same keyed config (so the same cache key)
    assert node.keyed_config() == flat.nodes["hero:video_identity[0:a.mp4]"].keyed_config()


def test_an_empty_folder_plans_no_identity_node(project):
    (project / "rides" / "2026-12-03").mkdir(parents=True)
    graph = _graph(_spec(project, "../rides/2026-12-03/"))
    assert not [n for n in graph.nodes.values() if n.kind in ("video_identity", "video_clips", "extract")]
    from runner.core.errors import UserError

    with pytest.raises(UserError, match="train_video has nothing to train on"):  # not a GPU stage on nothing
        _graph(_spec(project, "../rides/2026-12-03/", extra=CLIPS))


def test_a_thousand_files_plan_a_thousand_nodes(project, monkeypatch):
    rides = project / "rides"
    rides.mkdir()
    for k in range(1000):
        (rides / f"guest_{k:04d}.mp4").write_bytes(b"%d" % k)  # planning reads names and bytes, not frames
    _kinds(monkeypatch, "video_identity", "analyze")
    plan = _plan(_spec(project, "../rides/"))
    assert len(plan) == 1000 and len({key for _, key in plan.values()}) == 1000
    assert {action for action, _ in plan.values()} == {"run"}
    graph = _graph(_spec(project, "../rides/"))
    names = [n for n in graph.nodes["hero:analyze"].inputs if n.startswith("images:")]
    assert len(set(names)) == 1000


CLIPS = ("train_video:\n  base_model: builtin:tiny-wan22-ti2v\n  images: {use: false}\n"
         "  clips: {frames: 9, stride: 2, max_per_source: 2, max_side: 64}\n")
EXTRACT = ("  shots: {strategy: report, targets: {full_body: [0.2, 0.4]}}\n"
           "  extract: {sample_fps: 2, min_gap_s: 1.0}\n")


def test_video_clips_pair_with_each_identity_node_and_extract_reads_every_video(project, shared_data, monkeypatch):
    from runner.paths import video_files_under
    from runner.stages import common

    _rides(project, shared_data, ["a.mp4", "cam2/b.mp4"])
    (project / "clip.mp4").write_bytes((project / "rides" / "a.mp4").read_bytes())
    spec = _spec(project, "../rides", extra="    - video: ../clip.mp4\n" + EXTRACT + CLIPS)
    walks = []
    monkeypatch.setattr(common, "video_files_under", lambda root, **kw: walks.append(root) or
                        video_files_under(root, **kw))
    graph = _graph(spec)
    assert walks == [project / "rides"]  # one walk of the folder for the three kinds that read it
    clips = {n.id: n for n in graph.nodes.values() if n.kind == "video_clips"}
    assert sorted(clips) == ["hero:video_clips[0:a.mp4]", "hero:video_clips[0:cam2/b.mp4]", "hero:video_clips[1]"]
    for cid, node in clips.items():
        variant = cid[cid.index("[") + 1:-1]
        assert node.inputs["identity"] == contract.StageOutputRef(f"hero:video_identity[{variant}]", "identity")
        assert node.inputs["video"].patterns == (Path(node.config["video"]).name,)
    assert clips["hero:video_clips[0:cam2/b.mp4]"].config["member"] == "cam2/b.mp4"
    assert "member" not in clips["hero:video_clips[1]"].config
    from runner.stages.video_clips import clip_id_prefix

    prefixes = {clip_id_prefix(n.config) for n in clips.values()}
    assert len(prefixes) == 3 and "s1_" in prefixes  # clip ids unique across a folder's videos
    train = graph.nodes["hero:train_video"]
    assert sorted(r.stage_id for k, r in train.inputs.items() if k.startswith("clips")) == sorted(clips)
    extract = graph.nodes["hero:extract"]
    assert extract.config["videos"] == {"0:a.mp4": "rides/a.mp4", "0:cam2/b.mp4": "rides/cam2/b.mp4",
                                        "1": "clip.mp4"}
    videos = {k: v for k, v in extract.inputs.items() if k.startswith("video")}
    assert sorted(videos) == ["video0:a.mp4", "video0:cam2%2Fb.mp4", "video1"]
    assert videos["video0:cam2%2Fb.mp4"].root == project / "rides" / "cam2"
    from runner.stages.extract import video_input

    assert all(video_input(v) in extract.inputs for v in extract.config["videos"])


def test_report_anchors_are_unique_per_video(project, shared_data):
    from runner.stages.common import report_anchor

    _rides(project, shared_data, ["a b.mp4", "a-b.mp4", "x/a.mp4"])
    graph = _graph(_spec(project, "../rides", extra="    - video: ../rides/a-b.mp4\n"))
    configs = [n.config for n in graph.nodes.values() if n.kind == "video_identity"]
    anchors = [report_anchor("video-identity", c) for c in configs]
    assert len(configs) == 4 and len(set(anchors)) == 4 and "video-identity-1" in anchors
    assert all(a.replace("-", "").isalnum() for a in anchors)


def test_report_rows_of_a_video_say_what_needs_a_look(tmp_path):
    import json

    from runner.stages import video_clips as VC
    from runner.stages import video_identity as VI

    ident = tmp_path / "identity"
    ident.mkdir()
    (ident / "summary.json").write_text(json.dumps({"video": "rides/a.mp4", "images": 7, "empty_reason": "",
                                                    "quarantine": None, "truncated": False,
                                                    "persons": [{"anchor_count": 3}, {"anchor_count": 2}]}))
    row = VI.report_row({"video": "rides/a.mp4"}, {"identity": contract.Artifact("identity", ident)})
    assert row == {"video": "rides/a.mp4", "persons": 2, "images": 7, "anchors": 5}
    (ident / "summary.json").write_text(json.dumps({"video": "rides/b.mp4", "images": 0, "persons": [],
                                                    "quarantine": {"reason": "unreadable", "detail": "x"}}))
    row = VI.report_row({}, {"identity": contract.Artifact("identity", ident)})
    assert row["attention"] == "quarantined: unreadable" and row["persons"] == 0
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "summary.json").write_text(json.dumps({"source": "rides/b.mp4", "clips": 0, "clip_seconds": 0.0,
                                                    "reason": "no faces"}))
    assert VC.report_row({}, {"clips": contract.Artifact("clips", clips)})["attention"] == "no clips: no faces"


# --------------------------------------------------------------------------- spec errors


def test_bad_globs_links_leading_out_and_paths_naming_nothing_are_spec_errors(project, shared_data, capsys):
    _rides(project, shared_data, ["a.mp4"])
    outside = project.parent / "outside"
    outside.mkdir()
    shutil.copy(shared_data / "video" / "carphone.mp4", outside / "secret.mp4")
    cases = [
        ("../nosuch/*.mp4", "dataset.sources[0].video: the glob '../nosuch/*.mp4' looks in", "does not exist"),
        ("../rides/a.mp4/*.mp4", "dataset.sources[0].video: the glob", "which is not a folder"),
        ("../rides/nothing.mp4", "dataset.sources[0].video: path not found", "a folder of videos, or a glob"),
    ]
    for value, message, more in cases:
        spec = _spec(project, value)
        for cmd in (("plan",), ("validate", "--require-files")):
            code, out = run_cli(*cmd, str(spec), capsys=capsys)
            assert code == 2 and message in out and more in out and "hint:" in out, (value, cmd, out)
    code, out = run_cli("validate", str(_spec(project, "../nosuch/*.mp4")), capsys=capsys)
    assert code == 0, out  # plain validate does not ask for data that is not there yet
    (project / "rides" / "guest.mp4").symlink_to(outside / "secret.mp4")
    for value in ("../rides", "../rides/*.mp4", "../rides/**/*.mp4"):
        code, out = run_cli("plan", str(_spec(project, value)), capsys=capsys)
        assert code == 2 and "dataset.sources[0].video:" in out and "guest.mp4 -> " in out, (value, out)
        assert "outside the project" in out and "--allow-outside-project" in out
    code, out = run_cli("plan", "--allow-outside-project", str(_spec(project, "../rides/*.mp4")), capsys=capsys)
    assert code == 0 and "video_identity[0:guest.mp4]" in out, out
    code, out = run_cli("plan", str(_spec(project, "../../outside/*.mp4")), capsys=capsys)
    assert code == 2 and "dataset.sources[0].video:" in out and "outside the project folder" in out, out


def test_a_file_whose_name_looks_like_a_glob_is_that_file(project, shared_data):
    _rides(project, shared_data, ["ride[1].mp4", "ride1.mp4"])
    graph = _graph(_spec(project, "../rides/ride[1].mp4"))
    node = graph.nodes["hero:video_identity[0]"]
    assert node.config["video"] == "rides/ride[1].mp4"


# --------------------------------------------------------------------------- through the engine


@pytest.mark.slow  # video_identity on three 4-second clips at stride 30: about 10 s
def test_a_video_added_to_the_folder_runs_alone_and_a_removed_one_goes(project, shared_data, monkeypatch):
    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter

    _kinds(monkeypatch, "video_identity", "report")
    rides = _rides(project, shared_data, ["ride_001.mp4", "cam2/ride_002.mp4"])
    spec = _spec(project, "../rides/")
    first = apply([load_spec(spec)], ApplyOptions(), QuietReporter())
    assert first.status == "succeeded", [(r.stage_id, r.error) for r in first.results]
    ran = {r.stage_id: r.status for r in first.results}
    assert ran["hero:video_identity[0:ride_001.mp4]"] == ran["hero:video_identity[0:cam2/ride_002.mp4]"] == "succeeded"
    html = first.reports["hero"].read_text()  # a stage id with '/' still finds its outputs in the report
    for video in ("rides/cam2/ride_002.mp4", "rides/ride_001.mp4"):
        assert f"Identity sets from video {video}" in html
    before = _plan(spec)
    assert {a for a, _ in before.values()} == {"cached"}
    # a ride day's videos beyond report.max_sections_per_kind: one row each (video_identity's report_row)
    table = _spec(project, "../rides/", extra="report: {max_sections_per_kind: 1}\n", name="table.yaml")
    html = apply([load_spec(table)], ApplyOptions(), QuietReporter()).reports["hero"].read_text()
    assert "2 video_identity stages" in html and html.count("<h2>Identity sets from video ") == 1
    assert "<code>hero:video_identity[0:cam2/ride_002.mp4]</code>" in html and "rides/ride_001.mp4" in html

    shutil.copy(rides / "ride_001.mp4", rides / "ride_003.mp4")
    added = _plan(spec)
    assert added["hero:video_identity[0:ride_003.mp4]"][0] == "run"
    assert {k: v for k, v in added.items() if not k.endswith("ride_003.mp4]")} == before  # same keys, cached

    (rides / "cam2" / "ride_002.mp4").unlink()
    removed = _plan(spec)
    assert "hero:video_identity[0:cam2/ride_002.mp4]" not in removed
    assert removed["hero:video_identity[0:ride_001.mp4]"] == before["hero:video_identity[0:ride_001.mp4]"]

    # the glob form and the single-file form of the same file find the folder's outputs
    assert _plan(_spec(project, "../rides/*.mp4"))["hero:video_identity[0:ride_001.mp4]"] == \
        before["hero:video_identity[0:ride_001.mp4]"]
    single = _plan(_spec(project, "../rides/ride_001.mp4"))
    assert single["hero:video_identity[0]"] == before["hero:video_identity[0:ride_001.mp4]"]
