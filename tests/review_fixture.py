"""A small workspace for the review tests: ingest, analyze and curate run for real on a few shared
photos (some with hostile file names); the identity sets of a video, the train output, an
evaluation grid and a storyboard are written into the store at their planned keys the way those
stages write them (same layout, same manifest), so the pages have every kind of thing to show
without training anything."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

HOSTILE = '<img src=x onerror=alert(1)> "q" ü'
PHOTOS = {  # shared photo -> name in the project
    "obama/obama_02.jpg": "obama_02.jpg",
    "obama/obama_03.jpg": "obama_03.jpg",
    "obama/obama_04.jpg": "obama_04.jpg",
    "obama/obama_partial_01.jpg": "obama_partial_01.jpg",
    "biden/biden_01.jpg": f"{HOSTILE} biden.jpg",
    "kit_harington/kit_01.jpg": "kit_01.jpg",
}
VIDEO_NAME = f'clip {HOSTILE}.mp4'

SPEC = f"""\
version: 1
character:
  name: hero
  trigger: hrochr
  class_word: man
  references: [../refs]
dataset:
  sources:
    - images: ../photos
    - video: '../clips/{VIDEO_NAME}'
  analysis: {{backend: dlib, workers: 1, max_analysis_side: 800}}
train: {{preset: tiny-demo}}
evaluate: {{preset: tiny-demo, categories: [close_up, full_body], prompts_per_category: 1, seeds: [1, 2]}}
generate:
  storyboard:
    planner: manual
    scenes:
      - {{text: '<script>alert("scene")</script> He waves — “hello” ü', shot: close_up}}
      - {{text: "He walks 'away' & smiles", shot: full_body}}
    steps: 2
    width: 64
    height: 64
    validation: {{face_similarity: 0.7, retries: 0}}
  video: {{model: "builtin:tiny-ltx", key_frames: [1], frames: 9, width: 64, height: 64}}
hardware: {{device: cpu}}
"""


def build(root: Path, shared_data: Path, *, real_lora: Callable[[Path], None] | None = None) -> Path:
    """The project at ``root``; returns the spec file. ``real_lora(folder)`` writes the train
    output (default: two checkpoints of random bytes, enough for pages and plans)."""
    from runner.engine.executor import ApplyOptions, apply, plan_specs
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    (root / "specs").mkdir(parents=True)
    (root / "runner.toml").write_text("")
    for folder in ("photos", "refs", "clips"):
        (root / folder).mkdir()
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", root / "refs")
    for src, name in PHOTOS.items():
        shutil.copy(shared_data / "faces" / src, root / "photos" / name)
    (root / "clips" / VIDEO_NAME).write_bytes((shared_data / "video" / "carphone.mp4").read_bytes()[:4096])
    spec_file = root / "specs" / "hero.yaml"
    spec_file.write_text(SPEC)
    spec = load_spec(spec_file)

    plan, ws = plan_specs([spec])
    try:
        by_kind = {ps.node.kind: ps for ps in plan.stages}
        promote(ws, by_kind["video_identity"], lambda out: _identity_sets(out, shared_data, by_kind["video_identity"]))
    finally:
        ws.close()
    result = apply([spec], ApplyOptions(only=["curate"]), QuietReporter())
    assert result.status == "succeeded", [r.error for r in result.results]

    plan, ws = plan_specs([spec])
    try:
        by_kind = {ps.node.kind: ps for ps in plan.stages}
        for kind in ("caption", "export"):
            promote(ws, by_kind[kind], lambda out: None)
        promote(ws, by_kind["train"], lambda out: (real_lora or _fake_lora)(out / "lora"))
        lora = ws.store_path(by_kind["train"].key) / "lora"
        promote(ws, by_kind["evaluate"], lambda out: _evaluation(out / "evaluation", by_kind["evaluate"], lora))
        promote(ws, by_kind["storyboard"], lambda out: _storyboard(out / "storyboard", by_kind["storyboard"]))
        promote(ws, by_kind["video"], lambda out: _clip(out / "video", shared_data))
    finally:
        ws.close()
    return spec_file


def promote(ws, ps, fill: Callable[[Path], None]) -> None:
    """Write a stage's outputs into the store at its planned key, as the engine does after run()."""
    tmp = ws.new_tmp_dir(ps.key)
    for name in ps.node.outputs:
        (tmp / name).mkdir(parents=True, exist_ok=True)
    fill(tmp)
    manifest = {"stage_id": ps.id, "kind": ps.node.kind, "key": ps.key, "run_id": "fixture", "created": time.time(),
                "outputs": {n: n for n in ps.node.outputs}, "meta": {}, "metrics": {}, "warnings": [],
                "components": ps.components}
    ws.promote(tmp, ps.key, manifest)
    ws.set_current(ps.id, ps.key, ps.components, "fixture", ps.fileset_digests)


