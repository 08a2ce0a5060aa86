"""Body-pose control: COCO -> OpenPose keypoints, the OpenPose ControlNet drawing, rtmlib loading
of DWPose-style ONNX pairs (tiny graphs built here; no real weights can be downloaded), and the
storyboard's reference mode with control: pose on the tiny ControlNet.

Keypoints from the tiny random models are meaningless: the tests check the plumbing (files,
shapes, coordinates, records, labels), and the drawing with hand-written keypoints.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("rtmlib")
onnx = pytest.importorskip("onnx")

from runner.generate import pose as P  # noqa: E402
from runner.core import contract  # noqa: E402

# A person standing, arms out, in a 512 x 512 frame (COCO names -> pixels).
STANDING = {"nose": (256, 80), "left_eye": (266, 70), "right_eye": (246, 70), "left_ear": (280, 76),
            "right_ear": (232, 76), "left_shoulder": (310, 140), "right_shoulder": (202, 140),
            "left_elbow": (370, 170), "right_elbow": (142, 170), "left_wrist": (430, 190),
            "right_wrist": (82, 190), "left_hip": (290, 290), "right_hip": (222, 290), "left_knee": (296, 380),
            "right_knee": (216, 380), "left_ankle": (300, 470), "right_ankle": (212, 470)}


def coco_arrays(points: dict, k: int = 17, rng=None):
    kpts = np.zeros((k, 2))
    scores = np.full(k, 0.9)
    for i, name in enumerate(P.COCO_BODY):
        kpts[i] = points[name]
    if k == 133:
        rng = rng or np.random.default_rng(0)
        kpts[17:] = rng.uniform(20, 490, (116, 2))
    return kpts, scores


def person(points: dict = STANDING, scale: float = 1.0, **low) -> P.Person:
    kpts, scores = coco_arrays({k: (x * scale, y * scale) for k, (x, y) in points.items()})
    for name, s in low.items():
        scores[P.COCO_BODY.index(name)] = s
    return P.from_coco(kpts, scores)


@pytest.mark.parametrize("k", [17, 133])
def test_coco_keypoints_in_openpose_order(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(5):  # random people: every OpenPose keypoint is the COCO keypoint of its name
        pts = {name: tuple(rng.uniform(0, 500, 2)) for name in P.COCO_BODY}
        kpts, scores = coco_arrays(pts, k, rng)
        scores[:17] = rng.uniform(0, 1, 17)
        p = P.from_coco(kpts, scores)
        assert p.body.shape == (18, 3)
        for j, name in enumerate(P.OPENPOSE_BODY):
            if name == "neck":
                ls, rs = P.COCO_BODY.index("left_shoulder"), P.COCO_BODY.index("right_shoulder")
                assert np.allclose(p.body[j, :2], (kpts[ls] + kpts[rs]) / 2)
                assert p.body[j, 2] == min(scores[ls], scores[rs])
            else:
                i = P.COCO_BODY.index(name)
                assert np.allclose(p.body[j], [*kpts[i], scores[i]])
        if k == 133:  # the whole-body layout: face 23-90, left hand 91-111, right hand 112-132
            assert np.allclose(p.face[:, :2], kpts[23:91]) and np.allclose(p.hands[0, :, :2], kpts[91:112])
            assert np.allclose(p.hands[1, :, :2], kpts[112:133])
        else:
            assert p.hands is None and p.face is None
    with pytest.raises(ValueError, match="17 .* or 133"):
        P.from_coco(np.zeros((26, 2)), np.zeros(26))


def test_openpose_names_and_limbs_are_the_controlnet_ones() -> None:
    assert P.OPENPOSE_BODY[:2] == ("nose", "neck")
    assert P.OPENPOSE_BODY[14:] == ("right_eye", "left_eye", "right_ear", "left_ear")
    assert len(P.LIMBS) == 17 and len(P.COLORS) == 18
    assert P.LIMBS[0] == (1, 2) and P.LIMBS[12] == (1, 0) and P.LIMBS[16] == (15, 17)
    assert P.COLORS[0] == (255, 0, 0) and P.COLORS[12] == (0, 0, 255) and P.COLORS[17] == (255, 0, 85)


def _limb_point(p: P.Person, limb: int, t: float, off: float = 0.0) -> tuple[int, int]:
    a, b = P.LIMBS[limb]
    (x0, y0), (x1, y1) = p.body[a, :2], p.body[b, :2]
    n = math.hypot(x1 - x0, y1 - y0)
    return (round(x0 + (x1 - x0) * t - (y1 - y0) / n * off), round(y0 + (y1 - y0) * t + (x1 - x0) / n * off))


@pytest.mark.parametrize("size", [(512, 512), (768, 768), (256, 256)])
def test_draw_openpose_colours_widths_and_canvas(size) -> None:
    w, h = size
    p = person(scale=w / 512)
    img = P.draw_openpose([p], w, h)
    assert img.size == (w, h) and img.mode == "RGB"
    a = np.asarray(img).astype(int)
    assert (a.max(axis=2) == 0).mean() > 0.85  # black canvas, thin sticks
    k = w / 512
    for i in range(18):  # each keypoint: a disc in its own colour, at full strength
        x, y = p.body[i, :2].astype(int)
        assert tuple(a[y, x]) == P.COLORS[i], P.OPENPOSE_BODY[i]
    for i in range(17):  # each limb: its colour at 60%, about 4 px (at 512) either side of the bone
        mid = _limb_point(p, i, 0.5)
        if min(math.dist(mid, p.body[j, :2]) for j in range(18)) < 6 * k:
            continue  # a disc covers it
        assert np.abs(a[mid[1], mid[0]] - np.floor(np.array(P.COLORS[i]) * 0.6)).max() <= 1, i
        x, y = _limb_point(p, i, 0.5, 9 * k)
        assert a[y, x].max() == 0 or i in (0, 1), i  # outside the stick (shoulder sticks meet the neck)


def test_draw_openpose_leaves_out_unsure_keypoints_and_draws_several_people() -> None:
    p = person(left_wrist=0.2)
    a = np.asarray(P.draw_openpose([p], 512, 512)).astype(int)
    wrist = P.OPENPOSE_BODY.index("left_wrist")
    x, y = p.body[wrist, :2].astype(int)
    assert a[y, x].max() == 0  # score 0.2 < 0.3: neither the keypoint nor its limb
    elbow_limb = P.LIMBS.index((P.OPENPOSE_BODY.index("left_elbow"), wrist))
    x, y = _limb_point(p, elbow_limb, 0.5)
    assert a[y, x].max() == 0
    two = [person(scale=0.5), person(scale=0.5).transformed(1.0, 256, 256)]
    b = np.asarray(P.draw_openpose(two, 512, 512)).astype(int)
    for q in two:
        x, y = q.body[0, :2].astype(int)
        assert tuple(b[y, x]) == P.COLORS[0]
    assert P.draw_openpose([], 64, 48).getbbox() is None  # nobody: an all-black map


def test_draw_openpose_hands_and_face() -> None:
    kpts, scores = coco_arrays(STANDING, 133)
    kpts[91:112] = [(60 + 8 * (j % 5), 300 + 10 * (j // 5)) for j in range(21)]
    kpts[23:91] = [(220 + j, 110) for j in range(68)]
    p = P.from_coco(kpts, scores)
    body = np.asarray(P.draw_openpose([p], 512, 512, "body")).astype(int)
    full = np.asarray(P.draw_openpose([p], 512, 512, "body_hands_face")).astype(int)
    x, y = p.hands[0, 5, :2].astype(int)
    assert tuple(full[y, x]) == (0, 0, 255) and body[y, x].max() == 0  # hand joints: blue discs
    assert tuple(full[110, 230]) == (255, 255, 255) and body[110, 230].max() == 0  # face: white dots


def test_cover_transform_keeps_the_aspect_and_centres() -> None:
    for src, dst in [((1000, 500), (512, 512)), ((300, 900), (768, 512)), ((640, 480), (640, 480))]:
        s, dx, dy = P.cover_transform(src, dst)
        assert s == max(dst[0] / src[0], dst[1] / src[1])
        assert math.isclose(src[0] / 2 * s + dx, dst[0] / 2) and math.isclose(src[1] / 2 * s + dy, dst[1] / 2)
        assert dx <= 0 and dy <= 0


def test_looks_like_map(shared_data: Path) -> None:
    assert P.looks_like_map(P.draw_openpose([person()], 512, 512))
    for rel in ("faces/obama/obama_03.jpg", "faces/obama/obama_01.jpg"):
        assert not P.looks_like_map(Image.open(shared_data / rel))


# --------------------------------------------------------------------------- loading and detection


def constant_estimator(path: Path, k: int = 17, h: int = 64, w: int = 48) -> np.ndarray:
    """A SimCC model whose keypoint j peaks at x-bin 4 + 5 j (a known COCO order) whatever the input."""
    from onnx import TensorProto, helper, numpy_helper

    peaks_x = (4 + 5 * np.arange(k)) % (2 * w)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=1),  # (1, 1, 1, 1)
             helper.make_node("Reshape", ["m", "shape"], ["m3"]),
             helper.make_node("Mul", ["m3", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero")]
    outs = []
    for axis, n, peaks in (("x", 2 * w, peaks_x), ("y", 2 * h, np.full(k, h))):
        c = np.zeros((1, k, n), np.float32)
        c[0, np.arange(k), peaks] = 1.0
        inits.append(numpy_helper.from_array(c, f"c{axis}"))
        nodes.append(helper.make_node("Add", [f"c{axis}", "z"], [f"simcc_{axis}"]))
        outs.append(helper.make_tensor_value_info(f"simcc_{axis}", TensorProto.FLOAT, [1, k, n]))
    P._save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])], outs, inits)
    return peaks_x


def test_detector_reads_sizes_from_the_graphs_and_maps_to_openpose(tmp_path: Path) -> None:
    peaks = constant_estimator(tmp_path / "body.onnx")
    det = P.load_pose_detector(str(tmp_path), detector_file=None, estimator_file="body.onnx")
    assert det.keypoints == 17 and det.estimator.model_input_size == (48, 64) and not det.tiny_random
    rgb = np.zeros((200, 150, 3), np.uint8)
    (p,) = det.detect(rgb)
    assert p.body.shape == (18, 3) and p.hands is None
    xs = {name: p.body[j, 0] for j, name in enumerate(P.OPENPOSE_BODY)}
    # COCO keypoint j sits at x-bin 4 + 5 j: the OpenPose keypoints keep that order by name.
    order = sorted((n for n in P.COCO_BODY), key=lambda n: xs[n])
    assert order == list(P.COCO_BODY)
    assert np.all(p.body[:, 2] > P.THRESHOLD) and len(set(peaks)) == 17
    assert math.isclose(xs["neck"], (xs["left_shoulder"] + xs["right_shoulder"]) / 2)


def test_tiny_dwpose_on_a_real_photo(tmp_path: Path, shared_data: Path) -> None:
    """builtin:tiny-dwpose has DWPose's files and interfaces; its keypoints are meaningless."""
    det = P.load_pose_detector("builtin:tiny-dwpose", detector_file="yolox_l.onnx",
                               estimator_file="dw-ll_ucoco_384.onnx", cache_dir=tmp_path)
    assert det.tiny_random and det.keypoints == 133
    folder = P.tiny_pose_path("builtin:tiny-dwpose", tmp_path)
    assert {"yolox_l.onnx", "dw-ll_ucoco_384.onnx", "TINY_RANDOM_MODEL.txt"} <= {f.name for f in folder.iterdir()}
    photo = np.asarray(Image.open(shared_data / "faces" / "obama" / "obama_03.jpg").convert("RGB"))
    people = det.detect(photo)
    assert 1 <= len(people) <= 4
    for p in people:
        assert p.body.shape == (18, 3) and p.hands.shape == (2, 21, 3) and p.face.shape == (68, 3)
        assert np.isfinite(p.body).all()
    # the same folder as a local path: the marker file still says tiny random
    assert P.load_pose_detector(str(folder), detector_file="yolox_l.onnx",
                                estimator_file="dw-ll_ucoco_384.onnx").tiny_random


