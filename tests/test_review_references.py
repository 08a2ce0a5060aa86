"""Images a reviewer marks as reference (runner review) join analyze's reference set, so they
change identity scores (and curate's identity gate); only that part of the decisions is in
analyze's key. Real photos of ../shared/data/faces, dlib backend, one worker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner.backends.context import LocalStageContext
from runner.review import decisions
from runner.core import contract
from runner.stages import analyze, ingest

PHOTOS = ("obama/obama_02.jpg", "obama/obama_03.jpg", "biden/biden_01.jpg", "kit_harington/kit_01.jpg")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("refs")
    project = tmp / "proj"
    (project / "photos").mkdir(parents=True)
    (project / "refs").mkdir()
    (project / "specs").mkdir()
    (project / "runner.toml").write_text("")
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", project / "refs" / "obama_01.jpg")
    for rel in PHOTOS:
        shutil.copy(shared_data / "faces" / rel, project / "photos" / Path(rel).name)
    files = tuple(sorted((project / "photos").iterdir()))
    ctx = LocalStageContext.for_folder(tmp / "ingest", stage_id="obama:ingest", character="obama", project_root=project)
    cfg = {"sources": [{"index": 0, "path": "photos", "label": "", "recursive": True}], "extensions": [".jpg"],
           "max_pixels": 64_000_000, "max_side": 1024, "min_side": 64, "format": "png"}
    images = ingest.run(cfg, {"source0": contract.Artifact("source0", project / "photos", files=files)}, ctx)["images"]
    manifest = {Path(r["source"]).name: r for r in _jsonl(Path(images.path) / "manifest.jsonl")}
    refs = contract.Artifact("reference0", project / "refs", files=(project / "refs" / "obama_01.jpg",),
                         meta={"spec_key": "character.references[0]"})
    return {"tmp": tmp, "project": project, "images": images, "refs": refs, "manifest": manifest}


def _marked(photos, *names: str) -> dict:
    data = decisions.empty()
    for n in names:
        rec = photos["manifest"][n]
        data["images"][rec["sha256"]] = {"reference": True, "image_id": rec["id"], "file": f"photos/{n}"}
    data["images"]["ff" * 32] = {"decision": "drop", "note": "not a reference: never in analyze's key"}
    return data


def _analyze(photos, review: dict, tag: str) -> dict:
    ctx = LocalStageContext.for_folder(photos["tmp"] / tag, stage_id="obama:analyze", character="obama",
                                       project_root=photos["project"])
    cfg = {"name": "dlib", "dlib_detector": "hog", "upsample": 1, "insightface_pack": "buffalo_l",
           "insightface_root": "~/.insightface", "max_side": 1600, "workers": 1, "references": ["refs"],
           **({"review": review} if review else {})}
    out = Path(analyze.run(cfg, {"images": photos["images"], "reference0": photos["refs"]}, ctx)["analysis"].path)
    return {"records": {Path(r["source"]).name: r for r in _jsonl(out / "records.jsonl")},
            "references": json.loads((out / "references.json").read_text()),
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow  # analyzes real photos twice: several seconds
def test_a_photo_marked_as_reference_joins_the_reference_set_and_moves_identity_scores(photos) -> None:
    base_run = _analyze(photos, {}, "plain")
    section = decisions.stage_section(_marked(photos, "obama_02.jpg"), "references")
    assert section == {"images": {photos["manifest"]["obama_02.jpg"]["id"]: {"reference": True}}}
    marked = _analyze(photos, section, "marked")
    assert base_run["summary"]["references"] == 1 and marked["summary"]["references"] == 2
    extra = [r for r in marked["references"] if r.get("origin") == "review"]
    assert [(Path(r["file"]).name, r["used"]) for r in extra] == [("obama_02.jpg", True)]
    for name, rec in marked["records"].items():  # every face is scored against the new centroid
        before = base_run["records"][name]
        if before.get("identity") is not None:
            assert rec["identity"] != before["identity"], name
    assert marked["records"]["obama_02.jpg"]["identity"] > base_run["records"]["obama_02.jpg"]["identity"]
    others = [n for n in marked["records"] if not n.startswith("obama") and marked["records"][n].get("identity")]
    assert others and all(marked["records"][n]["identity"] < marked["records"]["obama_03.jpg"]["identity"]
                          for n in others)


def test_a_mark_for_an_image_gone_from_the_dataset_is_a_warning(photos) -> None:
    gone = {"images": {"0123456789abcdef": {"reference": True}}}
    ctx = LocalStageContext.for_folder(photos["tmp"] / "gone", stage_id="obama:analyze", character="obama",
                                       project_root=photos["project"])
    warned: list[str] = []
    ctx.warn = warned.append  # type: ignore[method-assign]
    cfg = {"name": "dlib", "dlib_detector": "hog", "upsample": 1, "insightface_pack": "buffalo_l",
           "insightface_root": "~/.insightface", "max_side": 1600, "workers": 1, "references": ["refs"],
           "review": gone}
    out = analyze.run(cfg, {"images": photos["images"], "reference0": photos["refs"]}, ctx)["analysis"].path
    assert json.loads((Path(out) / "summary.json").read_text())["references"] == 1
    assert any("0123456789abcdef" in w and "no longer in the dataset" in w for w in warned)


SPEC = """\
version: 1
character: {name: hero, trigger: hrochr, class_word: man, references: [../refs]}
dataset: {sources: [{images: ../photos}]}
"""


def test_only_reference_marks_enter_analyzes_key_and_the_plan_says_so(photos) -> None:
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    spec_file = photos["project"] / "specs" / "hero.yaml"
    spec_file.write_text(SPEC)

    def configs(data: dict) -> dict:
        decisions.review_path(spec_file).write_text(decisions.dump(data))
        graph = build_graph([load_spec(spec_file)])
        return {n.kind: n.config.get("review") for n in graph.nodes.values()}

    only_drop = decisions.empty()
    only_drop["images"]["ff" * 32] = {"decision": "drop", "shot": "wide", "note": "x"}
    plain = configs(only_drop)
    assert plain["analyze"] is None and plain["curate"]  # a drop or a shot type is curate's alone
    for names in (("obama_02.jpg",), ("biden_01.jpg",), ("obama_02.jpg", "obama_03.jpg")):
        got = configs(_marked(photos, *names))
        ids = {photos["manifest"][n]["id"] for n in names}
        assert got["analyze"] == {"images": {i: {"reference": True} for i in sorted(ids)}}
        assert set(got["curate"]["images"]) >= ids
        n = len(names)  # another person's photo is the reviewer's call; the plan shows it all the same
        assert decisions.describe_change(plain["analyze"], got["analyze"]) == \
            f"review: {n} image{'s' if n != 1 else ''} marked as reference"
        assert decisions.describe_change(got["analyze"], None) == \
            f"review: {n} reference mark{'s' if n != 1 else ''} withdrawn"
