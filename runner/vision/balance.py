"""Shot balance: the table, each category's distance to its target, and the one search that every
balancing strategy runs (docs/analysis.md, "Shot balance").

A dataset is a multiset of weighted items (weight = repeat count), each with categories: one shot
type plus any flags. A category's *share* is its weight over the total weight, and its *distance*
to a target ``[lo, hi]`` is ``max(0, lo - share, share - hi)``: 0 anywhere inside the range.

Each strategy is a set of levers (:class:`Option`: drop the images of a category set one by
one, give a category set one more repeat, add the crops or mirrored copies of a category set one
by one) and the same search, :func:`plan`: steepest descent over one-step changes, once strictly
(no step may push any targeted category farther off) and a few times with a penalty for doing so
(two steps that each dilute the other category may together help both). Only an end state in
which **no targeted category is farther from its target than at the start** is accepted, and
"no change" always is, so the result is never worse on any category, whatever the data and
targets. Past the range edge, the strategies that add data keep going to the midpoints of the
categories that started off target (from the side they started on); ``select`` stops at the edge
(it would otherwise drop good images). :func:`shortfalls` says why a category stays off target:
no single move could help it, or every one that would help pushes the named categories farther.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from runner.vision.shots import CATEGORIES, FLAGS

EPS = 1e-9
Targets = Mapping[str, Sequence[float]]


# --------------------------------------------------------------------------- the table


@dataclass
class BalanceRow:
    category: str
    count: float  # effective count (repeats counted)
    share: float
    target: tuple[float, float] | None
    status: str  # ok | under | over | "" (no target)


def status_of(share: float, target: Sequence[float] | None, tol: float = EPS) -> str:
    if not target:
        return ""
    lo, hi = target
    if share < lo - tol:
        return "under"
    if share > hi + tol:
        return "over"
    return "ok"


def shot_balance_table(items: Iterable[tuple[Sequence[str], float]], targets: Targets) -> list[BalanceRow]:
    """Rows for every shot type plus every flag with a target or a non-zero count.

    ``items`` are (categories, weight) per image; weight is the repeat count (1 without reweighting).
    """
    tally = Tally.of(items)
    rows = []
    for c in CATEGORIES:
        if c in FLAGS and c not in targets and not tally.counts.get(c):
            continue
        share = tally.share(c)
        tgt = tuple(targets[c]) if c in targets else None
        rows.append(BalanceRow(c, tally.counts.get(c, 0.0), round(share, 4), tgt, status_of(share, tgt)))  # type: ignore[arg-type]
    return rows


def table_json(rows: list[BalanceRow]) -> list[dict[str, Any]]:
    return [{"category": r.category, "count": r.count, "share": r.share,
             "target": list(r.target) if r.target else None, "status": r.status} for r in rows]


# --------------------------------------------------------------------------- distances and moves


LABELS = {"extreme_close_up": "extreme close-up", "close_up": "close-up", "full_body": "full-body",
          "multi_character": "multi-character", "complex_background": "complex-background"}


def label(category: str) -> str:
    """The category as a reader says it: full_body -> "full-body"."""
    return LABELS.get(category, category.replace("_", " "))


def distance(share: float, target: Sequence[float]) -> float:
    lo, hi = target
    return max(0.0, lo - share, share - hi)


@dataclass
class Tally:
    """Weighted category counts of a dataset."""

    counts: dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    @classmethod
    def of(cls, items: Iterable[tuple[Sequence[str], float]]) -> "Tally":
        t = cls()
        for cats, w in items:
            t.add(cats, w)
        return t

    def add(self, cats: Sequence[str], weight: float) -> None:
        self.total += weight
        for c in cats:
            self.counts[c] = self.counts.get(c, 0.0) + weight

    def after(self, cats: Sequence[str], weight: float) -> "Tally":
        t = Tally(dict(self.counts), self.total)
        t.add(cats, weight)
        return t

    def share(self, c: str) -> float:
        return self.counts.get(c, 0.0) / self.total if self.total > EPS else 0.0

    def distances(self, targets: Targets) -> dict[str, float]:
        return {c: distance(self.share(c), t) for c, t in targets.items()}


@dataclass(frozen=True)
class Option:
    """One lever of a strategy: taking it ``level`` times (0..``limit``) adds ``level * weight`` to
    every category in ``cats`` (a negative weight removes). ``payloads[:level]`` are what it takes
    (the images dropped or added, in order); ``rank`` orders options of equal effect."""

    cats: tuple[str, ...]
    weight: float
    limit: int
    payloads: tuple = ()
    rank: tuple = ()


@dataclass
class Plan:
    levels: list[int]
    tally: Tally
    shortfalls: list["Shortfall"]

    def taken(self, options: Sequence[Option]) -> list[Any]:
        return [p for o, n in zip(options, self.levels) for p in o.payloads[:n]]


@dataclass(frozen=True)
class Shortfall:
    """A category still off target after balancing, and why."""

    category: str
    share: float
    target: tuple[float, float]
    status: str  # under | over
    count: float
    blockers: tuple[str, ...]  # categories that every helping move would push farther off
    helping_moves: int  # single moves that would bring it closer (0: nothing could)


# Searches run with these penalties per unit of distance a category ends farther off than at the
# start; inf is the strict search, in which no step may push any category farther. A relaxed
# search may pass through worse states (raising full-body and close-up at once needs two steps,
# each of which alone dilutes the other); only an end state no farther on every category counts.
PENALTIES = (math.inf, 16.0, 4.0, 1.0)
MID_WEIGHT = 0.05  # cost per unit of midpoint gap of the categories that started off target
MAX_STEPS = 20_000


def plan(start: Tally, targets: Targets, options: Sequence[Option], *, focus: Mapping[str, str] | None = None,
         keep: Iterable[str] = ()) -> Plan:
    """The levels of ``options`` that bring ``start`` closest to ``targets`` while no targeted
    category ends farther off than it started, and no category in ``keep`` loses its last image.

    ``focus`` maps the categories that started off target to their side (under | over); the
    strategies that add data pass it, so those categories are brought on to their midpoints from
    that side. Among the searches' end states the valid one with the smallest summed distance
    (then midpoint gap, then fewest changes) wins; all levels 0 (no change) is always valid.
    """
    focus, keep = dict(focus or {}), set(keep)
    d0 = start.distances(targets)
    best: tuple[tuple[float, float, int], list[int], Tally] = ((_sum(d0), _mid(start, targets, focus), 0),
                                                              [0] * len(options), start)
    for penalty in PENALTIES:
        levels, tally = _descend(start, targets, options, focus, keep, d0, penalty)
        d1 = tally.distances(targets)
        if all(d1[c] <= d0[c] + EPS for c in targets):
            score = (_sum(d1), _mid(tally, targets, focus), sum(levels))
            if score < best[0]:
                best = (score, levels, tally)
    _, levels, tally = best
    return Plan(levels, tally, shortfalls(tally, targets, _forward(options, levels, tally, keep)))


def _sum(d: Mapping[str, float]) -> float:
    return round(sum(d.values()), 9)


def _mid(tally: Tally, targets: Targets, focus: Mapping[str, str]) -> float:
    return round(sum(_midpoint_gap(tally, c, targets[c], side) for c, side in focus.items()), 9)


def _midpoint_gap(tally: Tally, c: str, target: Sequence[float], side: str) -> float:
    """How far a category that started ``side`` (under | over) of its target still is from the
    midpoint, on that side (0 once it reaches or passes the midpoint)."""
    gap = (target[0] + target[1]) / 2.0 - tally.share(c)
    return max(0.0, gap if side == "under" else -gap)


def _feasible(tally: Tally, keep: set[str]) -> bool:
    return tally.total >= 1.0 - EPS and all(tally.counts.get(c, 0.0) >= 1.0 - EPS for c in keep)


def _cost(tally: Tally, targets: Targets, d0: Mapping[str, float], focus: Mapping[str, str],
          penalty: float) -> float | None:
    d = tally.distances(targets)
    worse = sum(max(0.0, d[c] - d0[c] - EPS) for c in targets)
    if worse > 0 and penalty == math.inf:
        return None
    return sum(d.values()) + (penalty * worse if worse > 0 else 0.0) + MID_WEIGHT * _mid(tally, targets, focus)


def _descend(start: Tally, targets: Targets, options: Sequence[Option], focus: Mapping[str, str], keep: set[str],
             d0: Mapping[str, float], penalty: float) -> tuple[list[int], Tally]:
    """Steepest descent over one-level steps (up or down) of any option."""
    levels = [0] * len(options)
    tally = start
    cost = _cost(tally, targets, d0, focus, penalty) or 0.0
    for _ in range(MAX_STEPS):
        best: tuple[float, tuple, int, int, Tally] | None = None
        for i, o in enumerate(options):
            for step in (1, -1):
                if not 0 <= levels[i] + step <= o.limit:
                    continue
                t = tally.after(o.cats, step * o.weight)
                c = _cost(t, targets, d0, focus, penalty) if _feasible(t, keep) else None
                if c is not None and c < cost - EPS and (best is None or (c, o.rank) < (best[0], best[1])):
                    best = (c, o.rank, i, step, t)
        if best is None:
            break
        cost, _, i, step, tally = best
        levels[i] += step
    return levels, tally


def _forward(options: Sequence[Option], levels: list[int], tally: Tally,
             keep: set[str]) -> list[tuple[tuple[str, ...], float]]:
    """The single moves still possible from the plan's end (for :func:`shortfalls`)."""
    return [(o.cats, o.weight) for o, n in zip(options, levels)
            if n < o.limit and _feasible(tally.after(o.cats, o.weight), keep)]


