"""`storyboard`: a story -> scenes -> validated frames, with the character's LoRA.

Node ``<char>:storyboard`` when the spec has ``generate.storyboard``. Which LoRA it uses
(``generate.checkpoint``):

- ``best`` (default): the best checkpoint and LoRA scale chosen by evaluation, i.e. the
  ``evaluation`` artifact of ``<char>:evaluate``; with train variants, of the *first* evaluate
  node in plan order, which is ``<char>:evaluate[base]`` when the base variant is trained (else
  the first variant listed). Without an evaluate stage: the last (``final``) checkpoint of the
  matching train node (``<char>:train`` or the first ``<char>:train[...]``), at LoRA scale 1.0.
- ``last``: the final checkpoint of that train node, even when evaluate exists.
- a path to a LoRA ``.safetensors`` file: that file, on ``train.base_model``.

``generate.lora_scale`` overrides the scale in every case. A checkpoint a reviewer picked in
``runner review`` (``<spec>.review.yaml``) replaces evaluation's best for ``best``; a frame a
reviewer rejected is generated again from seeds it has not used.

Steps (run): 1. scenes (the planner; manual and rules scenes are computed at plan time and are
part of the cache key, the llm planner is asked at run time and its answer kept in the scratch
folder, so a resumed run does not ask again); 2. the base pipeline + LoRA; 3. frames, batched,
validated against the references and regenerated up to ``validation.retries`` times
(:mod:`runner.generate.frames`); in reference-guided mode frame 1 is generated first, becomes the
reference, and frames 2..N use IP-Adapter and ControlNet (:mod:`runner.generate.guided`); 4. output
artifact ``storyboard``: ``frames/NN.png`` in scene order, ``attempts/`` (every attempt),
``report.json`` (scenes, prompts, every attempt with seed and scores, kept attempt, timing, models,
tiny-model flags).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.device import choose_device
from runner.core.fs import atomic_write_text
from runner.spec.config import view_of
from runner.spec.sections import (
    CharacterConfig,
    EvaluateConfig,
    GenerateConfig,
    HardwareConfig,
    ReferenceGuidedConfig,
    ReportConfig,
    StoryboardConfig,
    TrainConfig,
)
from runner.stages.common import face_backend as common_face_backend
from runner.stages.common import (
    face_options,
    guidance_notes,
    device_setting,
    input_file,
    load_embedder,
    load_references,
    load_rgb,
    model_input,
    output_json,
    reference_inputs,
    rel_path,
    run_header,
    review_section,
    stage_gpu,
    tiny_note,
)

VERSION = 1


# --------------------------------------------------------------------------- planning


def lora_source(spec: dict[str, Any], graph: contract.GraphView,
                where: str) -> tuple[dict[str, Any], dict[str, contract.InputRef]]:
    """Where the character's LoRA comes from: (config part, inputs). See the module docstring."""
    gen = GenerateConfig.from_dict(spec.get("generate") or {})
    train = TrainConfig.from_dict(spec.get("train") or {})
    checkpoint = str(gen.checkpoint)
    common = {"checkpoint": checkpoint, "lora_scale": gen.lora_scale, "base_model": gen.base_model or train.base_model,
              "model_family": train.model_family,
              # without a train section there is no training resolution (frames take their own)
              "resolution": train.resolution if spec.get("train") else None}
    if checkpoint not in ("best", "last"):
        p = graph.project_root / checkpoint
        return ({**common, "source": "file", "lora_file": checkpoint},
                {"lora_file": contract.FileSetRef(root=p, patterns=("*",), recursive=False,
                                                  spec_key="generate.checkpoint")})
    evaluates = graph.nodes_of("evaluate")
    trains = graph.nodes_of("train")
    if checkpoint == "best" and evaluates:
        ev = evaluates[0]
        return ({**common, "source": "evaluate", "source_node": ev.id},
                {"evaluation": contract.StageOutputRef(ev.id, "evaluation")})
    if trains:
        tr = trains[0]
        return {**common, "source": "train", "source_node": tr.id}, {"lora": contract.StageOutputRef(tr.id, "lora")}
    raise contract.StageError(
        f"{where} needs the character's LoRA: the spec has no train stage and generate.checkpoint is {checkpoint!r}",
        hint="Add a train section, or set generate.checkpoint to a LoRA .safetensors file.",
    )


