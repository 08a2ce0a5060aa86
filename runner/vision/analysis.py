"""Per-image analysis (faces, measures, shot type, identity, hash) and a streaming process pool.

:func:`analyze_image` turns one RGB image into one JSON-ready record. :func:`iter_analyses`
runs it over many files in worker processes, yielding records in input order while holding at
most a small window of jobs in flight, so memory stays flat however large the dataset is.

A record (one per image; the fields the later stages rely on)::

    {"id", "input", "file", "source", "label", "width", "height",
     "faces": [{"box", "score", "keypoints", "landmarks", "pose": {"yaw","pitch","roll"},
                "height_rel", "width_rel", "truncation", "landmarks_outside",
                "eyes": {"left","right","mean"}, "mouth_open", "smile": {"width","lift","score"},
                "blur", "exposure": {"mean","contrast","clipped_dark","clipped_bright","side_balance"},
                "identity"}],            # largest face first
     "main_face": 0 | null, "no_face": bool, "people": int, "people_substantial": int,
     "shot": "close_up", "flags": {"multi_character", "complex_background", "occluded"},
     "categories": ["close_up", ...], "background_edges": float,
     "identity": float | null,          # main face vs the centroid of the reference embeddings
     "identity_max": float | null,      # main face vs its best single reference
     "embedding": [...] | null,         # main face embedding (L2-normalized)
     "expression": {"smiling", "mouth_open", "eyes_closed"}, "phash": "16 hex",
     "error": null | "why the image could not be analyzed"}
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from runner.vision import measures as M
from runner.vision import shots as S


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (EXIF rotation applied, alpha flattened on white)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA", "P"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            bg.alpha_composite(rgba)
            im = bg
        return np.asarray(im.convert("RGB"))


def reference_matrix(embeddings: list[np.ndarray]) -> np.ndarray | None:
    if not embeddings:
        return None
    return np.stack([np.asarray(e, dtype=np.float32) for e in embeddings])


def identity_scores(embedding: np.ndarray, refs: np.ndarray | None) -> tuple[float | None, float | None]:
    """(similarity to the normalized centroid of refs, best similarity to a single ref)."""
    if refs is None or len(refs) == 0:
        return None, None
    e = np.asarray(embedding, dtype=np.float64)
    e = e / (np.linalg.norm(e) or 1.0)
    r = refs.astype(np.float64)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    c = r.mean(0)
    c = c / (np.linalg.norm(c) or 1.0)
    return round(float(e @ c), 4), round(float((r @ e).max()), 4)


def analyze_image(rgb: np.ndarray, backend: Any, refs: np.ndarray | None = None) -> dict[str, Any]:
    """Faces, measures, shot type, flags, identity and perceptual hash of one image."""
    h, w = rgb.shape[:2]
    faces = backend.analyze(rgb)
    face_recs: list[dict[str, Any]] = []
    for f in faces:
        rec = f.to_record(with_embedding=False)
        rec.update(M.face_measures(rgb, f))
        rec["identity"] = identity_scores(f.embedding, refs)[0]
        face_recs.append(rec)
    main = 0 if faces else None
    bg = M.background_edge_density(rgb, [f.box for f in faces])
    flags = S.image_flags(face_recs, main, bg)
    if main is None:
        shot = "wide"
        ident, ident_max, emb = None, None, None
    else:
        shot = S.classify_shot(faces[main].box, h)
        ident, ident_max = identity_scores(faces[main].embedding, refs)
        emb = [round(float(v), 6) for v in faces[main].embedding]
    mh = faces[main].height if main is not None else 0.0
    return {
        "width": w,
        "height": h,
        "faces": face_recs,
        "main_face": main,
        "no_face": main is None,
        "people": len(faces),
        "people_substantial": sum(1 for f in faces if f.height >= S.SUBSTANTIAL_FACE * mh) if faces else 0,
        "shot": shot,
        "flags": flags,
        "categories": S.categories_of(shot, flags),
        "background_edges": bg,
        "identity": ident,
        "identity_max": ident_max,
        "embedding": emb,
        "expression": S.expression_of(face_recs[main] if main is not None else None),
        "phash": M.perceptual_hash(rgb),
        "error": None,
    }


# --------------------------------------------------------------------------- worker pool

_WORKER: dict[str, Any] = {}


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit this worker once its parent is gone (killed with -9, say): a pool's workers would
    otherwise wait on their queue forever, each holding its face models."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_pool_worker(backend_options: dict[str, Any], refs: list[list[float]] | None, parent: int) -> None:
    """Initializer of a spawned pool worker (never of the runner's own process)."""
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the pool; a worker has nothing to say.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    _init_worker(backend_options, refs)


def _init_worker(backend_options: dict[str, Any], refs: list[list[float]] | None) -> None:
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per core already
    except ImportError:  # pragma: no cover
        pass
    from runner.vision.faces import get_face_backend

    _WORKER["backend"] = get_face_backend(**backend_options)
    _WORKER["refs"] = np.asarray(refs, dtype=np.float32) if refs else None


def write_thumbnail(rgb: np.ndarray, dest: str | Path, px: int = 256) -> None:
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail((px, px), Image.Resampling.BILINEAR, reducing_gap=2.0)
    im.save(dest, format="JPEG", quality=85)


def analyze_job(job: dict[str, Any]) -> dict[str, Any]:
    """Analyze one file described by ``job``.

    Keys: ``path`` (the image), optional ``thumb`` (where to write a 256 px JPEG thumbnail); the
    other keys are copied into the record.
    """
    base = {k: v for k, v in job.items() if k not in ("path", "thumb")}
    try:
        rgb = load_rgb(job["path"])
    except Exception as exc:  # unreadable: the record says why, curate drops it
        return {**base, "error": f"cannot read image: {exc}", "faces": [], "main_face": None, "no_face": True}
    if job.get("thumb"):
        write_thumbnail(rgb, job["thumb"])
    try:
        rec = analyze_image(rgb, _WORKER["backend"], _WORKER.get("refs"))
    except Exception as exc:
        return {**base, "error": f"analysis failed: {type(exc).__name__}: {exc}", "faces": [], "main_face": None,
                "no_face": True}
    return {**base, **rec}


def default_workers(requested: int) -> int:
    if requested and requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def iter_analyses(jobs: Iterable[dict[str, Any]], *, workers: int, backend_options: dict[str, Any],
                  refs: np.ndarray | None, window_per_worker: int = 4) -> Iterator[dict[str, Any]]:
    """Analyze ``jobs`` with ``workers`` processes, yielding records in order.

    At most ``workers * window_per_worker`` jobs are in flight, so memory does not grow with the
    number of images. ``workers <= 1`` runs in this process (no pool start-up cost).
    """
    ref_list = refs.tolist() if refs is not None else None
    if workers <= 1:
        _init_worker(backend_options, ref_list)
        for job in jobs:
            yield analyze_job(job)
        return
    it = iter(jobs)
    window = max(1, workers * window_per_worker)
    with spawn_pool(workers, backend_options, ref_list) as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        for job in it:
            pending.append(pool.submit(analyze_job, job))
            if len(pending) >= window:
                break
        while pending:
            try:
                res = pending.popleft().result()
            except BrokenProcessPool as exc:
                raise _worker_died("set dataset.analysis.workers to 1 to analyze in-process and see the error; "
                                   "lower dataset.analysis.max_analysis_side if memory is short") from exc
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(analyze_job, nxt))
            yield res


