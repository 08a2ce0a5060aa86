"""On-disk caches of VAE latents and text embeddings, shared by every variant and phase.

Entries live under ``<cache_dir>/train/<model fingerprint>/`` and are keyed by content:

- latents: image bytes (sha256) + bucket size + crop method -> the VAE's latent distribution
  (mean and std, so each step can still sample from it) and SDXL's size/crop conditioning;
- text: caption string -> the family's caption embeddings (prompt embeddings, and a pooled
  embedding where the family has one).

A second variant or phase of the same model on the same data finds every entry and encodes
nothing. Each entry is written to a temporary file and renamed into place, so a killed run never
leaves a truncated entry, and two runs writing the same entry write the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

from runner.core.fs import atomic_path
from runner.core.hashing import file_sha256

CROP_METHOD = "cover-center-crop-v1"


def _key(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class TrainCache:
    """Latent and text-embedding cache for one base model."""

    def __init__(self, cache_dir: Path, model_fingerprint: str) -> None:
        self.root = Path(cache_dir) / "train" / model_fingerprint
        self.hits = {"latents": 0, "text": 0}
        self.misses = {"latents": 0, "text": 0}

    # -- latents ---------------------------------------------------------------------------
    def latent_path(self, image_sha: str, bucket: tuple[int, ...]) -> Path:
        """(width, height) for images; (width, height, frames) for a video family's clips."""
        k = _key("latent", image_sha, *bucket, CROP_METHOD)
        return self.root / "latents" / k[:2] / f"{k}.safetensors"

    def text_path(self, caption: str) -> Path:
        k = _key("text", caption)
        return self.root / "text" / k[:2] / f"{k}.safetensors"

    def ensure_latents(self, items: Sequence[tuple[Path, tuple[int, ...]]], encode: Callable, *,
                       batch_size: int = 8, progress=None, load: Callable | None = None) -> list[Path]:
        """Make sure every (image, bucket) has an entry; ``encode(list[PIL], bucket)`` returns
        (mean, std) tensors, or a dict of batched tensors with "mean" and "std" and whatever
        else conditions the family (all cached). ``load(path, bucket)`` reads one item as
        (pixels, original size, crop): an image by default, a clip's frames for video families.
        Returns the entry paths in ``items`` order."""
        from runner.diffusion.data import load_bucketed

        load = load or load_bucketed

        paths: list[Path] = []
        todo: dict[tuple[int, int], list[tuple[Path, Path]]] = {}
        for img, bucket in items:
            p = self.latent_path(file_sha256(img), bucket)
            paths.append(p)
            if p.is_file():
                self.hits["latents"] += 1
            else:
                self.misses["latents"] += 1
                todo.setdefault(bucket, [])
                if all(q != p for _, q in todo[bucket]):
                    todo[bucket].append((img, p))
        for bucket, entries in todo.items():
            for s in range(0, len(entries), batch_size):
                chunk = entries[s:s + batch_size]
                loaded = []
                for img, _ in chunk:
                    try:
                        loaded.append(load(img, bucket))
                    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
                        from runner.diffusion.data import DataError

                        raise DataError(f"{img}: cannot read the image ({exc})",
                                        hint="Re-run the caption stage, or remove the file from the dataset.") from None
                encoded = encode([im for im, _, _ in loaded], bucket)
                if not isinstance(encoded, dict):
                    encoded = {"mean": encoded[0], "std": encoded[1]}
                for j, ((_, p), (_, orig, crop)) in enumerate(zip(chunk, loaded)):
                    import torch

                    _atomic_save(
                        {**{k: v[j] for k, v in encoded.items()},
                         "original_size": torch.tensor(orig), "crop_top_left": torch.tensor(crop),
                         "target_size": torch.tensor((bucket[1], bucket[0]))},
                        p, metadata={"crop_method": CROP_METHOD},
                    )
                if progress is not None:
                    progress.update(len(chunk))
        return paths

    def ensure_text(self, captions: Sequence[str], encode: Callable, *, batch_size: int = 32,
                    progress=None) -> dict[str, Path]:
        """Make sure every caption has an entry; ``encode(list[str])`` returns one dict of tensors
        per caption (the family's embeddings: ``prompt_embeds``, and ``pooled`` where the family
        has a pooled vector; lengths may differ between captions)."""
        out: dict[str, Path] = {}
        todo: list[str] = []
        for c in dict.fromkeys(captions):
            p = self.text_path(c)
            out[c] = p
            if p.is_file():
                self.hits["text"] += 1
            else:
                self.misses["text"] += 1
                todo.append(c)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            for c, tensors in zip(chunk, encode(chunk), strict=True):
                _atomic_save(tensors, out[c])
            if progress is not None:
                progress.update(len(chunk))
        return out


def load_entry(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
