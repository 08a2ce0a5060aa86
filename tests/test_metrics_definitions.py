"""Metric definitions against hand-computed values (CLIPScore, DreamBooth CLIP-I/DINO, identity)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.metrics import definitions as M


def unit(deg: float) -> np.ndarray:
    """A 2-d unit vector at ``deg`` degrees: cos between unit(a) and unit(b) is cos(a - b)."""
    r = math.radians(deg)
    return np.array([math.cos(r), math.sin(r)])


def test_clip_t_is_raw_cosine_and_clipscore_is_hessel() -> None:
    img = np.stack([unit(0), unit(0), unit(0)]) * 3.0  # unnormalized on purpose
    txt = np.stack([unit(60), unit(0), unit(120)])
    raw = M.clip_t(img, txt)
    np.testing.assert_allclose(raw, [0.5, 1.0, -0.5], atol=1e-12)
    # CLIP-S = 2.5 * max(cos, 0): negative cosines clip to 0, w = 2.5.
    np.testing.assert_allclose(M.clip_score(img, txt), [1.25, 2.5, 0.0], atol=1e-12)
    assert M.CLIPSCORE_W == 2.5
    with pytest.raises(ValueError):
        M.clip_t(img, txt[:2])


def test_clip_i_and_dino_are_mean_over_all_generated_x_real_pairs() -> None:
    gen = np.stack([unit(0), unit(90)])
    ref = np.stack([unit(0), unit(60), unit(180)])
    # pairs: gen0 -> (1, .5, -1); gen1 -> (0, cos30, 0)
    expected = (1 + 0.5 - 1 + 0 + math.cos(math.radians(30)) + 0) / 6
    assert M.clip_i(gen, ref) == pytest.approx(expected)
    assert M.dino_score(gen, ref) == pytest.approx(expected)
    np.testing.assert_allclose(M.reference_similarity(gen, ref), [0.5 / 3, math.cos(math.radians(30)) / 3])


def test_face_similarity_counts_missing_faces_as_failures() -> None:
    refs = np.stack([unit(0), unit(40)])
    faces = [unit(0), None, unit(40), None]
    per_mean, per_max, found = M.face_similarity_per_image(faces, refs)
    c40 = math.cos(math.radians(40))
    np.testing.assert_allclose(per_mean, [(1 + c40) / 2, 0, (1 + c40) / 2, 0])
    np.testing.assert_allclose(per_max, [1, 0, 1, 0])
    agg = M.face_similarity(faces, refs)
    assert agg["no_face_rate"] == pytest.approx(0.5)
    assert agg["face_similarity"] == pytest.approx((1 + c40) / 2 / 2)  # zeros are in the mean
    assert agg["face_similarity_max"] == pytest.approx(0.5)
    # All faces found: plain means.
    agg2 = M.face_similarity([unit(0), unit(40)], refs)
    assert agg2["no_face_rate"] == 0.0 and agg2["face_similarity_max"] == pytest.approx(1.0)


def test_consistency_is_mean_pairwise_and_penalizes_missing_faces() -> None:
    a, b, c = unit(0), unit(60), unit(90)
    # pairs (a,b)=.5 (a,c)=0 (b,c)=cos30
    assert M.consistency([a, b, c]) == pytest.approx((0.5 + 0 + math.cos(math.radians(30))) / 3)
    # a faceless image: its two pairs score 0
    assert M.consistency([a, a, None]) == pytest.approx(1 / 3)
    assert math.isnan(M.consistency([a]))
    assert M.consistency([a, a, a, a]) == pytest.approx(1.0)


def test_diversity_is_mean_pairwise_distance_within_a_prompt() -> None:
    emb = np.stack([unit(0), unit(60), unit(0), unit(0), unit(90)])
    prompts = ["p", "p", "q", "q", "r"]  # r has a single seed: ignored
    # p: 1 - .5 = .5 ; q: 0
    assert M.diversity(emb, prompts) == pytest.approx(0.25)
    assert M.diversity(emb[:1], ["p"]) is None
    # a checkpoint that pastes one image everywhere has zero diversity
    assert M.diversity(np.stack([unit(10)] * 4), ["p", "p", "q", "q"]) == pytest.approx(0.0)


def test_roc_auc_matches_pair_counting() -> None:
    pos = [0.9, 0.8, 0.7]
    neg = [0.75, 0.2]
    # pairs where pos > neg: 0.9>both, 0.8>both, 0.7>0.2 only -> 5 of 6
    assert M.roc_auc(pos, neg) == pytest.approx(5 / 6)
    assert M.roc_auc([1.0], [1.0]) == pytest.approx(0.5)  # ties count half
    with pytest.raises(ValueError):
        M.roc_auc([], [0.1])


def test_every_metric_has_direction_and_description() -> None:
    for name, meta in M.METRICS.items():
        assert meta["better"] in ("higher", "lower") and meta["desc"], name
