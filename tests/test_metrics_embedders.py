"""CLIP / DINO embedders: tiny built-ins are built once, reloaded with from_pretrained, batched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.metrics import embedders as E


def _images(n: int, size=(80, 100)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embed-cache")


def test_tiny_clip_images_and_texts(cache: Path) -> None:
    clip = E.load_image_embedder(E.TINY_CLIP, cache)
    assert clip.is_tiny_random and clip.kind == "clip" and clip.name == E.TINY_CLIP
    assert "tiny random" in clip.label
    ims = _images(5)
    one_batch = clip.embed_images(ims, batch_size=5)
    small_batches = clip.embed_images(ims, batch_size=2)
    assert one_batch.shape == (5, clip.dim) and one_batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one_batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one_batch, small_batches, atol=1e-5)  # batching changes nothing
    assert not np.allclose(one_batch[0], one_batch[1])  # different images, different embeddings
    texts = clip.embed_texts(["a photo of dmochr man", "word " * 200])  # long prompt is truncated
    assert texts.shape == (2, clip.dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert clip.embed_images([]).shape == (0, clip.dim)


def test_tiny_models_are_saved_once_and_deterministic(cache: Path) -> None:
    clip = E.load_image_embedder(E.TINY_CLIP, cache)
    folder = E.tiny_model_dir("clip", cache)
    assert (folder / "config.json").is_file() and (folder / "TINY_RANDOM_MODEL.txt").is_file()
    ims = _images(2)
    ref = clip.embed_images(ims)
    # Loading the saved folder by path goes through from_pretrained and keeps the tiny label.
    again = E.load_image_embedder(str(folder), cache)
    assert again is not clip and again.is_tiny_random
    np.testing.assert_allclose(again.embed_images(ims), ref, atol=1e-6)
    # A rebuild elsewhere (fixed seed) gives the same weights.
    other = E.load_image_embedder(E.TINY_CLIP, cache / "elsewhere")
    np.testing.assert_allclose(other.embed_images(ims), ref, atol=1e-6)


def test_tiny_dino_cls_embedding(cache: Path) -> None:
    dino = E.load_image_embedder(E.TINY_DINO, cache)
    assert dino.kind == "dino" and dino.is_tiny_random and not hasattr(dino, "embed_texts")
    emb = dino.embed_images(_images(3, size=(64, 48)), batch_size=2)
    assert emb.shape == (3, dino.dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_bad_references_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(E.EmbedderError, match="unknown built-in") as exc:
        E.load_image_embedder("builtin:tiny-nothing", tmp_path)
    assert "builtin:tiny-clip" in exc.value.hint
    with pytest.raises(E.EmbedderError, match="not found"):
        E.load_image_embedder(str(tmp_path / "no" / "such" / "model"), tmp_path)
    # An unreachable hub id (offline in tests) is a clear error, not a traceback.
    with pytest.raises(E.EmbedderError, match="nobody-here/no-such-model' is not in the Hugging Face cache") as exc:
        E.load_image_embedder("nobody-here/no-such-model", tmp_path)
    assert "hf download nobody-here/no-such-model" in exc.value.hint
    # A folder of a model type that is neither CLIP nor DINO.
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(E.EmbedderError, match="model_type 'bert'"):
        E.load_image_embedder(str(weird), tmp_path)


def test_open_clip_is_optional(tmp_path: Path) -> None:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(E.EmbedderError, match="open_clip") as exc:
            E.load_image_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k", tmp_path)
        assert "pip install open_clip_torch" in exc.value.hint
    else:  # pragma: no cover - only where open_clip is installed
        pytest.skip("open_clip installed; weights cannot be downloaded here")


def test_dinov2_folder_loads_through_automodel(tmp_path: Path) -> None:
    """A DINOv2 checkpoint (model_type dinov2) saved locally loads via AutoModel; CLS embedding."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2-tiny"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=56, patch_size=14, hidden_size=24, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=2)).save_pretrained(str(folder))
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(str(folder))
    emb = E.load_image_embedder(str(folder), tmp_path)
    assert emb.kind == "dino" and not emb.is_tiny_random and emb.dim == 24
    out = emb.embed_images(_images(3), batch_size=2)
    assert out.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
