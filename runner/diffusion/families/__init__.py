"""The model family registry: one module per family in this package, each defining ``FAMILY``
(or ``FAMILIES``, a tuple, when one module holds variants with different pipelines). Adding a
family is adding a module; nothing else names families.

    from runner.diffusion import families
    fam = families.get("flux1")                    # or families.detect_folder(path)
    pipe = families.load_pipeline(fam, folder)     # the diffusers pipeline of that family
    c = families.components_of(pipe, fam)          # denoiser, training scheduler, objective
    families.add_lora(c, rank=16)                  # on the family's default target modules
    raw = fam.images_to_raw(pipe, pixels)          # cached: VAE mean/std
    text = fam.encode_captions(pipe, captions)     # cached: one dict of tensors per caption
    batch = families.Batch(latents=fam.to_model_latents(pipe, sample), text=fam.collate(text), ...)
    loss = families.training_loss(c, batch).mean()

Module imports stay light (no torch, diffusers or transformers until a function runs).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any

from runner.diffusion.families.base import (  # noqa: F401  (the package's public API)
    Batch,
    Components,
    Family,
    LatentFormat,
    Objective,
    SampleDefaults,
    TextEncoding,
    add_lora,
    save_lora,
    components_of,
    training_loss,
    unmatched_targets,
)
from runner.core.errors import UserError

_NOT_FAMILIES = {"base", "comfykit", "tinykit", "videokit"}
_REGISTRY: dict[str, Family] = {}


def _load() -> dict[str, Family]:
    if not _REGISTRY:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.name in _NOT_FAMILIES or info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{__name__}.{info.name}")
            for fam in getattr(mod, "FAMILIES", ()) or (mod.FAMILY,):
                register(fam)
    return _REGISTRY


def register(family: Family) -> Family:
    """Add a family (plugins may call this); a second family of the same name is an error."""
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _REGISTRY[family.name] = family
    return family


MODALITIES = ("image", "video")


def names(modality: str | None = "image") -> list[str]:
    """The families of one modality ("image": what train.model_family takes; "video": the video
    stage's), or all of them (None)."""
    return sorted(n for n, f in _load().items() if modality is None or f.modality == modality)


def all_families(modality: str | None = "image") -> list[Family]:
    return [_load()[n] for n in names(modality)]


def get(name: str) -> Family:
    """A family of either modality by name."""
    fams = _load()
    if name not in fams:
        raise UserError(f"unknown model family {name!r}", hint=f"Known families: {', '.join(names(None))}.")
    return fams[name]


# ---------------------------------------------------------------------------------------------
# detection


def detect_folder(folder: Path | str, modality: str | None = "image") -> Family:
    """The family of a diffusers folder, from its model_index.json ``_class_name`` (among the
    families of ``modality``; None: any)."""
    index_path = Path(folder) / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
        cls = str(index.get("_class_name", ""))
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{index_path}: cannot read the model index ({exc})",
                        hint="Give a diffusers-format folder (with model_index.json).") from None
    for fam in all_families(modality):  # video families sharing a class tell their folders apart by the index
        if cls in fam.class_names and (fam.video is None or fam.video.index_match is None
                                       or fam.video.index_match(index)):
            return fam
    known = ", ".join(c for f in all_families(modality) for c in f.class_names)
    what = "video model family the runner generates with" if modality == "video" else "model family the runner trains"
    raise UserError(f"{index_path}: pipeline {cls or '(none)'} is not a {what}",
                    hint=f"Supported pipelines: {known}.")


def detect_pipeline(pipe, modality: str | None = "image") -> Family:
    """The family of a loaded diffusers pipeline, by its class."""
    cls = type(pipe).__name__
    for fam in all_families(modality):
        if cls in fam.class_names:
            return fam
    raise UserError(f"pipeline {cls} is not a model family the runner trains",
                    hint=f"Supported pipelines: {', '.join(c for f in all_families() for c in f.class_names)}.")


