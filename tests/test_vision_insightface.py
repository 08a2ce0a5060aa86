"""The insightface backend against a synthetic model pack built here with onnx.helper.

No real pack can be downloaded on this machine, so the pack is two hand-made ONNX graphs with
the interfaces insightface's model zoo recognizes: an SCRFD-style detector (9 outputs: scores,
box distances and 5 keypoints at strides 8/16/32; it "detects" bright squares) and an
ArcFace-style 112x112 -> 512 embedder (a fixed random projection). This checks our wrapper
(pack lookup, no download, BGR input, keypoints, pose from 5 points, normalized embeddings,
`auto` selection), not face recognition quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("insightface")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from runner.vision.faces import get_face_backend, identity_similarity  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface's use of skimage

KPS = [(-0.7, -0.5), (0.7, -0.5), (0.0, 0.1), (-0.5, 0.8), (0.5, 0.8)]  # in units of the stride


def _const(name: str, arr: np.ndarray):
    return numpy_helper.from_array(arr.astype(np.float32), name)


def fake_detector(path: Path) -> None:
    nodes, inits, outputs = [], [], []
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])
    heads = {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        live = s == 32  # only the coarsest level fires, so one square gives one face after NMS
        specs = {
            "score": (2, np.full((2, 3, 1, 1), 20.0 / 3 if live else 0.0), np.full(2, -10.0 if live else -30.0)),
            "bbox": (8, np.zeros((8, 3, 1, 1)), np.full(8, 4.0)),
            "kps": (20, np.zeros((20, 3, 1, 1)), np.array([v for _ in range(2) for p in KPS for v in p])),
        }
        for head, (_ch, w, b) in specs.items():
            inits += [_const(f"w_{head}{s}", w), _const(f"b_{head}{s}", b)]
            conv_out = f"conv_{head}{s}"
            nodes.append(helper.make_node("Conv", [f"pool{s}", f"w_{head}{s}", f"b_{head}{s}"], [conv_out]))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [conv_out], [f"sig{s}"]))
                conv_out = f"sig{s}"
            nodes.append(helper.make_node("Transpose", [conv_out], [f"t_{head}{s}"], perm=[0, 2, 3, 1]))
            width = {"score": 1, "bbox": 4, "kps": 10}[head]
            inits.append(numpy_helper.from_array(np.array([-1, width], dtype=np.int64), f"shape_{head}{s}"))
            nodes.append(helper.make_node("Reshape", [f"t_{head}{s}", f"shape_{head}{s}"], [f"{head}_{s}"]))
            heads[head].append(helper.make_tensor_value_info(f"{head}_{s}", TensorProto.FLOAT, ["n", width]))
    outputs = heads["score"] + heads["bbox"] + heads["kps"]
    graph = helper.make_graph(nodes, "fake_scrfd", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def fake_embedder(path: Path, batch: int | str = 1) -> None:
    """An ArcFace-shaped embedder; ``batch`` 1 (fixed) or a name (dynamic, as the real packs)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 112, 112])
    y = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 512])
    nodes = [
        helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[16, 16], strides=[16, 16], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "proj"], ["fc1"], name="proj"),
    ]
    graph = helper.make_graph(nodes, "fake_arcface", [x], [y], [_const("proj", rng.normal(size=(147, 512)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    pack = root / "models" / "fakepack"
    pack.mkdir(parents=True)
    fake_detector(pack / "det_fake.onnx")
    fake_embedder(pack / "w600k_fake.onnx")
    return root


def scene(x0: int, y0: int, texture: int = 0) -> np.ndarray:
    img = np.zeros((480, 640, 3), np.uint8)
    img[y0:y0 + 64, x0:x0 + 64] = 255  # 2x2 cells at stride 32: one face after NMS
    if texture:
        img[y0 + 8:y0 + 56:texture, x0 + 8:x0 + 56] = (255, 0, 0)  # stripes change the embedding
    return img


def test_insightface_backend_with_a_local_pack(pack_root: Path) -> None:
    backend = get_face_backend("insightface", insightface_pack="fakepack", insightface_root=str(pack_root),
                               providers=["CPUExecutionProvider"], cache=False)
    assert backend.name == "insightface" and "fakepack" in backend.embedding_model
    assert backend.default_identity_threshold == 0.35
    faces = backend.analyze(scene(256, 192))
    assert len(faces) == 1
    f = faces[0]
    cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
    assert abs(cx - 288) <= 32 and abs(cy - 224) <= 32  # centred on the square, at stride-32 precision
    assert f.keypoints.shape == (5, 2) and f.landmarks is None
    assert f.embedding.shape == (512,) and abs(float(np.linalg.norm(f.embedding)) - 1) < 1e-5
    assert all(np.isfinite(v) for v in f.pose)  # pose from the 5 keypoints
    again = backend.analyze(scene(256, 192))[0]
    assert identity_similarity(f.embedding, again.embedding) > 0.9999
    other = backend.analyze(scene(256, 192, texture=4))[0]
    assert identity_similarity(f.embedding, other.embedding) < 0.999
    assert backend.analyze(np.zeros((480, 640, 3), np.uint8)) == []


def test_auto_takes_insightface_when_the_pack_is_there(pack_root: Path) -> None:
    backend = get_face_backend("auto", insightface_pack="fakepack", insightface_root=str(pack_root),
                               providers=["CPUExecutionProvider"], cache=False)
    assert backend.name == "insightface"
    assert backend.selection_note.startswith("auto: took insightface")


def test_pack_given_as_a_folder_path(pack_root: Path) -> None:
    backend = get_face_backend("insightface", insightface_pack=str(pack_root / "models" / "fakepack"),
                               insightface_root="/nonexistent", providers=["CPUExecutionProvider"], cache=False)
    assert len(backend.analyze(scene(100, 100))) == 1


def test_a_pack_without_a_detector_is_a_clear_error(tmp_path: Path) -> None:
    from runner.core.errors import StageError

    pack = tmp_path / "models" / "halfpack"
    pack.mkdir(parents=True)
    fake_embedder(pack / "w600k_fake.onnx")
    with pytest.raises(StageError, match="no face detection model"):
        get_face_backend("insightface", insightface_pack="halfpack", insightface_root=str(tmp_path),
                         providers=["CPUExecutionProvider"], cache=False)


@pytest.mark.parametrize("batch", [1, "n"])
def test_main_face_embeddings_batched_match_the_full_analysis(tmp_path: Path, batch) -> None:
    pack = tmp_path / "models" / "pack"
    pack.mkdir(parents=True)
    fake_detector(pack / "det_fake.onnx")
    fake_embedder(pack / "w600k_fake.onnx", batch=batch)
    backend = get_face_backend("insightface", insightface_pack="pack", insightface_root=str(tmp_path),
                               providers=["CPUExecutionProvider"], cache=False, max_side=400)
    two = scene(64, 64, texture=4)
    two[300:364, 448:512] = 255  # a second face, same size: the first detected stays the main one
    images = [scene(256, 192), np.zeros((480, 640, 3), np.uint8), scene(96, 320, texture=4), two]
    fast = backend.main_face_embeddings(images)
    assert fast[1] == (None, None)
    for rgb, (emb, box) in zip(images, fast):
        faces = backend.analyze(rgb)
        if not faces:
            assert emb is None
            continue
        ref = faces[0]
        assert emb is not None and emb.shape == (512,)
        np.testing.assert_allclose(emb, ref.embedding, atol=1e-5)
        assert box == [round(float(v), 1) for v in ref.box]  # max_side 400 < 640: rescaled alike
    assert len(backend.analyze(two)) == 2
