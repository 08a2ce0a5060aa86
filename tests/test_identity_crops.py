"""Identity-adapter reference crops (dataset.export.formats: identity_crops) on the real photos.

- the alignments put the eyes where each template wants them, measured by re-detecting landmarks
  on the crop with the dlib backend;
- rotated, scaled and mirrored copies of a photo give near-identical crops;
- hostile and odd faces (derived copies, no face, unchecked or wrong identity, cut by the frame,
  profiles, too small, unreadable files) are skipped with their reasons;
- background removal through rembg's sessions with tiny ONNX models built here (never a download);
- `runner apply` writes and publishes a folder and a manifest per adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("insightface")

from runner.core.contract import StageError  # noqa: E402
from runner.vision import align as A  # noqa: E402
from runner.vision import identity_crops as IC  # noqa: E402

PHOTOS = ["obama/obama_02.jpg", "biden/biden_02.jpg", "rose_leslie/rose_01.jpg", "kit_harington/kit_01.jpg"]
CROPS = [A.Crop("arcface", 112, "embedding"), A.Crop("arcface", 224, "image"), A.Crop("ffhq", 512, "image")]


@pytest.fixture(scope="module")
def dlib():
    from runner.vision.faces import get_face_backend

    return get_face_backend("dlib")


_FACES: dict[str, tuple[np.ndarray, object]] = {}


def photo_face(shared_data: Path, dlib, name: str):
    if name not in _FACES:
        from runner.vision.analysis import load_rgb

        rgb = load_rgb(shared_data / "faces" / name)
        _FACES[name] = (rgb, dlib.analyze(rgb)[0])
    return _FACES[name]


def redetected_keypoints(crop: np.ndarray, dlib) -> np.ndarray | None:
    """The 5 keypoints dlib finds on an aligned crop: padded (a tight crop leaves the detector no
    margin) and enlarged to at least 400 px (HOG's smallest faces are about 80 px)."""
    pad = crop.shape[0] // 2
    big = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    k = max(1.0, 400.0 / big.shape[0])
    big = cv2.resize(big, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC) if k > 1 else big
    faces = dlib.analyze(big)
    return None if not faces else faces[0].keypoints / k - pad


@pytest.mark.parametrize("crop", CROPS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", PHOTOS)
def test_crops_put_the_eyes_on_the_template(name, crop, shared_data, dlib):
    rgb, face = photo_face(shared_data, dlib, name)
    al = A.align(rgb, face.keypoints, crop.alignment, crop.size)
    assert al.image.shape == (crop.size, crop.size, 3) and al.image.dtype == np.uint8
    tpl = A.template(crop.alignment, crop.size)
    found = redetected_keypoints(al.image, dlib)
    assert found is not None, f"{name}: no face on the {crop.name} crop"
    # within 4 px per 112 px of crop (the 5-point fit spreads the person's own proportions over all
    # five points, so the eyes sit 1-3 px off the template at 112 px)
    err = float(np.abs(found[:2] - tpl[:2]).max()) * 112.0 / crop.size
    assert err <= 4.0, f"{name} {crop.name}: eyes {err:.1f} px (at 112 px) from the template"
    # the matrix is the one that moved the keypoints: source keypoints land where the crop shows them
    moved = A.transform_points(face.keypoints, al.matrix)
    assert float(np.abs(moved[:2] - found[:2]).max()) * 112.0 / crop.size <= 4.0


def test_arcface_is_insightfaces_own_norm_crop(shared_data, dlib):
    from insightface.utils import face_align

    rgb, face = photo_face(shared_data, dlib, PHOTOS[0])
    for size in (112, 224):
        ours = A.align(rgb, face.keypoints, "arcface", size).image
        theirs = face_align.norm_crop(rgb, landmark=face.keypoints.astype(np.float32), image_size=size)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="112 or 128"):
        A.matrix(face.keypoints, "arcface", 100)


def _rotated(img: np.ndarray, deg: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * s + w * c), int(h * c + w * s)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(img, m, (nw, nh), borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))


COPIES = {
    "rotated 15": lambda im: _rotated(im, 15),
    "rotated -20": lambda im: _rotated(im, -20),
    "scaled 0.6": lambda im: cv2.resize(im, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA),
    "mirrored": lambda im: np.ascontiguousarray(im[:, ::-1]),
}


