"""Training data: the caption stage's dataset, validation split, aspect buckets, caption
variants (tag shuffle) and the weighted, position-addressable batch sampler of a phase.

Everything random here is a pure function of (seed, position), so a resumed run draws exactly
the batches an uninterrupted run would have drawn: the sampler's "position" is the micro-step
index, stored in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from runner.core.errors import UserError
from runner.spec.sections import BucketsConfig

SHOTS = ("extreme_close_up", "close_up", "medium", "full_body", "wide")


class DataError(UserError, ValueError):
    """Bad training data; message names the file and key, hint says what to do (still a
    ValueError for callers that catch bad values)."""


@dataclass
class Example:
    id: str
    image: Path
    caption: str
    shot: str
    categories: list[str]
    repeats: int = 1
    parent: str | None = None
    width: int = 0
    height: int = 0
    clip_frames: int = 0  # frames of a clip file (video LoRA training); 0: a still image
    # filled in by the trainer: (width, height), or (width, height, frames) for video families
    bucket: tuple[int, ...] = (0, 0)
    captions: list[str] = field(default_factory=list)  # caption variants (index 0 = as written)
    is_regularization: bool = False


def _manifest_records(manifest: Path):
    """(line number, record) of each non-blank line of a JSONL manifest; a line that is not JSON
    is a DataError naming the file and line."""
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest}:{n}: not valid JSON ({exc.msg})") from None


def read_dataset(folder: Path) -> list[Example]:
    """Read ``dataset.jsonl`` of the caption stage's ``dataset`` artifact."""
    folder = Path(folder)
    manifest = folder / "dataset.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest} not found", hint="The train stage takes the caption stage's `dataset` artifact.")
    examples: list[Example] = []
    for n, rec in _manifest_records(manifest):
        for key in ("id", "image", "caption"):
            if key not in rec:
                raise DataError(f"{manifest}:{n}: record lacks {key!r}", hint="Re-run the caption stage.")
        img = folder / rec["image"]
        if not img.is_file():
            raise DataError(f"{manifest}:{n}: image {rec['image']!r} is missing from {folder}")
        shot = rec.get("shot") or "medium"
        cats = list(rec.get("categories") or [shot])
        if shot not in cats:
            cats.insert(0, shot)
        repeats = int(rec.get("repeats", 1) or 1)
        if repeats < 1:
            raise DataError(f"{manifest}:{n}: repeats must be >= 1 (got {repeats})")
        examples.append(Example(
            id=str(rec["id"]), image=img, caption=str(rec["caption"]), shot=shot, categories=cats,
            repeats=repeats, parent=rec.get("parent"), width=int(rec.get("width") or 0),
            height=int(rec.get("height") or 0),
        ))
    if not examples:
        raise DataError(f"{manifest} lists no images", hint="The caption stage kept no image; check curation.")
    return examples


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the original images (at least one when fraction > 0 and there are
    two or more), stratified by category; crops and mirrored copies of a held-out image leave
    training with it, so the validation loss never sees an image the model was trained on.

    Stratified: each pick is the image that brings the held-out count of every category closest
    to ``fraction`` of its count (least squares over shot types and flags together), ties broken
    by a hash of (seed, id). An image is never held out when that would leave one of its
    categories (its own or its derived images') without a training image, so the only
    multi-character photo, or the only full-body one, always trains; nor when a category already
    has its share held out (rounded up). When no image is left to pick, fewer are held out.
    """
    originals = sorted((e for e in examples if not e.parent), key=lambda e: _h(seed, "val", e.id))
    if fraction <= 0 or len(originals) < 2:
        return list(examples), []
    trains = {e.id: set(e.categories) for e in originals}  # what leaves training with each original
    for e in examples:
        if e.parent in trains:
            trains[e.parent].update(e.categories)
    training = _category_counts(trains.values())
    want = {c: fraction * n for c, n in _category_counts(set(e.categories) for e in originals).items()}
    held = dict.fromkeys(want, 0)
    val_ids: set[str] = set()
    for _ in range(min(max(1, int(round(fraction * len(originals)))), len(originals) - 1)):
        free = [e for e in originals if e.id not in val_ids and all(training[c] > 1 for c in trains[e.id])
                and all(held[c] + 1 <= math.ceil(want[c] - 1e-9) for c in e.categories)]
        if not free:
            break
        # Adding one image to category c changes (held - want)^2 by 2 (held - want) + 1.
        pick = min(free, key=lambda e: sum(2 * (held[c] - want[c]) + 1 for c in set(e.categories)))
        val_ids.add(pick.id)
        for c in set(pick.categories):
            held[c] += 1
        for c in trains[pick.id]:
            training[c] -= 1
    val = [e for e in examples if e.id in val_ids]
    train = [e for e in examples if e.id not in val_ids and e.parent not in val_ids]
    return train, val


def _category_counts(sets) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cats in sets:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# aspect-ratio buckets

@dataclass(frozen=True)
class BucketSettings:
    """The aspect-ratio buckets of a run: what the trainer builds them from, and what the kohya
    export writes (``enable_bucket``, ``bucket_reso_steps``, ``min_bucket_reso``,
    ``max_bucket_reso``: :meth:`kohya`)."""

    resolution: int
    enabled: bool
    step: int  # train.buckets.step rounded up to a multiple of what the model needs
    min_side: int  # sides of the non-square buckets (multiples of step)
    max_side: int

    @property
    def square(self) -> int:
        return self.resolution // self.step * self.step or self.step

    def buckets(self) -> list[tuple[int, int]]:
        """The buckets (one square one when bucketing is off)."""
        if not self.enabled:
            return [(self.square, self.square)]
        return make_buckets(self.resolution, min_side=self.min_side, max_side=self.max_side,
                            step=self.step, multiple=self.step)

    def kohya(self) -> dict[str, Any]:
        """The sd-scripts dataset keys. min/max are widened to the square side, as sd-scripts
        requires min_bucket_reso <= resolution <= max_bucket_reso (and rounds max up to a step)."""
        return {"enable_bucket": self.enabled, "bucket_reso_steps": self.step, "bucket_no_upscale": False,
                "min_bucket_reso": min(self.min_side, self.square),
                "max_bucket_reso": max(self.max_side, int(math.ceil(self.resolution / self.step)) * self.step)}


def bucket_settings(resolution: int, buckets: BucketsConfig | Mapping[str, Any], *, multiple: int) -> BucketSettings:
    """``train.resolution`` and ``train.buckets`` for a model whose image sides must be multiples
    of ``multiple`` (VAE downscale x 2**(UNet downsamplings): 64 for SD 1.x, 32 for SDXL, what
    sd-scripts also requires of bucket_reso_steps)."""
    b = BucketsConfig.from_dict(buckets)
    step = max(multiple, int(math.ceil(b.step / multiple)) * multiple) if b.enabled else multiple
    lo = max(step, int(math.ceil(b.min_side / step)) * step)
    hi = max(lo, (b.max_side // step) * step)
    return BucketSettings(int(resolution), b.enabled, step, lo, hi)


def make_buckets(resolution: int, *, min_side: int, max_side: int, step: int,
                 multiple: int = 8) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution**2 pixels, sides multiples of ``step``.

    ``multiple`` is what the model needs (VAE scale x UNet downsampling); ``step`` is rounded up
    to a multiple of it.
    """
    step = max(multiple, int(math.ceil(step / multiple)) * multiple)
    area = resolution * resolution
    lo = max(step, int(math.ceil(min_side / step)) * step)
    hi = max(lo, (max_side // step) * step)
    buckets = {(resolution // step * step or step,) * 2}
    w = lo
    while w <= hi:
        h = int(area / w) // step * step
        if lo <= h <= hi and w * h <= area * 1.0001:
            buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's; larger area wins ties."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def load_bucketed(path: Path, bucket: tuple[int, int]):
    """Load an image, scale it to cover the bucket and center-crop it.

    Returns (PIL image, original (height, width), crop top-left (top, left)) in the scaled
    image's pixels, as SDXL's micro-conditioning wants them.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    return _cover_crop(img, tuple(bucket[:2]))


def load_clip_bucketed(path: Path, bucket: tuple[int, int, int]):
    """The first ``bucket[2]`` frames of a clip (or the image, for one frame), each scaled to
    cover the bucket and center-cropped as :func:`load_bucketed` does: (list of PIL frames,
    original (height, width), crop top-left)."""
    width, height, frames = bucket
    if frames == 1 and Path(path).suffix.lower() not in VIDEO_EXTS:
        img, orig, crop = load_bucketed(path, (width, height))
        return [img], orig, crop
    import av

    out, orig, crop = [], (0, 0), (0, 0)
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                img, orig, crop = _cover_crop(frame.to_image().convert("RGB"), (width, height))
                out.append(img)
                if len(out) == frames:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the clip ({exc})", hint="Re-run the video_clips stage.") from None
    if len(out) < frames:
        raise DataError(f"{path}: {len(out)} frames decoded, the frame bucket needs {frames}",
                        hint="Re-run the video_clips stage (clips.jsonl lists more frames than the file has).")
    return out, orig, crop


VIDEO_EXTS = {".mp4", ".mov", ".webm", ".mkv", ".avi"}


def _cover_crop(img, bucket: tuple[int, int]):
    from PIL import Image

    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return img.crop((left, top, left + bw, top + bh)), (h, w), (top, left)


def read_clips(folder: Path) -> list[Example]:
    """Read ``clips.jsonl`` of a video_clips stage's ``clips`` artifact (one Example per clip)."""
    folder = Path(folder)
    manifest = folder / "clips.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest} not found", hint="The train_video stage takes the video_clips stage's `clips`.")
    out: list[Example] = []
    for n, rec in _manifest_records(manifest):
        missing = [k for k in ("id", "clip", "caption", "frames") if k not in rec]
        if missing:
            raise DataError(f"{manifest}:{n}: record lacks {', '.join(map(repr, missing))}",
                            hint="Re-run the video_clips stage.")
        clip = folder / rec["clip"]
        if not clip.is_file():
            raise DataError(f"{manifest}:{n}: clip {rec['clip']!r} is missing from {folder}")
        shot = rec.get("shot") or "medium"
        out.append(Example(id=str(rec["id"]), image=clip, caption=str(rec["caption"]), shot=shot, categories=[shot],
                           width=int(rec.get("width") or 0), height=int(rec.get("height") or 0),
                           clip_frames=int(rec["frames"])))
    return out


# ---------------------------------------------------------------------------------------------
# captions

def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def caption_variants(caption: str, *, n: int, shuffle: bool, keep_tokens: int, seed: int, key: str) -> list[str]:
    """Caption variants encoded into the text cache: the caption as written, then n-1 with the
    tags after the first ``keep_tokens`` shuffled (deterministically per image)."""
    import random

    if not shuffle or n <= 1:
        return [caption]
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    out = [caption]
    rng = random.Random(_h(seed, "tags", key))
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        t = tail[:]
        rng.shuffle(t)
        cand = ", ".join(head + t)
        if cand not in out or len(tail) < 2:
            out.append(cand)
    while len(out) < n:
        out.append(out[len(out) % max(1, len(out))])
    return out


# ---------------------------------------------------------------------------------------------
# phase data mix

def mix_weights(examples: Sequence[Example], mix: str | Mapping[str, float]) -> tuple[list[float], list[str]]:
    """Per-example sampling weights for a phase's data mix, and warnings.

    natural: proportional to repeats (the curated distribution). balanced: every shot present gets
    the same total mass. {category: weight}: each category's mass is spread over its images (by
    repeats); an image in several listed categories collects each one's share.
    """
    warnings: list[str] = []
    reps = [float(e.repeats) for e in examples]
    if mix in (None, "natural"):
        w = reps
    elif mix == "balanced":
        by_shot: dict[str, float] = {}
        for e, r in zip(examples, reps):
            by_shot[e.shot] = by_shot.get(e.shot, 0.0) + r
        w = [r / by_shot[e.shot] for e, r in zip(examples, reps)]
    elif isinstance(mix, Mapping):
        present: dict[str, float] = {}
        for e, r in zip(examples, reps):
            for c in set(e.categories):
                present[c] = present.get(c, 0.0) + r
        missing = [c for c, v in mix.items() if v > 0 and c not in present]
        if missing:
            warnings.append(f"data mix names categories with no training image: {', '.join(sorted(missing))}; "
                            "their share goes to the other categories")
        w = []
        for e, r in zip(examples, reps):
            w.append(sum(float(mix[c]) * r / present[c] for c in set(e.categories) if c in mix and c in present))
        if sum(w) <= 0:
            raise DataError(
                f"data mix {dict(mix)} selects no training image (categories present: {', '.join(sorted(present))})",
                hint="Name at least one category that the curated dataset has.",
            )
    else:
        raise DataError(f"unknown data mix {mix!r}", hint="Use natural, balanced or {category: weight}.")
    total = sum(w)
    return [x / total for x in w], warnings


def mix_summary(examples: Sequence[Example], weights: Sequence[float]) -> dict[str, float]:
    """Expected share of each shot under the weights."""
    out: dict[str, float] = {}
    for e, w in zip(examples, weights):
        out[e.shot] = out.get(e.shot, 0.0) + w
    return {k: round(v, 4) for k, v in sorted(out.items())}


class BatchSampler:
    """Draws micro-batches by weight; every image in a batch shares one bucket.

    ``batch(position)`` is a pure function of (seed, phase, position): resuming at a position
    replays exactly the batches an uninterrupted run draws.
    """

    def __init__(self, examples: Sequence[Example], weights: Sequence[float], batch_size: int, *, seed: int,
                 salt: str) -> None:
        import numpy as np

        self.examples = list(examples)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.examples):
            if self.weights[i] > 0:
                self.by_bucket.setdefault(e.bucket, []).append(i)

    def batch(self, position: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng([self.seed, _h(self.salt) % (2**32), position])
        first = int(rng.choice(len(self.examples), p=self.weights))
        members = self.by_bucket[self.examples[first].bucket]
        if self.batch_size == 1:
            return [first]
        p = self.weights[members] / self.weights[members].sum()
        rest = rng.choice(members, size=self.batch_size - 1, replace=True, p=p)
        return [first, *map(int, rest)]
