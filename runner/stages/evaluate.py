"""`evaluate`: which checkpoint (and LoRA scale) is best, and where does the character drift?

One node per train node: ``<char>:evaluate`` or ``<char>:evaluate[<variant>]``. Inputs: the train
node's ``lora`` artifact (index.json + checkpoints) and the character's reference images
(``reference<i>`` file sets). For every kept checkpoint x LoRA scale (a *cell*):

1. generate the prompt suite (prompts x seeds), batched, with the base model + that checkpoint;
2. embed the images in batches (CLIP image/text, DINO) and find the main face's identity
   embedding; compute the metrics of :mod:`runner.metrics.definitions` per image, per category
   and overall;
3. check the targets (pass/fail per category x metric) and compute the overall score.

Then the best cell is chosen by ``evaluate.objective`` (:mod:`runner.eval.selection`) and its LoRA
files are copied under ``best/``. Output artifact ``evaluation``: a folder with
``evaluation.json``, ``best/`` and ``images/<cell>/...`` (the generated images the report shows).

Finished cells are kept in the shared cache (``<cache>/evaluate-cells/<key>/``), keyed by
everything that affects their images and metrics (the LoRA file's content, base model, prompts,
seeds, sampler settings, metric models, reference files): a new apply after a crash resumes at
the next cell, and changing only ``targets`` or ``objective`` re-selects the best without
generating anything. Figures measured with tiny random models (builtin:tiny-*) are flagged in
evaluation.json and labelled in the report and the log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.stages.common import IMAGE_EXTENSIONS
from runner.stages.common import face_backend as _face_backend
from runner.stages.common import load_embedder as _load_embedder
from runner.stages.common import load_rgb as _load_rgb
from runner.stages.common import reference_files as _reference_files
from runner.stages.common import rel_path as _rel
from runner.stages.common import with_tracking

VERSION = 1


# --------------------------------------------------------------------------- planning


def _variant_of(node_id: str) -> str | None:
    return node_id[node_id.index("[") + 1 : -1] if node_id.endswith("]") and "[" in node_id else None


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    """One evaluate node per train node, when the spec has an ``evaluate`` section."""
    from runner.eval import selection
    from runner.eval.suites import load_suite, render_suite

    ev = spec.get("evaluate")
    trains = graph.nodes_of("train")
    if not isinstance(ev, dict) or not trains:
        return []
    character = spec.get("character", {})
    refs = list(character.get("references", []) or [])
    if not refs:
        raise contract.StageError(
            "evaluate: character.references is empty; face similarity, CLIP-I and DINO compare "
            "generated images with the character's reference images",
            hint="Add reference photos (files or folders) under character.references, or remove the evaluate section.",
        )
    suite = load_suite(ev.get("suite", "builtin"), project_root=graph.project_root)
    rendered = render_suite(
        suite,
        trigger=character["trigger"],
        class_word=character.get("class_word", "person"),
        categories=list(ev.get("categories") or []) or None,
        prompts_per_category=ev.get("prompts_per_category"),
        default_negative=ev.get("negative_prompt", ""),
    )
    targets = ev.get("targets") or {}
    objective = {"maximize": "face_similarity", "constraints": {}, **(ev.get("objective") or {})}
    selection.validate_targets(targets, rendered.categories)
    selection.validate_objective(objective, rendered.categories)
    seeds = list(ev.get("seeds", [1, 2]))
    scales = list(ev.get("lora_scales", [1.0]))
    if not seeds or not scales:
        raise contract.StageError("evaluate: seeds and lora_scales need at least one value each",
                              hint="e.g. seeds: [1, 2], lora_scales: [0.8, 1.0]")
    analysis = spec.get("dataset", {}).get("analysis", {})
    hardware = spec.get("hardware", {})
    config_common = {
        "trigger": character["trigger"],
        "class_word": character.get("class_word", "person"),
        "suite": {"source": rendered.source, "prompts": [p.to_dict() for p in rendered.prompts]},
        "seeds": [int(s) for s in seeds],
        "lora_scales": [float(s) for s in scales],
        "checkpoints": ev.get("checkpoints", "all"),
        "steps": int(ev.get("steps", 30)),
        "guidance": float(ev.get("guidance", 7.0)),
        "resolution": ev.get("resolution"),
        "batch_size": int(ev.get("batch_size", 4)),
        # Only changes speed: left out of the stage's key (unkeyed below) and the cell key.
        "face_workers": int(ev.get("face_workers", 0)),
        "face": {
            "name": ev.get("face_model", "auto"),
            "insightface_pack": ev.get("insightface_pack") or analysis.get("insightface_pack", "buffalo_l"),
            "insightface_root": ev.get("insightface_root") or analysis.get("insightface_root", "~/.insightface"),
            "dlib_detector": analysis.get("dlib_detector", "hog"),
            "upsample": int(analysis.get("upsample", 1)),
        },
        "clip_model": ev.get("clip_model", "openai/clip-vit-large-patch14"),
        "dino_model": ev.get("dino_model", "facebook/dino-vits16"),
        "targets": targets,
        "objective": objective,
        "references": refs,
        "device": hardware.get("device", "auto"),
    }
    ref_inputs = {
        f"reference{i}": contract.FileSetRef(root=graph.project_root / r, patterns=("*",), recursive=True,
                                         spec_key=f"character.references[{i}]")
        for i, r in enumerate(refs)
    }
    gpu = hardware.get("stage_gpu", {}).get("evaluate") or hardware.get("gpu")
    nodes = []
    n_images = len(rendered.prompts) * len(seeds) * len(scales)
    for train in trains:
        variant = _variant_of(train.id)
        nodes.append(with_tracking(contract.PlanNode(
            id=contract.node_id(graph.character, "evaluate", variant),
            kind="evaluate",
            character=graph.character,
            config={**config_common, "variant": variant},
            inputs={"lora": contract.StageOutputRef(train.id, "lora"), **ref_inputs},
            outputs=("evaluation",),
            gpu=gpu,
            unkeyed=("face_workers",),
            label=(f"{len(rendered.categories)} categories x {len(rendered.prompts)} prompts x "
                   f"{len(seeds)} seeds x {len(scales)} scales = {n_images} images per checkpoint"),
        ), spec, graph))
    return nodes


# --------------------------------------------------------------------------- running


def _read_index(lora: contract.Artifact) -> dict[str, Any]:
    path = Path(lora.path) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise contract.StageError(f"cannot read the train stage's LoRA index {path}: {exc}",
                              hint="Re-run the train stage (runner apply --force train).") from None
    missing = [k for k in ("base_model", "checkpoints", "final") if k not in index]
    if missing or not index.get("checkpoints"):
        raise contract.StageError(f"{path}: missing {', '.join(missing) or 'checkpoints'}",
                              hint="The train stage's index.json must list its checkpoints.")
    return index








def cell_name(step: int, scale: float) -> str:
    return f"step{int(step):06d}_scale{float(scale):g}"


def _image_name(prompt: dict[str, Any], seed: int, ext: str) -> str:
    return f"{prompt['category']}_{int(prompt['index']):02d}_seed{seed}{ext}"


def _save_image(img, folder: Path, stem_name: str) -> str:
    path = folder / stem_name
    if path.suffix == ".png":
        img.save(path, format="PNG", optimize=False)
    else:
        img.convert("RGB").save(path, format="JPEG", quality=92)
    return path.name


def _select_checkpoints(index: dict[str, Any], which: str) -> list[tuple[int, dict[str, Any]]]:
    cks = list(enumerate(index["checkpoints"]))
    if which == "last":
        final = int(index.get("final", len(cks) - 1))
        return [cks[final]]
    return cks


def track(config: dict[str, Any], outputs: dict[str, contract.Artifact], env: dict[str, Any]) -> list[dict[str, Any]]:
    """One tracked run: the node config as params; per checkpoint (the step axis) and LoRA scale,
    every metric of every category and overall (``eval/<category>/<metric>/scale_<s>``) and the
    cell's score; the best cell's values as the summary; evaluation.json and the best LoRA files
    as artifacts."""
    from runner.stages.common import track as send
    from runner.tracking import StageLog

    out = outputs["evaluation"].path
    evaluation = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    series: dict[str, list[tuple[int, float]]] = {}
    for cell in evaluation.get("cells", []):
        scale = f"scale_{float(cell['lora_scale']):g}"
        rows = {**cell.get("categories", {}), "overall": cell.get("overall", {}),
                "cell": {"score": cell.get("score"), "targets_passed": cell.get("targets_passed")}}
        for category, values in rows.items():
            for metric, v in (values or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    series.setdefault(f"eval/{category}/{metric}/{scale}", []).append((int(cell["step"]), float(v)))
    best = evaluation.get("best", {})
    summary = {f"best_{k}": float(best[k]) for k in ("step", "lora_scale", "score", "objective_value")
               if isinstance(best.get(k), (int, float))}
    best_cell = next((c for c in evaluation.get("cells", []) if c.get("cell") == best.get("cell")), {})
    summary.update({f"best_{m}": float(v) for m, v in best_cell.get("overall", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    log = StageLog(name=f"{env['stage_id']} {env['run_id']}", kind="evaluate",
                   params={k: v for k, v in config.items() if k != "tracking"},
                   tags={"runner.variant": str(config.get("variant") or "")}, series=series, metrics=summary,
                   artifacts=[(out / "evaluation.json", "evaluation"), (out / "best", "best")])
    return send(config, log, env)


@contract.register("evaluate", version=VERSION, order=60, expand=expand, track=track, typical_seconds=1200.0,
               description="Generate the prompt suite per checkpoint x LoRA scale, score identity and prompt alignment, pick the best.",
               resume_info=lambda scratch: _resume_info(scratch),
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Generate the prompt suite per checkpoint x LoRA scale, score it, pick the best."""
    from runner.eval import selection
    from runner.metrics.compute import MetricComputer

    t_start = time.monotonic()
    if "lora" not in inputs:
        raise contract.StageError("evaluate needs the train stage's 'lora' output")
    lora = inputs["lora"]
    lora_root = Path(lora.path)
    index = _read_index(lora)
    checkpoints = _select_checkpoints(index, config.get("checkpoints", "all"))
    for _, ck in checkpoints:
        f = lora_root / ck.get("diffusers", "")
        if not ck.get("diffusers") or not f.is_file():
            raise contract.StageError(f"checkpoint at step {ck.get('step')} has no LoRA file {f}",
                                  hint="Re-run the train stage; its output folder looks incomplete.")
    prompts: list[dict[str, Any]] = config["suite"]["prompts"]
    seeds: list[int] = config["seeds"]
    scales: list[float] = config["lora_scales"]
    resolution = int(config.get("resolution") or index.get("resolution") or 512)

    # 1. references and metric models
    ref_files = _reference_files(inputs)
    if not ref_files:
        raise contract.StageError("no reference images found in character.references "
                              f"({', '.join(config.get('references', []))})",
                              hint=f"Put images ({', '.join(IMAGE_EXTENSIONS)}) in the reference folders.")
    face = _face_backend(config["face"], ctx.project_root)
    computer = MetricComputer(
        clip=_load_embedder(config["clip_model"], ctx, "evaluate.clip_model", config.get("device", "auto")),
        dino=_load_embedder(config["dino_model"], ctx, "evaluate.dino_model", config.get("device", "auto")),
        face_backend=face, batch_size=config["batch_size"],
        face_pool=_face_pool(config, face, len(prompts) * len(seeds), ctx),
    )
    ctx.log(f"face backend: {getattr(face, 'selection_note', face.name)}")
    # The face workers (if any) live as long as the scoring.
    with computer:
        ref_images = [_load_rgb(f) for f in ref_files]
        refs = computer.references(ref_images, [_rel(f, ctx.project_root) for f in ref_files])
        for f, ok in zip(ref_files, refs.face_found):
            if not ok:
                ctx.warn(f"no face found in reference {_rel(f, ctx.project_root)}; it still counts for CLIP-I and DINO")
        text_emb_all = computer.text_embeddings([p["prompt"] for p in prompts for _ in seeds])

        # 2. the pipeline
        pipe = _load_pipeline(index, config, ctx)
        tiny_diffusion = bool(index.get("tiny_random_model") or getattr(pipe, "_character_runner_tiny", False))

        # 3. cells. Each checkpoint x scale is generated and scored once and kept in the shared cache
        # under a key of everything that affects it (LoRA file content, base model, prompts, seeds,
        # sampler settings, metric models, reference files). A crash resumes at the next cell, and
        # changing only targets or the objective re-selects without generating anything.
        cells_root = ctx.cache_dir / "evaluate-cells"
        cells_root.mkdir(parents=True, exist_ok=True)
        common_key = _common_cell_key(config, index, resolution, ref_files)
        total = len(checkpoints) * len(scales) * len(prompts) * len(seeds)
        prog = ctx.progress(total, "evaluate: generate + score")
        cells: list[dict[str, Any]] = []
        cell_dirs: dict[str, Path] = {}
        done_names: list[str] = []
        from runner.diffusion.lora import load_lora, unload_loras

        for ck_index, ck in checkpoints:
            loaded = False
            lora_sha = _file_sha256(lora_root / ck["diffusers"])
            for scale in scales:
                name = cell_name(ck["step"], scale)
                folder = cells_root / _sha256_text(json.dumps([common_key, lora_sha, float(scale)]))[:40]
                done = folder / "cell.json"
                if done.is_file():
                    cell = json.loads(done.read_text(encoding="utf-8"))
                    prog.update(len(prompts) * len(seeds))
                else:
                    if not loaded:
                        with _quiet_diffusers():  # "no LoRA keys for the text encoder" is expected
                            load_lora(pipe, lora_root / ck["diffusers"], adapter_name="evaluate")
                        loaded = True
                    cell = _run_cell(pipe, computer, refs, text_emb_all, config, scale, resolution, folder, prog)
                # Which checkpoint this is belongs to this run, not to the cached content.
                cell.update({"cell": name, "step": int(ck["step"]), "phase": ck.get("phase"),
                             "checkpoint_index": ck_index, "lora_scale": float(scale)})
                cells.append(cell)
                cell_dirs[name] = folder
                done_names.append(name)
                _write_json(ctx.scratch_dir / "cells_done.json", done_names)
            if loaded:
                unload_loras(pipe)
        prog.close()

    # 4. targets, score, best
    targets = config.get("targets") or {}
    for c in cells:
        c["targets"] = selection.evaluate_targets(c["categories"], c["overall"], targets)
        c["targets_total"] = sum(len(v) for v in c["targets"].values())
        c["targets_passed"] = sum(1 for row in c["targets"].values() for t in row.values() if t["pass"])
        c["score"], score_kind = selection.cell_score(c["targets"], c["overall"])
    score_kind = selection.cell_score(cells[0]["targets"], cells[0]["overall"])[1]
    choice = selection.select_best(cells, config["objective"])
    best_cell = cells[choice["index"]]
    if not choice["constraints_met"]:
        ctx.warn(f"evaluate: {choice['reason']}")

    # 5. outputs: images, best LoRA files, evaluation.json
    out = ctx.out_dir / "evaluation"
    (out / "images").mkdir(parents=True, exist_ok=True)
    for c in cells:
        src = cell_dirs[c["cell"]]
        dst = out / "images" / c["cell"]
        dst.mkdir(parents=True, exist_ok=True)
        for img in c["images"]:
            _link_or_copy(src / img["file"], dst / img["file"])
            img["path"] = f"images/{c['cell']}/{img['file']}"
    best_ck = index["checkpoints"][best_cell["checkpoint_index"]]
    (out / "best").mkdir()
    lora_diffusers = f"best/{Path(best_ck['diffusers']).name}"
    shutil.copy2(lora_root / best_ck["diffusers"], out / lora_diffusers)
    lora_kohya = None
    if best_ck.get("kohya") and (lora_root / best_ck["kohya"]).is_file():
        lora_kohya = f"best/{Path(best_ck['kohya']).name}"
        shutil.copy2(lora_root / best_ck["kohya"], out / lora_kohya)
    tiny = {"diffusion": tiny_diffusion, "clip": bool(computer.clip.is_tiny_random),
            "dino": bool(computer.dino.is_tiny_random)}
    best = {
        "variant": config.get("variant"),
        "step": best_cell["step"],
        "phase": best_cell.get("phase"),
        "lora_scale": best_cell["lora_scale"],
        "score": best_cell["score"],
        "cell": best_cell["cell"],
        "checkpoint_index": best_cell["checkpoint_index"],
        "lora_diffusers": lora_diffusers,
        "lora_kohya": lora_kohya,
        "objective": config["objective"],
        "objective_value": selection.metric_value(best_cell, choice["maximize"]),
        "constraints_met": choice["constraints_met"],
        "constraints": choice["constraints"],
        "reason": choice["reason"],
    }
    evaluation = {
        "format": 1,
        "character": ctx.character,
        "stage_id": ctx.stage_id,
        "run_id": ctx.run_id,
        "variant": config.get("variant"),
        "trigger": config["trigger"],
        "class_word": config["class_word"],
        "base_model": index.get("base_model"),
        "model_family": index.get("model_family"),
        "tiny_random": {**tiny, "any": any(tiny.values())},
        "models": computer.models(),
        "generation": {"steps": config["steps"], "guidance": config["guidance"], "resolution": resolution,
                       "seeds": seeds, "lora_scales": scales, "batch_size": config["batch_size"]},
        "suite": {"source": config["suite"]["source"], "categories": list(dict.fromkeys(p["category"] for p in prompts)),
                  "prompts": prompts},
        "references": [{"file": n, "face_found": ok} for n, ok in zip(refs.names, refs.face_found)],
        "metric_definitions": _metric_definitions(),
        "targets": targets,
        "score_kind": score_kind,
        "cells": cells,
        "best": best,
        "duration_s": round(time.monotonic() - t_start, 2),
    }
    tmp = out / "evaluation.json.tmp"
    tmp.write_text(json.dumps(evaluation, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, out / "evaluation.json")

    for m in ("face_similarity", "no_face_rate", "clip_t", "clip_score", "clip_i", "dino", "consistency", "diversity"):
        v = best_cell["overall"].get(m)
        if v is not None:
            ctx.metric(f"best_{m}", v)
    if best_cell["score"] is not None:
        ctx.metric("best_score", best_cell["score"])
    ctx.metric("best_step", best_cell["step"])
    ctx.metric("best_lora_scale", best_cell["lora_scale"])
    label = " (tiny random models: figures are meaningless)" if evaluation["tiny_random"]["any"] else ""
    ctx.log(f"best: step {best['step']} at LoRA scale {best['lora_scale']:g} - {choice['reason']}{label}")
    return {"evaluation": contract.Artifact("evaluation", out, meta={"best": best, "tiny_random": evaluation["tiny_random"]["any"]})}


def _face_pool(config: dict[str, Any], face: Any, images_per_cell: int, ctx: contract.StageContext):
    """Worker processes for dlib's per-image face analysis (``evaluate.face_workers``), or None.

    dlib's identity network runs one face at a time and holds the GIL, so processes are the way to
    use more cores; insightface runs in ONNX Runtime, which already uses them.
    """
    from runner.metrics.compute import MetricComputer
    from runner.stages.common import face_backend_kwargs
    from runner.vision.analysis import FacePool, default_workers

    workers = min(default_workers(int(config.get("face_workers", 0))), images_per_cell)
    if face.name != "dlib" or workers <= 1:
        return None
    ctx.log(f"face analysis: {workers} worker processes for sets whose in-process analysis would take "
            f"over {MetricComputer.POOL_WORTH_S:.0f} s")
    options = {**face_backend_kwargs(config["face"], ctx.project_root), "name": face.name}
    return FacePool(workers, options,
                    hint="set evaluate.face_workers: 1 to analyze faces in-process and see the error")


def _run_cell(pipe, computer, refs, text_emb_all, config, scale, resolution, final: Path, prog) -> dict[str, Any]:
    """Generate and score one checkpoint x scale into ``final`` (written elsewhere, then renamed
    into place, so a crash or a concurrent run never leaves a half-written cell)."""
    import tempfile

    from runner.diffusion.generate import generate_images

    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        return _generate_and_score(pipe, computer, refs, text_emb_all, config, scale, resolution, folder, final,
                                   prog, generate_images)
    finally:
        if folder.exists():  # failed, or lost a race: nothing half-written stays in the cache
            shutil.rmtree(folder, ignore_errors=True)


def _generate_and_score(pipe, computer, refs, text_emb_all, config, scale, resolution, folder: Path,
                        final: Path, prog, generate_images) -> dict[str, Any]:
    prompts = config["suite"]["prompts"]
    seeds = config["seeds"]
    jobs = [(p, s) for p in prompts for s in seeds]  # the order of text_emb_all
    ext = ".png" if resolution <= 512 else ".jpg"
    images: list[Any] = [None] * len(jobs)
    # Prompts sharing a negative prompt are generated together, in batches.
    by_negative: dict[str, list[int]] = {}
    for i, (p, _) in enumerate(jobs):
        by_negative.setdefault(p.get("negative", ""), []).append(i)
    t0 = time.monotonic()
    for negative, rows in by_negative.items():
        imgs = generate_images(
            pipe, [jobs[i][0]["prompt"] for i in rows], negative_prompt=negative,
            seeds=[jobs[i][1] for i in rows], steps=config["steps"], guidance=config["guidance"],
            width=resolution, height=resolution, lora_scale=scale, batch_size=config["batch_size"],
            progress=prog,
        )
        for i, im in zip(rows, imgs):
            images[i] = im
    t_gen = time.monotonic() - t0
    t0 = time.monotonic()
    emb = computer.embed(images)
    per_image, per_cat, overall = computer.score(
        emb, text_emb_all, refs,
        categories=[p["category"] for p, _ in jobs],
        prompt_keys=[f"{p['category']}/{p['index']}" for p, _ in jobs],
    )
    t_metrics = time.monotonic() - t0
    records = []
    for (p, seed), im, scores in zip(jobs, images, per_image):
        fname = _save_image(im, folder, _image_name(p, seed, ext))
        records.append({"category": p["category"], "prompt_index": p["index"], "seed": seed, "file": fname,
                        **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()}})
    cell = {
        "lora_scale": float(scale),
        "categories": per_cat,
        "overall": overall,
        "images": records,
        "timing": {"generate_s": round(t_gen, 3), "metrics_s": round(t_metrics, 3),
                   "images": len(jobs)},
    }
    _write_json(folder / "cell.json", cell)
    try:
        os.rename(folder, final)
    except OSError:  # another run finished the same cell first: use theirs
        return json.loads((final / "cell.json").read_text(encoding="utf-8"))
    return cell


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    from runner.core.hashing import file_sha256

    return file_sha256(path)


