"""The ``train`` stage: LoRA training on the caption stage's dataset (one node per variant).

Node ids: ``<character>:train`` without variants; with variants ``<character>:train[<variant>]``
for each variant, plus ``<character>:train[base]`` when ``include_base_variant``. Each node's
config is the train section with that variant's overrides merged in, so unchanged variants keep
their cache keys. Outputs: ``lora`` (index.json + checkpoints + samples) and ``logs``
(metrics.jsonl + TensorBoard events). Heavy imports live in runner.diffusion.trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.config import view_of
from runner.spec.sections import ReportConfig, TrainConfig, spec_config
from runner.stages.common import read_metrics, variant_runs, with_tracking
from runner.stages.common import training_resume_info as resume_info

KIND = "train"
VERSION = 1


def train_config(section: dict[str, Any], *, character: str, trigger: str, class_word: str,
                 variant: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The node config: the train section with the variant's overrides (precedence: variant over
    phase over section, see runner.spec.variants), plus the character facts the outputs depend on
    (trigger and class word go into samples and file metadata)."""
    from runner.spec.variants import apply_variant

    cfg = apply_variant(section, overrides)
    cfg.update({"character": character, "trigger": trigger, "class_word": class_word, "variant": variant})
    return cfg


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    typed = spec_config(spec)
    char = graph.character
    caption = graph.node(contract.node_id(char, "caption"))
    if typed.train is None or caption is None:
        return []  # no train section, or nothing to train on (no dataset stage in this spec)
    section = spec["train"]  # node configs are built from the section as resolved (cache keys)
    hw = typed.hardware
    gpu = hw.stage_gpu.get(KIND) or hw.gpu
    nodes = []
    for variant, ov in variant_runs(typed.train, KIND):
        cfg = train_config(section, character=char, trigger=typed.character.trigger,
                           class_word=typed.character.class_word, variant=variant, overrides=ov)
        cfg["device"] = hw.device  # torch numerics differ by device: part of the key
        cfg["processes"] = _processes(cfg, hw, gpu)  # unkeyed: they split each step, the LoRA is the same
        cfg["parallel"], why = _strategy(cfg, hw, gpu)  # unkeyed too: ddp or fsdp train the same LoRA
        node = _node(_memory_keyed(cfg), variant, section, caption.id, graph, gpu)
        node.notes = (*node.notes, *_parallel_note(cfg, hw, gpu, why))
        nodes.append(with_tracking(_memory_note(node, hw, gpu), spec, graph))
    return nodes


def _processes(cfg: dict[str, Any], hardware: Any, gpu: str | None) -> int:
    """The data-parallel processes of a train stage run here (hardware.local_processes); the
    counts it runs with here and, when the spec's backend is Modal, on its GPUs (``H100:8``: 8)
    must divide train.gradient_accumulation (each process takes its share of every step's
    micro-batches), and text-encoder training runs in one process. The remote backend sets the
    count of the GPU it calls (runner.backends.remote)."""
    from runner.core.pricing import gpu_count
    from runner.diffusion.trainer import TrainerConfig

    node = TrainerConfig.from_dict(cfg)
    counts = {"hardware.local_processes": hardware.local_processes}
    if hardware.backend == "modal" and gpu:
        counts[f"hardware.stage_gpu.{KIND}" if hardware.stage_gpu.get(KIND) else "hardware.gpu"] = gpu_count(gpu)
    ga = int(node.gradient_accumulation)
    for key, n in counts.items():
        if ga % n:
            raise contract.StageError(
                f"{key} gives {n} data-parallel processes, which split each step's micro-batches, but "
                f"train.gradient_accumulation is {ga}, not a multiple of {n}",
                hint=f"Set train.gradient_accumulation to {n} (or a multiple): the global batch is "
                     "batch_size x gradient_accumulation on any number of GPUs (docs/training.md, Several GPUs).")
        if n > 1 and node.lora.train_text_encoder:
            raise contract.StageError(f"{key} gives {n} processes, but text-encoder LoRAs "
                                      "(train.lora.train_text_encoder) train in one process only",
                                      hint=f"Set {key} to 1, or train.lora.train_text_encoder: false.")
    return int(hardware.local_processes)


def _ranks(hardware: Any, gpu: str | None) -> int:
    """The processes a train stage runs in: the GPU count on Modal, hardware.local_processes here."""
    from runner.core.pricing import gpu_count

    return gpu_count(gpu) if hardware.backend == "modal" and gpu else int(hardware.local_processes)


