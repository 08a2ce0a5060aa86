"""LoRA files onto pipelines (diffusers/peft or kohya format; diffusers detects which), and the
diffusers/peft file a checkpoint writes.

The diffusers file holds ``unet.<module>.lora_A/B.weight`` and, when the text encoders were
trained, ``text_encoder.text_model.<module>...`` (and ``text_encoder_2.text_model...`` for SDXL):
the nested CLIP layout that diffusers 0.32 with transformers 4.x, the installed diffusers,
ComfyUI and A1111 all read (see :func:`runner.diffusion.kohya.clip_text_model_path`).
``bench/interop/old_diffusers.py`` loads it with diffusers 0.32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def save_diffusers_lora(pipe, folder: Path, state: Mapping[str, Mapping[str, Any]], *,
                        weight_name: str | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` from peft state dicts.

    ``state`` maps the denoiser (``unet`` or ``transformer``, and ``text_encoder`` /
    ``text_encoder_2`` when the CLIP text encoders trained) to what ``get_peft_model_state_dict``
    gives for that component of ``pipe``. The LoRA scale alpha / rank is
    folded into ``lora_B`` and the adapter metadata says ``lora_alpha = r``: readers that ignore
    the metadata (diffusers 0.32, ComfyUI, A1111 take alpha = rank for peft keys) then apply the
    strength it was trained with, and the installed diffusers reads the same. Returns the path.
    """
    from runner.diffusion.kohya import clip_text_model_layout

    kw: dict[str, Any] = {}
    for name, layers in state.items():
        if not layers:
            continue
        sd, meta = _fold_alpha(layers, getattr(pipe, name).peft_config["default"].to_dict())
        kw[f"{name}_lora_layers"] = clip_text_model_layout(sd) if name in _TEXT_ENCODERS else sd
        kw[f"{name}_lora_adapter_metadata"] = meta
    weight_name = weight_name or DIFFUSERS_FILE
    type(pipe).save_lora_weights(str(folder), weight_name=weight_name, safe_serialization=True, **kw)
    return Path(folder) / weight_name


def _fold_alpha(sd: Mapping[str, Any], config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict with lora_B scaled by alpha / r, config saying lora_alpha = r)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("per-module LoRA ranks or alphas are not supported by the diffusers writer")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    out = {k: (v * scale if ".lora_B." in k and scale != 1 else v) for k, v in sd.items()}
    return out, {**config, "lora_alpha": r, "use_rslora": False}


def load_lora(pipe, file: str | Path, adapter_name: str = "default", scale: float = 1.0):
    """Load a LoRA ``.safetensors`` file onto ``pipe`` as ``adapter_name`` and activate it at
    ``scale``. Works for both the diffusers/peft file and the kohya file a checkpoint writes.
    Returns the pipeline.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"LoRA file {file} does not exist")
    existing = set()
    try:
        existing = {a for names in pipe.get_list_adapters().values() for a in names}
    except Exception:
        pass
    if adapter_name in existing:
        pipe.delete_adapters(adapter_name)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    return pipe


def unload_loras(pipe) -> None:
    """Remove every LoRA adapter from ``pipe`` (back to the base model)."""
    pipe.unload_lora_weights()
