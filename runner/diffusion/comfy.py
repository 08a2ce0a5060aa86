"""The LoRA file ComfyUI loads, for every model family: kohya key names over the model's native layout.

ComfyUI holds each denoiser in the layout of its original checkpoint (Stability's "sgm" UNet for
SDXL and MMDiT for SD 3.x, Black Forest Labs' for FLUX.1 and FLUX.2, the Lumina-2 layout for
Z-Image; Qwen-Image's original names are the diffusers ones) and maps a LoRA key to one of those
weights in ``comfy/lora.py`` (``model_lora_keys_unet``). The one key form it maps for every model,
whatever its version, is kohya's: ``lora_unet_<native module, dots as underscores>`` with
``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; sd-scripts, musubi-tuner, Forge and
A1111 read the same form. (ComfyUI also maps the diffusers ``transformer.<module>`` names, model by
model; the kohya form is the one all of them share.) SD 1.x is the exception kohya itself makes:
its UNet keeps the diffusers names, which ComfyUI maps through ``unet_to_diffusers``.

Where the original checkpoint fuses what diffusers splits (q, k and v into one ``qkv``; FLUX.1's
single-block q, k, v and MLP input into ``linear1``), the trained parts of one fused weight become
one LoRA on it, exactly (the sd-scripts ``split_qkv`` layout):

- ``lora_down`` stacks the parts' ``lora_A`` (its rank is the sum of the parts' ranks);
- ``lora_up`` is block-diagonal: each part's ``lora_B`` on that part's output rows and its own
  rank columns, zeros elsewhere (so rows of parts that were not trained get nothing);
- ``.alpha`` is the trained alpha times (fused rank / part rank), so ``alpha / rank``, the strength
  every loader applies, is the trained ``alpha / r``.

Then ``lora_up @ lora_down`` is the diffusers deltas stacked on the native rows.

The tables are keyed by diffusers pipeline class (what a family module names in ``pipeline``): a
family whose pipeline has no entry gets a ValueError naming it, and only the diffusers file.
Metadata values follow kohya sd-scripts' ``library/sai_model_spec.py`` (SD, SD 3, FLUX.1) and
musubi-tuner's (FLUX.2, Qwen-Image, Z-Image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PREFIX = "lora_unet_"


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


class NoNativeName(ValueError):
    """A trained module has no name in the model's native layout (ComfyUI could not load it)."""


def _unknown(cls: str, module: str) -> NoNativeName:
    return NoNativeName(f"no ComfyUI (native) name known for {cls} module {module!r}; "
                        "train LoRA target modules of the attention and feed-forward projections")


def _hidden(cfg: Mapping[str, Any]) -> int:
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def _part(native: str, index: int, sizes: tuple[int, ...]) -> Target:
    return Target(native, sum(sizes[:index]), sum(sizes))


def _lookup(module: str, blocks: Mapping[str, tuple[str, Mapping[str, Any]]], cfg, cls: str) -> Target:
    """``blocks``: diffusers block regex -> (native block format, {rest: native rest | (native, i, sizes)})."""
    for pattern, (native_block, table) in blocks.items():
        m = re.fullmatch(pattern + r"\.(.+)", module)
        if m and m[m.lastindex] in table:
            native = native_block.format(*m.groups()[:-1])
            entry = table[m[m.lastindex]]
            if isinstance(entry, str):
                return Target(f"{native}.{entry}")
            name, index, sizes = entry
            return _part(f"{native}.{name}", index, sizes(cfg) if callable(sizes) else sizes)
    raise _unknown(cls, module)


# ---------------------------------------------------------------------------------------------
# denoiser layouts (written from the original checkpoints' key names)


def _three(cfg) -> tuple[int, int, int]:
    h = _hidden(cfg)
    return (h, h, h)


def _flux1_linear1(cfg) -> tuple[int, int, int, int]:
    h = _hidden(cfg)
    return (h, h, h, int(h * float(cfg.get("mlp_ratio", 4.0))))