def _strategy(cfg: dict[str, Any], hardware: Any, gpu: str | None) -> tuple[str, str]:
    """(ddp or fsdp, why) from hardware.parallel (auto: runner.diffusion.memory.parallel_choice);
    fsdp asked for a stage of one process is refused."""
    from runner.diffusion import memory
    from runner.diffusion.trainer import TrainerConfig

    n, setting = _ranks(hardware, gpu), hardware.parallel
    if n == 1:
        if setting == "fsdp":
            raise contract.StageError(
                "hardware.parallel: fsdp shards the denoiser over several processes, but this train stage runs in one",
                hint="Give it several GPUs (hardware.stage_gpu.train: H100:8 on Modal, hardware.local_processes "
                     "here), or set hardware.parallel: auto.")
        return "ddp", ""
    node = TrainerConfig.from_dict(cfg)
    m = node.memory
    if setting == "fsdp" and m is not None and (m.quantize_base != "none" or m.offload_idle
                                                or m.text_encoders == "offload"):
        raise contract.StageError("hardware.parallel: fsdp does not combine with train.memory.quantize_base, "
                                  "offload_idle or text_encoders: offload (they place one GPU's whole model)",
                                  hint="Set those to their defaults, or hardware.parallel: ddp.")
    return memory.parallel_choice(node, memory.target_of(hardware, gpu), n, setting)


def _parallel_note(cfg: dict[str, Any], hardware: Any, gpu: str | None, why: str = "") -> list[str]:
    """'data-parallel: 8 processes on H100:8 ...' for the plan when the spec's backend runs the
    stage on several GPUs (Modal) or processes (here), with the strategy and why."""
    from runner.diffusion.trainer import TrainerConfig

    remote = hardware.backend == "modal" and gpu
    n = _ranks(hardware, gpu)
    if n == 1:
        return []
    node = TrainerConfig.from_dict(cfg)
    ga, bs = int(node.gradient_accumulation), int(node.batch_size)
    where = f"on {gpu} (one per GPU)" if remote else "here (hardware.local_processes)"
    how = ("FSDP, the denoiser sharded over the processes" if node.parallel == "fsdp"
           else "DDP, each process holding the whole model")
    return [f"data-parallel: {n} processes {where}, each {ga // n} of a step's {ga} micro-batches; "
            f"global batch {bs * ga} (batch_size {bs} x gradient_accumulation {ga}), as on one GPU; "
            f"{how} ({why})"]


def _memory_keyed(cfg: dict[str, Any]) -> dict[str, Any]:
    """train.memory left out of the node config when it only repeats the defaults (keys unchanged)."""
    from runner.diffusion.memory import keyed

    return keyed(cfg)


def _memory_note(node: contract.PlanNode, hardware: Any, gpu: str | None) -> contract.PlanNode:
    """The stage's estimated peak GPU memory as a note (runner.diffusion.memory); a stage that
    cannot fit its GPU is refused there (exit 2), naming the settings that would fit."""
    from runner.diffusion import memory
    from runner.diffusion.trainer import TrainerConfig

    cfg = TrainerConfig.from_dict(node.config)
    shards = _ranks(hardware, gpu) if cfg.parallel == "fsdp" else 1  # FSDP: one GPU's shard
    note = memory.plan_note(node.id, cfg, memory.target_of(hardware, gpu), shards)
    if note:
        node.notes = (*node.notes, note)
    return node


def _node(cfg: dict[str, Any], variant: str | None, section: dict[str, Any], caption_id: str,
          graph: contract.GraphView, gpu: str | None) -> contract.PlanNode:
    """The plan node of one train stage with node config ``cfg``."""
    from runner.diffusion.trainer import TrainerConfig
    from runner.spec.variants import variant_notes

    node = TrainerConfig.from_dict(cfg)
    inputs: dict[str, contract.InputRef] = {"dataset": contract.StageOutputRef(caption_id, "dataset")}
    reg = node.regularization
    if reg.enabled and reg.images:
        inputs["regularization"] = contract.FileSetRef(
            root=graph.project_root / reg.images,
            patterns=("*.png", "*.jpg", "*.jpeg", "*.webp", "*.PNG", "*.JPG", "*.JPEG"),
            spec_key="train.regularization.images",
        )
    _family_of(node)  # a contradicting model_family fails the plan
    label = f"{node.base_model} r{node.lora.rank} {_length(node)}"
    if node.phases:
        label += f" in {len(node.phases)} phases"
    if variant:
        label += f" (variant {variant})"
    notes = () if variant in (None, "base") else (f"variant {variant} vs the train section: "
                                                  + "; ".join(variant_notes(section, variant)),)
    return contract.PlanNode(id=contract.node_id(node.character, KIND, variant), kind=KIND,
                             character=node.character, config=cfg, inputs=inputs, outputs=("lora", "logs"),
                             gpu=gpu, label=label, notes=notes, unkeyed=("processes", "parallel"))