def test_pose_model_errors(tmp_path: Path, monkeypatch) -> None:
    constant_estimator(tmp_path / "body.onnx")
    with pytest.raises(contract.StageError, match="has no yolox_l.onnx") as e:
        P.load_pose_detector(str(tmp_path), detector_file="yolox_l.onnx", estimator_file="body.onnx")
    assert "body.onnx" in e.value.hint
    constant_estimator(tmp_path / "k26.onnx", k=26)
    with pytest.raises(contract.StageError, match="K = 17 .* or 133"):
        P.load_pose_detector(str(tmp_path), detector_file=None, estimator_file="k26.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(contract.StageError, match="cannot load the pose models"):
        P.load_pose_detector(str(tmp_path), detector_file=None, estimator_file="bad.onnx")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(contract.StageError, match="pose_model: model 'someone/no-such-pose'"):
        P.load_pose_detector("someone/no-such-pose", detector_file="a.onnx", estimator_file="b.onnx")


def test_pose_model_from_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    """A hub id loads from the cached snapshot when the hub cannot be reached, and otherwise
    downloads only the two files named by the spec."""
    import huggingface_hub

    import runner.hub as H

    snap = tmp_path / "snapshot"
    snap.mkdir()
    constant_estimator(snap / "pose.onnx")
    monkeypatch.setattr(H, "offline_reason", lambda: "HF_HUB_OFFLINE is set")
    monkeypatch.setattr(H, "cached_snapshot", lambda ref: str(snap) if ref == "org/pose" else None)
    det = P.load_pose_detector("org/pose", detector_file=None, estimator_file="pose.onnx")
    assert det.ref == "org/pose" and det.keypoints == 17
    asked = []

    def download(ref, allow_patterns=None, **kw):
        asked.append((ref, allow_patterns))
        return str(snap)

    monkeypatch.setattr(H, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert P.pose_model_folder("org/pose", ["det.onnx", "pose.onnx"]) == snap
    assert asked == [("org/pose", ["det.onnx", "pose.onnx"])]
    with pytest.raises(contract.StageError, match="neither a folder nor a hub id"):
        P.pose_model_folder("no/such/folder/x", ["a.onnx"])


# --------------------------------------------------------------------------- the storyboard


@pytest.mark.slow  # about 9 s
def test_storyboard_pose_control_on_the_tiny_controlnet(tmp_path: Path, shared_data: Path) -> None:
    """control: pose: frame 1's body pose (tiny DWPose) -> the tiny ControlNet for frames 2+; a
    scene's map is used as is, a scene's photo goes through the detector; all labelled tiny."""
    from test_storyboard import Graph, _node, inputs_for, make_lora, spec

    from runner.backends.context import LocalStageContext
    from runner.stages import storyboard as SB

    proj = tmp_path / "proj"
    (proj / "refs").mkdir(parents=True)
    shutil.copy(shared_data / "faces" / "obama" / "obama_01.jpg", proj / "refs")
    from runner.paths import cache_root

    cache = cache_root()  # the session's model cache: tiny models built once for every test
    make_lora(proj / "lora", cache)
    (proj / "maps").mkdir()
    P.draw_openpose([person(scale=0.125)], 64, 64).save(proj / "maps" / "pose.png")
    shutil.copy(shared_data / "faces" / "obama" / "obama_03.jpg", proj / "maps" / "photo.jpg")
    s = spec(validation={"face_similarity": None, "clip_i": None, "retries": 0},
             reference_guided={"enabled": True, "controlnet": "builtin:tiny-controlnet", "control": "pose",
                               "pose_model": "builtin:tiny-dwpose", "pose_detector_file": "yolox_l.onnx",
                               "pose_estimator_file": "dw-ll_ucoco_384.onnx", "pose_parts": "body_hands"})
    s["generate"]["storyboard"]["scenes"][1]["control_image"] = "maps/pose.png"
    s["generate"]["storyboard"]["scenes"][2]["control_image"] = "maps/photo.jpg"
    node = SB.expand(s, Graph(proj, [_node("train")]))[0]
    assert node.config["reference_guided"]["pose_model"] == "builtin:tiny-dwpose"
    canny = dict(s["generate"]["storyboard"]["reference_guided"], control="canny")
    s2 = json.loads(json.dumps(s))
    s2["generate"]["storyboard"]["reference_guided"] = canny
    assert "pose_model" not in SB.expand(s2, Graph(proj, [_node("train")]))[0].config["reference_guided"]
    ctx = LocalStageContext.for_folder(tmp_path / "run", stage_id=node.id, character="demo", project_root=proj)
    ctx.cache_dir = cache
    inputs = inputs_for(proj, node)
    for i in (2, 3):
        ref = node.inputs[f"control{i}"]
        inputs[f"control{i}"] = contract.Artifact(f"control{i}", ref.root, files=(ref.root,))
    out = SB.run(node.config, inputs, ctx)
    folder = out["storyboard"].path
    rep = json.loads((folder / "report.json").read_text())
    cm = rep["reference_guided"]["control_maps"]
    assert cm["kind"] == "pose" and cm["size"] == [64, 64]
    assert cm["pose"]["tiny_random"] and "meaningless" in cm["pose"]["note"] and cm["pose"]["keypoints"] == 133
    assert cm["maps"]["frame 1"]["made"] == "pose"
    assert cm["maps"]["maps/pose.png"] == {"from": "map", "made": "used as is"}
    assert cm["maps"]["maps/photo.jpg"]["from"] == "photo" and cm["maps"]["maps/photo.jpg"]["made"] == "pose"
    assert rep["tiny_random"]["pose"] and rep["tiny_random"]["any"]
    assert Image.open(folder / "control" / "reference_control.png").size == (64, 64)
    sections = SB.report_sections(node.config, out, {})
    assert "pose" in sections[0].context["tiny_note"]
