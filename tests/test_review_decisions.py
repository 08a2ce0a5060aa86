"""The review decisions file (<spec>.review.yaml) and how it flows into stages, without a browser:
format and merge-on-write, concurrent savers in separate processes, validation messages, the part
of the file each stage is keyed by, the plan's wording, curate applying the decisions, the picked
checkpoint and the regenerated frame in the storyboard stage, and the report's agreement table."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.review import agreement, decisions
from runner.review.decisions import ReviewError

SHA = [f"{i:02x}" * 32 for i in range(40)]


def test_file_is_sorted_blocks_with_who_and_when(tmp_path: Path) -> None:
    f = tmp_path / "hero.review.yaml"
    for sha in (SHA[3], SHA[1], SHA[2]):
        decisions.save(f, [("images", sha,
                            {"decision": "drop", "file": f"photos/{sha[:4]}.jpg", "image_id": sha[:16]})],
                       by="alice")
    text = f.read_text()
    assert text.startswith("# Review decisions")
    data = yaml.safe_load(text)
    assert list(data["images"]) == sorted(data["images"])  # sorted keys: merge-friendly in git
    assert all(e["by"] == "alice" and e["at"].endswith("Z") for e in data["images"].values())
    # one field per line, one block per decision (block style, no flow mappings)
    assert "{" not in text and text.count("decision: drop") == 3
    assert decisions.load(f)["images"] == data["images"]


def test_save_merges_fields_and_withdraws(tmp_path: Path) -> None:
    f = tmp_path / "r.review.yaml"
    decisions.save(f, [("images", SHA[0], {"decision": "drop"})], by="alice")
    decisions.save(f, [("images", SHA[0], {"shot": "close_up"}), ("images", SHA[1], {"decision": "keep"})], by="bob")
    e = decisions.load(f)["images"][SHA[0]]
    assert e["decision"] == "drop" and e["shot"] == "close_up" and e["by"] == "bob"
    decisions.save(f, [("images", SHA[0], {"decision": None, "shot": None})], by="bob")
    assert SHA[0] not in decisions.load(f)["images"]  # nothing but names left: the decision is gone
    assert decisions.load(f)["images"][SHA[1]]["decision"] == "keep"


def _saver(args: tuple[str, int, int]) -> None:
    path, who, n = args
    for i in range(n):
        decisions.save(Path(path), [("ratings", f"{who:02x}{i:02x}" * 16, {"rating": "pass" if i % 2 else "fail",
                                                                         "note": f"by {who}"})], by=f"r{who}")


def test_concurrent_savers_lose_nothing(tmp_path: Path) -> None:
    f = tmp_path / "r.review.yaml"
    workers, each = 4, 12
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_saver, [(str(f), w, each) for w in range(workers)])
    ratings = decisions.load(f)["ratings"]
    assert len(ratings) == workers * each
    assert not list(tmp_path.glob(".*.tmp"))  # every temporary file was renamed into place


@pytest.mark.parametrize("section,fields,needle", [
    ("images", {"decision": "maybe"}, "images.k.decision: 'maybe' is not one of 'keep', 'drop'"),
    ("images", {"shot": "portrait"}, "images.k.shot"),
    ("ratings", {"rating": 1}, "ratings.k.rating"),
    ("nope", {}, "unknown section 'nope'"),
    ("frames", {"note": ["a"]}, "frames.k.note: must be text"),
])
def test_invalid_decisions_are_refused_with_the_key(tmp_path: Path, section, fields, needle) -> None:
    f = tmp_path / "r.review.yaml"
    with pytest.raises(ReviewError) as exc:
        decisions.save(f, [(section, "k", fields)])
    assert needle in str(exc.value)
    assert not f.exists()  # nothing half-written


def test_broken_file_names_its_line(tmp_path: Path) -> None:
    f = tmp_path / "r.review.yaml"
    f.write_text("format: 1\nimages:\n  abc: [unclosed\n")
    with pytest.raises(ReviewError, match=r"r\.review\.yaml:\d+:\d+: not valid YAML"):
        decisions.load(f)
    f.write_text("format: 1\nphotos: {}\n")
    with pytest.raises(ReviewError, match="unknown section 'photos'"):
        decisions.load(f)


def test_stage_sections_hold_only_what_changes_outputs() -> None:
    data = decisions.empty()
    data["images"][SHA[0]] = {"decision": "drop", "note": "blurry", "by": "a", "at": "t",
                              "image_id": "vid0000000000001"}
    data["images"][SHA[1]] = {"shot": "medium", "by": "a", "at": "t"}
    data["ratings"][SHA[2]] = {"rating": "fail"}
    data["frames"][SHA[3]] = {"verdict": "reject", "scene": 2}
    data["frames"][SHA[4]] = {"verdict": "approve", "scene": 1}
    data["checkpoints"]["hero:evaluate"] = {"cell": "c", "step": 8, "lora_scale": 0.8, "by": "a"}
    ds = decisions.stage_section(data, "dataset")
    assert ds == {"images": {"vid0000000000001": {"decision": "drop"}, SHA[1][:16]: {"shot": "medium"}}}
    noted = json.loads(json.dumps(data))
    noted["images"][SHA[0]].update(note="changed", by="b", at="later")
    noted["ratings"][SHA[2]]["rating"] = "pass"
    assert decisions.stage_section(noted, "dataset") == ds  # a note or a rating never re-runs curate
    sb = decisions.stage_section(data, "storyboard", evaluate="hero:evaluate")
    assert sb == {"regenerate_scenes": {"2": 1},
                  "checkpoint": {"stage": "hero:evaluate", "step": 8, "lora_scale": 0.8}}
    other = decisions.stage_section(data, "storyboard", evaluate="hero:evaluate[other]")
    assert other == {"regenerate_scenes": {"2": 1}}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["drop", "keep", None]), st.sampled_from([None, "close_up", "wide"])),
                min_size=0, max_size=12))
def test_plan_reason_counts_what_changed(changes) -> None:
    old = decisions.empty()
    new = decisions.empty()
    for i, (dec, shot) in enumerate(changes):
        fields = {k: v for k, v in (("decision", dec), ("shot", shot)) if v}
        if fields:
            new["images"][SHA[i]] = fields
    reason = decisions.describe_change(decisions.stage_section(old, "dataset"), decisions.stage_section(new, "dataset"))
    drops = sum(1 for d, _ in changes if d == "drop")
    keeps = sum(1 for d, _ in changes if d == "keep")
    shots = sum(1 for _, s in changes if s)
    expect = [f"{n} {w}" for n, w in ((drops, "image" + "s" * (drops != 1) + " dropped"),
                                      (keeps, "image" + "s" * (keeps != 1) + " kept by hand"),
                                      (shots, "shot type" + "s" * (shots != 1) + " changed")) if n]
    assert reason == "review: " + (", ".join(expect) if expect else "decisions changed")
    back = decisions.describe_change(decisions.stage_section(new, "dataset"), decisions.stage_section(old, "dataset"))
    if drops or keeps:
        assert "withdrawn" in back


# --------------------------------------------------------------------------- curate applies them


class _Ctx:
    def __init__(self, out: Path) -> None:
        self.out_dir, self.warnings = out, []

    def log(self, *a, **k) -> None: ...
    def metric(self, *a, **k) -> None: ...
    def warn(self, message: str, **k) -> None:
        self.warnings.append(message)


def _record(i: int, *, blur: float = 200.0, phash: str | None = None) -> dict:
    box = [100, 100, 300, 340]
    return {"id": f"{i:016x}", "source": f"photos/p{i}.jpg", "input": "images", "file": f"images/{i}.jpg",
            "width": 600, "height": 800, "shot": "medium", "categories": ["medium"], "flags": {},
            "faces": [{"box": box, "blur": blur, "exposure": {}, "pose": {"yaw": 0.0, "pitch": 0.0, "roll": 0.0}}],
            "main_face": 0, "identity": 0.95, "phash": phash or f"{random.Random(i).getrandbits(64):016x}",
            "people_substantial": 1}


def _run_curate(tmp_path: Path, records: list[dict], review: dict) -> tuple[dict, _Ctx]:
    from runner.core import contract
    from runner.stages import curate

    adir = tmp_path / "analysis"
    (adir / "thumbs").mkdir(parents=True)
    (adir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (adir / "summary.json").write_text(json.dumps({"references": 1, "default_identity_threshold": 0.5,
                                                   "backend": "dlib"}))
    cfg = {**curate.DEFAULTS, **curate.SHOT_DEFAULTS, **({"review": review} if review else {})}
    ctx = _Ctx(tmp_path / "out")
    out = curate.run(cfg, {"analysis": contract.Artifact("analysis", adir)}, ctx)["curated"].path
    read = lambda f: [json.loads(x) for x in (Path(out) / f).read_text().splitlines() if x]  # noqa: E731
    return {"kept": {e["id"]: e for e in read("curated.jsonl")},
            "rejected": {r["id"]: r for r in read("rejected.jsonl")},
            "review": json.loads((Path(out) / "review.json").read_text())}, ctx


def test_curate_applies_drop_keep_shot_and_lists_missing(tmp_path: Path) -> None:
    recs = [_record(i) for i in range(6)]
    recs[4] = _record(4, blur=1.0)  # fails the blur gate
    recs[5] = _record(5, phash=recs[0]["phash"])  # a near-duplicate of image 0
    data = decisions.empty()
    ids = [r["id"] for r in recs]
    data["images"][SHA[0]] = {"decision": "drop", "image_id": ids[1]}
    data["images"][SHA[1]] = {"decision": "keep", "image_id": ids[4]}  # kept despite the gate
    data["images"][SHA[2]] = {"shot": "close_up", "image_id": ids[2]}
    data["images"][SHA[3]] = {"reference": True, "image_id": ids[5]}  # a reference survives dedupe
    data["images"][SHA[4]] = {"decision": "drop", "image_id": "feedfeedfeedfeed"}  # image gone
    data["identity"][SHA[5]] = {"decision": "drop", "image_id": ids[3]}  # a video frame, dropped on its page
    data["identity"][SHA[6]] = {"decision": "drop", "image_id": "0dd0dd0dd0dd0dd0"}  # video_identity removed it
    got, ctx = _run_curate(tmp_path, recs, decisions.stage_section(data, "dataset"))
    assert got["rejected"][ids[1]]["reason"] == "dropped by reviewer"
    assert ids[4] in got["kept"] and got["kept"][ids[4]]["review"] == {"decision": "keep"}
    assert got["kept"][ids[2]]["shot"] == "close_up" and "close_up" in got["kept"][ids[2]]["categories"]
    assert ids[5] in got["kept"] and got["kept"][ids[5]]["reference"] is True
    assert got["rejected"][ids[3]]["reason"] == "dropped by reviewer"
    assert [m["image_id"] for m in got["review"]["missing"]] == ["feedfeedfeedfeed"]
    assert any("feedfeedfeedfeed" in w and "no longer in the dataset" in w for w in ctx.warnings)
    plain, _ = _run_curate(tmp_path / "plain", recs, {})
    assert ids[4] not in plain["kept"] and ids[5] not in plain["kept"] and ids[1] in plain["kept"]


# --------------------------------------------------------------------------- storyboard


def test_picked_checkpoint_replaces_best_and_a_changed_file_falls_back(tmp_path: Path) -> None:
    from runner.core.hashing import file_sha256
    from runner.core import contract
    from runner.stages.storyboard import resolve_lora

    lora = tmp_path / "lora"
    for step in (4, 8):
        (lora / f"ck{step}").mkdir(parents=True)
        (lora / f"ck{step}" / "w.safetensors").write_bytes(bytes([step]) * 64)
    (lora / "index.json").write_text(json.dumps({"base_model": "builtin:tiny-sd", "checkpoints": [
        {"step": 4, "diffusers": "ck4/w.safetensors"}, {"step": 8, "diffusers": "ck8/w.safetensors"}]}))
    ev = tmp_path / "evaluation"
    (ev / "best").mkdir(parents=True)
    (ev / "best" / "w.safetensors").write_bytes(b"best")
    (ev / "evaluation.json").write_text(json.dumps({"best": {"lora_diffusers": "best/w.safetensors", "lora_scale": 1.0,
                                                             "step": 4}}))
    inputs = {"evaluation": contract.Artifact("evaluation", ev), "lora": contract.Artifact("lora", lora)}
    cfg = {"base_model": "builtin:tiny-sd", "lora_scale": None,
           "review": {"checkpoint": {"stage": "hero:evaluate", "step": 8, "lora_scale": 0.7,
                                     "lora_sha256": file_sha256(lora / "ck8" / "w.safetensors")}}}
    got = resolve_lora(cfg, inputs)
    assert got["file"] == lora / "ck8" / "w.safetensors" and got["scale"] == 0.7 and got["picked"]
    (lora / "ck8" / "w.safetensors").write_bytes(b"retrained")  # not the file the reviewer picked
    assert resolve_lora(cfg, inputs)["file"] == ev / "best" / "w.safetensors"


def test_rejected_frame_gets_seeds_it_never_used() -> None:
    from runner.generate.frames import FrameJob
    from runner.stages.storyboard import validated_frames

    class Validator:
        def score(self, images):
            return [{"pass": False, "margin": -1.0} for _ in images]

    seen: list[list[int]] = []

    def gen(batch, seeds):
        seen.append(list(seeds))
        return [object() for _ in batch]

    jobs = [FrameJob(scene_index=i + 1, prompt=f"p{i}") for i in range(3)]
    base_cfg = {"seed": 100, "validation": {"retries": 1}}
    first = validated_frames(jobs, gen, Validator(), base_cfg, 3, None)
    before = {r.scene_index: [a["seed"] for a in r.attempts] for r in first}
    seen.clear()
    again = validated_frames(jobs, gen, Validator(), {**base_cfg, "review": {"regenerate_scenes": {"2": 1}}}, 3, None)
    after = {r.scene_index: [a["seed"] for a in r.attempts] for r in again}
    assert after[1] == before[1] and after[3] == before[3]  # untouched frames are made the same way
    used = {s for v in before.values() for s in v}
    assert not set(after[2]) & used  # the rejected frame never reuses a seed


# --------------------------------------------------------------------------- agreement


def test_rank_and_target_agreement_per_category() -> None:
    ev = {"targets": {"close_up": {"face_similarity": ">= 0.5"}}, "cells": [{"cell": "c", "images": [
        {"category": "close_up", "path": f"i{i}", "face_similarity": v, "clip_t": 1 - v} for i, v in
        enumerate([0.9, 0.8, 0.2, 0.1])]}]}
    ratings = {f"s{i}": {"rating": r} for i, r in enumerate(["pass", "pass", "fail", "fail"])}
    rated = agreement.rated_images(ev, ratings, {f"i{i}": f"s{i}" for i in range(4)})
    rows = {r["metric"]: r for r in agreement.table(ev, rated)}
    assert rows["face_similarity"]["rank_agreement"] == 1.0 and rows["face_similarity"]["target_agreement"] == 1.0
    assert rows["clip_t"]["rank_agreement"] == 0.0 and rows["clip_t"]["target"] is None
    # no target for clip_t: the failed images that score above the passed ones' median disagree
    assert agreement.disagreements(ev, rated) == {"i2": ["clip_t"], "i3": ["clip_t"]}


# --------------------------------------------------------------------------- which stages see what


GRAPH_SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man, references: [../refs]}
dataset: {sources: [{images: ../photos}]}
train: {preset: tiny-demo}
evaluate: {preset: tiny-demo}
generate:
  storyboard: {planner: manual, scenes: [{text: He waves., shot: close_up}], steps: 2, width: 64, height: 64}
  video: {model: "builtin:tiny-ltx", key_frames: [1], frames: 9, width: 64, height: 64}
"""


