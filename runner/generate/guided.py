"""Reference-guided frames: IP-Adapter (the reference face) and ControlNet (a pose or edge map).

Everything is loaded through diffusers' own loaders:

- IP-Adapter: ``pipe.load_ip_adapter(repo_or_folder, subfolder=..., weight_name=...,
  image_encoder_folder=...)`` then ``pipe.set_ip_adapter_scale(scale)``. A local folder has the
  hub repo's layout: ``<folder>/<subfolder>/<weight_name>`` (keys ``image_proj.*`` and
  ``ip_adapter.<n>.to_k_ip/to_v_ip.weight``) and the CLIP image encoder in
  ``<folder>/<subfolder>/image_encoder`` (a ``CLIPVisionModelWithProjection``).
- ControlNet: ``ControlNetModel.from_pretrained(repo_or_folder)``, then
  ``StableDiffusion(XL)ControlNetPipeline.from_pipe(pipe, controlnet=...)``, which shares the
  base pipeline's modules (the LoRA and the IP-Adapter loaded on its UNet stay in place).

``builtin:tiny-ip-adapter`` and ``builtin:tiny-controlnet`` are random-weight components for
``builtin:tiny-sd`` built from config (tests, the demo), saved in the hub layout and loaded by the
same loaders.

Control maps (``control``), made from the reference frame (frame 1) at the generation size:

- ``canny``: OpenCV Canny edges (thresholds 100/200) of the reference frame, white on black.
- ``pose``: body pose in the OpenPose ControlNet format (for ``lllyasviel/control_v11p_sd15_openpose``
  and the like): DWPose / RTMPose keypoints from ``pose_model`` through rtmlib, drawn by
  :func:`runner.generate.pose.draw_openpose`.
- ``face_landmarks``: the face backend's 68 landmarks of the reference frame drawn as white
  polylines on black (the input format of face-landmark ControlNets).

A scene's own ``control_image`` is used as is when it is a map (mostly black:
:func:`runner.generate.pose.looks_like_map`); a photo is turned into a map the same way as frame 1
(its body pose, edges or landmarks), fitted over the generation size (resized and centre-cropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runner.core.errors import StageError

# iBUG-68 landmark polylines (jaw, brows, nose, eyes, lips); closed ones loop back.
_LANDMARK_LINES = ((0, 17, False), (17, 22, False), (22, 27, False), (27, 31, False), (31, 36, False),
                   (36, 42, True), (42, 48, True), (48, 60, True), (60, 68, True))


def canny_map(image, low: int = 100, high: int = 200):
    import cv2
    from PIL import Image

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def face_pose_map(image, face_backend):
    """Landmark map of the main face; raises StageError when no face with landmarks is found."""
    import cv2
    from PIL import Image

    from runner.vision.faces import main_face

    rgb = np.asarray(image.convert("RGB"))
    face = main_face(face_backend.analyze(rgb))
    if face is None or face.landmarks is None:
        raise StageError(
            "reference_guided.control: face_landmarks needs a face with landmarks in the image (frame 1 or a "
            "scene's control photo), and none was found",
            hint="Use control: canny, or give scenes[].control_image maps.",
        )
    canvas = np.zeros_like(rgb)
    lm = np.round(np.asarray(face.landmarks)).astype(np.int32)
    thick = max(1, round(max(rgb.shape[:2]) / 256))
    for a, b, closed in _LANDMARK_LINES:
        cv2.polylines(canvas, [lm[a:b].reshape(-1, 1, 2)], closed, (255, 255, 255), thick)
    return Image.fromarray(canvas)


def control_map(image, kind: str, face_backend=None, pose=None, size: tuple[int, int] | None = None,
                parts: str = "body"):
    """The ``kind`` map of ``image`` at ``size`` (w, h; default: the image's); ``pose`` is a
    loaded :class:`runner.generate.pose.PoseDetector` (``kind == "pose"``)."""
    size = size or image.size
    if kind == "pose":
        if pose is None:
            raise StageError("reference_guided.control: pose needs a pose detector (pose_model)")
        return body_pose_map(image, pose, size, parts)[0]
    if kind == "canny":
        m = canny_map(image)
    elif kind == "face_landmarks":
        if face_backend is None:
            raise StageError("reference_guided.control: face_landmarks needs a face backend")
        m = face_pose_map(image, face_backend)
    else:
        raise StageError(f"reference_guided.control: unknown control {kind!r}",
                         hint="Use canny, pose or face_landmarks.")
    return m if m.size == size else _cover(m, size)


def _cover(image, size: tuple[int, int]):
    from PIL import ImageOps

    return ImageOps.fit(image, size)


def body_pose_map(image, pose, size: tuple[int, int], parts: str = "body"):
    """(OpenPose map at ``size``, the people found with their visible body keypoint counts)."""
    from runner.generate.pose import cover_transform, draw_openpose

    people = pose.detect(np.asarray(image.convert("RGB")))
    s, dx, dy = cover_transform(image.size, size)
    placed = [p.transformed(s, dx, dy) for p in people]
    return draw_openpose(placed, size[0], size[1], parts), [p.visible() for p in people]


POSE_KEYS = ("pose_model", "pose_detector_file", "pose_estimator_file", "pose_parts")


def keyed_options(guided: dict[str, Any]) -> dict[str, Any]:
    """reference_guided as the stage config keeps it: the pose keys only with ``control: pose``."""
    if guided.get("control", "canny") == "pose":
        return dict(guided)
    return {k: v for k, v in guided.items() if k not in POSE_KEYS}


class ControlMaps:
    """The control maps of one storyboard run: frame 1's (:meth:`extract`) and each scene's given
    image (:meth:`given`). ``info`` records how each map was made (report.json), ``warnings``
    what the user must know (a tiny random pose model, a map without anyone in it)."""

    def __init__(self, g: dict[str, Any], face_backend, size: tuple[int, int], *, device: str = "cpu",
                 project_root: Path | None = None, cache_dir: Path | None = None) -> None:
        self.kind, self.parts, self.size = g.get("control", "canny"), g.get("pose_parts", "body"), size
        self.face_backend, self.pose, self.warnings = face_backend, None, []
        self.info: dict[str, Any] = {"kind": self.kind, "size": list(size), "maps": {}}
        if self.kind == "pose":
            from runner.generate.pose import load_pose_detector

            self.pose = load_pose_detector(g.get("pose_model") or "", detector_file=g.get("pose_detector_file"),
                                           estimator_file=g.get("pose_estimator_file") or "",
                                           device=device, project_root=project_root, cache_dir=cache_dir)
            self.info["pose"] = {"model": self.pose.ref, "keypoints": self.pose.keypoints, "parts": self.parts,
                                 "tiny_random": self.pose.tiny_random}
            if self.pose.tiny_random:
                note = (f"pose_model {self.pose.ref} is a tiny random model: its keypoints are meaningless and "
                        "so is the pose map; it only shows that the pipeline runs")
                self.info["pose"]["note"] = note
                self.warnings.append(note)

    def extract(self, image, label: str):
        if self.kind != "pose":
            self.info["maps"][label] = {"from": "photo", "made": self.kind}
            return control_map(image, self.kind, self.face_backend, size=self.size)
        m, people = body_pose_map(image, self.pose, self.size, self.parts)
        self.info["maps"][label] = {"from": "photo", "made": "pose", "people": len(people), "visible_keypoints": people}
        if not any(people):
            self.warnings.append(f"control map of {label}: no body keypoints found (score above 0.3); "
                                 "the pose map is black")
        return m

    def given(self, image, label: str):
        from runner.generate.pose import looks_like_map

        if looks_like_map(image):
            self.info["maps"][label] = {"from": "map", "made": "used as is"}
            return image
        return self.extract(image, label)


def _local_or_hub(ref: str, project_root: Path | None, cache_dir: Path | None = None, key: str = "") -> str:
    if ref.startswith("builtin:"):
        return str(tiny_guided_path(ref, cache_dir))
    p = Path(ref).expanduser()
    if not p.is_absolute() and project_root is not None and (project_root / p).exists():
        return str(project_root / p)
    if p.exists():
        return str(p)
    from runner.hub import ModelUnavailable, is_hub_id, resolve_hub_model

    if not is_hub_id(ref):
        return ref
    try:  # offline and not cached: fail now, not after the hub client's retries
        return resolve_hub_model(ref, key=key)
    except ModelUnavailable as exc:
        raise StageError(f"{key}: {exc}", hint=exc.hint) from None


def _family(family: Any):
    """A Family given as itself or by its registry name."""
    if isinstance(family, str):
        from runner.diffusion import families

        return families.get(family)
    return family


def load_ip_adapter(pipe, ref: str, *, weight_name: str | None, subfolder: str | None,
                    image_encoder_folder: str | None, scale: float, family: Any,
                    project_root: Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Load an IP-Adapter onto ``pipe`` (in place) with the family's loader and defaults
    (``family.generation.ip_adapter``); returns what was loaded (for the report)."""
    from runner.generate.references import require_adapters

    fam = _family(family)
    key = "generate.storyboard.reference_guided"
    require_adapters(fam, ip_adapter=True, controlnet=False, key=key)
    args = fam.generation.ip_adapter
    location = _local_or_hub(ref, project_root, cache_dir, f"{key}.ip_adapter")
    sub = subfolder if subfolder is not None else args.subfolder
    weight = weight_name or args.weight_name
    enc = image_encoder_folder or "image_encoder"
    try:
        pipe.load_ip_adapter(location, subfolder=sub, weight_name=weight, **{args.encoder_keyword: enc})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise StageError(
            f"generate.storyboard.reference_guided.ip_adapter: cannot load {ref!r} "
            f"(subfolder {sub!r}, weight {weight!r}, image encoder {enc!r}): {exc}",
            hint="Give a hub id (h94/IP-Adapter) or a local folder with <subfolder>/<weight_name> and "
            "<subfolder>/image_encoder; set ip_adapter_subfolder / ip_adapter_weight_name to match, and "
            "use an adapter made for the base model's family.",
        ) from None
    pipe.set_ip_adapter_scale(float(scale))
    return {"ip_adapter": ref, "subfolder": sub, "weight_name": weight, "image_encoder_folder": enc,
            "scale": float(scale)}


def controlnet_pipeline(pipe, ref: str, *, family: Any, project_root: Path | None = None,
                        cache_dir: Path | None = None):
    """The family's ControlNet pipeline (``family.generation.controlnet``) sharing ``pipe``'s
    modules, with the ControlNet at ``ref`` (a hub id missing from the cache fails before diffusers
    is imported)."""
    from runner.generate.references import require_adapters

    fam = _family(family)
    key = "generate.storyboard.reference_guided"
    require_adapters(fam, ip_adapter=False, controlnet=True, key=key)
    args = fam.generation.controlnet
    location = _local_or_hub(ref, project_root, cache_dir, f"{key}.controlnet")
    import diffusers

    try:
        cn = getattr(diffusers, args.model).from_pretrained(location, dtype=getattr(pipe, fam.denoiser).dtype)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"generate.storyboard.reference_guided.controlnet: cannot load {ref!r}: {exc}",
            hint="Give a ControlNet hub id (e.g. lllyasviel/control_v11p_sd15_canny) or a local diffusers folder "
            "made for the base model's family.",
        ) from None
    cpipe = getattr(diffusers, args.pipeline).from_pipe(pipe, controlnet=cn.to(pipe.device))
    cpipe.set_progress_bar_config(disable=True)
    return cpipe


