"""The LoRA trainer behind the ``train_video`` stage: a character LoRA for a video family.

It is :class:`runner.diffusion.trainer.LoraTrainer` with video data; what it changes, in the
order of :meth:`LoraTrainer.run`:

1. the model is a video family's pipeline (``families.get(...).pipeline``: LTX-Video 0.9,
   LTX-2, Wan 2.2), loaded from a builtin, a folder or a hub id;
2. the examples are the caption stage's curated images (stills: frame bucket 1) and the clips the
   ``video_clips`` stages cut around the main person's tracks; each gets a (width, height,
   frames) bucket: the aspect bucket of ``resolution`` and the longest of ``frame_buckets`` its
   clip fills (a frame count the family's VAE takes: k x temporal + 1);
3. the latent cache holds each clip's video-VAE latents (and whatever else the family conditions
   on, e.g. Wan A14B's first-frame latents) under the clip's bytes, bucket and crop, next to the
   image trainer's entries;
4. the LoRA goes on every denoiser being trained (Wan 2.2 A14B: both experts, or the one
   ``experts`` names), :func:`families.training_loss` is the family's flow objective on 5-D
   latents (the key frame's latent frame kept clean where the family conditions that way);
5. no samples at checkpoints (clips per checkpoint are the ``evaluate_video`` stage's); the LoRA
   files are what the family's pipeline loads (``load_lora_weights``; a second file for Wan
   A14B's low-noise expert) and, where the family has a ComfyUI layout, the ComfyUI file.

Phases, variants, validation loss at fixed noise, checkpoints, kill -9 resume and the logs are the
image trainer's code, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.core.errors import UserError
from runner.diffusion.data import (
    DataError,
    Example,
    assign_bucket,
    bucket_settings,
    load_clip_bucketed,
    read_clips,
    read_dataset,
    split_validation,
)
from runner.diffusion.trainer import LoraTrainer, TrainError, epoch_steps, phases_of
from runner.spec.config import node_field, schema_config
from runner.spec.config import schema_default as _schema_default
from runner.spec.sections import TrainVideoConfig

# keys of a latent cache entry that are not conditioning (the image trainer's micro-conditioning)
_ENTRY_META = ("mean", "std", "original_size", "crop_top_left", "target_size")


@schema_config("train_video")
class VideoTrainerConfig(TrainVideoConfig):
    """The train_video stage's node config: the section with a variant's overrides, ``base_model``
    resolved (generate.video.model when the section leaves it null), plus the character facts."""

    character: str = node_field()
    trigger: str = node_field()
    class_word: str = node_field(_schema_default("character", "class_word"))
    variant: str | None = node_field(None)
    device: str = node_field(_schema_default("hardware", "device"))
    tracking: Any = node_field(None)  # unkeyed: trackers of the run


def frame_rule_problem(frames: int, temporal: int) -> str | None:
    """Why ``frames`` is not a clip length a VAE with ``temporal`` compression takes, or None."""
    if frames < 1 or (frames - 1) % temporal:
        near = sorted({max(1, (frames - 1) // temporal * temporal + 1), ((frames - 1) // temporal + 1) * temporal + 1})
        return f"{frames} is not k x {temporal} + 1 (nearest: {', '.join(map(str, near))})"
    return None


def compression(pipe, which: str) -> int:
    """The VAE's spatial or temporal compression as the pipeline states it (LTX:
    vae_*_compression_ratio; Wan: vae_scale_factor_*)."""
    for attr in (f"vae_{which}_compression_ratio", f"vae_scale_factor_{which}"):
        value = getattr(pipe, attr, None)
        if value:
            return int(value)
    raise TrainError(f"the video pipeline {type(pipe).__name__} does not state its VAE's {which} compression")


def patch_side(denoiser) -> int:
    patch = denoiser.config.get("patch_size", 1) or 1
    return int(patch[-1] if isinstance(patch, (list, tuple)) else patch)


class VideoLoraTrainer(LoraTrainer):
    config_class = VideoTrainerConfig

    def __init__(self, config, *, dataset_dir: Path | None, clips_dirs: list[Path], **kw: Any) -> None:
        super().__init__(config, dataset_dir=dataset_dir or Path(), **kw)
        self.use_images = dataset_dir is not None and self.cfg.images.use
        self.clips_dirs = [Path(p) for p in clips_dirs]

    # ------------------------------------------------------------------------------------
    # 1. model
    def _load_model(self) -> None:
        import torch

        from runner.diffusion import families
        from runner.diffusion.families import videokit
        from runner.diffusion.memory import Placement
        from runner.diffusion.models import ModelLoadError, hub_location, model_fingerprint, resolve_model_ref
        from runner.spec.sections import TrainVideoMemoryConfig

        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)
        ref = self.cfg.base_model
        try:
            kind, loc = resolve_model_ref(ref, cache_dir=self.cache_dir, project_root=self.project_root)
            if kind == "file":
                raise ModelLoadError(f"{ref}: a single-file checkpoint; video families load from a diffusers folder",
                                     hint="Give the model's diffusers folder or hub id.")
            if kind == "hub":
                loc = hub_location(ref, key="train_video.base_model")
            self.fam = self._family(ref, loc)
            trained = videokit.experts_trained(self.fam, self.cfg.experts) if len(self.fam.video.experts) > 1 else ()
            self.placement = Placement(self.cfg.memory or TrainVideoMemoryConfig.from_dict({}), self.device,
                                       trained=trained)
            self.pipe = families.load_pipeline(self.fam, loc, device=self.placement.load_device,
                                               dtype=self.weight_dtype)
            self.model_fp = model_fingerprint(ref, cache_dir=self.cache_dir, project_root=self.project_root)
        except UserError as exc:
            raise TrainError(f"train_video.base_model: {exc.message}", hint=exc.hint) from None
        except (OSError, ValueError, TypeError) as exc:
            raise TrainError(f"train_video.base_model: could not load {ref!r} as {self.fam.pipeline}: {exc}",
                             hint="Point it at a diffusers folder of a video family (builtin:tiny-<family> for "
                                  "tests); this machine may have no hub access.") from None
        if self.fam.video.prepare is not None:
            self.fam.video.prepare(self.pipe)
        self._place_components()
        self.family = self.fam.name
        self.tiny = ref.startswith("builtin:")
        self.c = families.components_of(self.pipe, self.fam, self._objective())
        self.denoiser = self.c.denoiser
        self.vae = self.pipe.vae
        encoders = (getattr(self.pipe, name, None) for name in self.fam.text.encoders)
        self.text_encoders = [m for m in encoders if m is not None]
        for m in (*self._denoisers(), self.vae, *self.text_encoders):
            m.requires_grad_(False)
        self.noise_scheduler = self.c.scheduler
        self._use_sdpa()
        self.multiple = compression(self.pipe, "spatial") * patch_side(self.denoiser)
        self.temporal = compression(self.pipe, "temporal")

    def _family(self, ref: str, location: str):
        """The video family: train_video.model_family, or detected from the model (a builtin's
        name, the folder's model_index.json); a contradiction is refused naming both."""
        from runner.diffusion import families

        named = self.cfg.model_family
        found = families.by_tiny_name(ref) if ref.startswith("builtin:") else None
        if found is None and (Path(location) / "model_index.json").is_file():
            found = families.detect_folder(location, modality="video")
        if found is not None and found.modality != "video":
            raise UserError(f"{ref!r} is an image model ({found.title}); train_video trains video families",
                            hint="Train image LoRAs in the train section; set train_video.base_model to a video "
                                 f"model ({', '.join(families.names('video'))}).")
        if named != "auto":
            fam = families.get(named)
            if found is not None and found is not fam:
                raise UserError(f"train_video.model_family is {named} but {ref!r} is a {found.title} model",
                                hint=f"Set train_video.model_family to {found.name} or auto.")
            return fam
        if found is None:
            raise UserError(f"cannot tell the video family of {ref!r}",
                            hint=f"Set train_video.model_family ({', '.join(families.names('video'))}).")
        return found

    def _denoisers(self) -> list:
        """Every denoiser of the pipeline (Wan 2.2 A14B: both experts)."""
        names = self.fam.video.experts if self.fam.video else (self.fam.denoiser,)
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    def _objective(self):
        from dataclasses import replace

        knobs = {k: v for k, v in (self.cfg.objective.to_dict() if self.cfg.objective else {}).items()
                 if v is not None}
        return replace(self.fam.objective, **knobs)

    # ------------------------------------------------------------------------------------
    # 2. data
    def _read_examples(self) -> list[Example]:
        """The stills (the caption stage's images, at most images.max spread evenly) and the clips."""
        stills: list[Example] = []
        if self.use_images:
            stills = read_dataset(self.dataset_dir)
            cap = self.cfg.images.max
            if cap and len(stills) > cap:
                stills = [stills[round(i * (len(stills) - 1) / (cap - 1))] if cap > 1 else stills[0]
                          for i in range(cap)]
        clips = [e for folder in self.clips_dirs for e in read_clips(folder)]
        return [*stills, *clips]

    def _frame_bucket(self, e: Example, video_buckets: list[int]) -> int | None:
        """1 for a still; for a clip the longest video bucket it fills (None: shorter than all)."""
        if not e.clip_frames:
            return 1
        fits = [f for f in video_buckets if f <= e.clip_frames]
        return max(fits) if fits else None

    def _prepare_data(self) -> None:
        cfg = self.cfg
        bad = [f"{f}: {p}" for f in cfg.frame_buckets if (p := frame_rule_problem(int(f), self.temporal))]
        if bad:
            raise TrainError(f"train_video.frame_buckets: {'; '.join(bad)} for {self.fam.title}'s VAE "
                             f"({self.temporal}x temporal)", hint="Use frame counts k x temporal + 1.")
        try:
            examples = self._read_examples()
        except DataError as exc:
            raise TrainError(str(exc), hint=exc.hint) from None
        video_buckets = sorted(int(f) for f in cfg.frame_buckets if int(f) > 1)
        if 1 not in cfg.frame_buckets:
            examples = [e for e in examples if e.clip_frames]
        kept = []
        self.dropped: dict[str, int] = {}
        for e in examples:
            frames = self._frame_bucket(e, video_buckets)
            if frames is None:
                self.dropped["shorter than every frame bucket"] = self.dropped.get("shorter than every frame bucket",
                                                                                  0) + 1
                continue
            e.bucket = (0, 0, frames)
            kept.append(e)
        for why, n in self.dropped.items():
            self.cb.warn(f"train_video: {n} clip(s) left out: {why} {video_buckets}")
        if not kept:
            raise TrainError("train_video: nothing to train on (no still image and no clip that fills a frame bucket)",
                             hint="Keep train_video.images.use with a dataset, add dataset.sources[].video with "
                                  "train_video.clips.enabled, or lower the frame buckets.")
        self.train_ex, self.val_ex = split_validation(kept, cfg.checkpoints.validation_fraction, cfg.seed)
        self.bucket_settings = bucket_settings(cfg.resolution, cfg.buckets, multiple=self.multiple)
        self.buckets = self.bucket_settings.buckets()
        for e in (*self.train_ex, *self.val_ex):
            if not (e.width and e.height):
                self._read_size(e)
            e.bucket = (*assign_bucket(e.width, e.height, self.buckets), e.bucket[2])
            e.captions = [e.caption]
        self.bs, self.ga = cfg.batch_size, cfg.gradient_accumulation
        self.steps_per_epoch = epoch_steps(self.train_ex, self.bs, self.ga)
        self.phases = phases_of(cfg, self.steps_per_epoch)
        self.total_steps = self.phases[-1].end
        ck = cfg.checkpoints
        self.every = ck.every_epochs * self.steps_per_epoch if ck.every_epochs else ck.every_steps

    @staticmethod
    def _read_size(e: Example) -> None:
        if e.clip_frames:
            import av

            try:
                with av.open(str(e.image)) as container:
                    stream = container.streams.video[0]
                    e.width, e.height = stream.codec_context.width, stream.codec_context.height
            except (av.error.FFmpegError, OSError, IndexError) as exc:
                raise TrainError(f"{e.image}: cannot read the clip ({exc})",
                                 hint="Re-run the video_clips stage.") from None
            return
        from PIL import Image

        with Image.open(e.image) as im:
            e.width, e.height = im.size

    # ------------------------------------------------------------------------------------
    # 3. caches
    def _encode_clips(self, clips, bucket):
        """Raw latents (and the family's conditioning) of clips: each a list of PIL frames."""
        import numpy as np
        import torch

        pixels = np.stack([np.stack([np.asarray(f, dtype=np.float32) for f in frames]) for frames in clips])
        pixels = torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
        with torch.no_grad():
            return self.fam.images_to_raw(self.pipe, pixels.to(torch.float32))

    def _fill_caches(self) -> None:
        import time

        from runner.diffusion.caches import TrainCache, load_entry

        t0, c0 = time.perf_counter(), time.process_time()
        self.cache = TrainCache(self.cache_dir, self.model_fp)
        self.reg_ex = []
        all_ex = [*self.train_ex, *self.val_ex]
        bar = self.cb.bar(len(all_ex), "caching video latents")
        try:
            paths = self.cache.ensure_latents([(e.image, e.bucket) for e in all_ex], self._encode_clips,
                                              batch_size=1, progress=bar, load=load_clip_bucketed)
        except DataError as exc:
            raise TrainError(str(exc), hint=exc.hint) from None
        bar.close()
        self.latents = {id(e): load_entry(p) for e, p in zip(all_ex, paths)}
        self.train_te = False
        self._cache_text([e.caption for e in all_ex] + ([""] if self.cfg.caption_dropout > 0 else []))
        self._caches_done(t0, c0)

    # ------------------------------------------------------------------------------------
    # 4. adapters
    def _attach_lora(self) -> None:
        import torch
        from diffusers.training_utils import cast_training_params

        from runner.diffusion import families
        from runner.diffusion.families import videokit

        lcfg = self.cfg.lora
        if lcfg.train_text_encoder:
            raise TrainError("train_video.lora.train_text_encoder: the video families' text encoders "
                             f"({', '.join(self.fam.text.encoders)}) are not trained",
                             hint="Set train_video.lora.train_text_encoder to false.")
        self.rank = lcfg.rank
        self.alpha = float(lcfg.alpha if lcfg.alpha is not None else self.rank)
        try:
            videokit.select_experts(self.c, self.cfg.experts)
            families.add_lora(self.c, rank=self.rank, alpha=self.alpha, targets=list(lcfg.target_modules or [])
                              or None, dropout=float(lcfg.dropout), seed=_seed(self.cfg.seed))
        except UserError as exc:
            raise TrainError(f"train_video.lora.target_modules: {exc.message}", hint=exc.hint) from None
        self.modules = videokit.lora_modules(self.c)
        self.trained = list(self.modules.values())
        self._check_comfy_names()
        if self.weight_dtype != torch.float32:
            cast_training_params(self.trained, dtype=torch.float32)
        for m in self.trained:
            if self.cfg.gradient_checkpointing:
                m.enable_gradient_checkpointing()
            m.train()
        self._place_experts()

    def _place_experts(self) -> None:
        """offload_idle_expert with both A14B experts trained (CUDA): every LoRA weight on the
        device (peft put the waiting expert's on the CPU with its base), the experts' frozen
        weights then take turns (:meth:`_loss`). Logs which expert trains in which sigma range."""
        from runner.diffusion.families import videokit
        from runner.diffusion.memory import move_frozen

        self.swapping = self.placement.offload_expert and len(self.modules) > 1
        if self.swapping:
            for m in self.trained:
                move_frozen(m, None, trainable=self.device)
        ranges = videokit.expert_ranges(self.c)
        if len(ranges) > 1:
            shown = ", ".join(f"{n} sigma in [{ranges[n][0]:g}, {min(ranges[n][1], 1.0):g})" for n in self.modules)
            self.cb.log(f"experts trained ({self.cfg.experts}): {shown}")
        elif self.cfg.experts != "both":
            self.cb.warn(f"train_video.experts: {self.cfg.experts} is for Wan 2.2 A14B's two experts; "
                         f"{self.fam.title} has one transformer, trained on every noise level")

    def _check_comfy_names(self) -> None:
        from peft.utils import get_peft_model_state_dict

        from runner.diffusion.families.comfykit import NoNativeName
        from runner.diffusion.kohya import peft_to_kohya

        if self.fam.comfy is None:
            return
        try:
            for m in self.trained:
                peft_to_kohya(get_peft_model_state_dict(m), family=self.family, unet_config=m.config,
                              alpha=self.alpha)
        except NoNativeName as exc:
            raise TrainError(f"train_video.lora.target_modules: {exc.message}", hint=exc.hint) from None

    def _lora_state(self) -> dict[str, dict]:
        from peft.utils import get_peft_model_state_dict

        return {name: get_peft_model_state_dict(m) for name, m in self.modules.items()}

    def _load_lora_state(self, state: dict[str, dict]) -> None:
        from peft.utils import set_peft_model_state_dict

        for name, m in self.modules.items():
            set_peft_model_state_dict(m, state[name])

    def _param_groups(self, phase) -> list[dict]:
        return [{"params": [p for m in self.trained for p in m.parameters() if p.requires_grad], "lr": phase.lr}]

    # ------------------------------------------------------------------------------------
    # 5. batches, checkpoints
    def _batch(self, examples: list[Example], gen, *, fixed_caption: bool = False, noise=None, timesteps=None):
        import torch

        from runner.diffusion.families import Batch

        entries = [self.latents[id(e)] for e in examples]
        mean = torch.stack([x["mean"] for x in entries])
        std = torch.stack([x["std"] for x in entries])
        latents = self.fam.to_model_latents(self.pipe, mean + std * torch.randn(mean.shape, generator=gen))
        extra = {k: torch.stack([x[k] for x in entries]).to(self.device)
                 for k in entries[0] if k not in _ENTRY_META}
        text = self.fam.collate([self.text[self._caption(e, gen, fixed_caption)] for e in examples])
        return Batch(latents=latents.to(self.device), text=text, extra=extra, generator=gen, noise=noise,
                     timesteps=timesteps)

    def _loss(self, examples: list[Example], gen, *, timesteps=None, noise=None, weighted: bool = True):
        """The image trainer's micro-batch loss; with the A14B's experts taking turns on the GPU
        (offload_idle_expert, both trained) the micro-batch's expert comes first: the one a sigma
        drawn from the full density belongs to (the fixed timestep's at validation), its frozen
        weights moved in, the batch's sigmas drawn from its range."""
        if not getattr(self, "swapping", False):
            return super()._loss(examples, gen, timesteps=timesteps, noise=noise, weighted=weighted)
        from runner.diffusion.families import base, videokit

        if timesteps is None:
            frames, h, w = self.latents[id(examples[0])]["mean"].shape[-3:]
            patch = self.fam.latents.patch
            first = base.sample_sigmas(self.c, 1, frames * (h // patch) * (w // patch), gen)
        else:
            first = timesteps.float() / 1000.0
        name = videokit.expert_of(self.c, first[:1])[0]
        if self.placement.swap_to(self.pipe, name):
            self.timings["expert_swaps"] = self.timings.get("expert_swaps", 0) + 1
        self.c.sigma_range = videokit.expert_ranges(self.c)[name] if timesteps is None else None
        try:
            return super()._loss(examples, gen, timesteps=timesteps, noise=noise, weighted=weighted)
        finally:
            self.c.sigma_range = None

    def _validation_timesteps(self) -> list[int]:
        """The image trainer's validation timesteps that the trained experts cover (one A14B
        expert: those in its sigma range, or the middle of the range when none is), grouped by
        expert so that experts taking turns on the GPU swap at most once per group."""
        from runner.diffusion.families import videokit

        ts = super()._validation_timesteps()
        if self.c.sigma_range is not None and len(videokit.expert_ranges(self.c)) > 1:
            top = self.noise_scheduler.config.num_train_timesteps - 1
            lo, hi = self.c.sigma_range
            ts = [t for t in ts if lo <= t / 1000.0 < hi] or [min(top, round(500.0 * (lo + min(hi, 1.0))))]
        return sorted(ts, key=lambda t: videokit.expert_of(self.c, [t / 1000.0])[0])

    def _samples(self, folder: Path) -> list[str]:
        return []  # clips per checkpoint cost minutes on a GPU: not made while training

    def _sample_prompts(self) -> list[str]:
        return []

    def _save_lora_files(self, folder: Path, step: int) -> dict[str, str | None]:
        """The family's diffusers file(s) (a second one for a second expert) and, where the family
        has a ComfyUI layout, the ComfyUI file of each."""
        import torch

        from runner.diffusion import families
        from runner.diffusion.families import videokit
        from runner.diffusion.kohya import kohya_metadata, peft_to_kohya, save_kohya

        save_dtype = torch.float32 if self.mixed_precision == "no" else torch.float16
        written = families.save_lora(self.c, folder)  # {component: file}; one file for one denoiser
        if not isinstance(written, dict):
            written = {self.fam.denoiser: written}
        files: dict[str, Any] = {"experts": {name: Path(path).name for name, path in written.items()}}
        for i, (name, path) in enumerate(written.items()):
            suffix = "" if i == 0 else f"_{i + 1}"
            role = videokit.expert_role(self.fam, name)  # Wan A14B: high_noise / low_noise, one ComfyUI file each
            files["diffusers" + suffix] = Path(path).name
            files["kohya" + suffix] = None
            if self.fam.comfy is None:
                continue
            sd = {n: t.detach().to("cpu", save_dtype) for n, t in self._lora_state()[name].items()}
            kohya = peft_to_kohya(sd, family=self.family, unet_config=self.modules[name].config, alpha=self.alpha)
            ph = self._phase_at(step)
            md = kohya_metadata(
                family=self.family, denoiser_config=self.modules[name].config, base_model=self.cfg.base_model,
                rank=self.rank, alpha=self.alpha, lr=ph.lr, text_encoder_lr=None, steps=step,
                max_steps=self.total_steps, resolution=self.cfg.resolution, trigger=self.cfg.trigger,
                title=f"{self._stem()} step {step}" + (f" ({role} expert, {name})" if role else ""),
                captions=[e.caption for e in self.train_ex], dataset_summary=self.dataset_summary(),
                seed=self.cfg.seed, extra=self._kohya_extra(ph))
            kname = f"{self._stem()}-step{step:06d}{'-' + role if role else ''}.safetensors"
            save_kohya(folder / kname, kohya, md)
            files["kohya" + suffix] = kname
        return files

    def _kohya_extra(self, ph) -> dict[str, Any]:
        cfg = self.cfg
        return {"ss_lr_scheduler": cfg.lr_scheduler.name, "ss_mixed_precision": self.mixed_precision,
                "ss_optimizer": getattr(self, "optimizer_name", cfg.optimizer),
                "ss_gradient_accumulation_steps": self.ga, "ss_batch_size_per_device": self.bs, "ss_phase": ph.name,
                "ss_caption_dropout_rate": cfg.caption_dropout, "ss_network_dropout": cfg.lora.dropout,
                "ss_frame_buckets": ",".join(str(f) for f in cfg.frame_buckets), "ss_experts": cfg.experts,
                "ss_tiny_random_model": self.tiny}

    def dataset_summary(self) -> dict[str, Any]:
        shots: dict[str, int] = {}
        for e in self.train_ex:
            shots[e.shot] = shots.get(e.shot, 0) + 1
        frames: dict[str, int] = {}
        for e in self.train_ex:
            frames[str(e.bucket[2])] = frames.get(str(e.bucket[2]), 0) + 1
        return {"train_images": sum(1 for e in self.train_ex if not e.clip_frames),
                "train_clips": sum(1 for e in self.train_ex if e.clip_frames),
                "validation_items": len(self.val_ex), "shots": dict(sorted(shots.items())),
                "frames": dict(sorted(frames.items(), key=lambda kv: int(kv[0]))),
                "buckets": sorted({f"{e.bucket[0]}x{e.bucket[1]}x{e.bucket[2]}" for e in self.train_ex}),
                "left_out": dict(self.dropped)}

    def _copy_checkpoints(self, lora_dir: Path) -> list[dict[str, Any]]:
        """The image trainer's entries, plus the second expert's files (diffusers_2, kohya_2) and
        ``experts``: {component: its diffusers file} (what video_models.load_lora reads to load
        each file into its expert)."""
        checkpoints = super()._copy_checkpoints(lora_dir)
        by_step = {h["step"]: h for h in self.history}
        for ck in checkpoints:
            h = by_step[ck["step"]]
            folder = Path(ck["diffusers"]).parent
            for key in ("diffusers_2", "kohya_2"):
                if h.get(key):
                    ck[key] = f"{folder}/{h[key]}"
            ck["experts"] = {name: f"{folder}/{f}" for name, f in (h.get("experts") or {}).items()}
        return checkpoints

    def _index(self, checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
        index = super()._index(checkpoints)
        index.update({"modality": "video", "frame_buckets": [int(f) for f in self.cfg.frame_buckets],
                      "experts": sorted(self.modules), "sample_prompts": [], "sample_seeds": []})
        return index


def _seed(seed: int) -> int:
    from runner.diffusion.trainer import _h

    return _h(seed, "lora-init")