def _review_configs(project: Path, data: dict) -> dict[str, dict]:
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    spec_file = project / "specs" / "hero.yaml"
    decisions.review_path(spec_file).write_text(decisions.dump(data))
    graph = build_graph([load_spec(spec_file)])
    return {n.kind: n.config["review"] for n in graph.nodes.values() if "review" in n.config}


def test_each_decision_reaches_only_the_stages_it_affects(project: Path) -> None:
    for d in ("photos", "refs"):
        (project / d).mkdir()
    (project / "specs" / "hero.yaml").write_text(GRAPH_SPEC)
    assert _review_configs(project, decisions.empty()) == {}  # no decisions: no key changes anywhere
    data = decisions.empty()
    data["ratings"][SHA[0]] = {"rating": "fail", "note": "blurry"}
    assert set(_review_configs(project, data)) == {"report"}
    data["clips"][SHA[1]] = {"verdict": "reject", "clip": "frame01"}
    got = _review_configs(project, data)
    assert set(got) == {"report", "video"} and got["video"] == {"regenerate_clips": {"frame01": 1}}
    data["checkpoints"]["hero:evaluate"] = {"cell": "c", "step": 4, "lora_scale": 1.0}
    data["images"][SHA[2]] = {"decision": "drop"}
    got = _review_configs(project, data)
    assert set(got) == {"report", "video", "storyboard", "curate"}
    assert got["curate"] == {"images": {SHA[2][:16]: {"decision": "drop"}}}
    assert got["storyboard"]["checkpoint"]["step"] == 4


