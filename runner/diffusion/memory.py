"""Peak GPU memory of a train stage, estimated from the model family and the settings, before
anything runs (the plan prints it and refuses a stage that cannot fit its GPU).

The model, per training step on the device (bytes; ``GiB`` = 2**30):

- **weights** of the components resident during the loop: the denoiser at 2 bytes a parameter
  (bf16/fp16; 4 with ``mixed_precision: no``), its ``nn.Linear`` weights at 1 byte (+1% for
  scales) when ``train.memory.quantize_base`` is int8 or fp8; the text encoders unless
  ``train.memory.text_encoders`` is offload or free (the embeddings are cached first); the VAE
  unless ``train.memory.offload_idle`` (latents are cached first). Parameter counts are those of
  the family's real model (:class:`ModelSizes`, ``Family.sizes``), not of its tiny one.
- **LoRA**: rank x ``lora_per_rank`` parameters in fp32 (the trainer keeps them in fp32) plus
  their fp32 gradients: 8 bytes a parameter; **optimizer** states: AdamW 8 bytes a parameter
  (two fp32 moments), 8-bit AdamW (bitsandbytes) 2.
- **activations** that autograd keeps for the backward pass, linear in the image tokens
  ``(resolution / (vae downscale x patch))**2`` (latent pixels for a UNet) and in the batch:
  ``batch x (per_token x tokens + per_image)``, where ``per_image`` is the part of the text tokens
  that run through the blocks. With gradient checkpointing only each block's inputs are kept, plus
  one block's activations while it is recomputed. The backward adds gradients in flight: 0.6 of
  the largest block's activations on top (1.25 blocks with checkpointing, recomputation
  included); measured 0.52 and 1.12 on the CPU with torch's profiler (bench/memory/cpu_check.py,
  bench/README.md), rounded up. The coefficients are *computed*: the family's own
  ``predict`` runs on the meta device (no memory, no weights) with a LoRA attached and every
  tensor saved for backward counted once (:func:`measure_activations`): attention as a fused
  kernel keeps it (q, k, v, output, log-sum-exp; no s x s matrix), and each LoRA module keeps its
  own bf16 copy of its input, as peft under autocast does. ``mixed_precision: no`` doubles them.
- **overhead**: 0.8 GiB (CUDA context, cuBLAS workspaces) + 8% of the rest (allocator
  fragmentation). The CUDA context is not in ``torch.cuda.max_memory_allocated``; nvidia-smi
  shows it.

The peak is the larger of the **loop** above and **caching**, before the loop: every component on
the device (the denoiser already quantized when asked), or with ``offload_idle`` one at a time
(diffusers' model CPU offload: the largest text encoder, or the VAE), plus the VAE encoding
batches of 8 images (four live tensors of 128 channels at full resolution an image). Checkpoint
samples run without gradients once the loop's activations are freed; with components off the
device they run under model CPU offload too, so they stay below the loop.

With FSDP over N GPUs (``hardware.parallel``, :func:`parallel_choice`) the estimate is of one
GPU: the denoiser's weights, its LoRA and the optimizer states divided by N, plus
:data:`FSDP_GATHERED` of the denoiser's weights for the blocks gathered whole while they run
(the one computing and the one prefetched; an allowance, not measured); the text encoders and the
VAE stay whole on every GPU, and the denoiser is not on the GPU while the caches fill (it is
sharded onto the GPUs after caching).

What was checked against what (docs/training.md, "GPU memory"): FLUX.1-dev LoRA at 1024 px with
an 8-bit base and checkpointing, the setting ai-toolkit documents for 24 GB cards, comes out at
about 16 GiB here; without quantization the bf16 transformer alone is 22.2 GiB. On the CPU the
activation counting matches the tensor bytes torch's profiler sees a real run keep
(bench/memory/cpu_check.py). No GPU was available to measure the estimate against
``torch.cuda.max_memory_allocated``; the CPU's peak RSS is not GPU memory and was not used as a
stand-in.
"""

from __future__ import annotations

from contextlib import contextmanager as contextlib_contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from runner.core.errors import UserError

GIB = float(2**30)
OVERHEAD_FIXED = 0.8 * GIB
OVERHEAD_SHARE = 0.08
QUANT_SCALE_OVERHEAD = 1.01  # int8/fp8 weights with their per-channel scales
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
LORA_BYTES = 8  # fp32 weight + fp32 gradient
BACKWARD_BLOCKS = 0.6  # largest blocks' worth of activations the backward adds (see the module doc)
BACKWARD_CHECKPOINTED = 1.25  # the same with checkpointing, the recomputed block included
VAE_ENCODE_BATCH = 8  # images per VAE call while caching (the trainer's batch)
VAE_LIVE = 4 * 128  # live tensors x channels of the VAE's first block at full resolution
FSDP_GATHERED = 0.1  # share of the denoiser's weights gathered whole at once under FSDP (two blocks of the DiTs' 20-60)


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of a family's real model (the published checkpoint; not of its tiny random one).

    ``params`` component -> parameters; ``linear_share`` the share of the denoiser's parameters
    in ``nn.Linear`` weights (what an 8-bit base stores in 8 bits); ``lora_per_rank`` LoRA
    parameters per unit of rank on the family's default targets; ``activations``,
    ``checkpointed`` and ``block``: (bytes per image token, bytes per image) at bf16, batch 1,
    without checkpointing, with it (block inputs), and of the largest block; ``source`` says which
    figures are computed and which quoted."""

    params: Mapping[str, float]
    denoiser: str
    linear_share: float
    lora_per_rank: float
    activations: tuple[float, float]
    checkpointed: tuple[float, float]
    block: tuple[float, float]
    source: str
    vae: str = "vae"
    text_encoders: tuple[str, ...] = ()

    @property
    def denoiser_params(self) -> float:
        return self.params[self.denoiser]


def sizes(params: Mapping[str, float], *, denoiser: str, linear_share: float, lora_per_rank: float,
          activations: tuple[float, float], checkpointed: tuple[float, float], block: tuple[float, float],
          source: str) -> ModelSizes:
    """A family's ``sizes=`` (text encoders: the components named text_encoder*)."""
    return ModelSizes(params=dict(params), denoiser=denoiser, linear_share=linear_share, lora_per_rank=lora_per_rank,
                      activations=activations, checkpointed=checkpointed, block=block, source=source,
                      text_encoders=tuple(k for k in params if k.startswith("text_encoder")))


