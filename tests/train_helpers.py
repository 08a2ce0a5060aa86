"""Helpers for the train tests: a small caption-stage dataset built from ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageOps

# (file under faces/, shot, extra categories, caption tags)
_IMAGES = [
    ("obama/obama_01.jpg", "medium", [], "smiling, dark suit"),
    ("obama/obama_03.jpg", "full_body", [], "standing, full body"),
    ("biden/biden_01.jpg", "medium", [], "suit, flag"),
    ("kit_harington/kit_01.jpg", "close_up", [], "beard, dark hair"),
    ("rose_leslie/rose_01.jpg", "close_up", [], "red hair, smile"),
    ("groups/two_people.jpg", "wide", ["multi_character"], "two people, outdoors"),
]


def make_dataset(shared_data: Path, dest: Path, *, trigger: str = "sks", class_word: str = "person",
                 max_side: int = 96, n: int | None = None) -> Path:
    """Write a caption-stage `dataset` folder (<id>.png, <id>.txt, dataset.jsonl) at ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    faces = shared_data / "faces"
    records = []
    picked = []
    for rel, shot, cats, tags in _IMAGES:
        cand = faces / rel
        if not cand.is_file():
            folder = faces / rel.split("/")[0]
            cand = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
        picked.append((cand, shot, cats, tags))
    for i, (src, shot, cats, tags) in enumerate(picked[:n] if n else picked):
        with Image.open(src) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
        img.thumbnail((max_side, max_side))
        rid = f"img{i:02d}"
        img.save(dest / f"{rid}.png")
        caption = f"{trigger} {class_word}, {shot.replace('_', ' ')}, {tags}"
        (dest / f"{rid}.txt").write_text(caption)
        records.append({"id": rid, "image": f"{rid}.png", "caption": caption, "shot": shot,
                        "categories": [shot, *cats], "repeats": 2 if shot == "full_body" else 1,
                        "parent": None, "width": img.width, "height": img.height, "source": str(src.name)})
    (dest / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dest


def two_photo_project(project: Path, shared_data: Path, extra_yaml: str = "") -> Path:
    """specs/hero.yaml in ``project``: two Obama photos, dlib analysis in one process, plus
    ``extra_yaml`` (top-level sections). Returns the spec's path."""
    import shutil

    (project / "photos").mkdir()
    for name in ("obama_02.jpg", "obama_04.jpg"):
        shutil.copy(shared_data / "faces" / "obama" / name, project / "photos" / name)
    spec = project / "specs" / "hero.yaml"
    spec.write_text("version: 1\ncharacter: {name: hero, trigger: hrochr, class_word: man}\n"
                    "dataset:\n  sources: [{images: ../photos}]\n  analysis: {backend: dlib, workers: 1}\n"
                    + extra_yaml)
    return spec
