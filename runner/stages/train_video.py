"""The ``train_video`` stage: a character LoRA for a video family (LTX-Video 0.9, LTX-2, Wan 2.2).

Node ids as the train stage's: ``<character>:train_video`` without variants, else
``<character>:train_video[<variant>]`` per variant (plus ``[base]`` when include_base_variant).
Inputs: the caption stage's ``dataset`` (the curated images, trained as single-frame clips) when
``train_video.images.use``, and the ``clips`` of every ``video_clips`` stage (clips cut around the
main person's tracks in the video sources) when ``train_video.clips.enabled``. The base model is
``train_video.base_model``, or ``generate.video.model`` when that is null, so the LoRA is made
for the model the video stage generates with. Outputs: ``lora`` (index.json + checkpoints, the
image trainer's layout; Wan 2.2 A14B's second expert as ``diffusers_2``) and ``logs``.
Heavy imports live in runner.diffusion.video_trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.sections import spec_config
from runner.stages.common import read_metrics, variant_runs, video_files, with_tracking
from runner.stages.common import training_resume_info as resume_info

KIND = "train_video"
VERSION = 1
CLIP_KEYS_READ = ("enabled", "frames")


def base_model_of(spec: dict[str, Any]) -> str:
    """train_video.base_model, else the video stage's model (generate.video.model)."""
    section = spec.get(KIND) or {}
    if section.get("base_model"):
        return str(section["base_model"])
    video = (spec.get("generate") or {}).get("video")
    if isinstance(video, dict):
        from runner.spec.sections import VideoConfig

        return str(VideoConfig.from_dict(video).model)
    raise contract.StageError("train_video.base_model is not set and the spec has no generate.video to take the "
                              "model from", hint="Set train_video.base_model to the video model (e.g. "
                                                 "Wan-AI/Wan2.2-TI2V-5B-Diffusers, builtin:tiny-wan22-ti2v for tests).")


def node_config(section: dict[str, Any], spec: dict[str, Any], *, variant: str | None,
                overrides: dict[str, Any]) -> dict[str, Any]:
    from runner.spec.variants import apply_variant

    typed = spec_config(spec)
    cfg = apply_variant(section, overrides, name=KIND)
    # of the clips keys, the trainer reads these; how clips are cut is the video_clips stage's key
    cfg["clips"] = {k: v for k, v in (cfg.get("clips") or {}).items() if k in CLIP_KEYS_READ}
    cfg["base_model"] = cfg.get("base_model") or base_model_of(spec)
    cfg.update({"character": typed.character.name, "trigger": typed.character.trigger,
                "class_word": typed.character.class_word, "variant": variant, "device": typed.hardware.device})
    return cfg


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    typed = spec_config(spec)
    if typed.train_video is None:
        return []
    section = spec[KIND]
    has_video = any(video_files(s, i, graph) for i, s in enumerate(typed.dataset.sources))  # an empty folder: none
    inputs = _data_inputs(typed.train_video, graph, has_video=has_video)
    hw = typed.hardware
    gpu = hw.stage_gpu.get(KIND) or hw.gpu
    nodes = []
    for variant, ov in variant_runs(typed.train_video, KIND):
        cfg = node_config(section, spec, variant=variant, overrides=ov)
        node = _node(cfg, variant, dict(inputs), gpu, graph)
        nodes.append(with_tracking(_memory_note(node, hw, gpu, graph), spec, graph))
    return nodes


def _data_inputs(section: Any, graph: contract.GraphView, *, has_video: bool) -> dict[str, contract.InputRef]:
    """The caption stage's dataset (images.use) and every video_clips stage's clips (clips.enabled);
    refused when neither can give anything (no image dataset to use, no video source to cut)."""
    inputs: dict[str, contract.InputRef] = {}
    caption = graph.node(contract.node_id(graph.character, "caption"))
    if section.images.use and caption is not None:
        inputs["dataset"] = contract.StageOutputRef(caption.id, "dataset")
    if section.clips.enabled:
        for i, node in enumerate(graph.nodes_of("video_clips")):
            inputs[f"clips{i}"] = contract.StageOutputRef(node.id, "clips")
    if not inputs and not (section.clips.enabled and has_video):
        raise contract.StageError("train_video has nothing to train on: no curated images (train_video.images.use "
                                  "with an image dataset) and no clips (dataset.sources[].video with "
                                  "train_video.clips.enabled)",
                                  hint="Add image or video sources to dataset.sources, or enable images/clips.")
    return inputs


