"""Face-aligned crops for identity adapters, from the 5 keypoints the face backends give.

Two alignments, each the one its adapters were trained with:

``arcface``
    insightface's ArcFace alignment: a similarity transform that puts the 5 keypoints (eye
    centres, nose tip, mouth corners) on the standard 112x112 template, scaled for 224 etc. It is
    computed by insightface itself (``insightface.utils.face_align.estimate_norm``, the function
    its ``norm_crop`` uses), with ``norm_crop``'s black border. InstantID, IP-Adapter-FaceID and
    PuLID embed the 112 px crop with an ArcFace model; IP-Adapter-FaceID Plus also feeds the 224 px
    crop (``norm_crop(image, kps, image_size=224)``) to its CLIP image encoder.
``ffhq``
    The FFHQ-style alignment PuLID gets from facexlib's ``FaceRestoreHelper`` (face_size 512,
    crop_ratio 1): a similarity from the 5 keypoints to facexlib's 512 px template, border
    (135, 133, 132). facexlib itself needs torchvision, which this project does not install, so
    the template is applied here with OpenCV. One deliberate difference: facexlib fits with
    ``cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)``, a robust fit that, on 5 points, drops
    one it deems an outlier; which one flips with a pixel of landmark noise, and the crop jumps
    (14 px at the centre of a 512 px crop between a photo and its copy rotated by 20 degrees,
    measured on biden_02). The fit here is the least-squares similarity of all 5 points (Umeyama,
    scikit-image's ``SimilarityTransform``: the estimator insightface uses for ``arcface``).

The keypoints are in insightface order (image-left eye, image-right eye, nose tip, image-left and
image-right mouth corner), as :class:`runner.vision.faces.Face` holds them: the insightface
backend's detector points, or the dlib backend's 68 landmarks reduced by
:func:`runner.vision.faces.keypoints_from_68` (eye centres = the mean of each eye's 6 points).

:func:`face_problem` says why a face should not be aligned at all (cut by the frame, turned too
far); :func:`upscale_of` how much a crop would enlarge the face, for the too-small rule;
:func:`outside_fraction` how much of a crop lies outside the photo (a face cut by the frame fills
its ArcFace crop with border).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ALIGNMENTS = ("arcface", "ffhq")

#: facexlib FaceRestoreHelper's 5-point template for a 512 px face (x, y): eyes, nose, mouth corners.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)
FFHQ_BORDER = (135, 133, 132)
ARCFACE_BORDER = (0, 0, 0)


@dataclass(frozen=True)
class Crop:
    """One crop an adapter reads: an alignment at a size, and what the adapter does with it
    (``embedding``: an ArcFace recognition model's input; ``image``: an image encoder's input)."""

    alignment: str
    size: int
    role: str

    @property
    def name(self) -> str:
        return f"{self.alignment}{self.size}"


_ARC112 = Crop("arcface", 112, "embedding")

#: The crops each identity adapter reads, in the alignment it was trained with.
ADAPTERS: dict[str, tuple[Crop, ...]] = {
    "instantid": (_ARC112,),
    "ip_adapter_faceid": (_ARC112,),
    "ip_adapter_faceid_plus": (_ARC112, Crop("arcface", 224, "image")),
    "pulid": (_ARC112, Crop("ffhq", 512, "image")),
}


@dataclass
class Aligned:
    """An aligned crop: RGB pixels, the 2x3 matrix from source to crop pixels, and the fraction of
    the crop that lay outside the source image (filled with the alignment's border colour)."""

    image: np.ndarray
    matrix: np.ndarray
    outside: float


def template(alignment: str, size: int) -> np.ndarray:
    """The (5, 2) keypoint positions an aligned crop of ``size`` px puts the face on."""
    if alignment == "arcface":
        from insightface.utils import face_align

        _check_arcface_size(size)
        ratio, dx = (size / 112.0, 0.0) if size % 112 == 0 else (size / 128.0, 8.0 * size / 128.0)
        return face_align.arcface_dst.astype(np.float64) * ratio + np.array([dx, 0.0])
    if alignment == "ffhq":
        return FFHQ_TEMPLATE_512 * (size / 512.0)
    raise ValueError(f"unknown alignment {alignment!r}: use one of {', '.join(ALIGNMENTS)}")


def _check_arcface_size(size: int) -> None:
    if size % 112 and size % 128:
        raise ValueError(f"an ArcFace crop is 112 or 128 px times n (insightface's rule), not {size}")


def matrix(keypoints: Sequence[Sequence[float]], alignment: str, size: int) -> np.ndarray:
    """The 2x3 similarity from source pixels to the crop (insightface's estimate_norm for
    ``arcface``; facexlib's LMEDS partial-affine fit for ``ffhq``)."""
    kps = _keypoints(keypoints)
    if alignment == "arcface":
        from insightface.utils import face_align

        _check_arcface_size(size)
        with warnings.catch_warnings():  # scikit-image's estimate() deprecation, inside insightface
            warnings.simplefilter("ignore", FutureWarning)
            return np.asarray(face_align.estimate_norm(kps.astype(np.float32), image_size=size), dtype=np.float64)
    if alignment == "ffhq":
        return _similarity(kps, template("ffhq", size))
    raise ValueError(f"unknown alignment {alignment!r}: use one of {', '.join(ALIGNMENTS)}")


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking ``src`` to ``dst``."""
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.isfinite(tform.params).all():
        raise ValueError("the keypoints fit no similarity transform (all in one place?)")
    return np.asarray(tform.params[:2], dtype=np.float64)


def _keypoints(keypoints: Sequence[Sequence[float]]) -> np.ndarray:
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise ValueError(f"alignment needs 5 finite (x, y) keypoints, got an array of shape {kps.shape}")
    return kps


def align(rgb: np.ndarray, keypoints: Sequence[Sequence[float]], alignment: str, size: int) -> Aligned:
    """The ``size`` px crop of ``rgb`` (HxWx3 uint8) in ``alignment`` (see the module docstring)."""
    import cv2

    m = matrix(keypoints, alignment, size)
    border = ARCFACE_BORDER if alignment == "arcface" else FFHQ_BORDER
    out = cv2.warpAffine(np.ascontiguousarray(rgb), m, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return Aligned(out, m, outside_fraction(m, size, rgb.shape[1], rgb.shape[0]))


def outside_fraction(m: np.ndarray, size: int, width: int, height: int) -> float:
    """The fraction of a ``size`` px crop made with matrix ``m`` that falls outside a
    ``width`` x ``height`` source image (pixel centres of the crop mapped back)."""
    inv = np.linalg.inv(np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]]))[:2]
    g = (np.arange(size) + 0.5)
    xs, ys = np.meshgrid(g, g)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (sx >= -0.5) & (sx <= width - 0.5) & (sy >= -0.5) & (sy <= height - 0.5)
    return round(1.0 - float(inside.mean()), 4)


def transform_points(points: Sequence[Sequence[float]], m: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) moved by the 2x3 matrix ``m``."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def eye_distance(keypoints: Sequence[Sequence[float]]) -> float:
    kps = _keypoints(keypoints)
    return float(np.hypot(*(kps[1] - kps[0])))


def upscale_of(keypoints: Sequence[Sequence[float]], crop: Crop) -> float:
    """How many times a crop enlarges the face: the template's eye distance over the source's."""
    src = eye_distance(keypoints)
    dst = float(np.hypot(*np.subtract(*template(crop.alignment, crop.size)[[1, 0]])))
    return dst / src if src > 0 else math.inf


def face_problem(keypoints: Sequence[Sequence[float]] | None, pose: dict[str, Any] | None, width: int, height: int,
                 *, max_yaw: float, max_pitch: float) -> str | None:
    """Why a face is not aligned (a sentence), or None: no keypoints, a keypoint outside the frame
    (the backend guessed it), a degenerate keypoint layout, or a head turned past the limits."""
    if keypoints is None:
        return "no keypoints for the main face"
    try:
        kps = _keypoints(keypoints)
    except ValueError as exc:
        return str(exc)
    if ((kps[:, 0] < 0) | (kps[:, 0] > width - 1) | (kps[:, 1] < 0) | (kps[:, 1] > height - 1)).any():
        return "face cut by the frame edge: a keypoint lies outside the image"
    if eye_distance(kps) < 2.0 or kps[1, 0] <= kps[0, 0] and abs(kps[1, 1] - kps[0, 1]) < 1.0:
        return "degenerate keypoints (the eyes coincide)"
    yaw, pitch = (pose or {}).get("yaw"), (pose or {}).get("pitch")
    if yaw is None or pitch is None or not (math.isfinite(yaw) and math.isfinite(pitch)):
        return "head pose unknown"
    if abs(yaw) > max_yaw:
        return f"head turned too far: yaw {yaw:.0f} degrees, the limit is {max_yaw:g}"
    if abs(pitch) > max_pitch:
        return f"head tilted too far: pitch {pitch:.0f} degrees, the limit is {max_pitch:g}"
    return None
