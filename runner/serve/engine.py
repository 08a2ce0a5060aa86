"""The models behind the API: the character's image pipeline (base model + LoRA), the optional
safety checker, and the video pipeline when the spec has a ``generate.video`` section.

All calls happen on one worker thread (the batcher's), one batch at a time.
"""

from __future__ import annotations

import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core.device import choose_device
from runner.serve.character import ServeTarget

SAFETY_CHECKER_DEFAULT = "CompVis/stable-diffusion-safety-checker"


@dataclass(frozen=True)
class ImageParams:
    """What must be equal for requests to share one pipeline call."""

    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    lora_scale: float


@dataclass
class ImageJob:
    prompt: str
    seed: int
    params: ImageParams

    def batch_key(self) -> Any:
        return ("image", self.params)


@dataclass
class VideoJob:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    frames: int
    fps: int
    lora_scale: float
    image: Any = None  # PIL image to animate, or None: generated from the prompt first

    def batch_key(self) -> Any:
        return ("video", id(self))  # one clip per pipeline call


class SafetyFilter:
    """diffusers' StableDiffusionSafetyChecker (a CLIP model with NSFW concept embeddings) with its
    CLIPImageProcessor, loaded from a hub id or a local folder holding both."""

    def __init__(self, model_ref: str, device: str = "cpu") -> None:
        from runner.hub import ModelUnavailable, is_hub_id, resolve_hub_model
        from runner.serve import ServeError

        try:  # before the heavy imports: an uncached id offline fails in seconds
            location = resolve_hub_model(model_ref, key="--safety-model") if is_hub_id(model_ref) else model_ref
        except ModelUnavailable as exc:
            raise ServeError(f"the safety checker: {exc}", hint=exc.hint) from None
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self.checker = StableDiffusionSafetyChecker.from_pretrained(location).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise ServeError(f"could not load the safety checker {model_ref!r}: {exc}",
                             hint=f"Download it first (huggingface-cli download {SAFETY_CHECKER_DEFAULT}) "
                                  "or pass --safety-model FOLDER.") from None
        self.model_ref = model_ref
        self.device = device

    def flags(self, images: list[Any]) -> list[bool]:
        import numpy as np
        import torch

        clip_input = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        with torch.inference_mode():
            _, has_nsfw = self.checker(images=arrays, clip_input=clip_input.to(self.checker.dtype))
        return [bool(x) for x in has_nsfw]


class ImageEngine:
    def __init__(self, target: ServeTarget, *, device: str = "auto", safety_model: str | None = None) -> None:
        from runner.diffusion.lora import load_lora
        from runner.diffusion.models import load_pipeline

        self.target = target
        self.device = choose_device(device, setting="--device")
        self.pipe = load_pipeline(target.base_model, family=target.family, device=self.device,
                                  project_root=Path(target.project_root) if target.project_root else None)
        self.lora_loaded = False
        if target.lora_file:
            load_lora(self.pipe, target.lora_file, adapter_name="character", scale=target.lora_scale)
            self.lora_loaded = True
        self.safety = SafetyFilter(safety_model, self.device) if safety_model else None
        self._video: Any = None
        self._video_lock = threading.Lock()

    # -- images
    def run_images(self, jobs: list[ImageJob]) -> list[tuple[Any, bool]]:
        """One pipeline call for a batch of compatible jobs -> [(PIL image, flagged)]."""
        from runner.diffusion.generate import generate_images

        p = jobs[0].params
        if self.lora_loaded:
            self.pipe.set_adapters(["character"], adapter_weights=[float(p.lora_scale)])
        images = generate_images(
            self.pipe, [j.prompt for j in jobs], negative_prompt=p.negative_prompt, seeds=[j.seed for j in jobs],
            steps=p.steps, guidance=p.guidance, width=p.width, height=p.height,
            lora_scale=p.lora_scale if self.lora_loaded else 1.0, batch_size=len(jobs))
        flags = self.safety.flags(images) if self.safety is not None else [False] * len(images)
        return list(zip(images, flags))

    # -- video
    @property
    def video_available(self) -> tuple[bool, str]:
        if not self.target.video:
            return False, "the spec has no generate.video section (the video stage's pipeline is not configured)"
        try:
            import runner.generate.ltx  # noqa: F401
        except ImportError as exc:
            return False, f"the video pipeline cannot be imported: {exc}"
        return True, ""

    def _video_pipeline(self):
        with self._video_lock:
            if self._video is None:
                from runner.generate.ltx import load_video_pipeline

                v = self.target.video or {}
                self._video = load_video_pipeline(
                    v.get("model", "Lightricks/LTX-Video"), device=self.device, family=v.get("family") or "auto",
                    project_root=Path(self.target.project_root) if self.target.project_root else None)
            return self._video

    def run_video(self, job: VideoJob) -> bytes:
        from runner.generate.ltx import check_shape, export_mp4, generate_clip

        vp = self._video_pipeline()
        check_shape(vp, job.width, job.height, job.frames)
        image = job.image
        if image is None:  # the character first, then the motion
            params = ImageParams(job.negative_prompt, self.target.steps, self.target.guidance, job.width,
                                 job.height, job.lora_scale)
            image, flagged = self.run_images([ImageJob(job.prompt, job.seed, params)])[0]
            if flagged:
                raise ContentFiltered()
        frames = generate_clip(vp, image, prompt=job.prompt, negative_prompt=job.negative_prompt, width=job.width,
                               height=job.height, frames=job.frames, fps=job.fps, steps=job.steps,
                               guidance=job.guidance, image_conditioning=1.0, seed=job.seed,
                               decode_timestep=0.05, decode_noise_scale=0.025)
        if self.safety is not None and any(self.safety.flags([frames[0], frames[len(frames) // 2], frames[-1]])):
            raise ContentFiltered()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "clip.mp4"
            export_mp4(frames, path, job.fps)
            return path.read_bytes()

    def run_batch(self, jobs: list[Any]) -> list[Any]:
        if isinstance(jobs[0], VideoJob):
            return [self.run_video(j) for j in jobs]
        return self.run_images(jobs)


class ContentFiltered(Exception):
    """The safety checker flagged the output; it is withheld."""


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
