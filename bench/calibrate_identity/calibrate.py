"""Calibrate a face backend's identity threshold on faces the tests never see.

    .venv/bin/python bench/calibrate_identity/calibrate.py --backend dlib [--far 0.001]

Data (derived here from files in ../shared/data/video, which no test uses for identity):

- *impostor pairs*: two faces in the same frame are two different people. The Hamilton clip's
  audience and stage shots hold up to a dozen faces a frame; every pair within a sampled frame
  counts, plus every carphone face against every Hamilton face (different clips, different men).
- *genuine pairs*: the carphone man against himself, frames at least 30 apart (one person, one
  face in every frame), to report what the threshold costs.

The threshold is the lowest value, rounded up to 0.01, whose false-accept rate on the impostor
pairs is at most ``--far``; with N pairs and none accepted the 95% upper bound on the true rate is
3/N (the rule of three), which is what the JSON reports as ``far_upper_95``.

The *profile floor* (``--profile-far``, default 0.5) is the same rule at a much looser rate: the
median stranger's score. The video identity builder admits a turned face (|yaw| >= 30) under the
threshold only when an unbroken chain of same-track links, each at least the threshold, ties it to
a frame that passed the threshold (runner.video.stability.continuity_admissions); the floor is the
second condition: such a face must still look at least as much like the person as a typical
stranger does. Writes
``bench/calibrate_identity/<backend>.json``; runner.vision.faces.IDENTITY_THRESHOLDS holds the
value the runner uses (tests/test_vision_identity_threshold.py checks they agree).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
VIDEO = ROOT.parent / "shared" / "data" / "video"
CLIPS = {"short_hamilton_clip.mp4": 3, "carphone.mp4": 6}  # clip: keep every n-th frame
# Audience faces down to 28 px (the curate gate keeps 48 and up): small faces look more alike, so
# the threshold errs strict.
MIN_FACE_PX = 28
UPSAMPLE = 2  # the HOG detector finds the audience's faces only on a 2x copy


def faces_of_clip(backend, clip: str, step: int) -> list[tuple[int, np.ndarray]]:
    """(frame index, embedding) of every face of at least MIN_FACE_PX in every step-th frame."""
    import av

    out = []
    with av.open(str(VIDEO / clip)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i % step:
                continue
            for f in backend.analyze(fr.to_ndarray(format="rgb24")):
                if f.height >= MIN_FACE_PX:
                    out.append((i, np.asarray(f.embedding, dtype=np.float64)))
    return out


def pair_scores(backend_name: str) -> dict[str, list[float]]:
    from runner.vision.faces import get_face_backend

    backend = get_face_backend(backend_name, upsample=UPSAMPLE)
    ham = faces_of_clip(backend, "short_hamilton_clip.mp4", CLIPS["short_hamilton_clip.mp4"])
    car = faces_of_clip(backend, "carphone.mp4", CLIPS["carphone.mp4"])
    impostor = [float(a[1] @ b[1]) for a, b in itertools.combinations(ham, 2) if a[0] == b[0]]
    impostor += [float(a[1] @ b[1]) for a in car for b in ham]
    genuine = [float(a[1] @ b[1]) for a, b in itertools.combinations(car, 2) if abs(a[0] - b[0]) >= 30]
    return {"impostor": impostor, "genuine": genuine, "hamilton_faces": len(ham), "carphone_faces": len(car),
            "embedding_model": backend.embedding_model}


def threshold_at(impostor: list[float], far: float) -> float:
    """The lowest 0.01 step whose false-accept rate on ``impostor`` is at most ``far``."""
    scores = np.sort(np.asarray(impostor))
    allowed = int(math.floor(far * len(scores)))  # impostor pairs that may pass
    above = scores[len(scores) - allowed - 1] if allowed < len(scores) else scores[0]
    return math.floor(above * 100.0 + 1.0) / 100.0  # strictly above that pair's score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="dlib", choices=["dlib", "insightface"])
    ap.add_argument("--far", type=float, default=0.001, help="target false-accept rate (default 0.001)")
    ap.add_argument("--profile-far", type=float, default=0.5,
                    help="false-accept rate of the profile floor (default 0.5: the median stranger)")
    args = ap.parse_args()
    data = pair_scores(args.backend)
    imp, gen = np.asarray(data["impostor"]), np.asarray(data["genuine"])
    t = threshold_at(data["impostor"], args.far)
    accepted = int((imp >= t).sum())
    floor = threshold_at(data["impostor"], args.profile_far)
    result = {
        "backend": args.backend,
        "embedding_model": data["embedding_model"],
        "far_target": args.far,
        "threshold": t,
        "impostor_pairs": int(imp.size),
        "impostor_accepted": accepted,
        "far_measured": round(accepted / imp.size, 6),
        "far_upper_95": round((accepted + 3) / imp.size, 6) if accepted == 0 else None,
        "impostor_max": round(float(imp.max()), 4),
        "impostor_quantiles": {q: round(float(np.quantile(imp, float(q))), 4) for q in ("0.5", "0.9", "0.99", "0.999")},
        "profile_floor": floor,
        "profile_floor_far_target": args.profile_far,
        "profile_floor_far_measured": round(float((imp >= floor).mean()), 4),
        "genuine_pairs": int(gen.size),
        "genuine_min": round(float(gen.min()), 4) if gen.size else None,
        "genuine_median": round(float(np.median(gen)), 4) if gen.size else None,
        "frr_measured": round(float((gen < t).mean()), 4) if gen.size else None,
        "faces": {"short_hamilton_clip.mp4": data["hamilton_faces"], "carphone.mp4": data["carphone_faces"]},
        "sampling": {"every_nth_frame": CLIPS, "min_face_px": MIN_FACE_PX, "upsample": UPSAMPLE},
        "histogram": {"edges": np.round(np.linspace(0.5, 1.0, 26), 2).tolist(),
                      "impostor": np.histogram(imp, np.linspace(0.5, 1.0, 26))[0].tolist(),
                      "genuine": np.histogram(gen, np.linspace(0.5, 1.0, 26))[0].tolist()},
    }
    out = Path(__file__).with_name(f"{args.backend}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "histogram"}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