# --------------------------------------------------------------------------- tiny built-ins

TINY_GUIDED_VERSION = 1  # + the tiny-sd version: rebuilt when builtin:tiny-sd changes
TINY_GUIDED = ("tiny-ip-adapter", "tiny-controlnet")


def _build_tiny_ip_adapter(dest: Path, unet_config: dict[str, Any], vae_config: dict[str, Any]) -> None:
    """An IP-Adapter for builtin:tiny-sd in the hub repo's layout (models/ + models/image_encoder/)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cad = int(unet_config["cross_attention_dim"])
    blocks = list(unet_config["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=32))
        enc.save_pretrained(str(dest / "models" / "image_encoder"))
        sd = {"image_proj.proj.weight": torch.randn(cad * 4, 32) * 0.02, "image_proj.proj.bias": torch.zeros(cad * 4),
              "image_proj.norm.weight": torch.ones(cad), "image_proj.norm.bias": torch.zeros(cad)}
        # Key numbering of diffusers' loader: every attention processor counts, cross-attention
        # ones (attn2) carry weights at odd ids 1, 3, 5, ... in the UNet's processor order.
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(unet_config)
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                hidden = blocks[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
            else:
                hidden = blocks[int(name[len("down_blocks.")])]
            sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cad) * 0.02
            sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cad) * 0.02
            key_id += 2
    save_file(sd, str(dest / "models" / "ip-adapter_sd15.safetensors"))


def _build_tiny_controlnet(dest: Path, unet_config: dict[str, Any], vae_config: dict[str, Any]) -> None:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    # The conditioning embedding must downsample the control image as much as the VAE does
    # (one stride-2 stage per VAE down block after the first).
    n_down = len(vae_config["block_out_channels"]) - 1
    channels = tuple(16 * 2 ** i for i in range(n_down + 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        unet = UNet2DConditionModel.from_config(unet_config)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    cn.save_pretrained(str(dest))


def tiny_guided_path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Build once (for builtin:tiny-sd) and return builtin:tiny-ip-adapter / builtin:tiny-controlnet."""
    import json

    from runner.diffusion.tiny import TINY_VERSION, models_cache_dir, tiny_model_path
    from runner.generate.builtins import build_once

    name = name.removeprefix("builtin:")
    if name not in TINY_GUIDED:
        raise StageError(f"unknown builtin model builtin:{name}",
                         hint="Use builtin:tiny-ip-adapter or builtin:tiny-controlnet (for builtin:tiny-sd), "
                              "a hub id or a path.")
    final = models_cache_dir(cache_dir) / f"builtin-{name}-v{TINY_GUIDED_VERSION}-sd{TINY_VERSION}"
    if (final / "DONE").is_file():
        return final
    sd_folder = tiny_model_path("tiny-sd", cache_dir)
    unet_config = json.loads((sd_folder / "unet" / "config.json").read_text())
    vae_config = json.loads((sd_folder / "vae" / "config.json").read_text())
    build = _build_tiny_ip_adapter if name == "tiny-ip-adapter" else _build_tiny_controlnet
    return build_once(final, lambda tmp: build(tmp, unet_config, vae_config),
                      f"builtin:{name} v{TINY_GUIDED_VERSION}: random weights for builtin:tiny-sd v{TINY_VERSION}, "
                      "built from config by character-runner.")
