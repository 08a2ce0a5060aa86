"""Video models through the family registry: load a video family (hub id, local diffusers folder,
or ``builtin:tiny-<family>``) as one of its image-to-video pipelines, and generate a clip from a
key frame. Everything family-specific is read from the family's data
(:class:`runner.diffusion.families.videokit.VideoArgs`): its pipelines, how the key frame and the
strength go in, the frame-rate keyword, decode noise, audio, the frame rule.

    vm = load_video_model("builtin:tiny-wan22-ti2v")            # family auto-detected
    clip = generate(vm, image, ClipSettings(prompt="he smiles", frames=9, width=32, height=32, steps=2))
    clip.frames, clip.audio, clip.sample_rate

LTX-Video 0.9 through here is what :mod:`runner.generate.ltx` has always run (same calls, same
frames); ltx.py keeps its public functions as thin wrappers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core.errors import StageError, UserError

FAMILY_KEY = "generate.video.family"


class VideoModelError(StageError):
    """The video model could not be found or loaded."""


@dataclass
class VideoPipeline:
    pipe: Any
    kind: str  # "image-to-video" | "condition"
    model: str
    tiny_random: bool
    spatial_ratio: int
    temporal_ratio: int
    family: Any = None  # the registry Family (modality "video")
    last_audio: Any = None  # (audio (channels, samples), sample rate) of the latest clip, when the family makes audio


@dataclass(frozen=True)
class ClipSettings:
    prompt: str
    negative_prompt: str | None = None
    width: int = 64
    height: int = 64
    frames: int = 9
    fps: int = 24
    steps: int = 10
    guidance: float = 1.0
    image_conditioning: float = 1.0
    seed: int = 0
    decode_timestep: float = 0.05
    decode_noise_scale: float = 0.025


@dataclass
class Clip:
    frames: list  # PIL frames (or the latents when asked for)
    audio: Any = None  # (channels, samples) float tensor when the family generates audio
    sample_rate: int | None = None


# --------------------------------------------------------------------------- families


def video_families() -> list:
    from runner.diffusion import families

    return families.all_families("video")


def family_names() -> list[str]:
    from runner.diffusion import families

    return families.names("video")


def _builtin_hint() -> str:
    return "Known: " + ", ".join(f"builtin:{f.tiny}" for f in video_families()) + "."


def choose_family(requested: str, model: str, location: str | None = None):
    """The video family of ``model``: the one named (``requested``), else the builtin's, the
    folder's model_index.json class, or the hub id's pattern."""
    from runner.diffusion import families

    if requested and requested != "auto":
        fam = families.get(requested)
        if fam.modality != "video":
            raise UserError(f"{FAMILY_KEY}: {requested!r} is an image family",
                            hint=f"Use auto or one of: {', '.join(family_names())}.")
        return fam
    if model.startswith("builtin:"):
        fam = families.by_tiny_name(model)
        if fam is None or fam.modality != "video":
            raise VideoModelError(f"generate.video.model: unknown builtin video model {model!r}", hint=_builtin_hint())
        return fam
    declared = _declared_class(location) if location else ""
    if location and (Path(location) / "model_index.json").is_file():
        try:
            return families.detect_folder(location, modality="video")
        except UserError:
            pass
    fam = families.detect_hub_id(model, modality="video")
    if fam is not None:
        return fam
    raise UserError(f"{FAMILY_KEY}: cannot tell the video family of {model!r}"
                    + (f" (its pipeline is {declared})" if declared else ""),
                    hint=f"Set {FAMILY_KEY} to one of: {', '.join(family_names())}.")


def family_of_ref(model: str, family: str = "auto", project_root: Path | None = None):
    """The video family a model reference names, read cheaply at plan time (no weights, no build,
    no network): the named family, a builtin's, a local folder's model index, a hub id's
    pattern; None when only loading would tell. A named family that the model is not: UserError."""
    from runner.diffusion import families

    ref = str(model)
    seen = families.family_of_ref(ref, project_root=project_root, modality="video")
    if family and family != "auto":
        named = choose_family(family, ref)
        sure = families.family_of_ref(ref, project_root=project_root, modality="video", guess=False)
        if sure is not None and sure is not named:  # a hub id's pattern is only a guess: not refused
            raise UserError(f"{FAMILY_KEY}: {family!r}, but generate.video.model {ref!r} is a {sure.title} model "
                            f"({sure.name})", hint=f"Set {FAMILY_KEY} to auto or {sure.name}.")
        return named
    return seen


def detect_folder(folder: Path | str):
    """The video family of a diffusers folder (model_index.json's class)."""
    from runner.diffusion import families

    return families.detect_folder(folder, modality="video")


# --------------------------------------------------------------------------- locating and loading


def tiny_video_path(ref: str, cache_dir: Path | str | None = None) -> Path:
    """Build once and return the folder of a video family's ``builtin:tiny-<family>``."""
    from runner.diffusion import families
    from runner.diffusion.tiny import models_cache_dir
    from runner.generate.builtins import build_once

    fam = families.by_tiny_name(ref)
    if fam is None or fam.modality != "video":
        raise VideoModelError(f"unknown builtin video model {ref!r}", hint=_builtin_hint())
    return build_once(models_cache_dir(cache_dir) / f"builtin-{fam.tiny}-v{fam.tiny_version}", fam.build_tiny,
                      f"builtin:{fam.tiny} v{fam.tiny_version}: a tiny {fam.title} model with random weights, built "
                      f"from config with fixed seeds by character-runner. Its clips are noise.")


def locate(model: str, cache_dir, project_root: Path | None, key: str = "generate.video.model") -> tuple[str, bool]:
    """(location, tiny) of a builtin, a local folder or a hub id (resolved offline first)."""
    if model.startswith("builtin:"):
        return str(tiny_video_path(model, cache_dir)), True
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
    raise VideoModelError(f"{key}: {model!r} is neither a hub id, an existing folder nor a builtin video model",
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


def load_video_model(model: str, *, family: str = "auto", pipeline: str = "auto", image_conditioning: float = 1.0,
                     device: str = "cpu", dtype: Any = None, cache_dir: Path | str | None = None,
                     project_root: Path | None = None) -> VideoPipeline:
    """Load ``model`` as its video family's pipeline (``pipeline``: auto, image-to-video or
    condition; auto takes the model's own class, or the one that applies a partial strength)."""
    location, tiny = locate(model, cache_dir, project_root)  # before the heavy imports: fails fast
    fam = choose_family(family, model, location)
    import diffusers
    import torch
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    declared = _declared_class(location)
    if declared and declared not in fam.class_names:
        raise VideoModelError(f"generate.video.model: {model!r} is a {declared}, not a {fam.title} model",
                              hint=f"Set {FAMILY_KEY} to auto, or point generate.video.model at a {fam.title} model.")
    if float(image_conditioning) < 1.0 and not any(pk.partial_strength for pk in fam.video.kinds.values()):
        raise UserError(f"generate.video.image_conditioning: {fam.title}'s pipeline always conditions fully on the "
                        f"key frame (got {image_conditioning:g})",
                        hint="Set generate.video.image_conditioning to 1.0 (or null for the preset's), or use a "
                             "family with a condition pipeline (ltx_video, ltx2).")
    kind = fam.video.kind_for(pipeline, declared, image_conditioning)
    cls = getattr(diffusers, fam.video.kinds[kind].pipeline)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    prev, prev_t = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    try:
        pipe = cls.from_pretrained(location, dtype=dtype)
    except (OSError, ValueError, EnvironmentError, TypeError) as exc:
        raise VideoModelError(
            f"could not load the video model {model!r} as {cls.__name__}: {exc}",
            hint="This machine may have no hub access: download the model first or point generate.video.model "
            "at a local diffusers folder (builtin:tiny-<family> for tests).") from None
    finally:
        dlogging.set_verbosity(prev)
        tlogging.set_verbosity(prev_t)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if fam.video.prepare is not None:
        fam.video.prepare(pipe)
    return VideoPipeline(pipe=pipe, kind=kind, model=model, tiny_random=tiny, spatial_ratio=_ratio(pipe, "spatial"),
                         temporal_ratio=_ratio(pipe, "temporal"), family=fam)


def apply_memory(vp: VideoPipeline, *, offload: str = "none", vae_tiling: bool = True,
                 device: str = "cuda") -> list[str]:
    """GPU memory switches on a loaded pipeline (runner.diffusion.memory.video_generate_estimate
    counts them): ``vae_tiling`` -> ``pipe.vae.enable_tiling()`` where the family's VAE has it;
    ``offload``: none, model (``enable_model_cpu_offload``: one component on the device at a time,
    the two Wan A14B experts take turns) or group (``enable_group_offload``, block level, one
    block at a time). Offload only applies on a CUDA device. Returns what was switched on."""
    pipe, done = vp.pipe, []
    vae = getattr(pipe, "vae", None)
    if vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        done.append("vae tiling")
    if offload == "none" or not str(device).startswith("cuda"):
        return done
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        done.append("model cpu offload")
    elif offload == "group":
        import torch

        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1)
        done.append("group offload (block level)")
    else:
        raise UserError(f"generate.video.offload: {offload!r} is not one of none, model, group")
    return done


def _ratio(pipe, which: str) -> int:
    """The VAE's compression as the pipeline states it (LTX: vae_*_compression_ratio; Wan:
    vae_scale_factor_*)."""
    for attr in (f"vae_{which}_compression_ratio", f"vae_scale_factor_{which}"):
        if getattr(pipe, attr, None):
            return int(getattr(pipe, attr))
    raise VideoModelError(f"{type(pipe).__name__} states no {which} compression", hint="")


def check_shape(vp: VideoPipeline, width: int, height: int, frames: int) -> None:
    """Width/height multiples of the family's size multiple (and the VAE's spatial ratio),
    frames = k * temporal ratio + 1."""
    s = max(int(vp.family.video.size_multiple), vp.spatial_ratio)
    t = vp.temporal_ratio
    bad = []
    if width % s or height % s:
        bad.append(f"width and height must be multiples of {s} (got {width}x{height}; e.g. "
                   f"{max(s, width // s * s)}x{max(s, height // s * s)})")
    if (frames - 1) % t:
        bad.append(f"frames must be k*{t}+1 (got {frames}; e.g. {(frames - 1) // t * t + 1})")
    if bad:
        raise StageError("generate.video: " + "; ".join(bad),
                         hint=f"{vp.family.title} needs multiples of {s} in space; {vp.model} compresses {t}x in time.")


def load_lora(vp: VideoPipeline, file: str | Path, scale: float, *, key: str = "generate.video.lora",
              experts: dict[str, Path] | None = None) -> None:
    """A diffusers-format (or the original trainer's) LoRA onto the pipeline's transformer, at
    ``scale``. A two-expert LoRA (train_video on Wan 2.2 A14B) loads every expert's file, a
    ``transformer_2`` one with ``load_into_transformer_2=True`` as diffusers' WanLoraLoaderMixin
    takes a low-noise expert's LoRA: ``experts`` ({component: file}) when given, else the
    checkpoint's ``experts`` in the index.json of the lora folder ``file`` sits in (given either
    file of a checkpoint, both load)."""
    f = Path(file)
    if not f.is_file():
        raise StageError(f"{key}: {f} is not a file", hint=f"Give a .safetensors LoRA made for {vp.family.title}.")
    files = {c: Path(p) for c, p in experts.items()} if experts else expert_files(f)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise StageError(f"{key}: {', '.join(missing)} (an expert's LoRA of {f.name}) is not a file",
                         hint="Give the train_video checkpoint's files as the lora folder holds them.")
    try:
        for component, path in files.items():
            extra = {"load_into_transformer_2": True} if component == "transformer_2" else {}
            if extra and getattr(vp.pipe, "transformer_2", None) is None:
                raise ValueError(f"{path.name} is a LoRA for the low-noise expert (transformer_2), which "
                                 f"{type(vp.pipe).__name__} does not have")
            vp.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="video", **extra)
        vp.pipe.set_adapters(["video"], adapter_weights=[float(scale)])
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise StageError(f"{key}: cannot load {f} onto {vp.model}: {exc}",
                         hint=f"The LoRA must be made for this {vp.family.title} transformer "
                              f"(diffusers or the original trainer's format).") from None


