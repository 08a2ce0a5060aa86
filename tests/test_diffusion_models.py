"""Tiny built-in models, model loading and seeded batched generation."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from runner.diffusion.generate import _pairs, generate_images
from runner.diffusion.models import ModelLoadError, detect_family, load_pipeline, resolve_model_ref
from runner.diffusion.tiny import tiny_clip_tokenizer, tiny_model_path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_tokenizer_is_clip_shaped(tmp_path: Path) -> None:
    tok = tiny_clip_tokenizer(tmp_path / "tok")
    ids = tok("a photo of sks man, full body")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",").strip() == "a photo of sks man, full body"
    # learned merges: a common word is one token, an unknown one falls back to several byte tokens
    assert len(tok("photo")["input_ids"]) == 3
    assert len(tok("zqxj")["input_ids"]) > 3
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    # deterministic: a second build gives the same vocabulary
    tok2 = tiny_clip_tokenizer(tmp_path / "tok2")
    assert tok2.get_vocab() == tok.get_vocab()


def test_tiny_models_built_once_concurrently(tmp_path: Path) -> None:
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(tiny_model_path("builtin:tiny-sd", tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1
    root = paths[0]
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert [p.name for p in root.parent.iterdir() if p.name.startswith(".build")] == []
    mtime = (root / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    assert tiny_model_path("tiny-sd", tmp_path) == root
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime == mtime


def test_model_refs_and_family(tmp_path: Path) -> None:
    assert detect_family("builtin:tiny-sd") == "sd15"
    assert detect_family("builtin:tiny-sdxl") == "sdxl"
    assert resolve_model_ref("stabilityai/stable-diffusion-xl-base-1.0")[0] == "hub"
    with pytest.raises(ModelLoadError):
        resolve_model_ref("builtin:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_model_ref(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_ref(str(tmp_path / "missing.safetensors"))


def test_single_file_with_odd_shapes_or_lora_keys_is_refused_by_name(tmp_path: Path) -> None:
    """The families' detection reads real key shapes (tests/test_families.py); a file whose
    known keys have shapes no checkpoint has, or a LoRA, is refused naming the file."""
    import torch
    from safetensors.torch import save_file

    from runner.diffusion.models import detect_family_of_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="odd.safetensors: the tensors"):
        detect_family_of_file(tmp_path / "odd.safetensors")
    with pytest.raises(ModelLoadError, match="lora.safetensors: a LoRA"):
        detect_family_of_file(tmp_path / "lora.safetensors")
    assert resolve_model_ref(str(tmp_path / "odd.safetensors"))[0] == "file"


def test_folder_load_and_family_mismatch() -> None:
    folder = tiny_model_path("tiny-sdxl")
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(ModelLoadError, match="sdxl"):
        load_pipeline("builtin:tiny-sdxl", family="sd15")


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_batched_generation_equals_one_at_a_time(model: str) -> None:
    pipe = load_pipeline(model)
    kw = dict(steps=2, guidance=4.0, width=64, height=48)
    batch = generate_images(pipe, ["a photo of a man", "full body, park", "close-up"], seeds=[3, 4, 5], batch_size=3,
                            **kw)
    single = generate_images(pipe, ["full body, park"], seeds=[4], batch_size=1, **kw)
    assert [im.size for im in batch] == [(64, 48)] * 3
    diff = np.abs(np.asarray(batch[1], dtype=int) - np.asarray(single[0], dtype=int))
    assert diff.max() <= 2
    # a different seed gives a different image
    assert np.abs(np.asarray(batch[0], dtype=int) - np.asarray(batch[1], dtype=int)).mean() > 5


def test_prompt_seed_pairing() -> None:
    assert _pairs(["a"], [1, 2]) == [("a", 1), ("a", 2)]
    assert _pairs(["a", "b"], [7]) == [("a", 7), ("b", 7)]
    with pytest.raises(ValueError):
        _pairs(["a", "b"], [1, 2, 3])