def shortfalls(tally: Tally, targets: Targets, moves: Iterable[tuple[tuple[str, ...], float]] = ()) -> list[Shortfall]:
    """The categories off target in ``tally``; for each, how many of ``moves`` would bring it
    closer and which categories those moves would push farther off (most often first)."""
    d0 = tally.distances(targets)
    after = [tally.after(cats, w).distances(targets) for cats, w in moves]
    out = []
    for c in (c for c in CATEGORIES if c in targets and d0[c] > EPS):
        blocked: dict[str, int] = {}
        helping = [d1 for d1 in after if d1[c] < d0[c] - EPS]
        for d1 in helping:
            for o in targets:
                if d1[o] > d0[o] + EPS:
                    blocked[o] = blocked.get(o, 0) + 1
        ranked = tuple(sorted(blocked, key=lambda o: (-blocked[o], CATEGORIES.index(o))))
        out.append(Shortfall(c, round(tally.share(c), 4), (targets[c][0], targets[c][1]),
                             status_of(tally.share(c), targets[c]), tally.counts.get(c, 0.0), ranked, len(helping)))
    return out


def off_target(tally: Tally, targets: Targets) -> dict[str, str]:
    """{category: under | over} for the categories outside their target range."""
    return {c: status_of(tally.share(c), targets[c]) for c, d in tally.distances(targets).items() if d > EPS}


