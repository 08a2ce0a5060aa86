"""What a family module says about its LoRA file for ComfyUI (its ``comfy=`` :class:`Layout`): the
kohya name of each trained diffusers module in the model's native (original checkpoint) layout,
the text encoders' prefixes, and the metadata naming the model. :mod:`runner.diffusion.comfy`
turns a peft state dict into the file from it (fused weights, alpha, text-encoder paths).

A native-name function takes ``(diffusers module, denoiser config)`` and gives a :class:`Target`;
most are a :func:`table` of block regexes (what every DiT family uses) or :func:`same` (the native
names are the diffusers ones). Standard library (and runner.core) only, so family modules import it at load time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from runner.core.errors import UserError


@dataclass(frozen=True)
class Target:
    """Where one diffusers module's LoRA lands: the native module, and for a part of a fused
    weight its first output row and the fused weight's total rows."""

    native: str
    offset: int = 0
    rows: int | None = None  # None: not fused (the part is the whole weight)


@dataclass(frozen=True)
class Layout:
    """One architecture's ComfyUI/kohya file: names, text-encoder prefixes and metadata."""

    native: Callable[[str, Mapping[str, Any]], Target]  # (diffusers module, denoiser config) -> Target
    text_encoders: Mapping[str, tuple[str, bool]] = field(default_factory=dict)  # component -> (prefix, is CLIP)
    architecture: Callable[[Mapping[str, Any]], str] = lambda cfg: ""  # modelspec.architecture, without "/lora"
    base_model_version: str = ""  # ss_base_model_version
    implementation: str = "diffusers"  # modelspec.implementation
    prediction_type: str | None = "epsilon"  # modelspec.prediction_type (flow models: none, as sd-scripts)


class NoNativeName(UserError, ValueError):
    """A trained module has no name in the model's native layout (ComfyUI could not load it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="Set train.lora.target_modules to null (the family's targets) or to "
                                       "attention and feed-forward projections.")


def unknown(cls: str, module: str) -> NoNativeName:
    return NoNativeName(f"no ComfyUI (native) name known for {cls} module {module!r}; "
                        "train LoRA target modules of the attention and feed-forward projections")


def hidden(cfg: Mapping[str, Any]) -> int:
    """The transformer width of a diffusers DiT config (heads x head dim)."""
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def three(cfg) -> tuple[int, int, int]:
    """The row sizes of a fused q/k/v weight of a DiT with as many key/value heads as query heads."""
    h = hidden(cfg)
    return (h, h, h)


def part(native: str, index: int, sizes: tuple[int, ...]) -> Target:
    return Target(native, sum(sizes[:index]), sum(sizes))


def lookup(module: str, blocks: Mapping[str, tuple[str, Mapping[str, Any]]], cfg, cls: str) -> Target:
    """``blocks``: diffusers block regex -> (native block format, {rest: native rest | (native, i, sizes)})."""
    for pattern, (native_block, table) in blocks.items():
        m = re.fullmatch(pattern + r"\.(.+)", module)
        if m and m[m.lastindex] in table:
            native = native_block.format(*m.groups()[:-1])
            entry = table[m[m.lastindex]]
            if isinstance(entry, str):
                return Target(f"{native}.{entry}")
            name, index, sizes = entry
            return part(f"{native}.{name}", index, sizes(cfg) if callable(sizes) else sizes)
    raise unknown(cls, module)


def table(cls: str, blocks) -> Callable[[str, Mapping[str, Any]], Target]:
    """The native-name function of a block table (see :func:`lookup`); ``cls`` names the denoiser
    class in the error for a module the table does not hold."""
    return lambda module, cfg: lookup(module, blocks, cfg, cls)


def same(module: str, cfg: Mapping[str, Any]) -> Target:
    """Native names that are the diffusers ones."""
    return Target(module)
