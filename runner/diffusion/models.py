"""Loading base models: hub id, local diffusers folder, single .safetensors file, or builtin:tiny-*.

``load_pipeline`` returns the diffusers pipeline of the model's family (one of
:mod:`runner.diffusion.families`: ``StableDiffusionPipeline`` for sd15, ``FluxPipeline`` for
flux1, ...). The family is detected from the model itself when ``family="auto"``:
``model_index.json``'s pipeline class for folders (and cached hub snapshots), the key names
diffusers' single-file loader reads for single files, the name for builtin models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.core.errors import UserError
from runner.diffusion import families


class ModelLoadError(UserError):
    """A base model could not be found or loaded; the message says what to do."""


def family_names() -> list[str]:
    return families.names()


def _builtin_hint() -> str:
    return "Use one of " + ", ".join(f"builtin:{f.tiny}" for f in families.all_families()) + "."


def resolve_model_ref(base_model: str, *, cache_dir: Path | str | None = None,
                      project_root: Path | None = None) -> tuple[str, str]:
    """Classify a model reference: returns (kind, location) with kind builtin|folder|file|hub.

    For builtin models the location is the (built once) diffusers folder in the model cache.
    Relative paths are taken relative to ``project_root`` (or the working directory).
    """
    ref = str(base_model)
    if ref.startswith("builtin:"):
        if families.by_tiny_name(ref) is None:
            raise ModelLoadError(f"unknown builtin model {ref!r}", hint=_builtin_hint())
        return "builtin", str(families.tiny_path(ref, cache_dir))
    p = Path(ref).expanduser()
    if not p.is_absolute() and project_root is not None:
        cand = Path(project_root) / p
        if cand.exists():
            p = cand
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {p} has no model_index.json",
                hint="Give a diffusers-format folder (with model_index.json and a folder per component), "
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


def _as_load_error(fn, *args):
    try:
        return fn(*args)
    except ModelLoadError:
        raise
    except UserError as exc:
        raise ModelLoadError(exc.message, hint=exc.hint) from None


def detect_family_of_folder(folder: Path) -> str:
    return _as_load_error(families.detect_folder, folder).name


def detect_family_of_file(path: Path) -> str:
    if Path(path).suffix != ".safetensors":  # a pickle: only its name can be read safely
        return "sdxl" if "xl" in Path(path).name.lower() else "sd15"
    return _as_load_error(families.detect_file, path).name


def detect_family(base_model: str, *, cache_dir: Path | str | None = None,
                  project_root: Path | None = None) -> str:
    """The family name of a model reference, without loading weights."""
    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    if kind == "builtin":
        return families.by_tiny_name(str(base_model)).name
    if kind == "folder":
        return detect_family_of_folder(Path(loc))
    if kind == "file":
        return detect_family_of_file(Path(loc))
    # hub id: its model_index.json (the cached snapshot's when the hub is out of reach)
    loc = hub_location(loc)
    if Path(loc).is_dir():
        return detect_family_of_folder(Path(loc))
    try:
        from huggingface_hub import hf_hub_download

        return detect_family_of_folder(Path(hf_hub_download(loc, "model_index.json")).parent)
    except ModelLoadError:
        raise
    except Exception:
        fam = families.detect_hub_id(loc)
        if fam is None:
            raise ModelLoadError(f"cannot tell the model family of {loc!r} (no model_index.json reachable)",
                                 hint=f"Set train.model_family to one of {', '.join(family_names())}.") from None
        return fam.name


def hub_location(ref: str, key: str = "train.base_model") -> str:
    """Where to load hub model ``ref`` from (see :func:`runner.hub.resolve_hub_model`): fails in
    seconds with :class:`ModelLoadError` when it is neither cached nor downloadable."""
    from runner.hub import ModelUnavailable, resolve_hub_model

    try:
        return resolve_hub_model(ref, key=key)
    except ModelUnavailable as exc:
        raise ModelLoadError(str(exc), hint=exc.hint) from None


def _folder_multiple(folder: Path, fam) -> int | None:
    """What the family's config files in ``folder`` say image sides must be divisible by."""
    den = folder / fam.denoiser / "config.json"
    vae = folder / "vae" / "config.json"
    if not (den.is_file() and vae.is_file()):
        return None
    den_cfg, vae_cfg = json.loads(den.read_text()), json.loads(vae.read_text())
    return fam.multiple_from_configs(den_cfg, vae_cfg)


