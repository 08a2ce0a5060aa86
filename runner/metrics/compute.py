"""Batched metric computation for sets of generated images (used by the evaluate stage).

:class:`MetricComputer` holds the three models (CLIP, DINO, a face backend), embeds the references
once, embeds generated images ``batch_size`` at a time (CLIP image + DINO in batches, every
distinct prompt's CLIP text embedding once), and turns embeddings into the metrics of
:mod:`runner.metrics.definitions` per image, per category and overall.

``batch_size=1`` is the one-image-at-a-time baseline that bench/evaluate compares against.

Face detectors and dlib's identity network work one image at a time, so batching cannot speed
them up; with ``face_pool`` (a :class:`runner.vision.analysis.FacePool`) the faces of a set are
analyzed in worker processes while this process runs the CLIP/DINO batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from runner.metrics import definitions as M
from runner.core.errors import StageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# Metrics averaged over categories (equal weight per category) for the "overall" row.
CATEGORY_MEAN_METRICS = ("face_similarity", "face_similarity_max", "no_face_rate", "consistency",
                         "clip_t", "clip_score", "clip_i", "dino", "diversity")


@dataclass
class EmbeddedImages:
    """Everything the metrics need from a set of images; one row / entry per image."""

    clip: np.ndarray  # (N, Dc)
    dino: np.ndarray  # (N, Dd)
    faces: list[np.ndarray | None]  # identity embedding of the main face, None: no face found
    face_boxes: list[list[float] | None]


@dataclass
class ReferenceSet:
    names: list[str]
    clip: np.ndarray
    dino: np.ndarray
    faces: np.ndarray  # (K, Df) identity embeddings of references with a face
    face_found: list[bool] = field(default_factory=list)


class MetricComputer:
    def __init__(self, *, clip, dino, face_backend, batch_size: int = 16, face_pool=None) -> None:
        self.clip = clip
        self.dino = dino
        self.face_backend = face_backend
        self.batch_size = max(1, int(batch_size))
        self.face_pool = face_pool  # FacePool | None; started when worth it, closed by close()
        self._face_s = 0.0  # in-process face analysis: seconds and images so far
        self._face_n = 0

    # Start the face worker processes only for sets whose in-process face analysis is expected to
    # take longer than this (starting them and loading their models costs about 2 s).
    POOL_WORTH_S = 4.0

    def close(self) -> None:
        if self.face_pool is not None:
            self.face_pool.close()

    def __enter__(self) -> "MetricComputer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tiny_random(self) -> bool:
        return bool(getattr(self.clip, "is_tiny_random", False) or getattr(self.dino, "is_tiny_random", False))

    def models(self) -> dict[str, Any]:
        fb = self.face_backend
        return {
            "clip": self.clip.name, "clip_tiny_random": bool(self.clip.is_tiny_random),
            "dino": self.dino.name, "dino_tiny_random": bool(self.dino.is_tiny_random),
            "face_backend": getattr(fb, "name", str(fb)),
            "face_embedding_model": getattr(fb, "embedding_model", ""),
            "face_selection": getattr(fb, "selection_note", ""),
        }

    # ------------------------------------------------------------------ embedding
    def _timed_faces(self, images: Sequence["Image.Image"]) -> list[tuple[np.ndarray | None, list[float] | None]]:
        """Main faces in this process (batched where the backend can), timing them for the pool."""
        import time

        if not images:
            return []
        t = time.perf_counter()
        out = self.face_backend.main_face_embeddings([np.asarray(im.convert("RGB")) for im in images])
        self._face_s += time.perf_counter() - t
        self._face_n += len(images)
        return out

    def embed(self, images: Sequence["Image.Image"], batch_size: int | None = None,
              timings: dict[str, float] | None = None) -> EmbeddedImages:
        """Embed ``images``; ``timings`` (if given) receives seconds spent in clip / dino / faces."""
        import time

        bs = batch_size or self.batch_size
        t0 = time.perf_counter()
        found: list[tuple[np.ndarray | None, list[float] | None]] = []
        futures = None
        pool = self.face_pool
        if pool is not None and images:
            if not pool.started and self._face_n == 0:
                found += self._timed_faces(images[:1])  # what one image costs here
            rest = images[len(found):]
            if rest and (pool.started or self._face_s / self._face_n * len(rest) > self.POOL_WORTH_S):
                # Submitted first: the workers analyze faces while the batches below run here.
                futures = pool.submit(np.asarray(im.convert("RGB")) for im in rest)
        clip = self.clip.embed_images(images, batch_size=bs)
        t1 = time.perf_counter()
        dino = self.dino.embed_images(images, batch_size=bs)
        t2 = time.perf_counter()
        if futures is not None:
            found += pool.results(futures)
        else:
            found += self._timed_faces(images[len(found):])
        faces = [emb for emb, _ in found]
        boxes = [box for _, box in found]
        t3 = time.perf_counter()
        if timings is not None:
            # With a pool, "faces" is only the wait after the CLIP/DINO batches.
            for k, v in (("clip", t1 - t0), ("dino", t2 - t1), ("faces", t3 - t2)):
                timings[k] = timings.get(k, 0.0) + v
        return EmbeddedImages(clip=clip, dino=dino, faces=faces, face_boxes=boxes)

    def references(self, images: Sequence["Image.Image"], names: Sequence[str]) -> ReferenceSet:
        if not images:
            raise StageError("no reference images to evaluate against",
                             hint="List reference images (files or folders) under character.references.")
        spent = (self._face_s, self._face_n)
        emb = self.embed(images)
        self._face_s, self._face_n = spent  # references are no guide to what generated images cost
        found = [f is not None for f in emb.faces]
        if not any(found):
            raise StageError(
                f"no face found in any of the {len(images)} reference image(s) "
                f"({', '.join(list(names)[:5])}{', ...' if len(names) > 5 else ''}) with the "
                f"{getattr(self.face_backend, 'name', 'face')} backend",
                hint="Face similarity needs references showing the character's face; add clear, "
                "frontal photos to character.references (or try evaluate.face_model: insightface).",
            )
        return ReferenceSet(names=list(names), clip=emb.clip, dino=emb.dino,
                            faces=np.stack([f for f in emb.faces if f is not None]), face_found=found)

    def text_embeddings(self, prompts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """CLIP text embedding per prompt; each distinct prompt is embedded once."""
        bs = batch_size or self.batch_size
        unique = list(dict.fromkeys(prompts))
        table = dict(zip(unique, self.clip.embed_texts(unique, batch_size=bs)))
        return np.stack([table[p] for p in prompts]) if prompts else np.zeros((0, self.clip.dim), np.float32)

    # ------------------------------------------------------------------ metrics
    def score(
        self,
        emb: EmbeddedImages,
        text_emb: np.ndarray,
        refs: ReferenceSet,
        *,
        categories: Sequence[str],
        prompt_keys: Sequence[str],
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float | None]], dict[str, float | None]]:
        """(per image, per category, overall) metrics; see runner.metrics.definitions."""
        n = len(emb.faces)
        if not (len(emb.clip) == len(text_emb) == len(categories) == len(prompt_keys) == n):
            raise ValueError("images, prompts, categories and keys must line up")
        per_image = []
        ct = M.clip_t(emb.clip, text_emb) if n else np.zeros(0)
        cs = M.clip_score(emb.clip, text_emb) if n else np.zeros(0)
        ci = M.reference_similarity(emb.clip, refs.clip) if n else np.zeros(0)
        di = M.reference_similarity(emb.dino, refs.dino) if n else np.zeros(0)
        fmean, fmax, found = M.face_similarity_per_image(emb.faces, refs.faces) if n else (np.zeros(0),) * 3
        for i in range(n):
            per_image.append({
                "clip_t": float(ct[i]), "clip_score": float(cs[i]), "clip_i": float(ci[i]), "dino": float(di[i]),
                "face_found": bool(found[i]), "face_similarity": float(fmean[i]),
                "face_similarity_max": float(fmax[i]), "face_box": emb.face_boxes[i],
            })
        per_cat: dict[str, dict[str, float | None]] = {}
        for cat in dict.fromkeys(categories):
            rows = [i for i in range(n) if categories[i] == cat]
            per_cat[cat] = self._aggregate(emb, rows, per_image, [prompt_keys[i] for i in rows])
        overall: dict[str, float | None] = {}
        for m in CATEGORY_MEAN_METRICS:
            vals = [v[m] for v in per_cat.values() if v.get(m) is not None and not math.isnan(v[m])]  # type: ignore[arg-type]
            overall[m] = float(np.mean(vals)) if vals else None
        overall["images"] = n
        return per_image, per_cat, overall

    @staticmethod
    def _aggregate(emb: EmbeddedImages, rows: list[int], per_image: list[dict[str, Any]],
                   keys: list[str]) -> dict[str, float | None]:
        def mean(name: str) -> float:
            return float(np.mean([per_image[i][name] for i in rows]))

        faces = [emb.faces[i] for i in rows]
        cons = M.consistency(faces)
        return {
            "images": len(rows),
            "face_similarity": mean("face_similarity"),
            "face_similarity_max": mean("face_similarity_max"),
            "no_face_rate": 1.0 - float(np.mean([per_image[i]["face_found"] for i in rows])),
            "consistency": None if math.isnan(cons) else cons,
            "clip_t": mean("clip_t"),
            "clip_score": mean("clip_score"),
            "clip_i": mean("clip_i"),
            "dino": mean("dino"),
            "diversity": M.diversity(emb.dino[rows], keys),
        }