def expert_files(file: Path) -> dict[str, Path]:
    """{component: file} of the checkpoint ``file`` belongs to, from the index.json of the
    train_video lora folder it sits in (``<lora>/step-N/<file>``); {"transformer": file} for any
    other LoRA (one file, into the pipeline's transformer)."""
    f = file.resolve()
    for index_path in (f.parent.parent / "index.json", f.parent / "index.json"):
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for ck in index.get("checkpoints", []) if isinstance(index, dict) else []:
            experts = {c: (index_path.parent / p).resolve() for c, p in (ck.get("experts") or {}).items()}
            if f in experts.values():
                return experts
    return {"transformer": file}


# --------------------------------------------------------------------------- generating


def call_kwargs(vp: VideoPipeline, image, s: ClipSettings, *, output_type: str = "pil") -> dict[str, Any]:
    """The pipeline ``__call__`` keywords of one clip, as the family's data says."""
    import torch

    va = vp.family.video
    pk = va.kinds[vp.kind]
    kwargs: dict[str, Any] = dict(
        prompt=s.prompt, negative_prompt=s.negative_prompt if s.guidance > 1.0 else None, width=int(s.width),
        height=int(s.height), num_frames=int(s.frames), num_inference_steps=int(s.steps),
        guidance_scale=float(s.guidance), generator=torch.Generator("cpu").manual_seed(int(s.seed)),
        output_type=output_type, **dict(va.extra_call))
    if va.fps_keyword:
        kwargs[va.fps_keyword] = int(s.fps)
    if va.decode_noise and getattr(vp.pipe.vae.config, "timestep_conditioning", False):
        kwargs.update(decode_timestep=float(s.decode_timestep), decode_noise_scale=float(s.decode_noise_scale))
    image = fit_to(image, int(s.width), int(s.height))
    if pk.image_way == "conditions":
        import diffusers

        cond = getattr(diffusers, pk.condition_class, None) or _condition_class(vp.pipe, pk.condition_class)
        kwargs["conditions"] = [cond(frames=image, index=0, strength=float(s.image_conditioning))]
    else:
        kwargs["image"] = image
        if pk.strength_keyword:
            kwargs[pk.strength_keyword] = float(s.image_conditioning)
    return kwargs


