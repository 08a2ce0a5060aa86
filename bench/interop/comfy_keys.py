"""The ComfyUI/kohya LoRA file on the full-size layouts of every family, checked by ComfyUI's own
key mapping: which modules a LoRA on the family's default targets trains, what the file holds,
whether ComfyUI's ``model_lora_keys_unet`` maps every module of it, ``load_lora`` loads every key,
and every LoRA's shape fits the ComfyUI weight it patches (rows at its offset, input width).

Not a timing. The denoisers are built from their published configs (written below) on the meta
device (no weights, no download); the LoRA is rank 1, alpha 2, with random values, shaped from the modules.
Needs a ComfyUI checkout: ``COMFYUI_DIR=../ComfyUI .venv/bin/python bench/interop/comfy_keys.py``
(without it, only our side is listed). About 30 s on 2 cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ALPHA = 2.0  # of a rank-1 LoRA

# the denoisers' config.json as published (the fields that shape the layout)
FULL = {
    "sd15": ("stable-diffusion-v1-5", {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}),
    "sdxl": ("stable-diffusion-xl-base-1.0", {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}),
    "sd3": ("stable-diffusion-3.5-large", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
        "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
        "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
        "qk_norm": "rms_norm"}),
    "flux1": ("FLUX.1-dev", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}),
    "flux2": ("FLUX.2-dev", {
        "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
        "num_attention_heads": 48, "joint_attention_dim": 15360, "mlp_ratio": 3.0, "guidance_embeds": True,
        "axes_dims_rope": [32, 32, 32, 32]}),
    "flux2_klein": ("FLUX.2-klein-4B", {
        "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "guidance_embeds": False,
        "axes_dims_rope": [32, 32, 32, 32]}),
    "qwen_image": ("Qwen-Image", {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56]}),
    "z_image": ("Z-Image-Turbo", {
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
        "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": [32, 48, 48],
        "axes_lens": [1024, 512, 512]}),
}


def meta_denoiser(name: str):
    import diffusers
    import torch

    from runner.diffusion import families

    fam = families.get(name)
    cls = getattr(diffusers, fam.components[fam.denoiser])
    with torch.device("meta"):
        model = cls(**FULL[name][1])
    return fam, model


def rank1_lora(fam, model, seed: int = 0) -> dict:
    """peft-named rank-1 LoRA tensors (CPU) for every Linear the family's default targets match."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in fam.lora_targets):
            sd[f"{n}.lora_A.weight"] = torch.randn(1, m.in_features, generator=g)
            sd[f"{n}.lora_B.weight"] = torch.randn(m.out_features, 1, generator=g)
    return sd


def diffusers_reads(pipeline: str, kohya_sd: dict, peft_sd: dict, scale: float) -> tuple[int, float]:
    """``<pipeline>.lora_state_dict`` of the kohya file (diffusers' converter of non-diffusers
    LoRAs): how many trained modules come back, and the largest |B A x - trained delta x| over
    random x (modules it splits off that were not trained must give 0)."""
    import diffusers
    import torch

    out = getattr(diffusers, pipeline).lora_state_dict(dict(kohya_sd))
    sd = out[0] if isinstance(out, tuple) else out
    got = {k[len("transformer."):].split(".lora_")[0] for k in sd if k.startswith("transformer.") and ".lora_A." in k}
    g = torch.Generator().manual_seed(0)
    err = 0.0
    for m in sorted(got):
        a, b = sd[f"transformer.{m}.lora_A.weight"].float(), sd[f"transformer.{m}.lora_B.weight"].float()
        x = torch.randn(a.shape[1], 4, generator=g)
        have = b @ (a @ x)
        if f"{m}.lora_A.weight" in peft_sd:
            have = have - peft_sd[f"{m}.lora_B.weight"] @ (peft_sd[f"{m}.lora_A.weight"] @ x) * scale
        err = max(err, float(have.abs().max()))
    trained = {k.split(".lora_")[0] for k in peft_sd}
    return len(got & trained), err


