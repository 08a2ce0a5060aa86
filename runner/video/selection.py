"""Which frames of one person are saved: buckets, anchors, challenge, and when to stop.

Policy for a candidate (a frame that passed the loose gate with stable identity), in its
(yaw, pitch, expression) bucket:

1. the bucket is empty -> save it;
2. it is not novel next to the bucket's nearest item (general-vision distance < ``novelty_add``)
   but of better quality -> it replaces that item;
3. it is novel and the bucket has room (``max_per_bucket``, default 2) -> add it;
4. it is novel, the bucket is full, and it beats the bucket's worst item -> replace that one;
5. otherwise skip it.

Anchors (3-5) come from a separate pool: strict gate, near-frontal, open eyes, no occlusion,
normal light, best quality first, no two within ``anchor_min_gap`` frames. Challenge (5-8) keeps
stable frames with an extreme pose, occlusion, bad light or only the loose gate passed
(CHALLENGE_KINDS), round robin over those kinds, best quality first, each at least
``challenge_min_gap`` frames from the others and novel next to them or from another moment (see
``Selector._diverse``): several moments, not one moment four times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runner.video.buckets import AXES, Bins
from runner.video.stability import l2n


#: What makes a stable frame a challenge frame, in the order the round robin visits them: a turned
#: head (|yaw| >= 30 or |pitch| > 20), heavy or partial occlusion (a microphone, a phone, the frame
#: edge), bad light, and frames that passed only the loose gate (a small, soft or weakly detected
#: face).
CHALLENGE_KINDS = ("extreme_pose", "heavy_occlusion", "dark", "overexposed", "partial_occlusion",
                   "below_strict_gate")


@dataclass
class Candidate:
    person: int
    frame_idx: int
    timestamp_ms: float
    bins: Bins
    quality: float
    stable: float
    strict: bool
    extreme_pose: bool
    general: np.ndarray = field(repr=False)  # L2-normalized general-vision embedding
    crop: Any = field(default=None, repr=False)  # RGB crop (np.ndarray), kept only while saved
    face_bbox: tuple[float, float, float, float] = (0, 0, 0, 0)
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    novelty: float = 1.0
    yaw: float = 0.0
    pitch: float = 0.0
    measures: dict[str, Any] = field(default_factory=dict)
    detector: str = ""  # as FaceObs.detector
    admitted: dict[str, Any] | None = None  # as FaceObs.admitted: under tau, identity carried by the track

    def challenge_kinds(self) -> list[str]:
        """What makes this frame hard, in CHALLENGE_KINDS order (empty: not a challenge frame)."""
        hard = {"extreme_pose": self.extreme_pose, "heavy_occlusion": self.bins.occlusion == 2,
                "dark": self.bins.lighting == 1, "overexposed": self.bins.lighting == 2,
                "partial_occlusion": self.bins.occlusion == 1, "below_strict_gate": not self.strict}
        return [k for k in CHALLENGE_KINDS if hard[k]]


@dataclass
class StopRule:
    yaw: int = 6
    pitch: int = 4
    expression: int = 3
    anchors: int = 3
    novelty_window: int = 20
    novelty_below: float = 0.08


class Selector:
    def __init__(
        self,
        *,
        max_per_bucket: int = 2,
        novelty_add: float = 0.15,
        anchors_max: int = 5,
        anchor_min_gap: int = 15,
        challenge_max: int = 8,
        challenge_min_gap: int = 15,
        stop: StopRule | None = None,
    ) -> None:
        self.max_per_bucket = max_per_bucket
        self.novelty_add = novelty_add
        self.anchors_max = anchors_max
        self.anchor_min_gap = anchor_min_gap
        self.challenge_max = challenge_max
        self.challenge_min_gap = challenge_min_gap
        self.stop = stop or StopRule()
        self.buckets: dict[tuple[int, int, int], list[Candidate]] = {}
        self.anchor_pool: list[Candidate] = []
        self.challenge_pool: dict[str, list[Candidate]] = {}
        self.novelty_history: list[float] = []
        self.actions: dict[str, int] = {}

    # ------------------------------------------------------------------ what is saved now
    def coverage(self) -> list[Candidate]:
        out = []
        for key in sorted(self.buckets):
            out.extend(sorted(self.buckets[key], key=lambda c: -c.quality))
        return out

    def anchors(self) -> list[Candidate]:
        picked: list[Candidate] = []
        for c in sorted(self.anchor_pool, key=lambda c: (-c.quality, c.frame_idx)):
            if all(abs(c.frame_idx - p.frame_idx) >= self.anchor_min_gap for p in picked):
                picked.append(c)
            if len(picked) >= self.anchors_max:
                break
        return picked

    def challenge(self) -> list[Candidate]:
        """Round robin over the challenge kinds, best quality first, diverse (see _diverse)."""
        queues = [sorted(self.challenge_pool[k], key=lambda c: (-c.quality, c.frame_idx))
                  for k in CHALLENGE_KINDS if k in self.challenge_pool]
        picked: list[Candidate] = []
        while len(picked) < self.challenge_max and any(queues):
            for q in queues:
                while q and not self._diverse(q[0], picked):
                    q.pop(0)
                if q and len(picked) < self.challenge_max:
                    picked.append(q.pop(0))
        return picked

    def _diverse(self, c: Candidate, picked: list[Candidate]) -> bool:
        """At least ``challenge_min_gap`` frames from every picked one, and either novel next to it
        (general-vision distance >= ``novelty_add``) or another moment of the clip (at least 2 x
        ``challenge_min_gap`` away: the cheap fallback descriptor reads a whole shot as one look)."""
        def apart(p: Candidate) -> bool:
            gap = abs(c.frame_idx - p.frame_idx)
            return gap >= self.challenge_min_gap and (
                gap >= 2 * self.challenge_min_gap or 1.0 - float(l2n(c.general) @ l2n(p.general)) >= self.novelty_add)

        return all(apart(p) for p in picked)

    def saved(self) -> list[Candidate]:
        seen: dict[int, Candidate] = {}
        for c in [*self.anchors(), *self.coverage(), *self.challenge()]:
            seen.setdefault(c.frame_idx, c)
        return list(seen.values())

    def saved_embeddings(self) -> np.ndarray:
        s = self.saved()
        return np.stack([c.general for c in s]) if s else np.zeros((0, 1))

    def filled(self) -> dict[str, int]:
        keys = list(self.buckets)
        return {
            "yaw": len({k[0] for k in keys}),
            "pitch": len({k[1] for k in keys}),
            "expression": len({k[2] for k in keys}),
            "occlusion": len({c.bins.occlusion for c in self.coverage()}),
            "lighting": len({c.bins.lighting for c in self.coverage()}),
        }

    # ------------------------------------------------------------------ the policy
    def offer(self, c: Candidate) -> str:
        """Offer one candidate (its ``novelty`` already set); returns the action taken."""
        self.novelty_history.append(c.novelty)
        action = self._offer_bucket(c)
        if c.strict and c.bins.near_frontal and c.bins.occlusion == 0 and c.bins.lighting == 0 \
                and c.bins.expression in (0, 1):
            self.anchor_pool.append(c)
            self.anchor_pool.sort(key=lambda a: -a.quality)
            del self.anchor_pool[self.anchors_max * 4:]
            action += "+anchor_pool"
        for kind in c.challenge_kinds():
            self._add_challenge(kind, c)
            action += f"+challenge:{kind}"
        self.actions[action.split("+")[0]] = self.actions.get(action.split("+")[0], 0) + 1
        return action

    def _add_challenge(self, kind: str, c: Candidate) -> None:
        pool = self.challenge_pool.setdefault(kind, [])
        pool.append(c)
        pool.sort(key=lambda a: -a.quality)
        del pool[self.challenge_max * 4:]  # room for diverse picks (challenge() spaces them)

    def _offer_bucket(self, c: Candidate) -> str:
        items = self.buckets.setdefault(c.bins.selection_key, [])
        if not items:
            items.append(c)
            return "save:new_bucket"
        sims = np.array([float(l2n(c.general) @ l2n(i.general)) for i in items])
        nearest = int(np.argmax(sims))
        dist = 1.0 - sims[nearest]
        if dist < self.novelty_add:
            if c.quality > items[nearest].quality:
                items[nearest] = c
                return "replace:better_quality"
            return "skip:not_novel"
        if len(items) < self.max_per_bucket:
            items.append(c)
            return "add:novel"
        worst = int(np.argmin([i.quality for i in items]))
        if c.quality > items[worst].quality:
            items[worst] = c
            return "replace:novel_better_than_worst"
        return "skip:bucket_full"

    # ------------------------------------------------------------------ stopping
    def missing(self) -> list[str]:
        """What the early-stop rule still waits for (empty: it may stop)."""
        f = self.filled()
        s = self.stop
        out = []
        for axis, need in (("yaw", s.yaw), ("pitch", s.pitch), ("expression", s.expression)):
            if f[axis] < need:
                out.append(f"{axis} buckets {f[axis]}/{len(AXES[axis])} (need {need})")
        n_anchor = len(self.anchors())
        if n_anchor < s.anchors:
            out.append(f"anchors {n_anchor} (need {s.anchors})")
        recent = self.novelty_history[-s.novelty_window:]
        if len(recent) < s.novelty_window:
            out.append(f"only {len(self.novelty_history)} candidates (need {s.novelty_window} for the novelty window)")
        elif float(np.mean(recent)) >= s.novelty_below:
            out.append(f"mean novelty of the last {s.novelty_window} candidates "
                       f"{float(np.mean(recent)):.3f} (need < {s.novelty_below})")
        return out

    def should_stop(self) -> bool:
        return not self.missing()


def conditioning_ratio(base: tuple[int, int, int] | list[int], *, anchors: int, challenge: int,
                       yaw_filled: int, adjust: bool = True, min_anchors: int = 3) -> dict[str, Any]:
    """anchor:coverage:challenge shares for identity-adapter conditioning (default 20:70:10).

    Adjustments (when ``adjust``), each recorded in "adjustments":
    - fewer anchors than ``min_anchors``: the anchor share shrinks in proportion, coverage gets it;
    - no challenge image: the challenge share goes to coverage;
    - thin pose coverage (fewer than 4 of 7 yaw buckets): anchors +10 from coverage, since the
      frontal identity is then the more reliable signal.
    """
    a, c, ch = (float(x) for x in base)
    notes = []
    if adjust:
        if yaw_filled < 4 and anchors >= min_anchors:
            shift = min(10.0, c)
            a, c = a + shift, c - shift
            notes.append(f"yaw coverage {yaw_filled}/7 < 4: anchors +{shift:g} from coverage")
        if anchors < min_anchors:
            keep = a * anchors / float(min_anchors)
            c += a - keep
            notes.append(f"{anchors} anchors < {min_anchors}: anchor share {a:g} -> {keep:g}")
            a = keep
        if challenge == 0 and ch > 0:
            c += ch
            notes.append("no challenge images: challenge share moved to coverage")
            ch = 0.0
    total = a + c + ch or 1.0
    return {
        "base": [float(x) for x in base],
        "anchor": round(100.0 * a / total, 2),
        "coverage": round(100.0 * c / total, 2),
        "challenge": round(100.0 * ch / total, 2),
        "adjustments": notes,
    }


#: The challenge set the ride design asks for holds 5-8 images "when the clip has them".
CHALLENGE_MIN = 5


def challenge_report(timeline: list[dict[str, Any]], taken: list[int], *, fps: float,
                     challenge_max: int, stopped_early: bool = False) -> dict[str, Any]:
    """How many distinct hard moments the person's frames offered, and why the set is short.

    ``timeline`` is the person's timeline (an offered hard frame's action names its challenge
    kinds), ``taken`` the challenge frames saved. ``moments``: the most hard frames that are
    pairwise a second or more apart (beyond a second the selector's spacing always lets a frame
    in; within it only a novel one), counted greedily in time order, which is the maximum. A set
    under CHALLENGE_MIN gets a ``note`` saying the clip offered no more, instead of being padded
    with repeats of one moment.
    """
    hard = sorted(e["frame_idx"] for e in timeline if "challenge:" in str(e.get("action", "")))
    second = 2 * max(1, int(round(fps / 2)))
    moments, last = 0, None
    for f in hard:
        if last is None or f - last >= second:
            moments, last = moments + 1, f
    unconfirmed = sum(1 for e in timeline if str(e.get("action", "")).startswith("unstable"))
    out = {"wanted": f"{CHALLENGE_MIN}-{challenge_max}", "hard_frames": len(hard), "moments": moments, "note": ""}
    if len(taken) < CHALLENGE_MIN:
        out["note"] = (f"{len(taken)} challenge image(s), under {CHALLENGE_MIN}: the {len(hard)} hard frame(s) that "
                       f"passed the gates and the identity check hold {moments} moment(s) a second or more apart"
                       + (f"; {unconfirmed} frame(s) under tau, not tied to a confirmed frame by the track, are not "
                          "used" if unconfirmed else "")
                       + (f"; {moments - len(taken)} more would have needed frames within a second of a taken "
                          "one that look alike" if moments > len(taken) else "")
                       + ("; the early stop ended the selection before the end of the clip" if stopped_early else ""))
    return out
