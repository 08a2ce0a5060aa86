"""`ingest`: read image folders, normalize every usable image, quarantine the rest with a reason.

Normalization: EXIF orientation applied, RGB (alpha flattened on white, 16-bit scaled to 8-bit,
CMYK through its ICC profile when it has one), longest side capped at ``max_side``, stored as PNG
(or JPEG). Images with more than ``max_pixels`` pixels are refused before they are decoded
(decompression bombs). Exact byte duplicates are kept once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.fs import atomic_path
from runner.spec.config import node_field, schema_config, view_of
from runner.spec.sections import IngestConfig, ReportConfig, spec_config


@dataclass(frozen=True)
class IngestSource:
    """One image folder of the ingest node: its place in dataset.sources, path, label, recursion."""

    index: int
    path: str
    label: str
    recursive: bool


@schema_config("dataset", "ingest")
class IngestNode(IngestConfig):
    """The ingest stage's node config: dataset.ingest plus the image folders to read."""

    sources: tuple[IngestSource, ...] = node_field()


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    dataset = spec_config(spec).dataset
    sources = [IngestSource(i, s.images, s.label, s.recursive) for i, s in enumerate(dataset.sources) if s.images]
    if not sources:
        return []
    ing = dataset.ingest
    inputs: dict[str, contract.InputRef] = {
        f"source{src.index}": contract.FileSetRef(root=graph.project_root / src.path, patterns=("*",),
                                                  recursive=src.recursive,
                                                  spec_key=f"dataset.sources[{src.index}].images")
        for src in sources}
    config = {
        "sources": [{"index": src.index, "path": src.path, "label": src.label, "recursive": src.recursive}
                    for src in sources],
        "extensions": sorted(ing.extensions),
        "max_pixels": ing.max_pixels,
        "max_side": ing.max_side,
        "min_side": ing.min_side,
        "format": ing.format,
    }
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "ingest"),
            kind="ingest",
            character=graph.character,
            config=config,
            inputs=inputs,
            outputs=("images", "quarantine"),
            label=f"{len(sources)} image folder{'s' if len(sources) != 1 else ''}",
        )
    ]


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def normalize_image(data: bytes, *, max_pixels: int, max_side: int, min_side: int):
    """Decode bytes into a normalized RGB PIL image, or raise _Reject with a reason.

    Returns (image, info) where info records the original size/format/mode and what was done.
    """
    from PIL import Image

    im = _decode(data, max_pixels)
    (w, h), fmt, mode = im.size, im.format, im.mode
    im, transposed = _upright(im)
    im = _to_rgb(im)
    ow, oh = im.size
    if min(ow, oh) < min_side:
        raise _Reject("too small", f"{ow}x{oh}, shorter side below min_side {min_side}")
    scale = 1.0
    if max(ow, oh) > max_side:
        scale = max_side / max(ow, oh)
        im = im.resize((max(1, round(ow * scale)), max(1, round(oh * scale))), Image.Resampling.LANCZOS)
    info = {
        "orig_width": w,
        "orig_height": h,
        "orig_format": fmt,
        "orig_mode": mode,
        "exif_transposed": transposed,
        "scale": round(scale, 6),
    }
    return im, info


