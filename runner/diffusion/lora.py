"""LoRA files onto pipelines (diffusers/peft or kohya format; diffusers detects which)."""

from __future__ import annotations

from pathlib import Path


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
