"""The ComfyUI/kohya LoRA file of every model family (runner.diffusion.comfy via kohya.peft_to_kohya).

Always on (tiny denoisers, no ComfyUI): the names are the kohya names over each model's native
layout, every trained module is in the file, ``alpha / rank x lora_up @ lora_down`` is exactly the
trained delta on the native rows (fused q/k/v included), and the metadata names the family.

With ``COMFYUI_DIR`` set to a ComfyUI checkout (see tests/README.md): ComfyUI's own
``model_lora_keys_unet`` / ``model_lora_keys_clip`` map every module of the file, ``load_lora``
loads every key, and the weights ComfyUI patches (``calculate_weight``), taken back through
ComfyUI's own diffusers map, equal the trained model's merged weights: the same outputs as the
diffusers model with the LoRA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from runner.diffusion import families
from runner.diffusion.families import base

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "interop"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALPHA, RANK = 2.0, 4
# a few names each file must hold, from each model's original checkpoint layout
EXPECTED = {
    "sd15": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"],
    "sdxl": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k"],
    "sd3": ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_context_block_attn_proj"],
    "flux1": ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_2",
              "lora_unet_single_blocks_0_linear1"],
    "flux2": ["lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
              "lora_unet_single_blocks_0_linear1"],
    "flux2_klein": ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"],
    "qwen_image": ["lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_attn_to_add_out"],
    "z_image": ["lora_unet_layers_0_attention_qkv", "lora_unet_noise_refiner_0_attention_out",
                "lora_unet_context_refiner_0_attention_qkv"],
    "ltx_video": ["lora_unet_transformer_blocks_0_attn1_to_q", "lora_unet_transformer_blocks_0_attn2_to_out_0"],
    "ltx2": ["lora_unet_transformer_blocks_0_attn1_to_k", "lora_unet_transformer_blocks_0_attn2_to_v"],
    "wan22_i2v": ["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_o", "lora_unet_blocks_0_ffn_0"],
    "wan22_ti2v": ["lora_unet_blocks_0_self_attn_o", "lora_unet_blocks_0_cross_attn_k", "lora_unet_blocks_0_ffn_2"],
}
ARCH = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
        "sd3": "stable-diffusion-3/lora",
        "flux1": "flux-1-dev/lora", "flux2": "Flux.2-dev/lora", "flux2_klein": "Flux.2-klein/lora",
        "qwen_image": "Qwen-Image/lora", "z_image": "Z-Image/lora", "ltx_video": "LTX-Video/lora", "ltx2": "LTX-2/lora",
        "wan22_i2v": "Wan2.2-I2V-A14B/lora", "wan22_ti2v": "Wan2.2-TI2V-5B/lora"}


def _denoiser(fam, sd3_comfy_width: bool = False):
    import diffusers
    import torch

    cls = getattr(diffusers, fam.components[fam.denoiser])
    if sd3_comfy_width:  # ComfyUI's SD3 layout is 64 x depth wide (the tiny one is 32 wide with 2 blocks)
        torch.manual_seed(0)
        return cls(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64,
                   num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=64, pooled_projection_dim=64,
                   pos_embed_max_size=32)
    return cls.from_pretrained(str(families.tiny_path(f"builtin:{fam.tiny}") / fam.denoiser))


class TinyLora:
    """A tiny denoiser with a rank-4, alpha-2 LoRA on the family's default targets, lora_B random."""

    def __init__(self, name: str, sd3_comfy_width: bool = False):
        import torch
        from peft.utils import get_peft_model_state_dict

        self.fam = families.get(name)
        den = _denoiser(self.fam, sd3_comfy_width)
        self.base = {k: v.detach().clone() for k, v in den.state_dict().items()}
        c = base.Components(family=self.fam, pipe=None, denoiser=den, scheduler=None, objective=self.fam.objective)
        families.add_lora(c, rank=RANK, alpha=ALPHA, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in den.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.den, self.config = den, dict(den.config)
        self.peft = {k: v.detach().clone() for k, v in get_peft_model_state_dict(den).items()}
        self.modules = sorted({k.split(".lora_")[0] for k in self.peft})

    def delta(self, module: str):
        return self.peft[f"{module}.lora_B.weight"] @ self.peft[f"{module}.lora_A.weight"] * (ALPHA / RANK)

    def merged(self) -> dict:
        out = dict(self.base)
        for m in self.modules:
            out[f"{m}.weight"] = self.base[f"{m}.weight"] + self.delta(m)
        return out

    def file(self) -> dict:
        from runner.diffusion.kohya import peft_to_kohya

        return peft_to_kohya(self.peft, family=self.fam.name, unet_config=self.config, alpha=ALPHA)


@pytest.fixture(scope="session")
def tiny_lora():
    cache: dict = {}

    def get(name: str, sd3_comfy_width: bool = False) -> TinyLora:
        key = (name, sd3_comfy_width)
        if key not in cache:
            cache[key] = TinyLora(name, sd3_comfy_width)
        return cache[key]

    return get


def test_every_family_has_a_comfy_layout():
    from runner.diffusion.comfy import layout_for

    for fam in families.all_families():
        assert layout_for(fam.name).native is not None


@pytest.mark.slow  # builds or loads the tiny denoiser of each family (~1-2 s each, all of them ~8 s)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_holds_the_trained_deltas_on_native_rows(name: str, tiny_lora):
    import torch

    from runner.diffusion.comfy import PREFIX, layout_for

    t = tiny_lora(name)
    f = t.file()
    assert all(k.startswith(PREFIX) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in f)
    for key in EXPECTED[name]:
        assert f"{key}.lora_down.weight" in f, (key, sorted(f)[:6])
    lay = layout_for(name)
    covered: dict[str, list[tuple[int, int]]] = {}
    for m in t.modules:
        tgt = lay.native(m, t.config)
        stem = PREFIX + tgt.native.replace(".", "_")
        up, down, alpha = f[f"{stem}.lora_up.weight"], f[f"{stem}.lora_down.weight"], float(f[f"{stem}.alpha"])
        full = up @ down * (alpha / down.shape[0])  # what every kohya reader applies
        want = t.delta(m)
        if tgt.rows is None:
            assert alpha == ALPHA and down.shape[0] == RANK
            torch.testing.assert_close(full, want)
        else:
            assert full.shape[0] == tgt.rows
            assert alpha == pytest.approx(ALPHA * down.shape[0] / RANK)  # alpha / rank stays 2 / 4
            torch.testing.assert_close(full[tgt.offset:tgt.offset + want.shape[0]], want)
        covered.setdefault(stem, []).append((tgt.offset, want.shape[0]))
    assert {k.rsplit(".", 2)[0] for k in f if k.endswith(".lora_down.weight")} == set(covered)
    for stem, spans in covered.items():  # rows of untrained parts of a fused weight get nothing
        up = f[f"{stem}.lora_up.weight"]
        mask = torch.ones(up.shape[0], dtype=torch.bool)
        for off, n in spans:
            mask[off:off + n] = False
        assert float(up[mask].abs().sum()) == 0.0


@pytest.mark.parametrize("name", sorted(ARCH))
def test_metadata_names_the_family(name: str):
    from runner.diffusion.kohya import kohya_metadata

    configs = {"flux1": {"guidance_embeds": True}, "sd3": {"num_layers": 2}}
    md = kohya_metadata(family=name, base_model=f"builtin:tiny-{name}", rank=RANK, alpha=ALPHA, lr=1e-4,
                        text_encoder_lr=None, steps=3, max_steps=3, resolution=64, trigger="sks", title="t",
                        captions=["sks person"], dataset_summary={"train_images": 1}, seed=0,
                        denoiser_config=configs.get(name))
    assert all(isinstance(v, str) for v in md.values())
    assert md["modelspec.architecture"] == ARCH[name] and md["runner.model_family"] == name
    assert md["ss_base_model_version"] and md["ss_network_alpha"] == "2.0" and md["ss_network_dim"] == "4"
    assert ("modelspec.prediction_type" in md) == (families.get(name).objective.prediction == "scheduler")


@pytest.mark.parametrize("name, config, arch", [
    ("flux1", {"guidance_embeds": False}, "flux-1-schnell/lora"),
    ("flux1", {}, "flux-1/lora"),
    ("flux2_klein", {"num_attention_heads": 24, "attention_head_dim": 128}, "Flux.2-klein-4b/lora"),
    ("flux2_klein", {"num_attention_heads": 32, "attention_head_dim": 128}, "Flux.2-klein-9b/lora"),
    ("sd3", {"num_layers": 38}, "stable-diffusion-3-5-large/lora"),
    ("sd3", {"num_layers": 24, "dual_attention_layers": [0, 1]}, "stable-diffusion-3-5-medium/lora"),
    ("sd3", {"num_layers": 24, "dual_attention_layers": []}, "stable-diffusion-3-medium/lora"),
])
def test_architecture_tells_variants_apart(name: str, config: dict, arch: str):
    from runner.diffusion.comfy import architecture

    assert architecture(name, config) == arch


def test_untranslatable_modules_and_encoders_are_refused():
    import torch

    from runner.diffusion.comfy import NoNativeName, peft_to_comfy

    cfg = {"num_attention_heads": 2, "attention_head_dim": 16}
    lora = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    odd = {"x_embedder.lora_A.weight": torch.zeros(4, 32), "x_embedder.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(NoNativeName, match="x_embedder"):
        peft_to_comfy(odd, family="flux2", denoiser_config=cfg, alpha=4)
    te = {"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
          "layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(ValueError, match="text_encoder"):
        peft_to_comfy(lora, family="flux2", denoiser_config=cfg, alpha=4, text_encoder_sds={"text_encoder": te})
    with pytest.raises(ValueError, match="lacks lora_A"):
        peft_to_comfy({"transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, family="flux2",
                      denoiser_config=cfg, alpha=4)


def test_a_family_without_a_layout_gets_the_diffusers_file_only(tmp_path: Path, monkeypatch):
    """A family module with ``comfy=None``: peft_to_kohya refuses it by name, the trainer's
    checkpoint writes the diffusers file alone (kohya None, one log line) and the index says None."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from runner.diffusion import lora
    from runner.diffusion.comfy import layout_for
    from runner.diffusion.kohya import peft_to_kohya
    from runner.diffusion.trainer import LoraTrainer

    bare = dataclasses.replace(families.get("qwen_image"), name="no_layout", title="No Layout", comfy=None)
    real_get = families.get
    monkeypatch.setattr(families, "get", lambda name: bare if name == "no_layout" else real_get(name))
    with pytest.raises(ValueError, match=r"No Layout \(no_layout\).*families with one: .*qwen_image"):
        layout_for("no_layout")
    with pytest.raises(ValueError, match="no ComfyUI/kohya LoRA layout"):
        peft_to_kohya({}, family="no_layout", unet_config={}, alpha=1.0)

    monkeypatch.setattr(lora, "save_diffusers_lora",
                        lambda pipe, folder, state: (folder / lora.DIFFUSERS_FILE).write_bytes(b"x"))
    logs: list[str] = []
    sd = {"a.lora_A.weight": torch.zeros(1, 2), "a.lora_B.weight": torch.zeros(2, 1)}
    fake = SimpleNamespace(fam=bare, family="no_layout", mixed_precision="no", pipe=None,
                           cb=SimpleNamespace(log=logs.append), _lora_state=lambda: {"transformer": sd})
    step_dir = tmp_path / "scratch" / "checkpoints" / "step-000001"
    step_dir.mkdir(parents=True)
    files = LoraTrainer._save_lora_files(fake, step_dir, 1)
    assert files == {"diffusers": lora.DIFFUSERS_FILE, "kohya": None}
    assert [p.name for p in step_dir.iterdir()] == [lora.DIFFUSERS_FILE] and len(logs) == 1
    fake.scratch, fake.history = tmp_path / "scratch", [{"step": 1, "phase": "p", "val_loss": None, "samples": [],
                                                         **files}]
    (ck,) = LoraTrainer._copy_checkpoints(fake, tmp_path / "out")
    assert ck["kohya"] is None and ck["diffusers"] == f"step-000001/{lora.DIFFUSERS_FILE}"


# ---------------------------------------------------------------------------------------------
# ComfyUI's own code (COMFYUI_DIR)


@pytest.fixture(scope="session")
def comfy():
    d = os.environ.get("COMFYUI_DIR")
    if not d:
        pytest.skip("COMFYUI_DIR is not set: no ComfyUI checkout to check the LoRA keys against (tests/README.md)")
    from comfyui import import_comfy

    return import_comfy(d)


@pytest.mark.slow  # the tiny denoiser of each family, plus ComfyUI's patching of every weight (~1-3 s each)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_comfyui_maps_loads_and_applies_every_module(name: str, comfy, tiny_lora):
    import torch
    from comfyui import comfy_model, from_native, key_map, load, lora_modules, patch, to_native, unet_config

    t = tiny_lora(name, sd3_comfy_width=name == "sd3")
    ucfg = unet_config(name, t.config)
    cmap = key_map(comfy, name, ucfg, t.base)
    weights = to_native(cmap, t.base)
    kmap = comfy.lora.model_lora_keys_unet(comfy_model(comfy, name, ucfg, weights), {})
    f = t.file()
    unmapped = sorted(m for m in lora_modules(f) if m not in kmap)
    assert not unmapped, f"ComfyUI maps no weight for {unmapped[:5]}"
    patches, not_loaded = load(comfy, f, kmap)
    assert not not_loaded and len(patches) == len(lora_modules(f))
    trained = {f"{m}.weight" for m in t.modules}
    assert trained <= set(from_native(cmap, weights, t.base))  # every trained weight is one ComfyUI holds
    merged = t.merged()
    for strength in (1.0, 0.5):
        back = from_native(cmap, patch(comfy, patches, weights, strength), t.base)
        for k, w in back.items():
            want = t.base[k] + strength * (merged[k] - t.base[k]) if k in trained else t.base[k]
            torch.testing.assert_close(w, want.float(), rtol=1e-5, atol=1e-6, msg=k)
        assert all(float((back[k] - t.base[k]).abs().max()) > 0 for k in trained)  # the LoRA does change them


# (component, ComfyUI prefix) of the text encoders a family's kohya file may carry LoRAs for
TE = {"sd15": {"text_encoder": "clip_l"}, "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
      "flux1": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
      "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}}


@pytest.mark.slow  # loads the tiny text encoders (~1 s each family)
@pytest.mark.parametrize("name", sorted(TE))
def test_comfyui_maps_text_encoder_loras(name: str, comfy):
    import torch
    import transformers
    from comfyui import clip_model, load, lora_modules
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from runner.diffusion.kohya import peft_to_kohya

    fam = families.get(name)
    folder = families.tiny_path(f"builtin:{fam.tiny}")
    sds, keys = {}, {}
    for comp in TE[name]:
        te = getattr(transformers, fam.components[comp]).from_pretrained(str(folder / comp))
        keys[comp] = list(te.state_dict())
        clip = TE[name][comp].startswith("clip_")
        te.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] if clip
                                  else ["q", "k", "v", "o", "wi", "wo"]))
        sds[comp] = get_peft_model_state_dict(te)
    f = peft_to_kohya({}, family=name, unet_config={}, alpha=2.0, text_encoder_sds=sds)
    kmap = comfy.lora.model_lora_keys_clip(clip_model(TE[name], keys), {})
    unmapped = sorted(m for m in lora_modules(f) if m not in kmap)
    assert not unmapped, f"ComfyUI maps no text-encoder weight for {unmapped[:5]}"
    patches, not_loaded = load(comfy, f, kmap)
    assert not not_loaded and len(patches) == len(lora_modules(f)) == sum(len(sd) // 2 for sd in sds.values())
    assert torch.is_tensor(next(iter(f.values())))


@pytest.mark.slow  # the tiny denoisers (shared with the tests above); diffusers' converters take < 1 s
@pytest.mark.parametrize("name", ["flux2", "flux2_klein", "qwen_image", "z_image", "wan22_i2v", "wan22_ti2v"])
def test_diffusers_reads_the_kohya_file_back(name: str, tiny_lora):
    """diffusers' own converter of kohya/musubi files gives back every trained module at the
    trained strength. (FLUX.1's converter has the real model's widths written in, so it is checked
    on the full-size layout by bench/interop/comfy_keys.py; SD 3 has none: it reads the diffusers file.)"""
    from comfy_keys import diffusers_reads

    t = tiny_lora(name)
    n, err = diffusers_reads(t.fam.pipeline, t.file(), t.peft, ALPHA / RANK)
    assert n == len(t.modules) and err < 1e-5