@dataclass(frozen=True)
class Settings:
    """What the estimate reads of a train config (:meth:`defaults`: the schema's). The LoRA is
    counted on the family's default targets, whatever ``lora.target_modules`` says."""

    resolution: int
    batch_size: int
    rank: int
    mixed_precision: str
    gradient_checkpointing: bool
    optimizer: str
    quantize_base: str
    text_encoders: str
    offload_idle: bool
    train_text_encoder: bool

    @classmethod
    def defaults(cls) -> "Settings":
        from runner.spec.sections import TrainConfig

        return cls.of(TrainConfig.from_dict({}))

    @classmethod
    def of(cls, train: Any) -> "Settings":
        """From a typed train config (TrainConfig or TrainerConfig)."""
        from runner.spec.sections import MemoryConfig

        m = train.memory or MemoryConfig.from_dict({})
        return cls(resolution=train.resolution, batch_size=train.batch_size, rank=train.lora.rank,
                   mixed_precision=train.mixed_precision, gradient_checkpointing=train.gradient_checkpointing,
                   optimizer=train.optimizer, quantize_base=m.quantize_base, text_encoders=m.text_encoders,
                   offload_idle=m.offload_idle, train_text_encoder=train.lora.train_text_encoder)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one train stage on the device, by part (the loop) and the caching peak."""

    weights: float
    lora: float
    optimizer: float
    activations: float
    caching: float
    resident: tuple[str, ...]

    @property
    def loop(self) -> float:
        raw = self.weights + self.lora + self.optimizer + self.activations
        return raw + OVERHEAD_FIXED + OVERHEAD_SHARE * raw

    @property
    def peak(self) -> float:
        return max(self.loop, self.caching)

    def line(self, gpu: str, capacity_gib: float | None) -> str:
        where = f" on {gpu} ({capacity_gib:g} GiB)" if capacity_gib else f" on {gpu}"
        text = (f"peak GPU memory ~{gib(self.peak)} GiB{where} (weights {gib(self.weights)}, LoRA+optimizer "
                f"{gib(self.lora + self.optimizer)}, activations {gib(self.activations)}")
        if self.caching > self.loop:
            text += f"; while caching {gib(self.caching)}"
        return text + f"; resident: {', '.join(self.resident)})"


def gib(n: float) -> str:
    v = n / GIB
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def image_tokens(family: Any, resolution: int) -> int:
    lat = family.latents
    side = resolution // (lat.downscale * lat.patch)
    return side * side


def estimate(family: Any, s: Settings, shards: int = 1) -> Estimate:
    """The estimate of :mod:`this module <runner.diffusion.memory>` for ``family`` (its real model);
    ``shards`` > 1: one GPU's under FSDP over that many GPUs (see the module doc)."""
    z: ModelSizes = family.sizes
    wbytes = 4 if s.mixed_precision == "no" else 2
    dn = z.denoiser_params
    if s.quantize_base != "none":
        denoiser = dn * z.linear_share * QUANT_SCALE_OVERHEAD + dn * (1 - z.linear_share) * wbytes
    else:
        denoiser = dn * wbytes
    text = sum(z.params[k] for k in z.text_encoders) * wbytes
    vae = z.params.get(z.vae, 0.0) * wbytes
    keep_text = s.text_encoders == "keep" or s.train_text_encoder
    resident = [f"{z.denoiser}" + (f" ({s.quantize_base})" if s.quantize_base != "none" else "")]
    whole = denoiser
    if shards > 1:  # FSDP: a 1/N shard of the denoiser, plus the blocks gathered while they run
        denoiser = denoiser / shards + FSDP_GATHERED * denoiser
        resident[0] += f" (1/{shards} shard)"
    weights = denoiser
    if keep_text:
        weights += text
        resident += list(z.text_encoders)
    if not s.offload_idle:
        weights += vae
        resident.append(z.vae)
    lora_params = s.rank * z.lora_per_rank
    tokens = image_tokens(family, s.resolution)
    scale = s.batch_size * (2 if s.mixed_precision == "no" else 1)

    def act(coef: tuple[float, float]) -> float:
        return scale * (coef[0] * tokens + coef[1])

    block = act(z.block)
    if s.gradient_checkpointing:
        activations = act(z.checkpointed) + BACKWARD_CHECKPOINTED * block
    else:
        activations = act(z.activations) + BACKWARD_BLOCKS * block
    # caching: every component on the device (the denoiser in its loop dtype, quantized or not)
    # while the VAE encodes; with offload_idle under model CPU offload, one component at a time
    vae_encoding = VAE_ENCODE_BATCH * VAE_LIVE * s.resolution * s.resolution * wbytes
    if s.offload_idle:
        largest_text = max([z.params[k] * wbytes for k in z.text_encoders], default=0.0)
        caching = max(largest_text, vae + vae_encoding) + OVERHEAD_FIXED
    else:  # under FSDP the denoiser is sharded onto the GPUs after caching
        caching = (whole if shards == 1 else 0.0) + text + vae + vae_encoding + OVERHEAD_FIXED
    return Estimate(weights=weights, lora=lora_params * LORA_BYTES / shards,
                    optimizer=lora_params * OPTIMIZER_BYTES.get(s.optimizer, 8) / shards, activations=activations,
                    caching=caching, resident=tuple(resident))


# The switches tried, in order, when a stage does not fit: each adds to the ones before.
SWITCHES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("train.gradient_checkpointing: true", {"gradient_checkpointing": True}),
    ("train.memory.text_encoders: offload", {"text_encoders": "offload"}),
    ("train.memory.offload_idle: true", {"offload_idle": True}),
    ("train.memory.quantize_base: int8", {"quantize_base": "int8"}),
    ("train.optimizer: adamw8bit", {"optimizer": "adamw8bit"}),
)


def settings_that_fit(family: Any, s: Settings, capacity: float, shards: int = 1) -> tuple[list[str], Estimate] | None:
    """The fewest switches of :data:`SWITCHES` (in their order, each kept once on) that bring the
    peak under ``capacity`` bytes, with that estimate; None when even all of them do not."""
    from dataclasses import replace

    changed: list[str] = []
    current = s
    for label, change in SWITCHES:
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        if _not_applicable(change, current):
            continue
        current = replace(current, **change)
        changed.append(label)
        e = estimate(family, current, shards)
        if e.peak <= capacity:
            return changed, e
    return None


def _not_applicable(change: Mapping[str, Any], s: Settings) -> bool:
    """Switches that do not apply: the text encoders cannot leave while they train."""
    return "text_encoders" in change and s.train_text_encoder


# ---------------------------------------------------------------------------------------------
# the plan: one note per train stage, a refusal when it cannot fit


class GpuMemoryError(UserError):
    """A train stage's estimated peak GPU memory exceeds its GPU's (the plan refuses it)."""

    exit_code = 2


def default_memory() -> dict[str, Any]:
    from runner.spec.sections import MemoryConfig

    return MemoryConfig.from_dict({}).to_dict()


def keyed(config: dict[str, Any]) -> dict[str, Any]:
    """The node config without a ``memory`` entry that only repeats the defaults (so a spec that
    writes ``memory: {}`` or the defaults keeps the key it had before train.memory existed)."""
    from runner.spec.sections import MemoryConfig

    m = config.get("memory", ...)
    if m is None or (m is not ... and MemoryConfig.from_dict(m).to_dict() == default_memory()):
        config = {k: v for k, v in config.items() if k != "memory"}
    return config


