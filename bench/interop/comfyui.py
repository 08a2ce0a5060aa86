"""Run ComfyUI's own LoRA key mapping and patching on our files, without a GPU or model files.

ComfyUI is imported from a checkout named by ``COMFYUI_DIR`` (never copied here). Only what its
key-mapping code imports but does not use for key mapping is stubbed: ``comfy.model_management``
(device set-up at import; ``cast_to_device`` is given), ``comfy.model_base`` (the model classes
``model_lora_keys_unet`` tests with ``isinstance``: empty classes in ComfyUI's hierarchy, Flux2
under Flux), ``comfy.memory_management`` / ``comfy.storage`` / ``comfy.cli_args`` (newer releases
import them at the top of ``comfy/utils.py``) and ``einops`` when it is not installed. The real
``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``, ``load_lora``,
``calculate_weight``), ``comfy/weight_adapter`` and ``comfy/utils.py``'s key maps run unchanged.

A ComfyUI model is given as what those functions read: ``state_dict()`` in ComfyUI's naming
(``diffusion_model.<native key>``) and ``model_config.unet_config``. The native keys and tensors
come from the diffusers weights through ComfyUI's own map for the family (``unet_to_diffusers``,
``mmdit_to_diffusers``, ``flux_to_diffusers``, ``z_image_to_diffusers``; Qwen-Image's ComfyUI
model uses the diffusers names), so the check is against ComfyUI's idea of the layout, not ours.
ComfyUI has no diffusers map for the video models (it loads their original checkpoints): there the
names are the inverse of diffusers' own converters of those checkpoints (Wan: every name checked
by converting it back with ``convert_wan_transformer_to_diffusers``).
``patch`` does what ``ModelPatcher.add_patches`` and ``patch_weight_to_device`` do (patch list
per weight, then ``comfy.lora.calculate_weight``).
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any, Mapping

MODEL_CLASSES = {"sd15": "BaseModel", "sdxl": "SDXL", "sd3": "SD3", "flux1": "Flux", "flux2": "Flux2",
                 "flux2_klein": "Flux2", "qwen_image": "QwenImage", "z_image": "Lumina2", "ltx_video": "LTXV",
                 "ltx2": "LTXAV", "wan22_i2v": "WAN21", "wan22_ti2v": "WAN22"}


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _model_base():
    base = type("BaseModel", (), {})
    classes = {"BaseModel": base}
    for name, parent in (("SDXL", "BaseModel"), ("SD3", "BaseModel"), ("Flux", "BaseModel"), ("Flux2", "Flux"),
                         ("QwenImage", "BaseModel"), ("Lumina2", "BaseModel"), ("LTXV", "BaseModel"),
                         ("LTXAV", "BaseModel"), ("WAN21", "BaseModel"), ("WAN22", "WAN21")):
        classes[name] = type(name, (classes[parent],), {})
    mod = _stub("comfy.model_base", **classes)

    def others(name: str):  # every other model class ComfyUI tests for: a class no model here is
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(mod, name, cls)
        return cls

    mod.__getattr__ = others
    return mod


def import_comfy(comfy_dir: str | Path) -> types.SimpleNamespace:
    """``comfy.lora`` and ``comfy.utils`` from the checkout, with the stubs above."""
    import importlib

    import torch

    root = Path(comfy_dir).resolve()
    if not (root / "comfy" / "lora.py").is_file():
        raise FileNotFoundError(f"{root}: not a ComfyUI checkout (no comfy/lora.py)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    def cast_to_device(tensor, device, dtype, non_blocking=False, copy=False, **_):
        out = tensor.to(device=device, dtype=dtype)
        return out.clone() if copy and out is tensor else out

    _stub("comfy.model_management", cast_to_device=cast_to_device, device_supports_non_blocking=lambda d: False,
          get_torch_device=lambda: torch.device("cpu"), intermediate_device=lambda: torch.device("cpu"))
    mb = _model_base()
    _stub("comfy.memory_management", aimdo_enabled=False, TensorFileSlice=object)
    _stub("comfy.storage", annotate_state_dict=lambda sd, path: None)
    args = types.SimpleNamespace(mmap_torch_files=False, disable_mmap=False)
    _stub("comfy.cli_args", args=args)
    try:
        import einops  # noqa: F401
    except ImportError:
        _stub("einops", rearrange=None, repeat=None)
    comfy = importlib.import_module("comfy")
    comfy.model_management, comfy.model_base = sys.modules["comfy.model_management"], mb
    utils = importlib.import_module("comfy.utils")
    lora = importlib.import_module("comfy.lora")
    return types.SimpleNamespace(lora=lora, utils=utils, model_base=mb, root=root)


# ---------------------------------------------------------------------------------------------
# ComfyUI's config and key map of a family, from the diffusers config


def unet_config(family: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``unet_config`` ComfyUI detects for this denoiser (the keys its key maps read)."""
    if family in ("sd15", "sdxl"):
        n = len(cfg["block_out_channels"])
        lpb = int(cfg["layers_per_block"])
        tl = cfg.get("transformer_layers_per_block", 1)
        tl = [tl] * n if isinstance(tl, int) else list(tl)
        down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
        up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
        depth = [tl[i] if down_attn[i] else 0 for i in range(n) for _ in range(lpb)]
        depth_out = [tl[i] if up_attn[n - 1 - i] else 0 for i in range(n) for _ in range(lpb + 1)]
        return {"num_res_blocks": [lpb] * n, "channel_mult": [1] * n, "transformer_depth": depth,
                "transformer_depth_output": depth_out, "transformer_depth_middle": tl[-1]}
    if family == "sd3":
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        if hidden % 64:
            raise ValueError(f"ComfyUI's SD3 layout has width 64 x depth; this one is {hidden} wide")
        return {"depth": hidden // 64, "num_blocks": int(cfg["num_layers"])}
    if family in ("flux1", "flux2", "flux2_klein"):
        return {"image_model": "flux" if family == "flux1" else "flux2", "depth": int(cfg["num_layers"]),
                "depth_single_blocks": int(cfg["num_single_layers"]),
                "hidden_size": int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])}
    if family == "z_image":
        return {"n_layers": int(cfg["n_layers"]), "dim": int(cfg["dim"]),
                "n_refiner_layers": int(cfg["n_refiner_layers"])}
    if family == "qwen_image":
        return {"image_model": "qwen_image"}
    if family in ("ltx_video", "ltx2"):
        return {"image_model": "ltxv" if family == "ltx_video" else "ltxav"}
    if family in ("wan22_i2v", "wan22_ti2v"):  # comfy/model_detection.py's Wan keys (A14B: WAN21_I2V, in 36)
        return {"image_model": "wan2.1", "dim": int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
                "num_layers": int(cfg["num_layers"]), "in_dim": int(cfg["in_channels"]),
                "out_dim": int(cfg["out_channels"])}
    raise ValueError(f"no ComfyUI model known for family {family!r}")