def _length(config: TrainConfig | dict[str, Any]) -> str:
    """'1000 steps', '16 epochs', or '500 steps + 6 epochs' (phases in both)."""
    from runner.diffusion.trainer import train_section

    cfg = train_section(config)
    steps = sum(p.steps or 0 for p in cfg.phases) if cfg.phases else cfg.steps
    epochs = sum(p.epochs or 0 for p in cfg.phases)
    return " + ".join(t for t in (f"{steps} steps" if steps else "", f"{epochs} epochs" if epochs else "") if t)


def plan_notes(config: dict[str, Any], upstream: dict[str, contract.Artifact | None]) -> list[str]:
    """The phases in steps and epochs: steps per epoch from the captioned dataset when the store
    holds it (the images left after the validation hold-out, with their repeats, over
    batch_size x gradient_accumulation), else the epoch phases' steps are left open."""
    from runner.diffusion.data import DataError
    from runner.diffusion.trainer import dataset_steps_per_epoch, describe_phases

    dataset = upstream.get("dataset")
    spe, how = None, ""
    if dataset is not None:
        try:
            spe, how = dataset_steps_per_epoch(dataset.path, config)
        except (DataError, OSError):
            pass
    return [describe_phases(config, spe, how), *_family_note(config)]


def _family_note(config: dict[str, Any]) -> list[str]:
    """'model: <family, what is trained, on what objective>' when the family can be told without
    loading weights (train.model_family, or the base model: see :func:`_family_of`)."""
    from runner.diffusion.trainer import TrainerConfig

    fam = _family_of(TrainerConfig.from_dict(config))
    return [f"model: {fam.describe()}"] if fam else []


def _family_of(node: Any):
    """The family of a train node (a TrainerConfig) from train.model_family, or read cheaply from
    the base model (builtin, a folder's model index, a hub id's well-known name); a model_family
    that the model contradicts is refused at plan time, naming both."""
    from runner.diffusion import families

    named = node.model_family
    if node.base_model.startswith("builtin:"):
        any_kind = families.by_tiny_name(node.base_model)
        if any_kind is None or any_kind.modality != "image":
            known = ", ".join(f"builtin:{f.tiny}" for f in families.all_families())
            what = "unknown" if any_kind is None else f"{any_kind.title}, a video model, not an image model"
            raise contract.StageError(f"train.base_model {node.base_model} is {what}", hint=f"Use one of {known}.")
    seen = families.family_of_ref(node.base_model)
    sure = families.family_of_ref(node.base_model, guess=False)  # not a hub id's name
    if sure is not None and named not in ("auto", sure.name):
        raise contract.StageError(f"train.model_family is {named} but train.base_model {node.base_model} "
                                  f"is a {sure.title} model ({sure.name})",
                                  hint=f"Set train.model_family to {sure.name} or auto.")
    return seen if named == "auto" else families.get(named)


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report import charts
    from runner.report.embed import thumbnail_data_uri

    lora = outputs["lora"].path
    index = json.loads((lora / "index.json").read_text())
    logs = outputs.get("logs")
    records = read_metrics(logs.path) if logs is not None else []
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    # a smoothed curve next to the raw one (exponential moving average)
    ema, smooth = None, []
    for s, v in loss:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append((s, ema))
    series = {"loss": loss, "loss (smoothed)": smooth}
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        series["validation loss"] = val
    tiny = bool(index.get("tiny_random_model"))
    tag = " (tiny random model)" if tiny else ""
    loss_chart = charts.line_chart(series, title="Training loss" + tag, xlabel="step", ylabel="loss") if loss else None
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    lr_chart = charts.line_chart({"learning rate": lr}, title="Learning rate", xlabel="step") if lr else None
    px = view_of(ReportConfig, env).thumbnail_px
    prompts = index.get("sample_prompts", [])
    seeds = index.get("sample_seeds", [])
    rows = []
    for h in index.get("history", []):
        cells = []
        for rel in h.get("samples", []):
            f = lora / rel
            cells.append({"src": thumbnail_data_uri(f, px) if f.is_file() else None, "name": Path(rel).name})
        rows.append({"step": h["step"], "phase": h["phase"], "val_loss": h.get("val_loss"), "cells": cells})
    kept = {c["step"]: c for c in index.get("checkpoints", [])}
    final = index["checkpoints"][index["final"]] if index.get("checkpoints") else None
    variant = index.get("variant")
    title = "Training" + (f" · variant {variant}" if variant else "")
    return [contract.ReportSection(
        title=title,
        template="sections/train.html.j2",
        anchor="train" + (f"-{variant}" if variant else ""),
        context={
            "index": index, "tiny": tiny, "loss_chart": loss_chart, "lr_chart": lr_chart, "rows": rows,
            "prompts": prompts, "seeds": seeds, "kept": kept, "final": final, "config": config,
            "last_loss": loss[-1][1] if loss else None,
        },
    )]