def plan_family(base_model: str, model_family: str) -> tuple[Any | None, str]:
    """(family, why not) for the estimate, read without loading anything: the named family, a
    diffusers folder's model_index.json, or a hub id's well-known name. Tiny models and single
    files give no family here (the figures are of the real models; a single file's keys need
    diffusers, too heavy for the plan)."""
    from pathlib import Path

    from runner.diffusion import families

    if base_model.startswith("builtin:"):
        return None, "a tiny random model"
    if model_family != "auto":
        return families.get(model_family), ""
    p = Path(base_model)
    if (p / "model_index.json").is_file():
        try:
            return families.detect_folder(p), ""
        except UserError as exc:
            return None, exc.message
    if p.suffix in (".safetensors", ".ckpt"):
        return None, "a single-file checkpoint (set train.model_family for an estimate)"
    fam = families.detect_hub_id(base_model)
    return (fam, "") if fam else (None, "family unknown at plan time (set train.model_family for an estimate)")


@dataclass(frozen=True)
class Target:
    """Where a train stage runs, for the check: the GPU's name and memory (None: unknown), and
    whether the plan may refuse (not for CPU runs or unknown GPUs, not with memory_check)."""

    gpu: str
    capacity_gib: float | None
    check: str  # refuse | warn | off
    cpu: bool = False


def target_of(hardware: Any, gpu: str | None) -> Target:
    """The GPU a train stage runs on: the stage's remote GPU type with backend modal; locally the
    machine's first CUDA GPU as nvidia-smi reports it (none: a CPU run, never refused)."""
    from runner.core.pricing import gpu_memory_gib

    hw = hardware.to_dict() if hasattr(hardware, "to_dict") else dict(hardware)
    if hw.get("backend") != "local":
        return Target(gpu or "?", gpu_memory_gib(gpu, hw), hw.get("memory_check", "refuse"))
    local = None if hw.get("device") in ("cpu", "mps") else _local_gpu()
    if local is None:
        return Target("a GPU", None, "warn", cpu=True)
    name, total = local
    return Target(name, hw.get("gpu_memory_gib", {}).get(name, total), hw.get("memory_check", "refuse"))


_LOCAL: list = []


def _local_gpu() -> tuple[str, float] | None:
    """(name, GiB) of the first CUDA GPU from nvidia-smi, without importing torch; None without one."""
    if not _LOCAL:
        import shutil
        import subprocess

        found = None
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout
                name, mib = out.splitlines()[0].rsplit(",", 1)
                found = (name.strip(), round(float(mib) / 1024, 1))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                found = None
        _LOCAL.append(found)
    return _LOCAL[0]


def plan_note(node_id: str, train: Any, target: Target, shards: int = 1) -> str | None:
    """The plan's line for one train stage, or None when there is nothing to estimate; raises
    :class:`GpuMemoryError` when the stage cannot fit and the check refuses. ``shards`` > 1: the
    stage runs FSDP over that many GPUs (the figure is one GPU's, its shard)."""
    if target.check == "off":
        return None
    family, why = plan_family(train.base_model, train.model_family)
    if family is None and train.base_model.startswith("builtin:"):
        return None  # tiny random models: the figures are of the real ones, and nothing to check
    if family is None or getattr(family, "sizes", None) is None:
        return f"GPU memory: not estimated ({why or 'no sizes for this family'})"
    s = Settings.of(train)
    e = estimate(family, s, shards)
    note = e.line(target.gpu, target.capacity_gib) + f"; {family.title} figures"
    if target.cpu:
        return note + "; this run is local without a CUDA GPU: not checked"
    if target.capacity_gib is None:
        return note + f"; memory of {target.gpu} unknown: set hardware.gpu_memory_gib"
    capacity = target.capacity_gib * GIB
    if e.peak <= capacity:
        return note
    message = (f"{node_id}: estimated peak GPU memory ~{gib(e.peak)} GiB does not fit the {target.gpu} "
               f"({target.capacity_gib:g} GiB)")
    hint = refusal_hint(family, s, e, capacity, shards)
    if target.check == "warn":
        return note + f"; DOES NOT FIT: {hint}"
    raise GpuMemoryError(message, hint=hint)


def refusal_hint(family: Any, s: Settings, e: Estimate, capacity: float, shards: int = 1) -> str:
    """What would fit: the switches (computed, in the order of :data:`SWITCHES`), and the GPU
    types with enough memory for the settings as they are."""
    from runner.core.pricing import GPU_MEMORY_GIB

    parts = []
    fit = settings_that_fit(family, s, capacity, shards)
    if fit:
        changed, better = fit
        parts.append(f"settings that would fit (~{gib(better.peak)} GiB): {', '.join(changed)}")
    else:
        parts.append("no combination of train.gradient_checkpointing, train.memory and train.optimizer fits")
    bigger = [g for g, v in sorted(GPU_MEMORY_GIB.items(), key=lambda kv: kv[1]) if v * GIB >= e.peak]
    if bigger:
        parts.append(f"or a GPU with more memory as it is (hardware.stage_gpu: {{train: {bigger[0]}}})")
    parts.append("or hardware.memory_check: warn if your setup needs less (docs/training.md, GPU memory)")
    return "; ".join(parts) + "."


def parallel_choice(train: Any, target: Target, processes: int, setting: str) -> tuple[str, str]:
    """(ddp or fsdp, why) for a train stage of ``processes`` processes on ``target`` under
    ``hardware.parallel`` ``setting``: auto picks fsdp when the whole model's estimated peak does
    not fit one GPU but its sharded one (over ``processes`` GPUs) does, else ddp."""
    if setting != "auto":
        return setting, f"hardware.parallel: {setting}"
    family, _ = plan_family(train.base_model, train.model_family)
    if family is None or getattr(family, "sizes", None) is None or target.cpu or target.capacity_gib is None:
        return "ddp", "auto: no memory estimate for this model or GPU, so each process holds the whole model"
    s = Settings.of(train)
    if s.quantize_base != "none":
        return "ddp", "auto: an 8-bit base (train.memory.quantize_base) trains data-parallel only"
    capacity, cap = target.capacity_gib * GIB, f"{target.capacity_gib:g} GiB"
    whole = estimate(family, s).peak
    if whole <= capacity:
        return "ddp", f"auto: the whole model fits one GPU (~{gib(whole)} of {cap})"
    sharded = estimate(family, s, processes).peak
    if sharded > capacity:
        return "ddp", (f"auto: the whole model (~{gib(whole)} GiB) does not fit one GPU's {cap}, "
                       f"nor does a 1/{processes} shard (~{gib(sharded)} GiB)")
    return "fsdp", (f"auto: the whole model (~{gib(whole)} GiB) does not fit one GPU's {cap}, "
                    f"a 1/{processes} shard of the denoiser does (~{gib(sharded)} GiB)")


# ---------------------------------------------------------------------------------------------
# the trainer's side: quantize the frozen base, place the components (LoraTrainer calls these)


QUANTIZE_EXTRA = "pip install 'character-runner[quantize]'  (torchao)"


