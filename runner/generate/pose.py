"""Body pose for ControlNet-OpenPose: keypoints from a photo, drawn the way OpenPose ControlNets
were trained to read them.

Detection is DWPose / RTMPose through rtmlib (ONNX Runtime, no mmcv): a YOLOX person detector
(``pose_detector_file``) finds people, a top-down SimCC pose model (``pose_estimator_file``) gives
each one's keypoints. The default, ``yzd-v/DWPose``, is the pair ControlNet's own DWPose
annotator uses: ``yolox_l.onnx`` (1x3x640x640 -> 1x8400x85) and ``dw-ll_ucoco_384.onnx``
(1x3x384x288 -> simcc_x 1x133x576, simcc_y 1x133x768). The input sizes are read from the ONNX
graphs, so any RTMPose body (17 COCO keypoints) or whole-body (133 COCO-WholeBody keypoints)
export works; ``pose_detector_file: null`` skips detection and takes the whole image as one person.
rtmlib is fed BGR, as ControlNet's DWPose annotator feeds it.

Drawing (:func:`draw_openpose`) follows the OpenPose ControlNet format: a black canvas at the
generation size; the 18 OpenPose body keypoints (COCO's 17 reordered, plus the neck at the
shoulders' midpoint, scored as the weaker shoulder); a keypoint counts when its score is above
0.3; 17 limbs as filled ellipses, limb *i* in colour *i* of the OpenPose palette, then the whole
canvas dimmed to 60%; then every keypoint as a filled disc in its own colour. Stick half-width
and disc radius are 4 px at 512 px (the annotators' detection resolution) and scale with the
shorter side. Optional parts (``pose_parts``): hands (21 points each; 20 bones coloured round the
hue circle, 2 px at 512, blue joints) and face (68 white dots, radius 3 at 512).

``builtin:tiny-dwpose`` is a pair of tiny random ONNX graphs with DWPose's interfaces (built
from code, for tests and the demo): its keypoints are meaningless, and everything that shows
them says so.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner.core.errors import StageError

KEY = "generate.storyboard.reference_guided.pose_model"
THRESHOLD = 0.3  # the annotators' visibility threshold on keypoint scores

OPENPOSE_BODY = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
                 "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
                 "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear")
COCO_BODY = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
             "left_knee", "right_knee", "left_ankle", "right_ankle")
# The 17 limbs OpenPose ControlNets draw, in drawing (= colour) order.
LIMBS = tuple((OPENPOSE_BODY.index(a), OPENPOSE_BODY.index(b)) for a, b in (
    ("neck", "right_shoulder"), ("neck", "left_shoulder"), ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("neck", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
    ("neck", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("neck", "nose"),
    ("nose", "right_eye"), ("right_eye", "right_ear"), ("nose", "left_eye"), ("left_eye", "left_ear")))
# The OpenPose palette (RGB), one colour per limb and per keypoint.
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
          (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
          (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
# Hand bones: wrist -> each finger's four joints.
HAND_BONES = tuple(pair for f in range(5) for pair in ((0, 4 * f + 1), (4 * f + 1, 4 * f + 2),
                                                       (4 * f + 2, 4 * f + 3), (4 * f + 3, 4 * f + 4)))
PARTS = {"body": (), "body_hands": ("hands",), "body_hands_face": ("hands", "face")}
# COCO-WholeBody (133): body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132.
_FACE, _LEFT_HAND, _RIGHT_HAND = slice(23, 91), slice(91, 112), slice(112, 133)


@dataclass
class Person:
    """One person's keypoints in pixels, each row ``(x, y, score)``."""

    body: np.ndarray  # (18, 3), OpenPose order
    hands: np.ndarray | None = None  # (2, 21, 3): left, right
    face: np.ndarray | None = None  # (68, 3)

    def visible(self) -> int:
        return int((self.body[:, 2] > THRESHOLD).sum())

    def transformed(self, scale: float, dx: float, dy: float) -> Person:
        def move(a):
            if a is None:
                return None
            b = a.copy()
            b[..., 0] = b[..., 0] * scale + dx
            b[..., 1] = b[..., 1] * scale + dy
            return b
        return Person(move(self.body), move(self.hands), move(self.face))