def _node(cfg: dict[str, Any], variant: str | None, inputs: dict[str, contract.InputRef], gpu: str | None,
          graph: contract.GraphView) -> contract.PlanNode:
    from runner.diffusion.video_trainer import VideoTrainerConfig

    node = VideoTrainerConfig.from_dict(cfg)
    fam = family_of(node, graph.project_root)
    if fam is not None:
        _check_frames(node, fam)
    label = (f"{node.base_model} r{node.lora.rank} {_length(node)}, frames {list(node.frame_buckets)} at "
             f"{node.resolution} px")
    if fam is not None:
        label += f" ({fam.title})"
    if variant:
        label += f" (variant {variant})"
    return contract.PlanNode(id=contract.node_id(node.character, KIND, variant), kind=KIND, character=node.character,
                             config=cfg, inputs=inputs, outputs=("lora", "logs"), gpu=gpu, label=label)


def _memory_note(node: contract.PlanNode, hardware: Any, gpu: str | None,
                 graph: contract.GraphView) -> contract.PlanNode:
    """The stage's estimated peak GPU memory at its largest frame bucket and resolution
    (runner.diffusion.memory); a stage that cannot fit its GPU is refused there (exit 2),
    naming the settings and frame counts that would fit."""
    from runner.diffusion import memory
    from runner.diffusion.video_trainer import VideoTrainerConfig

    cfg = VideoTrainerConfig.from_dict(node.config)
    fam = family_of(cfg, graph.project_root)
    if fam is None or cfg.base_model.startswith("builtin:"):
        return node  # unknown family, or a tiny random model: the figures are the real models'
    side = int(cfg.resolution)
    note = memory.video_train_note(node.id, fam, max(int(f) for f in cfg.frame_buckets), side, side,
                                   cfg.memory.to_dict() if cfg.memory else {}, memory.target_of(hardware, gpu),
                                   rank=cfg.lora.rank, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                                   gradient_checkpointing=cfg.gradient_checkpointing, experts=cfg.experts)
    if note:
        node.notes = (*node.notes, note)
    return node


def family_of(node: Any, project_root: Path):
    """The video family of a train_video node, read cheaply (train_video.model_family, a builtin's
    name, a folder's model index, a hub id's pattern); an image model or a contradiction is refused."""
    from runner.diffusion import families
    from runner.diffusion.families import videokit

    ref, named = node.base_model, node.model_family
    if ref.startswith("builtin:"):
        fam = families.by_tiny_name(ref)
        if fam is None or fam.modality != "video":
            known = ", ".join(f"builtin:{f.tiny}" for f in families.all_families("video"))
            what = "unknown" if fam is None else f"{fam.title}, an image model, not a video model"
            raise contract.StageError(f"train_video.base_model {ref} is {what}", hint=f"Use one of {known}.")
    sure = families.family_of_ref(ref, project_root=project_root, guess=False, modality=None)
    if sure is not None and sure.modality != "video":
        raise contract.StageError(f"train_video.base_model {ref} is an image model ({sure.title})",
                                  hint="train_video trains video families; image LoRAs are the train section's.")
    if sure is not None and named not in ("auto", sure.name):
        raise contract.StageError(f"train_video.model_family is {named} but train_video.base_model {ref} is a "
                                  f"{sure.title} model ({sure.name})",
                                  hint=f"Set train_video.model_family to {sure.name} or auto.")
    fam = families.get(named) if named != "auto" else (
        sure or families.family_of_ref(ref, project_root=project_root, modality="video"))
    if fam is not None and not videokit.trainable(fam):
        built = ", ".join(f.name for f in families.all_families("video") if videokit.trainable(f))
        raise contract.StageError(f"train_video: training a LoRA for {fam.title} ({fam.name}) is not built yet",
                                  hint=f"The video families train_video trains: {built}.")
    return fam


def _check_frames(node: Any, fam: Any) -> None:
    from runner.diffusion.video_trainer import frame_rule_problem

    bad = [p for f in node.frame_buckets if (p := frame_rule_problem(int(f), fam.video.temporal))]
    if bad:
        raise contract.StageError(f"train_video.frame_buckets: {'; '.join(bad)} for {fam.title} "
                                  f"({fam.video.frame_rule} frames)",
                                  hint=f"Use frame counts of the form {fam.video.frame_rule}, e.g. 1, "
                                       f"{fam.video.temporal * 2 + 1}, {fam.video.temporal * 4 + 1}.")


