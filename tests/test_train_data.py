"""Pure data logic of the trainer: buckets, caption variants, phase mixes, validation split, sampler."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.diffusion.data import (
    BatchSampler,
    DataError,
    Example,
    assign_bucket,
    caption_variants,
    make_buckets,
    mix_weights,
    split_validation,
)


def _ex(i: int, shot: str, cats=(), repeats: int = 1, parent=None, bucket=(64, 64)) -> Example:
    return Example(id=f"e{i}", image=Path(f"e{i}.png"), caption=f"sks man, {shot}", shot=shot,
                   categories=[shot, *cats], repeats=repeats, parent=parent, bucket=bucket)


def test_buckets_keep_area_and_alignment() -> None:
    buckets = make_buckets(1024, min_side=512, max_side=2048, step=64, multiple=64)
    assert (1024, 1024) in buckets and (832, 1216) in buckets and (1216, 832) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 * 1.0001 and w * h > 0.85 * 1024 * 1024 for w, h in buckets)
    assert assign_bucket(900, 1300, buckets) == (832, 1216)
    assert assign_bucket(1000, 1000, buckets) == (1024, 1024)
    # the step is rounded up to what the model needs
    small = make_buckets(64, min_side=32, max_side=128, step=10, multiple=16)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in small)


def test_caption_variants_shuffle_after_keep_tokens() -> None:
    cap = "sks man, close up, smiling, red shirt, park, daylight"
    vs = caption_variants(cap, n=4, shuffle=True, keep_tokens=2, seed=1, key="a")
    assert vs[0] == cap and len(vs) == 4 and len(set(vs)) == 4
    assert all(v.startswith("sks man, close up, ") for v in vs)
    assert all(sorted(v.split(", ")) == sorted(cap.split(", ")) for v in vs)
    assert vs == caption_variants(cap, n=4, shuffle=True, keep_tokens=2, seed=1, key="a")
    assert caption_variants(cap, n=4, shuffle=False, keep_tokens=2, seed=1, key="a") == [cap]


def test_mix_weights() -> None:
    ex = [_ex(0, "close_up"), _ex(1, "close_up"), _ex(2, "close_up", repeats=2),
          _ex(3, "full_body", ["multi_character"]), _ex(4, "medium")]
    natural, _ = mix_weights(ex, "natural")
    assert natural == pytest.approx([1 / 6, 1 / 6, 2 / 6, 1 / 6, 1 / 6])
    balanced, _ = mix_weights(ex, "balanced")
    assert sum(balanced[:3]) == pytest.approx(1 / 3) and balanced[3] == pytest.approx(1 / 3)
    custom, warns = mix_weights(ex, {"full_body": 0.5, "multi_character": 0.3, "close_up": 0.2, "wide": 0.1})
    assert custom[3] == pytest.approx(0.8 / 1.0) and custom[4] == 0.0
    assert warns and "wide" in warns[0]
    with pytest.raises(DataError, match="selects no training image"):
        mix_weights(ex, {"wide": 1.0})


def test_validation_split_holds_out_crops_too() -> None:
    ex = [_ex(i, "medium") for i in range(10)] + [_ex(10 + i, "close_up", parent=f"e{i}") for i in range(10)]
    train, val = split_validation(ex, 0.2, seed=3)
    assert len(val) == 2 and all(e.parent is None for e in val)
    held = {e.id for e in val}
    assert not any(e.parent in held or e.id in held for e in train)
    assert split_validation(ex, 0.2, seed=3)[1] == val
    assert split_validation(ex[:1], 0.5, seed=3) == (ex[:1], [])


def test_sampler_is_positional_and_bucket_pure() -> None:
    ex = [_ex(i, "medium", bucket=(64, 64) if i % 2 else (48, 80)) for i in range(8)]
    w = [1 / 8] * 8
    s = BatchSampler(ex, w, 3, seed=5, salt="p")
    batches = [s.batch(i) for i in range(50)]
    assert all(len({ex[j].bucket for j in b}) == 1 for b in batches)
    assert BatchSampler(ex, w, 3, seed=5, salt="p").batch(37) == batches[37]
    other = BatchSampler(ex, w, 3, seed=5, salt="other")
    assert [other.batch(i) for i in range(50)] != batches  # each phase draws its own sequence
