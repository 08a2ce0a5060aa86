"""The metrics the evaluate stage reports: name -> direction and a one-line description.

Kept free of heavy imports: the planner validates ``evaluate.targets`` and ``evaluate.objective``
against it. The definitions themselves are in :mod:`runner.metrics.definitions`.
"""

from __future__ import annotations

METRICS: dict[str, dict[str, str]] = {
    "face_similarity": {"better": "higher",
                        "desc": "identity cosine of the main face to the references, mean over references "
                                "(no face = 0)"},
    "face_similarity_max": {"better": "higher",
                            "desc": "identity cosine of the main face to the closest reference (no face = 0)"},
    "no_face_rate": {"better": "lower", "desc": "share of images with no face found (counted as failures)"},
    "consistency": {"better": "higher", "desc": "mean pairwise identity cosine between the category's generations"},
    "clip_t": {"better": "higher", "desc": "raw CLIP cosine between image and prompt (CLIP-T)"},
    "clip_score": {"better": "higher", "desc": "CLIPScore = 2.5 * max(cos, 0) (Hessel et al. 2021)"},
    "clip_i": {"better": "higher", "desc": "mean CLIP image cosine, generated x references (DreamBooth CLIP-I)"},
    "dino": {"better": "higher", "desc": "mean DINO CLS cosine, generated x references (DreamBooth DINO)"},
    "diversity": {"better": "higher",
                  "desc": "mean DINO distance 1 - cos between seeds of the same prompt (counter-metric)"},
}
