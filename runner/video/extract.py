"""Targeted re-extraction: frames of the character from videos that fill the dataset's shot gaps.

Three steps, each a small function (docs/analysis.md, "Targeted re-extraction"):

1. :func:`needs`: how many images each category under its target lacks, from the curated tally:
   enough to reach the middle of its range, ``n = ceil((mid * N - k) / (1 - mid))``, capped by
   ``max_per_category``.
2. :func:`scan`: every sampled frame of a video analyzed exactly as analyze does
   (:func:`runner.vision.analysis.analyze_image`: shot type from the main face's size and the frame
   below it, flags from the people count, background edges and occlusion, identity against the
   references), passed through curate's own gates (identity threshold, face size, blur, exposure),
   so a frame kept here is one curate keeps too. Frames that fill no needed category are counted,
   not kept.
3. :func:`diverse`: the best candidates of each category, at least ``min_gap_s`` apart in their
   video and farther than ``dedupe_hamming`` (perceptual hash) from every dataset image and every
   pick, up to the category's cap; the shot-balance search (:func:`runner.vision.balance.add`)
   then takes those that bring the shares closer with no targeted category farther off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from runner.vision import balance as B


@dataclass
class Need:
    """A category under its target and how many frames would bring it to the middle of its range."""

    category: str
    share: float
    target: tuple[float, float]
    count: int  # images the dataset has in the category
    total: int  # images in the dataset
    wanted: int  # frames that would bring it to the middle of its range
    cap: int  # wanted, capped by max_per_category

    def reason(self) -> str:
        """'full-body: short of target 25-30% by 3 images' (images to reach the range's low end)."""
        lo, hi = self.target
        short = max(1, math.ceil((lo * self.total - self.count) / (1.0 - lo) - 1e-9)) if lo < 1 else self.cap
        return (f"{B.label(self.category)}: short of target {lo:.0%}-{hi:.0%} by {short} "
                f"image{'s' if short != 1 else ''}")


def needs(tally: B.Tally, targets: Mapping[str, Sequence[float]], max_per_category: int) -> list[Need]:
    """The categories under their targets, in category order, with the frames each lacks."""
    out = []
    for cat, (lo, hi) in targets.items():
        share = tally.share(cat)
        if B.status_of(share, (lo, hi)) != "under":
            continue
        k, n = tally.counts.get(cat, 0.0), tally.total
        mid = (lo + hi) / 2.0
        wanted = max_per_category if mid >= 1.0 else max(1, math.ceil((mid * n - k) / (1.0 - mid) - 1e-9))
        out.append(Need(cat, round(share, 4), (float(lo), float(hi)), int(k), int(n), wanted,
                        min(wanted, int(max_per_category))))
    return out


@dataclass
class Candidate:
    """A frame that passed every gate and fills at least one needed category."""

    video: str  # the video's path as the spec names it
    frame_index: int
    timestamp_s: float
    record: dict[str, Any]  # the analysis record (analyze's format)
    fills: list[str]  # the needed categories it has
    picked_for: str = ""  # the category diverse() took it for

    @property
    def quality(self) -> float:
        return float(self.record["quality"])


@dataclass
class ScanStats:
    """What one video offered: frames sampled, and how many each filter took away."""

    video: str
    sampled: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # curate's gate reason -> frames
    unneeded: int = 0  # passed the gates, but fill no needed category
    candidates: int = 0
    per_category: dict[str, int] = field(default_factory=dict)  # needed category -> candidate frames
    error: str | None = None  # the video could not be read (it is skipped)

    def as_dict(self) -> dict[str, Any]:
        return {"video": self.video, "sampled": self.sampled, "rejected": self.rejected, "unneeded": self.unneeded,
                "candidates": self.candidates, "per_category": self.per_category, "error": self.error}


def scan(frames: Iterable[Any], video: str, analyze: Callable[[Any], dict[str, Any]],
         gate: Callable[[dict[str, Any]], tuple[str, str] | None], wanted: set[str],
         stats: ScanStats) -> list[Candidate]:
    """Candidates among ``frames`` (runner.video.decode.Frame): ``analyze(rgb)`` gives the record
    (with its ``quality``), ``gate(record)`` a (reason, detail) when curate would drop it."""
    out = []
    for fr in frames:
        stats.sampled += 1
        rec = analyze(fr.rgb)
        fail = gate(rec)
        if fail:
            stats.rejected[fail[0]] = stats.rejected.get(fail[0], 0) + 1
            continue
        fills = [c for c in rec["categories"] if c in wanted]
        if not fills:
            stats.unneeded += 1
            continue
        stats.candidates += 1
        for c in fills:
            stats.per_category[c] = stats.per_category.get(c, 0) + 1
        out.append(Candidate(video, fr.index, round(fr.timestamp_ms / 1000.0, 3), rec, fills))
    return out


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def diverse(candidates: Sequence[Candidate], caps: Mapping[str, int], *, min_gap_s: float, dedupe_hamming: int,
            dataset_hashes: Sequence[str] = ()) -> tuple[list[Candidate], dict[str, int]]:
    """The best candidates per needed category, temporally spaced and not near-duplicates.

    Greedy by quality: a candidate is taken for the first of its categories with room left, when it
    is ``min_gap_s`` or more from every pick of the same video and its perceptual hash is farther
    than ``dedupe_hamming`` from every dataset image and every pick. Returns (picks, frames each
    category lost to spacing or near-duplicates)."""
    picked: list[Candidate] = []
    left = dict(caps)
    lost: dict[str, int] = {}
    hashes = list(dataset_hashes)
    for cand in sorted(candidates, key=lambda c: (-c.quality, c.video, c.frame_index)):
        cat = next((c for c in cand.fills if left.get(c, 0) > 0), None)
        if cat is None:
            continue
        close = any(p.video == cand.video and abs(p.timestamp_s - cand.timestamp_s) < min_gap_s for p in picked)
        dup = dedupe_hamming > 0 and any(hamming(cand.record["phash"], h) <= dedupe_hamming for h in hashes)
        if close or dup:
            lost[cat] = lost.get(cat, 0) + 1
            continue
        cand.picked_for = cat
        picked.append(cand)
        hashes.append(cand.record["phash"])
        left[cat] -= 1
    return picked, lost


def choose(entries: Sequence[Mapping[str, Any]], picks: Sequence[Candidate], targets: Mapping[str, Sequence[float]]
           ) -> list[Candidate]:
    """The picks the shot-balance search adds (never leaving a targeted category farther off)."""
    rows = [({"categories": list(p.record["categories"]), "repeats": 1, "_i": i}, (-p.quality, i))
            for i, p in enumerate(picks)]
    added, _ = B.add(list(entries), rows, targets)
    return [picks[e["_i"]] for e in sorted(added, key=lambda e: e["_i"])]


def could_not_supply(need_list: Sequence[Need], chosen: Sequence[Candidate], stats: Sequence[ScanStats],
                     lost: Mapping[str, int]) -> list[str]:
    """One sentence per needed category the videos left short, saying why."""
    got: dict[str, int] = {}
    for c in chosen:
        for cat in c.fills:
            got[cat] = got.get(cat, 0) + 1
    n_videos = len(stats)
    sampled = sum(s.sampled for s in stats)
    out = []
    for nd in need_list:
        have = got.get(nd.category, 0)
        if have >= nd.wanted:
            continue
        found = sum(s.per_category.get(nd.category, 0) for s in stats)
        what = f"{B.label(nd.category)}: {have} of {nd.wanted} wanted"
        if not found:
            why = (f"no frame of the character passing the gates is {B.label(nd.category)} in {n_videos} "
                   f"video{'s' if n_videos != 1 else ''} ({sampled} frames sampled)")
        elif have < nd.cap and lost.get(nd.category):
            why = (f"{found} candidate frame(s), {lost[nd.category]} too close in time (min_gap_s) or near-duplicates")
        elif have >= nd.cap:
            why = f"capped at max_per_category {nd.cap}"
        else:
            why = f"{found} candidate frame(s); adding more would push another targeted category farther off"
        out.append(f"{what}: {why}")
    return out