# --------------------------------------------------------------------------- the app's guards


@pytest.fixture()
def app_project(project: Path) -> Path:
    (project / "specs" / "hero.yaml").write_text("version: 1\ncharacter: {name: hero, trigger: hrochr}\n")
    store = project / ".runner" / "store" / ("ab" * 32)
    (store / "thumbs").mkdir(parents=True)
    (store / "thumbs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (store / "_manifest.json").write_text("{}")
    (project / "secret.png").write_bytes(b"nope")
    return project


def _client(project: Path, token: str | None = None):
    from fastapi.testclient import TestClient

    from runner.review.app import create_app
    from runner.spec import load_spec

    return TestClient(create_app(load_spec(project / "specs" / "hero.yaml"), token=token))


def test_bearer_token_rule_off_loopback(app_project: Path) -> None:
    token = "t" * 24
    c = _client(app_project, token)
    assert c.get("/dataset").status_code == 401
    assert c.get("/dataset", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert c.get("/dataset", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    r = c.get(f"/?token={token}", follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/identity").status_code == 200  # the cookie now carries the token


def test_files_only_from_inside_the_store_and_saves_need_the_header(app_project: Path) -> None:
    c = _client(app_project)
    key = "ab" * 32
    assert c.get(f"/file/{key}/thumbs/a.png").status_code == 200
    for bad in (f"{key}/../../../secret.png", f"{key}/_manifest.json", "..%2F..%2Fsecret.png", f"{key}/%2e%2e/x.png",
                "abc/thumbs/a.png", f"{key}/thumbs/missing.png"):
        assert c.get(f"/file/{bad}").status_code == 404, bad
    body = {"section": "images", "key": SHA[0], "fields": {"decision": "drop"}}
    assert c.post("/api/decide", json=body).status_code == 403  # a cross-site form cannot send X-Review
    r = c.post("/api/decide", json={**body, "fields": {"decision": "burn"}}, headers={"X-Review": "1"})
    assert r.status_code == 422 and "images." in r.json()["error"]["message"]
    r = c.post("/api/decide", json=body, headers={"X-Review": "1"})
    assert r.status_code == 200 and r.json()["entry"]["decision"] == "drop"
    assert decisions.load(app_project / "specs" / "hero.review.yaml")["images"][SHA[0]]["decision"] == "drop"


# --------------------------------------------------------------------------- the report's review section


def test_report_review_section_shows_decisions_agreement_and_escapes(tmp_path: Path) -> None:
    from PIL import Image

    from runner.core.hashing import file_sha256
    from runner.core import contract
    from runner.stages.report import _jinja_env, _review_section

    ev = tmp_path / "evaluation"
    images = []
    for i, v in enumerate([0.9, 0.7, 0.3, 0.1]):
        f = ev / "images" / "c" / f"{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(f)
        images.append({"category": "close_up", "path": f"images/c/{i}.png", "face_similarity": v, "clip_t": 0.5})
    (ev / "evaluation.json").write_text(json.dumps({"targets": {"close_up": {"face_similarity": ">= 0.5"}},
                                                    "cells": [{"cell": "c", "images": images}], "best": {"cell": "c"}}))
    data = decisions.empty()
    for i, r in enumerate(["pass", "pass", "fail", "pass"]):
        data["ratings"][file_sha256(ev / "images" / "c" / f"{i}.png")] = {"rating": r}
    data["checkpoints"]["hero:evaluate"] = {"cell": "c", "step": 4, "by": "Ada", "at": "t"}
    data["images"][SHA[0]] = {"decision": "drop", "file": "photos/<script>x</script>.jpg", "note": "“ü” <b>",
                              "by": "Ada"}
    inputs = {"hero:evaluate/evaluation": contract.Artifact("evaluation", ev)}
    html = _review_section({"review": {k: v for k, v in data.items() if k != "format" and v}}, inputs,
                           _jinja_env())["html"]
    assert "images dropped: <b>1</b>" in html and "picked by Ada" in html
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html and "&lt;b&gt;" in html
    assert "face_similarity" in html and ">= 0.5" in html.replace("&gt;", ">")
    assert "0.67" in html  # rank agreement of face_similarity: 2 of 3 pass-fail pairs ordered as people did


def test_review_command_refuses_an_open_host_without_a_token(app_project: Path, monkeypatch) -> None:
    from test_cli import runner

    monkeypatch.delenv("RUNNER_API_TOKEN", raising=False)
    r = runner("review", "specs/hero.yaml", "--host", "0.0.0.0", cwd=app_project)
    assert r.returncode == 2 and "RUNNER_API_TOKEN" in r.stderr and "Traceback" not in r.stderr
    decisions.review_path(app_project / "specs" / "hero.yaml").write_text("images: [\n")
    r = runner("review", "specs/hero.yaml", cwd=app_project)
    assert r.returncode == 2 and "hero.review.yaml:" in r.stderr and "not valid YAML" in r.stderr


def test_a_renamed_photo_keeps_its_key(project: Path, shared_data: Path) -> None:
    """Decisions are keyed by the file's sha256, and the image id analyze and curate use derives
    from it: ingest a photo, rename it, ingest again, and both keys stay."""
    from runner.engine.executor import ApplyOptions, apply, plan_specs
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec
    from runner.stages.ingest import read_manifest

    (project / "photos").mkdir()
    photo = project / "photos" / "a.jpg"
    photo.write_bytes((shared_data / "faces" / "obama" / "obama_02.jpg").read_bytes())
    spec_file = project / "specs" / "hero.yaml"
    spec_file.write_text("version: 1\ncharacter: {name: hero, trigger: hrochr}\n"
                         "dataset: {sources: [{images: ../photos}]}\n")

    def manifest() -> list[dict]:
        spec = load_spec(spec_file)
        assert apply([spec], ApplyOptions(only=["ingest"]), QuietReporter()).status in ("succeeded", "no-op")
        plan, ws = plan_specs([spec])
        try:
            ps = next(p for p in plan.stages if p.node.kind == "ingest")
            return read_manifest(ws.store_path(ps.key) / "images")
        finally:
            ws.close()

    before = manifest()
    photo.rename(project / "photos" / "renamed <b>ü.jpg")
    after = manifest()
    assert [r["source"] for r in after] == ["photos/renamed <b>ü.jpg"]
    assert (after[0]["sha256"], after[0]["id"]) == (before[0]["sha256"], before[0]["id"])
    data = decisions.empty()
    data["images"][before[0]["sha256"]] = {"decision": "drop"}
    assert decisions.stage_section(data, "dataset") == {"images": {after[0]["id"]: {"decision": "drop"}}}