def _decode(data: bytes, max_pixels: int):
    """The decoded image; _Reject for an empty, unreadable, truncated or oversized one (the pixel
    count is checked before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise _Reject("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise _Reject("too many pixels (decompression bomb guard)",
                              f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            im.load()
            return im
    except _Reject:
        raise
    except UnidentifiedImageError:
        raise _Reject("not an image", "the file's content is not a format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Reject("too many pixels (decompression bomb guard)", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        broken = "truncat" in msg.lower() or "broken" in msg.lower()
        reason = "truncated or corrupt image" if broken else "cannot decode image"
        raise _Reject(reason, msg) from None


def _upright(im):
    """(the image with its EXIF orientation applied, whether it was turned)."""
    from PIL import ImageOps

    try:
        exif_orientation = im.getexif().get(0x0112, 1)
    except Exception:
        exif_orientation = 1
    if exif_orientation in (None, 1):
        return im, False
    return ImageOps.exif_transpose(im), True


def _to_rgb(im):
    """8-bit RGB: 16-bit and float scaled, CMYK through its ICC profile when it has one,
    transparency flattened on white."""
    from PIL import Image, ImageCms

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8")
        im = Image.fromarray(arr, mode="L")
    if im.mode == "CMYK":
        icc = im.info.get("icc_profile")
        try:
            if not icc:
                raise OSError("no ICC profile")
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            im = im.convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        im = bg.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _process(job: tuple[int, str, Path, str, int, str], cfg: IngestNode, images_dir: Path,
             project_root: Path) -> dict[str, Any]:
    order, label, path, ext_ok, source_index, _ = job
    try:
        rel_source = path.resolve().relative_to(project_root.resolve()).as_posix()
    except ValueError:
        rel_source = str(path)
    if not ext_ok:
        return {"order": order, "reject": {"source": rel_source, "reason": "unsupported file type",
                                           "detail": f"extension {path.suffix or '(none)'!r}; read: "
                                                     + ", ".join(cfg.extensions)}}
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"order": order, "reject": {"source": rel_source, "reason": "cannot read file",
                                           "detail": exc.strerror or str(exc)}}
    sha = hashlib.sha256(data).hexdigest()
    try:
        im, info = normalize_image(data, max_pixels=cfg.max_pixels, max_side=cfg.max_side, min_side=cfg.min_side)
    except _Reject as rej:
        return {"order": order, "reject": {"source": rel_source, "reason": rej.reason, "detail": rej.detail,
                                           "sha256": sha}}
    image_id = sha[:16]
    ext = "png" if cfg.format == "png" else "jpg"
    out = images_dir / f"{image_id}.{ext}"
    if not out.exists():
        with atomic_path(out) as tmp:
            if ext == "png":
                im.save(tmp, format="PNG", compress_level=1)
            else:
                im.save(tmp, format="JPEG", quality=95)
    record = {
        "id": image_id,
        "file": f"images/{out.name}",
        "source": rel_source,
        "source_index": source_index,
        "label": label,
        "sha256": sha,
        "width": im.size[0],
        "height": im.size[1],
        **info,
    }
    return {"order": order, "record": record}


@contract.register("ingest", version=1, order=10, expand=expand,
               description="Read image folders; normalize images; quarantine unusable files.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Read image folders; normalize images; quarantine unusable files."""
    images_art = ctx.out_dir / "images"
    images_dir = images_art / "images"
    images_dir.mkdir(parents=True)
    quarantine_art = ctx.out_dir / "quarantine"
    quarantine_art.mkdir()
    node = IngestNode.from_dict(config)
    exts = {e.lower() for e in node.extensions}

    jobs = []
    for src in node.sources:
        art = inputs[f"source{src.index}"]
        for f in art.files:
            jobs.append((len(jobs), src.label, Path(f), f.suffix.lower() in exts, src.index, ""))
    if not jobs:
        ctx.warn("no files found in the image sources")
    progress = ctx.progress(len(jobs), "images")
    results: list[dict[str, Any]] = []
    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(lambda j: _process(j, node, images_dir, ctx.project_root), jobs):
            results.append(res)
            progress.update(1)
    progress.close()
    results.sort(key=lambda r: r["order"])

    seen: dict[str, str] = {}
    kept, rejected = [], []
    for r in results:
        if "reject" in r:
            rejected.append(r["reject"])
            continue
        rec = r["record"]
        if rec["id"] in seen:
            rejected.append({"source": rec["source"], "reason": "exact duplicate",
                             "detail": f"same bytes as {seen[rec['id']]}"})
            continue
        seen[rec["id"]] = rec["source"]
        kept.append(rec)
    with (images_art / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for rec in kept:
            fh.write(json.dumps(rec) + "\n")
    with (quarantine_art / "quarantine.jsonl").open("w", encoding="utf-8") as fh:
        for rec in rejected:
            fh.write(json.dumps(rec) + "\n")
    for rec in rejected:
        ctx.log(f"quarantined {rec['source']}: {rec['reason']}", detail=rec.get("detail", ""))
    ctx.metric("images_kept", len(kept))
    ctx.metric("images_quarantined", len(rejected))
    ctx.log(f"{len(kept)} images kept, {len(rejected)} quarantined")
    return {
        "images": contract.Artifact("images", images_art, meta={"count": len(kept)}),
        "quarantine": contract.Artifact("quarantine", quarantine_art, meta={"count": len(rejected)}),
    }


def read_manifest(images_artifact: Path) -> list[dict[str, Any]]:
    """Records of an `images` artifact (ingest's, or any stage writing the same layout)."""
    path = Path(images_artifact) / "manifest.jsonl"
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri

    records = read_manifest(outputs["images"].path)
    rep = view_of(ReportConfig, env)
    limit, px = rep.gallery_limit, rep.thumbnail_px
    gallery = [
        {"src": thumbnail_data_uri(outputs["images"].path / r["file"], px),
         "caption": r["source"], "size": f"{r['orig_width']}x{r['orig_height']}"}
        for r in records[:limit]
    ]
    qpath = outputs["quarantine"].path / "quarantine.jsonl"
    lines = qpath.read_text(encoding="utf-8").splitlines() if qpath.exists() else []
    quarantined = [json.loads(line) for line in lines if line.strip()]
    return [
        contract.ReportSection(
            title="Ingested images",
            template="sections/ingest.html.j2",
            anchor="ingest",
            context={"gallery": gallery, "total": len(records), "shown": len(gallery),
                     "quarantined": quarantined, "sources": IngestNode.from_dict(config).sources},
        )
    ]