# --------------------------------------------------------------------------- the strategies


def signature(item: Mapping[str, Any]) -> tuple[str, ...]:
    """An item's categories in CATEGORIES order: images with the same signature are interchangeable."""
    return tuple(sorted(set(item["categories"]), key=CATEGORIES.index))


def _groups(items: Iterable[Mapping[str, Any]], order: Callable[[Any], Any]) -> dict[tuple[str, ...], list[Any]]:
    groups: dict[tuple[str, ...], list[Any]] = {}
    for it in items:
        groups.setdefault(signature(it), []).append(it)
    return {g: sorted(v, key=order)
            for g, v in sorted(groups.items(), key=lambda gv: [CATEGORIES.index(c) for c in gv[0]])}


def select(items: list[dict[str, Any]], targets: Targets, score_key: str = "quality", *,
           pinned: Callable[[Mapping[str, Any]], bool] = lambda it: False
           ) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]], list[Shortfall]]:
    """Drop images, lowest ``score_key`` first within each category set, where that brings the
    categories closer to their targets and none farther. Never drops a ``pinned`` image (one a
    reviewer keeps) or the last image of a category that has no target or a target above 0.
    Returns (kept, [(dropped item, the category it was dropped for)], shortfalls)."""
    start = Tally.of((it["categories"], 1.0) for it in items)
    groups = _groups((it for it in items if not pinned(it)), lambda it: (it.get(score_key, 0.0), str(it.get("id", ""))))
    options = [Option(g, -1.0, len(v), tuple(v), (v[0].get(score_key, 0.0),)) for g, v in groups.items()]
    keep = {c for c, n in start.counts.items() if n > 0 and (c not in targets or targets[c][0] > EPS)}
    result = plan(start, targets, options, keep=keep)
    dropped = result.taken(options)
    gone = {id(it) for it in dropped}
    status = off_target(start, targets)
    return ([it for it in items if id(it) not in gone], [(it, _dropped_for(it, status)) for it in dropped],
            result.shortfalls)


