"""Face analysis behind one interface, with two real backends (dlib and insightface).

API
---
::

    from runner.vision.faces import get_face_backend, identity_similarity

    backend = get_face_backend("auto")          # "auto" | "dlib" | "insightface"
    print(backend.selection_note)               # which backend "auto" took, and why
    faces = backend.analyze(rgb)                # rgb: HxWx3 uint8 numpy array (RGB order)
    for f in faces:
        f.box          # (x0, y0, x1, y1) float pixels of the input image
        f.score        # detector confidence (HOG: SVM margin; CNN/insightface: confidence)
        f.landmarks    # (68, 2) float array, iBUG-300W layout, or None (insightface pack
                       #   without a 68-point model)
        f.keypoints    # (5, 2): image-left eye, image-right eye, nose tip, image-left and
                       #   image-right mouth corner (insightface order)
        f.pose         # Pose(yaw, pitch, roll) in degrees, convention below
        f.embedding    # float32 identity embedding, L2-normalized
    identity_similarity(faces[0].embedding, ref_embedding)   # cosine in [-1, 1]
    backend.name, backend.embedding_model, backend.default_identity_threshold

Backends
--------
``dlib``
    The models of the ``face_recognition_models`` package: the HOG detector (default, CPU) or the
    MMOD CNN detector (``detector="cnn"``, slow without CUDA), the 68-point shape predictor and
    the ResNet face-recognition model (128-d descriptor, L2-normalized here). Runs offline; this is
    what tests and CI use.
``insightface``
    ``insightface.app.FaceAnalysis`` with a model pack (``buffalo_l``, ``antelopev2``, ...) found
    at ``<root>/models/<pack>`` (root defaults to ``~/.insightface``) or at a folder path. The
    pack folder is checked *before* insightface is asked for it, so a missing pack is a
    :class:`~runner.core.contract.StageError` naming where to put it, never a download. ONNX Runtime
    uses CUDA when its CUDA provider is available, else the CPU.
``auto``
    insightface when its pack folder exists (and insightface imports), else dlib. The choice and
    its reason are in ``backend.selection_note``.

Pose sign convention (both backends)
------------------------------------
Pose comes from the same place for both backends: ``cv2.solvePnP`` (SQPnP) of the rigid upper-face
landmarks against a generic 3D face model (:data:`FACE_MODEL_3D`, millimetres, X to image right, Y
down, Z away from the camera, so a frontal face has the identity rotation) seen by a virtual camera
that looks straight at the face: the pose is relative to the line of sight, so it does not change
when the face moves in the frame or the image is padded or cropped around it.
The angles are read off the rotated face:

- ``yaw``   > 0: the person turns to *their* left, i.e. the face points to image right.
- ``pitch`` > 0: the person looks up.
- ``roll``  > 0: the head tilts toward the person's left shoulder (the eye line turns clockwise on
  the image; the image-right eye is lower).

A horizontal mirror flips the sign of yaw and roll and keeps pitch (tests check this, and check
yaw on photos whose head turn is visible).

Similarity scale
----------------
:func:`identity_similarity` is the cosine of the two L2-normalized embeddings. Its scale depends
on the embedding model. dlib's 128-d descriptors of *different* people still score 0.76-0.89
cosine on the shared test photos (dlib's published rule, Euclidean distance 0.6, is about cosine
0.82 after normalization, too loose for curation), while the same person scores 0.94-0.99; ArcFace
(insightface) embeddings of different people sit near 0 and the same person above ~0.4.
Hence ``default_identity_threshold`` per backend; see docs/analysis.md for the measured
distributions.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from runner.core.errors import StageError

__all__ = [
    "FACE_MODEL_3D",
    "IDENTITY_THRESHOLDS",
    "PROFILE_FLOORS",
    "Face",
    "FaceBackend",
    "DlibFaceBackend",
    "InsightFaceBackend",
    "Pose",
    "get_face_backend",
    "identity_similarity",
    "insightface_pack_dir",
    "keypoints_from_68",
    "main_face",
    "pose_from_landmarks",
]


class Pose(NamedTuple):
    """Head pose in degrees (see the module docstring for the sign convention)."""

    yaw: float
    pitch: float
    roll: float


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the image given to ``analyze``."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray  # (5, 2)
    pose: Pose
    embedding: np.ndarray  # (D,), float32, L2-normalized
    landmarks: np.ndarray | None = None  # (68, 2) iBUG layout
    # Backend-specific extras (insightface: landmarks_106, age, sex) as plain JSON values.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return box_area(self.box)

    def to_record(self, *, with_embedding: bool = True, ndigits: int = 2) -> dict[str, Any]:
        """A JSON-ready dict (embedding as a list of floats when asked)."""
        rec: dict[str, Any] = {
            "box": [round(float(v), ndigits) for v in self.box],
            "score": round(float(self.score), 4),
            "keypoints": np.round(self.keypoints.astype(float), ndigits).tolist(),
            "landmarks": None if self.landmarks is None else np.round(self.landmarks.astype(float), 1).tolist(),
            "pose": {k: round(float(v), 2) for k, v in self.pose._asdict().items()},
        }
        if with_embedding:
            rec["embedding"] = [round(float(v), 6) for v in self.embedding]
        if self.extra:
            rec["extra"] = self.extra
        return rec


def identity_similarity(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    """Cosine similarity of two embeddings (each is normalized here, so raw vectors work too)."""
    va = np.asarray(a, dtype=np.float64).ravel()
    vb = np.asarray(b, dtype=np.float64).ravel()
    if va.shape != vb.shape:
        raise ValueError(f"embeddings of different sizes: {va.shape[0]} vs {vb.shape[0]} (different backends?)")
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(va, vb) / (na * nb))


def main_face(faces: list[Face]) -> Face | None:
    """The largest face (by box area), or None."""
    return max(faces, key=lambda f: f.area) if faces else None


def _embedding_and_box(face: Face | None) -> tuple[np.ndarray | None, list[float] | None]:
    if face is None:
        return None, None
    return np.asarray(face.embedding, dtype=np.float32), [round(float(v), 1) for v in face.box]


def box_area(box: Sequence[float]) -> float:
    """Area of an (x0, y0, x1, y1) box; 0 for an empty one."""
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def _largest(boxes: Sequence[Sequence[float]]) -> int:
    """Index of the largest box; the first of equals, as :func:`main_face` picks."""
    areas = [box_area(b) for b in boxes]
    return areas.index(max(areas))


def _l2n(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


# --------------------------------------------------------------------------------------------
# Pose from landmarks
# --------------------------------------------------------------------------------------------

# A generic adult face in millimetres, in a camera-like frame: X to image right, Y down, Z away
# from the camera; the nose tip is the origin. Keys are iBUG-68 indices.
#
# X and Y are the mean shape of dlib's 68-point shape predictor (the average of its iBUG 300-W
# training annotations, read out of face_recognition_models' shape_predictor_68_face_landmarks.dat
# by bench/pose_model/mean_shape.py) scaled to 90 mm between the outer eye corners: "pitch 0" is the
# average photographed face, not a guess. Z is anthropometric (rounded adult averages: the inner
# eye corners 32 mm and the outer ones 40 mm behind the nose tip, the nasal bridge rising from the
# tip to 18 mm at the sellion, the nostril wings 20 mm back).
#
# Only the rigid upper face is used: eye corners, the nasal bridge and the nose base. The chin drops
# when the mouth opens and the mouth corners rise in a smile, and both read as pitch when they are
# fitted (talking faces read 10-20 degrees "up"); the other contour points slide along the
# silhouette as the head turns.
FACE_MODEL_3D: dict[int, tuple[float, float, float]] = {
    27: (0.0, -38.0, 18.0),  # sellion (top of the nasal bridge)
    28: (0.0, -25.4, 12.0),
    29: (0.0, -12.9, 6.0),
    30: (0.0, 0.0, 0.0),  # nose tip (pronasale)
    31: (-15.0, 8.7, 20.0),  # nostril wing, image left
    32: (-7.8, 11.4, 15.0),
    33: (0.0, 13.6, 10.0),  # subnasale
    34: (7.8, 11.4, 15.0),
    35: (15.0, 8.7, 20.0),  # nostril wing, image right
    36: (-45.0, -36.4, 40.0),  # outer corner of the image-left eye
    39: (-19.0, -34.5, 32.0),  # inner corner of the image-left eye
    42: (19.0, -34.5, 32.0),  # inner corner of the image-right eye
    45: (45.0, -36.4, 40.0),  # outer corner of the image-right eye
}
# The same model at the 5 keypoints (eye centres, nose tip, mouth corners; the mouth corners are the
# only lower-face points, as a 5-point pack has nothing else below the nose).
FACE_MODEL_3D_5: np.ndarray = np.array(
    [(-32.3, -36.5, 36.0), (32.3, -36.5, 36.0), (0.0, 0.0, 0.0), (-28.8, 32.1, 26.0), (28.8, 32.1, 26.0)],
    dtype=np.float64,
)
#: Camera distance assumed for the perspective of the pose fit, in millimetres (a portrait or a
#: webcam; the angles change by under a degree between 400 mm and 3 m).
POSE_CAMERA_DISTANCE_MM = 800.0
#: Landmarks closer than this fraction of the outer-eye-corner distance to the frame edge are left
#: out of the fit (the shape predictor guesses them).
POSE_EDGE_MARGIN = 0.05


def keypoints_from_68(lm: np.ndarray) -> np.ndarray:
    """The 5 keypoints (insightface order) from 68 iBUG landmarks."""
    lm = np.asarray(lm, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(np.float32)


def _angles_from_rotation(rot: np.ndarray) -> Pose:
    # The face's forward direction (toward the camera when frontal) and its eye line, rotated.
    forward = rot @ np.array([0.0, 0.0, -1.0])
    eye_line = rot @ np.array([1.0, 0.0, 0.0])
    yaw = math.degrees(math.atan2(forward[0], -forward[2]))
    pitch = math.degrees(math.atan2(-forward[1], math.hypot(forward[0], forward[2])))
    roll = math.degrees(math.atan2(eye_line[1], eye_line[0]))
    return Pose(round(yaw, 2), round(pitch, 2), round(roll, 2))


def _model_correspondences(pts: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(3D model points, their 2D image points) for 68 landmarks or 5 keypoints."""
    if pts.shape[0] == 5:
        return FACE_MODEL_3D_5, pts
    if pts.shape[0] != 68:
        raise ValueError(f"pose needs 68 landmarks or 5 keypoints, got {pts.shape[0]} points")
    w, h = image_size
    margin = POSE_EDGE_MARGIN * float(np.hypot(*(pts[45] - pts[36])))
    idx = [i for i in sorted(FACE_MODEL_3D)
           if margin <= pts[i, 0] <= w - 1 - margin and margin <= pts[i, 1] <= h - 1 - margin]
    if len(idx) < 6:  # a face mostly out of the frame: fit what there is
        idx = sorted(FACE_MODEL_3D)
    return np.array([FACE_MODEL_3D[i] for i in idx], dtype=np.float64), pts[idx]


