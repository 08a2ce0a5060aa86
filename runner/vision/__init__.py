"""Face analysis and image measures (heavy libraries are imported inside functions).

- :mod:`runner.vision.faces`: ``get_face_backend("auto"|"dlib"|"insightface")`` -> a
  :class:`~runner.vision.faces.FaceBackend` whose ``analyze(rgb)`` returns faces (box, landmarks,
  pose with one sign convention, L2-normalized identity embedding); ``identity_similarity``.
- :mod:`runner.vision.measures`: eye aspect ratio, mouth openness, smile proxy, blur, exposure,
  truncation, background clutter, perceptual hash.
- :mod:`runner.vision.shots`: shot-type rules, flags, caption words, crop geometry.
- :mod:`runner.vision.balance`: the balance table and the strategies' search (never farther from
  any target than the start).
- :mod:`runner.vision.analysis`: one analysis record per image and the streaming worker pool.

docs/analysis.md documents the rules and the measured thresholds.
"""