def _common_cell_key(config: dict[str, Any], index: dict[str, Any], resolution: int, ref_files: list[Path]) -> str:
    """Everything but the LoRA file and scale that changes a cell's images or metrics."""
    return _sha256_text(json.dumps({
        "version": VERSION,
        "base_model": index.get("base_model"), "model_family": index.get("model_family"),
        "prompts": config["suite"]["prompts"], "seeds": config["seeds"], "steps": config["steps"],
        "guidance": config["guidance"], "resolution": resolution, "batch_size": config["batch_size"],
        "clip": config["clip_model"], "dino": config["dino_model"], "face": config["face"],
        "device": config.get("device", "auto"),
        "references": sorted(_file_sha256(f) for f in ref_files),
    }, sort_keys=True))






def _load_pipeline(index: dict[str, Any], config: dict[str, Any], ctx: contract.StageContext):
    from runner.diffusion.models import ModelLoadError, load_pipeline

    device = config.get("device", "auto")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return load_pipeline(index["base_model"], family=index.get("model_family", "auto"), device=device,
                             cache_dir=ctx.cache_dir, project_root=ctx.project_root)
    except ModelLoadError as exc:
        raise contract.StageError(f"evaluate: {exc}", hint=exc.hint) from None


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)




def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def _metric_definitions() -> dict[str, str]:
    from runner.metrics.catalog import METRICS

    return {k: v["desc"] for k, v in METRICS.items()}


def _resume_info(scratch: Path) -> str | None:
    try:
        done = json.loads((Path(scratch) / "cells_done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not done:
        return None
    return f"resume after {len(done)} finished checkpoint x scale cell{'s' if len(done) != 1 else ''}"


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact], env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.eval.report import evaluation_context

    art = outputs.get("evaluation")
    if art is None:
        return []
    folder = Path(art.path)
    ev = json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))
    ctx = evaluation_context(ev, folder, thumb_px=int(env.get("thumbnail_px", 192)))
    variant = ev.get("variant")
    title = "Evaluation" + (f" [{variant}]" if variant else "")
    return [contract.ReportSection(title=title, template="sections/evaluate.html.j2", context=ctx,
                               anchor="evaluate" + (f"-{variant}" if variant else ""))]
