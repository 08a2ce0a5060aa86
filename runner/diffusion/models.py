"""Loading base models: hub id, local diffusers folder, single .safetensors file, or builtin:tiny-*.

``load_pipeline`` returns a ``StableDiffusionPipeline`` (family ``sd15``) or a
``StableDiffusionXLPipeline`` (family ``sdxl``). The family is detected from the model itself
when ``family="auto"``: ``model_index.json`` / the UNet config for folders, the key names for
single files (SDXL checkpoints carry ``conditioner.embedders.1``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.core.errors import UserError

FAMILIES = ("sd15", "sdxl")


class ModelLoadError(UserError):
    """A base model could not be found or loaded; the message says what to do."""


def resolve_model_ref(base_model: str, *, cache_dir: Path | str | None = None,
                      project_root: Path | None = None) -> tuple[str, str]:
    """Classify a model reference: returns (kind, location) with kind builtin|folder|file|hub.

    For builtin models the location is the (built once) diffusers folder in the model cache.
    Relative paths are taken relative to ``project_root`` (or the working directory).
    """
    ref = str(base_model)
    if ref.startswith("builtin:"):
        from runner.diffusion.tiny import tiny_model_path

        try:
            return "builtin", str(tiny_model_path(ref, cache_dir))
        except ValueError as exc:
            raise ModelLoadError(str(exc), hint="Use builtin:tiny-sd or builtin:tiny-sdxl.") from None
    p = Path(ref).expanduser()
    if not p.is_absolute() and project_root is not None:
        cand = Path(project_root) / p
        if cand.exists():
            p = cand
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {p} has no model_index.json",
                hint="Give a diffusers-format folder (with model_index.json, unet/, vae/, text_encoder/), "
                "a single .safetensors checkpoint, or a hub id.",
            )
        return "folder", str(p)
    if p.suffix in (".safetensors", ".ckpt"):
        if not p.is_file():
            raise ModelLoadError(f"model file {p} does not exist", hint="Check train.base_model.")
        return "file", str(p)
    from runner.hub import is_hub_id

    if is_hub_id(ref):
        return "hub", ref
    raise ModelLoadError(
        f"base model {ref!r} is neither a hub id (owner/name), an existing folder, a .safetensors file nor builtin:*",
        hint="Check train.base_model.",
    )


def detect_family_of_folder(folder: Path) -> str:
    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = str(index.get("_class_name", ""))
    if "XL" in cls or "text_encoder_2" in index:
        return "sdxl"
    unet_cfg = Path(folder) / "unet" / "config.json"
    if unet_cfg.is_file() and json.loads(unet_cfg.read_text()).get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd15"


def detect_family_of_file(path: Path) -> str:
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return "sd15" if "xl" not in Path(path).name.lower() else "sdxl"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model") for k in keys) or any(k.startswith("model.diffusion_model") for k in keys):
        return "sd15"
    if any("lora" in k.lower() for k in keys[:50]):
        raise ModelLoadError(f"{path} is a LoRA file, not a base model",
                             hint="Set train.base_model to the checkpoint the LoRA was trained on.")
    raise ModelLoadError(f"{path} does not look like an SD 1.5 or SDXL checkpoint (no UNet keys)",
                         hint="Give a full single-file checkpoint, not a LoRA or VAE file.")


def detect_family(base_model: str, *, cache_dir: Path | str | None = None,
                  project_root: Path | None = None) -> str:
    """sd15 or sdxl for a model reference, without loading weights where possible."""
    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    if kind in ("builtin", "folder"):
        return detect_family_of_folder(Path(loc))
    if kind == "file":
        return detect_family_of_file(Path(loc))
    # hub id: ask the hub's model_index.json (the cached snapshot's when the hub is out of reach)
    loc = hub_location(loc)
    if Path(loc).is_dir():
        return detect_family_of_folder(Path(loc))
    try:
        from huggingface_hub import hf_hub_download

        return detect_family_of_folder(Path(hf_hub_download(loc, "model_index.json")).parent)
    except Exception:
        return "sdxl" if "xl" in loc.lower() else "sd15"


def hub_location(ref: str, key: str = "train.base_model") -> str:
    """Where to load hub model ``ref`` from (see :func:`runner.hub.resolve_hub_model`): fails in
    seconds with :class:`ModelLoadError` when it is neither cached nor downloadable."""
    from runner.hub import ModelUnavailable, resolve_hub_model

    try:
        return resolve_hub_model(ref, key=key)
    except ModelUnavailable as exc:
        raise ModelLoadError(str(exc), hint=exc.hint) from None


# VAE downscale x 2**(UNet down blocks - 1) of the real architectures (sd-scripts requires the
# same of bucket_reso_steps): what image sides must be multiples of.
FAMILY_SIZE_MULTIPLE = {"sd15": 64, "sdxl": 32}


def size_multiple(base_model: str, *, family: str = "auto", cache_dir: Path | str | None = None,
                  project_root: Path | None = None) -> int:
    """What image sides must be divisible by for ``base_model`` (VAE downscale x 2 ** (UNet down
    blocks - 1), the trainer's ``multiple``), read from the model's config files, no weights.
    Single files and hub ids that are not cached locally use their family's value."""
    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    folder = Path(loc) if kind in ("builtin", "folder") else None
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(loc, "unet/config.json")).parent.parent
            hf_hub_download(loc, "vae/config.json")
        except Exception:
            folder = None
    if folder is not None and all((folder / part / "config.json").is_file() for part in ("unet", "vae")):
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
    if family == "auto":
        family = detect_family(base_model, cache_dir=cache_dir, project_root=project_root)
    return FAMILY_SIZE_MULTIPLE[family]


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def default_dtype(device: str):
    import torch

    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_pipeline(base_model: str, *, family: str = "auto", device: str = "cpu", dtype: Any = None,
                  cache_dir: Path | str | None = None, project_root: Path | None = None):
    """Load a Stable Diffusion 1.5 or SDXL pipeline.

    base_model: hub id ("stabilityai/stable-diffusion-xl-base-1.0"), a local diffusers folder, a
    single .safetensors checkpoint, or builtin:tiny-sd / builtin:tiny-sdxl.
    family: "auto" (detect), "sd15" or "sdxl". dtype: torch dtype; None picks fp32 on CPU and
    bf16 (fp16 where bf16 is unsupported) on CUDA.

    Raises :class:`ModelLoadError` with a hint when the model cannot be found or loaded.
    """
    if family not in ("auto", *FAMILIES):
        raise ModelLoadError(f"unknown model family {family!r}", hint="Use auto, sd15 or sdxl.")
    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    if kind == "hub":
        loc = hub_location(loc)  # before any download attempt: offline and uncached fails now
    detected = detect_family(base_model, cache_dir=cache_dir, project_root=project_root)
    if family != "auto" and family != detected and kind != "hub":
        raise ModelLoadError(f"base model {base_model!r} is {detected}, not {family}",
                             hint=f"Set train.model_family to {detected} or auto.")
    if family != "auto":
        detected = family
    if dtype is None:
        dtype = default_dtype(device)
    cls = _pipeline_class(detected)
    extra: dict[str, Any] = {}
    if detected == "sd15":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    from diffusers.utils import logging as dlogging

    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()  # loading bars would bypass ctx.progress
    tlogging.disable_progress_bar()
    try:
        if kind == "file":
            pipe = cls.from_single_file(loc, dtype=dtype, **extra)
        else:
            pipe = cls.from_pretrained(loc, dtype=dtype, **extra)
    except (OSError, EnvironmentError, ValueError) as exc:
        hint = ("This machine may have no access to the Hugging Face hub: download the model first "
                "(huggingface-cli download ...) or point base_model at a local folder or file.")
        if kind == "file":
            hint = ("Single-file loading needs the model's config; offline, set HF_HUB_OFFLINE=0 once to "
                    "fetch it, or convert the checkpoint to a diffusers folder.")
        raise ModelLoadError(f"could not load base model {base_model!r} ({kind}): {exc}", hint=hint) from None
    actual = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"
    if actual != detected:
        raise ModelLoadError(f"base model {base_model!r} is {actual}, not {detected}",
                             hint=f"Set train.model_family to {actual} or auto.")
    if kind == "builtin":
        pipe.set_progress_bar_config(disable=True)
    pipe._character_runner_family = detected  # noqa: SLF001  (read by family_of)
    pipe._character_runner_tiny = kind == "builtin"
    return pipe.to(device)


def family_of(pipe) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def model_fingerprint(base_model: str, *, cache_dir: Path | str | None = None,
                      project_root: Path | None = None) -> str:
    """A string that changes when the model's weights change (for latent/text cache keys).

    Hub ids and builtin names are stable references; local folders and files add size+mtime of
    their weight files so an edited local model never reuses stale caches.
    """
    import hashlib

    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    h = hashlib.sha256(f"{kind}:{base_model}".encode())
    if kind == "builtin":
        from runner.diffusion.tiny import TINY_VERSION

        h.update(f"v{TINY_VERSION}".encode())
    elif kind in ("folder", "file"):
        p = Path(loc)
        weights = (".safetensors", ".bin", ".json")
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in weights)
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
