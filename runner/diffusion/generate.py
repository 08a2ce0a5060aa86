"""Batched, seed-deterministic image generation with a loaded SD 1.5 / SDXL pipeline.

Each image gets its own ``torch.Generator`` seeded with its seed, created on the CPU (so the
starting noise is the same on CPU and GPU), and diffusers draws the noise of a batch one
generator per row: an image comes out the same whether it was generated alone or in a batch
(up to float rounding of batched kernels).
"""

from __future__ import annotations

from typing import Sequence


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


def _has_lora(pipe) -> bool:
    try:
        return bool(pipe.get_list_adapters())
    except Exception:
        return False


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
    lora_scale: float = 1.0,
    batch_size: int = 4,
    progress=None,
    pipe_kwargs: dict | None = None,
):
    """Generate one image per (prompt, seed) pair; returns a list of PIL images in that order.

    Pairing: ``prompts`` and ``seeds`` of the same length are zipped; a single prompt is used
    for every seed, a single seed for every prompt. ``lora_scale`` scales every loaded LoRA
    adapter (ignored when none is loaded). ``progress`` is an optional handle with
    ``update(n)`` (``ctx.progress(...)``). ``pipe_kwargs`` are passed to every pipeline call
    as they are (e.g. a ControlNet ``image`` or an ``ip_adapter_image`` that the pipeline
    broadcasts over the batch).
    """
    import torch

    pairs = _pairs(prompts, seeds)
    images = []
    kwargs = {}
    if _has_lora(pipe):
        kwargs["cross_attention_kwargs"] = {"scale": float(lora_scale)}
    batch_size = max(1, int(batch_size))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        with torch.inference_mode():
            out = pipe(
                prompt=[p for p, _ in chunk],
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                width=int(width),
                height=int(height),
                generator=gens,
                output_type="pil",
                **kwargs,
                **(pipe_kwargs or {}),
            )
        images.extend(out.images)
        if progress is not None:
            progress.update(len(chunk))
    return images
