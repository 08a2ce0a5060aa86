"""LTX-Video image-to-video through diffusers, plus ``builtin:tiny-ltx`` for tests.

``load_video_pipeline(model, pipeline=...)`` loads a hub id, a local diffusers folder, or
``builtin:tiny-ltx``, as one of:

- ``LTXImageToVideoPipeline``: the first latent frame is the encoded image (conditioning
  strength is always 1.0); LTX-Video 0.9.0 / 0.9.1 models.
- ``LTXConditionPipeline``: conditions on the image with a strength (``image_conditioning``),
  the pipeline of LTX-Video 0.9.5 and later.

``pipeline: auto`` takes ``LTXConditionPipeline`` when the model's ``model_index.json`` names it
or when ``image_conditioning`` is below 1 (only it can apply a partial strength), else
``LTXImageToVideoPipeline``. Both are built from the same five components, so one loaded model
serves both (``from_pipe``).

2x upscale: with ``upsampler`` (an ``LTXLatentUpsamplerModel`` id or folder, or
``builtin:tiny-ltx-upsampler``), the clip is generated as latents, upsampled in latent space by
``LTXLatentUpsamplePipeline`` and decoded by the same VAE; without one, the decoded frames are
resized 2x with Lanczos (said so in the report).

``builtin:tiny-ltx`` is built from config with fixed seeds (a 1-layer transformer, an 8-channel
VAE with 4x spatial and 4x temporal compression, a 2-layer T5 encoder and a T5 tokenizer built
from a fixed word list with ``tokenizers``' Unigram model), saved once into the model cache and
loaded back with ``from_pretrained``. Its clips are noise.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core.errors import StageError

TINY_LTX_VERSION = 1
TINY_SEED = 7
TINY_NAMES = ("tiny-ltx", "tiny-ltx-upsampler")
_TINY_WORDS = (
    "a the an of and with in on at to his her their face eyes mouth smile smiles smiling slowly subtle "
    "motion cinematic natural character movement high dynamic range man woman person cries crying tears "
    "turns head looks camera glasses beard hat coat neutral expression starts breaks into begins gently "
    "light wind hair moves blinks breathes walks rides laughs portrait close up medium shot wide"
).split()


class VideoModelError(StageError):
    """The video model could not be found or loaded."""


# --------------------------------------------------------------------------- tiny models


def _tiny_t5_tokenizer(dest: Path):
    """A T5 tokenizer (Unigram) over a fixed vocabulary: special tokens, bytes-as-chars, words."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(chr(c), -6.0) for c in range(33, 127)]
    vocab += [("\u2581" + w, -2.0) for w in dict.fromkeys(_TINY_WORDS)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(dest))
    return T5Tokenizer.from_pretrained(str(dest))


def _build_tiny_ltx(dest: Path) -> None:
    import torch
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tiny_t5_tokenizer(dest / "_tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32)
        torch.manual_seed(TINY_SEED + 1)
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False)
        torch.manual_seed(TINY_SEED + 2)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    pipe = LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(str(dest), safe_serialization=True)
    shutil.rmtree(dest / "_tok", ignore_errors=True)


def _build_tiny_ltx_upsampler(dest: Path) -> None:
    import torch
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 3)
        model = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1, dims=3,
                                        spatial_upsample=True, temporal_upsample=False)
    model.save_pretrained(str(dest))


_BUILDERS = {"tiny-ltx": _build_tiny_ltx, "tiny-ltx-upsampler": _build_tiny_ltx_upsampler}


