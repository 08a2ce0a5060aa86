"""What a model family is: data (classes, text encoding, latents, objective, LoRA targets,
detection) plus the few functions that differ between families (encode captions, normalize
latents, run the denoiser on a noisy batch). Everything the trainer does per batch goes through
:func:`training_loss`, the same for every family; the family only supplies ``predict``.

Conventions (one for all families, so the trainer never branches on a family name):

- *raw latents* are what the VAE encoder gives (mean and std of its distribution, ``(B, C, H, W)``),
  cached once per image and bucket; :attr:`Family.to_model_latents` turns a sample of them into
  *model latents*, the space the denoiser is trained in (scaled, shifted, normalized, patchified).
- timesteps are on the 0..1000 scale of ``num_train_timesteps`` for every family: a UNet family
  reads them as DDPM steps, a flow family as ``sigma = t / 1000``.
- :func:`training_loss` returns the loss of each example (shape ``(B,)``), so the caller can mix
  prior-preservation and instance losses with its own weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# The prediction an objective trains: 'scheduler' (UNet families: epsilon or v, as the model's
# scheduler config says), or 'flow' (the velocity noise - x0 of rectified flow).
PREDICTIONS = ("scheduler", "flow")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "min_snr", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class TextEncoding:
    """How captions become conditioning."""

    encoders: tuple[str, ...]  # pipeline components that encode text, in the order they run
    outputs: str  # what is taken from them, in words (for the plan and the docs)
    pooled: bool  # a pooled vector conditions the denoiser besides the token sequence
    max_tokens: int  # tokens per caption the family trains with
    masked: bool = False  # embeddings vary in length per caption (padding or lists, see collate)
    cacheable: bool = True  # embeddings can be cached and the encoders freed before the loop


@dataclass(frozen=True)
class LatentFormat:
    """How images become model latents (figures of the real model; tiny ones are smaller)."""

    channels: int  # VAE latent channels
    downscale: int  # VAE spatial downscale
    patch: int  # denoiser patch side in latent pixels (2: 2x2 patches packed into tokens)
    normalization: str  # in words: what turns raw VAE latents into model latents


@dataclass(frozen=True)
class Objective:
    """The training objective. ``shift=None`` samples sigmas shifted as the model's own scheduler
    shifts them at inference (static ``shift``, or the resolution-dependent one when the
    scheduler config says ``use_dynamic_shifting``); a number fixes a static shift."""

    prediction: str = "scheduler"
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None
    weighting: str = "none"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    guidance: float | None = None  # guidance-distilled models (Flux.1-dev): the guidance embedding's value

    def __post_init__(self) -> None:
        for name, value, allowed in (("prediction", self.prediction, PREDICTIONS),
                                     ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
                                     ("weighting", self.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"objective {name} {value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class SampleDefaults:
    steps: int
    guidance: float


@dataclass(frozen=True)
class ControlNetArgs:
    """A family's ControlNet in diffusers: the model class, the pipeline class built from the base
    pipeline with ``from_pipe(pipe, controlnet=...)``, and the ``__call__`` keyword of the map."""

    model: str
    pipeline: str
    image_keyword: str = "control_image"


@dataclass(frozen=True)
class IPAdapterArgs:
    """A family's IP-Adapter loader (``pipe.load_ip_adapter``): the defaults of the usual adapter
    repo's layout, and the loader's keyword for the image encoder's location."""

    subfolder: str
    weight_name: str
    encoder_keyword: str = "image_encoder_folder"


@dataclass(frozen=True)
class ReferenceArgs:
    """In-context references: a pipeline (``pipeline``, the family's own or one built with
    ``from_pipe``) takes reference images as ``image=``, up to ``max_images``; ``needs`` says, in
    words, which checkpoint was trained to read them. ``area_keyword``: the keyword that sets the
    output area (FLUX.1 Kontext rescales every output to it), given width x height; ``fixed``:
    keywords passed as they are on every call of that pipeline."""

    pipeline: str
    max_images: int
    needs: str = ""
    area_keyword: str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def call_kwargs(self, width: int, height: int) -> dict[str, Any]:
        area = {self.area_keyword: int(width) * int(height)} if self.area_keyword else {}
        return {**self.fixed, **area}


