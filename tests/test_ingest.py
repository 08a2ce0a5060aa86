"""`ingest` on the real photos and on broken files made here."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import ingest

CONFIG = {
    "sources": [{"index": 0, "path": "photos", "label": "", "recursive": True}],
    "extensions": [".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"],
    "max_pixels": 64_000_000,
    "max_side": 512,
    "min_side": 64,
    "format": "png",
}


def run_ingest(folder: Path, tmp_path: Path, **overrides):
    files = tuple(sorted(p for p in folder.rglob("*") if p.is_file()))
    ctx = LocalStageContext.for_folder(tmp_path / "stage", project_root=folder.parent)
    cfg = {**CONFIG, **overrides}
    out = ingest.run(cfg, {"source0": contract.Artifact("source0", folder, files=files)}, ctx)
    records = ingest.read_manifest(out["images"].path)
    q = [json.loads(x) for x in (out["quarantine"].path / "quarantine.jsonl").read_text().splitlines() if x]
    return out, records, {Path(r["source"]).name: r for r in q}, ctx


def test_real_photos_including_rgba_and_exif(shared_data, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in (shared_data / "faces").rglob("*"):
        if p.is_file():
            shutil.copy(p, photos / f"{p.parent.name}__{p.name}")
    shutil.copy(shared_data / "odd" / "rgba_32bit.png", photos / "rgba_32bit.png")
    out, records, quarantined, _ = run_ingest(photos, tmp_path)
    n_files = len(list(photos.iterdir()))
    assert len(records) == n_files and not quarantined
    for r in records:
        im = Image.open(out["images"].path / r["file"])
        assert im.mode == "RGB" and max(im.size) <= 512
        assert (r["width"], r["height"]) == im.size
    by_name = {Path(r["source"]).name: r for r in records}
    rgba = by_name["rgba_32bit.png"]
    assert rgba["orig_mode"] == "RGBA"
    alex3 = by_name["alex_lacamoire__alex_03.png"]
    assert alex3["orig_mode"] in ("RGBA", "RGB", "P")


def test_exif_orientation_is_applied(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    img = Image.new("RGB", (200, 100), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(photos / "rotated.jpg", exif=exif)
    _, records, _, _ = run_ingest(photos, tmp_path)
    (r,) = records
    assert r["exif_transposed"] is True
    assert (r["width"], r["height"]) == (100, 200)


def test_sixteen_bit_cmyk_palette_and_formats(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    ramp = (np.linspace(0, 65535, 128 * 128).reshape(128, 128)).astype(np.uint16)
    Image.fromarray(ramp).save(photos / "sixteen.png")
    Image.new("CMYK", (128, 96), (0, 255, 255, 0)).save(photos / "cmyk.jpg")
    Image.new("P", (80, 80), 3).save(photos / "palette.png")
    Image.new("RGB", (90, 90), (1, 2, 3)).save(photos / "a.webp")
    Image.new("RGB", (90, 90), (4, 5, 6)).save(photos / "b.bmp")
    Image.new("RGB", (90, 90), (7, 8, 9)).save(photos / "c.tiff")
    out, records, quarantined, _ = run_ingest(photos, tmp_path)
    assert not quarantined
    by = {Path(r["source"]).name: r for r in records}
    assert set(by) == {"sixteen.png", "cmyk.jpg", "palette.png", "a.webp", "b.bmp", "c.tiff"}
    sixteen = np.asarray(Image.open(out["images"].path / by["sixteen.png"]["file"]))
    assert sixteen.dtype == np.uint8 and sixteen.min() < 5 and sixteen.max() > 250  # scaled, not clipped
    cmyk = np.asarray(Image.open(out["images"].path / by["cmyk.jpg"]["file"]))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # cyan-free red stays red


def test_broken_files_are_quarantined_with_reasons(shared_data, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    good = (shared_data / "faces" / "obama" / "obama_small.jpg").read_bytes()
    (photos / "good.jpg").write_bytes(good)
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.jpg").write_text("this is not an image\n")
    (photos / "notes.txt").write_text("hello")
    (photos / "copy.jpg").write_bytes(good)
    Image.new("RGB", (40, 30)).save(photos / "tiny.png")
    out, records, q, ctx = run_ingest(photos, tmp_path)
    assert len(records) == 1 and Path(records[0]["source"]).name in {"good.jpg", "copy.jpg"}
    assert q["truncated.jpg"]["reason"] == "truncated or corrupt image"
    assert q["zero.jpg"]["reason"] == "empty file"
    assert q["text.jpg"]["reason"] == "not an image"
    assert q["notes.txt"]["reason"] == "unsupported file type"
    assert q["tiny.png"]["reason"] == "too small"
    dup = q.get("good.jpg") or q.get("copy.jpg")
    assert dup["reason"] == "exact duplicate"
    assert ctx.metrics == {"images_kept": 1.0, "images_quarantined": 6.0}


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    # a 20000 x 20000 PNG compresses to almost nothing but would need 1.2 GB to decode
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    (photos / "bomb.png").write_bytes(buf.getvalue())
    _, records, q, _ = run_ingest(photos, tmp_path, max_pixels=50_000_000)
    assert not records
    assert q["bomb.png"]["reason"] == "too many pixels (decompression bomb guard)"
    assert "400000000" in q["bomb.png"]["detail"]
