"""Benchmark: images/s through the evaluation metrics, batched vs one image at a time.

Both modes compute the same metrics (CLIP-T, CLIPScore, CLIP-I, DINO, face similarity, no-face rate,
consistency, diversity) for the same images, in one run, side by side:

- one at a time: each image goes through CLIP, DINO and the face backend on its own, and its
  prompt's CLIP text embedding is computed for it (what a loop over images does);
- batched: :class:`runner.metrics.compute.MetricComputer` (CLIP/DINO ``--batch`` images per
  forward, each distinct prompt embedded once), timed twice: with the face backend in this
  process (batching alone), and with the face analysis in ``--face-workers`` processes running
  while the CLIP/DINO batches do (what the evaluate stage does with dlib; 0 = one per core).

Images: the photos of ../shared/data/faces (so the face backend finds faces and computes identity
embeddings, the expensive part), resized to ``--side`` px, repeated to ``--n`` images, with the
prompts of the built-in suite. By default the metric models are the tiny random builtin:tiny-clip
and builtin:tiny-dino (nothing can be downloaded here): their figures measure the code path and
batching overhead, not a real CLIP ViT-L/14, and say nothing about quality. Pass --clip/--dino
to time real models.

    .venv/bin/python bench/evaluate/run.py [--n 96] [--side 160] [--batch 32] [--threads 1] [--face-workers 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="images per mode")
    ap.add_argument("--side", type=int, default=160, help="longest side of the images, px")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the batched mode")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both modes)")
    ap.add_argument("--face", default="dlib", help="face backend (dlib, insightface, auto)")
    ap.add_argument("--face-workers", type=int, default=0,
                    help="face worker processes of the pooled run (0: one per core)")
    ap.add_argument("--clip", default="builtin:tiny-clip")
    ap.add_argument("--dino", default="builtin:tiny-dino")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "_work" / "evaluate.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from runner.eval.suites import load_suite, render_suite
    from runner.metrics.compute import MetricComputer
    from runner.metrics.embedders import load_image_embedder
    from runner.vision.analysis import FacePool, default_workers
    from runner.vision.faces import get_face_backend

    torch.set_num_threads(args.threads)
    cache = REPO / "bench" / "_work" / "cache"
    clip = load_image_embedder(args.clip, cache)
    dino = load_image_embedder(args.dino, cache)
    face = get_face_backend(args.face)
    data = REPO.parent / "shared" / "data" / "faces"
    photos = []
    for f in sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".png") and "groups" not in p.parts):
        with Image.open(f) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((args.side, args.side))
        photos.append(im)
    refs_imgs = photos[:2]
    prompts_all = [p.prompt for p in render_suite(load_suite("builtin"), trigger="tok", class_word="person").prompts]
    seeds = 2
    images = [photos[i % len(photos)] for i in range(args.n)]
    prompts = [prompts_all[(i // seeds) % len(prompts_all)] for i in range(args.n)]
    cats = [p.split()[0] for p in prompts]
    keys = [str((i // seeds)) for i in range(args.n)]

    mc = MetricComputer(clip=clip, dino=dino, face_backend=face, batch_size=args.batch)
    refs = mc.references(refs_imgs, ["r0", "r1"])

    # warm-up (first calls allocate)
    mc.score(mc.embed(images[:4]), mc.text_embeddings(prompts[:4]), refs, categories=cats[:4], prompt_keys=keys[:4])

    # --- one image at a time
    t0 = time.perf_counter()
    t_face = 0.0
    clip_rows, dino_rows, text_rows, faces = [], [], [], []
    for im, pr in zip(images, prompts):
        clip_rows.append(clip.embed_images([im], batch_size=1)[0])
        dino_rows.append(dino.embed_images([im], batch_size=1)[0])
        text_rows.append(clip.embed_texts([pr], batch_size=1)[0])
        tf = time.perf_counter()
        emb, _ = face.main_face_embeddings([np.asarray(im)])[0]  # the same per-image work as batched
        t_face += time.perf_counter() - tf
        faces.append(emb)
    from runner.metrics.compute import EmbeddedImages

    emb1 = EmbeddedImages(clip=np.stack(clip_rows), dino=np.stack(dino_rows), faces=faces,
                          face_boxes=[None] * len(faces))
    per1, cat1, all1 = mc.score(emb1, np.stack(text_rows), refs, categories=cats, prompt_keys=keys)
    t_one = time.perf_counter() - t0

    # --- batched, faces in this process (batching alone)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    embb = mc.embed(images, batch_size=args.batch, timings=timings)
    perb, catb, allb = mc.score(embb, mc.text_embeddings(prompts, batch_size=args.batch), refs,
                                categories=cats, prompt_keys=keys)
    t_batched = time.perf_counter() - t0
    t_face_b = timings["faces"]

    # --- batched, faces in worker processes while the CLIP/DINO batches run (the evaluate stage)
    workers = default_workers(args.face_workers)
    pool = FacePool(workers, {"name": face.name})
    mcp = MetricComputer(clip=clip, dino=dino, face_backend=face, batch_size=args.batch, face_pool=pool)
    tp0 = time.perf_counter()
    pool.start()  # start the workers and load their models (once per evaluate stage)
    t_pool_start = time.perf_counter() - tp0
    mcp.embed(images[:4])  # warm-up, as for the other two modes
    t0 = time.perf_counter()
    embp = mcp.embed(images, batch_size=args.batch)
    perp, catp, allp = mcp.score(embp, mcp.text_embeddings(prompts, batch_size=args.batch), refs,
                                 categories=cats, prompt_keys=keys)
    t_pooled = time.perf_counter() - t0
    mcp.close()

    # same numbers all three ways
    for m in ("face_similarity", "clip_t", "clip_i", "dino", "no_face_rate", "consistency"):
        for other in (allb, allp):
            assert abs((all1[m] or 0) - (other[m] or 0)) < 1e-4, (m, all1[m], other[m])

    tiny = clip.is_tiny_random or dino.is_tiny_random
    res = {
        "images": args.n, "side": args.side, "batch": args.batch, "threads": args.threads,
        "clip": clip.name, "dino": dino.name, "face": f"{face.name} ({face.embedding_model})",
        "tiny_random_models": tiny,
        "one_at_a_time_s": round(t_one, 3), "batched_s": round(t_batched, 3),
        "one_at_a_time_img_s": round(args.n / t_one, 1), "batched_img_s": round(args.n / t_batched, 1),
        "speedup": round(t_one / t_batched, 2),
        "face_workers": workers, "pool_start_s": round(t_pool_start, 2),
        "pooled_s": round(t_pooled, 3), "pooled_img_s": round(args.n / t_pooled, 1),
        "pooled_speedup": round(t_one / t_pooled, 2),
        # The CLIP/DINO metrics alone (CLIP-T, CLIPScore, CLIP-I, DINO, diversity): everything
        # but the face backend, which runs per image in both modes.
        "embedding_one_at_a_time_img_s": round(args.n / (t_one - t_face), 1),
        "embedding_batched_img_s": round(args.n / (t_batched - t_face_b), 1),
        "embedding_speedup": round((t_one - t_face) / (t_batched - t_face_b), 2),
        "face_share_one_at_a_time": round(t_face / t_one, 3),
        "face_s_per_image": round(t_face_b / args.n, 4),
        "no_face_rate": allb["no_face_rate"],
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    label = " [tiny random CLIP/DINO: timing of the code path only]" if tiny else ""
    print(f"metrics on {args.n} images of {args.side}px, CLIP {clip.name}, DINO {dino.name}, "
          f"faces {res['face']}{label}")
    print("  CLIP/DINO metrics (CLIP-T, CLIPScore, CLIP-I, DINO, diversity):")
    print(f"    one at a time : {res['embedding_one_at_a_time_img_s']:8.1f} images/s")
    print(f"    batched ({args.batch:>3}) : {res['embedding_batched_img_s']:8.1f} images/s   "
          f"speedup {res['embedding_speedup']:.2f}x")
    print(f"  all metrics, with the face backend ({1000 * t_face_b / args.n:.1f} ms/image, per image in both modes):")
    print(f"    one at a time : {res['one_at_a_time_img_s']:8.1f} images/s  "
          f"({t_one:.2f} s; face backend {100 * t_face / t_one:.0f}% of it)")
    print(f"    batched ({args.batch:>3}) : {res['batched_img_s']:8.1f} images/s  ({t_batched:.2f} s)   "
          f"speedup {res['speedup']:.2f}x")
    print(f"    batched + {workers} face processes: {res['pooled_img_s']:8.1f} images/s  ({t_pooled:.2f} s)   "
          f"speedup {res['pooled_speedup']:.2f}x  (workers started once beforehand: {t_pool_start:.2f} s)")


if __name__ == "__main__":
    main()