_FLUX1 = {
    r"transformer_blocks\.(\d+)": ("double_blocks.{}", {
        "attn.to_q": ("img_attn.qkv", 0, _three), "attn.to_k": ("img_attn.qkv", 1, _three),
        "attn.to_v": ("img_attn.qkv", 2, _three),
        "attn.add_q_proj": ("txt_attn.qkv", 0, _three), "attn.add_k_proj": ("txt_attn.qkv", 1, _three),
        "attn.add_v_proj": ("txt_attn.qkv", 2, _three),
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    }),
    r"single_transformer_blocks\.(\d+)": ("single_blocks.{}", {
        "attn.to_q": ("linear1", 0, _flux1_linear1), "attn.to_k": ("linear1", 1, _flux1_linear1),
        "attn.to_v": ("linear1", 2, _flux1_linear1), "proj_mlp": ("linear1", 3, _flux1_linear1),
        "proj_out": "linear2", "norm.linear": "modulation.lin",
    }),
}

_FLUX2 = {
    r"transformer_blocks\.(\d+)": ("double_blocks.{}", {
        "attn.to_q": ("img_attn.qkv", 0, _three), "attn.to_k": ("img_attn.qkv", 1, _three),
        "attn.to_v": ("img_attn.qkv", 2, _three),
        "attn.add_q_proj": ("txt_attn.qkv", 0, _three), "attn.add_k_proj": ("txt_attn.qkv", 1, _three),
        "attn.add_v_proj": ("txt_attn.qkv", 2, _three),
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    }),
    r"single_transformer_blocks\.(\d+)": ("single_blocks.{}", {
        "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
    }),
}

_SD3 = {
    r"transformer_blocks\.(\d+)": ("joint_blocks.{}", {
        "attn.to_q": ("x_block.attn.qkv", 0, _three), "attn.to_k": ("x_block.attn.qkv", 1, _three),
        "attn.to_v": ("x_block.attn.qkv", 2, _three),
        "attn.add_q_proj": ("context_block.attn.qkv", 0, _three),
        "attn.add_k_proj": ("context_block.attn.qkv", 1, _three),
        "attn.add_v_proj": ("context_block.attn.qkv", 2, _three),
        "attn2.to_q": ("x_block.attn2.qkv", 0, _three), "attn2.to_k": ("x_block.attn2.qkv", 1, _three),
        "attn2.to_v": ("x_block.attn2.qkv", 2, _three),
        "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
        "attn2.to_out.0": "x_block.attn2.proj",
        "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
        "norm1.linear": "x_block.adaLN_modulation.1",
        # norm1_context.linear: not mapped (the last block's is stored with scale and shift swapped)
    }),
}


