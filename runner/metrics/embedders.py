"""Image (and text) embedders for the evaluation metrics: CLIP and DINO.

``load_image_embedder(model_ref, cache_dir)`` accepts

- a Hugging Face hub id or a local folder saved with ``save_pretrained``. The model type in its
  ``config.json`` picks the family: ``clip`` -> CLIP (image and text towers, projected
  embeddings, as CLIPScore and CLIP-I use them); ``vit`` (e.g. ``facebook/dino-vits16``),
  ``dinov2``, ``dinov3_vit``... -> DINO-style backbone whose CLS token is the embedding (as the
  DreamBooth DINO metric uses it);
- ``open_clip:<architecture>/<pretrained tag>`` or ``open_clip:hf-hub:<org>/<name>``, and hub
  folders that only carry an ``open_clip_config.json``: loaded with ``open_clip`` when it is
  installed (optional; ``pip install open_clip_torch``);
- ``builtin:tiny-clip`` / ``builtin:tiny-dino``: tiny models built from small configs with fixed
  seeds, saved once under ``<cache_dir>/models/`` and loaded back with the same
  ``from_pretrained`` code a real model goes through. Their numbers are meaningless
  (``is_tiny_random`` is True) and every figure computed with them must be labelled as such.

Every embedder returns L2-normalized float32 numpy arrays, computed in batches.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from runner.core.device import choose_device
from runner.core.errors import StageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

TINY_CLIP = "builtin:tiny-clip"
TINY_DINO = "builtin:tiny-dino"
# Bump when the tiny configs change, so an old cached copy is not reused.
TINY_VERSION = 1
TINY_SEED = 1234

DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "deit")


class EmbedderError(StageError):
    """A model reference that cannot be loaded (message and hint meant for the user)."""


def default_cache_dir() -> Path:
    """The runner's shared cache root (``runner.paths.cache_root``)."""
    from runner.paths import cache_root

    return Path(cache_root())


# --------------------------------------------------------------------------- embedders


class ImageEmbedder:
    """Common part: batching, normalization, bookkeeping.

    Subclasses implement ``_image_features(list[PIL.Image]) -> torch.Tensor`` (N, D).
    """

    kind = "image"  # "clip" or "dino"
    backend = "transformers"

    def __init__(self, name: str, *, is_tiny_random: bool, device: str, default_batch_size: int = 32):
        self.name = name
        self.is_tiny_random = is_tiny_random
        self.device = device
        self.default_batch_size = default_batch_size
        # One forward at a time per embedder (torch modules are shared between stage threads).
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        tiny = ", tiny random" if self.is_tiny_random else ""
        return f"<{type(self).__name__} {self.name} ({self.backend}{tiny})>"

    @property
    def label(self) -> str:
        """Name for reports: says loudly when the model is a tiny random one."""
        return f"{self.name} (tiny random model: figures are meaningless)" if self.is_tiny_random else self.name

    def embed_images(self, images: Sequence["Image.Image"], batch_size: int | None = None) -> np.ndarray:
        """(N, D) L2-normalized float32 embeddings of ``images``, ``batch_size`` at a time."""
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self._batched(images, batch_size, self._image_features)

    def _batched(self, items: list, batch_size: int | None, features) -> np.ndarray:
        """``features`` over ``items``, ``batch_size`` at a time, one forward at a time, normalized."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = max(1, int(batch_size or self.default_batch_size))
        import torch

        chunks = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(items), bs):
                chunks.append(features(items[i : i + bs]).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks, axis=0))

    @property
    def dim(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _image_features(self, images: list["Image.Image"]):  # pragma: no cover - overridden
        raise NotImplementedError


class TextEmbedder(ImageEmbedder):
    """An embedder with a text tower too (CLIP): subclasses add ``_text_features(list[str])``."""

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N, D) L2-normalized text embeddings; prompts longer than the context are truncated."""
        return self._batched(list(texts), batch_size, self._text_features)

    def _text_features(self, texts: list[str]):  # pragma: no cover - overridden
        raise NotImplementedError


class ClipEmbedder(TextEmbedder):
    """transformers CLIPModel: projected image and text embeddings (the CLIPScore space)."""

    kind = "clip"

    def __init__(self, model, image_processor, tokenizer, name: str, *, is_tiny_random: bool, device: str):
        super().__init__(name, is_tiny_random=is_tiny_random, device=device)
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_text_tokens = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def _image_features(self, images):
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        out = self.model.get_image_features(pixel_values=pixel_values.to(param.device, param.dtype))
        return _features(out)

    def _text_features(self, texts: list[str]):
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")
        dev = next(self.model.parameters()).device
        tok = {k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tok))


class DinoEmbedder(ImageEmbedder):
    """A ViT backbone (DINO v1 ``ViTModel``, DINOv2/v3 via ``AutoModel``): the CLS token."""

    kind = "dino"

    def __init__(self, model, image_processor, name: str, *, is_tiny_random: bool, device: str):
        super().__init__(name, is_tiny_random=is_tiny_random, device=device)
        self.model = model
        self.image_processor = image_processor

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _image_features(self, images):
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixel_values.to(param.device, param.dtype))
        # CLS token of the last layer (after the final layer norm), as DreamBooth's DINO metric.
        return out.last_hidden_state[:, 0]