def from_coco(keypoints: np.ndarray, scores: np.ndarray) -> Person:
    """One person from COCO-17 or COCO-WholeBody-133 keypoints ``(K, 2)`` and scores ``(K,)``."""
    k = len(keypoints)
    if k not in (17, 133):
        raise ValueError(f"expected 17 (COCO body) or 133 (COCO-WholeBody) keypoints, got {k}")
    pts = np.concatenate([np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)[:, None]], axis=1)
    coco = {name: pts[i] for i, name in enumerate(COCO_BODY)}
    ls, rs = coco["left_shoulder"], coco["right_shoulder"]
    coco["neck"] = np.array([(ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2])])
    body = np.stack([coco[name] for name in OPENPOSE_BODY])
    if k == 17:
        return Person(body)
    return Person(body, np.stack([pts[_LEFT_HAND], pts[_RIGHT_HAND]]), pts[_FACE].copy())


def cover_transform(src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float, float]:
    """(scale, dx, dy) that fits an image of size ``src`` (w, h) over ``dst`` (w, h), centred and
    cropped (keeps the aspect ratio; what a resize-then-centre-crop does to the photo)."""
    s = max(dst[0] / src[0], dst[1] / src[1])
    return s, (dst[0] - src[0] * s) / 2, (dst[1] - src[1] * s) / 2


def _sizes(width: int, height: int) -> tuple[int, int, int, int]:
    k = min(width, height) / 512
    return (max(1, round(4 * k)), max(1, round(4 * k)), max(1, round(2 * k)), max(1, round(3 * k)))


def draw_openpose(people: list[Person], width: int, height: int, parts: str = "body"):
    """The OpenPose control image (PIL RGB, ``width`` x ``height``) of ``people`` (module docstring)."""
    import cv2
    from PIL import Image

    stick, radius, bone, dot = _sizes(width, height)
    canvas = np.zeros((height, width, 3), np.uint8)
    for i, (a, b) in enumerate(LIMBS):
        for p in people:
            if p.body[a, 2] <= THRESHOLD or p.body[b, 2] <= THRESHOLD:
                continue
            (x0, y0), (x1, y1) = p.body[a, :2], p.body[b, :2]
            half = int(math.hypot(x1 - x0, y1 - y0) / 2)
            angle = int(math.degrees(math.atan2(y1 - y0, x1 - x0)))
            poly = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (half, stick), angle, 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(len(OPENPOSE_BODY)):
        for p in people:
            if p.body[i, 2] > THRESHOLD:
                cv2.circle(canvas, (int(p.body[i, 0]), int(p.body[i, 1])), radius, COLORS[i], thickness=-1)
    wanted = PARTS[parts]
    for p in people:
        if "hands" in wanted and p.hands is not None:
            for hand in p.hands:
                _draw_hand(canvas, hand, bone, radius)
        if "face" in wanted and p.face is not None:
            for x, y, s in p.face:
                if s > THRESHOLD:
                    cv2.circle(canvas, (int(x), int(y)), dot, (255, 255, 255), thickness=-1)
    return Image.fromarray(canvas)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, bone: int, radius: int) -> None:
    import cv2

    for e, (a, b) in enumerate(HAND_BONES):
        if hand[a, 2] > THRESHOLD and hand[b, 2] > THRESHOLD:
            color = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(e / len(HAND_BONES), 1.0, 1.0))
            cv2.line(canvas, (int(hand[a, 0]), int(hand[a, 1])), (int(hand[b, 0]), int(hand[b, 1])), color,
                     thickness=bone)
    for x, y, s in hand:
        if s > THRESHOLD:
            cv2.circle(canvas, (int(x), int(y)), radius, (0, 0, 255), thickness=-1)


def looks_like_map(image, black_share: float = 0.6) -> bool:
    """A user-given control image that is mostly black (at least ``black_share`` of its pixels
    have every channel below 16) is a control map (pose or edges) and is used as is; anything
    else is a photo, whose map is extracted."""
    rgb = np.asarray(image.convert("RGB"))
    return float((rgb.max(axis=2) < 16).mean()) >= black_share


# --------------------------------------------------------------------------- the detector


