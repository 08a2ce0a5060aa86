"""The LoRA file ComfyUI loads, for every model family: kohya key names over the model's native layout.

ComfyUI holds each denoiser in the layout of its original checkpoint (for some models that is the
diffusers layout) and maps a LoRA key to one of those weights in ``comfy/lora.py``
(``model_lora_keys_unet``). The one key form it maps for every model, whatever its version, is
kohya's: ``lora_unet_<native module, dots as underscores>`` with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``; sd-scripts, musubi-tuner, Forge and A1111 read the same form.
(ComfyUI also maps the diffusers ``transformer.<module>`` names, model by model; the kohya form is
the one all of them share.)

Each family module says its native names, text-encoder prefixes and metadata in its ``comfy=``
:class:`~runner.diffusion.families.comfykit.Layout`; this module is the conversion they share.
Where the original checkpoint fuses what diffusers splits (q, k and v into one ``qkv``, say), the
trained parts of one fused weight become one LoRA on it, exactly (the sd-scripts ``split_qkv``
layout):

- ``lora_down`` stacks the parts' ``lora_A`` (its rank is the sum of the parts' ranks);
- ``lora_up`` is block-diagonal: each part's ``lora_B`` on that part's output rows and its own
  rank columns, zeros elsewhere (so rows of parts that were not trained get nothing);
- ``.alpha`` is the trained alpha times (fused rank / part rank), so ``alpha / rank``, the strength
  every loader applies, is the trained ``alpha / r``.

Then ``lora_up @ lora_down`` is the diffusers deltas stacked on the native rows.

A family with ``comfy=None`` gets a ValueError here, and from the trainer only the diffusers file.
Metadata values follow kohya sd-scripts' ``library/sai_model_spec.py`` and musubi-tuner's.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from runner.diffusion.families.comfykit import Layout, NoNativeName, Target  # noqa: F401  (re-exported)

PREFIX = "lora_unet_"


def layout_for(family: str) -> Layout:
    """The layout of a registry family (its module's ``comfy=``)."""
    from runner.diffusion import families

    fam = families.get(family)
    if fam.comfy is None:
        known = [f.name for f in families.all_families() if f.comfy is not None]
        raise ValueError(f"no ComfyUI/kohya LoRA layout for {fam.title} ({fam.name}): its module sets no comfy=; "
                         f"families with one: {', '.join(known)}")
    return fam.comfy


def architecture(family: str, denoiser_config: Mapping[str, Any] | None = None) -> str:
    """``modelspec.architecture`` of a LoRA for ``family`` (the variant from the denoiser config,
    where the family's layout tells variants apart)."""
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
