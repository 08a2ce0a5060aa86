"""The evaluation metrics, on embeddings, exactly as the papers define them.

All functions take numpy arrays of embeddings (one row per image or text; they are L2-normalized
here, so raw vectors work too) and return plain floats or per-item arrays. Which model produced
the embeddings is the caller's business (runner.metrics.embedders, runner.vision.faces).

Prompt-image alignment (Hessel et al. 2021, "CLIPScore", eq. 1)
    ``clip_t``      the raw cosine cos(E_I, E_C) between the CLIP image embedding and the CLIP
                    text embedding of the prompt it was generated from (what DreamBooth and most
                    personalization papers report as "CLIP-T"), per image, then averaged.
    ``clip_score``  CLIP-S = w * max(cos(E_I, E_C), 0) with w = 2.5, per image, then averaged
                    (the corpus-level CLIP-S is the mean of the per-image scores).

Subject fidelity (Ruiz et al. 2023, "DreamBooth", section 4.1)
    ``clip_i``      the average pairwise cosine similarity between CLIP image embeddings of the
                    generated images and of the real reference images (all generated x real
                    pairs, averaged).
    ``dino``        the same with DINO ViT-S/16 embeddings (the CLS token); DreamBooth prefers it
                    because it is not trained to ignore differences between subjects of the same
                    class.

Identity (face recognition embeddings)
    ``face_similarity``      per generated image: cosine of the identity embedding of its main
                             (largest) face to each reference embedding, averaged over the
                             references; then averaged over the images.
    ``face_similarity_max``  the same with the maximum over the references.
    ``no_face_rate``         share of generated images in which no face was found. Such an image is
                             a failure, not a skip: its similarity counts as 0 in both averages.
    ``consistency``          mean pairwise identity similarity between the generations of one
                             category (all unordered pairs i < j); a pair with a faceless image
                             scores 0, for the same reason.

Counter-metric
    ``diversity``   mean pairwise DINO distance (1 - cosine) between images generated from the same
                    prompt with different seeds, averaged over the prompts. A checkpoint that pastes
                    a reference image regardless of the prompt and seed scores near 0. Needs at
                    least two seeds (None otherwise).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CLIPSCORE_W = 2.5

# The catalogue (names, direction, description) lives in a numpy-free module so that planning
# (which validates targets and objectives) stays light.
from runner.metrics.catalog import METRICS  # noqa: E402,F401  (re-exported)


def normalize_rows(x: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, n, out=np.zeros_like(a), where=n > 0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarities."""
    return normalize_rows(a) @ normalize_rows(b).T


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of a[i] and b[i]."""
    an, bn = normalize_rows(a), normalize_rows(b)
    if an.shape != bn.shape:
        raise ValueError(f"paired embeddings of different shapes: {an.shape} vs {bn.shape}")
    return np.sum(an * bn, axis=1)


# --------------------------------------------------------------------------- prompt alignment


def clip_t(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per image: raw cosine between image i and the prompt it was generated from (text row i)."""
    return paired_cosine(image_emb, text_emb)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray, w: float = CLIPSCORE_W) -> np.ndarray:
    """Per image: CLIP-S = w * max(cos(E_I, E_C), 0) (Hessel et al. 2021, w = 2.5)."""
    return w * np.maximum(paired_cosine(image_emb, text_emb), 0.0)


# --------------------------------------------------------------------------- subject fidelity


def reference_similarity(gen_emb: np.ndarray, ref_emb: np.ndarray) -> np.ndarray:
    """Per generated image: mean cosine to the reference images.

    The mean of this vector is DreamBooth's CLIP-I (with CLIP embeddings) or DINO (with DINO
    embeddings): the average over all generated x real pairs.
    """
    if len(ref_emb) == 0:
        raise ValueError("no reference embeddings")
    return cosine_matrix(gen_emb, ref_emb).mean(axis=1)


def clip_i(gen_emb: np.ndarray, ref_emb: np.ndarray) -> float:
    return float(reference_similarity(gen_emb, ref_emb).mean()) if len(gen_emb) else float("nan")


def dino_score(gen_emb: np.ndarray, ref_emb: np.ndarray) -> float:
    return clip_i(gen_emb, ref_emb)


# --------------------------------------------------------------------------- identity


def face_similarity_per_image(
    face_embs: Sequence[np.ndarray | None], ref_face_embs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: (mean over references, max over references, face found?).

    ``face_embs[i]`` is the identity embedding of image i's main face, or None when no face was
    found; such an image scores 0 (a failure, not a skip).
    """
    refs = normalize_rows(ref_face_embs)
    if len(refs) == 0:
        raise ValueError("no reference face embeddings")
    n = len(face_embs)
    mean = np.zeros(n)
    best = np.zeros(n)
    found = np.zeros(n, dtype=bool)
    idx = [i for i, e in enumerate(face_embs) if e is not None]
    if idx:
        sims = cosine_matrix(np.stack([np.asarray(face_embs[i], dtype=np.float64).ravel() for i in idx]), refs)
        mean[idx] = sims.mean(axis=1)
        best[idx] = sims.max(axis=1)
        found[idx] = True
    return mean, best, found


def face_similarity(face_embs: Sequence[np.ndarray | None], ref_face_embs: np.ndarray) -> dict[str, float]:
    """Aggregate identity metrics over a set of generated images (see module docstring)."""
    if not len(face_embs):
        return {"face_similarity": float("nan"), "face_similarity_max": float("nan"), "no_face_rate": float("nan")}
    mean, best, found = face_similarity_per_image(face_embs, ref_face_embs)
    return {
        "face_similarity": float(mean.mean()),
        "face_similarity_max": float(best.mean()),
        "no_face_rate": float(1.0 - found.mean()),
    }


def consistency(face_embs: Sequence[np.ndarray | None]) -> float:
    """Mean pairwise identity similarity over all unordered pairs; a faceless image's pairs score 0.

    NaN with fewer than two images (no pair to compare).
    """
    n = len(face_embs)
    if n < 2:
        return float("nan")
    dim = next((np.asarray(e).size for e in face_embs if e is not None), 1)
    mat = np.zeros((n, dim))
    for i, e in enumerate(face_embs):
        if e is not None:
            mat[i] = np.asarray(e, dtype=np.float64).ravel()
    sims = cosine_matrix(mat, mat)  # zero rows give 0 similarity with everything
    iu = np.triu_indices(n, k=1)
    return float(sims[iu].mean())


# --------------------------------------------------------------------------- diversity


def diversity(emb: np.ndarray, prompt_ids: Sequence[object]) -> float | None:
    """Mean over prompts of the mean pairwise (1 - cos) between that prompt's images (seeds).

    Prompts with a single image are ignored; None when no prompt has two images.
    """
    emb = normalize_rows(emb)
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    per_prompt = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        sims = emb[rows] @ emb[rows].T
        iu = np.triu_indices(len(rows), k=1)
        per_prompt.append(float((1.0 - sims[iu]).mean()))
    return float(np.mean(per_prompt)) if per_prompt else None


# --------------------------------------------------------------------------- trust


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive pair > score of a negative pair), ties 1/2.

    Computed from the Mann-Whitney U statistic (scipy), the standard identity AUC = U / (n1 n0).
    """
    from scipy.stats import mannwhitneyu

    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u / (len(pos) * len(neg)))