def quantize_denoiser(module, kind: str, device: str) -> str:
    """Store every ``nn.Linear`` weight of the frozen ``module`` in 8 bits with torchao's
    weight-only configs (int8: per-channel int8; fp8: float8 e4m3 with per-channel scales),
    moving it to ``device`` module by module on the way (the full-precision model never sits on
    the device). Done before the LoRA is attached: peft wraps the quantized linears
    (``TorchaoLoraLinear``) and trains its fp32 adapters on top. Returns what was done, in words."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise UserError(f"train.memory.quantize_base is {kind}, but torchao is not installed",
                        hint=f"Install the quantize extra: {QUANTIZE_EXTRA}; or set train.memory.quantize_base: "
                             "none.") from None
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    quantize_(module, config, device=device)
    return f"denoiser linear weights in {kind} (torchao {type(config).__name__})"


class Placement:
    """Where the pipeline's components live during a training run, from ``train.memory``. On
    the CPU only quantize_base and text_encoders: free do anything.

    - load: on CUDA, with an 8-bit base or offload_idle, the pipeline loads on the CPU;
      :meth:`place` quantizes the denoiser (moved to the device module by module) and moves the
      other components to the device;
    - :meth:`caching`: with offload_idle, the caches are filled under diffusers' model CPU offload
      (each component on the device only while it runs);
    - :meth:`after_caches`: the loop's placement: the denoiser on the device; text encoders
      kept, offloaded to the CPU (CUDA) or freed (any device: checkpoint samples are then
      skipped, they need the encoders); the VAE on the CPU with offload_idle;
    - :meth:`sampling`: with anything off the device, checkpoint samples run under model CPU
      offload, then the loop's placement comes back.

    Two-expert video families (Wan 2.2 A14B, ``train_video.memory.offload_idle_expert`` on CUDA;
    a no-op on the CPU): ``trained`` names the experts the run trains. An expert not trained is
    never put on the GPU; with both trained, the loop holds one expert's frozen weights on the GPU
    at a time (:meth:`swap_to` between steps; every LoRA weight and its optimizer state stay on
    the GPU, so nothing an optimizer step touches moves).

    ``sharded`` (FSDP on CUDA): the pipeline loads on the CPU, every component but the denoiser goes
    to the device, and the denoiser stays on the CPU until the trainer shards it onto the GPUs."""

    def __init__(self, memory_config: Any, device: str, trained: tuple[str, ...] = (), *,
                 sharded: bool = False) -> None:
        from runner.spec.sections import MemoryConfig

        self.m = memory_config or MemoryConfig.from_dict({})
        self.device = device
        self.cuda = device.startswith("cuda")
        self.offload_idle = self.cuda and self.m.offload_idle
        self.trained = tuple(trained)
        self.sharded = self.cuda and sharded
        self.offload_expert = self.cuda and bool(self.trained) and bool(getattr(self.m, "offload_idle_expert", False))
        self.resident: tuple[str, ...] = ()  # the experts on the device in the loop (set by place)
        self.offloaded: list[str] = []
        self.freed = False
        self.done: list[str] = []

    @property
    def load_device(self) -> str:
        cpu_first = self.m.quantize_base != "none" or self.m.offload_idle or self.offload_expert or self.sharded
        return "cpu" if self.cuda and cpu_first else self.device

    def denoisers(self, family) -> tuple[str, ...]:
        """The family's denoisers (Wan 2.2 A14B: both experts)."""
        video = getattr(family, "video", None)
        return tuple(video.experts) if video is not None else (family.denoiser,)

    def place(self, pipe, family) -> None:
        names = self.denoisers(family)
        self.resident = (self.trained[0],) if self.offload_expert else names
        if self.m.quantize_base != "none":
            for name in names if not self.offload_expert else self.trained:
                where = self.device if name in self.resident else "cpu"
                self.done.append(quantize_denoiser(getattr(pipe, name), self.m.quantize_base, where)
                                 + (f" ({name})" if len(names) > 1 else ""))
        if self.load_device != self.device and not self.offload_idle:
            todo = [*family.text.encoders, "vae"]
            if self.m.quantize_base == "none" and self.offload_expert:
                todo += list(self.resident)
            for name in todo:
                module = getattr(pipe, name, None)
                if module is not None:
                    module.to(self.device)
        idle = [n for n in names if n not in self.resident]
        if idle:
            self.done.append(f"{', '.join(idle)} kept on the CPU (offload_idle_expert" +
                             (": not trained)" if not set(idle) & set(self.trained) else
                              ": the experts take turns on the GPU, one per step)"))

    def swap_to(self, pipe, name: str) -> bool:
        """Make ``name`` the expert on the device (its frozen weights in, the other's out; LoRA
        weights never move); True when something moved. A no-op unless offload_idle_expert with
        both experts trained on CUDA."""
        if not self.offload_expert or len(self.trained) < 2 or self.resident == (name,):
            return False
        for other in self.trained:
            if other != name:
                move_frozen(getattr(pipe, other), "cpu")
        move_frozen(getattr(pipe, name), self.device)
        self.resident = (name,)
        return True

    def caching(self, pipe):
        """A context for filling the caches (see the class doc)."""
        import contextlib

        if not self.offload_idle:
            return contextlib.nullcontext()
        self.done.append("caches filled under model CPU offload")
        return self._offloaded(pipe)

    @contextlib_contextmanager
    def _offloaded(self, pipe):
        pipe.enable_model_cpu_offload(device=self.device)
        try:
            yield
        finally:
            pipe.remove_all_hooks()

    def after_caches(self, pipe, family) -> list[str]:
        """The loop's placement; returns the names of the text encoders left."""
        encoders = [n for n in family.text.encoders if getattr(pipe, n, None) is not None]
        if self.m.text_encoders == "free":
            for name in encoders:
                setattr(pipe, name, None)
            self.freed, encoders = True, []
            self.done.append("text encoders freed after caching (no checkpoint samples)")
        elif self.m.text_encoders == "offload" and self.cuda:
            self.offloaded += encoders
            self.done.append("text encoders offloaded to the CPU after caching")
        if self.offload_idle:
            self.offloaded.append("vae")
            self.done.append("VAE on the CPU during the loop")
        if self.cuda:
            self._restore(pipe, family)
        return encoders

    def _restore(self, pipe, family) -> None:
        import torch

        denoisers = self.denoisers(family)
        for name in (*denoisers, "vae", *family.text.encoders):
            module = getattr(pipe, name, None)
            if module is None or (self.sharded and name in denoisers):  # FSDP places the denoiser's shards
                continue
            idle = name in denoisers and name not in (self.resident or denoisers)
            if name in denoisers and name in self.trained and self.offload_expert:
                move_frozen(module, self.device if not idle else "cpu", trainable=self.device)
            else:
                module.to("cpu" if name in self.offloaded or idle else self.device)
        torch.cuda.empty_cache()

    def sampling(self, pipe, family):
        """A context for checkpoint samples (see the class doc)."""
        import contextlib

        if not self.offloaded:
            return contextlib.nullcontext()
        return self._sampling(pipe, family)

    @contextlib_contextmanager
    def _sampling(self, pipe, family):
        with self._offloaded(pipe):
            yield
        self._restore(pipe, family)


