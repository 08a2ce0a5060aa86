"""The two LoRA files a checkpoint writes load in diffusers and give the same images; the kohya
file uses the names ComfyUI/A1111 expect, with the real alpha and the metadata they read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.diffusion.families.sdxl import diffusers_unet_module_to_sgm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_dataset  # noqa: E402

# The real SDXL base UNet's block layout (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json)
SDXL_UNET = {"layers_per_block": 2,
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("module, sgm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "output_blocks.3.1.transformer_blocks.0.ff.net.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
])
def test_sdxl_sgm_names(module: str, sgm: str) -> None:
    assert diffusers_unet_module_to_sgm(module, SDXL_UNET) == sgm


@pytest.mark.slow
@pytest.mark.parametrize("model", ["builtin:tiny-sdxl", "builtin:tiny-sd"])
def test_diffusers_and_kohya_files_give_the_same_images(model: str, shared_data: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from runner.diffusion.generate import generate_images
    from runner.diffusion.lora import load_lora
    from runner.diffusion.models import load_pipeline
    from runner.diffusion.trainer import LoraTrainer
    from runner.stages.train import train_config

    ds = make_dataset(shared_data, tmp_path / "ds", n=3)
    cfg = train_config({
        "base_model": model, "resolution": 64, "buckets": {"min_side": 32, "max_side": 128, "step": 16},
        "lora": {"rank": 4, "alpha": 2, "train_text_encoder": True,
                 "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]},
        "steps": 3, "lr": 3e-2, "mixed_precision": "no", "lr_scheduler": {"name": "constant"},
        "checkpoints": {"every_steps": 3, "sample_prompts": [], "validation_fraction": 0.0},
    }, character="demo", trigger="sks", class_word="person")
    tr = LoraTrainer(cfg, dataset_dir=ds, out_dir=tmp_path / "out", scratch_dir=tmp_path / "scratch",
                     cache_dir=tmp_path / "cache", device="cpu")
    index = tr.run()
    ck = index["checkpoints"][-1]
    dfile, kfile = tmp_path / "out" / "lora" / ck["diffusers"], tmp_path / "out" / "lora" / ck["kohya"]
    sdxl = model.endswith("sdxl")

    with safe_open(str(kfile), "pt") as f:
        keys = list(f.keys())
        md = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}  # the real alpha, not the rank
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    if sdxl:
        assert any("_input_blocks_" in k for k in unet_keys) and any("_output_blocks_" in k for k in unet_keys)
        assert any(k.startswith("lora_unet_middle_block_1_") for k in unet_keys)
        assert not any("down_blocks" in k or "up_blocks" in k for k in unet_keys)
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
        assert md["ss_base_model_version"] == "sdxl_base_v1-0"
        assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    else:
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in unet_keys)
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    for key in ("ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_steps", "ss_resolution",
                "ss_tag_frequency", "modelspec.resolution", "modelspec.trigger_phrase", "modelspec.title"):
        assert key in md, key
    assert md["ss_network_alpha"] == "2.0" and md["ss_network_dim"] == "4"
    assert json.loads(md["modelspec.description"])["train_images"] == 3

    kw = dict(steps=3, guidance=5.0, width=64, height=64, batch_size=2)
    prompts, seeds = ["sks person, portrait", "sks person, full body"], [5, 6]
    base_imgs = generate_images(load_pipeline(model), prompts, seeds=seeds, **kw)
    via_diffusers = generate_images(load_lora(load_pipeline(model), dfile, "d"), prompts, seeds=seeds, **kw)
    kohya_pipe = load_lora(load_pipeline(model), kfile, "k")
    via_kohya = generate_images(kohya_pipe, prompts, seeds=seeds, **kw)
    # the trained pipeline itself makes the same images as the file loaded back
    trained = generate_images(tr.pipe, prompts, seeds=seeds, **kw)

    def a(im):
        return np.asarray(im, dtype=np.int16)

    for d, k, t, b in zip(via_diffusers, via_kohya, trained, base_imgs):
        assert np.abs(a(d) - a(k)).max() <= 1
        assert np.abs(a(d) - a(t)).max() <= 1
        assert np.abs(a(d) - a(b)).mean() > 0.5  # the LoRA does change the images
    # scale 0 switches it off, set at load time or per generation call
    off = generate_images(load_lora(load_pipeline(model), kfile, "k", scale=0.0), prompts, seeds=seeds, **kw)
    assert np.abs(a(off[0]) - a(base_imgs[0])).max() <= 1
    off2 = generate_images(kohya_pipe, prompts, seeds=seeds, lora_scale=0.0, **kw)
    assert np.abs(a(off2[0]) - a(base_imgs[0])).max() <= 1
    half = generate_images(kohya_pipe, prompts, seeds=seeds, lora_scale=0.5, **kw)
    assert np.abs(a(half[0]) - a(base_imgs[0])).mean() > 0.1 and np.abs(a(half[0]) - a(via_kohya[0])).mean() > 0.1


# The nested CLIP layout every reader expects for a text-encoder LoRA in a diffusers file:
# diffusers <= 0.32 with transformers 4.x (flat keys raised IndexError there), ComfyUI's
# "text_encoder.text_model.encoder.layers.{b}.{c}" map, and the installed diffusers.
_TE_KEY = (r"text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\."
           r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.lora_[AB]\.weight")


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
@pytest.mark.slow  # about 3 s each
def test_diffusers_file_text_encoder_keys_load_everywhere(model: str, tmp_path: Path) -> None:
    import re

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from runner.diffusion.lora import load_lora, save_diffusers_lora
    from runner.diffusion.models import load_pipeline

    pipe = load_pipeline(model)
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    torch.manual_seed(0)
    # alpha != rank: readers that ignore the adapter metadata must still get the trained strength
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=1, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    for te in encoders.values():
        te.add_adapter(LoraConfig(r=4, lora_alpha=1, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    state = {}
    for name, model_ in {"unet": pipe.unet, **encoders}.items():
        state[name] = {k: v + 0.05 * torch.randn_like(v) for k, v in get_peft_model_state_dict(model_).items()}
        set_peft_model_state_dict(model_, state[name])  # lora_B is not all zeros
    file = save_diffusers_lora(pipe, tmp_path, state)

    with safe_open(str(file), "pt") as f:
        te_keys = [k for k in f.keys() if k.startswith("text_encoder")]
    assert te_keys
    assert all(re.fullmatch(_TE_KEY, k) for k in te_keys), [k for k in te_keys if not re.fullmatch(_TE_KEY, k)][:3]
    assert len(te_keys) == sum(len(state[n]) for n in encoders)
    # a reader that ignores the metadata (alpha = rank: diffusers 0.32, ComfyUI) gets B @ A as is
    file_sd = load_file(str(file))
    live = {f"{prefix}.{n}": m for prefix, model_ in {"unet": pipe.unet, **encoders}.items()
            for n, m in model_.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    checked = 0
    for key in file_sd:
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            m = live.get(mod) or live[mod.replace(".text_model.", ".", 1)]
            want_delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            torch.testing.assert_close(file_sd[mod + ".lora_B.weight"] @ file_sd[key], want_delta)
            checked += 1
    assert checked == len(live)

    ids = torch.tensor([[0, 5, 9, 3, 1]])

    def unet_out(unet):
        g = torch.Generator().manual_seed(0)
        c = unet.config
        kw = {}
        if c.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"time_ids": torch.ones(1, 6) * 64, "text_embeds": torch.randn(
                1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g)}
        x, ctx = torch.randn(1, c.in_channels, 8, 8, generator=g), torch.randn(1, 5, c.cross_attention_dim, generator=g)
        with torch.no_grad():
            return unet(x, 10, encoder_hidden_states=ctx, **kw).sample

    with torch.no_grad():
        want = {n: te(ids)[0] for n, te in encoders.items()}
    want_unet = unet_out(pipe.unet)
    fresh = load_lora(load_pipeline(model), file, "x")
    torch.testing.assert_close(unet_out(fresh.unet), want_unet, rtol=1e-4, atol=1e-5)
    for name in encoders:
        te = getattr(fresh, name)
        n_lora = sum(1 for n, _ in te.named_modules() if n.endswith("lora_A.x"))
        assert n_lora * 2 == len(state[name])  # every module of the file found its layer
        with torch.no_grad():
            torch.testing.assert_close(te(ids)[0], want[name], rtol=1e-4, atol=1e-5)