@dataclass(frozen=True)
class GenerationArgs:
    """How the family's pipeline ``__call__`` takes the sampler settings (from the diffusers
    0.42 signatures). ``guidance`` names the keyword that gets the spec's guidance; ``cfg`` says
    whether that is classifier-free guidance (with the negative prompt) or a distilled guidance
    embedding. ``negative``: ``given`` passes ``negative_prompt`` when one is set, ``always``
    every call (Qwen-Image's true CFG runs only with one), ``none``: the pipeline takes no
    negative prompt text. A LoRA's scale goes through ``pipe.set_adapters`` for every family."""

    guidance: str = "guidance_scale"
    cfg: bool = True
    negative: str = "given"
    ip_adapter: IPAdapterArgs | None = None
    controlnet: ControlNetArgs | None = None
    references: ReferenceArgs | None = None

    def describe(self) -> str:
        g = f"{self.guidance} ({'classifier-free' if self.cfg else 'distilled guidance embedding'})"
        neg = {"given": "negative prompt when set", "always": "negative prompt always passed",
               "none": "no negative prompt"}[self.negative]
        ip = self.ip_adapter
        ref = [f"IP-Adapter ({ip.subfolder or '.'}/{ip.weight_name})"] if ip else []
        ref += [f"ControlNet ({self.controlnet.pipeline})"] if self.controlnet else []
        if self.references:
            ref.append(f"in-context references ({self.references.pipeline}, up to {self.references.max_images})")
        return f"guidance: {g}; {neg}; references: {', '.join(ref) or 'none'}"