def key_map(cu, family: str, ucfg: Mapping[str, Any], diffusers_keys) -> dict[str, Any]:
    """ComfyUI's map diffusers weight key -> ``diffusion_model.<native>`` (or (key, slice) /
    (key, None, function)), from its own helper for the family."""
    u = cu.utils
    if family in ("sd15", "sdxl"):
        return {k: "diffusion_model." + v for k, v in u.unet_to_diffusers(dict(ucfg)).items()}
    if family == "sd3":
        return u.mmdit_to_diffusers(dict(ucfg), output_prefix="diffusion_model.")
    if family in ("flux1", "flux2", "flux2_klein"):
        return u.flux_to_diffusers(dict(ucfg), output_prefix="diffusion_model.")
    if family == "z_image":
        return u.z_image_to_diffusers(dict(ucfg), output_prefix="diffusion_model.")
    if family in ("ltx_video", "ltx2"):  # ComfyUI holds the original LTX checkpoint's names
        return {k: "diffusion_model." + ltx_native(k) for k in diffusers_keys}
    if family in ("wan22_i2v", "wan22_ti2v"):
        return wan_key_map(diffusers_keys)
    return {k: "diffusion_model." + k for k in diffusers_keys}  # Qwen-Image: ComfyUI keeps the diffusers names


