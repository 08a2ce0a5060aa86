"""Trust in the identity metric, on the real photos in ../shared/data (dlib backend, offline).

Face similarity must separate same-person from different-person pairs (ROC AUC reported), and an
image with no face must be counted in no_face_rate with similarity 0, never skipped.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from runner.metrics import definitions as M
from runner.metrics.compute import MetricComputer

PEOPLE = ["obama", "biden", "kit_harington", "rose_leslie", "alex_lacamoire", "lin_manuel_miranda"]


def _load(path: Path, max_side: int = 512) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    im.thumbnail((max_side, max_side))
    return im


@pytest.fixture(scope="module")
def backend():
    from runner.vision.faces import get_face_backend

    return get_face_backend("dlib")


@pytest.fixture(scope="module")
def identities(shared_data: Path, backend) -> dict[str, dict[str, np.ndarray]]:
    """person -> {file name: main-face identity embedding} for every photo with a face."""
    from runner.vision.faces import main_face

    out: dict[str, dict[str, np.ndarray]] = {}
    for person in PEOPLE:
        for f in sorted((shared_data / "faces" / person).iterdir()):
            face = main_face(backend.analyze(np.asarray(_load(f))))
            if face is not None:
                out.setdefault(person, {})[f.name] = face.embedding
    return out


@pytest.mark.slow  # the identities fixture: about 10 s
def test_face_similarity_separates_same_from_different_people(identities, record_property) -> None:
    found = sum(len(v) for v in identities.values())
    assert found >= 15, f"dlib found faces in only {found} photos"
    items = [(p, e) for p, files in identities.items() for e in files.values()]
    same, diff = [], []
    for (pa, ea), (pb, eb) in itertools.combinations(items, 2):
        (same if pa == pb else diff).append(float(M.cosine_matrix(ea, eb)[0, 0]))
    auc = M.roc_auc(same, diff)
    record_property("face_roc_auc_dlib", auc)
    record_property("pairs", f"{len(same)} same / {len(diff)} different")
    print(f"\nface similarity ROC AUC (dlib, {len(same)} same-person / {len(diff)} different-person pairs): {auc:.4f}")
    assert len(same) >= 20 and len(diff) >= 100
    assert auc >= 0.98


@pytest.mark.slow  # the identities fixture: about 10 s
def test_face_similarity_metric_ranks_the_right_person_first(identities) -> None:
    obama = list(identities["obama"].values())
    refs = np.stack(obama[:2])
    same = M.face_similarity(obama[2:], refs)
    others = [e for p, files in identities.items() if p != "obama" for e in files.values()]
    different = M.face_similarity(others, refs)
    assert same["no_face_rate"] == 0.0 and different["no_face_rate"] == 0.0
    assert same["face_similarity"] > different["face_similarity"] + 0.05
    assert same["face_similarity_max"] > different["face_similarity_max"]


def test_missing_face_is_counted_not_skipped(shared_data: Path, backend) -> None:
    from runner.metrics.embedders import TINY_CLIP, TINY_DINO, load_image_embedder

    mc = MetricComputer(clip=load_image_embedder(TINY_CLIP), dino=load_image_embedder(TINY_DINO),
                        face_backend=backend, batch_size=4)
    refs = mc.references([_load(shared_data / "faces" / "obama" / "obama_01.jpg")], ["obama_01.jpg"])
    with_face = _load(shared_data / "faces" / "obama" / "obama_02.jpg")
    no_face = Image.new("RGB", (256, 256), (90, 140, 200))  # a plain sky: nothing to find
    images = [with_face, no_face, with_face, no_face]
    emb = mc.embed(images)
    assert [f is not None for f in emb.faces] == [True, False, True, False]
    prompts = ["a photo of tok man"] * 4
    per_image, per_cat, overall = mc.score(emb, mc.text_embeddings(prompts), refs,
                                           categories=["close_up"] * 4, prompt_keys=["p0", "p1", "p0", "p1"])
    assert per_image[1]["face_found"] is False and per_image[1]["face_similarity"] == 0.0
    cat = per_cat["close_up"]
    assert cat["no_face_rate"] == pytest.approx(0.5)
    assert cat["images"] == 4
    # the faceless images pull the mean down to half the real similarity
    assert cat["face_similarity"] == pytest.approx(per_image[0]["face_similarity"] / 2)
    # consistency: the pair of real faces (~1) plus five pairs with a faceless image (0)
    assert cat["consistency"] == pytest.approx(1 / 6, abs=1e-3)
    assert overall["no_face_rate"] == pytest.approx(0.5)


def test_references_without_any_face_are_a_clear_error(backend) -> None:
    from runner.metrics.embedders import TINY_CLIP, TINY_DINO, load_image_embedder
    from runner.core.errors import StageError

    mc = MetricComputer(clip=load_image_embedder(TINY_CLIP), dino=load_image_embedder(TINY_DINO),
                        face_backend=backend)
    with pytest.raises(StageError, match="no face found in any of the 1 reference"):
        mc.references([Image.new("RGB", (128, 128), (20, 20, 20))], ["dark.png"])


@pytest.mark.slow  # about 10 s
def test_face_worker_processes_give_the_same_faces_as_in_process(shared_data: Path, backend) -> None:
    """The evaluate stage's dlib pool: same embeddings, boxes and misses, in input order."""
    from runner.metrics.embedders import TINY_CLIP, TINY_DINO, load_image_embedder
    from runner.vision.analysis import FacePool

    clip, dino = load_image_embedder(TINY_CLIP), load_image_embedder(TINY_DINO)
    images = [_load(f, 256) for f in sorted((shared_data / "faces" / "obama").iterdir())[:3]]
    images += [Image.new("RGB", (200, 160), (90, 140, 200)),
               _load(shared_data / "faces" / "biden" / "biden_01.jpg", 256)]
    plain = MetricComputer(clip=clip, dino=dino, face_backend=backend).embed(images)
    with MetricComputer(clip=clip, dino=dino, face_backend=backend,
                        face_pool=FacePool(2, {"name": "dlib"})) as mc:
        cheap = mc.embed([Image.new("RGB", (64, 64), (90, 140, 200))] * 6)
        assert not mc.face_pool.started  # 6 faceless thumbnails: far cheaper than starting workers
        assert cheap.faces == [None] * 6
        mc.POOL_WORTH_S = 0.0  # from now on every set is worth the workers
        pooled = mc.embed(images)
        assert mc.face_pool.started
    assert not mc.face_pool.started  # closed on leaving the block
    assert [f is None for f in pooled.faces] == [f is None for f in plain.faces]
    assert pooled.faces[3] is None and sum(f is not None for f in pooled.faces) >= 3
    for a, b in zip(plain.faces, pooled.faces):
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert pooled.face_boxes == plain.face_boxes