@dataclass(frozen=True)
class Family:
    """A model family. The functions receive the loaded diffusers pipeline (or
    :class:`Components`) and import what they need inside."""

    name: str
    title: str
    pipeline: str  # diffusers pipeline class name
    components: Mapping[str, str]  # component -> class name (diffusers or transformers)
    denoiser: str  # the pipeline attribute that is trained: 'unet' or 'transformer'
    text: TextEncoding
    latents: LatentFormat
    objective: Objective
    lora_targets: tuple[str, ...]  # peft target module names (suffixes) of the denoiser
    class_names: tuple[str, ...]  # model_index.json _class_name values that mean this family
    hub_patterns: tuple[str, ...]  # regexes (case-insensitive, searched) on hub ids
    sample: SampleDefaults
    size_multiple: int  # what image sides must be divisible by for the real model
    tiny: str  # builtin:<tiny> names the tiny random model
    tiny_version: int
    build_tiny: Callable[[Any], None] | None  # build_tiny(dest folder); None: built by runner.diffusion.tiny
    encode_captions: Callable[[Any, list[str]], list[dict[str, Any]]]
    to_model_latents: Callable[[Any, Any], Any]  # (pipe, raw latents sample) -> model latents
    predict: Callable[["Components", Any, Any, "Batch"], Any]  # (c, noisy, t, batch) -> prediction
    encode_images: Callable[[Any, Any], dict[str, Any]] | None = None  # default: vae_encode
    # the batch's embeddings with gradients (families whose text encoders the runner can train:
    # CLIP); None: the text encoders stay frozen
    encode_text: Callable[[Any, list[str]], dict[str, Any]] | None = None
    collate_text: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None  # default: stack
    extra_conditioning: str = ""  # in words: what else conditions the denoiser (time ids, image ids)
    variants: Mapping[str, str] = field(default_factory=dict)  # variant -> how it differs
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # from_pretrained extras
    # what diffusers' single-file loader calls this family's checkpoints (infer_diffusers_model_type)
    single_file_types: tuple[str, ...] = ()
    generation: GenerationArgs = field(default_factory=GenerationArgs)  # how its pipeline takes guidance, refs
    sizes: Any = None  # runner.diffusion.memory.ModelSizes of the real model (GPU memory estimate); None: unknown
    # the LoRA file for ComfyUI/A1111 (families.comfykit.Layout: native names, metadata); None: diffusers file only
    comfy: Any = None
    modality: str = "image"  # "video": listed only when asked (families.names(modality="video")), not trained
    video: Any = None  # families.videokit.VideoArgs of a video family (pipelines, frame rule, presets); else None

    def describe(self) -> str:
        """One line for the plan and the report: what is trained, on what objective."""
        o = self.objective
        if o.prediction == "flow":
            shift = "the scheduler's shift" if o.shift is None else f"shift {o.shift:g}"
            obj = f"flow matching, {o.timestep_sampling.replace('_', '-')} sigmas, {shift}"
            obj += f", guidance {o.guidance:g} where embedded" if o.guidance is not None else ""
        else:
            obj = "epsilon/v as the scheduler says" + (f", min-SNR {o.min_snr_gamma:g}" if o.min_snr_gamma else "")
        return (f"{self.title} ({self.name}): LoRA on the {self.denoiser} {self.components[self.denoiser]}; {obj}; "
                f"text: {self.text.outputs}, {self.text.max_tokens} tokens")

    def guidance_note(self, value: float, key: str) -> str | None:
        """A plan warning when ``value`` (the spec's ``key``) is far from the guidance a
        guidance-distilled family samples with (FLUX dev's embedded 3.5: a classifier-free
        scale such as 7 burns its images); None for classifier-free families, whose variants
        differ too much (Z-Image Turbo 0, base 5) to judge."""
        g = self.sample.guidance
        if self.generation.cfg or g / 2 - 0.5 <= value <= 1.5 * g + 1:
            return None
        return (f"warning: {key} {value:g} is far from the {g:g} {self.title} samples with (its distilled guidance "
                f"embedding, not classifier-free guidance); set it near {g:g}")

    def multiple_from_configs(self, denoiser_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> int:
        """What image sides must be divisible by, from the denoiser's and the VAE's configs: the
        VAE's downscale times the UNet's downsamplings, or times the DiT's patch side."""
        if "temperal_downsample" in vae_config:  # the causal 3D VAEs (Qwen-Image): one 2x per entry
            vae = 2 ** len(vae_config["temperal_downsample"])
        else:
            vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if self.denoiser == "unet":
            return vae * 2 ** (len(denoiser_config["block_out_channels"]) - 1)
        return vae * self.latents.patch

    def multiple_of(self, pipe) -> int:
        """:meth:`multiple_from_configs` of a loaded pipeline."""
        return self.multiple_from_configs(dict(getattr(pipe, self.denoiser).config), dict(pipe.vae.config))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return (self.collate_text or stack_text)(items)

    def images_to_raw(self, pipe, pixels) -> dict[str, Any]:
        return (self.encode_images or vae_encode)(pipe, pixels)


@dataclass
class Components:
    """What one training run holds of a loaded pipeline (see :func:`components_of`)."""

    family: Family
    pipe: Any
    denoiser: Any
    scheduler: Any  # DDPMScheduler for 'scheduler' objectives, the pipeline's flow scheduler otherwise
    objective: Objective
    # the denoisers trained (pipeline component names; videokit.select_experts sets them): () = the
    # family's denoiser. add_lora and save_lora act on each.
    experts: tuple[str, ...] = ()
    # sampled training sigmas restricted to [lo, hi) (one Wan 2.2 A14B expert's range); None: (0, 1)
    sigma_range: tuple[float, float] | None = None

    @property
    def device(self):
        return self.denoiser.device

    @property
    def dtype(self):
        return self.denoiser.dtype


@dataclass
class Batch:
    """One micro-batch, already on the CPU or the device. ``noise`` and ``timesteps`` (0..1000)
    are drawn from ``generator`` when not given (validation passes fixed ones)."""

    latents: Any  # model latents (B, C, H, W)
    text: dict[str, Any]  # family.collate(...) of the cached caption embeddings
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. SDXL's time_ids (B, 6)
    generator: Any = None
    noise: Any = None
    timesteps: Any = None


def components_of(pipe, family: Family, objective: Objective | None = None) -> Components:
    objective = objective or family.objective
    scheduler = pipe.scheduler
    if objective.prediction == "scheduler":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(family=family, pipe=pipe, denoiser=getattr(pipe, family.denoiser), scheduler=scheduler,
                      objective=objective)


# ---------------------------------------------------------------------------------------------
# defaults shared by families


def vae_encode(pipe, pixels) -> dict[str, Any]:
    """Raw latents of pixels in [-1, 1] ``(B, 3, H, W)``: the VAE distribution's mean and std,
    float32 on the CPU. fp16 VAEs are run in fp32 (SDXL's overflows in fp16)."""
    import torch

    vae = pipe.vae
    upcast = vae.dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    if upcast:
        vae.to(torch.float16)
    return {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu()}


def stack_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def pad_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Variable-length ``prompt_embeds`` (L_i, D) padded to the longest, with a 0/1 mask."""
    import torch

    longest = max(it["prompt_embeds"].shape[0] for it in items)
    embeds, masks = [], []
    for it in items:
        e = it["prompt_embeds"]
        pad = longest - e.shape[0]
        embeds.append(torch.cat([e, e.new_zeros(pad, e.shape[1])]))
        masks.append(torch.cat([torch.ones(e.shape[0], dtype=torch.long), torch.zeros(pad, dtype=torch.long)]))
    return {"prompt_embeds": torch.stack(embeds), "mask": torch.stack(masks)}


def split_batch(tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
    """{name: (B, ...)} -> one {name: (...)} per example, float32 on the CPU (for the cache)."""
    n = len(next(iter(tensors.values())))
    return [{k: v[i].detach().float().cpu() for k, v in tensors.items()} for i in range(n)]


def scale_shift(pipe, raw):
    """(raw - shift_factor) * scaling_factor, as the VAE config says (SD: no shift)."""
    cfg = pipe.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (raw - shift) * cfg.scaling_factor


# ---------------------------------------------------------------------------------------------
# the objective


def training_loss(c: Components, batch: Batch, *, weighted: bool = True):
    """Loss of each example of ``batch`` (shape ``(B,)``, float32) under the family's objective."""
    if c.objective.prediction == "flow":
        return _flow_loss(c, batch, weighted)
    return _scheduler_loss(c, batch, weighted)


def _noise(c: Components, batch: Batch):
    import torch

    x0 = batch.latents
    if batch.noise is not None:
        return batch.noise.to(x0.device, torch.float32)
    noise = torch.randn(x0.shape, generator=batch.generator)
    if c.objective.noise_offset > 0:
        offset = torch.randn((x0.shape[0], x0.shape[1]) + (1,) * (x0.ndim - 2), generator=batch.generator)
        noise = noise + c.objective.noise_offset * offset
    return noise.to(x0.device)


def _scheduler_loss(c: Components, batch: Batch, weighted: bool):
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    x0 = batch.latents.float()
    noise = _noise(c, batch)
    sched = c.scheduler
    t = batch.timesteps
    if t is None:
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=batch.generator)
    t = t.to(x0.device).long()
    noisy = sched.add_noise(x0, noise, t)
    ptype = sched.config.prediction_type
    target = noise if ptype == "epsilon" else sched.get_velocity(x0, noise, t)
    pred = c.family.predict(c, noisy, t, batch)
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    gamma = c.objective.min_snr_gamma
    if weighted and gamma and c.objective.weighting in ("min_snr", "none"):
        snr = compute_snr(sched, t)
        w = torch.clamp(snr, max=float(gamma))
        per = per * (w / snr if ptype == "epsilon" else w / (snr + 1))
    return per


