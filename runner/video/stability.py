"""Identity stability against a medoid prototype, and novelty of general-vision embeddings.

Two embeddings are kept apart on purpose: the identity embedding (ArcFace or dlib) answers only
"is this the same person?"; the general-vision embedding (DINOv2, or the labelled fallback
descriptor) answers only "does this frame look new?".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def medoid(embeddings: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """The member with the smallest summed cosine distance to the others, and its index.

    A medoid is an actual frame's embedding (unlike a mean), so a few off frames cannot pull the
    prototype somewhere no real face is.
    """
    if len(embeddings) == 0:
        raise ValueError("medoid of an empty set")
    e = l2n(np.stack([np.asarray(x) for x in embeddings]))
    dist = 1.0 - e @ e.T
    i = int(np.argmin(dist.sum(axis=1)))
    return e[i], i


def stability(embedding: np.ndarray, prototype: np.ndarray) -> float:
    """stable(t) = cos(e_id(t), prototype)."""
    return float(l2n(embedding) @ l2n(prototype))


def novelty(embedding: np.ndarray, saved: np.ndarray | Sequence[np.ndarray]) -> float:
    """min over saved images of (1 - cos); 1.0 when nothing is saved yet."""
    if saved is None or len(saved) == 0:
        return 1.0
    s = l2n(np.asarray(saved))
    return float(np.min(1.0 - s @ l2n(embedding)))
