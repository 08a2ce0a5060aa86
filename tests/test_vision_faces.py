"""The face backends on the real photos in ../shared/data (dlib runs offline; insightface has no pack here)."""

from __future__ import annotations

import itertools
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from runner.core.errors import StageError
from runner.vision.faces import (
    get_face_backend,
    identity_similarity,
    insightface_pack_dir,
    pose_from_landmarks,
)


@pytest.fixture(scope="module")
def dlib_backend():
    return get_face_backend("dlib")


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@lru_cache(maxsize=None)
def _faces(path: str):
    return get_face_backend("dlib").analyze(load_rgb(Path(path)))


def faces_of(path: Path):
    return _faces(str(path))


@pytest.mark.parametrize("name,count", [("two_people.jpg", 2), ("obama_and_biden.jpg", 3), ("six_people.jpg", 6),
                                        ("kit_with_rose.jpg", 2)])
@pytest.mark.slow  # about 1.5 s each
def test_group_face_counts(shared_data: Path, name: str, count: int) -> None:
    faces = faces_of(shared_data / "faces" / "groups" / name)
    assert len(faces) == count
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)  # largest first
    for f in faces:
        assert f.landmarks is not None and f.landmarks.shape == (68, 2)
        assert f.keypoints.shape == (5, 2)
        assert f.embedding.shape == (128,)
        assert abs(float(np.linalg.norm(f.embedding)) - 1.0) < 1e-4


@pytest.mark.slow  # about 2 s
def test_yaw_sign_on_photos_with_a_visible_head_turn(shared_data: Path) -> None:
    # kit_02: the face points to image left (he turns to his right); obama_04: to image right.
    kit = faces_of(shared_data / "faces" / "kit_harington" / "kit_02.jpg")[0]
    obama = faces_of(shared_data / "faces" / "obama" / "obama_04.jpg")[0]
    frontal = faces_of(shared_data / "faces" / "obama" / "obama_01.jpg")[0]
    assert kit.pose.yaw < -20
    assert obama.pose.yaw > 15
    assert abs(frontal.pose.yaw) < 8 and abs(frontal.pose.roll) < 5


def test_mirror_flips_yaw_and_roll_keeps_pitch(shared_data: Path, dlib_backend) -> None:
    rgb = load_rgb(shared_data / "faces" / "kit_harington" / "kit_03.jpg")
    a = dlib_backend.analyze(rgb)[0].pose
    b = dlib_backend.analyze(np.ascontiguousarray(rgb[:, ::-1]))[0].pose
    assert a.yaw > 10 and b.yaw < -10 and abs(a.yaw + b.yaw) < 5
    assert a.roll * b.roll < 0 and abs(a.roll + b.roll) < 4
    assert abs(a.pitch - b.pitch) < 4


def test_roll_follows_an_in_plane_rotation(shared_data: Path, dlib_backend) -> None:
    img = Image.fromarray(load_rgb(shared_data / "faces" / "obama" / "obama_01.jpg"))
    clockwise = dlib_backend.analyze(np.asarray(img.rotate(-15, resample=Image.Resampling.BICUBIC)))[0].pose
    assert 10 < clockwise.roll < 20


@pytest.mark.parametrize("centre", [(400, 400), (200, 560), (600, 240)])
def test_pose_from_synthetic_projection_recovers_yaw(centre) -> None:
    # Project the generic model turned 30 degrees to the person's left *relative to the line of
    # sight*, at the centre and 14 degrees off the axis (the virtual camera ignores the obliquity of the image
    # plane there, a few percent of stretch), and read the angle back.
    import cv2

    from runner.vision.faces import FACE_MODEL_3D, POSE_CAMERA_DISTANCE_MM

    idx = sorted(FACE_MODEL_3D)
    obj = np.array([FACE_MODEL_3D[i] for i in idx], dtype=np.float64)
    f = 800.0
    ray = np.array([(centre[0] - 400) / f, (centre[1] - 400) / f, 1.0])
    ray /= np.linalg.norm(ray)
    # Rotation taking the optical axis onto the ray, then the face's own turn (about Y by -yaw:
    # face forward is -Z, turned toward +X, image right).
    axis = np.cross([0.0, 0.0, 1.0], ray)
    angle = np.arcsin(min(1.0, np.linalg.norm(axis)))
    r_ray = cv2.Rodrigues(axis / (np.linalg.norm(axis) or 1.0) * angle)[0]
    r_face = cv2.Rodrigues(np.array([0.0, -np.radians(30), 0.0]))[0]
    rvec = cv2.Rodrigues(r_ray @ r_face)[0]
    tvec = ray * POSE_CAMERA_DISTANCE_MM
    cam = np.array([[f, 0, 400], [0, f, 400], [0, 0, 1]], dtype=np.float64)
    pts, _ = cv2.projectPoints(obj, rvec, tvec, cam, None)
    lm = np.zeros((68, 2))
    lm[idx] = pts.reshape(-1, 2)
    pose = pose_from_landmarks(lm, (800, 800))
    assert abs(pose.yaw - 30) < 3.0 and abs(pose.pitch) < 2.0 and abs(pose.roll) < 2.0, pose


@pytest.mark.slow  # about 12 s
def test_same_person_pairs_score_above_different_person_pairs(shared_data: Path) -> None:
    embs = {}
    for p in sorted((shared_data / "faces").glob("*/*")):
        if p.parent.name == "groups":
            continue
        faces = faces_of(p)
        assert faces, f"no face found in {p}"
        embs[(p.parent.name, p.name)] = faces[0].embedding
    same, diff = [], []
    for (k1, e1), (k2, e2) in itertools.combinations(embs.items(), 2):
        (same if k1[0] == k2[0] else diff).append(identity_similarity(e1, e2))
    threshold = get_face_backend("dlib").default_identity_threshold
    assert min(same) > max(diff)
    assert min(same) > threshold > max(diff)


def test_rgba_png_and_low_resolution(shared_data: Path, dlib_backend) -> None:
    with Image.open(shared_data / "odd" / "rgba_32bit.png") as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    assert len(dlib_backend.analyze(rgba)) == 1  # the alpha channel is dropped
    small = faces_of(shared_data / "faces" / "obama" / "obama_small.jpg")
    assert len(small) == 1 and small[0].height < 120


def test_no_face_in_a_blank_image(dlib_backend) -> None:
    assert dlib_backend.analyze(np.full((240, 320, 3), 127, np.uint8)) == []


def test_insightface_missing_pack_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError) as err:
        get_face_backend("insightface", insightface_root=str(tmp_path), cache=False)
    assert str(tmp_path / "models" / "buffalo_l") in str(err.value)
    assert "never downloads" in err.value.hint
    assert insightface_pack_dir("/some/pack/folder") == Path("/some/pack/folder")


def test_auto_takes_dlib_without_a_pack_and_says_so(tmp_path: Path) -> None:
    backend = get_face_backend("auto", insightface_root=str(tmp_path), cache=False)
    assert backend.name == "dlib"
    assert "auto" in backend.selection_note and "no insightface pack" in backend.selection_note
    assert backend.embedding_model.startswith("dlib-")


def test_unknown_backend_name() -> None:
    with pytest.raises(StageError):
        get_face_backend("opencv", cache=False)
