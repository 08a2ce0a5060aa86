"""peft/diffusers LoRA state dict -> kohya-format LoRA file (what ComfyUI and A1111 load), for
every model family; the DiT families' native layouts live in :mod:`runner.diffusion.comfy`.

Key naming rules for the UNet families (written from the formats themselves):

- A LoRA on module ``M`` becomes ``<prefix><M with dots as underscores>.lora_down.weight``
  (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (a scalar tensor holding the
  real alpha; loaders scale by alpha / rank, so writing rank there would silently change the
  strength of a LoRA trained with alpha != rank).
- Prefixes: ``lora_unet_`` for the UNet; ``lora_te_`` for the SD 1.x text encoder; ``lora_te1_`` /
  ``lora_te2_`` for SDXL's two text encoders.
- SD 1.x UNet modules keep diffusers names (kohya trains SD 1.x on the diffusers UNet):
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
- SDXL UNet modules use Stability's "sgm" (LDM) layout, which ComfyUI and A1111 expect for SDXL:
  ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.(1 + i*(L+1) + j).{0,1}``,
  ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.((i+1)*(L+1)).0.op``, ``mid_block`` ->
  ``middle_block.{0,1,2}``, ``up_blocks.i.{resnets,attentions}.j`` -> ``output_blocks.(i*(L+1) + j).{0,1}``
  (L = layers_per_block), with resnet internals renamed (conv1 -> in_layers.2, conv2 ->
  out_layers.3, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection).

Metadata: ``ss_*`` keys as kohya sd-scripts writes them and ``modelspec.*`` keys from Stability's
model metadata spec (architecture, resolution, trigger phrase, ...). safetensors metadata values
must be strings.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any, Mapping

_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head in _RESNET_SGM:
        return _RESNET_SGM[head] + (("." + tail) if tail else "")
    return rest


def diffusers_unet_module_to_sgm(module: str, unet_config: Mapping[str, Any]) -> str:
    """Map a diffusers UNet module path of an SDXL UNet to its sgm (LDM) path."""
    lpb = int(unet_config.get("layers_per_block", 2))
    if isinstance(unet_config.get("layers_per_block"), (list, tuple)):
        raise ValueError("UNets with a per-block layers_per_block are not supported by the kohya writer")
    up_types = list(unet_config.get("up_block_types", ()))
    for k, v in _TOP_SGM.items():
        if module == k or module.startswith(k + "."):
            return v + module[len(k):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = 1 + i * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0" + ("." + _resnet_rest(rest) if rest else "")
        return f"input_blocks.{idx}.1" + ("." + rest if rest else "")
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(?:\.(.*))?$", module)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op" + ("." + m[2] if m[2] else "")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        if kind == "resnets":
            return f"middle_block.{idx}" + ("." + _resnet_rest(rest) if rest else "")
        return f"middle_block.{idx}" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        idx = i * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0" + ("." + _resnet_rest(rest) if rest else "")
        return f"output_blocks.{idx}.1" + ("." + rest if rest else "")
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(?:\.(.*))?$", module)
    if m:
        i = int(m[1])
        has_attn = i < len(up_types) and "CrossAttn" in up_types[i]
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv" + ("." + m[2] if m[2] else "")
    raise ValueError(f"no sgm name known for SDXL UNet module {module!r}")


def peft_to_kohya(
    unet_sd: Mapping[str, Any],
    *,
    family: str,
    unet_config: Mapping[str, Any],
    alpha: float,
    text_encoder_sds: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build the kohya state dict (the file ComfyUI, A1111/Forge and sd-scripts load) from peft
    state dicts (as ``get_peft_model_state_dict`` gives), for any registry family.

    ``unet_sd`` is the denoiser's (UNet or transformer), ``unet_config`` its config; ``text_encoder_sds``
    maps ``text_encoder`` / ``text_encoder_2`` / ... to their peft state dicts. Keys may carry a
    ``unet.`` / ``transformer.`` / ``text_encoder.`` prefix (diffusers-converted dicts); it is dropped.
    SD 1.x and SDXL follow the rules above; DiT families use their native layout with fused
    weights (:mod:`runner.diffusion.comfy`).
    """
    from runner.diffusion.comfy import peft_to_comfy

    return peft_to_comfy(unet_sd, family=family, denoiser_config=unet_config, alpha=alpha,
                         text_encoder_sds=text_encoder_sds)