def pose_from_landmarks(points: np.ndarray, image_size: tuple[int, int]) -> Pose:
    """Yaw/pitch/roll in degrees from 68 iBUG landmarks or 5 keypoints, relative to the line of
    sight to the face.

    The fit (``cv2.solvePnP``, SQPnP) uses a virtual camera looking straight at the face: its
    principal point is the centre of the fitted points and its focal length puts the face
    :data:`POSE_CAMERA_DISTANCE_MM` away (pixels per millimetre from the points' spread). So the
    pose depends on the face's own pixels only: moving, padding or cropping around a face leaves
    it unchanged, where a camera-axis pose (principal point at the image centre) shifted by the
    angle between the axis and the line of sight (up to 30 degrees at the corners of a wide
    frame). ``image_size`` (width, height) only decides which landmarks are too close to the frame
    edge to trust.
    """
    import cv2

    pts = np.asarray(points, dtype=np.float64)
    obj, img = _model_correspondences(pts, image_size)
    centre = img.mean(0)
    spread_px = float(np.sqrt(((img - centre) ** 2).sum(1).mean()))
    spread_mm = float(np.sqrt(((obj[:, :2] - obj[:, :2].mean(0)) ** 2).sum(1).mean()))
    if spread_px <= 0:
        return Pose(float("nan"), float("nan"), float("nan"))
    f = spread_px / spread_mm * POSE_CAMERA_DISTANCE_MM
    cam = np.array([[f, 0, centre[0]], [0, f, centre[1]], [0, 0, 1]], dtype=np.float64)
    ok, rvec, _tvec = cv2.solvePnP(obj, img.reshape(-1, 1, 2), cam, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return Pose(float("nan"), float("nan"), float("nan"))
    rot, _ = cv2.Rodrigues(rvec)
    return _angles_from_rotation(rot)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


#: The minimum :func:`identity_similarity` for "same person", per backend: the one place the
#: runner's identity thresholds live (analyze/curate, evaluate, storyboard and the video builder all
#: read ``backend.default_identity_threshold``). dlib's is calibrated on held-out faces (the video
#: clips' faces, which no test uses) at a false-accept rate of 0.1%:
#: bench/calibrate_identity/calibrate.py writes bench/calibrate_identity/dlib.json, and
#: tests/test_vision_identity_threshold.py keeps the two equal. insightface's is the usual ArcFace
#: operating point, not calibrated here (no model pack on this machine): run the same script with
#: ``--backend insightface`` where a pack is installed.
IDENTITY_THRESHOLDS: dict[str, float] = {"dlib": 0.92, "insightface": 0.35}
#: The lowest identity similarity at which a turned face (|yaw| >= 30) under the threshold may still
#: be taken for the person when its video track ties it to frames that passed the threshold
#: (runner.video.stability.mark_continuity_admissions): the held-out impostor pairs' median (a face
#: under it looks less like the person than the typical stranger does), written by the same
#: calibration (``profile_floor`` in bench/calibrate_identity/dlib.json). A backend without one
#: (insightface, not calibrated here) admits no face under its threshold.
PROFILE_FLOORS: dict[str, float] = {"dlib": 0.88}


class FaceBackend(ABC):
    """Detect faces and describe them (box, landmarks, pose, identity embedding)."""

    name: str = ""
    #: Names the embedding model and its version; embeddings from different models never mix.
    embedding_model: str = ""
    #: Default minimum :func:`identity_similarity` for "same person" on this backend's scale.
    default_identity_threshold: float = 0.5
    #: Which backend ``auto`` took and why (or just the backend's description).
    selection_note: str = ""

    def __init__(self, *, max_side: int | None = 1600) -> None:
        # Images are analyzed at most this size; coordinates are scaled back to the input.
        self.max_side = max_side

    def analyze(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image (HxWx3), largest first."""
        work, scale = self._work_image(rgb)
        faces = self._rescale(self._analyze(work), scale)
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def main_face_embeddings(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray | None, list[float] | None]]:
        """(identity embedding, box) of the main (largest) face of each RGB image, (None, None)
        where no face is found: what the identity metrics need. Same results as
        ``main_face(analyze(img))``; backends override it to describe only that face, and batch."""
        return [_embedding_and_box(main_face(self.analyze(rgb))) for rgb in images]

    def _work_image(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """The image to analyze (at most ``max_side``) and its scale from the input."""
        rgb = _as_rgb_uint8(rgb)
        h, w = rgb.shape[:2]
        if not self.max_side or max(h, w) <= self.max_side:
            return np.ascontiguousarray(rgb), 1.0
        import cv2

        scale = self.max_side / float(max(h, w))
        work = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(work), scale

    @staticmethod
    def _rescale(faces: list[Face], scale: float) -> list[Face]:
        """Coordinates of ``faces`` found in the work image, back in the input image."""
        if scale != 1.0:
            inv = 1.0 / scale
            for f in faces:
                f.box = tuple(float(v) * inv for v in f.box)  # type: ignore[assignment]
                f.keypoints = (f.keypoints * inv).astype(np.float32)
                if f.landmarks is not None:
                    f.landmarks = (f.landmarks * inv).astype(np.float32)
                if "landmarks_106" in f.extra:
                    f.extra["landmarks_106"] = [[round(x * inv, 1), round(y * inv, 1)]
                                                for x, y in f.extra["landmarks_106"]]
        return faces

    @abstractmethod
    def _analyze(self, rgb: np.ndarray) -> list[Face]: ...

    def describe(self) -> str:
        return f"{self.name} ({self.embedding_model})"


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return arr


def _face_recognition_models_dir() -> Path:
    """The models/ folder of face_recognition_models, found without importing pkg_resources."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            "the dlib face backend needs the face_recognition_models package",
            hint="pip install 'character-runner[faces]' (or: pip install face_recognition_models 'setuptools<81')",
        )
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not models.is_dir():  # unusual layout: ask the package itself (it imports pkg_resources)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import face_recognition_models as frm

        models = Path(frm.pose_predictor_model_location()).parent
    return models


def _crop_padded(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``rgb[y0:y1, x0:x1]``, padded with mid-grey where the window leaves the image."""
    h, w = rgb.shape[:2]
    out = np.full((y1 - y0, x1 - x0, 3), 128, np.uint8)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


#: Faces whose landmark box is smaller than this (px) get their landmarks fitted on a copy
#: upsampled to this size: at 44-53 px, landmarks on whole pixels put a 10 px eye's lids 2-3 px
#: apart in steps of a pixel, and a blink never reached the closed-eye ratio.
SMALL_FACE_PX = 100

#: Where dlib's 68-point mean shape sits in its unit face box: centroid (x, y) and RMS radius, in
#: box sides (read from shape_predictor_68_face_landmarks.dat by bench/pose_model/mean_shape.py).
MEAN_SHAPE_IN_BOX = (0.5, 0.566, 0.3523)


class DlibFaceBackend(FaceBackend):
    """dlib + face_recognition_models: HOG or CNN detector, 68 landmarks, 128-d descriptor."""

    name = "dlib"
    default_identity_threshold = IDENTITY_THRESHOLDS["dlib"]

    def __init__(self, *, detector: str = "hog", upsample: int = 1, max_side: int | None = 1600,
                 num_jitters: int = 0) -> None:
        super().__init__(max_side=max_side)
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StageError("the dlib face backend needs dlib",
                             hint="pip install 'character-runner[faces]' (dlib-bin)") from exc
        if detector not in ("hog", "cnn"):
            raise StageError(f"unknown dlib detector {detector!r}", hint="dataset.analysis.dlib_detector: hog or cnn")
        models = _face_recognition_models_dir()
        self.detector_kind = detector
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self._dlib = dlib
        self._cnn: Any = None  # analyze_cnn's detector, loaded on first use
        if detector == "cnn":
            self._detector = self._cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.embedding_model = f"dlib-{dlib.__version__}/dlib_face_recognition_resnet_model_v1"
        self.selection_note = f"dlib ({detector} detector, upsample {self.upsample})"

    def _detect(self, rgb: np.ndarray) -> list[tuple[Any, float]]:
        if self.detector_kind == "cnn":
            return [(d.rect, float(d.confidence)) for d in self._detector(rgb, self.upsample)]
        rects, scores, _ = self._detector.run(rgb, self.upsample, 0.0)
        return list(zip(rects, (float(s) for s in scores)))

    def analyze_cnn(self, rgb: np.ndarray, *, scale: float = 1.0) -> list[Face]:
        """Faces found by dlib's MMOD CNN detector (``mmod_human_face_detector.dat``), which finds
        profiles and turned heads that the HOG detector misses, searched on a copy of ``rgb``
        resized by ``scale`` (the CNN finds faces of about 80 px and more at its own scale, and its
        cost grows with the pixels: 640x360 takes about 2-4 s on one CPU core, 320x180 a quarter
        of that); landmarks and the descriptor are computed on ``rgb`` itself. Each face has
        ``extra["detector"] == "cnn"`` and the CNN's confidence as its score. The model is loaded
        on first use."""
        rgb = _as_rgb_uint8(rgb)
        if self._cnn is None:
            with _CACHE_LOCK:
                if self._cnn is None:
                    self._cnn = self._dlib.cnn_face_detection_model_v1(
                        str(_face_recognition_models_dir() / "mmod_human_face_detector.dat"))
        work = np.ascontiguousarray(rgb)
        if scale != 1.0:
            import cv2

            h, w = rgb.shape[:2]
            work = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        inv = 1.0 / scale
        rect = self._dlib.rectangle
        dets = [(rect(round(d.rect.left() * inv), round(d.rect.top() * inv), round((d.rect.right() + 1) * inv) - 1,
                      round((d.rect.bottom() + 1) * inv) - 1), float(d.confidence)) for d in self._cnn(work, 0)]
        faces = self._analyze(np.ascontiguousarray(rgb), dets=dets)
        for f in faces:
            f.extra["detector"] = "cnn"
        return faces

    def main_face_embeddings(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray | None, list[float] | None]]:
        out: list[tuple[np.ndarray | None, list[float] | None]] = []
        for rgb in images:
            work, scale = self._work_image(rgb)
            faces = self._rescale(self._analyze(work, main_only=True), scale)
            out.append(_embedding_and_box(faces[0] if faces else None))
        return out

    def _landmarks_and_descriptor(self, rgb: np.ndarray, rect: Any) -> tuple[np.ndarray, Any]:
        """68 landmarks and the identity descriptor of the face the detector boxed in ``rect``.

        The shape predictor runs twice: on the detector's box, then on the box that the first
        landmarks imply (:data:`MEAN_SHAPE_IN_BOX`). The detector's box moves in steps of its 8 px
        HOG cells, so the same face pixels at another place in the frame got another box and
        landmarks (up to 4 degrees of yaw); the second box follows the face.
        """
        lm = self._fit_shape(rgb, rect)[0]
        box = self._box_of_landmarks(lm)
        if box.width() >= SMALL_FACE_PX:
            lm, shape, padded = self._fit_shape(rgb, box)
            return lm, self._rec.compute_face_descriptor(padded, shape, self.num_jitters)
        # A small face: fit on an upsampled crop, so the eyelids and lips land between pixels.
        import cv2

        k = SMALL_FACE_PX / max(1.0, float(box.width()))
        m = box.width() // 2
        x0, y0 = box.left() - m, box.top() - m
        crop = _crop_padded(rgb, x0, y0, box.right() + m + 1, box.bottom() + m + 1)
        big = cv2.resize(crop, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC)
        r = self._dlib.rectangle(int(round(m * k)), int(round(m * k)), int(round((m + box.width()) * k)) - 1,
                                 int(round((m + box.height()) * k)) - 1)
        lm_big, shape, fitted = self._fit_shape(big, r)
        lm = (lm_big / k + np.array([x0, y0], dtype=np.float32)).astype(np.float32)
        return lm, self._rec.compute_face_descriptor(fitted, shape, self.num_jitters)

    def _box_of_landmarks(self, lm: np.ndarray) -> Any:
        cx, cy, rms = MEAN_SHAPE_IN_BOX
        centre = lm.mean(0)
        side = float(np.sqrt(((lm - centre) ** 2).sum(1).mean())) / rms
        x0, y0 = centre[0] - cx * side, centre[1] - cy * side
        return self._dlib.rectangle(int(round(x0)), int(round(y0)),
                                    int(round(x0 + side)) - 1, int(round(y0 + side)) - 1)

    def _fit_shape(self, rgb: np.ndarray, rect: Any) -> tuple[np.ndarray, Any, np.ndarray]:
        """(landmarks in ``rgb``, dlib shape, the image it was fitted on).

        A box that runs past the frame edge is fitted on a copy padded with mid-grey: the shape
        predictor reads pixels outside the image as black, which pulls the landmarks of a cut face
        toward the edge (obama_partial_02, cut through one eye, read yaw 19 degrees instead of 1).
        """
        h, w = rgb.shape[:2]
        pad = max(0, -rect.left(), -rect.top(), rect.right() + 1 - w, rect.bottom() + 1 - h)
        if pad:
            import cv2

            rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
            rect = self._dlib.rectangle(rect.left() + pad, rect.top() + pad, rect.right() + pad, rect.bottom() + pad)
        shape = self._shape(rgb, rect)
        lm = np.array([(p.x - pad, p.y - pad) for p in shape.parts()], dtype=np.float32)
        return lm, shape, rgb

    def _analyze(self, rgb: np.ndarray, main_only: bool = False,
                 dets: list[tuple[Any, float]] | None = None) -> list[Face]:
        h, w = rgb.shape[:2]
        faces: list[Face] = []
        dets = self._detect(rgb) if dets is None else dets
        if main_only and dets:  # the identity network (~90 % of the time) runs for the main face only
            boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r, _ in dets]
            dets = [dets[_largest(boxes)]]
        for rect, score in dets:
            lm, desc = self._landmarks_and_descriptor(rgb, rect)
            faces.append(
                Face(
                    box=(float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1)),
                    score=score,
                    keypoints=keypoints_from_68(lm),
                    pose=pose_from_landmarks(lm, (w, h)),
                    embedding=_l2n(np.array(desc)),
                    landmarks=lm,
                )
            )
        return faces


def insightface_pack_dir(pack: str, root: str | os.PathLike[str] = "~/.insightface") -> Path:
    """Where a pack is expected: ``pack`` itself when it is a folder path, else <root>/models/<pack>."""
    direct = Path(pack).expanduser()
    if direct.is_dir() or os.sep in str(pack) or (os.altsep and os.altsep in str(pack)):
        return direct
    return Path(root).expanduser() / "models" / pack


def _insightface_pack_ready(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.onnx"))


class InsightFaceBackend(FaceBackend):
    """insightface FaceAnalysis with a local model pack (never downloads)."""

    name = "insightface"
    default_identity_threshold = IDENTITY_THRESHOLDS["insightface"]

    def __init__(self, *, pack: str = "buffalo_l", root: str = "~/.insightface", providers: list[str] | None = None,
                 det_size: int = 640, det_thresh: float = 0.5, max_side: int | None = 1600) -> None:
        super().__init__(max_side=max_side)
        folder = insightface_pack_dir(pack, root)
        if not _insightface_pack_ready(folder):
            raise StageError(
                f"insightface model pack {pack!r} not found: no *.onnx files in {folder}",
                hint=(f"download the pack yourself and unzip it so that {folder}/*.onnx exists "
                      "(or set dataset.analysis.insightface_pack to a pack folder, or use backend: dlib); "
                      "the runner never downloads it"),
            )
        try:
            import onnxruntime as ort
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise StageError("the insightface backend needs insightface and onnxruntime",
                             hint="pip install onnxruntime && pip install --no-deps insightface") from exc
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        # Passing the folder path (not the pack name) is what keeps FaceAnalysis off its downloader.
        try:
            self._app = FaceAnalysis(name=str(folder.resolve()), providers=providers)
        except AssertionError:  # FaceAnalysis asserts that the pack has a detector
            raise StageError(f"insightface pack {folder} has no face detection model",
                             hint="a pack needs a detector (det_*.onnx) and a recognition model "
                                  "(w600k_*.onnx, glintr100.onnx)") from None
        except Exception as exc:
            raise StageError(f"insightface pack {folder} cannot be loaded: {type(exc).__name__}: {exc}",
                             hint="check the pack's .onnx files (re-download and unzip it), "
                                  "or use backend: dlib") from exc
        if "recognition" not in self._app.models:
            raise StageError(f"insightface pack {folder} has no recognition model: identity needs one",
                             hint="use a full pack such as buffalo_l or antelopev2")
        ctx_id = 0 if "CUDAExecutionProvider" in providers else -1
        self._app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))
        self.providers = list(providers)
        rec = self._app.models.get("recognition")
        rec_file = Path(getattr(rec, "model_file", "") or "none").name
        self.embedding_model = f"insightface/{folder.name}/{rec_file}"
        self.selection_note = f"insightface (pack {folder}, providers {', '.join(self.providers)})"

    def main_face_embeddings(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray | None, list[float] | None]]:
        """Detection per image, then the main faces' aligned crops through the recognition model
        in one batch (one at a time if the model's batch size is fixed); the pack's other models
        (landmarks, gender/age) are skipped, as the metrics do not use them."""
        from insightface.utils import face_align

        rec = self._app.models["recognition"]
        picks: list[tuple[list[float], np.ndarray] | None] = []
        for rgb in images:
            work, scale = self._work_image(rgb)
            bgr = np.ascontiguousarray(work[:, :, ::-1])
            bboxes, kpss = self._app.det_model.detect(bgr, max_num=0, metric="default")
            if bboxes.shape[0] == 0 or kpss is None:
                picks.append(None)
                continue
            i = _largest(bboxes[:, :4])
            crop = face_align.norm_crop(bgr, landmark=kpss[i], image_size=rec.input_size[0])
            inv = 1.0 / scale  # as _rescale does
            picks.append(([round(float(v) * inv, 1) for v in bboxes[i, :4]], crop))
        crops = [p[1] for p in picks if p is not None]
        batch = rec.session.get_inputs()[0].shape[0]
        if not crops:
            feats = np.zeros((0, 1), np.float32)
        elif isinstance(batch, int):  # a model exported with a fixed batch size
            feats = np.concatenate([rec.get_feat(c) for c in crops])
        else:
            feats = rec.get_feat(crops)
        rows = iter(feats)
        return [(None, None) if p is None else (_l2n(next(rows)), p[0]) for p in picks]

    def _analyze(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces: list[Face] = []
        for f in self._app.get(bgr):
            kps = np.asarray(f.kps, dtype=np.float32) if getattr(f, "kps", None) is not None else None
            lm68 = getattr(f, "landmark_3d_68", None)
            lm = np.asarray(lm68, dtype=np.float32)[:, :2] if lm68 is not None else None
            if kps is None and lm is not None:
                kps = keypoints_from_68(lm)
            if kps is None:
                continue
            emb = getattr(f, "normed_embedding", None)
            if emb is None:
                emb = np.zeros(512, dtype=np.float32)
            extra: dict[str, Any] = {}
            lm106 = getattr(f, "landmark_2d_106", None)
            if lm106 is not None:
                extra["landmarks_106"] = np.round(np.asarray(lm106, dtype=float), 1).tolist()
            for key in ("age", "sex"):
                val = getattr(f, key, None)
                if val is not None:
                    extra[key] = val if isinstance(val, str) else float(val)
            faces.append(
                Face(
                    box=tuple(float(v) for v in f.bbox[:4]),  # type: ignore[arg-type]
                    score=float(f.det_score),
                    keypoints=kps,
                    # Same PnP and convention as dlib (insightface's own pose uses another one).
                    pose=pose_from_landmarks(lm if lm is not None else kps, (w, h)),
                    embedding=_l2n(emb),
                    landmarks=lm,
                    extra=extra,
                )
            )
        return faces


_CACHE: dict[tuple[Any, ...], FaceBackend] = {}
_CACHE_LOCK = threading.Lock()


def get_face_backend(
    name: str = "auto",
    *,
    dlib_detector: str = "hog",
    upsample: int = 1,
    insightface_pack: str = "buffalo_l",
    insightface_root: str = "~/.insightface",
    providers: list[str] | None = None,
    det_size: int = 640,
    max_side: int | None = 1600,
    cache: bool = True,
) -> FaceBackend:
    """The face backend for ``name`` ("auto" | "dlib" | "insightface").

    ``auto`` takes insightface when its pack folder holds .onnx files and insightface imports,
    else dlib; ``backend.selection_note`` says which it took and why. Backends are cached per
    process (loading the models is the slow part) unless ``cache=False``.
    """
    key = (name, dlib_detector, upsample, insightface_pack, insightface_root, tuple(providers or ()),
           det_size, max_side)
    if cache:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
    backend = _make_backend(name, dlib_detector=dlib_detector, upsample=upsample,
                            insightface_pack=insightface_pack, insightface_root=insightface_root,
                            providers=providers, det_size=det_size, max_side=max_side)
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = backend
    return backend


def _make_backend(name: str, *, dlib_detector: str, upsample: int, insightface_pack: str, insightface_root: str,
                  providers: list[str] | None, det_size: int, max_side: int | None) -> FaceBackend:
    if name == "dlib":
        return DlibFaceBackend(detector=dlib_detector, upsample=upsample, max_side=max_side)
    if name == "insightface":
        return InsightFaceBackend(pack=insightface_pack, root=insightface_root, providers=providers,
                                  det_size=det_size, max_side=max_side)
    if name != "auto":
        raise StageError(f"unknown face backend {name!r}", hint="dataset.analysis.backend: auto, insightface or dlib")
    folder = insightface_pack_dir(insightface_pack, insightface_root)
    if _insightface_pack_ready(folder):
        if importlib.util.find_spec("insightface") is not None and importlib.util.find_spec("onnxruntime") is not None:
            backend: FaceBackend = InsightFaceBackend(pack=insightface_pack, root=insightface_root, providers=providers,
                                                      det_size=det_size, max_side=max_side)
            backend.selection_note = f"auto: took {backend.selection_note}"
            return backend
        reason = f"insightface pack found at {folder} but insightface/onnxruntime is not installed"
    else:
        reason = f"no insightface pack at {folder}"
    backend = DlibFaceBackend(detector=dlib_detector, upsample=upsample, max_side=max_side)
    backend.selection_note = f"auto: took {backend.selection_note} ({reason})"
    return backend