@pytest.mark.parametrize("copy", sorted(COPIES))
@pytest.mark.parametrize("name", PHOTOS[:3])
def test_rotated_scaled_mirrored_copies_give_near_identical_crops(name, copy, shared_data, dlib):
    rgb, face = photo_face(shared_data, dlib, name)
    other = COPIES[copy](rgb)
    (f2,) = dlib.analyze(other)[:1]
    for crop in (CROPS[0], CROPS[2]):
        base = A.align(rgb, face.keypoints, crop.alignment, crop.size).image.astype(float)
        got = A.align(other, f2.keypoints, crop.alignment, crop.size).image.astype(float)
        if copy == "mirrored":
            got = got[:, ::-1]
        inner = slice(crop.size // 5, crop.size - crop.size // 5)  # the face: a rotated copy's corners are fill
        diff = float(np.abs(got - base)[inner, inner].mean())
        assert diff < 12.0, f"{name} {copy} {crop.name}: mean difference {diff:.1f} grey levels"
    # the measure can fail: another person's crop is far away
    rgb3, face3 = photo_face(shared_data, dlib, PHOTOS[3])
    far = A.align(rgb3, face3.keypoints, "arcface", 112).image.astype(float)
    assert float(np.abs(far - A.align(rgb, face.keypoints, "arcface", 112).image).mean()) > 20.0


# --------------------------------------------------------------------------- skipping


def settings(**over) -> IC.Settings:
    base = dict(adapters=sorted(A.ADAPTERS), max_upscale=2.0, max_yaw=45.0, max_pitch=30.0,
                identity_threshold=0.9, backend="dlib")
    return IC.Settings(**{**base, **over})


def analysis_record(rgb: np.ndarray, face, identity: float = 0.97) -> dict:
    return {"id": "x", "width": rgb.shape[1], "height": rgb.shape[0], "main_face": 0, "identity": identity,
            "faces": [{"keypoints": np.asarray(face.keypoints).tolist(), "pose": face.pose._asdict()}]}


def test_odd_faces_are_skipped_with_reasons(shared_data, dlib):
    rgb, face = photo_face(shared_data, dlib, PHOTOS[0])
    good = analysis_record(rgb, face)
    rec = {"id": "x", "image": "x.png", "source": "photos/x.jpg"}
    assert IC.plan_image(rec, good, settings()).skip is None

    def face_with(**kw):
        a = json.loads(json.dumps(good))
        a["faces"][0].update(kw)
        return a

    kps = np.asarray(face.keypoints, float)
    cases = {
        "derived copy": ({**rec, "parent": "p"}, good, settings()),
        "not in the analysis": (rec, None, settings()),
        "not analyzed": (rec, {**good, "error": "truncated file"}, settings()),
        "no face found": (rec, {**good, "main_face": None}, settings()),
        "identity not checked": (rec, good, settings(identity_threshold=None)),
        "below the threshold": (rec, {**good, "identity": 0.5}, settings()),
        "outside the image": (rec, face_with(keypoints=(kps + [rgb.shape[1], 0]).tolist()), settings()),
        "5 finite": (rec, face_with(keypoints=[[math.nan, 1.0]] * 5), settings()),
        "eyes coincide": (rec, face_with(keypoints=[kps[0].tolist()] * 5), settings()),
        "head turned too far": (rec, face_with(pose={"yaw": -60.0, "pitch": 0.0, "roll": 0.0}), settings()),
        "head tilted too far": (rec, face_with(pose={"yaw": 0.0, "pitch": 40.0, "roll": 0.0}), settings()),
        "head pose unknown": (rec, face_with(pose={"yaw": math.nan, "pitch": 0.0, "roll": 0.0}), settings()),
    }
    for words, (r, a, s) in cases.items():
        p = IC.plan_image(r, a, s)
        assert p.skip and words in p.skip, (words, p.skip)


@pytest.mark.parametrize("name, reason", [
    ("obama/obama_partial_01.jpg", "face cut by the frame edge"),
    ("obama/obama_partial_02.jpg", "face cut by the frame edge"),
])
def test_faces_cut_by_the_frame_are_skipped(name, reason, shared_data, dlib):
    from runner.vision.analysis import load_rgb

    rgb = load_rgb(shared_data / "faces" / name)
    p = IC.plan_image({"id": "x"}, analysis_record(rgb, dlib.analyze(rgb)[0]), settings())
    assert p.skip and reason in p.skip


def test_small_faces_are_skipped_per_crop(shared_data, dlib):
    from runner.vision.analysis import load_rgb

    rgb = load_rgb(shared_data / "faces" / "obama" / "obama_240p.jpg")
    p = IC.plan_image({"id": "x"}, analysis_record(rgb, dlib.analyze(rgb)[0]), settings())
    assert p.skip is None
    # 23 px between the eyes: fine for the 112 px ArcFace crop, too small for 224 and 512
    assert set(p.skip_adapter) == {"ip_adapter_faceid_plus", "pulid"}
    assert "too small for the ffhq512 crop" in p.skip_adapter["pulid"]
    assert not IC.plan_image({"id": "x"}, analysis_record(rgb, dlib.analyze(rgb)[0]),
                             settings(max_upscale=6)).skip_adapter


def test_export_writes_folders_and_manifests_and_skips_unreadable_files(tmp_path, shared_data, dlib):
    from PIL import Image

    rgb, face = photo_face(shared_data, dlib, PHOTOS[0])
    ddir = tmp_path / "dataset"
    ddir.mkdir()
    Image.fromarray(rgb).save(ddir / "a.png")
    (ddir / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [{"id": "a", "image": "a.png", "source": "photos/a.jpg"}, {"id": "b", "image": "b.png", "source": "b"}]
    analysis = {"a": analysis_record(rgb, face), "b": analysis_record(rgb, face)}
    counts = IC.export(records, analysis, ddir, tmp_path / "out", settings())
    assert counts == {a: {"images": 1, "skipped": 1} for a in A.ADAPTERS}
    for adapter, crops in A.ADAPTERS.items():
        m = json.loads((tmp_path / "out" / adapter / "manifest.json").read_text())
        assert m["adapter"] == adapter and [c["name"] for c in m["crops"]] == [c.name for c in crops]
        (entry,) = m["images"]
        assert entry["source_sha256"] and entry["keypoints"] and set(entry["matrix"]) == {c.name for c in crops}
        for c in crops:
            with Image.open(tmp_path / "out" / adapter / entry["files"][c.name]) as im:
                assert im.size == (c.size, c.size)
            moved = A.transform_points(entry["keypoints"], np.array(entry["matrix"][c.name]))
            assert np.abs(moved[:2] - A.template(c.alignment, c.size)[:2]).max() < c.size * 0.08
        assert m["skipped"][0]["id"] == "b" and "cannot be read" in m["skipped"][0]["reason"]
        assert m["background"] is None


# --------------------------------------------------------------------------- background removal


def tiny_matting_model(path: Path, size: int, tiny: bool = True) -> Path:
    """A random 1x1 convolution + sigmoid with a rembg session's input and output shapes:
    (1, 3, size, size) -> (1, 1, size, size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(size)
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, size, size])
    w = numpy_helper.from_array(rng.normal(size=(1, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input.1", "w"], ["c"]),
                               helper.make_node("Sigmoid", ["c"], ["mask"])],
                              "tiny_matting", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if tiny:
        helper.set_model_props(model, {"character_runner.tiny_random": "1"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("session, size", [("u2net", 320), ("isnet-general-use", 1024)])
def test_matting_runs_a_local_model_in_rembgs_session(session, size, tmp_path):
    pytest.importorskip("rembg")
    from runner.vision import matting as MT

    tiny_matting_model(tmp_path / "m.onnx", size)
    m = MT.load_matting("m.onnx", session, tmp_path, key="k.model")
    assert m.info["session"] == session and m.info["tiny_random_model"] is True and len(m.info["sha256"]) == 64
    rgb = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    alpha = m.alpha(rgb)
    assert alpha.shape == (90, 70) and alpha.dtype == np.uint8 and alpha.max() > alpha.min()
    rgba = MT.composite(rgb, alpha, "rgba", (0, 0, 0))
    assert rgba.shape == (90, 70, 4) and (rgba[..., 3] == alpha).all()
    flat = MT.composite(rgb, np.zeros_like(alpha), "flat", (10, 20, 30))
    assert (flat == [10, 20, 30]).all()
    # a folder with one model in it
    assert MT.load_matting(str(tmp_path), session, tmp_path, key="k.model").info["file"] == "m.onnx"
    assert MT.load_matting(str(tiny_matting_model(tmp_path / "m.onnx", size, tiny=False)), session, tmp_path,
                           key="k.model").info["tiny_random_model"] is False


def test_matting_refuses_what_it_cannot_load_without_downloading(tmp_path, monkeypatch):
    pytest.importorskip("rembg")
    from runner.vision import matting as MT

    monkeypatch.setenv("REMBG_HOME", str(tmp_path / "rembg-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_matting_model(tmp_path / "m.onnx", 320)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    (tmp_path / "two").mkdir()
    for n in ("a.onnx", "b.onnx"):
        shutil.copy(tmp_path / "m.onnx", tmp_path / "two" / n)
    cases = {
        ("m.onnx", None): "needs its rembg session",
        ("m.onnx", "u2nett"): "did you mean 'u2net'",
        ("bad.onnx", "u2net"): "cannot be loaded as an ONNX model",
        ("two", "u2net"): "exactly one .onnx file",
        ("rembg:u2net", None): "not in rembg's model folder",
        ("rembg:nope", None): "unknown rembg session",
        ("nobody/no-such-matting-model", "u2net"): "not in the Hugging Face cache",
    }
    for (ref, session), words in cases.items():
        with pytest.raises(StageError, match=words.replace("(", r"\(")) as exc:
            MT.load_matting(ref, session, tmp_path, key="dataset.export.identity_crops.background.model")
        assert "dataset.export.identity_crops.background" in str(exc.value)
    assert not (tmp_path / "rembg-home").exists() or not any((tmp_path / "rembg-home").rglob("*.onnx"))
    # a rembg model placed where rembg keeps it is found there
    home = tmp_path / "rembg-home" / "models" / "u2net"
    home.mkdir(parents=True)
    shutil.copy(tmp_path / "m.onnx", home / "u2net.onnx")
    assert MT.load_matting("rembg:u2net", None, tmp_path, key="k").info["session"] == "u2net"
    with pytest.raises(StageError, match="not a colour") as exc:
        MT.check_color("white", "k.color")
    assert "#rrggbb" in exc.value.hint


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow  # about 3 s: a whole apply
def test_apply_exports_identity_crops_per_adapter(project: Path, shared_data: Path):
    pytest.importorskip("rembg")
    from PIL import Image

    from runner.engine.executor import ApplyOptions, apply
    from runner.engine.progress import QuietReporter
    from runner.spec import load_spec

    for folder, names in (("photos", ["obama_02.jpg", "obama_240p.jpg", "obama_partial_01.jpg"]),
                          ("refs", ["obama_04.jpg"])):
        (project / folder).mkdir()
        for n in names:
            shutil.copy(shared_data / "faces" / "obama" / n, project / folder / n)
    (project / "models").mkdir()
    tiny_matting_model(project / "models" / "matte.onnx", 320)
    spec = project / "specs" / "hero.yaml"
    spec.write_text(
        "version: 1\ncharacter: {name: hero, trigger: hrochr, class_word: man, references: [../refs]}\n"
        "dataset:\n  sources: [{images: ../photos}]\n  analysis: {backend: dlib, workers: 1}\n"
        "  export:\n    formats: [jsonl, identity_crops]\n    identity_crops:\n"
        "      adapters: [pulid, instantid]\n"
        "      background: {model: ../models/matte.onnx, session: u2net, output: rgba}\n")
    res = apply([load_spec(spec)], ApplyOptions(only=["export"]), QuietReporter())
    assert res.status == "succeeded", [(r.stage_id, r.error) for r in res.failed]
    pub = project / ".runner" / "exports" / "hero" / "identity_crops"
    assert sorted(p.name for p in pub.iterdir()) == ["instantid", "pulid"]
    pulid = json.loads((pub / "pulid" / "manifest.json").read_text())
    inst = json.loads((pub / "instantid" / "manifest.json").read_text())
    by_source = {Path(e["source"]).name: e for e in pulid["images"]}
    assert set(by_source) == {"obama_02.jpg"}
    assert {Path(e["source"]).name for e in inst["images"]} == {"obama_02.jpg", "obama_240p.jpg"}
    reasons = {Path(s["source"]).name: s["reason"] for s in pulid["skipped"]}
    assert "too small for the ffhq512" in reasons["obama_240p.jpg"]
    assert "cut by the frame" in reasons["obama_partial_01.jpg"]
    assert pulid["background"]["tiny_random_model"] is True and pulid["background"]["session"] == "u2net"
    assert pulid["landmarks_from"].startswith("dlib")
    with Image.open(pub / "pulid" / by_source["obama_02.jpg"]["files"]["ffhq512"]) as im:
        assert im.mode == "RGBA" and im.size == (512, 512)  # the image crop is matted
    with Image.open(pub / "pulid" / by_source["obama_02.jpg"]["files"]["arcface112"]) as im:
        assert im.mode == "RGB" and im.size == (112, 112)  # the embedding crop never is
    summary = json.loads((project / ".runner" / "exports" / "hero" / "export.json").read_text())
    assert summary["identity_crops"]["pulid"] == {"images": 1, "skipped": 2}

    import jinja2

    from runner.resources import resource_dir
    from runner.core import contract
    from runner.stages import export

    (sec,) = export.report_sections({},
                                    {"export": contract.Artifact("export", project / ".runner" / "exports" / "hero")},
                                    {})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))), autoescape=True)
    html = env.get_template(sec.template).render(**sec.context)
    assert "<code>pulid</code>" in html and "manifest.json" in html


def test_a_model_file_without_its_session_is_a_spec_error(project: Path):
    import subprocess
    import sys

    (project / "photos").mkdir()
    tiny_matting_model(project / "m.onnx", 320)
    spec = project / "specs" / "hero.yaml"
    spec.write_text(
        "version: 1\ncharacter: {name: hero, trigger: hrochr}\ndataset:\n  sources: [{images: ../photos}]\n"
        "  export:\n    formats: [identity_crops]\n    identity_crops: {background: {model: ../m.onnx}}\n")
    res = subprocess.run([sys.executable, "-m", "runner.cli", "plan", str(spec)], capture_output=True, text=True,
                         cwd=project, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "dataset.export.identity_crops.background.session" in out and "Traceback" not in out
