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

from pathlib import Path
from typing import Any

from runner.diffusion.families import ltx_video
from runner.generate import video_models

TINY_LTX_VERSION = ltx_video.TINY_VERSION
TINY_SEED = ltx_video.TINY_SEED
TINY_NAMES = ("tiny-ltx", "tiny-ltx-upsampler")
VideoModelError = video_models.VideoModelError  # one error class for every video family
VideoPipeline = video_models.VideoPipeline


# --------------------------------------------------------------------------- tiny models


def _build_tiny_ltx_upsampler(dest: Path) -> None:
    import torch
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 3)
        model = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1, dims=3,
                                        spatial_upsample=True, temporal_upsample=False)
    model.save_pretrained(str(dest))


_BUILDERS = {"tiny-ltx": ltx_video.build_tiny, "tiny-ltx-upsampler": _build_tiny_ltx_upsampler}


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


def _locate(model: str, cache_dir, project_root: Path | None, key: str = "generate.video.model") -> tuple[str, bool]:
    if model.startswith("builtin:"):
        return str(tiny_ltx_path(model, cache_dir)), True
    return video_models.locate(model, cache_dir, project_root, key)


def choose_pipeline(requested: str, declared_class: str, image_conditioning: float) -> str:
    return ltx_video.VIDEO.kind_for(requested, declared_class, image_conditioning)


def load_video_pipeline(model: str, *, pipeline: str = "auto", image_conditioning: float = 1.0,
                        device: str = "cpu", dtype: Any = None, cache_dir: Path | str | None = None,
                        project_root: Path | None = None, family: str = "ltx_video") -> VideoPipeline:
    """An LTX-Video 0.9 model (or ``family``'s) through :func:`video_models.load_video_model`."""
    if model.startswith("builtin:") and model.removeprefix("builtin:") in _BUILDERS:
        tiny_ltx_path(model, cache_dir)  # the folder this module has always built (same note)
    return video_models.load_video_model(model, family=family, pipeline=pipeline,
                                         image_conditioning=image_conditioning, device=device, dtype=dtype,
                                         cache_dir=cache_dir, project_root=project_root)


def check_shape(vp: VideoPipeline, width: int, height: int, frames: int) -> None:
    """LTX needs width/height divisible by 32 (and the VAE's spatial ratio) and frames = k * temporal ratio + 1."""
    video_models.check_shape(vp, width, height, frames)


def load_video_lora(vp: VideoPipeline, file: str | Path, scale: float) -> None:
    video_models.load_lora(vp, file, scale)


# --------------------------------------------------------------------------- generating


def generate_clip(vp: VideoPipeline, image, *, prompt: str, negative_prompt: str, width: int, height: int,
                  frames: int, fps: int, steps: int, guidance: float, image_conditioning: float, seed: int,
                  decode_timestep: float, decode_noise_scale: float, output_latents: bool = False):
    """One clip from ``image``: a list of PIL frames, or the latents (B, C, F, H, W) when ``output_latents``."""
    s = video_models.ClipSettings(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                  frames=frames, fps=fps, steps=steps, guidance=guidance,
                                  image_conditioning=image_conditioning, seed=seed, decode_timestep=decode_timestep,
                                  decode_noise_scale=decode_noise_scale)
    clip = video_models.generate(vp, image, s, output_latents=output_latents)
    if output_latents:
        latents = clip.frames
        if latents.ndim == 3:  # LTXImageToVideoPipeline returns packed latents: unpack to (B, C, F, H, W)
            p = vp.pipe.transformer_spatial_patch_size
            pt = vp.pipe.transformer_temporal_patch_size
            latents = vp.pipe._unpack_latents(latents, (int(frames) - 1) // vp.temporal_ratio + 1,
                                              int(height) // vp.spatial_ratio, int(width) // vp.spatial_ratio, p, pt)
        return latents
    return clip.frames


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


fit_to = video_models.fit_to


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
