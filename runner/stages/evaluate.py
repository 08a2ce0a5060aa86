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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.device import choose_device
from runner.core.fs import atomic_write_text
from runner.spec.config import schema_config, view_of
from runner.spec.sections import CharacterConfig, EvaluateConfig, HardwareConfig, ReportConfig
from runner.stages.common import (
    IMAGE_EXTENSIONS,
    device_setting,
    face_backend,
    face_options,
    guidance_notes,
    load_embedder,
    load_rgb,
    output_json,
    reference_files,
    reference_inputs,
    rel_path,
    run_header,
    resume_note,
    stage_gpu,
    variant_of,
    with_tracking,
)

VERSION = 1
# Metrics of the best cell reported as stage metrics (best_<name>).
BEST_METRICS = ("face_similarity", "no_face_rate", "clip_t", "clip_score", "clip_i", "dino", "consistency", "diversity")


# --------------------------------------------------------------------------- planning


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    """One evaluate node per train node, when the spec has an ``evaluate`` section."""
    trains = graph.nodes_of("train")
    if not isinstance(spec.get("evaluate"), dict) or not trains:
        return []
    ev = EvaluateConfig.from_dict(spec["evaluate"])
    character = CharacterConfig.from_dict(spec["character"])
    if not character.references:
        raise contract.StageError(
            "evaluate: character.references is empty; face similarity, CLIP-I and DINO compare "
            "generated images with the character's reference images",
            hint="Add reference photos (files or folders) under character.references, or remove the evaluate section.",
        )
    # The suite as written (a name, a file or inline categories) is what load_suite reads.
    rendered = _rendered_suite(spec["evaluate"].get("suite", ev.suite), ev, character, graph)
    config = _node_config(spec, ev, character, rendered)
    with_lora = [c for c in config.get("conditions", ["lora"]) if c != "references"]
    n_images = len(rendered.prompts) * len(config["seeds"]) * len(config["lora_scales"]) * len(with_lora)
    label = (f"{len(rendered.categories)} categories x {len(rendered.prompts)} prompts x {len(config['seeds'])} seeds "
             f"x {len(config['lora_scales'])} scales{_conditions_label(config)} = {n_images} images per checkpoint")
    nodes = []
    for train in trains:
        variant = variant_of(train.id)
        nodes.append(with_tracking(contract.PlanNode(
            id=contract.node_id(graph.character, "evaluate", variant),
            kind="evaluate",
            character=graph.character,
            config={**config, "variant": variant},
            inputs={"lora": contract.StageOutputRef(train.id, "lora"), **reference_inputs(spec, graph)},
            outputs=("evaluation",),
            gpu=stage_gpu(spec, "evaluate"),
            unkeyed=("face_workers",),
            label=label,
            notes=guidance_notes(config["guidance"], "evaluate.guidance", train.config.get("base_model", ""),
                                 train.config.get("model_family", "auto")),
        ), spec, graph))
    return nodes


def _conditions_label(config: dict[str, Any]) -> str:
    conditions = config.get("conditions", ["lora"])
    with_lora = [c for c in conditions if c != "references"]
    label = f" x {len(with_lora)} conditions ({', '.join(with_lora)})" if len(with_lora) > 1 else ""
    if with_lora == ["lora+references"]:
        label = " with the references"
    return label + (", plus the references alone on the base model" if "references" in conditions else "")


def _rendered_suite(suite: Any, ev: EvaluateConfig, character: CharacterConfig, graph: contract.GraphView):
    """The prompt suite with the trigger and class word filled in (runner.eval.suites)."""
    from runner.eval.suites import load_suite, render_suite

    return render_suite(
        load_suite(suite, project_root=graph.project_root),
        trigger=character.trigger,
        class_word=character.class_word,
        categories=list(ev.categories) or None,
        prompts_per_category=ev.prompts_per_category,
        default_negative=ev.negative_prompt,
    )