def tiny_ltx_path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Build (once) and return the folder of builtin:tiny-ltx or builtin:tiny-ltx-upsampler."""
    from runner.diffusion.tiny import models_cache_dir
    from runner.generate.builtins import build_once

    name = name.removeprefix("builtin:")
    if name not in _BUILDERS:
        raise VideoModelError(f"unknown builtin video model {name!r}",
                              hint="Use builtin:tiny-ltx (and builtin:tiny-ltx-upsampler), a hub id or a local folder.")
    return build_once(models_cache_dir(cache_dir) / f"builtin-{name}-v{TINY_LTX_VERSION}", _BUILDERS[name],
                      f"builtin:{name} v{TINY_LTX_VERSION}: a tiny LTX-Video model with random weights, built from "
                      f"config with seed {TINY_SEED} by character-runner. Its clips are noise.")


# --------------------------------------------------------------------------- loading


@dataclass
class VideoPipeline:
    pipe: Any
    kind: str  # "image-to-video" | "condition"
    model: str
    tiny_random: bool
    spatial_ratio: int
    temporal_ratio: int


def _locate(model: str, cache_dir, project_root: Path | None, key: str = "generate.video.model") -> tuple[str, bool]:
    if model.startswith("builtin:"):
        return str(tiny_ltx_path(model, cache_dir)), True
    p = Path(model).expanduser()
    if not p.is_absolute() and project_root is not None and (project_root / p).exists():
        p = project_root / p
    if p.exists():
        return str(p), False
    from runner.hub import ModelUnavailable, is_hub_id, resolve_hub_model

    if is_hub_id(model):
        try:  # offline and not cached: fail now, not after the hub client's retries
            return resolve_hub_model(model, key=key), False
        except ModelUnavailable as exc:
            raise VideoModelError(f"{key}: {exc}", hint=exc.hint) from None
    raise VideoModelError(f"{key}: {model!r} is neither a hub id, an existing folder nor builtin:tiny-ltx",
                          hint="e.g. Lightricks/LTX-Video, a local diffusers folder, or builtin:tiny-ltx for tests.")


def _declared_class(location: str) -> str:
    p = Path(location) / "model_index.json"
    if p.is_file():
        return str(json.loads(p.read_text()).get("_class_name", ""))
    try:
        from huggingface_hub import hf_hub_download

        return str(json.loads(Path(hf_hub_download(location, "model_index.json")).read_text()).get("_class_name", ""))
    except Exception:
        return ""


def choose_pipeline(requested: str, declared_class: str, image_conditioning: float) -> str:
    if requested in ("image-to-video", "condition"):
        return requested
    if declared_class == "LTXConditionPipeline" or float(image_conditioning) < 1.0:
        return "condition"
    return "image-to-video"


def load_video_pipeline(model: str, *, pipeline: str = "auto", image_conditioning: float = 1.0,
                        device: str = "cpu", dtype: Any = None, cache_dir: Path | str | None = None,
                        project_root: Path | None = None) -> VideoPipeline:
    location, tiny = _locate(model, cache_dir, project_root)  # before the heavy imports: fails fast
    import torch
    from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    kind = choose_pipeline(pipeline, _declared_class(location), image_conditioning)
    cls = LTXConditionPipeline if kind == "condition" else LTXImageToVideoPipeline
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    prev = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = cls.from_pretrained(location, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise VideoModelError(
            f"could not load the video model {model!r} as {cls.__name__}: {exc}",
            hint="This machine may have no hub access: download the model first or point generate.video.model "
            "at a local diffusers folder (builtin:tiny-ltx for tests).") from None
    finally:
        dlogging.set_verbosity(prev)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return VideoPipeline(pipe=pipe, kind=kind, model=model, tiny_random=tiny,
                         spatial_ratio=int(pipe.vae_spatial_compression_ratio),
                         temporal_ratio=int(pipe.vae_temporal_compression_ratio))


def check_shape(vp: VideoPipeline, width: int, height: int, frames: int) -> None:
    """LTX needs width/height divisible by 32 (and the VAE's spatial ratio) and frames = k * temporal ratio + 1."""
    s, t = max(32, vp.spatial_ratio), vp.temporal_ratio
    bad = []
    if width % s or height % s:
        bad.append(f"width and height must be multiples of {s} (got {width}x{height}; e.g. "
                   f"{width // s * s}x{height // s * s})")
    if (frames - 1) % t:
        bad.append(f"frames must be k*{t}+1 (got {frames}; e.g. {(frames - 1) // t * t + 1})")
    if bad:
        raise StageError("generate.video: " + "; ".join(bad),
                         hint=f"The LTX pipelines need multiples of {s} in space; "
                              f"{vp.model} compresses {t}x in time.")


def load_video_lora(vp: VideoPipeline, file: str | Path, scale: float) -> None:
    f = Path(file)
    if not f.is_file():
        raise StageError(f"generate.video.lora: {f} is not a file",
                         hint="Give a .safetensors LoRA made for the LTX-Video model.")
    try:
        vp.pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name="video")
        vp.pipe.set_adapters(["video"], adapter_weights=[float(scale)])
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise StageError(f"generate.video.lora: cannot load {f} onto {vp.model}: {exc}",
                         hint="The LoRA must be made for this LTX-Video transformer "
                              "(diffusers or original LTX format).") from None


# --------------------------------------------------------------------------- generating