def base_model_source(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, contract.InputRef]]:
    """``reference_guided.lora: false``: no LoRA, the base model (generate.base_model or train.base_model)."""
    gen = GenerateConfig.from_dict(spec.get("generate") or {})
    train = TrainConfig.from_dict(spec.get("train") or {})
    return ({"checkpoint": "none", "lora_scale": None, "base_model": gen.base_model or train.base_model,
             "model_family": train.model_family, "resolution": train.resolution if spec.get("train") else None,
             "source": "none"}, {})


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    from runner.generate.planner import plan_story

    sb = (spec.get("generate") or {}).get("storyboard")
    if not isinstance(sb, dict):
        return []
    story = plan_story(spec, allow_llm=False)
    guided = dict(sb.get("reference_guided") or {})
    if guided.get("enabled") and guided.get("lora") is False:  # references alone: the base model
        lora_cfg, inputs = base_model_source(spec)
    else:
        lora_cfg, inputs = lora_source(spec, graph, "generate.storyboard")
    review = review_section(graph, "storyboard",
                            evaluate=lora_cfg["source_node"] if lora_cfg.get("source") == "evaluate" else None)
    if review.get("checkpoint") and lora_cfg.get("source_node"):  # the pick's LoRA file is in the train output
        inputs["lora"] = graph.node(lora_cfg["source_node"]).inputs["lora"]
    inputs.update(reference_inputs(spec, graph))
    scenes = [s.to_dict() for s in story.scenes]
    inputs.update(_control_inputs(scenes, graph))
    inputs.update(_guided_inputs(guided, graph))
    config = {**lora_cfg, **_node_config(spec, sb, story, scenes, guided), **({"review": review} if review else {})}
    absent = [str(s["index"]) for s in scenes if not s.get("hero", True)]
    notes = [f"the character is not in scene(s) {', '.join(absent)}: no trigger, no identity "
             "check (`runner plan --scenes` says why)"] if absent else []
    return [contract.PlanNode(
        id=contract.node_id(graph.character, "storyboard"),
        kind="storyboard",
        character=graph.character,
        config=config,
        inputs=inputs,
        outputs=("storyboard",),
        gpu=stage_gpu(spec, "storyboard"),
        label=_label(config, absent, bool(guided.get("enabled"))),
        unkeyed=("planner_notes",),
        notes=tuple(story.notes + notes) + guidance_notes(config["guidance"], "generate.storyboard.guidance",
                                                          config["base_model"], config["model_family"]),
    )]


def _control_inputs(scenes: list[dict[str, Any]], graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """``control<i>``: the control image a scene names (a file-set input, so its content is keyed)."""
    return {f"control{s['index']}": contract.FileSetRef(
        root=graph.project_root / s["control_image"], patterns=("*",), recursive=False,
        spec_key=f"generate.storyboard.scenes[{s['index'] - 1}].control_image")
        for s in scenes if s.get("control_image")}


def _guided_inputs(guided: dict[str, Any], graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """Reference mode's local model files (IP-Adapter, ControlNet, pose model) as inputs."""
    if not guided.get("enabled"):
        return {}
    if guided.get("mode") == "adapters" and not guided.get("ip_adapter") and not guided.get("controlnet"):
        raise contract.StageError("generate.storyboard.reference_guided: mode adapters, but neither ip_adapter nor "
                                  "controlnet is set",
                                  hint="Give an IP-Adapter (e.g. h94/IP-Adapter) and/or a ControlNet id or path, "
                                       "or mode: in_context on a family whose pipeline takes reference images.")
    names = ["ip_adapter", "controlnet"] + (["pose_model"] if guided.get("control") == "pose" else [])
    refs = {name: model_input(guided.get(name), graph, f"generate.storyboard.reference_guided.{name}")
            for name in names}
    return {name: ref for name, ref in refs.items() if ref is not None}


def _node_config(spec: dict[str, Any], sb: dict[str, Any], story: Any, scenes: list[dict[str, Any]],
                 guided: dict[str, Any]) -> dict[str, Any]:
    """The node config after the LoRA source's part (lora_source) and before the review's."""
    from runner.generate import guided as G
    from runner.spec.config import to_plain

    board = StoryboardConfig.from_dict(sb)
    val = board.validation
    character = CharacterConfig.from_dict(spec["character"])
    raw_character = spec.get("character") or {}
    return {
        "planner": story.planner,
        "planner_notes": story.notes,
        "scenes": scenes,
        # What the llm planner is asked at run time (manual/rules scenes are already in "scenes").
        "llm_request": None if story.planner != "llm" else {
            "story": board.story, "llm": to_plain(board.llm), "min_scenes": board.min_scenes,
            "max_scenes": board.max_scenes, "style_prompt": board.style_prompt,
            "character": {k: raw_character.get(k) for k in ("name", "display_name", "trigger", "class_word",
                                                            "description", "traits", "aliases", "pronouns")}},
        "negative_prompt": board.negative_prompt,
        "seed": int(board.seed),
        "steps": int(board.steps),
        "guidance": float(board.guidance),
        "width": board.width,
        "height": board.height,
        "batch_size": int(board.batch_size),
        "validation": {
            "face_similarity": val.face_similarity,
            "clip_i": val.clip_i,
            "retries": int(val.retries),
            "clip_model": val.clip_model or EvaluateConfig.from_dict(spec.get("evaluate") or {}).clip_model,
        },
        "face": face_options(spec, val.face_model),
        "reference_guided": ({**G.keyed_options(guided), "validate_against": validation_sets(guided, raw_character)}
                             if guided.get("enabled") else {"enabled": False}),
        "references": list(character.references),
        "device": HardwareConfig.from_dict(spec.get("hardware") or {}).device,
    }


def _label(config: dict[str, Any], absent: list[str], guided: bool) -> str:
    scenes, req = config["scenes"], config["llm_request"]
    n = f"{len(scenes)} scenes" if scenes else f"{req['min_scenes']}-{req['max_scenes']} scenes from the LLM"
    if absent:
        n += f" (the character not in {len(absent)}: {', '.join(absent)})"
    lora = config.get('source_node') or config.get('lora_file')
    label = f"{n} ({config['planner']}), " + (f"LoRA from {lora}" if lora else f"no LoRA, {config['base_model']}")
    return label + (", reference-guided" if guided else "")


def validation_sets(guided: dict[str, Any], character: dict[str, Any]) -> list[str]:
    """Reference mode: what frames 2+ are validated against (``validate_against``; auto: the
    references and frame 1 when the character has references, else frame 1)."""
    choice = guided.get("validate_against", "auto")
    if choice == "auto":
        return ["references", "frame1"] if character.get("references") else ["frame1"]
    return ["references", "frame1"] if choice == "both" else [choice]


# --------------------------------------------------------------------------- running


def resolve_lora(config: dict[str, Any], inputs: dict[str, contract.Artifact]) -> dict[str, Any]:
    """The LoRA file, scale, base model and family to generate with (from whichever input exists)."""
    scale_override = config.get("lora_scale")
    if config.get("source") == "none":
        return {"file": None, "scale": None, "base_model": config["base_model"],
                "family": config.get("model_family", "auto"), "step": None, "variant": None, "from": None,
                "tiny_random": str(config["base_model"]).startswith("builtin:")}
    pick = (config.get("review") or {}).get("checkpoint")
    if pick and "lora" in inputs:
        picked = picked_checkpoint(pick, inputs["lora"], scale_override)
        if picked is not None:
            return {**picked, "base_model": picked["base_model"] or config["base_model"]}
    if "evaluation" in inputs:
        return _lora_of_evaluation(Path(inputs["evaluation"].path), config, scale_override)
    if "lora" in inputs:
        return _lora_of_train(Path(inputs["lora"].path), config, scale_override)
    if "lora_file" in inputs:
        f = input_file(inputs["lora_file"], Path(inputs["lora_file"].path))
        if not f.is_file():
            raise contract.StageError(f"generate.checkpoint: LoRA file {config.get('lora_file')} not found",
                                      hint="Give a .safetensors LoRA file (diffusers or kohya format).")
        return {"file": f, "scale": _scale(scale_override, 1.0),
                "base_model": config["base_model"], "family": config.get("model_family", "auto"), "step": None,
                "variant": None, "from": config.get("lora_file"),
                "tiny_random": str(config["base_model"]).startswith("builtin:")}
    raise contract.StageError("storyboard: no LoRA input (evaluation, lora or lora_file)")


def _scale(override: float | None, default: float) -> float:
    return float(override if override is not None else default)


def _lora_of_evaluation(folder: Path, config: dict[str, Any], scale_override: float | None) -> dict[str, Any]:
    """Evaluation's best checkpoint at its best scale."""
    try:
        ev = json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))
        best = ev["best"]
        lora_file = folder / best["lora_diffusers"]
    except (OSError, ValueError, KeyError) as exc:
        raise contract.StageError(f"cannot read the evaluation artifact {folder}/evaluation.json: {exc}",
                                  hint="Re-run the evaluate stage (runner apply --force evaluate).") from None
    return {"file": lora_file, "scale": _scale(scale_override, best.get("lora_scale", 1.0)),
            "base_model": ev.get("base_model") or config["base_model"], "family": ev.get("model_family") or "auto",
            "step": best.get("step"), "variant": best.get("variant"), "from": config.get("source_node"),
            "tiny_random": bool((ev.get("tiny_random") or {}).get("diffusion"))}