def size_multiple(base_model: str, *, family: str = "auto", cache_dir: Path | str | None = None,
                  project_root: Path | None = None) -> int:
    """What image sides must be divisible by for ``base_model`` (the trainer's bucket
    ``multiple``), read from the model's config files, no weights. Single files and hub ids that
    are not cached locally use their family's value."""
    kind, loc = resolve_model_ref(base_model, cache_dir=cache_dir, project_root=project_root)
    if family == "auto":
        family = detect_family(base_model, cache_dir=cache_dir, project_root=project_root)
    fam = families.get(family)
    folder = Path(loc) if kind in ("builtin", "folder") else None
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(loc, f"{fam.denoiser}/config.json")).parent.parent
            hf_hub_download(loc, "vae/config.json")
        except Exception:
            folder = None
    found = _folder_multiple(folder, fam) if folder is not None else None
    return found or fam.size_multiple


def default_dtype(device: str):
    import torch

    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _chosen_family(base_model: str, family: str, kind: str, **where) -> str:
    if family not in ("auto", *family_names()):
        raise ModelLoadError(f"unknown model family {family!r}",
                             hint=f"Use auto or one of {', '.join(family_names())}.")
    detected = detect_family(base_model, **where)
    if family != "auto" and family != detected and kind != "hub":
        raise ModelLoadError(f"base model {base_model!r} is {detected}, not {family}",
                             hint=f"Set train.model_family to {detected} or auto.")
    return detected if family == "auto" else family


def load_pipeline(base_model: str, *, family: str = "auto", device: str = "cpu", dtype: Any = None,
                  cache_dir: Path | str | None = None, project_root: Path | None = None):
    """Load the diffusers pipeline of ``base_model``'s family.

    base_model: a hub id ("black-forest-labs/FLUX.1-dev"), a local diffusers folder, a single
    .safetensors checkpoint, or builtin:tiny-<family>. family: "auto" (detect) or a family name
    (:func:`runner.diffusion.families.names`). dtype: torch dtype; None picks fp32 on CPU and
    bf16 (fp16 where bf16 is unsupported) on CUDA.

    Raises :class:`ModelLoadError` with a hint when the model cannot be found or loaded.
    """
    families.refuse_video(base_model, family, project_root=project_root)  # a video family is not trained here
    where = {"cache_dir": cache_dir, "project_root": project_root}
    kind, loc = resolve_model_ref(base_model, **where)
    if kind == "hub":
        loc = hub_location(loc)  # before any download attempt: offline and uncached fails now
    fam = families.get(_chosen_family(base_model, family, kind, **where))
    pipe = _from_pretrained(fam, kind, loc, base_model, dtype or default_dtype(device))
    actual = _as_load_error(families.detect_pipeline, pipe)
    if actual is not fam:
        raise ModelLoadError(f"base model {base_model!r} is {actual.name}, not {fam.name}",
                             hint=f"Set train.model_family to {actual.name} or auto.")
    pipe.set_progress_bar_config(disable=True)  # bars would bypass ctx.progress
    pipe._character_runner_family = fam.name  # noqa: SLF001  (read by family_of)
    pipe._character_runner_tiny = kind == "builtin"
    return pipe.to(device)


def _from_pretrained(fam, kind: str, loc: str, base_model: str, dtype):
    import diffusers
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()  # loading bars would bypass ctx.progress
    tlogging.disable_progress_bar()
    cls = getattr(diffusers, fam.pipeline)
    extra = dict(fam.pipeline_kwargs)
    try:
        if kind == "file":
            if not hasattr(cls, "from_single_file"):
                raise ModelLoadError(f"{base_model}: a {fam.title} single file cannot be loaded as a pipeline",
                                     hint=f"Point train.base_model at the {fam.title} diffusers folder or hub id.")
            return cls.from_single_file(loc, dtype=dtype, **extra)
        return cls.from_pretrained(loc, dtype=dtype, **extra)
    except (OSError, EnvironmentError, ValueError, TypeError) as exc:
        hint = ("This machine may have no access to the Hugging Face hub: download the model first "
                "(hf download ...) or point base_model at a local folder or file.")
        if kind == "file":
            hint = ("Single-file loading needs the model's config; offline, set HF_HUB_OFFLINE=0 once to "
                    "fetch it, or convert the checkpoint to a diffusers folder.")
        raise ModelLoadError(f"could not load base model {base_model!r} ({kind}): {exc}", hint=hint) from None


def family_of(pipe) -> str:
    """The family name of a loaded pipeline."""
    name = getattr(pipe, "_character_runner_family", None)
    return name or families.detect_pipeline(pipe).name


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
        h.update(f"v{families.by_tiny_name(str(base_model)).tiny_version}".encode())
    elif kind in ("folder", "file"):
        p = Path(loc)
        weights = (".safetensors", ".bin", ".json")
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in weights)
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
