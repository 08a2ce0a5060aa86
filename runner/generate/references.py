"""Reference images per model family: what each family's diffusers pipelines can take, read from
the family's :class:`runner.diffusion.families.base.GenerationArgs`.

- *In-context* references: pipelines that condition on images natively take them as ``image=``:
  FLUX.2 dev and klein (their own pipelines, several images), FLUX.1 through
  ``FluxKontextPipeline`` (one image; only a Kontext checkpoint was trained to read it). The
  pipeline is built from the loaded one with ``from_pipe`` (the same modules, so a LoRA loaded on
  it applies), and each reference is fitted (resized and centre-cropped) to the generation size.
- *Adapters*: an IP-Adapter (``pipe.load_ip_adapter``) and a ControlNet (``<Family>ControlNetPipeline``)
  where diffusers has them for the family (:mod:`runner.generate.guided`).

A family without what a setting asks for gets a :class:`UserError` that names what is missing and
the families or settings that have it.
"""

from __future__ import annotations

from typing import Any, Sequence

from runner.core.errors import UserError


def family_named(name: str | None, pipe: Any = None):
    """The Family of ``name`` (a registry name), or of ``pipe``'s class when no name is given."""
    from runner.diffusion import families

    if name and name != "auto":
        return families.get(name)
    from runner.diffusion.generate import pipeline_family

    return pipeline_family(pipe)


def _having(attr: str) -> str:
    from runner.diffusion import families

    return ", ".join(f.name for f in families.all_families() if getattr(f.generation, attr) is not None)


def in_context_args(family, key: str):
    """The family's :class:`ReferenceArgs`, or a UserError naming ``key`` and what to choose instead."""
    refs = family.generation.references
    if refs is None:
        what = [w for w, a in (("an IP-Adapter", "ip_adapter"), ("a ControlNet", "controlnet"))
                if getattr(family.generation, a) is not None]
        instead = (f"use {' and '.join(what)} (generate.storyboard.reference_guided.mode: adapters)" if what
                   else "train a LoRA and leave the references out")
        raise UserError(f"{key}: the {family.title} pipeline ({family.pipeline}) takes no reference images "
                        "(no in-context input in diffusers)",
                        hint=f"In-context references work with the families {_having('references')}; for "
                             f"{family.name}, {instead}.")
    return refs


def require_adapters(family, *, ip_adapter: bool, controlnet: bool, key: str) -> None:
    """A UserError when the spec asks for an IP-Adapter or a ControlNet the family has none of."""
    g = family.generation
    for wanted, args, what, attr in ((ip_adapter, g.ip_adapter, "IP-Adapter loader", "ip_adapter"),
                                     (controlnet, g.controlnet, "ControlNet pipeline", "controlnet")):
        if wanted and args is None:
            other = " or in-context references (mode: in_context)" if g.references is not None else ""
            raise UserError(f"{key}.{attr}: diffusers has no {what} for {family.title} ({family.name})",
                            hint=f"Families with one: {_having(attr)}. For {family.name}, remove {attr}{other}.")


def reference_pipeline(pipe, family):
    """The pipeline that takes the family's in-context references: ``pipe`` itself when it does,
    else one built from it with ``from_pipe`` (sharing every module)."""
    import diffusers

    refs = in_context_args(family, "references")
    if type(pipe).__name__ == refs.pipeline:
        return pipe
    rpipe = getattr(diffusers, refs.pipeline).from_pipe(pipe)
    rpipe.set_progress_bar_config(disable=True)
    for attr in ("_character_runner_family", "_character_runner_tiny"):
        if hasattr(pipe, attr):
            setattr(rpipe, attr, getattr(pipe, attr))
    return rpipe


def fit(image, size: tuple[int, int]):
    """``image`` resized and centre-cropped to ``size`` (w, h), RGB."""
    from PIL import ImageOps

    image = image.convert("RGB")
    return image if image.size == tuple(size) else ImageOps.fit(image, tuple(size))


def in_context_kwargs(family, images: Sequence[Any], width: int, height: int) -> dict[str, Any]:
    """The pipeline keywords of one call with ``images`` as references (the first ``max_images``,
    fitted to the generation size); with no images, only the keywords that pipeline always needs."""
    refs = in_context_args(family, "references")
    kwargs = refs.call_kwargs(width, height)
    chosen = [fit(im, (width, height)) for im in list(images)[: refs.max_images]]
    if chosen:
        kwargs["image"] = chosen if refs.max_images > 1 else chosen[0]
    return kwargs


def plain_kwargs(pipe, family, width: int, height: int) -> dict[str, Any]:
    """The keywords a call without references needs on ``pipe`` (a reference pipeline may rescale
    its output otherwise: FLUX.1 Kontext's max_area)."""
    refs = family.generation.references
    if refs is not None and type(pipe).__name__ == refs.pipeline:
        return refs.call_kwargs(width, height)
    return {}
