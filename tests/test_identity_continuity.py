"""A turned face under tau is admitted only when its track carries the identity
(runner.video.stability.mark_continuity_admissions): an unbroken chain of same-track links, each
at least tau alike, to a frame that passed tau; |yaw| >= 30; and at least the calibrated profile
floor. Synthetic chains check each condition; real faces check that no other person is admitted
when pasted into a real track where the person was."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from runner.video.stability import PROFILE_YAW, mark_continuity_admissions, profile_floor, stability
from runner.video.tracking import FaceObs, Track
from runner.vision.faces import IDENTITY_THRESHOLDS, PROFILE_FLOORS

TAU = IDENTITY_THRESHOLDS["dlib"]
FLOOR = PROFILE_FLOORS["dlib"]
REPO = Path(__file__).resolve().parents[1]

# An orthonormal frame: the person's prototype P, the direction their face drifts in as they
# turn (U), and two strangers' directions (V, W).
P, U, V, W = np.eye(8)[:4]


def toward(axis: np.ndarray, cos: float) -> np.ndarray:
    """A unit embedding at cosine ``cos`` to P, leaning toward ``axis``."""
    return cos * P + math.sqrt(1.0 - cos * cos) * axis


def track(faces: list[tuple[np.ndarray, float]], *, step: int = 5, box_shift: float = 0.0,
          grow: float = 1.0) -> Track:
    t = Track(0)
    for k, (emb, yaw) in enumerate(faces):
        x, side = 100.0 + k * box_shift, 80.0 * grow ** k
        t.add(FaceObs(k * step, k * step * 40.0, (x, 100.0, x + side, 100.0 + side), 1.0, emb, yaw=yaw, pitch=0.0), k)
    return t


def admitted(t: Track, floor: float | None = FLOOR, max_gap_frames: int = 20) -> dict[int, dict]:
    mark_continuity_admissions([t], P, tau=TAU, floor=floor, max_gap_frames=max_gap_frames)
    return {o.frame_idx: o.admitted for o in t.observations if o.admitted is not None}


def turn(cos_end: float = 0.89, yaw_end: float = 40.0, axis: np.ndarray = U, n_verified: int = 3) -> list:
    """Verified frames, then a head turn in small steps down to ``cos_end`` at ``yaw_end``."""
    faces = [(toward(U, 0.97), 0.0)] * n_verified
    steps = np.linspace(0.94, cos_end, 4)
    return faces + [(toward(axis, c), yaw_end * (k + 1) / 4) for k, c in enumerate(steps)]


def test_a_head_turn_continuous_with_verified_frames_is_admitted_with_its_chain() -> None:
    got = admitted(track(turn()))
    # the turn: frames 15 (0.94, yaw 10), 20 (0.92, yaw 20) pass tau; 25 (0.91, yaw 30) and 30 (0.89, yaw 40) do not
    assert sorted(got) == [25, 30], got
    last = got[30]
    assert last["rule"] == "track_continuity" and last["via_frame"] == 20 and last["via_stable"] >= TAU
    assert last["links"] == 2 and last["min_link"] >= TAU and last["floor"] == FLOOR
    assert FLOOR <= last["stable"] < TAU and abs(last["yaw"]) >= PROFILE_YAW


def test_the_chain_also_runs_backwards_in_time() -> None:
    t = track(list(reversed(turn())))
    got = admitted(t)
    assert sorted(got) == [0, 5] and got[0]["via_frame"] == 10


@pytest.mark.parametrize("case", ["frontal", "under_floor", "stranger_cut", "box_jump", "box_doubles", "gap",
                                  "no_floor", "no_verified_frame"])
def test_no_admission_without_every_condition(case: str) -> None:
    faces = turn()
    kw: dict = {}
    if case == "frontal":  # the same chain, but the face never turns: a low score is not excused
        faces = turn(yaw_end=20.0)
    elif case == "under_floor":
        faces = turn(cos_end=FLOOR - 0.02)
    elif case == "stranger_cut":  # someone else where the person was, at the same box, turned
        faces = faces[:3] + [(toward(V, c), 40.0) for c in (0.90, 0.895, 0.89, 0.89)]
    elif case == "gap":
        kw["max_gap_frames"] = 4
    elif case == "no_floor":
        kw["floor"] = None
    elif case == "no_verified_frame":  # a track seen only in profile (as Hamilton's frames 30-40)
        faces = [(toward(U, c), 40.0) for c in (0.90, 0.895, 0.89)]
    t = track(faces, box_shift=70.0 if case == "box_jump" else 0.0, grow=1.6 if case == "box_doubles" else 1.0)
    got = admitted(t, **kw)
    if case == "under_floor":  # the turn's frames above the floor are admitted, the last is not
        assert t.observations[-1].frame_idx not in got and stability(t.observations[-1].embedding, P) < FLOOR
    else:
        assert got == {}, got


def test_a_stranger_chain_after_a_cut_is_not_admitted_even_when_it_is_continuous() -> None:
    # The person, a cut to a stranger who then turns: the stranger's own frames link to each other
    # at >= tau, but no verified frame of the person is on their side of the break.
    faces = turn()[:3] + [(toward(W, c), y) for c, y in ((0.905, 10.0), (0.90, 35.0), (0.895, 40.0))]
    assert admitted(track(faces)) == {}


def test_an_uncalibrated_backend_admits_nothing() -> None:
    assert profile_floor("dlib") == FLOOR and profile_floor("insightface") is None


def test_the_floor_is_the_calibrated_one() -> None:
    cal = json.loads((REPO / "bench" / "calibrate_identity" / "dlib.json").read_text())
    assert cal["profile_floor"] == FLOOR < cal["threshold"]
    assert cal["profile_floor_far_measured"] <= cal["profile_floor_far_target"]


# ----------------------------------------------------------------------------------------- real faces


#: Hamilton frames with another person's face, the region around it, and the face's size there:
#: Lin-Manuel Miranda's over-the-shoulder profile (about 220 px) and Barack Obama in the audience
#: (about 95 px), both found by dlib's CNN only.
HAMILTON_STRANGERS = {30: ((200, 40, 600, 360), 220), 40: ((200, 40, 600, 360), 210),
                      215: ((250, 0, 450, 200), 95), 235: ((250, 0, 450, 200), 90)}


@pytest.fixture(scope="module")
def real_faces(shared_data: Path) -> dict[str, list]:
    """dlib faces (embedding, yaw) of two people, each seen frontally in five or six frames of one
    shot: the carphone man (frames 0-40) and Lin-Manuel Miranda on stage (Hamilton frames
    180-210); and of strangers: Hamilton's profile (Lin's) and audience (Obama's) faces
    (HAMILTON_STRANGERS) and every face of the four group photos."""
    from PIL import Image

    from runner.video.decode import iter_frames
    from runner.vision.faces import get_face_backend

    backend = get_face_backend("dlib", upsample=1)

    def faces_of(found):
        return [(np.asarray(f.embedding, np.float64), float(f.pose.yaw)) for f in found]

    out: dict[str, list] = {"carphone": [], "lin": [], "lin_profile": [], "obama": [], "groups": []}
    for fr in iter_frames(shared_data / "video" / "carphone.mp4", wanted=set(range(0, 41, 8))):
        out["carphone"] += faces_of(backend.analyze(fr.rgb))[:1]
    for fr in iter_frames(shared_data / "video" / "short_hamilton_clip.mp4",
                          wanted={180, 190, 200, 205, 210, *HAMILTON_STRANGERS}):
        if fr.index not in HAMILTON_STRANGERS:
            out["lin"] += faces_of(backend.analyze(fr.rgb))[:1]
            continue
        (x0, y0, x1, y1), side = HAMILTON_STRANGERS[fr.index]
        roi = np.ascontiguousarray(fr.rgb[y0:y1, x0:x1])
        out["lin_profile" if fr.index < 100 else "obama"] += faces_of(
            backend.analyze_cnn(roi, scale=min(1.0, 90 / side)))[:1]
    for p in sorted((shared_data / "faces" / "groups").glob("*")):
        with Image.open(p) as im:
            out["groups"] += faces_of(backend.analyze(np.asarray(im.convert("RGB"))))
    return out


@pytest.mark.slow  # dlib's CNN on four crops and HOG on 15 images
@pytest.mark.parametrize("person,strangers", [("carphone", ("lin", "lin_profile", "obama", "groups")),
                                              ("lin", ("carphone", "obama", "groups"))])
def test_no_other_persons_face_is_admitted_into_a_real_track(real_faces: dict[str, list], person: str,
                                                             strangers: tuple[str, ...]) -> None:
    own = real_faces[person]
    others = [f for name in strangers for f in real_faces[name]]
    assert len(own) >= 5 and len(others) >= 14
    proto = own[0][0] / np.linalg.norm(own[0][0])
    assert all(stability(e, proto) >= TAU for e, _ in own), "the person's own frames are verified"
    over_floor = 0
    for emb, _ in others:
        # the stranger replaces the person at the same box, turned past the profile angle
        t = Track(0)
        for k, (e, y) in enumerate([*own, (emb, 40.0), (emb, 45.0)]):
            t.add(FaceObs(k * 5, k * 200.0, (60.0, 40.0, 110.0, 90.0), 1.0, e, yaw=y, pitch=0.0), k)
        mark_continuity_admissions([t], proto, tau=TAU, floor=FLOOR, max_gap_frames=20)
        assert all(o.admitted is None for o in t.observations)
        over_floor += stability(emb, proto) >= FLOOR
    if person == "lin":  # a group face passes the floor: the chain is what keeps it out
        assert over_floor >= 1


# ----------------------------------------------------------------------------------- challenge note


def _timeline(hard: list[int], unstable: int = 0) -> list[dict]:
    entries = [{"frame_idx": f, "action": "save:new_bucket+challenge:extreme_pose"} for f in hard]
    return entries + [{"frame_idx": 1000 + k, "action": "unstable (0.880 < tau 0.92)"} for k in range(unstable)]


@pytest.mark.parametrize("hard,taken,moments", [
    ([0, 5, 10, 15, 135, 210], [0, 135, 210], 3),  # Hamilton's: the wide shot, two turned heads
    (list(range(0, 120, 4)), [12, 44, 80, 112], 4),  # carphone's: one long hard stretch, 4 s
    (list(range(0, 300, 30)), [0, 30, 60, 90, 120, 150], 10),  # plenty: no note
])
def test_a_short_challenge_set_says_how_many_hard_moments_the_clip_had(hard, taken, moments) -> None:
    from runner.video.selection import challenge_report

    r = challenge_report(_timeline(hard, unstable=15), taken, fps=30.0, challenge_max=8, stopped_early=False)
    assert r["wanted"] == "5-8" and r["hard_frames"] == len(hard) and r["moments"] == moments
    if len(taken) >= 5:
        assert r["note"] == ""
    else:
        assert f"{len(taken)} challenge image(s), under 5" in r["note"] and f"hold {moments} moment(s)" in r["note"]
        assert "15 frame(s) under tau" in r["note"]
