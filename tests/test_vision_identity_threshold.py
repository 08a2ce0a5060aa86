"""The identity threshold is calibrated on held-out faces, lives in one place, and every consumer
(curate, the storyboard's validation, the video builder) takes the backend's value from there."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from runner.vision.faces import (
    IDENTITY_THRESHOLDS,
    DlibFaceBackend,
    InsightFaceBackend,
    get_face_backend,
    identity_similarity,
)

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "bench" / "calibrate_identity"


def test_the_dlib_threshold_is_the_calibrated_one() -> None:
    cal = json.loads((CALIBRATION / "dlib.json").read_text())
    assert IDENTITY_THRESHOLDS["dlib"] == DlibFaceBackend.default_identity_threshold == cal["threshold"]
    assert cal["far_measured"] <= cal["far_target"] and cal["impostor_max"] < cal["threshold"]
    assert cal["impostor_pairs"] >= 1000  # enough pairs for the stated rate to mean something
    assert InsightFaceBackend.default_identity_threshold == IDENTITY_THRESHOLDS["insightface"]


def test_the_calibration_data_is_held_out() -> None:
    # Calibration reads only the video clips' faces; the identity tests read the photos.
    cal = json.loads((CALIBRATION / "dlib.json").read_text())
    assert cal["faces"] and all(name.endswith(".mp4") for name in cal["faces"])


@pytest.mark.slow  # about 14 s
def test_the_threshold_holds_on_the_photos_it_was_not_fitted_on(shared_data: Path) -> None:
    # The test set: the 19 single-person photos (171 pairs) and the margin on each side.
    import numpy as np
    from PIL import Image, ImageOps

    backend = get_face_backend("dlib")
    embs = {}
    for p in sorted((shared_data / "faces").glob("*/*")):
        if p.parent.name == "groups":
            continue
        with Image.open(p) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            embs[(p.parent.name, p.name)] = backend.analyze(rgb)[0].embedding
    same, diff = [], []
    for (k1, e1), (k2, e2) in itertools.combinations(embs.items(), 2):
        (same if k1[0] == k2[0] else diff).append(identity_similarity(e1, e2))
    t = IDENTITY_THRESHOLDS["dlib"]
    assert max(diff) < t < min(same), (max(diff), t, min(same))


@pytest.mark.parametrize("name,expected", [("dlib", IDENTITY_THRESHOLDS["dlib"])])
def test_storyboard_default_face_threshold_follows_the_backend(tmp_path: Path, shared_data: Path, name: str,
                                                              expected: float) -> None:
    from runner.generate.frames import Thresholds
    from runner.stages.common import load_rgb
    from runner.spec.schema import section_schema
    from runner.stages import storyboard

    schema = json.dumps(section_schema("generate"))
    assert '"default": "backend"' in schema  # the spec default is no fixed cosine

    class Ctx:
        project_root = tmp_path

        def log(self, msg: str) -> None:
            pass

    config = {"validation": {"clip_model": None}, "face": {"name": name}}
    backend, _clip, _val, _later, thresholds = storyboard.build_validators(
        config, [load_rgb(shared_data / "faces" / "obama" / "obama_01.jpg")], Thresholds("backend", None), Ctx())
    assert backend.name == name and thresholds.face_similarity == expected