def analyze_chunk(jobs: list[dict[str, Any]], shared: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """:func:`iter_analyses` over a chunk of jobs, the per-image work the analyze stage hands to
    ``ctx.map_items`` (all its jobs in one chunk locally; one chunk per container on Modal with
    hardware.stage_map). ``shared``: ``workers``, ``backend_options`` and ``refs`` (the reference
    embeddings as lists, or None); each image's record depends on nothing else."""
    refs = reference_matrix(shared.get("refs") or [])
    workers = min(int(shared.get("workers") or 1), max(1, len(jobs)))
    return iter_analyses(jobs, workers=workers, backend_options=shared["backend_options"], refs=refs)


def spawn_pool(workers: int, backend_options: dict[str, Any], refs: list[list[float]] | None = None
               ) -> ProcessPoolExecutor:
    """``workers`` processes, each with its own face backend built from ``backend_options``.

    Processes, not threads: dlib holds the GIL through its ResNet descriptor and its models are
    not thread-safe. "spawn" starts fresh interpreters (no inherited threads, locks or torch state).
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_pool_worker,
                               initargs=(backend_options, refs, os.getpid()))


def _worker_died(hint: str) -> Exception:
    from runner.core.errors import StageError

    return StageError("a face analysis worker process died (out of memory, or a crash in the face library)", hint=hint)


def _ready() -> bool:
    return "backend" in _WORKER


def main_face_job(rgb: np.ndarray) -> tuple[np.ndarray | None, list[float] | None]:
    """(identity embedding, box) of the main face in ``rgb``, or (None, None)."""
    return _WORKER["backend"].main_face_embeddings([rgb])[0]


class FacePool:
    """Main-face embeddings of many images in ``workers`` processes, started on first use and kept
    until :meth:`close` (starting a worker and loading its models costs about a second)."""

    def __init__(self, workers: int, backend_options: dict[str, Any], *, hint: str = "") -> None:
        self.workers = int(workers)
        self.backend_options = dict(backend_options)
        self.hint = hint or "analyze faces in-process (1 worker) to see the error"
        self._pool: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Start the workers and wait until they answer, models loaded (optional: the first
        :meth:`submit` starts them too)."""
        self.results([self._executor().submit(_ready) for _ in range(self.workers)])

    def submit(self, images: Iterable[np.ndarray]) -> list[Future]:
        pool = self._executor()
        try:
            return [pool.submit(main_face_job, np.ascontiguousarray(rgb)) for rgb in images]
        except BrokenProcessPool as exc:
            self.close()
            raise _worker_died(self.hint) from exc

    def results(self, futures: list[Future]) -> list[tuple[np.ndarray | None, list[float] | None]]:
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool as exc:
            self.close()
            raise _worker_died(self.hint) from exc

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = spawn_pool(self.workers, self.backend_options)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "FacePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