def test_a_face_worker_that_cannot_start_is_a_clear_error(backend) -> None:
    from runner.core.errors import StageError
    from runner.vision.analysis import FacePool

    images = [np.zeros((64, 64, 3), np.uint8)] * 2
    with FacePool(2, {"name": "no-such-backend"}, hint="set evaluate.face_workers: 1") as pool:
        with pytest.raises(StageError, match="face analysis worker process died") as err:
            pool.results(pool.submit(images))
    assert "evaluate.face_workers: 1" in err.value.hint


@pytest.mark.slow  # about 7 s
def test_main_face_embeddings_match_the_full_analysis_on_group_photos(shared_data: Path, backend) -> None:
    """The metrics path describes only the largest face; it must pick and embed the same one."""
    from runner.vision.faces import main_face

    files = sorted((shared_data / "faces" / "groups").iterdir())
    images = [np.asarray(_load(f, 1024)) for f in files] + [np.full((120, 160, 3), 200, np.uint8)]
    fast = backend.main_face_embeddings(images)
    assert fast[-1] == (None, None)
    several = 0
    for rgb, (emb, box) in zip(images[:-1], fast[:-1]):
        faces = backend.analyze(rgb)
        several += len(faces) > 1
        ref = main_face(faces)
        assert emb is not None and ref is not None
        np.testing.assert_allclose(emb, ref.embedding, atol=1e-6)
        assert box == [round(float(v), 1) for v in ref.box]
    assert several >= 3  # the group photos do have several faces each


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; reaping it is its new parent's business


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.slow  # about 3 s
def test_face_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """kill -9 of the runner must not leave workers holding face models forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from runner.vision.analysis import FacePool\n"
        "if __name__ == '__main__':\n"
        "    pool = FacePool(2, {'name': 'dlib'})\n"
        "    pool.start()\n"
        "    print(' '.join(str(p.pid) for p in pool._pool._processes.values()), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