def _zimage_qkv(cfg) -> tuple[int, int, int]:
    dim, heads = int(cfg["dim"]), int(cfg["n_heads"])
    kv = int(cfg.get("n_kv_heads") or heads) * (dim // heads)
    return (dim, kv, kv)


_ZIMAGE_BLOCK = {
    "attention.to_q": ("attention.qkv", 0, _zimage_qkv), "attention.to_k": ("attention.qkv", 1, _zimage_qkv),
    "attention.to_v": ("attention.qkv", 2, _zimage_qkv), "attention.to_out.0": "attention.out",
    "feed_forward.w1": "feed_forward.w1", "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
_ZIMAGE = {rf"({kind})\.(\d+)": ("{}.{}", _ZIMAGE_BLOCK) for kind in ("layers", "noise_refiner", "context_refiner")}


def _table(cls: str, blocks) -> Callable[[str, Mapping[str, Any]], Target]:
    return lambda module, cfg: _lookup(module, blocks, cfg, cls)


def _same(module: str, cfg: Mapping[str, Any]) -> Target:
    return Target(module)


def _sgm(module: str, cfg: Mapping[str, Any]) -> Target:
    from runner.diffusion.kohya import diffusers_unet_module_to_sgm

    return Target(diffusers_unet_module_to_sgm(module, cfg))


# ---------------------------------------------------------------------------------------------
# metadata (modelspec.architecture per variant, from the denoiser config)


def _sd3_arch(cfg) -> str:
    if int(cfg.get("num_layers", 0)) == 38:
        return "stable-diffusion-3-5-large"
    if cfg.get("dual_attention_layers"):
        return "stable-diffusion-3-5-medium"
    return "stable-diffusion-3-medium" if int(cfg.get("num_layers", 0)) == 24 else "stable-diffusion-3"


def _flux1_arch(cfg) -> str:
    if "guidance_embeds" not in cfg:
        return "flux-1"
    return "flux-1-dev" if cfg["guidance_embeds"] else "flux-1-schnell"


def _klein_arch(cfg) -> str:
    width = _hidden(cfg) if "num_attention_heads" in cfg else 0
    return {3072: "Flux.2-klein-4b", 4096: "Flux.2-klein-9b"}.get(width, "Flux.2-klein")


_CLIP_TE = {"text_encoder": ("lora_te_", True)}
_SDXL_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", True)}
# ComfyUI numbers the encoders it holds: CLIP-L te1, CLIP-G te2, then T5 (OneTrainer's naming)
_SD3_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", True),
           "text_encoder_3": ("lora_te3_", False)}
_FLUX1_TE = {"text_encoder": ("lora_te1_", True), "text_encoder_2": ("lora_te2_", False)}
_BFL = "https://github.com/black-forest-labs/flux"

LAYOUTS: dict[str, Layout] = {
    "StableDiffusionPipeline": Layout(_same, _CLIP_TE, lambda cfg: "stable-diffusion-v1", "sd_v1"),
    "StableDiffusionXLPipeline": Layout(_sgm, _SDXL_TE, lambda cfg: "stable-diffusion-xl-v1-base", "sdxl_base_v1-0",
                                        "https://github.com/Stability-AI/generative-models"),
    "StableDiffusion3Pipeline": Layout(_table("SD3Transformer2DModel", _SD3), _SD3_TE, _sd3_arch, "sd3",
                                       "https://github.com/Stability-AI/sd3.5", None),
    "FluxPipeline": Layout(_table("FluxTransformer2DModel", _FLUX1), _FLUX1_TE, _flux1_arch, "flux1", _BFL, None),
    "Flux2Pipeline": Layout(_table("Flux2Transformer2DModel", _FLUX2), {}, lambda cfg: "Flux.2-dev", "flux2_dev",
                            "https://github.com/black-forest-labs/flux2", None),
    "Flux2KleinPipeline": Layout(_table("Flux2Transformer2DModel", _FLUX2), {}, _klein_arch, "flux2_klein",
                                 "https://github.com/black-forest-labs/flux2", None),
    "QwenImagePipeline": Layout(_same, {}, lambda cfg: "Qwen-Image", "qwen_image",
                                "https://github.com/QwenLM/Qwen-Image", None),
    "ZImagePipeline": Layout(_table("ZImageTransformer2DModel", _ZIMAGE), {}, lambda cfg: "Z-Image", "z_image",
                             "https://github.com/Tongyi-MAI/Z-Image", None),
}


def layout_for(family: str) -> Layout:
    """The layout of a registry family (by its pipeline class)."""
    from runner.diffusion import families

    fam = families.get(family)
    if fam.pipeline not in LAYOUTS:
        raise ValueError(f"no ComfyUI/kohya LoRA layout for {fam.title} ({fam.pipeline}); "
                         f"known pipelines: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[fam.pipeline]


def architecture(family: str, denoiser_config: Mapping[str, Any] | None = None) -> str:
    """``modelspec.architecture`` of a LoRA for ``family`` (the variant from the denoiser config
    where it tells one apart: FLUX.1 dev / schnell, FLUX.2 klein 4B / 9B, SD 3 / 3.5)."""
    return layout_for(family).architecture(dict(denoiser_config or {})) + "/lora"


# ---------------------------------------------------------------------------------------------
# the state dict


def split_peft_key(key: str) -> tuple[str, str]:
    """'a.b.to_q.lora_A.weight' -> ('a.b.to_q', 'lora_A')."""
    m = re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
    if not m:
        raise ValueError(f"not a peft LoRA weight key: {key!r}")
    return m[1], m[2]


_DROP = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "base_model.model.")


def peft_modules(sd: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{module: {'lora_A': tensor, 'lora_B': tensor}} of a peft state dict (prefixes dropped)."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        for pre in _DROP:
            if key.startswith(pre):
                key = key[len(pre):]
        if "lora_magnitude_vector" in key:
            raise ValueError("DoRA weights are not supported by the kohya writer")
        module, which = split_peft_key(key)
        modules.setdefault(module, {})[which] = tensor
    for module, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module!r} lacks lora_A or lora_B")
    return modules


def add_modules(out: dict[str, Any], prefix: str, sd: Mapping[str, Any], target: Callable[[str], Target],
                alpha: float) -> None:
    """Write the kohya tensors of one peft state dict into ``out`` (modules in sorted order; the
    parts of one fused weight become one module where its first part sorts)."""
    import torch

    modules = peft_modules(sd)
    groups: dict[str, list[tuple[Target, dict[str, Any]]]] = {}
    for module in sorted(modules):
        t = target(module)
        groups.setdefault(t.native, []).append((t, modules[module]))
    for native, parts in groups.items():
        name = prefix + native.replace(".", "_")
        if len(parts) == 1 and parts[0][0].rows is None:
            down, up = parts[0][1]["lora_A"], parts[0][1]["lora_B"]
            out[f"{name}.lora_down.weight"] = down.detach().contiguous()
            out[f"{name}.lora_up.weight"] = up.detach().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
            continue
        down, up, rank0 = _fuse(native, parts)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * down.shape[0] / rank0, dtype=down.dtype)


