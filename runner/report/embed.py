"""Images embedded in the report as data URIs, so the HTML file works offline on its own."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageOps


def image_to_data_uri(img: Image.Image, *, fmt: str = "JPEG", quality: int = 82) -> str:
    buf = io.BytesIO()
    if fmt.upper() == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    img.save(buf, format=fmt, quality=quality, optimize=True)
    mime = "image/jpeg" if fmt.upper() == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_data_uri(
    path: str | Path | Image.Image,
    px: int = 192,
    *,
    boxes: Iterable[Sequence[float]] = (),
    box_color: str = "#39d353",
) -> str:
    """A JPEG thumbnail (longest side ``px``) as a data URI, with optional boxes drawn on it.

    ``boxes`` are (x0, y0, x1, y1) in the pixel coordinates of the full-size image.
    """
    if isinstance(path, Image.Image):
        img = path
    else:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im)
            img.load()
    img = img.convert("RGB")
    w, h = img.size
    scale = min(1.0, px / max(w, h))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    boxes = list(boxes)
    if boxes:
        draw = ImageDraw.Draw(img)
        width = max(1, round(max(img.size) / 96))
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=box_color, width=width)
    return image_to_data_uri(img)


def video_data_uri(path: str | Path, mime: str = "video/mp4") -> str:
    """A small video file as a data URI (for <video src=...>); keep clips short."""
    data = Path(path).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
