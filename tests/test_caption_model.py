"""The optional captioning model, with a tiny random BLIP built from config and saved locally.

Its text is meaningless (random weights; the LM bias is set so it says "smiling"): the test checks
the loading and generation path a real BLIP model takes, and that the text reaches the caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from runner.backends.context import LocalStageContext
from runner.core import contract
from runner.stages import caption


def tiny_blip(dest: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    dest.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "man", "smiling"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=5,
                         pad_token_id=0, sep_token_id=3),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab.index("smiling")] = 50.0
    model.save_pretrained(dest)
    proc.save_pretrained(dest)
    return dest


@pytest.mark.slow
def test_caption_stage_with_a_local_captioning_model(tmp_path):
    pytest.importorskip("torch")
    model_dir = tiny_blip(tmp_path / "proj" / "models" / "tiny-blip")
    cur = tmp_path / "curated"
    (cur / "crops").mkdir(parents=True)
    Image.new("RGB", (48, 64), (120, 90, 60)).save(cur / "crops" / "abcd.png")
    (cur / "balance.json").write_text(json.dumps({"strategy": "report"}))
    entry = {"id": "abcd", "input": None, "file": "crops/abcd.png", "parent": "p0", "shot": "close_up",
             "categories": ["close_up"], "repeats": 1, "width": 48, "height": 64, "people": 1, "pose": None,
             "expression": {}, "exposure": None, "source": "x.jpg"}
    (cur / "curated.jsonl").write_text(json.dumps(entry) + "\n")
    ctx = LocalStageContext.for_folder(tmp_path / "c", project_root=tmp_path / "proj")
    cfg = {"trigger": "zq", "class_word": "man", "template": "{trigger} {class}, {attributes}", "extra_tags": [],
           "model": "models/tiny-blip"}  # project-relative, as the resolver writes it
    out = caption.run(cfg, {"curated": contract.Artifact("curated", cur)}, ctx)
    rec = json.loads((out["dataset"].path / "dataset.jsonl").read_text())
    assert rec["caption"].startswith("zq man, solo, smiling")
    assert (out["dataset"].path / "abcd.txt").read_text().strip() == rec["caption"]
    assert model_dir.exists()