def sample_sigmas(c: Components, batch_size: int, seq_len: int, generator=None):
    """Sigmas in (0, 1) for a batch: the objective's density, then its shift; with
    ``c.sigma_range`` the density conditioned on that range (draws outside it are rejected, so
    the shape inside the range is the unrestricted one)."""
    import torch

    if c.sigma_range is None:
        return _draw_sigmas(c, batch_size, seq_len, generator)
    lo, hi = c.sigma_range
    kept, n = [], 0
    for _ in range(RANGE_DRAWS):
        s = _draw_sigmas(c, max(64, 8 * batch_size), seq_len, generator)
        s = s[(s >= lo) & (s < hi)]
        kept.append(s)
        n += len(s)
        if n >= batch_size:
            return torch.cat(kept)[:batch_size]
    raise ValueError(f"the timestep sampling almost never draws sigmas in [{lo:g}, {hi:g}) (the trained expert's "
                     "range); widen the objective's logit_std or change its shift")


RANGE_DRAWS = 200  # rounds of candidate sigmas sample_sigmas draws for a restricted range before giving up


def _draw_sigmas(c: Components, batch_size: int, seq_len: int, generator=None):
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    o = c.objective
    u = compute_density_for_timestep_sampling(o.timestep_sampling if o.timestep_sampling != "uniform" else "none",
                                              batch_size, logit_mean=o.logit_mean, logit_std=o.logit_std,
                                              mode_scale=o.mode_scale, generator=generator)
    return shift_sigmas(c, u.clamp(1e-5, 1 - 1e-5), seq_len).to(torch.float32)


def shift_sigmas(c: Components, u, seq_len: int):
    """The shift the objective (or, with ``shift=None``, the model's scheduler) applies."""
    cfg = c.scheduler.config
    if c.objective.shift is None and cfg.get("use_dynamic_shifting"):
        mu = dynamic_mu(cfg, seq_len)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    shift = float(c.objective.shift if c.objective.shift is not None else cfg.get("shift", cfg.get("flow_shift", 1.0)))
    return shift * u / (1 + (shift - 1) * u)


