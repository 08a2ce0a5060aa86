"""analyze -> curate -> caption -> export on the real photos of ../shared/data (dlib backend).

One ingest + analyze run (module fixture, 2 worker processes) feeds every test here; the stages
are called directly with LocalStageContext and hand-built Artifacts.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.diffusion.data import Example, split_validation
from runner.core import contract
from runner.stages import analyze, caption, curate, export, ingest
from runner.vision import balance as B
from runner.vision import shots as S

# Every test here builds on the module fixture that analyzes every photo of faces/ (about 16 s).
pytestmark = pytest.mark.slow

TRIGGER, CLASS = "obmx", "man"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ingest(project: Path, folder: str, tmp: Path) -> contract.Artifact:
    files = tuple(sorted(p for p in (project / folder).rglob("*") if p.is_file()))
    ctx = LocalStageContext.for_folder(tmp / "ingest", stage_id="obama:ingest", character="obama", project_root=project)
    cfg = {"sources": [{"index": 0, "path": folder, "label": "", "recursive": True}],
           "extensions": [".jpg", ".jpeg", ".png"], "max_pixels": 64_000_000, "max_side": 2048, "min_side": 64,
           "format": "png"}
    return ingest.run(cfg, {"source0": contract.Artifact("source0", project / folder, files=files)}, ctx)["images"]


def analyze_config(workers: int = 2, **kw) -> dict:
    return {"name": "dlib", "dlib_detector": "hog", "upsample": 1, "insightface_pack": "buffalo_l",
            "insightface_root": "~/.insightface", "max_side": 1600, "workers": workers, "references": ["refs"], **kw}


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, shared_data):
    """Every photo of faces/ (but the reference obama_01), the RGBA PNG, a 64 px copy and a no-face image."""
    tmp = tmp_path_factory.mktemp("analyze")
    project = tmp / "proj"
    photos = project / "photos"
    photos.mkdir(parents=True)
    (project / "refs").mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", project / "refs" / "obama_01.jpg")
    for p in sorted((shared_data / "faces").glob("*/*")):
        if p.name != "obama_01.jpg":
            shutil.copy(p, photos / f"{p.parent.name}--{p.name}")
    shutil.copy(shared_data / "odd" / "rgba_32bit.png", photos / "odd--rgba_32bit.png")
    with Image.open(shared_data / "faces" / "obama" / "obama_01.jpg") as im:
        im.convert("RGB").resize((72, 90)).save(photos / "synthetic--obama_tiny.jpg")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((40, 40, 1))).astype(np.uint8)
    Image.fromarray(smooth).save(photos / "synthetic--no_face.png")
    images = _ingest(project, "photos", tmp)
    ctx = LocalStageContext.for_folder(tmp / "analyze", stage_id="obama:analyze", character="obama",
                                       project_root=project)
    refs = contract.Artifact("reference0", project / "refs", files=(project / "refs" / "obama_01.jpg",),
                         meta={"spec_key": "character.references[0]"})
    out = analyze.run(analyze_config(), {"images": images, "reference0": refs}, ctx)
    records = {Path(r["source"]).name: r for r in _jsonl(out["analysis"].path / "records.jsonl")}
    return {"tmp": tmp, "project": project, "images": images, "analysis": out["analysis"], "records": records,
            "ctx": ctx}


def test_records_stream_in_input_order_with_the_summary(analyzed):
    adir = analyzed["analysis"].path
    manifest_ids = [r["id"] for r in _jsonl(analyzed["images"].path / "manifest.jsonl")]
    assert [r["id"] for r in _jsonl(adir / "records.jsonl")] == manifest_ids
    summary = json.loads((adir / "summary.json").read_text())
    assert summary["backend"] == "dlib" and summary["workers"] == 2 and summary["references"] == 1
    assert summary["counts"]["images"] == len(manifest_ids)
    assert (adir / "thumbs" / f"{manifest_ids[0]}.jpg").exists()
    assert analyzed["ctx"].metrics["images_analyzed"] == len(manifest_ids)


@pytest.mark.parametrize("name,count", [("groups--two_people.jpg", 2), ("groups--obama_and_biden.jpg", 3),
                                        ("groups--six_people.jpg", 6)])
def test_face_counts_and_multi_character(analyzed, name, count):
    rec = analyzed["records"][name]
    assert rec["people"] == count and len(rec["faces"]) == count
    assert rec["flags"]["multi_character"] and "multi_character" in rec["categories"]


def test_per_face_measures_are_present_and_plausible(analyzed):
    rec = analyzed["records"]["obama--obama_02.jpg"]
    f = rec["faces"][rec["main_face"]]
    assert len(f["landmarks"]) == 68 and len(rec["embedding"]) == 128
    assert 0.15 < f["eyes"]["mean"] < 0.45
    assert f["mouth_open"] > 0.3  # obama_02 is talking
    assert f["blur"] > 40 and f["blur_sigma"] < 1.6 and 0.2 < f["exposure"]["mean"] < 0.8  # sharp: 100 / sigma^2
    assert 0.1 < f["height_rel"] < 0.5 and f["truncation"] == 0.0
    assert len(rec["phash"]) == 16
    smiling = analyzed["records"]["obama--obama_small.jpg"]
    assert smiling["expression"]["smiling"]
    assert not analyzed["records"]["kit_harington--kit_03.jpg"]["expression"]["smiling"]


def test_shot_types_on_known_framings(analyzed):
    r = analyzed["records"]
    assert r["obama--obama_03.jpg"]["shot"] == "full_body"  # near full-body
    assert r["biden--biden_01.jpg"]["shot"] == "medium"  # knee-up
    assert r["biden--biden_02.jpg"]["shot"] == "close_up"  # portrait
    assert r["kit_harington--kit_02.jpg"]["shot"] == "close_up"
    assert r["obama--obama_02.jpg"]["shot"] == "medium"
    # Background clutter: red carpet and group shots vs plain backdrops.
    assert r["groups--kit_with_rose.jpg"]["flags"]["complex_background"]
    assert r["kit_harington--kit_03.jpg"]["flags"]["complex_background"]
    assert not r["obama--obama_02.jpg"]["flags"]["complex_background"]
    assert not r["rose_leslie--rose_02.jpg"]["flags"]["complex_background"]


def test_partial_faces_are_flagged_as_cut_by_the_frame(analyzed):
    for name in ("obama--obama_partial_01.jpg", "obama--obama_partial_02.jpg"):
        rec = analyzed["records"][name]
        assert rec["faces"][0]["truncation"] > 0.1
        assert rec["flags"]["occluded"]
    assert not analyzed["records"]["obama--obama_02.jpg"]["flags"]["occluded"]


def test_rgba_png_and_no_face_image(analyzed):
    rgba = analyzed["records"]["odd--rgba_32bit.png"]
    assert rgba["error"] is None and rgba["people"] == 1 and rgba["identity"] > 0.92
    blank = analyzed["records"]["synthetic--no_face.png"]
    assert blank["no_face"] and blank["people"] == 0 and blank["main_face"] is None and blank["identity"] is None


def test_identity_separates_obama_from_everyone_else(analyzed):
    obama = [r["identity"] for n, r in analyzed["records"].items() if n.startswith("obama--")]
    others = [r["identity"] for n, r in analyzed["records"].items()
              if n.split("--")[0] in ("biden", "kit_harington", "rose_leslie", "alex_lacamoire", "lin_manuel_miranda")]
    assert len(obama) == 7 and len(others) == 11
    assert min(obama) > 0.92 > max(others)


def curate_run(analyzed, tmp_name: str, **cfg) -> tuple[Path, LocalStageContext]:
    ctx = LocalStageContext.for_folder(analyzed["tmp"] / tmp_name, stage_id="obama:curate", character="obama",
                                       project_root=analyzed["project"])
    config = {**curate.DEFAULTS, **curate.SHOT_DEFAULTS, **cfg}
    out = curate.run(config, {"analysis": analyzed["analysis"], "images": analyzed["images"]}, ctx)
    return out["curated"].path, ctx


@pytest.fixture(scope="module")
def curated_report(analyzed):
    return curate_run(analyzed, "curate_report")


def test_curate_keeps_obama_and_drops_the_others_with_reasons(curated_report):
    folder, ctx = curated_report
    kept = {Path(e["source"]).name for e in _jsonl(folder / "curated.jsonl")}
    rejected = {Path(r["source"]).name: r for r in _jsonl(folder / "rejected.jsonl")}
    obama = {"obama--obama_02.jpg", "obama--obama_03.jpg", "obama--obama_04.jpg", "obama--obama_240p.jpg",
             "obama--obama_partial_01.jpg", "obama--obama_partial_02.jpg", "obama--obama_small.jpg"}
    # odd/rgba_32bit.png is obama_02 with an alpha channel (phash distance 0): one of the two stays
    assert obama - {"obama--obama_02.jpg"} <= kept
    assert len({"obama--obama_02.jpg", "odd--rgba_32bit.png"} & kept) == 1
    for name in ("biden--biden_01.jpg", "biden--biden_02.jpg", "kit_harington--kit_01.jpg", "rose_leslie--rose_01.jpg",
                 "alex_lacamoire--alex_02.jpg", "lin_manuel_miranda--lmm_01.png", "groups--six_people.jpg"):
        assert rejected[name]["reason"] == "not the character", name
        assert "< threshold 0.92" in rejected[name]["detail"]
    # Obama is in two_people.jpg, but not as the largest face.
    assert rejected["groups--two_people.jpg"]["reason"] == "character is not the main face"
    assert rejected["synthetic--no_face.png"]["reason"] == "no face found"
    # The 72x90 copy: either no face is found, or the face is below min_face_px.
    assert rejected["synthetic--obama_tiny.jpg"]["reason"] in ("no face found", "face too small")
    # The RGBA PNG holds the same picture as obama_02, a near-duplicate: one of them is kept.
    dup = [r for r in rejected.values() if r["reason"] == "near-duplicate"]
    assert len(dup) == 1 and Path(dup[0]["source"]).name in ("odd--rgba_32bit.png", "obama--obama_02.jpg")
    assert set(kept).isdisjoint(rejected)
    assert all(r["reason"] and r["detail"] for r in rejected.values())
    bal = json.loads((folder / "balance.json").read_text())
    assert bal["identity_threshold"] == 0.92 and bal["strategy"] == "report"
    assert {row["category"] for row in bal["before"]} >= {"extreme_close_up", "close_up", "medium", "full_body", "wide"}


def test_quality_gates_follow_the_spec(analyzed):
    folder, _ = curate_run(analyzed, "curate_strict", min_face_px=300, identity_threshold=0.5)
    rejected = {Path(r["source"]).name: r for r in _jsonl(folder / "rejected.jsonl")}
    assert rejected["obama--obama_240p.jpg"]["reason"] == "face too small"
    assert rejected["obama--obama_small.jpg"]["reason"] == "face too small"
    assert "biden--biden_02.jpg" not in rejected  # 463 px face, and identity 0.5 lets everyone in


def test_select_brings_over_target_categories_down(analyzed):
    targets = {"medium": [0.2, 0.4], "close_up": [0.2, 0.6], "full_body": [0.1, 0.4]}
    folder, _ = curate_run(analyzed, "curate_select", strategy="select", targets=targets)
    bal = json.loads((folder / "balance.json").read_text())
    before = {r["category"]: r for r in bal["before"]}
    after = {r["category"]: r for r in bal["after"]}
    assert before["medium"]["status"] == "over" and after["medium"]["status"] == "ok"
    cut = [r for r in _jsonl(folder / "rejected.jsonl") if r["reason"] == "shot balance"]
    assert cut and all("medium over its target" in r["detail"] for r in cut)


def test_reweight_hits_target_midpoints_with_repeats(analyzed):
    targets = {"close_up": [0.45, 0.55], "medium": [0.25, 0.35], "full_body": [0.15, 0.25]}
    folder, _ = curate_run(analyzed, "curate_reweight", strategy="reweight", targets=targets)
    bal = json.loads((folder / "balance.json").read_text())
    after = {r["category"]: r for r in bal["after"]}
    assert all(after[c]["status"] == "ok" for c in targets), bal["after"]
    entries = _jsonl(folder / "curated.jsonl")
    assert any(e["repeats"] > 1 for e in entries) and all(e["repeats"] >= 1 for e in entries)
    groups = {tuple(g["categories"]): g["repeats"] for g in bal["repeats"]}
    assert all(groups[tuple(sorted(set(e["categories"]), key=S.CATEGORIES.index))] == e["repeats"] for e in entries)


@pytest.fixture(scope="module")
def augmented(analyzed):
    return curate_run(analyzed, "curate_augment", strategy="augment", targets={"close_up": [0.5, 0.7]})


def test_augment_derives_close_ups_from_wider_images_with_parents(augmented, analyzed):
    folder, _ = augmented
    entries = _jsonl(folder / "curated.jsonl")
    crops = [e for e in entries if e["parent"]]
    assert crops
    by_id = {e["id"]: e for e in entries}
    for c in crops:
        parent = by_id[c["parent"]]
        assert parent["shot"] in ("medium", "full_body") and not parent["flags"]["occluded"]
        assert c["shot"] == "close_up" and (folder / c["file"]).exists()
        x0, y0, x1, y1 = c["crop_box"]
        with Image.open(folder / c["file"]) as im:
            assert im.size == (x1 - x0, y1 - y0) and min(im.size) >= 384
    bal = json.loads((folder / "balance.json").read_text())
    share = {which: {r["category"]: r for r in bal[which]}["close_up"]["share"] for which in ("before", "after")}
    assert share["after"] > share["before"]


@pytest.fixture(scope="module")
def captioned(augmented, analyzed):
    folder, _ = augmented
    ctx = LocalStageContext.for_folder(analyzed["tmp"] / "caption", stage_id="obama:caption", character="obama",
                                       project_root=analyzed["project"])
    cfg = {"trigger": TRIGGER, "class_word": CLASS, "template": "{trigger} {class}, {shot}, {attributes}",
           "extra_tags": ["photo"], "model": None}
    return caption.run(cfg, {"curated": contract.Artifact("curated", folder), "images": analyzed["images"]}, ctx)


def test_caption_writes_the_dataset_interface(captioned, augmented):
    ddir = captioned["dataset"].path
    records = _jsonl(ddir / "dataset.jsonl")
    assert len(records) == len(_jsonl(augmented[0] / "curated.jsonl"))
    for r in records:
        assert set(r) >= {"id", "image", "caption", "shot", "categories", "repeats", "parent", "width", "height",
                          "source"}
        assert r["shot"] in ("extreme_close_up", "close_up", "medium", "full_body", "wide")
        assert r["categories"][0] == r["shot"] and r["repeats"] >= 1
        assert (ddir / r["image"]).exists() and r["image"] == f"{r['id']}.png"
        txt = (ddir / f"{r['id']}.txt").read_text().strip()
        assert txt == r["caption"] and txt.startswith(f"{TRIGGER} {CLASS}, ") and txt.endswith(", photo")
        assert ", ," not in txt
        with Image.open(ddir / r["image"]) as im:
            assert im.size == (r["width"], r["height"])
    assert any(r["parent"] for r in records)
    assert json.loads((captioned["balance"].path / "balance.json").read_text())["strategy"] == "augment"


def test_export_kohya_plain_and_jsonl(captioned, analyzed):
    ctx = LocalStageContext.for_folder(analyzed["tmp"] / "export", stage_id="obama:export", character="obama",
                                       project_root=analyzed["project"])
    from runner.stages.train import train_config

    buckets = train_config({}, character="obama", trigger=TRIGGER, class_word=CLASS)["buckets"]  # the schema's
    cfg = {"formats": ["jsonl", "kohya", "plain"], "repeats": 10, "trigger": TRIGGER, "class_word": CLASS,
           "resolution": 512, "buckets": buckets}
    out = export.run(cfg, {"dataset": captioned["dataset"]}, ctx)["export"].path
    records = _jsonl(captioned["dataset"].path / "dataset.jsonl")
    folder = out / "kohya" / "img" / f"10_{TRIGGER} {CLASS}"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(r["image"] for r in records)
    assert all("_" not in p.stem for p in folder.iterdir())
    conf = tomllib.loads((out / "kohya" / "dataset_config.toml").read_text())
    sub = conf["datasets"][0]["subsets"][0]
    assert sub["image_dir"] == f"kohya/img/10_{TRIGGER} {CLASS}" and sub["num_repeats"] == 10
    assert conf["general"]["caption_extension"] == ".txt"
    assert len(list((out / "plain").glob("*.txt"))) == len(records) == len(list((out / "plain").glob("*.png")))
    meta = _jsonl(out / "metadata.jsonl")
    assert len(meta) == len(records) and all((out / m["file_name"]).exists() for m in meta)


def _render(sections) -> str:
    import jinja2

    from runner.report import charts

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parents[1] / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v, d=1: "—" if v is None else f"{float(v) * 100:.{d}f}%"
    env.globals["charts"] = charts
    return "".join(env.get_template(s.template).render(**s.context) for s in sections)


def test_report_sections_render(analyzed, augmented, captioned, tmp_path):
    settings = {"thumbnail_px": 96, "gallery_limit": 20}
    sections = analyze.report_sections({}, {"analysis": analyzed["analysis"]}, settings)
    sections += curate.report_sections({}, {"curated": contract.Artifact("curated", augmented[0])}, settings)
    sections += caption.report_sections({"template": "{trigger}"}, captioned, settings)
    html = _render(sections)
    assert html.count("data:image/jpeg;base64") > 10
    assert "not the character" in html and "no face found" in html
    assert "extreme close-up" in html and "Yaw" in html and "<svg" in html


# --------------------------------------------------------------------------- balancing never makes it worse


OBAMA = {"obama--obama_02.jpg", "obama--obama_03.jpg", "obama--obama_04.jpg", "obama--obama_240p.jpg",
         "obama--obama_partial_01.jpg", "obama--obama_partial_02.jpg", "obama--obama_small.jpg",
         "groups--obama_and_biden.jpg"}
# The issue's case: the only full-body photo (obama_03) has a busy background, as has the group photo.
ISSUE_TARGETS = {"full_body": [0.25, 0.3], "close_up": [0.3, 0.5], "complex_background": [0.0, 0.1]}


def _rows(bal: dict, which: str) -> dict:
    return {r["category"]: r for r in bal[which]}


def _distances(bal: dict, which: str) -> dict:
    return {c: B.distance(r["share"], r["target"]) for c, r in _rows(bal, which).items() if r["target"]}


def test_the_obama_set_has_one_full_body_photo_with_a_busy_background(curated_report):
    entries = {Path(e["source"]).name: e for e in _jsonl(curated_report[0] / "curated.jsonl")}
    names = {"obama--obama_02.jpg" if n == "odd--rgba_32bit.png" else n for n in entries}  # the RGBA copy of obama_02
    assert names == OBAMA
    full = [n for n, e in entries.items() if e["shot"] == "full_body"]
    assert full == ["obama--obama_03.jpg"] and "complex_background" in entries[full[0]]["categories"]


@pytest.mark.parametrize("strategy", ["report", "select", "reweight", "augment"])
@pytest.mark.parametrize("targets", [
    ISSUE_TARGETS,
    {"medium": [0.2, 0.4], "close_up": [0.2, 0.6], "full_body": [0.1, 0.4]},
    {"occluded": [0.0, 0.1], "multi_character": [0.2, 0.4], "close_up": [0.4, 0.6]},
    {"medium": [0.0, 0.2], "extreme_close_up": [0.1, 0.2], "complex_background": [0.3, 0.5]},
], ids=["issue", "shots", "flags", "mixed"])
def test_no_strategy_ends_farther_from_any_target_on_real_photos(analyzed, strategy, targets, request):
    folder, _ = curate_run(analyzed, f"never_worse_{request.node.callspec.id}", strategy=strategy, targets=targets)
    bal = json.loads((folder / "balance.json").read_text())
    before, after = _distances(bal, "before"), _distances(bal, "after")
    assert all(after[c] <= before[c] + 1e-4 for c in targets), (before, after)
    counts = {c: r["count"] for c, r in _rows(bal, "before").items()}
    kept = {c: r["count"] for c, r in _rows(bal, "after").items()}
    for c, row in _rows(bal, "before").items():
        if counts[c] and (row["status"] == "under" or not row["target"]):
            assert kept.get(c, 0) >= 1, f"{strategy} removed the last {c} image"
    off = {c for c, r in _rows(bal, "after").items() if r["status"] in ("under", "over")}
    assert {s["category"] for s in bal["shortfalls"]} == off
    assert all(s["text"].startswith(B.label(s["category"]) + " ") for s in bal["shortfalls"])


def test_select_keeps_the_only_full_body_photo_and_says_what_it_cannot_fix(analyzed):
    folder, ctx = curate_run(analyzed, "select_issue", strategy="select", targets=ISSUE_TARGETS)
    kept = {Path(e["source"]).name for e in _jsonl(folder / "curated.jsonl")}
    assert "obama--obama_03.jpg" in kept
    bal = json.loads((folder / "balance.json").read_text())
    assert _rows(bal, "after")["full_body"]["share"] >= _rows(bal, "before")["full_body"]["share"] > 0
    text = {s["category"]: s["text"] for s in bal["shortfalls"]}["full_body"]
    assert text.startswith("full-body ") and "(target 25%–30%)" in text and "add full-body photos" in text
    assert any("full-body" in w for w in ctx.warnings)
    html = _render(curate.report_sections({}, {"curated": contract.Artifact("curated", folder)}, {"thumbnail_px": 64}))
    assert "Still off target" in html and "add full-body photos or a video source" in html


def test_augment_mirrors_only_when_flips_are_allowed(analyzed):
    targets = {"full_body": [0.25, 0.3]}
    off, _ = curate_run(analyzed, "augment_noflip", strategy="augment", targets=targets)
    assert not any(e.get("mirrored") for e in _jsonl(off / "curated.jsonl"))
    assert "allow_flips" in json.loads((off / "balance.json").read_text())["shortfalls"][0]["text"]
    on, _ = curate_run(analyzed, "augment_flip", strategy="augment", targets=targets, allow_flips=True)
    entries = {e["id"]: e for e in _jsonl(on / "curated.jsonl")}
    mirrors = [e for e in entries.values() if e.get("mirrored")]
    assert [Path(entries[m["parent"]]["source"]).name for m in mirrors] == ["obama--obama_03.jpg"]
    m, parent = mirrors[0], entries[mirrors[0]["parent"]]
    assert m["shot"] == "full_body" and m["categories"] == parent["categories"]
    assert m["face_box"][0] == pytest.approx(parent["width"] - parent["face_box"][2])
    assert m["pose"]["yaw"] == pytest.approx(-parent["pose"]["yaw"])
    with Image.open(on / m["file"]) as im, Image.open(analyzed["images"].path / parent["file"]) as src:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(src.convert("RGB"))[:, ::-1])
    html = _render(curate.report_sections({}, {"curated": contract.Artifact("curated", on)}, {"thumbnail_px": 64}))
    assert "mirror of " in html and "1 mirrored copy" in html
    bal = json.loads((on / "balance.json").read_text())
    assert bal["mirrors"] == 1
    assert _rows(bal, "after")["full_body"]["share"] > _rows(bal, "before")["full_body"]["share"]
    sided, ctx = curate_run(analyzed, "augment_sided", strategy="augment", targets=targets, allow_flips=True,
                            sided_traits=["mole on the left cheek"])
    assert not any(e.get("mirrored") for e in _jsonl(sided / "curated.jsonl"))
    assert any("names a side" in w for w in ctx.warnings)


def test_augment_names_a_busy_background_it_cannot_remove(analyzed):
    folder, _ = curate_run(analyzed, "augment_bg", strategy="augment", targets={"complex_background": [0.0, 0.1]})
    bal = json.loads((folder / "balance.json").read_text())
    assert _distances(bal, "after")["complex_background"] <= _distances(bal, "before")["complex_background"]
    entries = _jsonl(folder / "curated.jsonl")
    busy = [e for e in entries if "complex_background" in e["categories"]]
    assert busy and all("busy background" in e.get("caption_hints", []) for e in busy)
    assert not any(e.get("caption_hints") for e in entries if e not in busy)
    cfg = {"trigger": TRIGGER, "class_word": CLASS, "extra_tags": []}
    assert "busy background" in caption.render_caption("{trigger} {class}, {attributes}",
                                                       caption.caption_fields(busy[0], cfg))
    if _rows(bal, "after")["complex_background"]["status"] == "over":
        text = bal["shortfalls"][0]["text"]
        assert "segmentation" in text and "busy background" in text


def test_holdout_keeps_the_only_multi_character_photo_of_the_real_set(curated_report):
    entries = _jsonl(curated_report[0] / "curated.jsonl")
    examples = [Example(id=e["id"], image=Path(e["file"]), caption="", shot=e["shot"], categories=e["categories"])
                for e in entries]
    multi = [e["id"] for e in entries if "multi_character" in e["categories"]]
    assert len(multi) == 1  # obama_and_biden.jpg
    for seed in range(40):
        train, val = split_validation(examples, 0.2, seed)
        assert val and multi[0] not in {e.id for e in val}
        assert {c for e in examples for c in e.categories} == {c for e in train for c in e.categories}