class PoseDetector:
    """rtmlib's YOLOX + RTMPose on two ONNX files; ``detect(rgb)`` -> people (pixels of ``rgb``)."""

    def __init__(self, folder: Path, detector_file: str | None, estimator_file: str, *, device: str = "cpu",
                 ref: str = "", tiny_random: bool = False) -> None:
        import onnxruntime as ort

        self.ref, self.tiny_random = ref or str(folder), tiny_random
        run_on = ("cuda" if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
                  else "cpu")
        det_path = _model_file(folder, detector_file, "pose_detector_file") if detector_file else None
        est_path = _model_file(folder, estimator_file, "pose_estimator_file")
        try:
            self.detector, self.estimator = _load_rtmlib(det_path, est_path, run_on)
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise StageError(f"{KEY}: cannot load the pose models in {folder}: {type(exc).__name__}: {exc}",
                             hint="Give DWPose / RTMPose ONNX exports (a YOLOX detector with one 1x3xHxW input, "
                                  "a SimCC pose model with simcc_x and simcc_y outputs).") from None
        self.keypoints = _check_estimator(self.estimator, est_path)

    def detect(self, rgb: np.ndarray) -> list[Person]:
        bgr = np.ascontiguousarray(np.asarray(rgb)[..., ::-1])
        boxes: Any = []
        if self.detector is not None:
            boxes, classes = self.detector(bgr)
            boxes = [box for box, c in zip(boxes, classes) if int(c) == 0]  # COCO class 0: person
            if not boxes:
                return []  # nobody found: rtmlib would take the whole image as one person
        kpts, scores = self.estimator(bgr, bboxes=boxes)
        return [from_coco(k, s) for k, s in zip(kpts, scores)]


def _load_rtmlib(det_path: Path | None, est_path: Path, device: str):
    from rtmlib import YOLOX, RTMPose

    with contextlib.redirect_stdout(io.StringIO()):  # rtmlib prints "load ... with onnxruntime backend"
        det = None
        if det_path is not None:
            det = YOLOX(str(det_path), det_mode="multiclass", backend="onnxruntime", device=device)
            h, w = _input_hw(det.session, det_path)
            det.model_input_size = (h, w)  # YOLOX reads (height, width)
        est = RTMPose(str(est_path), backend="onnxruntime", device=device)
        h, w = _input_hw(est.session, est_path)
        est.model_input_size = (w, h)  # RTMPose reads (width, height)
    return det, est


def _input_hw(session, path: Path) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise StageError(f"{KEY}: {path.name} has input shape {shape}; a fixed 1x3xHxW input is needed",
                         hint="Export the ONNX model with a static input size (DWPose and rtmlib's exports have one).")
    return int(shape[2]), int(shape[3])


def _check_estimator(est, path: Path) -> int:
    outs = est.session.get_outputs()
    k = outs[0].shape[1] if len(outs) == 2 and len(outs[0].shape) == 3 else None
    if k not in (17, 133):
        raise StageError(f"{KEY}: {path.name} gives outputs {[(o.name, o.shape) for o in outs]}; expected SimCC "
                         "simcc_x (1, K, Wx) and simcc_y (1, K, Wy) with K = 17 (COCO body) or 133 (COCO-WholeBody)",
                         hint="Use a DWPose (dw-ll_ucoco_384.onnx), RTMW or RTMPose body export.")
    return int(k)


def _model_file(folder: Path, name: str, key: str) -> Path:
    p = folder / name
    if not p.is_file():
        have = sorted(q.name for q in folder.glob("*.onnx"))
        raise StageError(f"{KEY}: {folder} has no {name} (reference_guided.{key})",
                         hint=f"ONNX files there: {', '.join(have) or 'none'}; "
                              f"set reference_guided.{key} to one of them.")
    return p


def load_pose_detector(ref: str, *, detector_file: str | None, estimator_file: str, device: str = "cpu",
                       project_root: Path | None = None, cache_dir: Path | None = None) -> PoseDetector:
    """The detector for ``pose_model`` ``ref``: ``builtin:tiny-dwpose``, a local folder or a hub id."""
    files = [f for f in (detector_file, estimator_file) if f]
    folder = pose_model_folder(ref, files, project_root, cache_dir)
    return PoseDetector(folder, detector_file, estimator_file, device=device, ref=ref,
                        tiny_random=ref.startswith("builtin:") or (folder / "TINY_RANDOM_MODEL.txt").is_file())


def pose_model_folder(ref: str, files: list[str], project_root: Path | None = None,
                      cache_dir: Path | None = None) -> Path:
    if ref.startswith("builtin:"):
        return tiny_pose_path(ref, cache_dir)
    p = Path(ref).expanduser()
    if not p.is_absolute() and project_root is not None:
        p = project_root / p
    if p.is_dir():
        return p
    from runner.hub import ModelUnavailable, is_hub_id, resolve_hub_model

    if not is_hub_id(ref, project_root):
        raise StageError(f"{KEY}: {ref!r} is neither a folder nor a hub id",
                         hint="Give a folder holding the two ONNX files, a hub id (yzd-v/DWPose) "
                              "or builtin:tiny-dwpose.")
    try:
        where = resolve_hub_model(ref, key=KEY)
    except ModelUnavailable as exc:
        raise StageError(f"{KEY}: {exc}", hint=exc.hint) from None
    if where != ref:
        return Path(where)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=files))
    except Exception as exc:  # the hub client's errors (missing repo, network) have many types
        raise StageError(f"{KEY}: cannot download {ref!r}: {type(exc).__name__}: {exc}",
                         hint="Check the id, or download the files and point pose_model at their folder.") from None