def clip_text_model_path(path: str) -> str:
    """A CLIP text-encoder module or key path in the original layout, under ``text_model.``.

    transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.0...``) while
    ``CLIPTextModelWithProjection`` (SDXL's second encoder) still nests it under ``text_model``.
    Every other reader expects the nested form: older transformers (where the module *is*
    ``text_model.encoder...``, so diffusers <= 0.32 finds no rank for flat keys and raises
    IndexError), ComfyUI (``text_encoder.text_model.encoder.layers.N...`` for diffusers files,
    ``lora_te_text_model_encoder_layers_N_...`` for kohya files) and A1111. The installed diffusers
    strips the prefix again when the encoder has no ``text_model`` attribute.
    """
    return path if path.startswith("text_model.") else "text_model." + path


def clip_text_model_layout(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A peft text-encoder state dict with every key in the nested ``text_model.`` layout."""
    return {clip_text_model_path(k): v for k, v in sd.items()}


def tag_frequency(captions: list[str]) -> dict[str, int]:
    freq: dict[str, int] = {}
    for cap in captions:
        for tag in (t.strip() for t in cap.split(",")):
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return dict(sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])))


def kohya_metadata(
    *,
    family: str,
    base_model: str,
    rank: int,
    alpha: float,
    lr: float,
    text_encoder_lr: float | None,
    steps: int,
    max_steps: int,
    resolution: int,
    trigger: str,
    title: str,
    captions: list[str],
    dataset_summary: Mapping[str, Any],
    seed: int,
    extra: Mapping[str, Any] | None = None,
    denoiser_config: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """ss_* (kohya sd-scripts) and modelspec.* (Stability model spec) metadata, all strings.

    The family is named by ``modelspec.architecture`` (``<model>/lora``), ``ss_base_model_version``
    and ``runner.model_family``; ``denoiser_config`` tells variants apart where the architecture
    names them (FLUX.1 dev / schnell, FLUX.2 klein 4B / 9B, SD 3 / 3.5). Flow-matching families
    carry no ``modelspec.prediction_type`` (as sd-scripts writes FLUX.1).
    """
    from runner.diffusion.comfy import architecture, layout_for

    lay = layout_for(family)
    now = _dt.datetime.now(_dt.timezone.utc)
    md: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_base_model_version": lay.base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": base_model,
        "ss_learning_rate": lr,
        "ss_unet_lr": lr,
        "ss_text_encoder_lr": text_encoder_lr if text_encoder_lr is not None else "None",
        "ss_steps": steps,
        "ss_max_train_steps": max_steps,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_seed": seed,
        "ss_num_train_images": dataset_summary.get("train_images", len(captions)),
        "ss_tag_frequency": json.dumps({"dataset": tag_frequency(captions)}),
        "ss_dataset_dirs": json.dumps({"dataset": {"n_repeats": 1, "img_count": len(captions)}}),
        "ss_training_comment": f"trigger: {trigger}",
        "ss_output_name": title,
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(family, denoiser_config),
        "modelspec.implementation": lay.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": lay.prediction_type,
        "modelspec.trigger_phrase": trigger,
        "modelspec.description": json.dumps(dict(dataset_summary), sort_keys=True),
        "modelspec.author": "character-runner",
        "runner.model_family": family,
    }
    if md["modelspec.prediction_type"] is None:
        del md["modelspec.prediction_type"]
    for k, v in (extra or {}).items():
        md[k] = v
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in md.items()}


def save_kohya(path: Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=dict(metadata))