def move_frozen(module, device: str | None, *, trainable: str | None = None) -> None:
    """Move ``module``'s frozen parameters and buffers to ``device`` in place (``param.data``, so
    the parameters stay the objects an optimizer holds); trainable ones (a LoRA) go to
    ``trainable``. None: those stay where they are."""
    import torch

    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            target = None if p is None else trainable if p.requires_grad else device
            if target is None or p.device == _device(target):
                continue
            moved = p.data.to(target)
            if p.requires_grad or torch._has_compatible_shallow_copy_type(p.data, moved):
                p.data = moved
            else:  # a tensor subclass (torchao's 8-bit weights): a new frozen Parameter, as Module.to makes
                sub._parameters[key] = torch.nn.Parameter(moved, requires_grad=False)
        for key, buf in sub._buffers.items():
            if device is not None and buf is not None and buf.device != _device(device):
                sub._buffers[key] = buf.to(device)


def _device(name: str):
    import torch

    d = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


# ---------------------------------------------------------------------------------------------
# computing the sizes of a model (bench/memory/real_sizes.py runs these on the real configs)


def count_params(module) -> float:
    return float(sum(p.numel() for p in module.parameters()))


def linear_share(module) -> float:
    import torch

    lin = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return round(lin / max(1.0, count_params(module)), 4)


def lora_targets_of(module, targets: Iterable[str]) -> list:
    """The ``nn.Linear`` modules peft targets for ``targets`` (a name equal to or ending in
    ``.<target>``)."""
    import torch

    targets = tuple(targets)
    return [m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)]


def lora_params_per_rank(module, targets: Iterable[str]) -> float:
    """LoRA A (rank x in) plus B (out x rank) of every targeted linear, per unit of rank."""
    return float(sum(m.in_features + m.out_features for m in lora_targets_of(module, targets)))


CHECKPOINT_UNITS = ("transformer_blocks", "single_transformer_blocks", "layers", "noise_refiner", "context_refiner",
                    "resnets", "attentions", "joint_blocks")


def measure_activations(family: Any, denoiser, text: Mapping[str, tuple[int, ...] | None],
                        resolutions: tuple[int, int] = (512, 1024), *, latents: tuple[int, int] | None = None,
                        rank: int = 16) -> dict[str, tuple[float, float]]:
    """(bytes per image token, bytes per image) at bf16, batch 1, of what autograd keeps for the
    backward pass of ``family.predict`` on ``denoiser`` (a module on the meta device, or a small
    real one on the CPU), fitted on two resolutions: ``activations`` (no checkpointing),
    ``checkpointed`` (the inputs of each checkpointed block and what is saved outside blocks)
    and ``block`` (the largest block's own). ``text``: the shape of one caption's cached tensor
    per name (None: left out); ``latents``: (channels, downscale) of the model latents when the
    family folds patches into channels (default: the family's channels and VAE downscale)."""
    fits = {}
    points = [_saved_bytes(family, denoiser, text, r, latents, rank) for r in resolutions]
    (t1, s1), (t2, s2) = [(image_tokens(family, r), p) for r, p in zip(resolutions, points)]
    for key in ("activations", "checkpointed", "block"):
        a = (s2[key] - s1[key]) / (t2 - t1)
        fits[key] = (round(a, 1), round(max(0.0, s1[key] - a * t1), 1))
    return fits


def _saved_bytes(family, denoiser, text, resolution, latents, rank) -> dict[str, float]:
    import torch

    from runner.diffusion.families.base import Batch, Components

    _with_lora(denoiser, family.lora_targets, rank)
    device = next(denoiser.parameters()).device
    ch, down = latents or (family.latents.channels, family.latents.downscale)
    side = resolution // down
    dtype = torch.bfloat16
    noisy = torch.zeros((1, ch, side, side), device=device, dtype=dtype)
    items = [{k: torch.zeros(shape, device=device, dtype=dtype) for k, shape in text.items() if shape is not None}]
    batch = Batch(latents=noisy, text=family.collate(items))
    c = Components(family=family, pipe=_stand_in_pipe(family), denoiser=denoiser, scheduler=None,
                   objective=family.objective)
    t = torch.full((1,), 0.5 if family.objective.prediction == "flow" else 500, device=device,
                   dtype=dtype if family.objective.prediction == "flow" else torch.long)
    counter = _SavedCounter(denoiser)
    done = []
    hook = denoiser.register_forward_hook(lambda *a: done.append(True))
    try:
        with counter, torch.enable_grad(), _fused_attention():
            family.predict(c, noisy, t, batch)
    except RuntimeError:
        # unpacking after the denoiser that the meta device cannot run (FLUX.2 scatters by its
        # ids, reading their maximum): it keeps nothing sizeable for backward
        if not done:
            raise
    finally:
        hook.remove()
    return counter.result()


def _with_lora(denoiser, targets, rank: int) -> None:
    """A bf16 LoRA on the family's targets (once), each module's input copied as peft's cast under
    autocast copies it."""
    import torch

    if getattr(denoiser, "_memory_lora", False):
        return
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    denoiser.to(torch.bfloat16)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(targets)))
    for name, m in denoiser.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda mod, args: (args[0].clone(),) + tuple(args[1:]))
    denoiser._memory_lora = True


def _stand_in_pipe(family):
    """An instance of the family's pipeline class without components: ``predict`` reads only
    its class methods and ``vae_scale_factor``."""
    import diffusers

    pipe = object.__new__(getattr(diffusers, family.pipeline))
    object.__setattr__(pipe, "vae_scale_factor", family.latents.downscale)
    return pipe


