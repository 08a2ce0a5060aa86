"""Batched, seed-deterministic image generation with a loaded pipeline of any model family.

Each image gets its own ``torch.Generator`` seeded with its seed, created on the CPU (so the
starting noise is the same on CPU and GPU), and diffusers draws the noise of a batch one
generator per row: an image comes out the same whether it was generated alone or in a batch
(up to float rounding of batched kernels).

What differs per family is data on the family (:class:`runner.diffusion.families.base.GenerationArgs`):
the keyword that takes the guidance (``guidance_scale``, Qwen-Image's ``true_cfg_scale``), whether
the pipeline takes a negative prompt, and which pipelines take reference images. The family is
found from the pipeline's class (:func:`pipeline_family`), so a ControlNet or in-context pipeline
built from the base one generates the same way. A LoRA's scale is set through
``pipe.set_adapters`` for every family (the pipelines' own ``*attention_kwargs={"scale": ...}``
would multiply with it).
"""

from __future__ import annotations

from typing import Any, Sequence


def _pairs(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        return []
    if len(prompts) == len(seeds):
        return list(zip(prompts, seeds))
    if len(prompts) == 1:
        return [(prompts[0], s) for s in seeds]
    if len(seeds) == 1:
        return [(p, seeds[0]) for p in prompts]
    raise ValueError(
        f"generate_images: {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt, "
        "one prompt for all seeds, or one seed for all prompts"
    )


def pipeline_family(pipe) -> Any:
    """The model family (:class:`runner.diffusion.families.Family`) whose base, ControlNet or
    reference pipeline ``pipe`` is, by its class name."""
    from runner.core.errors import UserError
    from runner.diffusion import families

    cls = type(pipe).__name__
    for fam in families.all_families():
        g = fam.generation
        if cls in {*fam.class_names, fam.pipeline, getattr(g.controlnet, "pipeline", None),
                   getattr(g.references, "pipeline", None)}:
            return fam
    raise UserError(f"pipeline {cls} belongs to no model family the runner knows",
                    hint=f"Known families: {', '.join(families.names())}.")


def sampler_kwargs(family, *, guidance: float, negative_prompt: str, n: int) -> dict[str, Any]:
    """The guidance and negative-prompt keywords of one pipeline call of ``n`` images."""
    g = family.generation
    kwargs: dict[str, Any] = {g.guidance: float(guidance)}
    if g.negative == "always" or (g.negative == "given" and negative_prompt):
        kwargs["negative_prompt"] = [negative_prompt] * n
    return kwargs


def ignored_settings(family, *, negative_prompt: str) -> list[str]:
    """What the family's pipeline does not take of the settings given (for logs and reports)."""
    g = family.generation
    out = []
    if negative_prompt and g.negative == "none":
        out.append(f"the negative prompt (the {family.title} pipeline takes none)")
    return out


def active_adapters(pipe) -> list[str]:
    try:
        return list(pipe.get_active_adapters())
    except Exception:  # no LoRA loaded, or a pipeline without the LoRA mixin
        return []


def set_lora_scale(pipe, scale: float) -> bool:
    """Every active LoRA adapter at ``scale``; False when none is loaded."""
    names = active_adapters(pipe)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(scale)] * len(names))
    return bool(names)


def generate_images(
    pipe,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    width: int,
    height: int,
    lora_scale: float | None = None,
    batch_size: int = 4,
    progress=None,
    pipe_kwargs: dict | None = None,
):
    """Generate one image per (prompt, seed) pair; returns a list of PIL images in that order.

    Pairing: ``prompts`` and ``seeds`` of the same length are zipped; a single prompt is used
    for every seed, a single seed for every prompt. ``lora_scale`` sets every active LoRA
    adapter's weight (None: as they are; ignored when none is loaded; the trainer's samples pass
    none, so its adapters are never touched). ``guidance`` goes to the family's guidance
    keyword and ``negative_prompt`` only to pipelines that take one (:func:`sampler_kwargs`).
    ``progress`` is an optional handle with ``update(n)`` (``ctx.progress(...)``). ``pipe_kwargs``
    are passed to every pipeline call as they are (e.g. a ControlNet map, an ``ip_adapter_image``
    or the reference ``image`` list that the pipeline broadcasts over the batch).
    """
    import torch

    family = pipeline_family(pipe)
    pairs = _pairs(prompts, seeds)
    images = []
    if lora_scale is not None:
        set_lora_scale(pipe, lora_scale)
    batch_size = max(1, int(batch_size))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        with torch.inference_mode():
            out = pipe(
                prompt=[p for p, _ in chunk],
                num_inference_steps=int(steps),
                width=int(width),
                height=int(height),
                generator=gens,
                output_type="pil",
                **sampler_kwargs(family, guidance=guidance, negative_prompt=negative_prompt, n=len(chunk)),
                **(pipe_kwargs or {}),
            )
        images.extend(out.images)
        if progress is not None:
            progress.update(len(chunk))
    return images