def _node_config(spec: dict[str, Any], ev: EvaluateConfig, character: CharacterConfig,
                 rendered: Any) -> dict[str, Any]:
    """What every evaluate node of the spec runs with (the variant is added per node)."""
    from runner.eval import selection
    from runner.spec.config import to_plain

    targets = to_plain(ev.targets)
    objective = ev.objective.to_dict()
    selection.validate_targets(targets, rendered.categories)
    selection.validate_objective(objective, rendered.categories)
    if not ev.seeds or not ev.lora_scales:
        raise contract.StageError("evaluate: seeds and lora_scales need at least one value each",
                                  hint="e.g. seeds: [1, 2], lora_scales: [0.8, 1.0]")
    if not any(c != "references" for c in ev.conditions):
        raise contract.StageError("evaluate.conditions: the references alone cannot choose a checkpoint",
                                  hint="Add lora or lora+references: [lora, references] compares the two.")
    return {
        "trigger": character.trigger,
        "class_word": character.class_word,
        "suite": {"source": rendered.source, "prompts": [p.to_dict() for p in rendered.prompts]},
        "seeds": [int(s) for s in ev.seeds],
        "lora_scales": [float(s) for s in ev.lora_scales],
        # only when compared (the default, LoRA alone, leaves the node config as it was)
        **({"conditions": list(ev.conditions)} if list(ev.conditions) != ["lora"] else {}),
        "checkpoints": ev.checkpoints,
        "steps": int(ev.steps),
        "guidance": float(ev.guidance),
        "resolution": ev.resolution,
        "batch_size": int(ev.batch_size),
        # Only changes speed: left out of the stage's key (unkeyed) and the cell key.
        "face_workers": int(ev.face_workers),
        "face": face_options(spec),
        "clip_model": ev.clip_model,
        "dino_model": ev.dino_model,
        "targets": targets,
        "objective": objective,
        "references": list(character.references),
        "device": HardwareConfig.from_dict(spec.get("hardware") or {}).device,
    }


# --------------------------------------------------------------------------- running


@schema_config("evaluate")
class EvaluateRun:
    """The evaluate settings run() reads that a node config may leave out (the schema's defaults)."""

    checkpoints: str
    face_workers: int


def cell_name(step: int, scale: float) -> str:
    return f"step{int(step):06d}_scale{float(scale):g}"


@dataclass(frozen=True)
class Checkpoint:
    """One train checkpoint to evaluate: its entry in the train stage's index.json."""

    index: int  # position in index.json's checkpoints
    entry: dict[str, Any]  # step, phase, diffusers (and kohya) file names
    file: Path  # the diffusers LoRA file

    @property
    def step(self) -> int:
        return int(self.entry["step"])


@dataclass
class EvalJob:
    """What a run evaluates: the train output, its checkpoints, the suite and sampler settings."""

    config: dict[str, Any]
    lora_root: Path
    index: dict[str, Any]
    checkpoints: list[Checkpoint]
    prompts: list[dict[str, Any]]
    seeds: list[int]
    scales: list[float]
    resolution: int

    @classmethod
    def of(cls, config: dict[str, Any], inputs: dict[str, contract.Artifact]) -> EvalJob:
        if "lora" not in inputs:
            raise contract.StageError("evaluate needs the train stage's 'lora' output")
        lora_root = Path(inputs["lora"].path)
        index = _read_index(lora_root)
        checkpoints = [Checkpoint(i, ck, lora_root / ck.get("diffusers", ""))
                       for i, ck in _select_checkpoints(index, view_of(EvaluateRun, config).checkpoints)]
        for ck in checkpoints:
            if not ck.entry.get("diffusers") or not ck.file.is_file():
                raise contract.StageError(f"checkpoint at step {ck.entry.get('step')} has no LoRA file {ck.file}",
                                          hint="Re-run the train stage; its output folder looks incomplete.")
        return cls(config, lora_root, index, checkpoints, config["suite"]["prompts"], config["seeds"],
                   config["lora_scales"], int(config.get("resolution") or index.get("resolution") or 512))

    @property
    def conditions(self) -> list[str]:
        return list(self.config.get("conditions") or ["lora"])

    @property
    def jobs(self) -> list[tuple[dict[str, Any], int]]:
        """(prompt, seed) of every image of a cell, in the order of the text embeddings."""
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass
class Scorer:
    """The metric models and what generated images are compared with."""

    computer: Any  # runner.metrics.compute.MetricComputer (its face workers live as long as it)
    ref_files: list[Path]
    refs: Any = None  # the reference set (MetricComputer.references)
    text_emb: Any = None  # the text embedding of every (prompt, seed) job

    def tiny(self) -> dict[str, bool]:
        return {"clip": bool(self.computer.clip.is_tiny_random), "dino": bool(self.computer.dino.is_tiny_random)}


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