class _SavedCounter:
    """Counts every tensor saved for backward once (views by their base; parameters not at all),
    and per checkpointed block what it saves and takes as input."""

    def __init__(self, denoiser) -> None:
        self.denoiser = denoiser
        self.total = 0.0
        self.seen: dict[int, Any] = {}
        self.inputs: dict[int, Any] = {}
        self.unit_saved: list[float] = []
        self.handles: list = []
        self.depth = 0

    def _bytes_once(self, t, seen: dict[int, Any]) -> float:
        import torch

        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter) or id(base) in seen:
            return 0.0
        seen[id(base)] = base  # kept alive so ids stay unique
        return float(base.numel() * base.element_size())

    def pack(self, t):
        self.total += self._bytes_once(t, self.seen)
        return t

    def __enter__(self):
        import torch

        units = [m for name, mod in self.denoiser.named_modules() if name.split(".")[-1] in CHECKPOINT_UNITS
                 and isinstance(mod, torch.nn.ModuleList) for m in mod]
        inner = {id(sub) for u in units for sub in u.modules() if sub is not u}
        for u in units:
            if id(u) in inner:
                continue
            self.handles.append(u.register_forward_pre_hook(self._enter_unit, with_kwargs=True))
            self.handles.append(u.register_forward_hook(self._leave_unit))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def _enter_unit(self, module, args, kwargs):
        import torch

        if self.depth == 0:
            self.start = self.total
            for v in (*args, *kwargs.values()):
                for t in (v if isinstance(v, (tuple, list)) else (v,)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        self.inputs.setdefault(id(t), t)
        self.depth += 1

    def _leave_unit(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            self.unit_saved.append(self.total - self.start)

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def result(self) -> dict[str, float]:
        inside = sum(self.unit_saved)
        kept_inputs = sum(float(t.numel() * t.element_size()) for t in self.inputs.values())
        return {"activations": self.total, "checkpointed": self.total - inside + kept_inputs,
                "block": max(self.unit_saved, default=0.0)}


class _fused_attention:
    """``scaled_dot_product_attention`` as a fused kernel saves for backward: q, k, v, the output
    and a float32 log-sum-exp per query and head (not the attention matrix, which the math
    fallback the meta device would take keeps)."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self.original = F.scaled_dot_product_attention

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = q.new_empty((*q.shape[:-1], v.shape[-1]))
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):  # pragma: no cover - never run (counting only)
                raise NotImplementedError

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            q, k, v = query, key, value
            if enable_gqa and k.shape[-3] != q.shape[-3]:
                rep = q.shape[-3] // k.shape[-3]
                k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
            return Fused.apply(q, k, v)

        F.scaled_dot_product_attention = sdpa
        torch.nn.functional.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        import torch

        torch.nn.functional.scaled_dot_product_attention = self.original


# ---------------------------------------------------------------------------------------------
# video families (issue 16 part 4): LoRA training and generation, estimated from the real models'
# published configs. Parameter counts: the diffusers classes built on the meta device with the
# configs' numbers (bench/memory/video_sizes.py). Activations per token are *computed from
# the block's shape* (not profiled, not measured on a GPU; there was none): a transformer block
# keeps about 20 x dim + 3 x ffn_dim bf16 values per token for its backward (norms, q/k/v/out,
# the FFN's input, hidden and activation, LoRA input copies); with checkpointing only the block
# inputs (dim values a token per block) stay, plus one block recomputed (BACKWARD_CHECKPOINTED).


@dataclass(frozen=True)
class VideoSizes:
    """A video family's real model: ``params`` per component (``transformer`` is one expert),
    ``experts`` denoisers of that size (2 for Wan 2.2 A14B), the blocks' ``dim``/``ffn``/``layers``,
    the VAE's ``spatial``/``temporal`` compression and the transformer's spatial ``patch``, the VAE
    decoder's widest channels and the frames it decodes at once (``decode_frames``; 0 = all), its
    tile side in pixels with tiling on; ``source`` says where the numbers come from."""

    params: Mapping[str, float]
    experts: int
    dim: int
    ffn: int
    layers: int
    spatial: int
    temporal: int
    patch: int
    decoder_channels: int
    decode_frames: int
    tile: int
    source: str

    @property
    def text_params(self) -> float:
        return sum(v for k, v in self.params.items() if k.startswith("text_encoder"))

    @property
    def block_bytes_per_token(self) -> float:
        return (20 * self.dim + 3 * self.ffn) * 2.0

    @property
    def lora_per_rank(self) -> float:
        # q, k, v, o of self- and cross-attention (d x d each) and the FFN's two linears, per block
        return self.layers * (8 * 2 * self.dim + 2 * (self.dim + self.ffn))


_VIDEO_SOURCE = ("parameter counts: diffusers classes on the meta device with the published config.json "
                 "numbers (bench/memory/video_sizes.py); activations computed from the block shape; "
                 "not measured on a GPU")
TILE_FRAMES = 16  # frames of a temporal tile (diffusers' LTX VAEs, tile_sample_min_num_frames)
VIDEO_SIZES: dict[str, VideoSizes] = {
    # Lightricks/LTX-Video 0.9.x (2B): 28 layers, 32 heads x 64, T5-XXL encoder, VAE 32x spatial / 8x temporal
    "ltx_video": VideoSizes({"transformer": 1923.4e6, "text_encoder": 4762.3e6, "vae": 419.2e6}, 1, 2048, 8192, 28,
                            32, 8, 1, 128, 0, 512, _VIDEO_SOURCE),
    # Lightricks/LTX-2 (19B audio+video): LTX2VideoTransformer3DModel defaults (48 layers, 32 heads x 128),
    # Gemma 3 12B text encoder (11.8e9, quoted from its model card), AutoencoderKLLTX2Video defaults
    "ltx2": VideoSizes({"transformer": 18876.2e6, "text_encoder": 11766.0e6, "vae": 1222.5e6}, 1, 4096, 16384, 48,
                       32, 8, 1, 128, 0, 512, _VIDEO_SOURCE),
    # Wan-AI/Wan2.2-I2V-A14B: two experts of 40 layers, 40 heads x 128, ffn 13824, in 36; umT5-XXL encoder
    # (5.68e9, quoted); Wan 2.1 VAE (AutoencoderKLWan defaults), causal: 4 frames a decoder call
    "wan22_i2v": VideoSizes({"transformer": 14288.9e6, "text_encoder": 5680.0e6, "vae": 126.9e6}, 2, 5120, 13824, 40,
                            8, 4, 2, 96, 4, 256, _VIDEO_SOURCE),
    # Wan-AI/Wan2.2-TI2V-5B: 30 layers, 24 heads x 128, ffn 14336, in/out 48; Wan 2.2 VAE (z 48, 16x spatial)
    "wan22_ti2v": VideoSizes({"transformer": 4999.8e6, "text_encoder": 5680.0e6, "vae": 704.7e6}, 1, 3072, 14336, 30,
                             16, 4, 2, 256, 4, 256, _VIDEO_SOURCE),
}


def video_sizes(family: Any) -> VideoSizes | None:
    name = family if isinstance(family, str) else getattr(family, "name", "")
    return VIDEO_SIZES.get(name)


def video_tokens(z: VideoSizes, frames: int, width: int, height: int) -> int:
    """latent frames x (H / spatial / patch) x (W / spatial / patch)."""
    lf = (frames - 1) // z.temporal + 1
    return lf * (height // z.spatial // z.patch) * (width // z.spatial // z.patch)


def _video_memory_default(key: str) -> Any:
    from runner.spec.config import schema_default

    return schema_default("train_video", "memory", key)


@dataclass(frozen=True)
class VideoSettings:
    """What the video estimate reads: train_video.memory's keys (quantize_base, text_encoders,
    offload_idle, and ``offload_idle_expert``: Wan A14B's one expert on the GPU at a time, as
    the trainer's Placement keeps it), their defaults the schema's (what the trainer uses when
    the spec leaves them out), and ``block_swap`` (N transformer blocks on the CPU; estimated,
    refused when asked: not implemented in the trainer, not a schema key)."""

    rank: int = 16
    batch_size: int = 1
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"
    quantize_base: str = _video_memory_default("quantize_base")
    text_encoders: str = _video_memory_default("text_encoders")
    offload_idle: bool = _video_memory_default("offload_idle")
    offload_idle_expert: bool = _video_memory_default("offload_idle_expert")
    block_swap: int = 0

    @classmethod
    def of(cls, memory_cfg: Any = None, **train: Any) -> "VideoSettings":
        m = memory_cfg.to_dict() if hasattr(memory_cfg, "to_dict") else dict(memory_cfg or {})
        keys = {k: m[k] for k in ("quantize_base", "text_encoders", "offload_idle", "offload_idle_expert",
                                  "block_swap") if m.get(k) is not None}
        keys.update({k: v for k, v in train.items() if v is not None and k in cls.__dataclass_fields__})
        return cls(**keys)


def video_train_estimate(z: VideoSizes, s: VideoSettings, frames: int, width: int, height: int,
                         experts_trained: int | None = None) -> Estimate:
    """Peak bytes of a video LoRA training step (bf16, batch ``s.batch_size``)."""
    dn = z.params["transformer"]
    one = dn * QUANT_SCALE_OVERHEAD if s.quantize_base != "none" else dn * 2.0
    layers_on = max(z.layers - s.block_swap, 1)
    one *= layers_on / z.layers
    resident_experts = 1 if (z.experts == 1 or s.offload_idle_expert) else z.experts
    weights = one * resident_experts
    resident = [f"transformer{' (' + s.quantize_base + ')' if s.quantize_base != 'none' else ''}"
                + (f" x{resident_experts} experts" if resident_experts > 1 else "")
                + (f", {s.block_swap} blocks swapped to CPU" if s.block_swap else "")]
    if s.text_encoders == "keep":
        weights += z.text_params * 2
        resident.append("text encoder")
    vae = z.params["vae"] * 2
    if not s.offload_idle:
        weights += vae
        resident.append("vae")
    n_trained = experts_trained or z.experts
    lora_params = s.rank * z.lora_per_rank * n_trained
    tokens = video_tokens(z, frames, width, height) * s.batch_size
    block = z.block_bytes_per_token * tokens
    if s.gradient_checkpointing:
        activations = z.layers * z.dim * 2.0 * tokens + BACKWARD_CHECKPOINTED * block
    else:
        activations = z.layers * block + BACKWARD_BLOCKS * block
    # caching: the VAE encodes one clip with its tiling on (causal VAEs a few frames at a time), the
    # text encoder alone
    px = min(width * height, z.tile * z.tile) * (z.decode_frames or min(frames, TILE_FRAMES))
    encoding = px * z.decoder_channels * 4 * 2.0
    caching = max(z.text_params * 2, vae + encoding) + OVERHEAD_FIXED
    if not s.offload_idle:
        caching += weights
    return Estimate(weights=weights, lora=lora_params * LORA_BYTES,
                    optimizer=lora_params * OPTIMIZER_BYTES.get(s.optimizer, 8), activations=activations,
                    caching=caching, resident=tuple(resident))


VIDEO_SWITCHES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("train_video.gradient_checkpointing: true", {"gradient_checkpointing": True}),
    ("train_video.memory.text_encoders: free", {"text_encoders": "free"}),
    ("train_video.memory.offload_idle: true", {"offload_idle": True}),
    ("train_video.memory.offload_idle_expert: true", {"offload_idle_expert": True}),
    ("train_video.memory.quantize_base: int8", {"quantize_base": "int8"}),
    ("train_video.optimizer: adamw8bit", {"optimizer": "adamw8bit"}),
)


def _video_fit(z: VideoSizes, s: VideoSettings, capacity: float, frames: int, width: int, height: int,
               n: int | None) -> tuple[list[str], Estimate] | None:
    from dataclasses import replace

    changed: list[str] = []
    cur = s
    for label, change in VIDEO_SWITCHES:
        if all(getattr(cur, k) == v for k, v in change.items()):
            continue
        if "offload_idle_expert" in change and z.experts == 1:
            continue
        cur = replace(cur, **change)
        changed.append(label)
        e = video_train_estimate(z, cur, frames, width, height, n)
        if e.peak <= capacity:
            return changed, e
    return None


def _smaller_shapes(z: VideoSizes, s: VideoSettings, capacity: float, frames: int, width: int, height: int,
                    n: int | None) -> str:
    """The largest frame count (k*temporal+1, at this size) that fits with the settings as they are."""
    f = frames
    while f > 1:
        f = max(1, f - z.temporal * max(1, (f // z.temporal) // 4))
        f = (f - 1) // z.temporal * z.temporal + 1
        if video_train_estimate(z, s, f, width, height, n).peak <= capacity:
            return f"or clips of {f} frames at {width}x{height} (train_video.frame_buckets)"
    return ""


def video_train_note(node_id: str, family: Any, frames: int, width: int, height: int, memory_cfg: Any,
                     target: Target, *, rank: int = 16, batch_size: int = 1, optimizer: str = "adamw",
                     gradient_checkpointing: bool = True, experts: str = "both") -> str | None:
    """The plan's line for a train_video stage at its largest bucket (``frames`` x ``width`` x
    ``height``), or None; raises :class:`GpuMemoryError` when it cannot fit and the check refuses,
    naming the settings that would. ``memory_cfg``: train_video.memory (a dict or typed config)."""
    if target.check == "off":
        return None
    z = video_sizes(family)
    title = getattr(family, "title", str(family))
    if z is None:
        return "GPU memory: not estimated (no sizes for this family)"
    s = VideoSettings.of(memory_cfg, rank=rank, batch_size=batch_size, optimizer=optimizer,
                         gradient_checkpointing=gradient_checkpointing)
    if s.block_swap:
        raise UserError(f"{node_id}: train_video.memory.block_swap: {s.block_swap} is not implemented by the "
                        "video trainer (it would keep that many transformer blocks on the CPU)",
                        hint="set block_swap: 0; use offload_idle_expert, quantize_base: int8 or smaller "
                             "frame buckets instead")
    n = 1 if (z.experts > 1 and experts != "both") else None
    e = video_train_estimate(z, s, frames, width, height, n)
    shape = f"{frames}x{height}x{width}, {video_tokens(z, frames, width, height)} tokens"
    note = e.line(target.gpu, target.capacity_gib) + f"; {title} figures at {shape} (computed from configs)"
    if target.cpu:
        return note + "; this run is local without a CUDA GPU: not checked"
    if target.capacity_gib is None:
        return note + f"; memory of {target.gpu} unknown: set hardware.gpu_memory_gib"
    capacity = target.capacity_gib * GIB
    if e.peak <= capacity:
        return note
    parts = []
    fit = _video_fit(z, s, capacity, frames, width, height, n)
    if fit:
        parts.append(f"settings that would fit (~{gib(fit[1].peak)} GiB): {', '.join(fit[0])}")
    else:
        parts.append("no combination of train_video.gradient_checkpointing, train_video.memory and "
                     "train_video.optimizer fits")
    smaller = _smaller_shapes(z, s, capacity, frames, width, height, n)
    if not smaller and not fit:
        from dataclasses import replace

        every = s
        for _label, change in VIDEO_SWITCHES:
            every = replace(every, **change)
        smaller = _smaller_shapes(z, every, capacity, frames, width, height, n)
        smaller = smaller and smaller.replace("or clips", "clips", 1) + ", with all of those settings on"
    if smaller:
        parts.append(smaller)
    hint = "; ".join(parts)
    if target.check == "warn":
        return note + f"; DOES NOT FIT: {hint}"
    raise GpuMemoryError(f"{node_id}: estimated peak GPU memory ~{gib(e.peak)} GiB does not fit the "
                         f"{target.gpu} ({target.capacity_gib:g} GiB)", hint=hint)


def video_generate_estimate(z: VideoSizes, frames: int, width: int, height: int, *, offload: str = "model",
                            vae_tiling: bool = True) -> float:
    """Peak bytes of the video stage's generation (bf16, no gradients). ``offload``: none (every
    component on the device), model (diffusers model CPU offload: one component at a time; the
    experts take turns) or group (block-level group offload: one transformer block at a time)."""
    tokens = video_tokens(z, frames, width, height)
    working = 0.5 * z.block_bytes_per_token * tokens * 2  # one block's working set, cond + uncond batch
    dn = z.params["transformer"] * 2
    if offload == "none":
        weights = dn * z.experts + z.text_params * 2 + z.params["vae"] * 2
    elif offload == "group":
        weights = dn / z.layers * 2
    else:
        weights = max(dn, z.text_params * 2)
    px = min(width * height, z.tile * z.tile) if vae_tiling else width * height
    chunk = z.decode_frames or (min(frames, TILE_FRAMES) if vae_tiling else frames)
    decode = px * chunk * z.decoder_channels * 4 * 2.0
    loop = weights + working
    vae_peak = z.params["vae"] * 2 + decode
    if offload == "none":
        vae_peak += weights - z.params["vae"] * 2
    raw = max(loop, vae_peak)
    return raw + OVERHEAD_FIXED + OVERHEAD_SHARE * raw


def video_generate_note(node_id: str, family: Any, frames: int, width: int, height: int, target: Target, *,
                        offload: str = "model", vae_tiling: bool = True) -> str | None:
    """The plan's line for the video stage (a note; never refuses: diffusers' offload can always
    go further, the note says which setting would fit)."""
    if target.check == "off":
        return None
    z = video_sizes(family)
    if z is None:
        return None
    peak = video_generate_estimate(z, frames, width, height, offload=offload, vae_tiling=vae_tiling)
    where = f" on {target.gpu} ({target.capacity_gib:g} GiB)" if target.capacity_gib else f" on {target.gpu}"
    note = (f"GPU memory ~{gib(peak)} GiB{where} generating {frames}x{height}x{width} (offload {offload}, "
            f"VAE tiling {'on' if vae_tiling else 'off'}; {getattr(family, 'title', family)} figures computed "
            "from configs)")
    if target.capacity_gib and peak > target.capacity_gib * GIB and not target.cpu:
        for off, tile in (("model", True), ("group", True)):
            p = video_generate_estimate(z, frames, width, height, offload=off, vae_tiling=tile)
            if p <= target.capacity_gib * GIB:
                return note + f"; DOES NOT FIT: offload {off} with VAE tiling would (~{gib(p)} GiB)"
        return note + "; DOES NOT FIT even with group offload and VAE tiling: fewer frames or a smaller size"
    return note


GENERATE_LADDER = (("none", False), ("none", True), ("model", True), ("group", True))


def video_generate_memory(spec: Mapping[str, Any], config: Mapping[str, Any], family: Any) -> dict[str, Any]:
    """``generate.video.offload`` and ``vae_tiling`` with ``auto`` resolved (the video stage's node
    config takes these): for a tiny random model, a CPU run or an unknown family, no offload and no
    tiling; else the first rung of GENERATE_LADDER whose estimated peak fits the stage's GPU
    (offload model with tiling when the GPU's memory is unknown). A value the spec sets is kept;
    tiling ``auto`` is on whenever offload is not none."""
    offload, tiling = str(config.get("offload", "auto")), config.get("vae_tiling", "auto")
    if offload == "auto":
        offload = _auto_offload(spec, config, family, None if tiling == "auto" else bool(tiling))
    if tiling == "auto":
        tiling = offload != "none" or (offload == "none" and _untiled_too_big(spec, config, family))
    return {"offload": offload, "vae_tiling": bool(tiling)}


def _video_target(spec: Mapping[str, Any], config: Mapping[str, Any], family: Any) -> Target | None:
    """The video stage's GPU, or None where no estimate applies (tiny random model, unknown family)."""
    if family is None or video_sizes(family) is None or str(config.get("model", "")).startswith("builtin:"):
        return None
    from runner.spec.sections import HardwareConfig

    hw = HardwareConfig.from_dict(spec.get("hardware") or {})
    return target_of(hw, hw.stage_gpu.get("video") or hw.gpu)


def _clip_peak(config: Mapping[str, Any], family: Any, offload: str, tiling: bool) -> float:
    return video_generate_estimate(video_sizes(family), int(config["frames"]), int(config["width"]),
                                   int(config["height"]), offload=offload, vae_tiling=tiling)


def _auto_offload(spec: Mapping[str, Any], config: Mapping[str, Any], family: Any, tiling: bool | None) -> str:
    target = _video_target(spec, config, family)
    if target is None or target.cpu:
        return "none"
    if target.capacity_gib is None:
        return "model"
    for offload, tiled in GENERATE_LADDER:
        if tiling is not None and tiled != tiling:
            continue
        if _clip_peak(config, family, offload, tiled) <= target.capacity_gib * GIB:
            return offload
    return "group"


def _untiled_too_big(spec: Mapping[str, Any], config: Mapping[str, Any], family: Any) -> bool:
    target = _video_target(spec, config, family)
    if target is None or target.cpu or target.capacity_gib is None:
        return False
    return _clip_peak(config, family, "none", False) > target.capacity_gib * GIB


def video_stage_notes(spec: Mapping[str, Any], config: Mapping[str, Any], family: Any) -> tuple[str, ...]:
    """The video stage's plan note (one call from runner/stages/video.py expand): its clip shape,
    the GPU it runs on, and the resolved ``generate.video.offload`` / ``vae_tiling``
    (:func:`video_generate_memory`)."""
    target = _video_target(spec, config, family)
    if target is None:
        return ()  # tiny random models: the figures are of the real ones
    note = video_generate_note(f"{config.get('model', '')}", family, int(config["frames"]), int(config["width"]),
                               int(config["height"]), target, offload=str(config.get("offload") or "none"),
                               vae_tiling=bool(config.get("vae_tiling", False)))
    return (note,) if note else ()
