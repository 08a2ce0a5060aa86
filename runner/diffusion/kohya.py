"""peft/diffusers LoRA state dict -> kohya-format LoRA file (what ComfyUI and A1111 load), for
every family whose module gives its layout (``comfy=``, :mod:`runner.diffusion.families.comfykit`); the
conversion lives in :mod:`runner.diffusion.comfy`.

Key naming rules (written from the formats themselves):

- A LoRA on module ``M`` becomes ``<prefix><native name of M with dots as underscores>.lora_down.weight``
  (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (a scalar tensor holding the
  real alpha; loaders scale by alpha / rank, so writing rank there would silently change the
  strength of a LoRA trained with alpha != rank).
- Prefixes: ``lora_unet_`` for the denoiser (UNet or transformer); the text encoders' (``lora_te_``,
  ``lora_te1_``, ...) are the family's.
- The native name of a module is the one in the model's original checkpoint layout, as the
  family's layout says (some families keep the diffusers names).

Metadata: ``ss_*`` keys as kohya sd-scripts writes them and ``modelspec.*`` keys from Stability's
model metadata spec (architecture, resolution, trigger phrase, ...). safetensors metadata values
must be strings.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping


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
    Names follow the family's layout, fused weights included (:mod:`runner.diffusion.comfy`); a
    family without one (``comfy=None``) raises ValueError.
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
    and ``runner.model_family``; ``denoiser_config`` tells variants apart where the family's layout
    names them. Flow-matching families carry no ``modelspec.prediction_type`` (as sd-scripts writes
    them).
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