def generate_clip(vp: VideoPipeline, image, *, prompt: str, negative_prompt: str, width: int, height: int,
                  frames: int, fps: int, steps: int, guidance: float, image_conditioning: float, seed: int,
                  decode_timestep: float, decode_noise_scale: float, output_latents: bool = False):
    """One clip from ``image``: a list of PIL frames, or (latents, shape) when ``output_latents``."""
    import torch

    gen = torch.Generator("cpu").manual_seed(int(seed))
    kwargs: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=negative_prompt if guidance > 1.0 else None, width=int(width),
        height=int(height), num_frames=int(frames), frame_rate=int(fps), num_inference_steps=int(steps),
        guidance_scale=float(guidance), generator=gen, output_type="latent" if output_latents else "pil",
    )
    if vp.pipe.vae.config.timestep_conditioning:
        kwargs.update(decode_timestep=float(decode_timestep), decode_noise_scale=float(decode_noise_scale))
    image = fit_to(image, int(width), int(height))
    if vp.kind == "condition":
        kwargs.update(image=image, strength=float(image_conditioning))
    else:
        kwargs.update(image=image)
    with torch.inference_mode():
        out = vp.pipe(**kwargs)
    if output_latents:
        latents = out.frames
        if latents.ndim == 3:  # LTXImageToVideoPipeline returns packed latents: unpack to (B, C, F, H, W)
            p = vp.pipe.transformer_spatial_patch_size
            pt = vp.pipe.transformer_temporal_patch_size
            latents = vp.pipe._unpack_latents(latents, (int(frames) - 1) // vp.temporal_ratio + 1,
                                              int(height) // vp.spatial_ratio, int(width) // vp.spatial_ratio, p, pt)
        return latents
    return list(out.frames[0])


def latent_upscale(vp: VideoPipeline, latents, upsampler: str, *, width: int, height: int, seed: int,
                   decode_timestep: float, decode_noise_scale: float, cache_dir=None, project_root: Path | None = None):
    """2x in latent space with LTXLatentUpsamplePipeline, decoded by the clip's VAE."""
    location, _ = _locate(upsampler, cache_dir, project_root, "generate.video.upsampler")
    import torch
    from diffusers import LTXLatentUpsamplePipeline
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    try:
        model = LTXLatentUpsamplerModel.from_pretrained(location, subfolder="latent_upsampler"
                                                        if (Path(location) / "latent_upsampler").is_dir() else None)
    except (OSError, ValueError) as exc:
        raise VideoModelError(f"generate.video.upsampler: cannot load {upsampler!r}: {exc}",
                              hint="e.g. Lightricks/ltxv-spatial-upscaler-0.9.7, a local folder, "
                                   "or builtin:tiny-ltx-upsampler.") from None
    model = model.to(device=vp.pipe.device, dtype=vp.pipe.vae.dtype)
    up = LTXLatentUpsamplePipeline(vae=vp.pipe.vae, latent_upsampler=model)
    up.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {}
    if vp.pipe.vae.config.timestep_conditioning:
        kwargs.update(decode_timestep=float(decode_timestep), decode_noise_scale=float(decode_noise_scale))
    with torch.inference_mode():
        out = up(latents=latents, width=int(width) * 2, height=int(height) * 2, output_type="pil",
                 generator=torch.Generator("cpu").manual_seed(int(seed)), **kwargs)
    return list(out.frames[0])


def decode_latents(vp: VideoPipeline, latents, *, seed: int, decode_timestep: float, decode_noise_scale: float):
    """Decode (B, C, F, H, W) normalized latents into PIL frames (the pipelines' own last step)."""
    import torch

    pipe = vp.pipe
    with torch.inference_mode():
        lat = pipe._denormalize_latents(latents, pipe.vae.latents_mean, pipe.vae.latents_std,
                                        pipe.vae.config.scaling_factor).to(pipe.vae.dtype)
        timestep = None
        if pipe.vae.config.timestep_conditioning:
            noise = torch.randn(lat.shape, generator=torch.Generator("cpu").manual_seed(int(seed))).to(lat)
            lat = (1 - decode_noise_scale) * lat + decode_noise_scale * noise
            timestep = torch.tensor([decode_timestep], device=lat.device, dtype=lat.dtype)
        video = pipe.vae.decode(lat, timestep, return_dict=False)[0]
        return list(pipe.video_processor.postprocess_video(video, output_type="pil")[0])


def resize_frames(frames: list, factor: int = 2) -> list:
    from PIL import Image

    return [f.resize((f.width * factor, f.height * factor), Image.Resampling.LANCZOS) for f in frames]


def fit_to(image, width: int, height: int):
    """Centre-crop to the clip's aspect ratio, then resize (a square storyboard frame into a 704x480
    clip keeps its proportions)."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image.convert("RGB"), (int(width), int(height)), Image.Resampling.LANCZOS)


def replace_first_frame(frames: list, image) -> list:
    """The input image (cropped and resized to the clip's size, as it was conditioned) as frame 0."""
    return [fit_to(image, *frames[0].size)] + list(frames[1:])


# --------------------------------------------------------------------------- export


def export_mp4(frames: list, path: Path, fps: int, *, crf: int = 20) -> dict[str, Any]:
    """H.264 mp4 (yuv420p, even dimensions) with PyAV; returns {width, height, frames, bytes}."""
    import av
    import numpy as np

    from runner.core.fs import atomic_path

    path = Path(path)
    w, h = frames[0].size
    w2, h2 = w - w % 2, h - h % 2
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = w2, h2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for im in frames:
            arr = np.asarray(im.convert("RGB"))[:h2, :w2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"width": w2, "height": h2, "frames": len(frames), "bytes": path.stat().st_size}