def _condition_class(pipe, name: str):
    import importlib

    return getattr(importlib.import_module(type(pipe).__module__), name)


def generate(vp: VideoPipeline, image, s: ClipSettings, *, output_latents: bool = False) -> Clip:
    """One clip from the key frame ``image``: PIL frames (and the audio when the family makes it)."""
    import torch

    kwargs = call_kwargs(vp, image, s, output_type="latent" if output_latents else "pil")
    with torch.inference_mode():
        out = vp.pipe(**kwargs)
    if output_latents:
        return Clip(frames=out.frames)
    audio, rate = None, None
    if vp.family.video.audio and getattr(out, "audio", None) is not None:
        audio = out.audio[0].float().cpu()
        comp, _, key = vp.family.video.audio_rate_attr.partition(".")
        rate = int(getattr(getattr(vp.pipe, comp).config, key))
    vp.last_audio = (audio, rate) if audio is not None else None
    return Clip(frames=list(out.frames[0]), audio=audio, sample_rate=rate)


def fit_to(image, width: int, height: int):
    """Centre-crop to the clip's aspect ratio, then resize (a square storyboard frame into a 704x480
    clip keeps its proportions)."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image.convert("RGB"), (int(width), int(height)), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------- export


def add_audio(mp4: Path, audio, sample_rate: int) -> dict[str, Any]:
    """Mux ``audio`` ((channels, samples) floats in [-1, 1]) into the mp4 as AAC (the video stream
    copied as it is); returns {audio_seconds, sample_rate, channels}."""
    import av
    import numpy as np

    from runner.core.fs import atomic_path

    mp4 = Path(mp4)
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    if samples.ndim == 1:
        samples = samples[None]
    channels = int(samples.shape[0])
    with atomic_path(mp4) as tmp, av.open(str(mp4)) as src, av.open(str(tmp), mode="w", format="mp4") as dst:
        vin = src.streams.video[0]
        vout = dst.add_stream_from_template(vin)
        aout = dst.add_stream("aac", rate=int(sample_rate), layout="stereo" if channels == 2 else "mono")
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            dst.mux(packet)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.reshape(1, -1) if channels == 1
                                                                else samples.T.reshape(1, -1)),
                                           format="flt", layout="stereo" if channels == 2 else "mono")
        frame.sample_rate = int(sample_rate)
        for packet in aout.encode(frame):
            dst.mux(packet)
        for packet in aout.encode():
            dst.mux(packet)
    return {"audio_seconds": round(samples.shape[1] / float(sample_rate), 3), "sample_rate": int(sample_rate),
            "channels": channels}