def _fuse(native: str, parts: list[tuple[Target, dict[str, Any]]]):
    """One LoRA on a fused weight from its parts: stacked lora_A, block-diagonal lora_B (each
    part scaled by rank0 / its rank, so alpha * R / rank0 over R gives every part alpha / r)."""
    import torch

    rows = {t.rows for t, _ in parts}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"inconsistent fused layout for {native}: {sorted(map(str, rows))}")
    total = rows.pop()
    rank0 = int(parts[0][1]["lora_A"].shape[0])
    downs = [p["lora_A"].detach() for _, p in parts]
    ref = downs[0]
    up = torch.zeros(total, sum(int(d.shape[0]) for d in downs), dtype=ref.dtype, device=ref.device)
    col = 0
    for (t, p), d in zip(parts, downs):
        b = p["lora_B"].detach()
        r = int(d.shape[0])
        if t.offset + b.shape[0] > total or d.shape[1:] != ref.shape[1:]:
            raise ValueError(f"{native}: part at row {t.offset} ({tuple(b.shape)}) does not fit {total} rows")
        up[t.offset:t.offset + b.shape[0], col:col + r] = b * (rank0 / r)
        col += r
    return torch.cat(downs, dim=0).contiguous(), up.contiguous(), rank0


def peft_to_comfy(denoiser_sd: Mapping[str, Any], *, family: str, denoiser_config: Mapping[str, Any], alpha: float,
                  text_encoder_sds: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ComfyUI/kohya file's tensors for ``family`` (see the module doc)."""
    from runner.diffusion.kohya import clip_text_model_path

    lay = layout_for(family)
    cfg = dict(denoiser_config)
    out: dict[str, Any] = {}
    add_modules(out, PREFIX, denoiser_sd, lambda m: lay.native(m, cfg), alpha)
    for name, sd in (text_encoder_sds or {}).items():
        if not sd:
            continue
        if name not in lay.text_encoders:
            raise ValueError(f"no ComfyUI name for a LoRA on {name} of this family "
                             f"(ComfyUI maps the text encoders {', '.join(lay.text_encoders) or 'of none'})")
        prefix, clip = lay.text_encoders[name]
        add_modules(out, prefix, sd, (lambda m: Target(clip_text_model_path(m))) if clip else (lambda m: Target(m)),
                    alpha)
    return out
