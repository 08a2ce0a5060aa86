"""Storyboard frames: batched generation, validation against the character, retries.

Every frame is scored against the character's references:

- ``face_similarity``: cosine between the identity embedding of the frame's main face and each
  reference face, averaged over the references (the evaluate stage's definition,
  :func:`runner.metrics.definitions.face_similarity_per_image`); a frame without a face scores 0.
- ``clip_i``: mean cosine between the frame's CLIP image embedding and the references'
  (:func:`runner.metrics.definitions.reference_similarity`).

A frame passes when every metric with a threshold (``validation.face_similarity``,
``validation.clip_i``; null: not checked) reaches it. Frames that fail are regenerated, all
together in one batch per round, with new seeds, up to ``validation.retries`` times. The
attempt kept for a scene is the passing one with the largest *margin* (the smallest
``value - threshold`` over the checked metrics), or, when none passes, the attempt with the
largest margin. With no metric checked, the first attempt is kept. Every attempt is recorded.

A scene without the character (``FrameJob.hero`` False, decided by the planner) is not checked
against the character at all: its attempt records ``identity_check: skipped ...`` and passes.

Reference mode validates frames 2+ against several image sets at once (:class:`ValidationSet`):
``references`` (``character.references``) and ``frame1`` (the reference frame, the storyboard
system's rule). A frame passes when it passes against each; the scores against ``references``
keep their names (``face_similarity``), the others are prefixed (``frame1_face_similarity``), and
``against`` lists the sets checked. A reference frame with no face is no face reference: the face
check against it is dropped, and the record says so.

Seeds: scene ``i`` (0-based) of ``n`` at attempt ``a`` uses ``seed + a * n + i``, so seeds never
repeat within a storyboard and a frame is reproducible on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class Thresholds:
    face_similarity: float | None = None  # the stage resolves the spec's "backend" to a number
    clip_i: float | None = None

    def checked(self) -> dict[str, float]:
        return {k: float(v) for k, v in (("face_similarity", self.face_similarity), ("clip_i", self.clip_i))
                if v is not None}


class FrameValidator:
    """Scores images against reference images (faces with a face backend, CLIP-I with an embedder).

    ``face_backend`` may be None when face similarity is not checked; ``clip`` may be None when
    CLIP-I is not checked (then it is not reported either).
    """

    def __init__(self, *, face_backend, clip, reference_images: Sequence[Any], thresholds: Thresholds) -> None:
        from runner.core.errors import StageError

        self.face_backend = face_backend
        self.clip = clip
        self.thresholds = thresholds
        self.ref_faces: np.ndarray | None = None
        self.ref_clip: np.ndarray | None = None
        if not reference_images and thresholds.checked():
            raise StageError("generate.storyboard.validation needs reference images (character.references)",
                             hint="Add reference photos to character.references, or set the validation "
                             "thresholds to null.")
        if face_backend is not None and reference_images:
            found = face_backend.main_face_embeddings([np.asarray(im.convert("RGB")) for im in reference_images])
            embs = [emb for emb, _ in found if emb is not None]
            if embs:
                self.ref_faces = np.stack(embs)
            elif thresholds.face_similarity is not None:
                raise StageError(
                    f"no face found in any of the {len(reference_images)} reference image(s) with the "
                    f"{getattr(face_backend, 'name', 'face')} backend; frames cannot be checked for face similarity",
                    hint="Add clear frontal photos to character.references, or set "
                    "generate.storyboard.validation.face_similarity: null.",
                )
        if clip is not None and reference_images:
            self.ref_clip = clip.embed_images(list(reference_images))

    def score(self, images: Sequence[Any]) -> list[dict[str, Any]]:
        from runner.metrics import definitions as M

        rows: list[dict[str, Any]] = [{} for _ in images]
        if self.face_backend is not None and self.ref_faces is not None:
            found = self.face_backend.main_face_embeddings([np.asarray(im.convert("RGB")) for im in images])
            faces = [emb for emb, _ in found]
            boxes = [box for _, box in found]
            mean, best, found = M.face_similarity_per_image(faces, self.ref_faces)
            for i, r in enumerate(rows):
                r.update(face_found=bool(found[i]), face_similarity=round(float(mean[i]), 5),
                         face_similarity_max=round(float(best[i]), 5), face_box=boxes[i])
        if self.clip is not None and self.ref_clip is not None and len(images):
            ci = M.reference_similarity(self.clip.embed_images(list(images)), self.ref_clip)
            for i, r in enumerate(rows):
                r["clip_i"] = round(float(ci[i]), 5)
        for r in rows:
            r["margin"], r["pass"] = self.judge(r)
        return rows

    def judge(self, scores: dict[str, Any]) -> tuple[float | None, bool]:
        checks = self.thresholds.checked()
        if not checks:
            return None, True
        margins = [float(scores.get(k, 0.0) or 0.0) - t for k, t in checks.items()]
        m = min(margins)
        return round(m, 5), m >= 0


class ValidationSet:
    """Validators by the image set they compare with ("references", "frame1"); see the module docstring."""

    def __init__(self, validators: dict[str, FrameValidator], notes: Sequence[str] = ()) -> None:
        self.validators = validators
        self.notes = list(notes)

    @property
    def against(self) -> list[str]:
        return [name for name, v in self.validators.items() if v.thresholds.checked()]

    def score(self, images: Sequence[Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [{"against": self.against, "checks": {}} for _ in images]
        for name, v in self.validators.items():
            prefix = "" if name == "references" else f"{name}_"
            for r, sc in zip(rows, v.score(images)):
                margin, ok = sc.pop("margin"), sc.pop("pass")
                r.update({prefix + k: val for k, val in sc.items()})
                if margin is not None:
                    r["checks"][name] = {"margin": margin, "pass": ok}
        for r in rows:
            margins = [c["margin"] for c in r["checks"].values()]
            r["margin"] = min(margins) if margins else None
            r["pass"] = all(c["pass"] for c in r["checks"].values())
            if self.notes:
                r["notes"] = self.notes
        return rows


def frame_validator(image: Any, *, face_backend, clip, thresholds: Thresholds) -> tuple[FrameValidator, list[str]]:
    """A validator against one generated frame (reference mode's frame 1), and notes: a frame
    without a face gives no face check."""
    notes = []
    if face_backend is not None and thresholds.face_similarity is not None:
        emb, _ = face_backend.main_face_embeddings([np.asarray(image.convert("RGB"))])[0]
        if emb is None:
            thresholds = Thresholds(face_similarity=None, clip_i=thresholds.clip_i)
            notes.append("frame 1 has no face: face similarity to frame 1 not checked")
    if thresholds.face_similarity is None:
        face_backend = None
    return FrameValidator(face_backend=face_backend, clip=clip, reference_images=[image], thresholds=thresholds), notes


@dataclass
class FrameJob:
    scene_index: int  # 1-based scene number
    prompt: str
    group: str = ""  # frames of one group share pipeline kwargs (e.g. one control image)
    hero: bool = True  # the character is in the scene: checked against the character


SKIPPED = {"identity_check": "skipped: the character is not in this scene", "margin": None, "pass": True}


def score_jobs(validator: Any, jobs: Sequence[FrameJob], images: Sequence[Any]) -> list[dict[str, Any]]:
    """``validator.score`` for the frames of the character; the others are not checked (:data:`SKIPPED`)."""
    rows = [dict(SKIPPED) for _ in images]
    mine = [k for k, j in enumerate(jobs) if j.hero]
    if mine:
        for k, row in zip(mine, validator.score([images[k] for k in mine])):
            rows[k] = row
    return rows


@dataclass
class FrameResult:
    scene_index: int
    kept: int  # index into attempts
    attempts: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL images, one per attempt

    @property
    def image(self):
        return self.images[self.kept]

    @property
    def passed(self) -> bool:
        return bool(self.attempts[self.kept]["pass"])


def seed_for(base_seed: int, scene_pos: int, attempt: int, n_scenes: int) -> int:
    return int(base_seed) + attempt * n_scenes + scene_pos


def generate_validated(
    jobs: Sequence[FrameJob],
    generate: Callable[[list[FrameJob], list[int]], list[Any]],
    validator: FrameValidator,
    *,
    base_seed: int,
    retries: int,
    n_scenes: int | None = None,
    positions: Sequence[int] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> list[FrameResult]:
    """Generate every job, validate, regenerate failures with new seeds (batched per round).

    ``generate(jobs, seeds)`` returns one PIL image per job. ``positions`` are the jobs' 0-based
    positions among the storyboard's ``n_scenes`` scenes (seed numbering); default 0..len-1.
    ``on_round(round, n)`` is called before each round (progress).
    """
    n = int(n_scenes or len(jobs))
    pos = list(positions) if positions is not None else list(range(len(jobs)))
    results = [FrameResult(scene_index=j.scene_index, kept=0) for j in jobs]
    pending = list(range(len(jobs)))
    for attempt in range(int(retries) + 1):
        if not pending:
            break
        if on_round is not None:
            on_round(attempt, len(pending))
        seeds = [seed_for(base_seed, pos[i], attempt, n) for i in pending]
        batch = [jobs[i] for i in pending]
        images = generate(batch, seeds)
        scores = score_jobs(validator, batch, images)
        still = []
        for i, seed, im, sc in zip(pending, seeds, images, scores):
            res = results[i]
            res.attempts.append({"attempt": attempt, "seed": seed, **sc})
            res.images.append(im)
            if not sc["pass"]:
                still.append(i)
        pending = still
    for res in results:
        res.kept = best_attempt(res.attempts)
    return results


def best_attempt(attempts: list[dict[str, Any]]) -> int:
    """Index of the attempt to keep (see the module docstring)."""
    if all(a.get("margin") is None for a in attempts):
        return 0
    passing = [i for i, a in enumerate(attempts) if a["pass"]]
    pool = passing or list(range(len(attempts)))
    return max(pool, key=lambda i: (attempts[i]["margin"], -i))