# diffusers name -> original LTX-Video / LTX-2 checkpoint name: the inverse of diffusers' own
# converters (single_file_utils.convert_ltx*_transformer_checkpoint_to_diffusers,
# lora_conversion_utils._convert_non_diffusers_ltx2_lora_to_diffusers); the blocks' attention and
# feed-forward projections keep their names (comfy/ldm/lightricks/model.py, av_model.py).
LTX_RENAMES = (("audio_proj_in", "audio_patchify_proj"), ("proj_in", "patchify_proj"),
               ("audio_time_embed", "audio_adaln_single"), ("time_embed", "adaln_single"),
               ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
               ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
               ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
               ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
               ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
               ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
               (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."))


def ltx_native(key: str) -> str:
    for new, old in LTX_RENAMES:
        if new.startswith(".") and new in key or key.startswith(new + "."):
            return key.replace(new, old, 1)
    return key


# diffusers name -> original Wan checkpoint name (what ComfyUI's comfy/ldm/wan/model.py WanModel holds:
# blocks.N.self_attn.q, cross_attn.o, ffn.0, norm3, modulation, head.head, ...): the inverse of
# diffusers' single_file_utils.convert_wan_transformer_to_diffusers. wan_key_map keeps a name only
# when that converter turns it back into the diffusers one.
WAN_RENAMES = (
    (r"^condition_embedder\.time_embedder\.linear_([12])", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.text_embedder\.linear_([12])", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_proj", "time_projection.1"), (r"^scale_shift_table", "head.modulation"),
    (r"^proj_out", "head.head"), (r"\.scale_shift_table$", ".modulation"), (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."), (r"\.to_out\.0\.", ".o."), (r"\.to_([qkv])\.", r".\1."),
    (r"\.add_([kv])_proj\.", r".\1_img."), (r"\.norm_added_k\.", ".norm_k_img."), (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."), (r"\.norm([23])\.", lambda m: f".norm{5 - int(m[1])}."),
)


def wan_native(key: str) -> str:
    import re

    for pattern, repl in WAN_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def wan_key_map(diffusers_keys) -> dict[str, str]:
    """{diffusers key: diffusion_model.<original Wan name>} for the keys diffusers' converter maps back."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    native = {k: wan_native(k) for k in diffusers_keys}
    back = convert_wan_transformer_to_diffusers({n: k for k, n in native.items()})
    return {k: "diffusion_model." + native[k] for k in native if back.get(k) == k}


def native_shapes(cmap: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes of ComfyUI's weights, from the diffusers shapes placed by ``cmap``."""
    out: dict[str, list[int]] = {}
    for k, shape in shapes.items():
        t = cmap.get(k)
        if t is None:
            continue
        if isinstance(t, str) or t[1] is None:
            out[t if isinstance(t, str) else t[0]] = list(shape)
            continue
        key, (dim, off, size) = t[0], t[1]
        cur = out.setdefault(key, list(shape))
        cur[dim] = max(cur[dim] if key in out else 0, off + size)
    return {k: tuple(v) for k, v in out.items()}


def to_native(cmap: Mapping[str, Any], sd: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI's weights from the diffusers ones (as ComfyUI converts a diffusers checkpoint)."""
    import torch

    shapes = native_shapes(cmap, {k: tuple(v.shape) for k, v in sd.items()})
    out = {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}
    for k, w in sd.items():
        t = cmap.get(k)
        if t is None:
            continue
        if isinstance(t, str):
            out[t] = w.detach().float().clone()
        elif t[1] is None:
            out[t[0]] = t[2](w.detach().float().clone())
        else:
            dim, off, size = t[1]
            out[t[0]].narrow(dim, off, size).copy_(w.detach().float())
    return out


def from_native(cmap: Mapping[str, Any], native: Mapping[str, Any], keys) -> dict[str, Any]:
    """The diffusers weights back from ComfyUI's (slices taken, swaps undone: a swap is its own inverse)."""
    out = {}
    for k in keys:
        t = cmap.get(k)
        if t is None:
            continue
        if isinstance(t, str):
            out[k] = native[t]
        elif t[1] is None:
            out[k] = t[2](native[t[0]])
        else:
            dim, off, size = t[1]
            out[k] = native[t[0]].narrow(dim, off, size)
    return out


def comfy_model(cu, family: str, ucfg: Mapping[str, Any], state_dict: Mapping[str, Any]):
    """An object of the family's ComfyUI model class that ``model_lora_keys_unet`` reads."""
    cls = getattr(cu.model_base, MODEL_CLASSES[family])
    sd = dict(state_dict)
    return type("ComfyModel", (cls,), {"state_dict": lambda self: sd,
                                       "model_config": types.SimpleNamespace(unet_config=dict(ucfg))})()


def clip_model(prefixes: Mapping[str, str], te_keys: Mapping[str, list[str]]):
    """A ComfyUI CLIP object's ``state_dict()`` keys: ``clip_l.transformer.text_model...`` etc.
    ``prefixes`` maps a pipeline text-encoder name to ComfyUI's (``clip_l``, ``clip_g``, ``t5xxl``)."""
    from runner.diffusion.kohya import clip_text_model_path

    sd = {}
    for name, keys in te_keys.items():
        p = prefixes[name]
        for k in keys:
            sd[f"{p}.transformer.{clip_text_model_path(k) if p.startswith('clip_') else k}"] = None
    return type("ComfyClip", (), {"state_dict": lambda self: sd})()


def lora_modules(lora_sd: Mapping[str, Any]) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_sd}


def load(cu, lora_sd: Mapping[str, Any], kmap: Mapping[str, Any]):
    """``comfy.lora.load_lora`` with its 'lora key not loaded' warnings collected."""
    msgs: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            msgs.append(record.getMessage())

    h = Catch(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(h)
    try:
        patches = cu.lora.load_lora(dict(lora_sd), dict(kmap))
    finally:
        root.removeHandler(h)
    return patches, [m for m in msgs if "not loaded" in m]


def patch(cu, patches: Mapping[Any, Any], weights: Mapping[str, Any], strength: float = 1.0) -> dict[str, Any]:
    """The weights after ComfyUI applies ``patches`` at ``strength`` (ModelPatcher's bookkeeping,
    ComfyUI's calculate_weight)."""
    per_key: dict[str, list] = {}
    for k, v in patches.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        if key in weights:
            per_key.setdefault(key, []).append((strength, v, 1.0, offset, function))
    out = dict(weights)
    for key, plist in per_key.items():
        out[key] = cu.lora.calculate_weight(plist, weights[key].clone().float(), key)
    return out
