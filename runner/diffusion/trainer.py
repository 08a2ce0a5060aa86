"""The LoRA trainer behind the ``train`` stage (diffusers + peft + accelerate).

Reading order of :meth:`LoraTrainer.run`:

1. load the base model (any of the forms :func:`runner.diffusion.models.load_pipeline` takes);
2. read the dataset, hold out validation images, assign aspect buckets, make caption variants;
3. fill the latent and text-embedding caches (shared across variants and phases), and the
   prior-preservation class images when asked;
4. attach the LoRA adapters (the family's denoiser, optionally CLIP text encoders), restore the
   last resume state;
5. run the phases: per optimizer step, ``gradient_accumulation`` micro-batches drawn by the
   phase's weighted sampler; the family's objective (epsilon/v with min-SNR weighting for UNet
   families, flow matching for DiT families: :func:`runner.diffusion.families.training_loss`),
   noise offset, caption dropout, prior loss;
6. every N steps and at the end of each phase: a checkpoint (diffusers/peft file + kohya file),
   samples at fixed seeds, validation loss at fixed timesteps, then the resume state (atomic);
7. copy the kept checkpoints, samples and logs into the output folder with ``index.json``.

Configuration: a :class:`TrainerConfig`, the typed view of the train stage's node config (the
train section with a variant's overrides, plus the character's trigger, class word and name). The
trainer keeps no default of its own: what the node config leaves out is the schema's default.

Resume: randomness of a step (batch choice, noise, timesteps, caption variant, dropout of the
caption, LoRA dropout) is a pure function of (seed, phase, position), so resuming from a
checkpoint replays the same steps; the global torch/numpy/python RNG states are saved and
restored too.

Data-parallel (runner.diffusion.parallel launches N processes of this trainer): rank r computes
its ``gradient_accumulation / N`` of every step's micro-batches, the denoiser's LoRA gradients are
all-reduced by DDP, and rank 0 alone writes; N processes train what one trains. With FSDP
(``parallel: fsdp``) the denoiser is sharded over the ranks instead (torch's ``fully_shard``, one
unit per block); checkpoints (samples, validation loss, the LoRA gathered whole) run on every rank
in step, rank 0 alone writing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from runner.core.errors import UserError
from runner.core.fs import atomic_path, atomic_write_text, replace_folder
from runner.diffusion.data import (
    BatchSampler,
    DataError,
    Example,
    assign_bucket,
    bucket_settings,
    caption_variants,
    mix_summary,
    mix_weights,
    read_dataset,
    split_validation,
)
from runner.spec.config import fields, node_field, schema_config
from runner.spec.config import schema_default as _schema_default
from runner.spec.sections import PhaseConfig, TrainConfig, TrainVideoConfig

STATE_DIR = "state"
STATE_FILE = "resume.pt"
STATE_META = "resume.json"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNKEYED = ("processes", "parallel")  # node config keys a resume state does not depend on
COLLECTIVE_TIMEOUT_H = 3  # data-parallel ranks wait this long for each other (caches, samples on rank 0)


class TrainError(UserError):
    """Training cannot go on (bad data, a model that does not load, a loss that diverged)."""


@schema_config("train")
class TrainerConfig(TrainConfig):
    """What the trainer reads: the train stage's node config, i.e. the train section with the
    variant's overrides (every default the schema's) plus the facts of the character that go into
    samples and file metadata (runner.stages.train.train_config writes them)."""

    character: str = node_field()
    trigger: str = node_field()
    class_word: str = node_field(_schema_default("character", "class_word"))
    variant: str | None = node_field(None)
    device: str = node_field(_schema_default("hardware", "device"))
    tracking: Mapping[str, Any] | None = node_field(None)  # unkeyed: trackers of the run
    # unkeyed: data-parallel processes (hardware.local_processes here, the GPU count on Modal);
    # they split each step's micro-batches, so the LoRA does not depend on them
    processes: int = node_field(1)
    # unkeyed: with several processes, ddp or fsdp (the plan resolves hardware.parallel: auto from
    # the memory estimate; auto left here means ddp); the LoRA is the same either way
    parallel: str = node_field(_schema_default("hardware", "parallel"))


def _whole(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` with FSDP's sharded ones (DTensor) gathered whole: a collective, so every rank
    of an FSDP run calls it, in the same order; plain tensors as they are."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in tensors.items()}


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big") & ((1 << 63) - 1)


def train_section(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """The train section of a node config (its stage keys set aside) or of a section mapping
    (a train_video section's typed view is taken as it is: phases and steps mean the same)."""
    if isinstance(config, (TrainConfig, TrainVideoConfig)):
        return config
    stage_keys = {f.name for f in fields(TrainerConfig) if f.node}
    return TrainConfig.from_dict({k: v for k, v in config.items() if k not in stage_keys})


def config_digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_resume_meta(scratch_dir: Path) -> dict[str, Any] | None:
    p = Path(scratch_dir) / STATE_DIR / STATE_META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Phase:
    """One phase, in optimizer steps. ``epochs`` is set when the spec gave the phase in epochs;
    ``steps`` and ``start`` are None only at plan time, before the dataset size is known."""

    name: str
    steps: int | None
    lr: float
    mix: Any
    start: int | None = 0
    epochs: int | None = None

    @property
    def end(self) -> int | None:
        return None if self.start is None or self.steps is None else self.start + self.steps


def epoch_steps(examples: list[Example], batch_size: int, gradient_accumulation: int) -> int:
    """Optimizer steps of one epoch: every training image once, counting its repeats, in steps
    of batch_size x gradient_accumulation images (the last one may be partial)."""
    return max(1, math.ceil(sum(e.repeats for e in examples) / (batch_size * gradient_accumulation)))


def phases_of(config: TrainConfig | Mapping[str, Any], steps_per_epoch: int | None) -> list[Phase]:
    """The phases of a train config in steps: a phase given in epochs takes epochs x
    ``steps_per_epoch`` steps (unknown, None, at plan time before the dataset is captioned)."""
    cfg = train_section(config)
    out: list[Phase] = []
    start: int | None = 0
    for p in cfg.phases or (PhaseConfig(name="main", steps=cfg.steps),):
        steps = p.steps if p.epochs is None else (p.epochs * steps_per_epoch if steps_per_epoch else None)
        ph = Phase(name=p.name, steps=steps, lr=float(p.lr or cfg.lr), mix=p.mix, start=start, epochs=p.epochs)
        out.append(ph)
        start = ph.end
    return out


def dataset_steps_per_epoch(dataset_dir: Path, config: TrainConfig | Mapping[str, Any]) -> tuple[int, str]:
    """(steps per epoch, how) for the caption stage's dataset folder and a train config: the
    images the trainer keeps after its validation hold-out, as :meth:`LoraTrainer.run` counts."""
    cfg = train_section(config)
    train_ex, _ = split_validation(read_dataset(dataset_dir), cfg.checkpoints.validation_fraction, cfg.seed)
    bs, ga = cfg.batch_size, cfg.gradient_accumulation
    n = epoch_steps(train_ex, bs, ga)
    return n, (f"{len(train_ex)} training images, {sum(e.repeats for e in train_ex)} with repeats, "
               f"/ (batch {bs} x accumulation {ga})")


def describe_phases(config: TrainConfig | Mapping[str, Any], steps_per_epoch: int | None, how: str = "") -> str:
    """One line for the plan: each phase in steps and epochs."""
    cfg = train_section(config)
    parts = []
    for ph in phases_of(cfg, steps_per_epoch):
        if ph.start is None or ph.steps is None:  # an epoch phase (or one after it) before the data is known
            parts.append(f"{ph.name} {ph.epochs or ph.steps} {'epochs' if ph.epochs else 'steps'}")
            continue
        text = f"{ph.name} steps {ph.start + 1}-{ph.end}"
        if steps_per_epoch:
            text += " = " + _epoch_span(ph.start, ph.end, steps_per_epoch)
        parts.append(text)
    if steps_per_epoch:
        return f"phases: {'; '.join(parts)} ({steps_per_epoch} steps per epoch: {how})"
    if not any(p.epochs for p in cfg.phases):
        return f"phases: {'; '.join(parts)} (epochs known once the caption stage has run)"
    return (f"phases: {'; '.join(parts)} (steps of phases in epochs are known once the caption stage has run: "
            "ceil(images x repeats after the validation hold-out / (batch_size x gradient_accumulation)) per epoch)")


def _epoch_span(start: int, end: int, steps_per_epoch: int) -> str:
    """'epochs 7-12' for whole epochs, '83.3 epochs' otherwise."""
    if start % steps_per_epoch == 0 and end % steps_per_epoch == 0:
        first, last = start // steps_per_epoch + 1, end // steps_per_epoch
        return f"epoch {last}" if first == last else f"epochs {first}-{last}"
    return f"{(end - start) / steps_per_epoch:.1f} epochs"


class _Forwarding:
    """A DDP-wrapped module as the family code sees it: calls go through the wrapper (gradient
    sync), attributes (config, dtype, device) come from the module itself."""

    def __init__(self, ddp: Any) -> None:
        self._ddp = ddp

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self._ddp(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ddp.module, name)


class Callbacks:
    """What the trainer reports through (the stage passes ctx methods in)."""

    def __init__(self, *, log: Callable = None, warn: Callable = None, metric: Callable = None,
                 progress: Callable = None) -> None:
        self.log = log or (lambda msg, **kw: None)
        self.warn = warn or (lambda msg, **kw: None)
        self.metric = metric or (lambda name, value, step=None: None)
        self.progress = progress  # progress(total, desc) -> handle with update()/close()

    def bar(self, total: int, desc: str):
        class _Null:
            def update(self, n: int = 1, **kw: Any) -> None: ...

            def close(self) -> None: ...

        return self.progress(total, desc) if self.progress else _Null()


class LoraTrainer:
    config_class: type = TrainerConfig  # the node config's typed view (VideoLoraTrainer: train_video's)

    def __init__(
        self,
        config: TrainerConfig | Mapping[str, Any],
        *,
        dataset_dir: Path,
        out_dir: Path,
        scratch_dir: Path,
        cache_dir: Path,
        project_root: Path | None = None,
        regularization_dir: Path | None = None,
        device: str = "auto",
        callbacks: Callbacks | None = None,
        stop_after_step: int | None = None,
    ) -> None:
        self.cfg = self.config_class.from_dict(config)
        # resume states carry this digest; the node config as given, so a state written before
        # the typed view still resumes
        given = config if isinstance(config, Mapping) else self.cfg.to_dict()
        self.digest = config_digest({k: v for k, v in given.items() if k not in UNKEYED})
        self.dataset_dir = Path(dataset_dir)
        self.out_dir = Path(out_dir)
        self.scratch = Path(scratch_dir)
        self.cache_dir = Path(cache_dir)
        self.project_root = project_root
        self.reg_dir = regularization_dir
        self.cb = callbacks or Callbacks()
        self.stop_after_step = stop_after_step  # tests: simulate a crash after this step
        from runner.core.device import choose_device

        self.device = device = choose_device(device)
        self.mixed_precision = self.cfg.mixed_precision if device.startswith("cuda") else "no"
        self.timings: dict[str, float] = {}
        self.fsdp = False  # one process until the accelerator says otherwise (_new_accelerator)

    # ------------------------------------------------------------------------------------
    # 1. model
    def _load_model(self) -> None:
        import torch

        from runner.diffusion import families
        from runner.diffusion.memory import Placement
        from runner.diffusion.models import ModelLoadError, family_of, load_pipeline, model_fingerprint

        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)
        self.placement = Placement(self.cfg.memory, self.device, sharded=self.fsdp)  # train.memory (memory.py)
        try:
            self.pipe = load_pipeline(self.cfg.base_model, family=self.cfg.model_family,
                                      device=self.placement.load_device, dtype=self.weight_dtype,
                                      cache_dir=self.cache_dir, project_root=self.project_root)
            self.model_fp = model_fingerprint(self.cfg.base_model, cache_dir=self.cache_dir,
                                              project_root=self.project_root)
        except ModelLoadError as exc:
            raise TrainError(f"train.base_model: {exc}", hint=exc.hint) from None
        self.fam = families.get(family_of(self.pipe))
        self._place_components()
        self.family = self.fam.name
        self.tiny = self.cfg.base_model.startswith("builtin:")
        self.c = families.components_of(self.pipe, self.fam, self._objective())
        self.denoiser = self.c.denoiser
        self.vae = self.pipe.vae
        encoders = (getattr(self.pipe, name, None) for name in self.fam.text.encoders)
        self.text_encoders = [m for m in encoders if m is not None]
        for m in (self.denoiser, self.vae, *self.text_encoders):
            m.requires_grad_(False)
        self.noise_scheduler = self.c.scheduler
        self._use_sdpa()
        self.multiple = self.fam.multiple_of(self.pipe)  # what the bucket sides must be divisible by

    def _place_components(self) -> None:
        """train.memory before anything runs: the frozen denoiser quantized to 8 bits (torchao),
        every component on the device for caching (runner.diffusion.memory.Placement)."""
        memory = self.placement.m
        if memory.text_encoders != "keep" and self.cfg.lora.train_text_encoder:
            raise TrainError(f"train.memory.text_encoders: {memory.text_encoders} frees the text encoders, "
                             "which train.lora.train_text_encoder trains",
                             hint="Set train.memory.text_encoders: keep, or train.lora.train_text_encoder: false.")
        try:
            self.placement.place(self.pipe, self.fam)
        except UserError as exc:
            raise TrainError(exc.message, hint=exc.hint) from None

    def _after_caches(self) -> None:
        """train.memory once the caches are filled: text encoders offloaded or freed, the VAE off
        the device (see Placement.after_caches)."""
        left = self.placement.after_caches(self.pipe, self.fam)
        self.text_encoders = [getattr(self.pipe, n) for n in left]
        for line in self.placement.done:
            self.cb.log(f"memory: {line}")

    def _objective(self):
        """The family's training objective with the spec's noise offset, min-SNR gamma (which
        only weighs epsilon/v objectives) and the ``train.objective`` knobs that are set."""
        from dataclasses import replace

        knobs = {k: v for k, v in (self.cfg.objective.to_dict() if self.cfg.objective else {}).items()
                 if v is not None}
        if knobs and self.fam.objective.prediction != "flow":
            raise TrainError(f"train.objective.{', '.join(sorted(knobs))}: {self.fam.title} trains epsilon/v "
                             "prediction, not flow matching, so these knobs would change nothing",
                             hint="Remove train.objective (min_snr_gamma and noise_offset tune UNet families).")
        return replace(self.fam.objective, noise_offset=float(self.cfg.noise_offset),
                       min_snr_gamma=self.cfg.min_snr_gamma or None, **knobs)

    def _use_sdpa(self) -> None:
        """Attention through torch's scaled_dot_product_attention (flash / memory-efficient
        kernels on GPU). diffusers picks it by default; a model saved with the classic processor
        is switched over."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        procs = getattr(self.denoiser, "attn_processors", {})
        if any(type(p) is AttnProcessor for p in procs.values()):
            self.denoiser.set_attn_processor(AttnProcessor2_0())
            procs = self.denoiser.attn_processors
        self.attention = sorted({type(p).__name__ for p in procs.values()}) or ["sdpa"]

    # ------------------------------------------------------------------------------------
    # 2. data
    def _prepare_data(self) -> None:
        cfg = self.cfg
        try:
            examples = read_dataset(self.dataset_dir)
        except DataError as exc:
            raise TrainError(str(exc), hint=exc.hint) from None
        ck = cfg.checkpoints
        self.train_ex, self.val_ex = split_validation(examples, ck.validation_fraction, cfg.seed)
        if not self.train_ex:
            raise TrainError("no training image left after holding out validation images",
                             hint="Lower train.checkpoints.validation_fraction or add images.")
        self.bucket_settings = bucket_settings(cfg.resolution, cfg.buckets, multiple=self.multiple)
        self.buckets = self.bucket_settings.buckets()
        from PIL import Image

        for e in (*self.train_ex, *self.val_ex):
            if not (e.width and e.height):
                with Image.open(e.image) as im:
                    e.width, e.height = im.size
            e.bucket = assign_bucket(e.width, e.height, self.buckets)
        n_var = cfg.caption_variants if cfg.shuffle_tags else 1
        for e in self.train_ex:
            e.captions = caption_variants(e.caption, n=n_var, shuffle=cfg.shuffle_tags,
                                          keep_tokens=cfg.keep_tokens, seed=cfg.seed, key=e.id)
        for e in self.val_ex:
            e.captions = [e.caption]
        self.bs = cfg.batch_size
        self.ga = cfg.gradient_accumulation
        self.steps_per_epoch = epoch_steps(self.train_ex, self.bs, self.ga)
        self.phases = phases_of(cfg, self.steps_per_epoch)
        self.total_steps = self.phases[-1].end
        self.every = ck.every_epochs * self.steps_per_epoch if ck.every_epochs else ck.every_steps

    # ------------------------------------------------------------------------------------
    # 3. caches
    def _encode_images(self, images, bucket):
        import numpy as np
        import torch

        pixels = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
        raw = self.fam.images_to_raw(self.pipe, torch.from_numpy(pixels).permute(0, 3, 1, 2))
        return raw["mean"], raw["std"]

    def _encode_text(self, captions: list[str], *, grad: bool = False):
        """Caption embeddings: one dict per caption for the cache, or (``grad``: the text
        encoders train) the batch collated, with gradients."""
        if grad:
            return self.fam.encode_text(self.pipe, list(captions))
        return self.fam.encode_captions(self.pipe, list(captions))

    def _class_prompt(self) -> str:
        return self.cfg.regularization.prompt or f"a photo of a {self.cfg.class_word}"

    def _regularization_images(self) -> list[Path]:
        """Class images from the given folder, or generated once by the base model (cached)."""
        from runner.buildcache import file_lock

        reg = self.cfg.regularization
        exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        if self.reg_dir is not None:
            from runner.paths import list_files  # what the plan digested: hidden names skipped

            files = [p for p in list_files(self.reg_dir) if p.suffix.lower() in exts]
            if not files:
                raise TrainError(f"train.regularization.images: no image found in {self.reg_dir}",
                                 hint="Put class images (png/jpg) there, or set it to null to generate them.")
            return files
        count, res, steps, seed = reg.count, self.cfg.resolution, reg.steps, self.cfg.seed
        prompt = self._class_prompt()
        parts = [self.model_fp, prompt, count, res, steps, seed]
        quantized = self.placement.m.quantize_base
        if quantized != "none":  # a quantized base draws other images (unquantized: the key as before)
            parts.append(quantized)
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        folder = self.cache_dir / "train" / self.model_fp / "class-images" / key
        done = folder / "done.json"
        if not done.is_file():
            with file_lock(folder.parent / f".{key}.lock"):
                if not done.is_file():
                    from runner.diffusion.generate import generate_images

                    folder.mkdir(parents=True, exist_ok=True)
                    bar = self.cb.bar(count, "generating class images")
                    seeds = [seed * 100003 + i for i in range(count)]
                    for s in range(0, count, 4):
                        chunk = seeds[s:s + 4]
                        imgs = generate_images(self.pipe, [prompt], seeds=chunk, steps=steps,
                                               guidance=self.fam.sample.guidance, width=res, height=res,
                                               batch_size=4)
                        for seed, im in zip(chunk, imgs):
                            im.save(folder / f"class-{seed}.png")
                        bar.update(len(chunk))
                    bar.close()
                    atomic_write_text(done, json.dumps({"prompt": prompt, "count": count,
                                                        "tiny_random_model": self.tiny}))
        return sorted(folder.glob("class-*.png"))

    def _fill_caches(self) -> None:
        import torch

        from runner.diffusion.caches import TrainCache, load_entry

        t0, c0 = time.perf_counter(), time.process_time()
        self.cache = TrainCache(self.cache_dir, self.model_fp)
        self.reg_ex: list[Example] = []
        if self.cfg.regularization.enabled:
            from PIL import Image

            for p in self._regularization_images():
                with Image.open(p) as im:
                    w, h = im.size
                self.reg_ex.append(Example(id=p.stem, image=p, caption=self._class_prompt(), shot="medium",
                                           categories=["medium"], width=w, height=h, is_regularization=True,
                                           bucket=assign_bucket(w, h, self.buckets), captions=[self._class_prompt()]))
        all_ex = [*self.train_ex, *self.val_ex, *self.reg_ex]
        bar = self.cb.bar(len(all_ex), "caching latents")
        try:
            paths = self.cache.ensure_latents([(e.image, e.bucket) for e in all_ex], self._encode_images,
                                              batch_size=8, progress=bar)
        except DataError as exc:
            raise TrainError(str(exc), hint=exc.hint) from None
        bar.close()
        self.latents = {id(e): load_entry(p) for e, p in zip(all_ex, paths)}
        self.train_te = self.cfg.lora.train_text_encoder
        self.text: dict[str, dict[str, torch.Tensor]] = {}
        if not self.train_te:
            captions = [c for e in all_ex for c in e.captions]
            captions += [e.caption for e in all_ex]
            if self.cfg.caption_dropout > 0:
                captions.append("")
            self._cache_text(captions)
        self._caches_done(t0, c0)

    def _cache_text(self, captions: list[str]) -> None:
        """``self.text``: the cached embeddings of every caption (encoded once, shared by runs)."""
        from runner.diffusion.caches import load_entry

        bar = self.cb.bar(len(set(captions)), "caching text embeddings")
        tpaths = self.cache.ensure_text(captions, lambda caps: self._encode_text(caps), progress=bar)
        bar.close()
        self.text = {c: load_entry(p) for c, p in tpaths.items()}

    def _caches_done(self, t0: float, c0: float) -> None:
        """The caching time (wall, CPU) into the timings, and the hits and misses into the log."""
        self.timings["cache_s"] = time.perf_counter() - t0
        self.timings["cache_cpu_s"] = time.process_time() - c0
        self.cb.log(f"caches: latents {self.cache.hits['latents']} hit / {self.cache.misses['latents']} encoded, "
                    f"text {self.cache.hits['text']} hit / {self.cache.misses['text']} encoded",
                    hits=self.cache.hits, misses=self.cache.misses)

    # ------------------------------------------------------------------------------------
    # 4. adapters
    def _attach_lora(self) -> None:
        import torch
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from runner.diffusion import families

        lcfg = self.cfg.lora
        self.rank = lcfg.rank
        self.alpha = float(lcfg.alpha if lcfg.alpha is not None else self.rank)
        targets = list(lcfg.target_modules or self.fam.lora_targets)
        try:  # seeded: the same initial A matrices on every run
            families.add_lora(self.c, rank=self.rank, alpha=self.alpha, targets=targets, dropout=float(lcfg.dropout),
                              seed=_h(self.cfg.seed, "lora-init"))
        except UserError as exc:
            raise TrainError(f"train.lora.target_modules: {exc.message}", hint=exc.hint) from None
        self._check_comfy_names()
        self.trained = [self.denoiser]
        if self.train_te:
            if self.fam.encode_text is None:
                raise TrainError(f"train.lora.train_text_encoder: the {self.fam.title} text encoders "
                                 f"({', '.join(self.fam.text.encoders)}) are not trained by the runner",
                                 hint="Set train.lora.train_text_encoder to false (only the denoiser is trained).")
            for te in self.text_encoders:
                te.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=float(lcfg.dropout),
                                          init_lora_weights="gaussian", target_modules=TE_TARGETS))
                self.trained.append(te)
        if self.weight_dtype != torch.float32:
            cast_training_params(self.trained, dtype=torch.float32)  # LoRA weights train in fp32
        if self.cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if self.train_te:
                for te in self.text_encoders:
                    te.gradient_checkpointing_enable()
        self.denoiser.train()
        for te in self.text_encoders:
            te.train(self.train_te)

    def _check_comfy_names(self) -> None:
        """Before the first step: every adapted module has a name in the ComfyUI file (a target
        without one would fail at the first checkpoint)."""
        from peft.utils import get_peft_model_state_dict

        from runner.diffusion.families.comfykit import NoNativeName
        from runner.diffusion.kohya import peft_to_kohya

        if self.fam.comfy is None:
            return
        try:
            peft_to_kohya(get_peft_model_state_dict(self.denoiser), family=self.family,
                          unet_config=self.denoiser.config, alpha=self.alpha)
        except NoNativeName as exc:
            raise TrainError(f"train.lora.target_modules: {exc.message}", hint=exc.hint) from None

    def _lora_state(self) -> dict[str, dict]:
        """peft state dicts by pipeline component: the denoiser's, and the text encoders' when
        they train (the resume state and the LoRA files are written from it)."""
        from peft.utils import get_peft_model_state_dict

        out = {self.fam.denoiser: _whole(get_peft_model_state_dict(self.denoiser))}
        if self.train_te:
            for name, te in zip(self.fam.text.encoders, self.text_encoders):
                out[name] = get_peft_model_state_dict(te)
        return out

    def _load_lora_state(self, state: dict[str, dict]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.denoiser, state[self.fam.denoiser])
        for name, te in zip(self.fam.text.encoders, self.text_encoders):
            if name in state:
                set_peft_model_state_dict(te, state[name])

    def _param_groups(self, phase: Phase) -> list[dict]:
        groups = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr": phase.lr}]
        if self.train_te:
            te_lr = self.cfg.lora.text_encoder_lr
            te_lr = phase.lr if te_lr is None else float(te_lr) * phase.lr / float(self.cfg.lr)
            params = [p for te in self.text_encoders for p in te.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": te_lr})
        return groups

    def _optimizer(self, phase: Phase):
        import torch

        name = self.cfg.optimizer
        groups = self._param_groups(phase)
        kw = dict(betas=(0.9, 0.999), weight_decay=float(self.cfg.weight_decay), eps=1e-8)
        if name == "adamw8bit":
            try:
                if not self.device.startswith("cuda"):
                    raise ImportError("8-bit AdamW needs a CUDA device")
                import bitsandbytes as bnb

                self.optimizer_name = "adamw8bit"
                return bnb.optim.AdamW8bit(groups, **kw)
            except ImportError as exc:
                if not getattr(self, "_warned_8bit", False):
                    self.cb.warn(f"optimizer adamw8bit unavailable ({exc}); using torch AdamW")
                    self._warned_8bit = True
        self.optimizer_name = "adamw"
        return torch.optim.AdamW(groups, **kw)

    def _lr_scheduler(self, optimizer, phase: Phase):
        from diffusers.optimization import get_scheduler

        s = self.cfg.lr_scheduler
        return get_scheduler(s.name, optimizer, num_warmup_steps=min(s.warmup_steps, phase.steps),
                             num_training_steps=phase.steps, num_cycles=s.num_cycles)

    # ------------------------------------------------------------------------------------
    # 5. the loss of one micro-batch
    def _batch(self, examples: list[Example], gen, *, fixed_caption: bool = False, noise=None, timesteps=None):
        """The micro-batch of ``examples``: a latent sampled from each cached distribution (model
        latents of the family), a caption variant each (or the empty caption, dropped), their
        embeddings, and the size/crop conditioning (SDXL reads it as time ids)."""
        import torch

        from runner.diffusion.families import Batch

        entries = [self.latents[id(e)] for e in examples]
        mean = torch.stack([x["mean"] for x in entries])
        std = torch.stack([x["std"] for x in entries])
        latents = self.fam.to_model_latents(self.pipe, mean + std * torch.randn(mean.shape, generator=gen))
        caps = [self._caption(e, gen, fixed_caption) for e in examples]
        if self.train_te:
            text = self._encode_text(caps, grad=True)
        else:
            text = self.fam.collate([self.text[c] for c in caps])
        time_ids = torch.stack([torch.cat([x["original_size"], x["crop_top_left"], x["target_size"]])
                                for x in entries]).float()
        return Batch(latents=latents.to(self.device), text=text, extra={"time_ids": time_ids}, generator=gen,
                     noise=noise, timesteps=timesteps)

    def _caption(self, e: Example, gen, fixed: bool) -> str:
        """A caption variant of ``e`` drawn from ``gen`` (its first when ``fixed``), or the empty
        caption with probability ``caption_dropout``."""
        import torch

        vary = len(e.captions) > 1 and not fixed
        k = int(torch.randint(len(e.captions), (1,), generator=gen)) if vary else 0
        drop = float(self.cfg.caption_dropout)
        if drop > 0 and not fixed and not e.is_regularization and float(torch.rand((), generator=gen)) < drop:
            return ""
        return e.captions[k]

    def _loss(self, examples: list[Example], gen, *, timesteps=None, noise=None, weighted: bool = True):
        """The mean loss of one micro-batch under the family's objective (noise and timesteps
        drawn from ``gen`` unless given)."""
        from runner.diffusion import families

        batch = self._batch(examples, gen, fixed_caption=timesteps is not None, noise=noise, timesteps=timesteps)
        with self.accelerator.autocast():
            return families.training_loss(self.c, batch, weighted=weighted).mean()

    def validation_loss(self, examples: list[Example] | None = None) -> float | None:
        """Unweighted MSE on the held-out images (or ``examples``) at fixed timesteps with fixed
        noise: comparable across checkpoints, variants and runs of the same data."""
        import torch

        examples = self.val_ex if examples is None else examples
        if not examples:
            return None
        ts = self._validation_timesteps()
        self._eval_mode(True)
        total, n = 0.0, 0
        with torch.no_grad():
            for t in ts:
                for e in examples:
                    gen = torch.Generator().manual_seed(_h(self.cfg.seed, "val", e.id, t))
                    shape = self.fam.to_model_latents(self.pipe, self.latents[id(e)]["mean"][None]).shape
                    noise = torch.randn(shape, generator=gen)
                    total += float(self._loss([e], gen, timesteps=torch.tensor([t]), noise=noise, weighted=False))
                    n += 1
        self._eval_mode(False)
        return total / max(1, n)

    def _validation_timesteps(self) -> list[int]:
        """checkpoints.validation_timesteps, within the scheduler's range (the outer loop of
        :meth:`validation_loss`)."""
        top = self.noise_scheduler.config.num_train_timesteps - 1
        return [min(int(t), top) for t in self.cfg.checkpoints.validation_timesteps]

    def _eval_mode(self, on: bool) -> None:
        for m in self.trained:
            m.train(not on)

    # ------------------------------------------------------------------------------------
    # 6. checkpoints
    def _stem(self) -> str:
        char, variant = self.cfg.character, self.cfg.variant
        return f"{char}-{variant}" if variant else char

    def _sample_prompts(self) -> list[str]:
        trig, cls = self.cfg.trigger, self.cfg.class_word
        prompts = self.cfg.checkpoints.sample_prompts
        return [p.replace("{trigger}", trig).replace("{class}", cls).strip() for p in prompts]

    def _samples(self, folder: Path) -> list[str]:
        from runner.diffusion.generate import generate_images

        ck = self.cfg.checkpoints
        prompts, seeds = self._sample_prompts(), [int(s) for s in ck.sample_seeds]
        if not prompts or not seeds or self.placement.freed:  # freed text encoders cannot encode prompts
            return []
        pairs = [(pi, p, s) for pi, p in enumerate(prompts) for s in seeds]
        res = self.cfg.resolution
        self._eval_mode(True)
        with self.placement.sampling(self.pipe, self.fam):  # model CPU offload when components left the device
            imgs = generate_images(self.pipe, [p for _, p, _ in pairs], seeds=[s for _, _, s in pairs],
                                   steps=ck.sample_steps, guidance=float(ck.sample_guidance), width=res, height=res,
                                   batch_size=4, negative_prompt=ck.sample_negative_prompt)
        self._eval_mode(False)
        names = []
        for (pi, _, s), im in zip(pairs, imgs):
            name = f"p{pi}-s{s}.png"
            if self.main:  # under FSDP every rank draws them, rank 0 writes
                folder.mkdir(parents=True, exist_ok=True)
                im.save(folder / name)
            names.append(name)
        return names

    def _save_lora_files(self, folder: Path, step: int) -> dict[str, str | None]:
        import torch

        from runner.diffusion.kohya import kohya_metadata, peft_to_kohya, save_kohya
        from runner.diffusion.lora import DIFFUSERS_FILE, save_diffusers_lora

        state = self._lora_state()
        save_dtype = torch.float32 if self.mixed_precision == "no" else torch.float16
        state = {k: {n: t.detach().to("cpu", save_dtype) for n, t in sd.items()} for k, sd in state.items()}
        save_diffusers_lora(self.pipe, folder, state)
        if self.fam.comfy is None:  # no ComfyUI/kohya layout known for this family: the diffusers file only
            self.cb.log(f"no ComfyUI/kohya LoRA file for {self.fam.title} (no layout known): the diffusers file only")
            return {"diffusers": DIFFUSERS_FILE, "kohya": None}
        den = self.fam.denoiser
        kohya = peft_to_kohya(state[den], family=self.family, unet_config=self.denoiser.config, alpha=self.alpha,
                              text_encoder_sds={k: v for k, v in state.items() if k != den})
        cfg, ph = self.cfg, self._phase_at(step)
        md = kohya_metadata(
            family=self.family, denoiser_config=self.denoiser.config, base_model=cfg.base_model, rank=self.rank,
            alpha=self.alpha, lr=ph.lr, text_encoder_lr=cfg.lora.text_encoder_lr, steps=step,
            max_steps=self.total_steps, resolution=cfg.resolution, trigger=cfg.trigger,
            title=f"{self._stem()} step {step}", captions=[e.caption for e in self.train_ex],
            dataset_summary=self.dataset_summary(), seed=cfg.seed, extra=self._kohya_extra(ph),
        )
        kname = f"{self._stem()}-step{step:06d}.safetensors"
        save_kohya(folder / kname, kohya, md)
        return {"diffusers": DIFFUSERS_FILE, "kohya": kname}

    def _kohya_extra(self, ph: Phase) -> dict[str, Any]:
        """The training settings sd-scripts records in a LoRA file's metadata (ss_*)."""
        cfg = self.cfg
        return {"ss_lr_scheduler": cfg.lr_scheduler.name, "ss_min_snr_gamma": cfg.min_snr_gamma,
                "ss_noise_offset": cfg.noise_offset, "ss_mixed_precision": self.mixed_precision,
                "ss_optimizer": self.optimizer_name, "ss_gradient_accumulation_steps": self.ga,
                "ss_batch_size_per_device": self.bs, "ss_phase": ph.name,
                "ss_caption_dropout_rate": cfg.caption_dropout, "ss_keep_tokens": cfg.keep_tokens,
                "ss_shuffle_caption": cfg.shuffle_tags,
                "ss_prior_loss_weight": cfg.regularization.prior_loss_weight if self.reg_ex else 0.0,
                "ss_network_dropout": cfg.lora.dropout, "ss_tiny_random_model": self.tiny}

    def dataset_summary(self) -> dict[str, Any]:
        shots: dict[str, int] = {}
        for e in self.train_ex:
            shots[e.shot] = shots.get(e.shot, 0) + 1
        return {"train_images": len(self.train_ex), "validation_images": len(self.val_ex),
                "regularization_images": len(self.reg_ex), "shots": dict(sorted(shots.items())),
                "buckets": sorted({f"{e.bucket[0]}x{e.bucket[1]}" for e in self.train_ex})}

    def _phase_at(self, step: int) -> Phase:
        for ph in self.phases:
            if step <= ph.end:
                return ph
        return self.phases[-1]

    def _checkpoint(self, step: int, phase: Phase) -> None:
        """The LoRA files (folder replaced whole), samples, validation loss; keep_last kept. Under
        FSDP every rank runs it (the model's forward and the LoRA's gathering are collectives),
        rank 0 alone writing."""
        t0, c0 = time.perf_counter(), time.process_time()
        ck_root = self.scratch / "checkpoints"
        files: dict[str, str] = {}

        def fill(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            files.update(self._save_lora_files(tmp, step))

        sample_dir = self.scratch / "samples" / f"step-{step:06d}"
        if self.main:
            replace_folder(ck_root / f"step-{step:06d}", fill)
            shutil.rmtree(sample_dir, ignore_errors=True)
        else:  # an FSDP rank: its part of gathering the LoRA
            self._lora_state()
        samples = self._samples(sample_dir)
        val = self.validation_loss()
        self.history = [h for h in self.history if h["step"] != step]
        self.history.append({"step": step, "phase": phase.name, "val_loss": val, **files,
                             "samples": [f"samples/step-{step:06d}/{n}" for n in samples]})
        kept_steps = [h["step"] for h in self.history][-self.cfg.checkpoints.keep_last:]
        for h in self.history:
            if h["step"] not in kept_steps and self.main:
                shutil.rmtree(ck_root / f"step-{h['step']:06d}", ignore_errors=True)
        if val is not None:
            self.cb.metric("val_loss", val, step)
            self._log_metrics({"step": step, "phase": phase.name, "val_loss": val})
        self.cb.log(f"checkpoint at step {step}" + (f", validation loss {val:.4f}" if val is not None else ""),
                    step=step)
        self.timings["checkpoint_s"] = self.timings.get("checkpoint_s", 0.0) + time.perf_counter() - t0
        self.timings["checkpoint_cpu_s"] = self.timings.get("checkpoint_cpu_s", 0.0) + time.process_time() - c0

    def _save_state(self, step: int, phase_index: int, optimizer, scheduler) -> None:
        import numpy as np
        import torch

        d = self.scratch / STATE_DIR
        state = {
            "config_digest": self.digest,
            "step": step,
            "phase_index": phase_index,
            "lora": {k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in self._lora_state().items()},
            "optimizer": self._whole_optimizer_state(optimizer),
            "scheduler": scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if getattr(self.accelerator, "scaler", None) else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history,
        }
        if not self.main:  # an FSDP rank: its part of the gathering above done, rank 0 writes
            return
        with atomic_path(d / STATE_FILE) as tmp:
            torch.save(state, tmp)
        atomic_write_text(d / STATE_META, json.dumps({"step": step, "total_steps": self.total_steps,
                                                      "phase": self.phases[phase_index].name,
                                                      "steps_per_epoch": self.steps_per_epoch,
                                                      "config_digest": state["config_digest"]}))

    def _whole_optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state dict with FSDP's sharded moments gathered whole (every rank
        calls it): the layout one process writes, so a state resumes on any number of ranks."""
        sd = optimizer.state_dict()
        if not self.fsdp:
            return sd
        return {**sd, "state": {i: _whole(st) for i, st in sd["state"].items()}}

    def _shard_optimizer_state(self, optimizer) -> None:
        """After loading a whole state into an FSDP run's optimizer: each moment split as its
        parameter is (``distribute_tensor`` with the parameter's mesh and placements)."""
        from torch.distributed.tensor import distribute_tensor

        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                for k, v in st.items():
                    if hasattr(p, "device_mesh") and not hasattr(v, "device_mesh") and v.shape == p.shape:
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)

    def _load_state(self) -> dict | None:
        import torch

        p = self.scratch / STATE_DIR / STATE_FILE
        if not p.is_file():
            return None
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn file cannot happen (atomic rename), but be safe
            self.cb.warn(f"resume state {p} unreadable ({exc}); starting over")
            return None
        if state.get("config_digest") != self.digest:
            self.cb.warn("resume state belongs to another configuration; starting over")
            return None
        return state

    def _restore(self, state: dict | None) -> int:
        """The step to start at: the resume state's (LoRA weights, history and RNG states
        restored), else 0 with every RNG seeded from train.seed."""
        import numpy as np
        import torch

        self.history: list[dict] = []
        if state is None:
            seed = self.cfg.seed
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.manual_seed(seed)
            return 0
        self._load_lora_state(state["lora"])
        self.history = state["history"]
        step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.cb.log(f"resuming at step {step} of {self.total_steps}", step=step)
        return step

    # ------------------------------------------------------------------------------------
    # logging
    def _log_metrics(self, rec: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, rec["step"])

    def _open_logs(self, resume_step: int) -> None:
        self.tb = None
        if not self.main:
            return
        logs = self.scratch / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.metrics_path = logs / "metrics.jsonl"
        # steps logged after the last checkpoint by a killed run are replayed: drop them
        if self.metrics_path.is_file():
            keep = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(logs / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None

    def _close_logs(self, bar) -> None:
        bar.close()
        if self.tb is not None:
            self.tb.close()

    # ------------------------------------------------------------------------------------
    # the run
    def run(self) -> dict[str, Any]:
        """Train every phase (see the module doc for the order); the output index, or
        ``{"stopped_at": step}`` when ``stop_after_step`` (tests) stopped it early."""
        t_start = time.perf_counter()
        self._new_accelerator()  # first: with several processes it picks this rank's device
        self._load_model()
        self._prepare_data()
        self._split_accumulation()
        with self.accelerator.main_process_first():  # rank 0 fills the caches, the others then read them
            with self.placement.caching(self.pipe):  # train.memory.offload_idle: one component on the device at a time
                self._fill_caches()
        self._after_caches()
        self._attach_lora()
        state = self._load_state()
        step = self.resumed_from = self._restore(state)
        self._data_parallel()  # after the restore: FSDP shards the restored LoRA weights
        self._open_logs(step)
        bar = self.cb.bar(self.total_steps, "training")
        if step:
            bar.update(step)
        self.phase_mix: dict[str, dict[str, float]] = {}
        self.trainable = [p for m in self.trained for p in m.parameters() if p.requires_grad]
        self.stopped = False
        t_train, c_train, self.steps_run = time.perf_counter(), time.process_time(), 0
        for pi, phase in enumerate(self.phases):
            resume = state if state is not None and state["phase_index"] == pi else None
            step = self._run_phase(pi, phase, step, resume, bar)
            if self.stopped:
                self._close_logs(bar)
                return {"stopped_at": step}
        self._close_logs(bar)
        self.timings["train_s"] = time.perf_counter() - t_train
        self.timings["train_cpu_s"] = time.process_time() - c_train
        self.timings["steps_run"] = self.steps_run
        self.timings["total_s"] = time.perf_counter() - t_start
        self.accelerator.wait_for_everyone()
        return self._write_outputs() if self.main else {}

    def _new_accelerator(self) -> None:
        """A fresh accelerate state per run (tests run several trainers in one process)."""
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import InitProcessGroupKwargs

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        # with several processes the others wait while rank 0 fills the caches and draws samples:
        # longer than the 30 min default collective timeout on a large dataset
        wait = InitProcessGroupKwargs(timeout=timedelta(hours=COLLECTIVE_TIMEOUT_H))
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.device == "cpu",
                                       kwargs_handlers=[wait])
        self.world = self.accelerator.num_processes  # > 1: this is one rank of a data-parallel run
        self.rank_index = self.accelerator.process_index
        self.main = self.accelerator.is_main_process  # rank 0 alone writes logs, checkpoints and outputs
        self.ddp = None
        # the denoiser sharded over the ranks (the video trainer's config has no such field: ddp)
        self.fsdp = self.world > 1 and getattr(self.cfg, "parallel", "ddp") == "fsdp"
        if self.world > 1 and self.device.startswith("cuda"):
            self.device = str(self.accelerator.device)  # cuda:<local rank>: every placement on this rank's GPU

    def _split_accumulation(self) -> None:
        """Each of the ``world`` processes takes its own ``gradient_accumulation / world`` of every
        step's micro-batches (rank r the r-th run of them), so N processes compute the gradient of
        the same global batch as one process does (see :meth:`_optimizer_step`)."""
        if self.ga % self.world:
            raise TrainError(f"train.gradient_accumulation {self.ga} is not a multiple of the {self.world} "
                             "data-parallel processes, which split each step's micro-batches",
                             hint=f"Set train.gradient_accumulation to {self.world} (or a multiple of it): the "
                                  "global batch is batch_size x gradient_accumulation on any number of GPUs.")
        self.local_ga = self.ga // self.world
        self.accelerator.gradient_accumulation_steps = self.local_ga

    def _data_parallel(self) -> None:
        """With several processes: the denoiser wrapped in DistributedDataParallel by accelerate
        (gloo on the CPU, nccl on CUDA), its frozen weights and buffers left out of DDP (every rank
        loaded the same ones, and the seeded LoRA init is the same), so only the LoRA gradients
        are all-reduced, once per optimizer step (no_sync on the other micro-batches)."""
        if self.world == 1:
            return
        if self.train_te:
            raise TrainError("train.lora.train_text_encoder: text-encoder LoRAs train in one process only",
                             hint="Set hardware.local_processes to 1 (one GPU on Modal), or train the denoiser only.")
        if self.fsdp:
            self._sharded()
            return
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in self.denoiser.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in self.denoiser.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.denoiser, frozen)
        self.ddp = self.accelerator.prepare_model(self.denoiser, device_placement=False)

    def _sharded(self) -> None:
        """FSDP (torch's ``fully_shard``, FSDP2: per-parameter DTensor shards, mixed requires_grad
        allowed): each block of the denoiser's top-level ModuleLists one unit, the rest of it the
        root; every weight, frozen or LoRA, split over the ranks and gathered per unit while it
        runs; gradients reduce-scattered after each backward (summed over a step's micro-batches,
        averaged over the ranks, as DDP). On CUDA the denoiser comes from the CPU (Placement) and
        each unit's shard goes to this rank's GPU as it is sharded."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        m = self.cfg.memory
        if m is not None and (m.quantize_base != "none" or m.offload_idle or m.text_encoders == "offload"):
            raise TrainError("hardware.parallel fsdp: train.memory.quantize_base, offload_idle and "
                             "text_encoders: offload are for one GPU's whole model, not for a sharded one",
                             hint="Set them to their defaults (none, false, keep) or hardware.parallel: ddp.")
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        mesh = init_device_mesh(kind, (self.world,))
        units = [block for child in self.denoiser.children() if isinstance(child, torch.nn.ModuleList)
                 for block in child]
        for block in units:
            fully_shard(block, mesh=mesh)
        fully_shard(self.denoiser, mesh=mesh)
        params = list(self.denoiser.parameters())
        mine = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        self.cb.log(f"FSDP: denoiser sharded over {self.world} processes in {len(units) + 1} units; rank 0 "
                    f"holds {mine:,} of its {sum(p.numel() for p in params):,} parameters")

    @contextmanager
    def _seeded(self, phase: Phase, pos: int):
        """The global torch RNGs (LoRA dropout draws from them) seeded from (seed, phase,
        position) for one micro-batch and restored after it: its dropout masks are the same in
        whichever process computes it, and after a resume."""
        import torch

        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_h(self.cfg.seed, "dropout", phase.name, pos))
            yield

    @contextmanager
    def _synced(self):
        """The training step's components: the denoiser called through its DDP wrapper (which
        hooks the gradient all-reduce) while the family code reads its attributes as usual."""
        if self.ddp is None:
            yield
            return
        plain = self.c
        self.c = replace(plain, denoiser=_Forwarding(self.ddp))
        try:
            yield
        finally:
            self.c = plain

    def _phase_samplers(self, pi: int, phase: Phase) -> tuple[BatchSampler, BatchSampler | None, list[str]]:
        """The phase's batch sampler over its data mix (and the prior images'), with the mix's
        warnings; records the mix's shot shares for the index."""
        try:
            weights, warns = mix_weights(self.train_ex, phase.mix)
        except DataError as exc:
            raise TrainError(f"train.phases[{pi}] ({phase.name}).mix: {exc}", hint=exc.hint) from None
        self.phase_mix[phase.name] = mix_summary(self.train_ex, weights)
        seed = self.cfg.seed
        sampler = BatchSampler(self.train_ex, weights, self.bs, seed=seed, salt=phase.name)
        reg_sampler = None
        if self.reg_ex:
            reg_sampler = BatchSampler(self.reg_ex, [1.0 / len(self.reg_ex)] * len(self.reg_ex), self.bs,
                                       seed=seed, salt=phase.name + "/prior")
        return sampler, reg_sampler, warns

    def _phase_optimizer(self, phase: Phase, state: dict | None):
        """The phase's optimizer and schedule, from ``state`` when resuming inside the phase."""
        optimizer = self.accelerator.prepare(self._optimizer(phase))
        scheduler = self._lr_scheduler(optimizer, phase)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if self.fsdp:
                self._shard_optimizer_state(optimizer)
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and getattr(self.accelerator, "scaler", None):
                self.accelerator.scaler.load_state_dict(state["scaler"])
        return optimizer, scheduler

    def _run_phase(self, pi: int, phase: Phase, step: int, state: dict | None, bar) -> int:
        """Run phase ``pi`` from ``step`` to its end (``state``: the resume state when it was
        written in this phase); the step reached. Sets ``self.stopped`` at ``stop_after_step``."""
        sampler, reg_sampler, warns = self._phase_samplers(pi, phase)
        if step >= phase.end:
            return step
        for w in warns:
            self.cb.warn(f"phase {phase.name}: {w}")
        optimizer, scheduler = self._phase_optimizer(phase, state if step > phase.start else None)
        self.cb.log(f"phase {phase.name}: steps {phase.start + 1}-{phase.end}, lr {phase.lr:g}, "
                    f"mix {self.phase_mix[phase.name]}")
        while step < phase.end:
            rec = self._optimizer_step(phase, step, sampler, reg_sampler, optimizer)
            rec["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            self.steps_run += 1
            self._record_step(step, rec, bar)
            if (step % self.every == 0 or step == phase.end) and (self.main or self.fsdp):  # FSDP: every rank
                self._checkpoint(step, phase)
                self._save_state(step, pi, optimizer, scheduler)
            if self.stop_after_step is not None and step >= self.stop_after_step:
                self.stopped = True
                return step
        return step

    def _optimizer_step(self, phase: Phase, step: int, sampler: BatchSampler, reg_sampler: BatchSampler | None,
                        optimizer) -> dict[str, Any]:
        """``gradient_accumulation`` micro-batches and one optimizer step at ``step`` of the run;
        what to log of it (loss, prior_loss, grad_norm, shots)."""
        import torch

        losses, prior_losses, shots = [], [], {}
        reg_w = float(self.cfg.regularization.prior_loss_weight) if reg_sampler is not None else 0.0
        max_norm = float(self.cfg.max_grad_norm)
        grad_norm = None
        mine = range(self.rank_index * self.local_ga, (self.rank_index + 1) * self.local_ga)  # this rank's share
        for micro in range(self.ga):
            pos = (step - phase.start) * self.ga + micro
            batch = [self.train_ex[i] for i in sampler.batch(pos)]
            for e in batch:  # the shots of the global batch (every rank knows them)
                shots[e.shot] = shots.get(e.shot, 0) + 1
            if micro not in mine:
                continue
            gen = torch.Generator().manual_seed(_h(self.cfg.seed, "step", phase.name, pos))
            with self._synced(), self._seeded(phase, pos), self.accelerator.accumulate(self.ddp or self.denoiser):
                loss = self._loss(batch, gen)
                losses.append(float(loss.detach()))
                if reg_sampler is not None:  # one backward per forward (DDP's rule): the data loss's first, unsynced
                    with self.ddp.no_sync() if self.ddp is not None else nullcontext():
                        self.accelerator.backward(loss)
                    prior = self._loss([self.reg_ex[i] for i in reg_sampler.batch(pos)], gen)
                    prior_losses.append(float(prior.detach()))
                    loss = reg_w * prior
                self.accelerator.backward(loss)
                grad_norm = None
                if self.accelerator.sync_gradients and max_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not self.accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation out of step with optimizer steps")
        losses, prior_losses = self._gathered(losses), self._gathered(prior_losses)
        rec: dict[str, Any] = {"phase": phase.name, "loss": sum(losses) / len(losses), "shots": shots}
        if prior_losses:
            rec["prior_loss"] = sum(prior_losses) / len(prior_losses)
        if grad_norm is not None and math.isfinite(grad_norm):
            rec["grad_norm"] = grad_norm
        return rec

    def _gathered(self, values: list[float]) -> list[float]:
        """Every rank's ``values`` in rank order (the global micro-batch order), as one process
        would have them; ``values`` as they are in a one-process run."""
        if self.world == 1 or not values:
            return values
        import torch

        mine = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.gather(mine).cpu()]

    def _record_step(self, step: int, rec: dict[str, Any], bar) -> None:
        """Log one optimizer step (metrics.jsonl, TensorBoard, callbacks); a loss that is not
        finite stops training."""
        rec = {"step": step, "phase": rec["phase"], "loss": rec["loss"], "lr": rec["lr"],
               "epoch": round(step / self.steps_per_epoch, 4), "shots": rec["shots"],
               **{k: rec[k] for k in ("prior_loss", "grad_norm") if k in rec}}
        if not math.isfinite(rec["loss"]):
            raise TrainError(f"loss became {rec['loss']} at step {step}",
                             hint="Lower train.lr, or use mixed_precision bf16 instead of fp16.")
        self._log_metrics(rec)
        self.cb.metric("loss", rec["loss"], step)
        self.cb.metric("lr", rec["lr"], step)
        bar.update(1, loss=round(rec["loss"], 5))

    # ------------------------------------------------------------------------------------
    # 7. outputs
    def _write_outputs(self) -> dict[str, Any]:
        lora_dir = self.out_dir / "lora"
        logs_dir = self.out_dir / "logs"
        lora_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = self._copy_checkpoints(lora_dir)
        index = self._index(checkpoints)
        (lora_dir / "index.json").write_text(json.dumps(index, indent=2))
        shutil.copy2(self.metrics_path, logs_dir / "metrics.jsonl")
        tb = self.scratch / "logs" / "tensorboard"
        if tb.is_dir():
            shutil.copytree(tb, logs_dir / "tensorboard", dirs_exist_ok=True)
        return index

    def _copy_checkpoints(self, lora_dir: Path) -> list[dict[str, Any]]:
        """The kept checkpoints and their samples into the output folder; their index entries."""
        checkpoints = []
        for h in self.history:
            src = self.scratch / "checkpoints" / f"step-{h['step']:06d}"
            if src.is_dir():
                shutil.copytree(src, lora_dir / src.name, dirs_exist_ok=True)
                checkpoints.append({"step": h["step"], "phase": h["phase"],
                                    "diffusers": f"{src.name}/{h['diffusers']}",
                                    "kohya": f"{src.name}/{h['kohya']}" if h.get("kohya") else None,
                                    "val_loss": h["val_loss"], "samples": h["samples"]})
        if (self.scratch / "samples").is_dir():
            shutil.copytree(self.scratch / "samples", lora_dir / "samples", dirs_exist_ok=True)
        return checkpoints

    def _index(self, checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
        """index.json: what was trained, how, and where each checkpoint is."""
        cfg = self.cfg
        return {
            "base_model": cfg.base_model,
            "model_family": self.family,
            "model": self.fam.describe(),
            "resolution": cfg.resolution,
            "trigger": cfg.trigger,
            "class_word": cfg.class_word,
            "variant": cfg.variant,
            "tiny_random_model": self.tiny,
            "checkpoints": checkpoints,
            "final": len(checkpoints) - 1,
            "history": [{"step": h["step"], "phase": h["phase"], "val_loss": h["val_loss"], "samples": h["samples"]}
                        for h in self.history],
            "sample_prompts": self._sample_prompts(),
            "sample_seeds": [int(s) for s in getattr(cfg.checkpoints, "sample_seeds", ())],
            "rank": self.rank,
            "alpha": self.alpha,
            "buckets": {"resolution": self.bucket_settings.resolution, **self.bucket_settings.kohya()},
            "phases": [{"name": p.name, "steps": p.steps, "epochs": p.epochs, "lr": p.lr, "start": p.start,
                        "mix": p.mix, "shot_share": self.phase_mix.get(p.name, {})} for p in self.phases],
            "steps_per_epoch": self.steps_per_epoch,
            "dataset": self.dataset_summary(),
            "total_steps": self.total_steps,
            "resumed_from_step": self.resumed_from,
            "cache": {"hits": self.cache.hits, "misses": self.cache.misses},
            "device": self.device,
            "processes": self.world,
            "parallel": ("fsdp" if self.fsdp else "ddp") if self.world > 1 else None,
            "global_batch": self.bs * self.ga,
            "mixed_precision": self.mixed_precision,
            "optimizer": getattr(self, "optimizer_name", cfg.optimizer),
            "attention": self.attention,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