class OpenClipEmbedder(TextEmbedder):
    """open_clip model (optional backend)."""

    kind = "clip"
    backend = "open_clip"

    def __init__(self, model, preprocess, tokenizer, name: str, *, device: str):
        super().__init__(name, is_tiny_random=False, device=device)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            from PIL import Image

            self._dim = int(self.embed_images([Image.new("RGB", (32, 32))]).shape[1])
        return self._dim

    def _image_features(self, images):
        import torch

        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(batch)

    def _text_features(self, texts: list[str]):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def _features(out: Any):
    """transformers 4.x returns a tensor from get_*_features; 5.x a ModelOutput."""
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# --------------------------------------------------------------------------- loading

_LOADED: dict[tuple[str, str, str, str], ImageEmbedder] = {}
_LOAD_LOCK = threading.Lock()


def load_image_embedder(
    model_ref: str | Path,
    cache_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
) -> ImageEmbedder:
    """Load a CLIP or DINO embedder (see module docstring for what ``model_ref`` may be).

    ``cache_dir`` holds the built-in tiny models (``<cache_dir>/models/...``); hub downloads use
    the Hugging Face cache as usual. ``device``: "cpu", "cuda", "cuda:1", "mps" or "auto"
(:func:`runner.core.device.choose_device`). Loaded models
    are kept per process, so a stage that loads the same model twice pays once.
    """
    ref = str(model_ref)
    device = choose_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Built-in tiny models live in the cache folder: a different cache is a different model file.
    key = (ref, str(cache.resolve()) if ref.startswith("builtin:") else "", device, str(dtype))
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        emb = _load(ref, cache, device, dtype)
        _LOADED[key] = emb
        return emb


def _torch_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise EmbedderError(f"unknown dtype {dtype!r} for an image embedder", hint="Use float32, float16 or bfloat16.")
    return table[dtype]


def _load(ref: str, cache: Path, device: str, dtype: str | None) -> ImageEmbedder:
    if ref == TINY_CLIP:
        folder = ensure_tiny_model("clip", cache)
        return _load_transformers(str(folder), ref, device, dtype, is_tiny_random=True)
    if ref == TINY_DINO:
        folder = ensure_tiny_model("dino", cache)
        return _load_transformers(str(folder), ref, device, dtype, is_tiny_random=True)
    if ref.startswith("builtin:"):
        raise EmbedderError(
            f"unknown built-in embedding model {ref!r}",
            hint=f"Built-in embedders are {TINY_CLIP} and {TINY_DINO}; otherwise give a hub id or a local folder.",
        )
    if ref.startswith("open_clip:"):
        spec = ref[len("open_clip:") :]
        if spec.startswith("hf-hub:"):
            where = _hub_location(spec[len("hf-hub:") :])
            spec = spec if where == spec[len("hf-hub:") :] else "local-dir:" + where
        return _load_open_clip(spec, ref, device)
    local = Path(ref).expanduser()
    if local.is_dir() and not (local / "config.json").is_file() and (local / "open_clip_config.json").is_file():
        return _load_open_clip("local-dir:" + str(local), ref, device)
    looks_local = ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1
    if looks_local and not local.exists():
        raise EmbedderError(f"embedding model folder not found: {ref}",
                            hint="Give a folder saved with save_pretrained(), or a hub id like 'facebook/dino-vits16'.")
    from runner.hub import is_hub_id

    path = _hub_location(ref) if is_hub_id(ref) else ref
    return _load_transformers(path, ref, device, dtype, is_tiny_random=False)


def _hub_location(ref: str) -> str:
    """Where to load hub model ``ref`` from; an uncached model offline fails now, not after retries."""
    from runner.hub import ModelUnavailable, resolve_hub_model

    try:
        return resolve_hub_model(ref)
    except ModelUnavailable as exc:
        raise EmbedderError(str(exc), hint=exc.hint) from None


def _load_transformers(path: str, name: str, device: str, dtype: str | None, *, is_tiny_random: bool) -> ImageEmbedder:
    # A local copy of a built-in tiny model stays labelled as one.
    is_tiny_random = is_tiny_random or (Path(path) / "TINY_RANDOM_MODEL.txt").is_file()
    with _quiet_transformers():
        return _load_transformers_inner(path, name, device, dtype, is_tiny_random=is_tiny_random)


@contextlib.contextmanager
def _quiet_transformers():
    """No weight-loading progress bars on the user's terminal (the stage reports its own)."""
    from transformers.utils import logging as tf_logging

    was_disabled = not tf_logging.is_progress_bar_enabled()
    verbosity = tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    # Also hides "requires torchvision, falling back to the PIL image processor" (we never
    # install torchvision; the PIL processors compute the same pixel values).
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if not was_disabled:
            tf_logging.enable_progress_bar()


