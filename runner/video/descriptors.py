"""General-vision embeddings for novelty: a real image model, or a labelled cheap fallback.

The model (DINOv2 by default) is loaded through runner.metrics.embedders.load_image_embedder from
a hub id or a local path. When it cannot be loaded (no hub access and nothing cached), the
fallback descriptor below is used and every place that shows novelty says so.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

FALLBACK_NAME = "fallback:colorhist-gradient-v1"


class GeneralEmbedder(Protocol):
    name: str
    is_fallback: bool
    is_tiny_random: bool

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray: ...


class FallbackDescriptor:
    """Normalized HSV colour histogram (8x4x4) + 4x4-cell gradient-orientation histogram (8 bins).

    Cheap (well under a millisecond per crop) and deterministic. It sees colour layout and edge
    direction, so it tells a turned head or a changed background from a repeat, but it knows
    nothing about semantics: novelty thresholds tuned for DINOv2 mean something else here.
    """

    name = FALLBACK_NAME
    is_fallback = True
    is_tiny_random = False

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def _one(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        img = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        hist = hist / max(1.0, hist.sum())
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        mag = np.hypot(gx, gy)
        ang = (np.arctan2(gy, gx) % np.pi) / np.pi * 8.0
        ob = np.minimum(ang.astype(np.int32), 7)
        cell = self.size // 4
        grad = np.zeros((4, 4, 8), np.float32)
        for cy in range(4):
            for cx in range(4):
                sl = (slice(cy * cell, (cy + 1) * cell), slice(cx * cell, (cx + 1) * cell))
                grad[cy, cx] = np.bincount(ob[sl].ravel(), weights=mag[sl].ravel(), minlength=8)
        grad = grad.ravel()
        grad = grad / max(1e-6, np.linalg.norm(grad))
        h = np.sqrt(hist)  # Hellinger: a cosine on sqrt-histograms behaves like a histogram distance
        h = h / max(1e-6, np.linalg.norm(h))
        v = np.concatenate([h, grad])
        return v / max(1e-6, np.linalg.norm(v))

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, 128 + 128), np.float32)
        return np.stack([self._one(c) for c in crops]).astype(np.float32)


class ModelDescriptor:
    """Wraps an image embedder from runner.metrics.embedders (DINOv2 / CLIP through transformers)."""

    is_fallback = False

    def __init__(self, embedder: Any) -> None:
        self._e = embedder
        self.name = str(getattr(embedder, "name", "model"))
        self.is_tiny_random = bool(getattr(embedder, "is_tiny_random", False))

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        from PIL import Image

        if not len(crops):
            return np.zeros((0, 1), np.float32)
        return np.asarray(self._e.embed_images([Image.fromarray(c) for c in crops]), dtype=np.float32)


# model_ref -> why it could not be loaded in this process (an offline hub is not retried per video).
_FAILED: dict[str, str] = {}


def _hub_unavailable(model_ref: str) -> str | None:
    """Why a hub id cannot be loaded now (not cached, and no hub), found in seconds rather than
    after the hub client's retries; None for local models and loadable ids."""
    from runner.hub import ModelUnavailable, is_hub_id, resolve_hub_model

    if not is_hub_id(model_ref):
        return None
    try:
        resolve_hub_model(model_ref, key="dataset.source.video_options.general_model")
    except ModelUnavailable as exc:
        return f"{exc} ({exc.hint})"
    return None


def load_general_embedder(model_ref: str | None, *, cache_dir: Any, fallback: str = "auto",
                          warn: Any = None) -> tuple[GeneralEmbedder, str]:
    """(embedder, note). ``fallback``: "auto" (use the fallback when the model will not load),
    "always" (never try a model) or "never" (a model that will not load is an error).
    """
    if fallback == "always" or not model_ref:
        return FallbackDescriptor(), "general-vision model not requested: cheap fallback descriptor"
    why = _FAILED.get(model_ref)
    if why is None:
        why = _hub_unavailable(model_ref)
    if why is None:
        try:
            from runner.metrics.embedders import load_image_embedder

            emb = load_image_embedder(model_ref, cache_dir=cache_dir)
            return ModelDescriptor(emb), f"general-vision model {getattr(emb, 'name', model_ref)}"
        except Exception as exc:  # missing files, missing module, bad folder: say so
            if fallback == "never":
                raise
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
    _FAILED[model_ref] = why
    if fallback == "never":
        from runner.core.errors import StageError

        raise StageError(f"general-vision model {model_ref!r} cannot be loaded: {why}",
                         hint="Download it into the Hugging Face cache or give a local folder, or set "
                              "video_options.general_fallback: auto to use the labelled fallback descriptor.")
    note = (f"general-vision model {model_ref!r} could not be loaded ({why}); novelty uses the cheap "
            f"fallback descriptor {FALLBACK_NAME}")
    if warn is not None:
        warn(note)
    return FallbackDescriptor(), note