def dynamic_mu(cfg, seq_len: int) -> float:
    """The resolution-dependent shift exponent of the flow pipelines (linear in the number of
    image tokens between the scheduler's base and max sequence lengths)."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return seq_len * m + base - m * base_len


def _clean_key_frame(c: Components, x0) -> bool:
    """A video family that conditions on the key frame by keeping a clip's first latent frame
    clean (``video.key_frame == "clean_first"``), on a clip of more than one latent frame (a still
    trains as text-to-video)."""
    video = c.family.video
    return bool(video is not None and video.key_frame == "clean_first" and x0.ndim == 5 and x0.shape[2] > 1)


def _flow_loss(c: Components, batch: Batch, weighted: bool):
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0 = batch.latents.float()
    noise = _noise(c, batch)
    if batch.timesteps is None:
        seq_len = (x0.shape[-2] // c.family.latents.patch) * (x0.shape[-1] // c.family.latents.patch)
        seq_len *= x0.shape[2] if x0.ndim == 5 else 1  # a clip's latent frames (B, C, F, H, W)
        sigmas = sample_sigmas(c, x0.shape[0], seq_len, batch.generator)
    else:
        sigmas = batch.timesteps.float() / 1000.0
    sigmas = sigmas.to(x0.device)
    s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    noisy = (1.0 - s) * x0 + s * noise
    clean_first = _clean_key_frame(c, x0)
    if clean_first:  # the key frame's latent frame stays clean, as the pipeline keeps it
        noisy = torch.cat([x0[:, :, :1], noisy[:, :, 1:]], dim=2)
    pred = c.family.predict(c, noisy, sigmas, batch)
    err = (pred.float() - (noise - x0)) ** 2
    per = (err[:, :, 1:] if clean_first else err).mean(dim=tuple(range(1, x0.ndim)))
    if weighted and c.objective.weighting in ("sigma_sqrt", "cosmap"):
        per = per * compute_loss_weighting_for_sd3(c.objective.weighting, sigmas).float()
    return per


# ---------------------------------------------------------------------------------------------
# LoRA


def unmatched_targets(model, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The targets that name no module of ``model`` (peft matches a target on a whole dotted
    suffix of a module name)."""
    names = [n for n, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def add_lora(c: Components, *, rank: int, alpha: float | None = None, targets=None, dropout: float = 0.0,
             seed: int | None = None):
    """Attach a LoRA adapter to the denoiser on ``targets`` (default: the family's). Fails with
    the names that match nothing. Returns the peft ``LoraConfig``."""
    import torch
    from peft import LoraConfig

    targets = list(targets or c.family.lora_targets)
    missing = unmatched_targets(c.denoiser, targets)
    if missing:
        from runner.core.errors import UserError

        raise UserError(f"LoRA target modules {missing} match no module of the {c.family.title} {c.family.denoiser}",
                        hint=f"The family's defaults are {', '.join(c.family.lora_targets)}.")
    if seed is not None:
        torch.manual_seed(seed)
    conf = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=targets)
    for module in _trained(c).values():  # the same seed stream: the first expert's init is a lone denoiser's
        module.add_adapter(conf)
    return conf


def _trained(c: Components) -> dict[str, Any]:
    """{component: module} of the denoisers with the LoRA (``c.experts``, or the family's denoiser)."""
    if not c.experts:
        return {c.family.denoiser: c.denoiser}
    return {name: getattr(c.pipe, name) for name in c.experts}


def save_lora(c: Components, folder, *, weight_name: str | None = None):
    """Write the denoiser's LoRA as the diffusers file ``<Pipeline>.load_lora_weights`` reads
    (:func:`runner.diffusion.lora.save_diffusers_lora`: alpha / r folded into lora_B). Returns
    the file's path; with several trained denoisers (``c.experts``: Wan 2.2 A14B) ``{component:
    path}``, one file each, every one written with the denoiser's prefix (``transformer.``) as
    diffusers writes a LoRA: the pipeline loads a second expert's with
    ``load_lora_weights(..., load_into_transformer_2=True)``."""
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.lora import DIFFUSERS_FILE, save_diffusers_lora

    modules = _trained(c)
    if not c.experts:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(c.denoiser).items()}
        return save_diffusers_lora(c.pipe, folder, {c.family.denoiser: sd}, weight_name=weight_name)
    out = {}
    stem = (weight_name or DIFFUSERS_FILE).removesuffix(".safetensors")
    for name, module in modules.items():
        sd = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(module).items()}
        name_on_disk = f"{stem}.safetensors" if name == c.family.denoiser else f"{stem}_{name}.safetensors"
        view = _with_denoiser(c.pipe, c.family.denoiser, module)
        out[name] = save_diffusers_lora(view, folder, {c.family.denoiser: sd}, weight_name=name_on_disk)
    return out


def _with_denoiser(pipe, denoiser: str, module):
    """What the diffusers writer reads of ``pipe`` (its class's ``save_lora_weights``, the
    component's peft config) with ``module`` as its ``denoiser``: a second expert's LoRA is
    written under the ``transformer.`` prefix, as diffusers expects it."""
    view = type("PipelineView", (), {"save_lora_weights": type(pipe).save_lora_weights})()
    setattr(view, denoiser, module)
    return view
