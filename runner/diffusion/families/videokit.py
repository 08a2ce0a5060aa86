"""What a *video* family carries beyond :class:`~runner.diffusion.families.base.Family`'s data:
its image-to-video pipelines, the VAE's compression (the frame-count rule), how the pipeline's
``__call__`` takes the clip settings, audio, experts, its presets, and the tiny models' parts
that only video families use (a Gemma 3 text encoder, a UMT5 one).

A video family is a ``Family`` with ``modality="video"`` and ``video=VideoArgs(...)``; the
registry lists it only when asked (``families.names(modality="video")``), so image training
never sees it. Generation goes through :mod:`runner.generate.video_models`, which reads only
this data. Video LoRA training (``train_video``): a family whose ``predict`` / ``to_model_latents``
are built (:func:`trainable`); the others refuse with a UserError saying so. Two-expert
families (Wan 2.2 A14B): :func:`select_experts` picks the experts trained and their sigma range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from runner.core.errors import UserError

# how each pipeline kind takes the key frame: "image" (image=<PIL>), or "conditions" (a list of
# the family's condition objects: ``conditions=[Cond(frames=<PIL>, index=0, strength=s)]``)
IMAGE_WAYS = ("image", "conditions")


@dataclass(frozen=True)
class PipelineKind:
    """One image-to-video pipeline of a family: the diffusers class; how the key frame goes in
    (``image_way``: see IMAGE_WAYS; ``condition_class``: the diffusers class of one condition);
    ``strength_keyword``: the ``__call__`` keyword that takes the conditioning strength (None:
    the strength is always 1.0, or it goes into the condition object)."""

    pipeline: str
    image_way: str = "image"
    strength_keyword: str | None = None
    condition_class: str | None = None
    partial_strength: bool = False  # can apply a strength below 1

    def __post_init__(self) -> None:
        if self.image_way not in IMAGE_WAYS:
            raise ValueError(f"image_way {self.image_way!r} is not one of {', '.join(IMAGE_WAYS)}")


@dataclass(frozen=True)
class VideoArgs:
    """Video data of a family (figures of the real model; the tiny one reads its own configs)."""

    kinds: Mapping[str, PipelineKind]  # "image-to-video" / "condition" -> the pipeline
    default_kind: str  # the kind ``pipeline: auto`` takes at full conditioning strength
    temporal: int  # the VAE's temporal compression: frames must be k * temporal + 1
    spatial: int  # the VAE's spatial compression
    size_multiple: int  # what width and height must be multiples of
    fps_keyword: str | None = "frame_rate"  # None: the pipeline takes no frame rate (it is the mp4's only)
    decode_noise: bool = False  # decode_timestep / decode_noise_scale when the VAE is timestep-conditioned
    audio: bool = False  # the model generates audio with the clip (LTX-2)
    audio_rate_attr: str | None = None  # pipeline component + config key with the audio's sample rate
    experts: tuple[str, ...] = ("transformer",)  # denoisers: two for Wan 2.2 A14B (high / low noise)
    expert_note: str = ""  # in words: how the experts split the steps
    presets: tuple[str, ...] = ()  # runner/presets/video/<name>.yaml made for this family
    defaults: Mapping[str, Any] = field(default_factory=dict)  # frames, fps, width, height of the real model
    latent_upsampler: bool = False  # LTXLatentUpsamplePipeline applies (LTX-Video 0.9.7+)
    extra_call: Mapping[str, Any] = field(default_factory=dict)  # keywords passed on every call
    lora_loader: str = ""  # the pipeline's LoRA loader mixin (what load_lora_weights reads)
    prepare: Callable[[Any], None] | None = None  # run on the loaded pipeline before the first clip
    # families sharing a pipeline class (Wan 2.2 A14B / 5B) tell a folder apart by its model_index.json
    index_match: Callable[[Mapping[str, Any]], bool] | None = None
    # how training conditions on the key frame: "clean_first" (the first latent frame of a clip is
    # kept clean and left out of the loss, as the pipeline keeps it: Wan 2.2 TI2V), or "none"
    key_frame: str = "none"

    @property
    def frame_rule(self) -> str:
        return f"{self.temporal}k+1"

    def kind_for(self, requested: str, declared_class: str, strength: float) -> str:
        """The pipeline kind for ``generate.video.pipeline`` (auto: the model's own class, or
        the one that can apply a partial strength when it is below 1)."""
        if requested != "auto":
            if requested not in self.kinds:
                raise UserError(f"generate.video.pipeline: {requested!r} is not a pipeline of this family",
                                hint=f"Use auto or one of: {', '.join(self.kinds)}.")
            return requested
        for kind, pk in self.kinds.items():
            if pk.pipeline == declared_class:
                if float(strength) < 1.0 and not pk.partial_strength:
                    break
                return kind
        if float(strength) < 1.0:
            partial = [k for k, pk in self.kinds.items() if pk.partial_strength]
            if partial:
                return partial[0]
        return self.default_kind

    def pipelines(self) -> tuple[str, ...]:
        return tuple(pk.pipeline for pk in self.kinds.values())


# ---------------------------------------------------------------------------------------------
# the family functions video families share


def trainable(family) -> bool:
    """Whether the runner trains LoRAs for this video family (its latents and denoiser call are built)."""
    return family.predict is not not_trained


EXPERT_CHOICES = {"both": None, "high_noise": 0, "low_noise": 1}  # train_video.experts -> which expert (index)


def experts_trained(family, experts: str) -> tuple[str, ...]:
    """The pipeline components ``train_video.experts`` trains for ``family`` (see select_experts)."""
    names = family.video.experts if family.video else (family.denoiser,)
    if experts not in EXPERT_CHOICES:
        raise UserError(f"train_video.experts: {experts!r} is not one of {', '.join(EXPERT_CHOICES)}",
                        hint="Use both, high_noise or low_noise.")
    which = EXPERT_CHOICES[experts]
    return tuple(names) if len(names) == 1 or which is None else (names[which],)


def expert_role(family, name: str) -> str | None:
    """high_noise / low_noise for a two-expert family's component (what ComfyUI users call the
    two files), None for a one-denoiser family."""
    names = family.video.experts if family.video else (family.denoiser,)
    if len(names) < 2 or name not in names:
        return None
    return next(role for role, i in EXPERT_CHOICES.items() if i == names.index(name))


def select_experts(c, experts: str) -> None:
    """The denoisers a run trains (``c.experts``) from ``train_video.experts``: a one-denoiser
    family's transformer whatever it says; Wan 2.2 A14B's two experts (``both``), or the high-noise
    ``transformer`` / the low-noise ``transformer_2`` alone, with the sampled sigmas then restricted
    to that expert's range (``c.sigma_range``: sigma >= boundary_ratio for high_noise, below it for
    low_noise, as the pipeline hands the steps over at t >= boundary_ratio x num_train_timesteps)."""
    c.experts = experts_trained(c.family, experts)
    names = c.family.video.experts if c.family.video else (c.family.denoiser,)
    c.sigma_range = expert_ranges(c)[c.experts[0]] if len(c.experts) < len(names) else None


def boundary(c) -> float | None:
    """Where a two-expert pipeline switches from the high-noise expert to the low-noise one, as a
    sigma (its config's boundary_ratio; None: one denoiser)."""
    ratio = getattr(getattr(c.pipe, "config", None), "boundary_ratio", None)
    names = c.family.video.experts if c.family.video else ()
    return float(ratio) if ratio is not None and len(names) > 1 else None


def expert_ranges(c) -> dict[str, tuple[float, float]]:
    """{expert: [lo, hi) of sigma} of a two-expert family: ``transformer`` from the boundary up,
    ``transformer_2`` below it; a one-denoiser family's covers (0, 1)."""
    b = boundary(c)
    names = c.family.video.experts if c.family.video else (c.family.denoiser,)
    if b is None:
        return {names[0]: (0.0, float("inf"))}
    return {names[0]: (b, float("inf")), names[1]: (0.0, b)}


def expert_of(c, sigmas) -> list[str]:
    """The expert each sigma belongs to (the pipeline's rule: t >= boundary -> the high-noise one)."""
    ranges = expert_ranges(c)
    return [next(n for n, (lo, hi) in ranges.items() if lo <= float(s) < hi) for s in sigmas]


def lora_modules(c) -> dict:
    """{component: module} of the denoisers with the LoRA (``select_experts`` chose them)."""
    return {name: getattr(c.pipe, name) for name in (c.experts or (c.family.denoiser,))}


def not_trained(*_args, **_kwargs):
    """Where an image family trains (predict, to_model_latents): video LoRA training is not built."""
    raise UserError("training a LoRA for a video family is not built yet (train_video, issue 16 part 2)",
                    hint="Use the video family in generate.video (it loads a LoRA trained elsewhere); "
                         "train.model_family takes image families only.")


def encode_prompt_captions(pipe, captions: list[str]) -> list[dict]:
    """The pipeline's own ``encode_prompt`` (no CFG), one dict per caption: token embeddings and
    their mask when the pipeline gives one (LTX: T5 + mask; LTX-2: Gemma's stacked hidden states
    + mask; Wan: UMT5, trimmed per caption)."""
    import torch

    from runner.diffusion.families.base import split_batch

    with torch.no_grad():
        out = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False,
                                 device=pipe.transformer.device)
    tensors = {"prompt_embeds": out[0]}
    if len(out) > 2 and isinstance(out[1], torch.Tensor) and out[1].ndim == 2:
        tensors["mask"] = out[1]
    return split_batch(tensors)


def gemma3_text_encoder(tokenizer, *, hidden: int = 16, layers: int = 1):
    """A tiny ``Gemma3ForConditionalGeneration`` (what LTX-2 encodes captions with): a 1-layer
    text model and a 1-layer SigLIP vision tower on 28 px images (4 image tokens), random weights."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    image_token = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            max_position_embeddings=2048, sliding_window=64, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=image_token, boi_token_index=image_token - 2,
                          eoi_token_index=image_token - 1)
    return Gemma3ForConditionalGeneration(config)


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
)


def gemma_tokenizer(dest: Path):
    """A byte-level tokenizer with Gemma's special tokens after the bytes (see
    :func:`tinykit.byte_tokenizer`); the image tokens are the last three ids."""
    from runner.diffusion.families import tinykit

    return tinykit.byte_tokenizer(dest, GEMMA_SPECIALS, GEMMA_CHAT_TEMPLATE, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")


def umt5_encoder(tokenizer_len: int, *, d_model: int = 32):
    """A tiny ``UMT5EncoderModel`` (Wan's text encoder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=tokenizer_len, d_model=d_model, d_kv=8, d_ff=37, num_layers=1,
                                       num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0))