class _Keys:
    """A safetensors file seen as the mapping diffusers' model-type inference reads: key
    membership and tensor shapes, no tensor loaded."""

    def __init__(self, handle) -> None:
        self.handle, self.keys_ = handle, set(handle.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys_

    def __iter__(self):
        return iter(self.keys_)

    def keys(self):
        return self.keys_

    def __getitem__(self, key: str):
        shape = self.handle.get_slice(key).get_shape()
        return type("_Shape", (), {"shape": tuple(shape)})()


def detect_file(path: Path | str) -> Family:
    """The family of a single-file checkpoint (.safetensors), from its key names as diffusers'
    single-file loader reads them."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = _Keys(f)
            model_type = infer_diffusers_model_type(keys)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{path}: not a readable .safetensors checkpoint ({exc})",
                        hint="Give a full single-file checkpoint, a diffusers folder or a hub id.") from None
    except (IndexError, KeyError) as exc:  # a known key with a shape no real checkpoint has
        raise UserError(f"{path}: the tensors do not have the shapes of a checkpoint diffusers knows ({exc!r})",
                        hint="Give a full single-file checkpoint, a diffusers folder or a hub id.") from None
    if model_type == "v1" and CHECKPOINT_KEY_NAMES["v1"] not in keys:  # diffusers' fallback: nothing matched
        kind = "a LoRA" if any("lora" in k for k in keys) else "not a base model the runner knows"
        raise UserError(f"{path}: {kind} (no UNet or transformer keys of a supported family)",
                        hint="Set train.base_model to the full checkpoint, a diffusers folder or a hub id.")
    for fam in all_families():
        if model_type in fam.single_file_types:
            return fam
    raise UserError(f"{path}: a {model_type} checkpoint, which the runner does not train",
                    hint=f"Supported families: {', '.join(names())}.")


def detect_hub_id(ref: str, modality: str | None = "image") -> Family | None:
    """The family a hub id names by its well-known pattern, or None (then read its
    model_index.json)."""
    for fam in all_families(modality):
        if any(re.search(p, ref, re.IGNORECASE) for p in fam.hub_patterns):
            return fam
    return None


def family_of_ref(ref: str, *, project_root: Path | str | None = None, guess: bool = True,
                  modality: str | None = "image") -> Family | None:
    """The family of ``modality`` (None: any) a model reference names, read cheaply (no
    weights, no build, no network): a builtin model's, a local folder's model index, and
    (``guess``) a hub id's well-known pattern; None when only loading would tell (single files,
    other hub ids)."""
    ref = str(ref)
    if ref.startswith("builtin:"):
        fam = by_tiny_name(ref)
        return fam if fam is not None and modality in (None, fam.modality) else None
    folder = Path(ref).expanduser()
    if not folder.is_absolute() and project_root is not None:
        folder = Path(project_root) / folder
    if (folder / "model_index.json").is_file():
        try:
            return detect_folder(folder, modality=modality)
        except UserError:
            return None
    if folder.exists():  # a local path, not a hub id: its name is no evidence
        return None
    return detect_hub_id(ref, modality=modality) if guess else None


def refuse_video(base_model: str, family: str = "auto", *, key: str = "train.base_model",
                 project_root: Path | str | None = None) -> None:
    """A UserError when an image stage (training, image generation) is given a video family, by
    name or by a model that is one (a builtin, a folder's model index, a hub id's pattern)."""
    fam = _load().get(family) if family != "auto" else None
    if fam is None and family == "auto":
        ref = str(base_model)
        fam = by_tiny_name(ref) if ref.startswith("builtin:") else None
        folder = Path(ref).expanduser()
        if not folder.is_absolute() and project_root is not None:
            folder = Path(project_root) / folder
        if fam is None and (folder / "model_index.json").is_file():
            try:
                fam = detect_folder(folder, modality="video")
            except UserError:
                fam = None
        if fam is None and not folder.exists() and detect_hub_id(ref) is None:
            fam = detect_hub_id(ref, modality="video")
    if fam is not None and fam.modality == "video" and family != "auto":
        raise UserError(f"train.model_family: {family!r} is a video family ({fam.title})",
                        hint=f"Use it in generate.video.family, and train a LoRA for it in the train_video "
                             f"section. Image families: {', '.join(names())}.")
    if fam is not None and fam.modality == "video":
        raise UserError(f"{key}: {base_model!r} is a video model ({fam.title}, family {fam.name}); image training "
                        f"and image generation take image families only",
                        hint=f"Use it in generate.video.model (generate.video.family: {fam.name}), and train a LoRA "
                             f"for it in the train_video section. Image families: {', '.join(names())}.")


def by_tiny_name(ref: str) -> Family | None:
    """The family (either modality) whose tiny model ``builtin:<tiny>`` names."""
    name = ref.removeprefix("builtin:")
    return next((f for f in all_families(None) if f.tiny == name), None)


# ---------------------------------------------------------------------------------------------
# tiny models and loading


def tiny_path(ref: str, cache_dir: Path | str | None = None) -> Path:
    """Build once (under a lock) and return the diffusers folder of ``builtin:tiny-<family>``."""
    from runner.buildcache import build_once
    from runner.diffusion.tiny import TINY_SEED, models_cache_dir, tiny_model_path

    fam = by_tiny_name(ref)
    if fam is None:
        raise UserError(f"unknown builtin model {ref!r}",
                        hint=f"Known: {', '.join('builtin:' + f.tiny for f in all_families(None))}.")
    if fam.build_tiny is None:  # SD 1.5 / SDXL: the folder runner.diffusion.tiny has always built
        return tiny_model_path(fam.tiny, cache_dir)
    final = models_cache_dir(cache_dir) / f"builtin-{fam.tiny}-v{fam.tiny_version}"
    note = (f"builtin:{fam.tiny} v{fam.tiny_version}: a tiny {fam.title} with random weights, built from config "
            f"with seed {TINY_SEED} by character-runner. Its images are noise.\n")
    return build_once(final, fam.build_tiny, marker="DONE", notes={"TINY_RANDOM_MODEL.txt": note})


def load_pipeline(family: Family, folder: Path | str, *, device: str = "cpu", dtype: Any = None):
    """``<family.pipeline>.from_pretrained(folder)`` on ``device`` (float32 unless ``dtype``)."""
    import diffusers
    import torch

    cls = getattr(diffusers, family.pipeline)
    pipe = cls.from_pretrained(str(folder), dtype=dtype or torch.float32, **dict(family.pipeline_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