def _length(node: Any) -> str:
    steps = sum(p.steps or 0 for p in node.phases) if node.phases else node.steps
    epochs = sum(p.epochs or 0 for p in node.phases)
    return " + ".join(t for t in (f"{steps} steps" if steps else "", f"{epochs} epochs" if epochs else "") if t)


def plan_notes(config: dict[str, Any], upstream: dict[str, contract.Artifact | None]) -> list[str]:
    """What is trained on which data: the family and objective, the data the stage reads."""
    from runner.diffusion.video_trainer import VideoTrainerConfig

    node = VideoTrainerConfig.from_dict(config)
    notes = []
    try:
        fam = family_of(node, Path("."))
    except contract.StageError:
        fam = None
    if fam is not None:
        notes.append(f"model: {fam.describe()}")
        if fam.video and len(fam.video.experts) > 1:
            notes.append(f"experts: {node.experts} ({fam.video.expert_note})")
    data = [f"images as stills{f' (at most {node.images.max})' if node.images.max else ''}"] if node.images.use else []
    clips = [k for k in upstream if k.startswith("clips")]
    if node.clips.enabled and clips:
        data.append(f"clips of up to {node.clips.frames} frames from {len(clips)} video source(s)")
    notes.append(f"data: {' + '.join(data) or 'none'}; frame buckets {list(node.frame_buckets)}")
    return notes


def work_units(config: dict[str, Any]) -> tuple[float, str] | None:
    """Optimizer steps of one execution (the plan's estimates learn seconds per step)."""
    from runner.diffusion.trainer import phases_of
    from runner.diffusion.video_trainer import VideoTrainerConfig

    end = phases_of(VideoTrainerConfig.from_dict(config), None)[-1].end
    return (float(end), "step") if end else None


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report import charts

    lora = outputs["lora"].path
    index = json.loads((lora / "index.json").read_text())
    logs = outputs.get("logs")
    records = read_metrics(logs.path) if logs is not None else []
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    tiny = bool(index.get("tiny_random_model"))
    series = {"loss": loss, **({"validation loss": val} if val else {})}
    chart = charts.line_chart(series, title="Video LoRA training loss" + (" (tiny random model)" if tiny else ""),
                              xlabel="step", ylabel="loss") if loss else None
    variant = index.get("variant")
    return [contract.ReportSection(
        title="Video LoRA" + (f" · variant {variant}" if variant else ""), template="sections/train_video.html.j2",
        anchor="train-video" + (f"-{variant}" if variant else ""),
        context={"index": index, "tiny": tiny, "loss_chart": chart, "config": config,
                 "last_loss": loss[-1][1] if loss else None})]


@contract.register(KIND, version=VERSION, order=55, expand=expand, resume_info=resume_info, report=report_sections,
                   plan_notes=plan_notes, typical_seconds=7200.0, work_units=work_units,
                   description="Train a character LoRA for a video family from stills and clips (diffusers + peft).")
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Train a character LoRA for a video family from stills and clips (diffusers + peft)."""
    from runner.core.device import choose_device
    from runner.diffusion.trainer import Callbacks, TrainError
    from runner.diffusion.video_trainer import VideoLoraTrainer, VideoTrainerConfig

    node = VideoTrainerConfig.from_dict(config)
    dataset = inputs.get("dataset")
    clips = [inputs[k].path for k in sorted(inputs) if k.startswith("clips")]
    cb = Callbacks(log=ctx.log, warn=ctx.warn, metric=ctx.metric, progress=ctx.progress)
    trainer = VideoLoraTrainer(node, dataset_dir=dataset.path if dataset else None, clips_dirs=clips,
                               out_dir=ctx.out_dir, scratch_dir=ctx.scratch_dir, cache_dir=ctx.cache_dir,
                               project_root=ctx.project_root, device=choose_device(node.device), callbacks=cb)
    try:
        index = trainer.run()
    except TrainError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None
    if index.get("tiny_random_model"):
        ctx.warn("trained on a tiny random video model: losses are for testing only")
    return {"lora": contract.Artifact("lora", ctx.out_dir / "lora"),
            "logs": contract.Artifact("logs", ctx.out_dir / "logs")}