def _load_transformers_inner(path: str, name: str, device: str, dtype: str | None, *,
                             is_tiny_random: bool) -> ImageEmbedder:
    try:
        from transformers import AutoConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbedderError("transformers is not installed", hint="pip install 'character-runner[train]'") from exc
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EmbedderError(
            f"cannot load the embedding model {name!r}: {exc}".strip(),
            hint="Give a hub id reachable from this machine (or already in the Hugging Face cache), "
            "or a local folder saved with save_pretrained(). "
            "Tests and the demo use builtin:tiny-clip / builtin:tiny-dino.",
        ) from None
    model_type = getattr(config, "model_type", "")
    tdtype = _torch_dtype(dtype, device)
    try:
        if model_type == "clip":
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            model = (CLIPModel.from_pretrained(path, dtype=tdtype) if _new_tf()
                     else CLIPModel.from_pretrained(path, torch_dtype=tdtype))
            emb: ImageEmbedder = ClipEmbedder(
                model.eval().to(device), AutoImageProcessor.from_pretrained(path),
                AutoTokenizer.from_pretrained(path), name, is_tiny_random=is_tiny_random, device=device,
            )
        elif model_type in DINO_MODEL_TYPES:
            from transformers import AutoImageProcessor, AutoModel, ViTModel

            kw = {"dtype": tdtype} if _new_tf() else {"torch_dtype": tdtype}
            if model_type == "vit":
                model = ViTModel.from_pretrained(path, add_pooling_layer=False, **kw)
            else:
                model = AutoModel.from_pretrained(path, **kw)
            emb = DinoEmbedder(model.eval().to(device), AutoImageProcessor.from_pretrained(path), name,
                               is_tiny_random=is_tiny_random, device=device)
        else:
            raise EmbedderError(
                f"embedding model {name!r} has model_type {model_type!r}; expected a CLIP model or a "
                f"DINO-style ViT ({', '.join(DINO_MODEL_TYPES)})",
                hint="Use e.g. openai/clip-vit-large-patch14 for CLIP and facebook/dino-vits16 for DINO.",
            )
    except EmbedderError:
        raise
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"cannot load the embedding model {name!r}: {exc}",
                            hint="Check that the folder holds the weights and the processor files.") from None
    return emb


def _new_tf() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _load_open_clip(spec: str, name: str, device: str) -> ImageEmbedder:
    try:
        import open_clip  # type: ignore[import-not-found]
    except ImportError:
        raise EmbedderError(
            f"{name!r} needs the optional open_clip backend, which is not installed",
            hint="pip install open_clip_torch, or use a transformers CLIP (hub id or local folder).",
        ) from None
    try:
        if spec.startswith(("hf-hub:", "local-dir:")):
            model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
            tokenizer = open_clip.get_tokenizer(spec)
        else:
            arch, _, pretrained = spec.partition("/")
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None,
                                                                         device=device)
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/ValueError for unknown names
        raise EmbedderError(f"open_clip cannot load {name!r}: {exc}",
                            hint="Use open_clip:<architecture>/<pretrained tag> "
                                 "or open_clip:hf-hub:<org>/<name>.") from None
    return OpenClipEmbedder(model.eval(), preprocess, tokenizer, name, device=device)


# --------------------------------------------------------------------------- tiny built-ins


def tiny_model_dir(which: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "models" / f"builtin-tiny-{which}-v{TINY_VERSION}"


def ensure_tiny_model(which: str, cache_dir: str | Path) -> Path:
    """Build ``builtin:tiny-<which>`` (clip or dino) once into the cache; return its folder.

    Built in a temporary sibling under an inter-process lock and renamed into place, so a killed
    build never leaves a half-written model behind and concurrent builders wait for each other.
    """
    from runner.buildcache import build_once

    def build(tmp: Path) -> None:
        with _quiet_transformers():
            {"clip": _build_tiny_clip, "dino": _build_tiny_dino}[which](tmp)

    return build_once(
        tiny_model_dir(which, cache_dir),
        build,
        marker_text=json.dumps({"builtin": f"builtin:tiny-{which}", "seed": TINY_SEED, "version": TINY_VERSION}),
        notes={"TINY_RANDOM_MODEL.txt": (
            f"builtin:tiny-{which} v{TINY_VERSION}: a tiny embedding model with random weights, built "
            f"from config with seed {TINY_SEED} by character-runner. Its similarities are meaningless.\n")},
    )


def _build_tiny_clip(folder: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from runner.diffusion.tiny import tiny_clip_tokenizer

    tok_dir = folder / "_tokenizer"
    tokenizer = tiny_clip_tokenizer(tok_dir)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer or tok_dir))
    tokenizer.save_pretrained(str(folder))
    shutil.rmtree(tok_dir, ignore_errors=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 64, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIPModel(config)
    with _quiet_transformers():
        model.save_pretrained(str(folder))
    with _quiet_transformers():
        CLIPImageProcessor(size={"shortest_edge": 64},
                           crop_size={"height": 64, "width": 64}).save_pretrained(str(folder))


def _build_tiny_dino(folder: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        model = ViTModel(config, add_pooling_layer=False)
    with _quiet_transformers():
        model.save_pretrained(str(folder))
    with _quiet_transformers():
        ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(str(folder))