def _dropped_for(item: Mapping[str, Any], status: Mapping[str, str]) -> str:
    """The category an image was dropped for: one of its own that was over, else one it lacks
    that was under (dropping other images raises its share)."""
    cats = set(item["categories"])
    over = [c for c in CATEGORIES if status.get(c) == "over" and c in cats]
    under = [c for c in CATEGORIES if status.get(c) == "under" and c not in cats]
    return (over or under or [next(iter(status), "")])[0]


def reweight(items: list[dict[str, Any]], targets: Targets, *, max_repeats: int = 20
             ) -> tuple[dict[tuple[str, ...], int], list[Shortfall]]:
    """Repeat counts per category set (images with the same shot type and flags share one), each
    1..``max_repeats``, that bring the effective shares closest to the targets (on to the
    midpoints of the categories that started off target) with none farther off.
    Returns ({category set: repeats}, shortfalls)."""
    groups = _groups(items, lambda it: str(it.get("id", "")))
    start = Tally.of((g, float(len(v))) for g, v in groups.items())
    options = [Option(g, float(len(v)), max(0, max_repeats - 1), rank=(i,)) for i, (g, v) in enumerate(groups.items())]
    result = plan(start, targets, options, focus=off_target(start, targets))
    return {g: 1 + n for g, n in zip(groups, result.levels)}, result.shortfalls


def add(items: list[dict[str, Any]], candidates: Sequence[tuple[dict[str, Any], tuple]], targets: Targets
        ) -> tuple[list[dict[str, Any]], list[Shortfall]]:
    """Derived images to add: ``candidates`` are (entry, rank) with the entry's own categories;
    the best-ranked of each category set is added first. Adds those that bring the shares closest
    to the targets (on to the midpoints of the categories that started off target) with none
    farther off; without targets, every candidate. Returns (added entries, shortfalls)."""
    if not targets:
        return [c for c, _ in candidates], []
    ranks = {id(c): r for c, r in candidates}
    groups = _groups((c for c, _ in candidates), lambda c: ranks[id(c)])
    start = Tally.of((it["categories"], float(it.get("repeats", 1))) for it in items)
    options = [Option(g, 1.0, len(v), tuple(v), ranks[id(v[0])]) for g, v in groups.items()]
    result = plan(start, targets, options, focus=off_target(start, targets))
    return result.taken(options), result.shortfalls
