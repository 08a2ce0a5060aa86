"""Export layouts on a tiny hand-made dataset (repeats from reweighting, jsonl-only)."""

from __future__ import annotations

import json
import tomllib

from PIL import Image

from runner.engine.context import LocalStageContext
from runner.stages import base, export


def make_dataset(folder):
    folder.mkdir()
    recs = []
    for i, (shot, reps) in enumerate([("close_up", 1), ("full_body", 3), ("full_body", 3)]):
        rid = f"{i:016x}"
        Image.new("RGB", (64, 80), (i * 40, 90, 120)).save(folder / f"{rid}.png")
        (folder / f"{rid}.txt").write_text(f"zq man, {shot}\n")
        recs.append({"id": rid, "image": f"{rid}.png", "caption": f"zq man, {shot}", "shot": shot, "categories": [shot],
                     "repeats": reps, "parent": None, "width": 64, "height": 80, "source": f"p/{i}.jpg"})
    (folder / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_kohya_folders_per_repeat_count(tmp_path):
    make_dataset(tmp_path / "ds")
    ctx = LocalStageContext.for_folder(tmp_path / "x")
    cfg = {"formats": ["kohya", "jsonl"], "repeats": 4, "trigger": "zq", "class_word": "man", "resolution": 768}
    out = export.run(cfg, {"dataset": base.Artifact("dataset", tmp_path / "ds")}, ctx)["export"].path
    assert sorted(p.name for p in (out / "kohya" / "img").iterdir()) == ["12_zq man", "4_zq man"]
    assert len(list((out / "kohya" / "img" / "12_zq man").glob("*.png"))) == 2
    conf = tomllib.loads((out / "kohya" / "dataset_config.toml").read_text())
    assert conf["datasets"][0]["resolution"] == 768
    assert {s["num_repeats"] for s in conf["datasets"][0]["subsets"]} == {4, 12}
    assert not (out / "plain").exists()
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all((out / m["file_name"]).exists() for m in meta)
    assert "kohya/img/12_zq man" in export.dataset_config_toml([("kohya/img/12_zq man", 12)], resolution=512, class_tokens="zq man")