def track(config: dict[str, Any], outputs: dict[str, contract.Artifact], env: dict[str, Any]) -> list[dict[str, Any]]:
    """One tracked run: the node config as params, every numeric field of the logged history as a
    curve (loss, lr, val_loss, grad_norm, ...), each kept checkpoint's LoRA files as artifacts."""
    from runner.diffusion.trainer import TrainerConfig
    from runner.stages.common import track as send
    from runner.tracking import StageLog

    lora, logs = outputs["lora"].path, outputs["logs"].path
    index = json.loads((lora / "index.json").read_text())
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in read_metrics(logs):
        for name, value in rec.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, []).append((int(rec["step"]), float(value)))
    summary = {f"final_{n}": pts[-1][1] for n, pts in series.items() if n in ("loss", "val_loss")}
    summary["total_steps"] = float(index.get("total_steps") or 0)
    files = [(lora / Path(ck["diffusers"]).parent, f"lora/{Path(ck['diffusers']).parent.name}")
             for ck in index.get("checkpoints", [])]
    files += [(lora / "index.json", "lora"), (logs / "metrics.jsonl", "logs")]
    log = StageLog(name=f"{env['stage_id']} {env['run_id']}", kind=KIND,
                   params={k: v for k, v in config.items() if k != "tracking"},
                   tags={"runner.variant": str(TrainerConfig.from_dict(config).variant or "")},
                   series=series, metrics=summary, artifacts=files)
    return send(config, log, env)


def work_units(config: dict[str, Any]) -> tuple[float, str] | None:
    """Optimizer steps of one execution (the plan's estimates learn seconds per step); None when a
    phase is given in epochs (its steps are known once the dataset is)."""
    from runner.diffusion.trainer import phases_of

    end = phases_of(config, None)[-1].end
    return (float(end), "step") if end else None


@contract.register(KIND, version=VERSION, order=50, expand=expand, resume_info=resume_info, report=report_sections,
               plan_notes=plan_notes, track=track, typical_seconds=5400.0, work_units=work_units,
               description="Train a LoRA (diffusers + peft) with cached latents, phases, checkpoints and samples.")
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Train a LoRA (diffusers + peft) with cached latents, phases, checkpoints and samples."""
    from runner.core.device import choose_device
    from runner.diffusion.trainer import Callbacks, LoraTrainer, TrainerConfig, TrainError

    if "dataset" not in inputs:
        raise contract.StageError("the train stage needs the caption stage's `dataset` artifact")
    reg = inputs.get("regularization")
    cb = Callbacks(log=ctx.log, warn=ctx.warn, metric=ctx.metric, progress=ctx.progress)
    node = TrainerConfig.from_dict(config)
    paths = {"dataset_dir": inputs["dataset"].path, "out_dir": ctx.out_dir, "scratch_dir": ctx.scratch_dir,
             "cache_dir": ctx.cache_dir, "project_root": ctx.project_root,
             "regularization_dir": reg.path if reg else None}
    device = choose_device(node.device)
    try:
        if node.processes > 1:  # data-parallel: N ranks of the same trainer (runner.diffusion.parallel)
            from runner.diffusion.parallel import train_data_parallel

            index = train_data_parallel(node.to_dict(), node.processes, paths=paths, device=device, callbacks=cb,
                                        setting="hardware.local_processes (on Modal: the GPU count)")
        else:
            index = LoraTrainer(node, **paths, device=device, callbacks=cb).run()
    except TrainError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None
    if index.get("tiny_random_model"):
        ctx.warn("trained on a tiny random model: losses and samples are for testing only")
    return {
        "lora": contract.Artifact("lora", ctx.out_dir / "lora"),
        "logs": contract.Artifact("logs", ctx.out_dir / "logs"),
    }