# --------------------------------------------------------------------------- tiny built-in

TINY_POSE_VERSION = 2
TINY_POSE_FILES = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")  # the names of yzd-v/DWPose's files


def tiny_pose_path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Build once and return ``builtin:tiny-dwpose``: random ONNX graphs with DWPose's interfaces
    (detector 1x3x64x64 -> 1x84x85; pose 1x3x64x48 -> simcc 1x133x96 / 1x133x128)."""
    from runner.diffusion.tiny import models_cache_dir
    from runner.generate.builtins import build_once

    if name.removeprefix("builtin:") != "tiny-dwpose":
        raise StageError(f"{KEY}: unknown builtin model {name}",
                         hint="Use builtin:tiny-dwpose, a hub id (yzd-v/DWPose) or a folder.")
    final = models_cache_dir(cache_dir) / f"builtin-tiny-dwpose-v{TINY_POSE_VERSION}"
    if (final / "DONE").is_file():
        return final

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(13)
        _tiny_detector(tmp / TINY_POSE_FILES[0], rng)
        _tiny_estimator(tmp / TINY_POSE_FILES[1], rng)

    return build_once(final, build, f"builtin:tiny-dwpose v{TINY_POSE_VERSION}: random ONNX graphs with DWPose's "
                      "inputs and outputs, built by character-runner; its keypoints are meaningless.")


def _save(path: Path, nodes, inputs, outputs, inits) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _tiny_detector(path: Path, rng, side: int = 64) -> None:
    """YOLOX's raw head layout: per anchor (stride 8, 16, 32) x, y, w, h, objectness, 80 classes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, rows = [], [], []
    for s in (8, 16, 32):
        live = s == 32  # only the coarsest level fires, and only for class 0 (person): a few boxes
        w = np.zeros((85, 3, 1, 1), np.float32)
        w[:4] = rng.standard_normal((4, 3, 1, 1)) * 0.002  # the boxes depend on the image's colours
        b = np.full(85, -10.0, np.float32)
        b[:4] = 0.0
        b[4:6] = 6.0 if live else -10.0
        inits += [numpy_helper.from_array(w, f"w{s}"), numpy_helper.from_array(b, f"b{s}"),
                  numpy_helper.from_array(np.array([1, 85, -1], np.int64), f"r{s}")]
        nodes += [helper.make_node("AveragePool", ["images"], [f"p{s}"], kernel_shape=[s, s], strides=[s, s]),
                  helper.make_node("Conv", [f"p{s}", f"w{s}", f"b{s}"], [f"c{s}"]),
                  helper.make_node("Reshape", [f"c{s}", f"r{s}"], [f"f{s}"]),
                  helper.make_node("Transpose", [f"f{s}"], [f"t{s}"], perm=[0, 2, 1])]
        rows.append(f"t{s}")
    nodes += [helper.make_node("Concat", rows, ["cat"], axis=1), helper.make_node("Sigmoid", ["cat"], ["output"])]
    n = sum((side // s) ** 2 for s in (8, 16, 32))
    _save(path, nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, side, side])],
          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n, 85])], inits)


def _tiny_estimator(path: Path, rng, k: int = 133, h: int = 64, w: int = 48) -> None:
    """SimCC head layout: a random projection of the crop's mean colour onto 2W x-bins and 2H y-bins."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]), helper.make_node("Flatten", ["g"], ["v"])]
    inits, outputs = [], []
    for axis, bins in (("x", 2 * w), ("y", 2 * h)):
        m = rng.standard_normal((3, k * bins)).astype(np.float32)
        inits += [numpy_helper.from_array(m, f"m{axis}"),
                  numpy_helper.from_array(np.array([1, k, bins], np.int64), f"s{axis}")]
        nodes += [helper.make_node("MatMul", ["v", f"m{axis}"], [f"l{axis}"]),
                  helper.make_node("Reshape", [f"l{axis}", f"s{axis}"], [f"simcc_{axis}"])]
        outputs.append(helper.make_tensor_value_info(f"simcc_{axis}", TensorProto.FLOAT, [1, k, bins]))
    _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])], outputs, inits)