def _png(img, path: Path) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _identity_sets(out: Path, shared_data: Path, ps) -> None:
    """person_0 with an anchor, a coverage and a challenge frame (face crops of a shared photo),
    and the images artifact in the ingest layout, as runner/video/export.py writes them."""
    from PIL import Image

    src = Image.open(shared_data / "faces" / "obama" / "obama_03.jpg").convert("RGB")
    w, h = src.size
    manifest = []
    for n, (set_name, box) in enumerate((("anchors", (w // 4, 0, 3 * w // 4, h // 2)),
                                         ("coverage", (w // 5, h // 10, 4 * w // 5, 3 * h // 5)),
                                         ("challenge", (0, 0, w // 2, h // 3)))):
        crop = src.crop(box).resize((128, 128))
        stem = f"f{n * 10:06d}"
        png = _png(crop, out / "identity" / "person_0" / set_name / f"{stem}.png")
        meta = {"type": set_name, "video": ps.node.config["video"], "frame_idx": n * 10, "quality": 0.8 - 0.1 * n,
                "timestamp_ms": n * 400.0}
        (out / "identity" / "person_0" / set_name / f"{stem}_meta.json").write_text(json.dumps(meta))
        image_id = hashlib.sha256(f"video:{n}".encode()).hexdigest()[:16]
        (out / "images" / "images").mkdir(parents=True, exist_ok=True)
        (out / "images" / "images" / f"{image_id}.png").write_bytes(png)
        manifest.append({"id": image_id, "file": f"images/{image_id}.png", "source": ps.node.config["video"],
                         "source_index": 1, "label": "", "sha256": hashlib.sha256(png).hexdigest(),
                         "width": 128, "height": 128,
                         "video": {"person_id": 0, "frame_idx": n * 10, "sets": [set_name[0]]}})
    (out / "identity" / "person_0" / "meta.json").write_text(json.dumps({"person_id": 0, "main": True}))
    (out / "identity" / "summary.json").write_text(json.dumps({"video": ps.node.config["video"], "persons": []}))
    (out / "images" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    (out / "quarantine" / "quarantine.jsonl").write_text("")


def _fake_lora(folder: Path) -> None:
    checkpoints = []
    for step in (4, 8):
        f = folder / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(hashlib.sha256(f"lora {step}".encode()).digest() * 8)
        checkpoints.append({"step": step, "phase": "main",
                            "diffusers": f"checkpoint-{step}/pytorch_lora_weights.safetensors"})
    (folder / "index.json").write_text(json.dumps({"base_model": "builtin:tiny-sd", "model_family": "sd15",
                                                   "tiny_random_model": True, "checkpoints": checkpoints, "final": 1}))


def _evaluation(folder: Path, ps, lora: Path) -> None:
    """evaluation.json in the evaluate stage's layout: a cell per checkpoint at LoRA scale 1."""
    import numpy as np
    from PIL import Image

    index = json.loads((lora / "index.json").read_text())
    prompts = ps.node.config["suite"]["prompts"]
    rng = np.random.default_rng(0)
    cells = []
    for ci, ck in enumerate(index["checkpoints"]):
        name = f"step{ck['step']:06d}_scale1"
        images = []
        for p in prompts:
            for seed in ps.node.config["seeds"]:
                fname = f"{p['category']}_{p['index']:02d}_seed{seed}.png"
                _png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                     folder / "images" / name / fname)
                images.append({"category": p["category"], "prompt_index": p["index"], "seed": seed, "file": fname,
                               "path": f"images/{name}/{fname}", "face_similarity": round(float(rng.random()), 4),
                               "clip_t": round(float(rng.random()), 4), "clip_i": round(float(rng.random()), 4),
                               "dino": round(float(rng.random()), 4), "face_found": True})
        cats = {c: {"face_similarity": 0.5 + 0.1 * ci, "clip_t": 0.2} for c in {p["category"] for p in prompts}}
        cells.append({"cell": name, "step": ck["step"], "lora_scale": 1.0, "checkpoint_index": ci, "phase": "main",
                      "categories": cats, "overall": {"face_similarity": 0.5 + 0.1 * ci}, "images": images,
                      "targets": {}, "score": 0.5 + 0.1 * ci})
    best = cells[0]
    (folder / "best").mkdir(parents=True)
    shutil.copy(lora / index["checkpoints"][0]["diffusers"], folder / "best" / "pytorch_lora_weights.safetensors")
    ev = {"format": 1, "character": "hero", "stage_id": ps.id, "variant": None, "base_model": "builtin:tiny-sd",
          "model_family": "sd15", "tiny_random": {"diffusion": True, "any": True},
          "suite": {"source": "builtin", "categories": sorted({p["category"] for p in prompts}), "prompts": prompts},
          "targets": {"close_up": {"face_similarity": ">= 0.5"}}, "cells": cells,
          "best": {"cell": best["cell"], "step": best["step"], "lora_scale": 1.0, "checkpoint_index": 0,
                   "lora_diffusers": "best/pytorch_lora_weights.safetensors", "score": best["score"]}}
    (folder / "evaluation.json").write_text(json.dumps(ev))


def _clip(folder: Path, shared_data: Path) -> None:
    """clips/frame01.mp4 and its poster, in the video stage's layout (a shared clip stands in)."""
    from PIL import Image

    (folder / "clips").mkdir(parents=True)
    shutil.copy(shared_data / "video" / "carphone.mp4", folder / "clips" / "frame01.mp4")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "clips" / "frame01.jpg")
    (folder / "report.json").write_text(json.dumps({"format": 1,
                                                    "clips": [{"name": "frame01", "file": "clips/frame01.mp4",
                                                                          "poster": "clips/frame01.jpg"}]}))


def _storyboard(folder: Path, ps) -> None:
    """frames/NN.png and report.json in the storyboard stage's layout."""
    import numpy as np
    from PIL import Image

    frames = []
    for s in ps.node.config["scenes"]:
        f = f"frames/{s['index']:02d}.png"
        img = np.full((64, 64, 3), 40 * s["index"], dtype=np.uint8)
        _png(Image.fromarray(img), folder / f)
        frames.append({**s, "file": f, "kept_attempt": 0, "passed": True, "scores": {},
                       "attempts": [{"attempt": 0, "seed": 1000 + s["index"] - 1, "file": f}]})
    (folder / "report.json").write_text(json.dumps({"format": 1, "frames": frames, "summary": {}}))