def check(name: str, cu) -> dict:
    from runner.diffusion.comfy import PREFIX, layout_for
    from runner.diffusion.kohya import peft_to_kohya

    fam, model = meta_denoiser(name)
    cfg = dict(model.config)
    sd = rank1_lora(fam, model)
    f = peft_to_kohya(sd, family=name, unet_config=cfg, alpha=ALPHA)  # alpha != rank: the strength is checked
    lay = layout_for(name)
    natives = {lay.native(k.split(".lora_")[0], cfg).native for k in sd}
    fused = sum(1 for k in f if k.endswith(".lora_down.weight") and f[k].shape[0] > 1)
    row = {"family": name, "model": FULL[name][0], "trained": len(sd) // 2, "file": len(natives), "fused": fused,
           "arch": None}
    from runner.diffusion.kohya import kohya_metadata

    row["arch"] = kohya_metadata(family=name, base_model=FULL[name][0], rank=1, alpha=1.0, lr=1e-4,
                                 text_encoder_lr=None, steps=1, max_steps=1, resolution=1024, trigger="sks",
                                 title="t", captions=["sks"], dataset_summary={}, seed=0,
                                 denoiser_config=cfg)["modelspec.architecture"]
    if fam.denoiser == "transformer":
        try:
            n, err = diffusers_reads(fam.pipeline, f, sd, ALPHA)
            row["diffusers"] = f"{n} / {len(sd) // 2}" + (f", max err {err:.0e}" if n else "")
        except Exception as exc:  # noqa: BLE001  (diffusers has no converter for this layout: say so)
            row["diffusers"] = f"not read ({type(exc).__name__})"
    if cu is None:
        return row
    import torch
    from comfyui import comfy_model, key_map, load, lora_modules, native_shapes, unet_config

    ucfg = unet_config(name, cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cmap = key_map(cu, name, ucfg, shapes)
    nshapes = native_shapes(cmap, shapes)
    weights = {k: torch.empty(s, device="meta") for k, s in nshapes.items()}
    kmap = cu.lora.model_lora_keys_unet(comfy_model(cu, name, ucfg, weights), {})
    mods = lora_modules(f)
    row["mapped"] = sum(1 for m in mods if m in kmap)
    patches, not_loaded = load(cu, f, kmap)
    row["not_loaded"] = len(not_loaded)
    bad = []
    for target, adapter in patches.items():
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        up, down = adapter.weights[0], adapter.weights[1]
        rows = offset[2] if offset else nshapes[key][0]
        if up.shape[0] != rows or down.shape[1] != nshapes[key][1] or up.shape[1] != down.shape[0]:
            bad.append(key)
    row["shapes_ok"] = len(patches) - len(bad)
    row["patches"] = len(patches)
    assert all(m.startswith(PREFIX) for m in mods)
    return row


def main() -> int:
    d = os.environ.get("COMFYUI_DIR")
    cu = None
    if d:
        from comfyui import import_comfy

        cu = import_comfy(d)
    t0 = time.time()
    rows = [check(name, cu) for name in FULL]
    print(f"ComfyUI: {cu.root if cu else 'not checked (set COMFYUI_DIR)'}; {time.time() - t0:.0f} s\n")
    head = ("| family | model (published config) | modelspec.architecture | modules trained | modules in file (fused) |"
            " diffusers reads |")
    if cu:
        head += " mapped by ComfyUI | keys not loaded | shapes fit |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    ok = True
    for r in rows:
        line = (f"| {r['family']} | {r['model']} | {r['arch']} | {r['trained']} | {r['file']} ({r['fused']}) |"
                f" {r.get('diffusers', 'n/a (kohya UNet: tests/test_lora_interop.py)')} |")
        if cu:
            line += f" {r['mapped']} / {r['file']} | {r['not_loaded']} | {r['shapes_ok']} / {r['patches']} |"
            ok &= r["mapped"] == r["file"] and r["not_loaded"] == 0 and r["shapes_ok"] == r["patches"]
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