@contract.register("evaluate", version=VERSION,
                   review_view="evaluation", order=60, expand=expand, track=track, typical_seconds=1200.0,
                   description="Generate the prompt suite per checkpoint x LoRA scale, score identity and prompt "
                               "alignment, pick the best.",
                   resume_info=lambda scratch: _resume_info(scratch),
                   report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Generate the prompt suite per checkpoint x LoRA scale, score it, pick the best."""
    t_start = time.monotonic()
    job = EvalJob.of(config, inputs)
    # 1. references and metric models
    scorer = _scorer(job, inputs, ctx)
    with scorer.computer:
        _embed_references(scorer, job, ctx)
        # 2. the pipeline
        pipe = _load_pipeline(job.index, config, ctx)
        tiny_diffusion = bool(job.index.get("tiny_random_model") or getattr(pipe, "_character_runner_tiny", False))
        # 3. cells, generated and scored once each (or taken from the shared cache)
        _warn_ignored(job, pipe, ctx)
        runner = CellRunner.start(job, scorer, pipe, ctx, _in_context(job, scorer, pipe))
        cells = runner.run_all()
    # 4. targets, score, best
    choice, score_kind = _choose(cells, config, ctx)
    best_cell = cells[choice["index"]]
    # 5. outputs: images, best LoRA files, evaluation.json
    out = ctx.out_dir / "evaluation"
    _copy_images(out, cells, runner.folders)
    best = _best(best_cell, choice, config, _copy_best_lora(out, job, best_cell))
    tiny = {"diffusion": tiny_diffusion, **scorer.tiny()}
    evaluation = _evaluation(job, scorer, cells, best, score_kind, tiny, ctx)
    evaluation["duration_s"] = round(time.monotonic() - t_start, 2)
    atomic_write_text(out / "evaluation.json", json.dumps(evaluation, indent=1, default=_json_default))
    _log_best(ctx, best_cell, best, choice["reason"], evaluation["tiny_random"]["any"])
    for condition, c in (evaluation.get("conditions") or {}).items():
        ctx.log(f"condition {condition}: best {c['cell']}, {c['maximize']} {c['value']}")
    meta = {"best": best, "tiny_random": evaluation["tiny_random"]["any"]}
    return {"evaluation": contract.Artifact("evaluation", out, meta=meta)}


def _read_index(lora_root: Path) -> dict[str, Any]:
    path = lora_root / "index.json"
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


def _select_checkpoints(index: dict[str, Any], which: str) -> list[tuple[int, dict[str, Any]]]:
    cks = list(enumerate(index["checkpoints"]))
    if which == "last":
        final = int(index.get("final", len(cks) - 1))
        return [cks[final]]
    return cks


def _scorer(job: EvalJob, inputs: dict[str, contract.Artifact], ctx: contract.StageContext) -> Scorer:
    """The reference files and the metric models (CLIP, DINO, the face backend)."""
    from runner.metrics.compute import MetricComputer

    config = job.config
    ref_files = reference_files(inputs)
    if not ref_files:
        raise contract.StageError("no reference images found in character.references "
                                  f"({', '.join(config.get('references', []))})",
                                  hint=f"Put images ({', '.join(IMAGE_EXTENSIONS)}) in the reference folders.")
    face = face_backend(config["face"], ctx.project_root)
    device = device_setting(config)
    computer = MetricComputer(
        clip=load_embedder(config["clip_model"], ctx, "evaluate.clip_model", device),
        dino=load_embedder(config["dino_model"], ctx, "evaluate.dino_model", device),
        face_backend=face, batch_size=config["batch_size"],
        face_pool=_face_pool(config, face, len(job.jobs), ctx),
    )
    ctx.log(f"face backend: {getattr(face, 'selection_note', face.name)}")
    return Scorer(computer, ref_files)


def _embed_references(scorer: Scorer, job: EvalJob, ctx: contract.StageContext) -> None:
    names = [rel_path(f, ctx.project_root) for f in scorer.ref_files]
    scorer.refs = scorer.computer.references([load_rgb(f) for f in scorer.ref_files], names)
    for name, ok in zip(names, scorer.refs.face_found):
        if not ok:
            ctx.warn(f"no face found in reference {name}; it still counts for CLIP-I and DINO")
    scorer.text_emb = scorer.computer.text_embeddings([p["prompt"] for p, _ in job.jobs])


def _face_pool(config: dict[str, Any], face: Any, images_per_cell: int, ctx: contract.StageContext):
    """Worker processes for dlib's per-image face analysis (``evaluate.face_workers``), or None.

    dlib's identity network runs one face at a time and holds the GIL, so processes are the way to
    use more cores; insightface runs in ONNX Runtime, which already uses them.
    """
    from runner.metrics.compute import MetricComputer
    from runner.stages.common import face_backend_kwargs
    from runner.vision.analysis import FacePool, default_workers

    workers = min(default_workers(int(view_of(EvaluateRun, config).face_workers)), images_per_cell)
    if face.name != "dlib" or workers <= 1:
        return None
    ctx.log(f"face analysis: {workers} worker processes for sets whose in-process analysis would take "
            f"over {MetricComputer.POOL_WORTH_S:.0f} s")
    options = {**face_backend_kwargs(config["face"], ctx.project_root), "name": face.name}
    return FacePool(workers, options,
                    hint="set evaluate.face_workers: 1 to analyze faces in-process and see the error")


def _warn_ignored(job: EvalJob, pipe: Any, ctx: contract.StageContext) -> None:
    """The suite's settings the family's pipeline does not take (a negative prompt on FLUX)."""
    from runner.diffusion.generate import ignored_settings
    from runner.generate.references import family_named

    family = family_named(job.index.get("model_family"), pipe)
    negative = next((p.get("negative") for p in job.prompts if p.get("negative")), "")
    for what in ignored_settings(family, negative_prompt=negative or ""):
        ctx.warn(f"evaluate: {what} is not used")


@dataclass
class InContext:
    """The character's references given in context (``evaluate.conditions`` with references): the
    pipeline that takes them (built from the base one, sharing its modules) and its keywords."""

    pipe: Any
    kwargs: dict[str, Any]
    plain: dict[str, Any]  # the keywords of that pipeline's calls without references


def _in_context(job: EvalJob, scorer: Scorer, pipe: Any) -> InContext | None:
    if all(c == "lora" for c in job.conditions):
        return None
    from runner.core.errors import UserError
    from runner.generate import references as R

    family = R.family_named(job.index.get("model_family"), pipe)
    try:
        R.in_context_args(family, "evaluate.conditions")
    except UserError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None
    rpipe = R.reference_pipeline(pipe, family)
    images = [load_rgb(f) for f in scorer.ref_files]
    res = job.resolution
    return InContext(rpipe, R.in_context_kwargs(family, images, res, res), R.plain_kwargs(rpipe, family, res, res))


def _load_pipeline(index: dict[str, Any], config: dict[str, Any], ctx: contract.StageContext):
    from runner.diffusion.models import ModelLoadError, load_pipeline

    try:
        return load_pipeline(index["base_model"], family=index.get("model_family", "auto"),
                             device=choose_device(device_setting(config)),
                             cache_dir=ctx.cache_dir, project_root=ctx.project_root)
    except ModelLoadError as exc:
        raise contract.StageError(f"evaluate: {exc}", hint=exc.hint) from None


# --------------------------------------------------------------------------- the cells


@dataclass
class CellRunner:
    """Generates and scores the cells (one checkpoint x one LoRA scale).

    Each cell is generated and scored once and kept in the shared cache
    (``<cache>/evaluate-cells/<key>/``) under a key of everything that affects it (LoRA file
    content, base model, prompts, seeds, sampler settings, metric models, reference files). A crash
    resumes at the next cell, and changing only targets or the objective re-selects without
    generating anything. The scratch folder's cells_done.json lists the finished cells.
    """

    job: EvalJob
    scorer: Scorer
    pipe: Any
    ctx: contract.StageContext
    common_key: str
    prog: Any
    refs: InContext | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # cell name -> its cache folder
    done: list[str] = field(default_factory=list)  # finished cells, in order (scratch/cells_done.json)

    @classmethod
    def start(cls, job: EvalJob, scorer: Scorer, pipe: Any, ctx: contract.StageContext,
              refs: InContext | None = None) -> CellRunner:
        (ctx.cache_dir / "evaluate-cells").mkdir(parents=True, exist_ok=True)
        with_lora = [c for c in job.conditions if c != "references"]
        total = (len(job.checkpoints) * len(job.scales) * len(with_lora) + ("references" in job.conditions)) \
            * len(job.jobs)
        return cls(job, scorer, pipe, ctx, _common_cell_key(job, scorer.ref_files),
                   ctx.progress(total, "evaluate: generate + score"), refs)

    def run_all(self) -> list[dict[str, Any]]:
        cells = [self.references_alone()] if "references" in self.job.conditions else []
        cells += [cell for ck in self.job.checkpoints for cell in self.checkpoint(ck)]
        self.prog.close()
        return cells

    def references_alone(self) -> dict[str, Any]:
        """The suite on the base model with the references in context (no LoRA loaded yet)."""
        key = _sha256_text(json.dumps([self.common_key, "references"]))[:40]
        folder = self.ctx.cache_dir / "evaluate-cells" / key
        cell = self._cached(folder) or self._generate_cell(None, folder, True)
        cell.update({"cell": "references", "condition": "references", "step": 0, "phase": None,
                     "checkpoint_index": None, "lora_scale": 0.0})
        self.folders["references"] = folder
        return cell

    def checkpoint(self, ck: Checkpoint) -> list[dict[str, Any]]:
        """Every scale of one checkpoint; its LoRA is loaded only when a cell is not cached."""
        from runner.core.hashing import file_sha256
        from runner.diffusion.lora import unload_loras

        lora_sha = file_sha256(ck.file)
        loaded = False
        cells = []
        for condition in (c for c in self.job.conditions if c != "references"):
            for scale in self.job.scales:
                parts = [self.common_key, lora_sha, float(scale)] + ([condition] if condition != "lora" else [])
                folder = self.ctx.cache_dir / "evaluate-cells" / _sha256_text(json.dumps(parts))[:40]
                cell = self._cached(folder)
                if cell is None:
                    loaded = loaded or self._load_lora(ck)
                    cell = self._generate_cell(scale, folder, condition != "lora")
                cells.append(self._done(cell, ck, scale, folder, condition))
        if loaded:
            unload_loras(self.pipe)
        return cells

    def _cached(self, folder: Path) -> dict[str, Any] | None:
        done = folder / "cell.json"
        if not done.is_file():
            return None
        self.prog.update(len(self.job.jobs))
        return json.loads(done.read_text(encoding="utf-8"))

    def _load_lora(self, ck: Checkpoint) -> bool:
        from runner.diffusion.lora import load_lora

        with _quiet_diffusers():  # "no LoRA keys for the text encoder" is expected
            load_lora(self.pipe, ck.file, adapter_name="evaluate")
        return True

    def _done(self, cell: dict[str, Any], ck: Checkpoint, scale: float, folder: Path,
              condition: str = "lora") -> dict[str, Any]:
        """Which checkpoint this is belongs to this run, not to the cached content."""
        name = cell_name(ck.step, scale) + ("_refs" if condition != "lora" else "")
        cell.update({"cell": name, "step": ck.step, "phase": ck.entry.get("phase"),
                     "checkpoint_index": ck.index, "lora_scale": float(scale)})
        if condition != "lora":
            cell["condition"] = condition
        self.folders[name] = folder
        self.done.append(name)
        atomic_write_text(self.ctx.scratch_dir / "cells_done.json", json.dumps(self.done, default=_json_default))
        return cell

    def _generate_cell(self, scale: float | None, final: Path, with_refs: bool = False) -> dict[str, Any]:
        """Generate and score one cell into ``final``: written in a temporary folder, then renamed
        into place, so a crash or a concurrent run never leaves a half-written cell."""
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            t0 = time.monotonic()
            images = self._generate(scale, with_refs)
            t_gen = time.monotonic() - t0
            t0 = time.monotonic()
            per_image, per_cat, overall = self._score(images)
            timing = {"generate_s": round(t_gen, 3), "metrics_s": round(time.monotonic() - t0, 3),
                      "images": len(images)}
            cell = {"lora_scale": float(scale or 0.0), "categories": per_cat, "overall": overall,
                    "images": self._save(images, per_image, folder), "timing": timing}
            atomic_write_text(folder / "cell.json", json.dumps(cell, default=_json_default))
            return _promote_cell(folder, final, cell)
        finally:
            if folder.exists():  # failed, or lost a race: nothing half-written stays in the cache
                shutil.rmtree(folder, ignore_errors=True)

    def _generate(self, scale: float | None, with_refs: bool = False) -> list[Any]:
        """Every (prompt, seed) image; prompts sharing a negative prompt are generated together, in
        batches; with the references in context when ``with_refs``."""
        from runner.diffusion.generate import generate_images

        jobs, config, res = self.job.jobs, self.job.config, self.job.resolution
        pipe, kwargs = self.pipe, None
        if self.refs is not None:  # the reference pipeline shares the base one's modules and LoRA
            pipe, kwargs = self.refs.pipe, (self.refs.kwargs if with_refs else self.refs.plain)
        images: list[Any] = [None] * len(jobs)
        by_negative: dict[str, list[int]] = {}
        for i, (p, _) in enumerate(jobs):
            by_negative.setdefault(p.get("negative", ""), []).append(i)
        for negative, rows in by_negative.items():
            imgs = generate_images(
                pipe, [jobs[i][0]["prompt"] for i in rows], negative_prompt=negative,
                seeds=[jobs[i][1] for i in rows], steps=config["steps"], guidance=config["guidance"],
                width=res, height=res, lora_scale=scale, batch_size=config["batch_size"], progress=self.prog,
                pipe_kwargs=kwargs,
            )
            for i, im in zip(rows, imgs):
                images[i] = im
        return images

    def _score(self, images: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        jobs = self.job.jobs
        emb = self.scorer.computer.embed(images)
        return self.scorer.computer.score(
            emb, self.scorer.text_emb, self.scorer.refs,
            categories=[p["category"] for p, _ in jobs],
            prompt_keys=[f"{p['category']}/{p['index']}" for p, _ in jobs],
        )

    def _save(self, images: list[Any], per_image: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
        ext = ".png" if self.job.resolution <= 512 else ".jpg"
        records = []
        for (p, seed), im, scores in zip(self.job.jobs, images, per_image):
            fname = _save_image(im, folder, f"{p['category']}_{int(p['index']):02d}_seed{seed}{ext}")
            records.append({"category": p["category"], "prompt_index": p["index"], "seed": seed, "file": fname,
                            **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()}})
        return records


def _promote_cell(folder: Path, final: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """Rename the finished cell into the cache. Not core.fs.replace_folder: the first run to finish
    a cell wins and the others use its folder (a reader of that folder never sees it replaced)."""
    try:
        os.rename(folder, final)
    except OSError:  # another run finished the same cell first: use theirs
        return json.loads((final / "cell.json").read_text(encoding="utf-8"))
    return cell


def _save_image(img, folder: Path, stem_name: str) -> str:
    path = folder / stem_name
    if path.suffix == ".png":
        img.save(path, format="PNG", optimize=False)
    else:
        img.convert("RGB").save(path, format="JPEG", quality=92)
    return path.name


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _common_cell_key(job: EvalJob, ref_files: list[Path]) -> str:
    """Everything but the LoRA file and scale that changes a cell's images or metrics."""
    from runner.core.hashing import file_sha256

    config = job.config
    return _sha256_text(json.dumps({
        "version": VERSION,
        "base_model": job.index.get("base_model"), "model_family": job.index.get("model_family"),
        "prompts": config["suite"]["prompts"], "seeds": config["seeds"], "steps": config["steps"],
        "guidance": config["guidance"], "resolution": job.resolution, "batch_size": config["batch_size"],
        "clip": config["clip_model"], "dino": config["dino_model"], "face": config["face"],
        "device": device_setting(config),
        "references": sorted(file_sha256(f) for f in ref_files),
    }, sort_keys=True))


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# --------------------------------------------------------------------------- the best cell and the outputs


def _choose(cells: list[dict[str, Any]], config: dict[str, Any],
            ctx: contract.StageContext) -> tuple[dict[str, Any], str]:
    """Targets per cell (pass/fail per category x metric), the cell score, and the best cell by
    ``evaluate.objective``: (selection.select_best's choice, the score's kind)."""
    from runner.eval import selection

    targets = config.get("targets") or {}
    for c in cells:
        c["targets"] = selection.evaluate_targets(c["categories"], c["overall"], targets)
        c["targets_total"] = sum(len(v) for v in c["targets"].values())
        c["targets_passed"] = sum(1 for row in c["targets"].values() for t in row.values() if t["pass"])
        c["score"], _ = selection.cell_score(c["targets"], c["overall"])
    score_kind = selection.cell_score(cells[0]["targets"], cells[0]["overall"])[1]
    with_lora = [i for i, c in enumerate(cells) if c.get("checkpoint_index") is not None]
    choice = selection.select_best([cells[i] for i in with_lora], config["objective"])
    choice["index"] = with_lora[choice["index"]]
    choice["feasible"] = [with_lora[i] for i in choice["feasible"]]
    if not choice["constraints_met"]:
        ctx.warn(f"evaluate: {choice['reason']}")
    return choice, score_kind


def _copy_images(out: Path, cells: list[dict[str, Any]], folders: dict[str, Path]) -> None:
    """Every cell's images under images/<cell>/ (hard links to the cache where possible)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for c in cells:
        src = folders[c["cell"]]
        dst = out / "images" / c["cell"]
        dst.mkdir(parents=True, exist_ok=True)
        for img in c["images"]:
            _link_or_copy(src / img["file"], dst / img["file"])
            img["path"] = f"images/{c['cell']}/{img['file']}"


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_best_lora(out: Path, job: EvalJob, best_cell: dict[str, Any]) -> tuple[str, str | None]:
    """The best checkpoint's LoRA files under best/: (diffusers file, kohya file or None)."""
    best_ck = job.index["checkpoints"][best_cell["checkpoint_index"]]
    (out / "best").mkdir()
    lora_diffusers = f"best/{Path(best_ck['diffusers']).name}"
    shutil.copy2(job.lora_root / best_ck["diffusers"], out / lora_diffusers)
    lora_kohya = None
    if best_ck.get("kohya") and (job.lora_root / best_ck["kohya"]).is_file():
        lora_kohya = f"best/{Path(best_ck['kohya']).name}"
        shutil.copy2(job.lora_root / best_ck["kohya"], out / lora_kohya)
    return lora_diffusers, lora_kohya


def _best(best_cell: dict[str, Any], choice: dict[str, Any], config: dict[str, Any],
          lora_files: tuple[str, str | None]) -> dict[str, Any]:
    """evaluation.json's ``best``: the chosen cell, its LoRA files under best/, why it won."""
    from runner.eval import selection

    return {
        "variant": config.get("variant"),
        "step": best_cell["step"],
        "phase": best_cell.get("phase"),
        "lora_scale": best_cell["lora_scale"],
        "score": best_cell["score"],
        "cell": best_cell["cell"],
        "checkpoint_index": best_cell["checkpoint_index"],
        "lora_diffusers": lora_files[0],
        "lora_kohya": lora_files[1],
        "objective": config["objective"],
        "objective_value": selection.metric_value(best_cell, choice["maximize"]),
        "constraints_met": choice["constraints_met"],
        "constraints": choice["constraints"],
        "reason": choice["reason"],
    }


def _evaluation(job: EvalJob, scorer: Scorer, cells: list[dict[str, Any]], best: dict[str, Any], score_kind: str,
                tiny: dict[str, bool], ctx: contract.StageContext) -> dict[str, Any]:
    """evaluation.json (duration_s is added last)."""
    config, prompts = job.config, job.prompts
    refs = scorer.refs
    return {
        **run_header(ctx),
        "variant": config.get("variant"),
        "trigger": config["trigger"],
        "class_word": config["class_word"],
        "base_model": job.index.get("base_model"),
        "model_family": job.index.get("model_family"),
        "tiny_random": {**tiny, "any": any(tiny.values())},
        "models": scorer.computer.models(),
        "generation": {"steps": config["steps"], "guidance": config["guidance"], "resolution": job.resolution,
                       "seeds": job.seeds, "lora_scales": job.scales, "batch_size": config["batch_size"],
                       **({"conditions": job.conditions} if config.get("conditions") else {})},
        "suite": {"source": config["suite"]["source"],
                  "categories": list(dict.fromkeys(p["category"] for p in prompts)), "prompts": prompts},
        "references": [{"file": n, "face_found": ok} for n, ok in zip(refs.names, refs.face_found)],
        "metric_definitions": _metric_definitions(),
        "targets": config.get("targets") or {},
        "score_kind": score_kind,
        "cells": cells,
        "best": best,
        **({"conditions": _compare_conditions(cells, config)} if config.get("conditions") else {}),
    }


def _compare_conditions(cells: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Per condition (lora, references, lora+references), its best cell by the objective's metric
    and that cell's headline metrics: does the family need a LoRA for this character at all?"""
    from runner.eval import selection

    metric = (config.get("objective") or {}).get("maximize") or "face_similarity"
    out: dict[str, Any] = {}
    for condition in config["conditions"]:
        mine = [c for c in cells if c.get("condition", "lora") == condition]
        if not mine:
            continue
        best = selection.select_best(mine, {"maximize": metric})
        c = mine[best["index"]]
        out[condition] = {"cell": c["cell"], "maximize": metric, "value": selection.metric_value(c, metric),
                          "score": c.get("score"),
                          **{m: c["overall"].get(m) for m in ("face_similarity", "clip_t", "clip_i")}}
    return out


def _log_best(ctx: contract.StageContext, best_cell: dict[str, Any], best: dict[str, Any], reason: str,
              tiny_any: bool) -> None:
    for m in BEST_METRICS:
        v = best_cell["overall"].get(m)
        if v is not None:
            ctx.metric(f"best_{m}", v)
    if best_cell["score"] is not None:
        ctx.metric("best_score", best_cell["score"])
    ctx.metric("best_step", best_cell["step"])
    ctx.metric("best_lora_scale", best_cell["lora_scale"])
    label = " (tiny random models: figures are meaningless)" if tiny_any else ""
    ctx.log(f"best: step {best['step']} at LoRA scale {best['lora_scale']:g} - {reason}{label}")


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
    return resume_note(len(done), "checkpoint x scale cell")


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.eval.report import evaluation_context

    found = output_json(outputs, "evaluation", "evaluation.json")
    if found is None:
        return []
    folder, ev = found
    ctx = evaluation_context(ev, folder, thumb_px=view_of(ReportConfig, env).thumbnail_px)
    variant = ev.get("variant")
    title = "Evaluation" + (f" [{variant}]" if variant else "")
    return [contract.ReportSection(title=title, template="sections/evaluate.html.j2", context=ctx,
                                   anchor="evaluate" + (f"-{variant}" if variant else ""))]