def _lora_of_train(folder: Path, config: dict[str, Any], scale_override: float | None) -> dict[str, Any]:
    """The train output's final checkpoint."""
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        ck = index["checkpoints"][int(index.get("final", -1))]
        lora_file = folder / ck["diffusers"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise contract.StageError(f"cannot read the train stage's LoRA index {folder}/index.json: {exc}",
                                  hint="Re-run the train stage.") from None
    return {"file": lora_file, "scale": _scale(scale_override, 1.0),
            "base_model": index.get("base_model") or config["base_model"],
            "family": index.get("model_family") or "auto", "step": ck.get("step"), "variant": index.get("variant"),
            "from": config.get("source_node"), "tiny_random": bool(index.get("tiny_random_model"))}


def picked_checkpoint(pick: dict[str, Any], lora: contract.Artifact,
                      scale_override: float | None) -> dict[str, Any] | None:
    """The reviewer's checkpoint (runner review) from the train output, or None when that step (with
    that file content) is no longer there; then evaluation's best is used and the run says so."""
    from runner.core.hashing import file_sha256

    folder = Path(lora.path)
    try:
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for ck in index.get("checkpoints", []):
        f = folder / ck.get("diffusers", "")
        if int(ck.get("step", -1)) != int(pick["step"]) or not f.is_file():
            continue
        if pick.get("lora_sha256") and file_sha256(f) != pick["lora_sha256"]:
            continue
        scale = scale_override if scale_override is not None else pick.get("lora_scale", 1.0)
        return {"file": f, "scale": float(scale), "base_model": index.get("base_model"),
                "family": index.get("model_family") or "auto", "step": ck.get("step"), "variant": index.get("variant"),
                "from": f"reviewer's pick in {pick.get('stage')}", "picked": True,
                "tiny_random": bool(index.get("tiny_random_model"))}
    return None


def scenes_to_regenerate(config: dict[str, Any]) -> dict[int, int]:
    """Scene index -> how many times a reviewer rejected its frame (runner review)."""
    return {int(k): int(v) for k, v in ((config.get("review") or {}).get("regenerate_scenes") or {}).items()}


def validated_frames(jobs: list[Any], generate: Any, validator: Any, config: dict[str, Any], n: int,
                     on_round: Any, positions: list[int] | None = None) -> list[Any]:
    """:func:`runner.generate.frames.generate_validated`, where a frame a reviewer rejected r times
    starts r * (retries + 1) attempts further on, so it never reuses a seed it was made from."""
    from runner.generate.frames import generate_validated

    rejected = scenes_to_regenerate(config)
    retries = int(config["validation"]["retries"])
    pos = list(positions) if positions is not None else list(range(len(jobs)))
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(rejected.get(job.scene_index, 0), []).append(i)
    results: list[Any] = [None] * len(jobs)
    for times, rows in sorted(groups.items()):
        got = generate_validated([jobs[i] for i in rows], generate, validator,
                                 base_seed=int(config["seed"]) + times * (retries + 1) * n, retries=retries,
                                 n_scenes=n, positions=[pos[i] for i in rows], on_round=on_round)
        for i, res in zip(rows, got):
            results[i] = res
    return results


def load_character_pipeline(lora: dict[str, Any], device: str, ctx: contract.StageContext, where: str):
    from runner.diffusion.lora import load_lora
    from runner.diffusion.models import ModelLoadError, load_pipeline

    try:
        pipe = load_pipeline(lora["base_model"], family=lora.get("family", "auto"), device=device,
                             cache_dir=ctx.cache_dir, project_root=ctx.project_root)
    except ModelLoadError as exc:
        raise contract.StageError(f"{where}: {exc}", hint=exc.hint) from None
    pipe.set_progress_bar_config(disable=True)
    if lora["file"] is None:  # references alone (reference_guided.lora: false)
        return pipe
    if not Path(lora["file"]).is_file():
        raise contract.StageError(f"{where}: LoRA file {lora['file']} not found", hint="Re-run the stage that made it.")
    load_lora(pipe, lora["file"], adapter_name="character", scale=lora["scale"])
    return pipe


def _scenes(config: dict[str, Any], ctx: contract.StageContext) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    if config["planner"] != "llm":
        return config["scenes"], None
    from runner.generate.planner import plan_scenes

    cached = ctx.scratch_dir / "llm_scenes.json"
    if cached.is_file():
        data = json.loads(cached.read_text(encoding="utf-8"))
        return data["scenes"], data["exchange"]
    req = config["llm_request"]
    spec_like = {"character": req["character"], "generate": {"storyboard": {
        "planner": "llm", "story": req["story"], "llm": req["llm"], "min_scenes": req["min_scenes"],
        "max_scenes": req["max_scenes"], "style_prompt": req["style_prompt"]}}}
    exchange: dict[str, Any] = {}
    scenes = [s.to_dict() for s in plan_scenes(spec_like, llm_exchange=exchange)]
    atomic_write_text(cached, json.dumps({"scenes": scenes, "exchange": exchange}))
    return scenes, exchange


def build_validators(config: dict[str, Any], ref_images: list[Any], thresholds: Any, ctx: contract.StageContext):
    """(face backend, CLIP embedder, the validator of plain frames, and a function giving the
    validator of reference mode's frames 2+ from frame 1: against the references, frame 1 or both)."""
    from runner.generate.frames import FrameValidator, Thresholds, ValidationSet, frame_validator

    val = config["validation"]
    guided = config.get("reference_guided") or {}
    against = (guided.get("validate_against") or ["references"]) if guided.get("enabled") else ["references"]
    wants_faces = thresholds.face_similarity is not None and (ref_images or "frame1" in against)
    face_backend = (common_face_backend(config["face"], ctx.project_root, key="generate.storyboard.validation")
                    if wants_faces else None)
    if thresholds.face_similarity == "backend":  # the calibrated threshold of the backend in use
        thresholds = Thresholds(face_backend.default_identity_threshold if face_backend else None, thresholds.clip_i)
        if face_backend:
            ctx.log(f"face similarity threshold {thresholds.face_similarity} ({face_backend.name} backend's "
                    "calibrated default)")
    clip = None
    if thresholds.clip_i is not None:
        clip = load_embedder(val["clip_model"], ctx, "generate.storyboard.validation.clip_model")
    # Without references, reference mode against frame 1 only leaves frame 1 itself unchecked.
    plain = thresholds if ref_images or "references" in against else Thresholds(None, None)
    refs = FrameValidator(face_backend=face_backend if ref_images else None, clip=clip, reference_images=ref_images,
                          thresholds=plain)

    def later_validator(reference: Any) -> ValidationSet:
        sets: dict[str, Any] = {"references": refs} if "references" in against else {}
        notes: list[str] = []
        if "frame1" in against:
            sets["frame1"], notes = frame_validator(reference, face_backend=face_backend, clip=clip,
                                                    thresholds=thresholds)
        return ValidationSet(sets, notes)

    return face_backend, clip, ValidationSet({"references": refs}), later_validator, thresholds


@dataclass
class Checks:
    """How frames are validated (build_validators): the face backend and CLIP model, the
    validator of plain frames and the one of reference mode's frames 2+ (given frame 1)."""

    face_backend: Any
    clip: Any
    validator: Any
    later_validator: Any
    thresholds: Any


@dataclass
class FrameMaker:
    """Generates frames with the character's pipeline in batches (one per control image), and
    counts the images and the seconds spent."""

    config: dict[str, Any]
    lora_scale: float
    width: int
    height: int
    prog: Any
    seconds: float = 0.0
    images: int = 0

    def generator(self, pipe: Any, kwargs_for_group: Any = lambda group: None):
        """The ``generate(batch, seeds)`` function runner.generate.frames calls."""
        return lambda batch, seeds: self.generate(pipe, kwargs_for_group, batch, seeds)

    def generate(self, pipe: Any, kwargs_for_group: Any, batch: list[Any], seeds: list[int]) -> list[Any]:
        from runner.diffusion.generate import generate_images

        config = self.config
        t1 = time.monotonic()
        out: list[Any] = [None] * len(batch)
        groups: dict[str, list[int]] = {}
        for i, j in enumerate(batch):
            groups.setdefault(j.group, []).append(i)
        for g, rows in groups.items():
            imgs = generate_images(pipe, [batch[i].prompt for i in rows], negative_prompt=config["negative_prompt"],
                                   seeds=[seeds[i] for i in rows], steps=config["steps"], guidance=config["guidance"],
                                   width=self.width, height=self.height, lora_scale=self.lora_scale,
                                   batch_size=config["batch_size"], progress=self.prog, pipe_kwargs=kwargs_for_group(g))
            for i, im in zip(rows, imgs):
                out[i] = im
        self.seconds += time.monotonic() - t1
        self.images += len(batch)
        return out


@contract.register("storyboard", version=VERSION,
                   review_view="frames", order=70, expand=expand, typical_seconds=600.0,
                   description="Story -> scenes -> frames with the character's LoRA, validated and regenerated "
                               "below threshold.",
                   report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Story -> scenes -> frames with the character's LoRA, validated and regenerated below threshold."""
    from runner.diffusion.models import family_of

    t0 = time.monotonic()
    timing: dict[str, float] = {}
    # 1. scenes
    scenes, exchange = _scenes(config, ctx)
    if not scenes:
        raise contract.StageError("storyboard: the planner returned no scenes")
    timing["plan_s"] = round(time.monotonic() - t0, 3)

    # 2. pipeline, references, validator
    t = time.monotonic()
    device = choose_device(device_setting(config))
    lora = _lora(config, inputs, ctx)
    pipe = load_character_pipeline(lora, device, ctx, "generate.storyboard")
    family = family_of(pipe)
    mode = _reference_mode(config, family)
    _warn_ignored(config, family, ctx)
    ref_files, ref_images = load_references(inputs)
    checks = _checks(config, ref_images, ctx)
    timing["load_s"] = round(time.monotonic() - t, 3)

    # 3. frames
    maker = _frame_maker(config, lora, ctx)
    results, guided_info = _all_frames(config, inputs, ctx, pipe, family, scenes, checks, maker, mode)
    maker.prog.close()
    timing["generate_s"] = round(maker.seconds, 3)
    timing["images_generated"] = maker.images

    # 4. outputs
    out = ctx.out_dir / "storyboard"
    frames = _write_frames(out, scenes, results, config)
    tiny = {"diffusion": bool(lora["tiny_random"] or getattr(pipe, "_character_runner_tiny", False)),
            "clip": bool(checks.clip is not None and checks.clip.is_tiny_random),
            "pose": bool(guided_info.get("control_maps", {}).get("pose", {}).get("tiny_random"))}
    report = {**_report_head(config, ctx, exchange, lora, family, maker, device, checks, ref_files),
              "reference_guided": guided_info, "tiny_random": {**tiny, "any": any(tiny.values())}, "frames": frames,
              "planner_notes": config.get("planner_notes") or [], "summary": _summary(scenes, frames),
              "timing": {**timing, "total_s": round(time.monotonic() - t0, 3),
                         "frames_per_s": round(maker.images / maker.seconds, 4) if maker.seconds > 0 else None}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _log_run(ctx, report, config)
    meta = {"frames": len(scenes), "tiny_random": report["tiny_random"]["any"]}
    return {"storyboard": contract.Artifact("storyboard", out, meta=meta)}


def _lora(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext) -> dict[str, Any]:
    lora = resolve_lora(config, inputs)
    pick = (config.get("review") or {}).get("checkpoint")
    if pick and not lora.get("picked"):
        ctx.warn(f"review: the picked checkpoint (step {pick['step']} of {pick.get('stage')}) is no longer in the "
                 "train output; using evaluation's best")
    return lora


def _checks(config: dict[str, Any], ref_images: list[Any], ctx: contract.StageContext) -> Checks:
    from runner.generate.frames import Thresholds

    val = config["validation"]
    thresholds = Thresholds(face_similarity=val.get("face_similarity"), clip_i=val.get("clip_i"))
    checks = Checks(*build_validators(config, ref_images, thresholds, ctx))
    backend_t = getattr(checks.face_backend, "default_identity_threshold", None)
    t = checks.thresholds.face_similarity
    if t is not None and backend_t is not None and t < backend_t:
        # Cosine scales differ per embedding model: 0.7 is strict for ArcFace, loose for dlib.
        # (The default, "backend", takes the backend's calibrated threshold.)
        ctx.warn(f"generate.storyboard.validation.face_similarity {t} is below the "
                 f"{checks.face_backend.name} backend's identity threshold {backend_t}: frames of someone else "
                 "can pass")
    return checks


def _frame_maker(config: dict[str, Any], lora: dict[str, Any], ctx: contract.StageContext) -> FrameMaker:
    resolution = int(config.get("resolution") or 512)
    return FrameMaker(config, lora["scale"], int(config.get("width") or resolution),
                      int(config.get("height") or resolution), ctx.progress(None, "storyboard: frames"))


def _all_frames(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext, pipe: Any,
                family: str, scenes: list[dict[str, Any]], checks: Checks,
                maker: FrameMaker, mode: str | None = None) -> tuple[list[Any], dict[str, Any]]:
    """A validated frame per scene (reference mode: _guided_frames), and what reference mode did."""
    from runner.generate.frames import FrameJob

    jobs = [FrameJob(scene_index=s["index"], prompt=s["prompt"], group=s.get("control_image") or "",
                     hero=bool(s.get("hero", True))) for s in scenes]

    def on_round(r: int, k: int) -> None:
        ctx.log(f"storyboard: round {r + 1} ({'first attempt' if r == 0 else 'retry'}), {k} frame(s)")

    if not (config.get("reference_guided") or {}).get("enabled"):
        results = validated_frames(jobs, maker.generator(pipe), checks.validator, config, len(jobs), on_round)
        return results, {"enabled": False}
    if mode == "in_context":
        return _in_context_frames(config, inputs, pipe, family, jobs, checks, maker, on_round)
    return _guided_frames(config, inputs, ctx, pipe, family, jobs, checks, maker, on_round)


def _write_frames(out: Path, scenes: list[dict[str, Any]], results: list[Any],
                  config: dict[str, Any]) -> list[dict[str, Any]]:
    """frames/NN.png (the kept attempt) and attempts/ (every attempt); report.json's frame records."""
    for sub in ("frames", "attempts"):  # left by an interrupted attempt; this stage owns them
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    (out / "attempts").mkdir(exist_ok=True)
    rejected = scenes_to_regenerate(config)
    frames = []
    for s, res in zip(scenes, results):
        for a, im in zip(res.attempts, res.images):
            a["file"] = f"attempts/scene{s['index']:02d}_attempt{a['attempt']}.png"
            im.save(out / a["file"])
        frame_file = f"frames/{s['index']:02d}.png"
        res.image.save(out / frame_file)
        frames.append({**s, "file": frame_file, "kept_attempt": res.kept, "passed": res.passed,
                       "rejected_by_reviewer": rejected.get(s["index"], 0),
                       "scores": {k: v for k, v in res.attempts[res.kept].items() if k not in ("file",)},
                       "attempts": res.attempts})
    return frames


def _report_head(config: dict[str, Any], ctx: contract.StageContext, exchange: dict[str, Any] | None,
                 lora: dict[str, Any], family: str, maker: FrameMaker, device: str, checks: Checks,
                 ref_files: list[Path]) -> dict[str, Any]:
    """report.json up to the reference-guided part: the run, the LoRA, the settings, the validation."""
    face_backend = checks.face_backend
    return {
        **run_header(ctx),
        "planner": config["planner"],
        "llm": exchange,
        "lora": {k: (str(v) if isinstance(v, Path) else v) for k, v in lora.items()},
        "lora_file": rel_path(Path(lora["file"]), ctx.project_root) if lora["file"] else None,
        "model_family": family,
        "generation": {"steps": config["steps"], "guidance": config["guidance"], "width": maker.width,
                       "height": maker.height, "seed": config["seed"], "negative_prompt": config["negative_prompt"],
                       "batch_size": config["batch_size"], "device": device,
                       "family_arguments": _family_arguments(family)},
        "validation": {**config["validation"], "against": checks.validator.against,
                       "face_backend": getattr(face_backend, "name", None),
                       "face_embedding_model": getattr(face_backend, "embedding_model", None),
                       "clip": getattr(checks.clip, "name", None)},
        "references": [rel_path(f, ctx.project_root) for f in ref_files],
    }


def _family_arguments(family_name: str) -> str:
    from runner.generate.references import family_named

    return family_named(family_name).generation.describe()


def _summary(scenes: list[dict[str, Any]], frames: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "scenes": len(scenes),
        "without_character": sum(1 for s in scenes if not s.get("hero", True)),
        "passed": sum(1 for f in frames if f["passed"]),
        "attempts": sum(len(f["attempts"]) for f in frames),
        "retried": sum(1 for f in frames if len(f["attempts"]) > 1),
    }


def _log_run(ctx: contract.StageContext, report: dict[str, Any], config: dict[str, Any]) -> None:
    summary, n = report["summary"], report["summary"]["scenes"]
    ctx.metric("frames_passed", summary["passed"])
    ctx.metric("frames_attempts", summary["attempts"])
    if report["timing"]["frames_per_s"]:
        ctx.metric("frames_per_s", report["timing"]["frames_per_s"])
    label = " (tiny random models: frames and scores are meaningless)" if report["tiny_random"]["any"] else ""
    ctx.log(f"storyboard: {summary['passed']}/{n} frames pass, {summary['attempts']} images generated{label}")
    failed = n - summary["passed"]
    if failed:
        ctx.warn(f"storyboard: {failed} of {n} frame(s) stayed below the validation thresholds after "
                 f"{config['validation']['retries']} retries; the best attempt is kept and flagged")


# --------------------------------------------------------------------------- reference mode


def _guided_frames(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext,
                   pipe: Any, family: str, jobs: list[Any], checks: Checks, maker: FrameMaker,
                   on_round: Any) -> tuple[list[Any], dict[str, Any]]:
    """The first scene with the character, plain (validated) -> the reference; the scenes without
    the character plain too (the reference's identity and layout are not theirs); the other
    frames with IP-Adapter and/or ControlNet, validated per ``validate_against``."""
    g = config["reference_guided"]
    n = len(jobs)
    ref_pos = next((k for k, j in enumerate(jobs) if j.hero), 0)
    plain = [ref_pos] + [k for k, j in enumerate(jobs) if not j.hero and k != ref_pos]
    rest_pos = [k for k in range(n) if k not in plain]
    results: list[Any] = [None] * n
    first = validated_frames([jobs[k] for k in plain], maker.generator(pipe), checks.validator, config, n,
                             on_round, positions=plain)
    for k, res in zip(plain, first):
        results[k] = res
    reference = first[0].image
    info: dict[str, Any] = {"enabled": True, "reference_frame": jobs[ref_pos].scene_index,
                            "control": view_of(ReferenceGuidedConfig, g).control,
                            "unguided_frames": [jobs[k].scene_index for k in plain[1:]]}
    if not rest_pos:
        return results, info
    later = checks.later_validator(reference)
    info["validate_against"] = later.against
    info["validation_notes"] = later.notes
    guidance = Guidance(pipe)
    if g.get("ip_adapter"):
        info.update(_with_ip_adapter(guidance, g, family, reference, ctx))
    if g.get("controlnet"):
        info.update(_with_controlnet(guidance, g, family, reference, [jobs[k] for k in rest_pos], inputs, checks, ctx))
    rest = validated_frames([jobs[k] for k in rest_pos], maker.generator(guidance.pipe, guidance.kwargs_for), later,
                            config, n, on_round, positions=rest_pos)
    for k, res in zip(rest_pos, rest):
        results[k] = res
    if guidance.maps:
        folder = ctx.out_dir / "storyboard" / "control"
        folder.mkdir(parents=True, exist_ok=True)
        guidance.maps[""].save(folder / "reference_control.png")
        info["control_map_file"] = "control/reference_control.png"
    return results, info


def _warn_ignored(config: dict[str, Any], family_name: str, ctx: contract.StageContext) -> None:
    from runner.diffusion.generate import ignored_settings
    from runner.generate.references import family_named

    for what in ignored_settings(family_named(family_name), negative_prompt=config["negative_prompt"]):
        ctx.warn(f"generate.storyboard: {what} is not used")


def _reference_mode(config: dict[str, Any], family_name: str) -> str | None:
    """Reference mode's way for this family (``reference_guided.mode``; auto: adapters when an
    IP-Adapter or ControlNet is set, else in context), or None when reference mode is off. A
    family without that way is refused before any frame is made."""
    from runner.core.errors import UserError
    from runner.generate import references as R

    g = config.get("reference_guided") or {}
    if not g.get("enabled"):
        return None
    rg = view_of(ReferenceGuidedConfig, g)
    mode = rg.mode if rg.mode != "auto" else ("adapters" if rg.ip_adapter or rg.controlnet else "in_context")
    family = R.family_named(family_name)
    key = "generate.storyboard.reference_guided"
    try:
        if mode == "adapters":
            R.require_adapters(family, ip_adapter=bool(rg.ip_adapter), controlnet=bool(rg.controlnet), key=key)
        else:
            R.in_context_args(family, f"{key}.mode: in_context")
    except UserError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None
    return mode


def _in_context_frames(config: dict[str, Any], inputs: dict[str, contract.Artifact], pipe: Any, family_name: str,
                       jobs: list[Any], checks: Checks, maker: FrameMaker,
                       on_round: Any) -> tuple[list[Any], dict[str, Any]]:
    """Reference mode in context: the family's reference pipeline (built from ``pipe``, the same
    modules and LoRA) takes images as input. Frame 1 (the first scene with the character) is
    conditioned on the character's references when ``in_context_images`` includes them; frames
    2+ on frame 1 and/or the references; scenes without the character take none."""
    from runner.generate import references as R
    from runner.stages.common import load_references

    g = view_of(ReferenceGuidedConfig, config["reference_guided"])
    family = R.family_named(family_name)
    rpipe = R.reference_pipeline(pipe, family)
    size = (maker.width, maker.height)
    character_refs = load_references(inputs)[1] if g.in_context_images != "frame1" else []
    n = len(jobs)
    ref_pos = next((k for k, j in enumerate(jobs) if j.hero), 0)
    unguided = [k for k, j in enumerate(jobs) if not j.hero and k != ref_pos]
    rest_pos = [k for k in range(n) if k != ref_pos and k not in unguided]
    results: list[Any] = [None] * n
    plain = R.plain_kwargs(rpipe, family, *size)
    for k, res in zip(unguided, validated_frames([jobs[k] for k in unguided], maker.generator(rpipe, lambda _: plain),
                                                 checks.validator, config, n, on_round, positions=unguided)):
        results[k] = res
    first_kw = R.in_context_kwargs(family, character_refs, *size)
    results[ref_pos] = validated_frames([jobs[ref_pos]], maker.generator(rpipe, lambda _: first_kw), checks.validator,
                                        config, n, on_round, positions=[ref_pos])[0]
    reference = results[ref_pos].image
    info: dict[str, Any] = {"enabled": True, "mode": "in_context", "pipeline": type(rpipe).__name__,
                            "reference_frame": jobs[ref_pos].scene_index, "in_context_images": g.in_context_images,
                            "frame1_conditioned_on_references": "image" in first_kw,
                            "unguided_frames": [jobs[k].scene_index for k in unguided],
                            "lora": config.get("source") != "none"}
    if family.generation.references.needs:
        info["needs"] = family.generation.references.needs
    if not rest_pos:
        return results, info
    later = checks.later_validator(reference)
    info.update(validate_against=later.against, validation_notes=later.notes)
    images = ([reference] if g.in_context_images != "references" else []) + character_refs
    rest_kw = R.in_context_kwargs(family, images, *size)
    info["images_per_frame"] = len(rest_kw["image"]) if isinstance(rest_kw.get("image"), list) else 1
    rest = validated_frames([jobs[k] for k in rest_pos], maker.generator(rpipe, lambda _: rest_kw), later, config, n,
                            on_round, positions=rest_pos)
    for k, res in zip(rest_pos, rest):
        results[k] = res
    return results, info


@dataclass
class Guidance:
    """What reference mode's frames 2+ are generated with: the pipeline (a ControlNet pipeline when
    one is set), extra pipeline arguments, and the control map per control image ('' = frame 1's)."""

    pipe: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)
    map_keyword: str = "image"  # the ControlNet pipeline's keyword of the map (the family's)

    def kwargs_for(self, group: str) -> dict[str, Any]:
        kw = dict(self.kwargs)
        if self.maps:
            kw[self.map_keyword] = self.maps.get(group, self.maps[""])
        return kw


def _with_ip_adapter(guidance: Guidance, g: dict[str, Any], family: str, reference: Any,
                     ctx: contract.StageContext) -> dict[str, Any]:
    from runner.generate import guided as G

    rg = view_of(ReferenceGuidedConfig, g)
    info = G.load_ip_adapter(guidance.pipe, rg.ip_adapter, weight_name=rg.ip_adapter_weight_name,
                             subfolder=rg.ip_adapter_subfolder, image_encoder_folder=rg.ip_adapter_image_encoder_folder,
                             scale=rg.ip_adapter_scale, family=family, project_root=ctx.project_root,
                             cache_dir=ctx.cache_dir)
    guidance.kwargs["ip_adapter_image"] = reference
    return info


def _with_controlnet(guidance: Guidance, g: dict[str, Any], family: str, reference: Any, jobs: list[Any],
                     inputs: dict[str, contract.Artifact], checks: Checks,
                     ctx: contract.StageContext) -> dict[str, Any]:
    """The ControlNet pipeline and the control maps: frame 1's, and each scene control image's."""
    from runner.generate import guided as G

    pipe = guidance.pipe
    guidance.pipe = G.controlnet_pipeline(pipe, g["controlnet"], family=family, project_root=ctx.project_root,
                                          cache_dir=ctx.cache_dir)
    scale = float(view_of(ReferenceGuidedConfig, g).controlnet_scale)
    guidance.kwargs["controlnet_conditioning_scale"] = scale
    guidance.map_keyword = G._family(family).generation.controlnet.image_keyword
    maker = G.ControlMaps(g, checks.face_backend, reference.size, device=str(pipe.device),
                          project_root=ctx.project_root, cache_dir=ctx.cache_dir)
    guidance.maps[""] = maker.extract(reference, "frame 1")
    for j in jobs:
        if j.group and j.group not in guidance.maps:
            path = input_file(inputs.get(f"control{j.scene_index}"), ctx.project_root / j.group)
            guidance.maps[j.group] = maker.given(load_rgb(path), j.group)
    for note in maker.warnings:
        ctx.warn(f"storyboard: {note}")
    return {"controlnet": g["controlnet"], "controlnet_scale": scale, "control_maps": maker.info}


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri

    found = output_json(outputs, "storyboard", "report.json")
    if found is None:
        return []
    folder, rep = found
    px = view_of(ReportConfig, env).thumbnail_px
    frames = []
    for f in rep["frames"]:
        attempts = [{**a, "kept": i == f["kept_attempt"],
                     "thumb": thumbnail_data_uri(folder / a["file"], max(64, px // 2))
                     if (folder / a["file"]).is_file() else None} for i, a in enumerate(f["attempts"])]
        frames.append({**f, "image": thumbnail_data_uri(folder / f["file"], px * 2), "attempt_rows": attempts})
    cm = folder / "control" / "reference_control.png"
    control = thumbnail_data_uri(cm, px) if cm.is_file() else None
    note = tiny_note(rep.get("tiny_random", {}), ("diffusion", "clip", "pose"),
                     "the frames are noise and their scores say nothing about the character; they only show that "
                     "the pipeline runs end to end.")
    return [contract.ReportSection(title="Storyboard", template="sections/storyboard.html.j2", anchor="storyboard",
                                   context={"rep": rep, "frames": frames, "control": control, "tiny_note": note})]
