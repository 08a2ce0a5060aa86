"""Per-face and per-image measurements: expression from landmarks, sharpness, exposure, framing.

All functions take numpy arrays (RGB uint8 images, (68, 2) iBUG landmarks) and return plain floats
so records stay JSON. The rules that turn these numbers into labels (shot type, expression words
in captions) live in :mod:`runner.vision.shots` and are documented in docs/analysis.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: Side of the square face crop on which exposure is measured.
FACE_CROP_PX = 128


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.hypot(*(np.asarray(a, float) - np.asarray(b, float))))


#: Below this eye width (outer to inner corner, px) eye openness is not measured: the eyelid gap
#: of an open eye is then under 2 px, and squinting open eyes read as low as blinks.
MIN_EYE_WIDTH_PX = 7.0
#: An eye at or above this ratio is clearly open (what the other eye of a wink must be).
OPEN_EYE_EAR = 0.25


def closed_eye_threshold(eye_width_px: float) -> float:
    """Eye aspect ratio below which an eye of this width (px) counts as closed.

    0.16 on large eyes (the usual EAR rule), rising on small ones, where the shape predictor
    cannot close the eyelid contour fully: a blink on the 44-53 px faces of carphone.mp4 (eyes
    8-9 px wide) bottoms out at EAR 0.13-0.21, while open eyes there stay at 0.26 and above; but
    smiling, narrowed open eyes of 7 px read 0.20-0.23 too, so the rise is kept small.
    ``0.16 + 0.35 / width``: 0.204 at 8 px, 0.195 at 10 px, 0.169 at 40 px.
    """
    return 0.16 + 0.35 / max(eye_width_px, 1e-6)


def eye_aspect_ratio(lm: np.ndarray) -> dict[str, Any] | None:
    """Eye aspect ratio (Soukupova & Cech 2016) per eye, their mean, and which eyes are closed.

    Open eyes read about 0.18-0.45 (narrow or smiling eyes low). ``closed`` is "both" when the mean
    of the two is below :func:`closed_eye_threshold` of their width, "left" or "right" (a wink,
    image-left / image-right eye) when one eye is below it and the other clearly open
    (:data:`OPEN_EYE_EAR`), else "none". None when the eyes are narrower than
    :data:`MIN_EYE_WIDTH_PX`.
    """

    def ear(p: np.ndarray) -> float:
        width = _dist(p[0], p[3])
        if width <= 0:
            return float("nan")
        return (_dist(p[1], p[5]) + _dist(p[2], p[4])) / (2.0 * width)

    width = (_dist(lm[36], lm[39]) + _dist(lm[42], lm[45])) / 2.0
    if not width >= MIN_EYE_WIDTH_PX:
        return None
    left = ear(lm[36:42])  # image-left eye
    right = ear(lm[42:48])
    limit = closed_eye_threshold(width)
    if (left + right) / 2.0 < limit:
        closed = "both"
    elif min(left, right) < limit and max(left, right) >= OPEN_EYE_EAR:
        closed = "left" if left < right else "right"
    else:
        closed = "none"
    return {"left": round(left, 4), "right": round(right, 4), "mean": round((left + right) / 2.0, 4),
            "closed_below": round(limit, 4), "width_px": round(width, 1), "closed": closed}


#: Samples across (along the eye line) and down the window in which an eye's appearance is read.
EYE_WINDOW = (24, 24)
#: The window spans this fraction of the eye width (corner to corner) across and down, centred on
#: the centre of the six eye landmarks: the opening, without the brow or the lower lid's fold.
EYE_WINDOW_SPAN = (0.7, 0.4)


def _eye_window(img: np.ndarray, a: np.ndarray, b: np.ndarray, centre: np.ndarray, below: float = 0.0,
                span: tuple[float, float] = EYE_WINDOW_SPAN) -> np.ndarray:
    """``img`` resampled on a window level with the eye line a -> b: ``span`` eye widths across and
    down, centred ``below`` eye widths under ``centre`` (area-averaged first when shrinking)."""
    import cv2

    width = float(np.hypot(*(b - a)))
    ex = (b - a) / width
    ey = np.array([-ex[1], ex[0]]) if ex[0] >= 0 else np.array([ex[1], -ex[0]])
    nx, ny = EYE_WINDOW
    sx, sy = width * span[0] / nx, width * span[1] / ny
    if max(sx, sy) > 1.0:
        img = cv2.GaussianBlur(img, (0, 0), 0.5 * max(sx, sy))
    c = centre + ey * below * width
    m = np.array([[sx * ex[0], sy * ey[0], 0.0], [sx * ex[1], sy * ey[1], 0.0]])
    m[:, 2] = c - m[:, 0] * (nx / 2 - 0.5) - m[:, 1] * (ny / 2 - 0.5)
    return cv2.warpAffine(img, m, (nx, ny), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def eye_appearance(rgb: np.ndarray, lm: np.ndarray) -> dict[str, dict[str, float]]:
    """Per eye (image left/right), what the pixels of the eye opening show, on a fixed-size window.

    The window (:data:`EYE_WINDOW_SPAN` of the eye width, level with the eye line, centred on the
    six eye landmarks) is compared with the skin just under the eye (a window of the same width
    0.8 eye widths lower), so both numbers are ratios that do not depend on the face's size,
    brightness or contrast:

    - ``dark``: ``(skin - p5) / skin``, the Weber contrast of the darkest 5% of the opening
      (iris, pupil, lash line) against the skin: open eyes of the shared photos 0.56-0.96.
      An eye covered by skin reads about 0.1-0.3.
    - ``sclera``: ``(skin_sat - p10_sat) / skin_sat``, how much less saturated the least
      saturated 10% of the opening is than the skin: the white of the eye is grey, skin and eyelid
      are not. Open carphone eyes 0.20-0.88, shut ones -0.04-0.27; but a dim or grey photo's open
      eye can read 0 or below, so it is only compared within one face's own track.
    - ``edges``: mean absolute horizontal step between neighbouring samples of the window over the
      skin level, x 24: the iris's left and right edges against the white of the eye. A shut lid
      (skin, a lash line, creases) runs along the eye line and has few. Open eyes 0.25-1.55 (lower
      on smaller faces, the window then holds fewer real pixels), shut carphone eyes 0.19-0.47.
    """
    import cv2

    rgb = np.ascontiguousarray(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
    out: dict[str, dict[str, float]] = {}
    for side, pts in (("left", lm[36:42]), ("right", lm[42:48])):
        pts = np.asarray(pts, dtype=np.float64)
        a, b = sorted((pts[0], pts[3]), key=lambda p: p[0])
        centre = pts.mean(0)
        skin_span = (1.0, EYE_WINDOW_SPAN[1])
        skin = max(1.0, float(np.median(_eye_window(gray, a, b, centre, 0.8, skin_span))))
        skin_sat = max(1.0, float(np.median(_eye_window(sat, a, b, centre, 0.8, skin_span))))
        win = _eye_window(gray, a, b, centre)
        dark = (skin - float(np.percentile(win, 5))) / skin
        sclera = (skin_sat - float(np.percentile(_eye_window(sat, a, b, centre), 10))) / skin_sat
        edges = float(np.abs(np.diff(win, axis=1)).mean()) * EYE_WINDOW[0] / skin
        out[side] = {"dark": round(dark, 4), "sclera": round(sclera, 4), "edges": round(edges, 4)}
    return out


#: A wink by appearance: one eye's ``dark`` (iris against the skin under it) under this fraction of
#: the other eye's. Set on open faces only: the two open eyes of 94 faces (the shared photos at 50 px
#: to full size, carphone's open frames) differ by at most 0.82x; a shut eye shows skin (0.11-0.71).
WINK_DARK_RATIO = 0.7
#: ... or its ``edges`` (the iris's sides against the white) under this fraction of the other's:
#: open eyes of the same faces differ by at most 0.56x (one eye in shadow).
WINK_EDGE_RATIO = 0.45
#: An eye whose opening shows both a dark iris (``dark`` at least IRIS_DARK) and a grey white
#: (``sclera`` at least IRIS_SCLERA) is open whatever its landmarks say: shut eyes of the shared
#: photos (pasted) and of carphone read dark up to 0.71 with sclera up to 0.33, never both.
IRIS_DARK = 0.7
IRIS_SCLERA = 0.35


def iris_visible(eye: dict[str, float]) -> bool:
    """The eye's opening shows an iris and the white beside it (see :data:`IRIS_DARK`)."""
    return eye["dark"] >= IRIS_DARK and eye["sclera"] >= IRIS_SCLERA


def wink_by_appearance(app: dict[str, dict[str, float]]) -> str | None:
    """"left" or "right" (image side) when that eye shows much less of an iris than the other: its
    ``dark`` under :data:`WINK_DARK_RATIO` or its ``edges`` under :data:`WINK_EDGE_RATIO` of the
    other eye's (both ratios of the same face, so free of its size, light and contrast), it does
    not itself show an iris (:func:`iris_visible`), and it is not the darker of the two (on an eye
    7-8 px wide, JPEG blocks and a bright rim make ``edges`` differ between two open eyes; the
    cues must not contradict); else None."""
    for key, ratio in (("dark", WINK_DARK_RATIO), ("edges", WINK_EDGE_RATIO)):
        lo, hi = sorted(("left", "right"), key=lambda k: app[k][key])
        if app[lo][key] < ratio * app[hi][key] and not iris_visible(app[lo]) and app[lo]["dark"] <= app[hi]["dark"]:
            return lo
    return None


def eye_openness(rgb: np.ndarray, lm: np.ndarray) -> dict[str, Any] | None:
    """:func:`eye_aspect_ratio` with ``appearance`` (:func:`eye_appearance`) and ``closed_by``
    ("landmarks", "appearance" or None). The landmarks fit both eyes alike, so where the pixels
    show a wink (:func:`wink_by_appearance`) it replaces a landmark "none" or "both"; and where
    both eyes' openings show an iris (:func:`iris_visible`), a landmark "both" (narrow eyes of a
    small face) is overruled: ``closed`` "none", ``closed_by`` "appearance"."""
    eyes = eye_aspect_ratio(lm)
    if eyes is None:
        return None
    app = eye_appearance(rgb, lm)
    wink = wink_by_appearance(app)
    eyes.update(appearance=app, closed_by="landmarks" if eyes["closed"] != "none" else None)
    if eyes["closed"] in ("none", "both") and wink is not None:
        eyes.update(closed=wink, closed_by="appearance")
    elif eyes["closed"] == "both" and iris_visible(app["left"]) and iris_visible(app["right"]):
        eyes.update(closed="none", closed_by="appearance")
    return eyes


#: A frame of a track is a blink when both eyes' ``sclera`` is under this fraction of the track's
#: median (the face's own open-eye baseline) ...
BLINK_SCLERA_RATIO = 0.5
#: ... and both eyes' ``edges`` under this fraction of the track's median: a blink hides the iris's
#: sides (carphone's blinks: 0.30-0.53 of the median, its frames more than one from a blink 0.8
#: and up), while warm stage light can take the grey out of an open eye's white (Hamilton frame
#: 125: sclera at 0.28 of its median, edges at 0.87).
BLINK_EDGE_RATIO = 0.6


def blinks_in_track(appearances: Sequence[dict[str, dict[str, float]] | None]) -> list[bool | None]:
    """For the eye appearances of one face over the frames of a track (None: not measured), which
    frames show both eyes shut: the larger of the two eyes' ``sclera`` under
    :data:`BLINK_SCLERA_RATIO` of the track's median of it and the larger ``edges`` under
    :data:`BLINK_EDGE_RATIO` of its median. Eyes are open most of the time, so the medians are the
    open-eye baseline; a track of fewer than 5 measured frames gives None."""
    def larger(key: str) -> list[float | None]:
        return [None if a is None else max(a["left"][key], a["right"][key]) for a in appearances]

    sclera, edges = larger("sclera"), larger("edges")
    known = [v for v in sclera if v is not None]
    if len(known) < 5 or float(np.median(known)) <= 0:
        return [None] * len(sclera)
    s_limit = BLINK_SCLERA_RATIO * float(np.median(known))
    e_limit = BLINK_EDGE_RATIO * float(np.median([v for v in edges if v is not None]))
    return [None if s is None else bool(s < s_limit and e < e_limit) for s, e in zip(sclera, edges)]


def mouth_openness(lm: np.ndarray) -> float:
    """Inner-lip gap over inner mouth width: ~0 closed, >0.3 clearly open (talking, laughing)."""
    width = _dist(lm[60], lm[64])
    if width <= 0:
        return float("nan")
    gap = (_dist(lm[61], lm[67]) + _dist(lm[62], lm[66]) + _dist(lm[63], lm[65])) / 3.0
    return round(gap / width, 4)


def smile_proxy(lm: np.ndarray) -> dict[str, float]:
    """A smile score from mouth width and mouth-corner lift (no classifier involved).

    - ``width``: outer mouth width (48-54) over the distance between the eye centres; about
      0.75-0.9 for a neutral mouth, above 0.95 when the mouth is stretched by a smile.
    - ``lift``: how far the corners sit above the mid-line of the lips, over the eye distance.
    - ``score``: 0..1, ``0.5 * clip((width - 0.9) / 0.25) + 0.5 * clip(lift / 0.15)``. On the
      shared test photos, broad smiles score 0.8-1.0 and neutral or talking mouths below 0.4.
    """
    eye_l = lm[36:42].mean(0)
    eye_r = lm[42:48].mean(0)
    iod = _dist(eye_l, eye_r)
    if iod <= 0:
        return {"width": float("nan"), "lift": float("nan"), "score": float("nan")}
    width = _dist(lm[48], lm[54]) / iod
    # Distances along the face's own vertical axis (perpendicular to the eye line), so roll does
    # not read as a smile.
    ex = (eye_r - eye_l) / iod
    down = np.array([-ex[1], ex[0]])
    mid = float(np.dot((lm[51] + lm[57]) / 2.0, down))
    corners = float(np.dot((lm[48] + lm[54]) / 2.0, down))
    lift = (mid - corners) / iod
    def clip01(v: float) -> float:
        return min(1.0, max(0.0, v))

    score = 0.5 * clip01((width - 0.9) / 0.25) + 0.5 * clip01(lift / 0.15)
    return {"width": round(width, 4), "lift": round(lift, 4), "score": round(score, 4)}


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(0, int(math.floor(x0))), max(0, int(math.floor(y0))),
            min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1))))


def truncation(box: Sequence[float], width: int, height: int) -> float:
    """Fraction of the face box that lies outside the frame (0: fully inside)."""
    x0, y0, x1, y1 = box
    area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    if area <= 0:
        return 0.0
    ix = max(0.0, min(x1, width) - max(x0, 0.0))
    iy = max(0.0, min(y1, height) - max(y0, 0.0))
    return round(1.0 - ix * iy / area, 4)


def face_crop(rgb: np.ndarray, box: Sequence[float], size: int = FACE_CROP_PX) -> np.ndarray | None:
    """The face box (clipped to the frame) resized to ``size`` x ``size`` RGB."""
    import cv2

    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = clip_box(box, w, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    crop = rgb[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if (x1 - x0) > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


#: The scale on which face sharpness is measured: eye centres this many pixels apart.
SHARPNESS_IOD_PX = 40.0
#: Below this distance between the eye centres (px) sharpness is not measured (the face is
#: upsampled more than 3.3x to the measuring scale, and the measure reads the upsampling).
MIN_SHARPNESS_IOD_PX = 12.0
_REBLUR_SIGMA = 1.0


def eye_centres(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left, image-right) eye centre from 68 landmarks or 5 keypoints."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[0] == 68:
        return pts[36:42].mean(0), pts[42:48].mean(0)
    return pts[0], pts[1]


def aligned_face_gray(rgb: np.ndarray, points: np.ndarray, iod: float = SHARPNESS_IOD_PX) -> np.ndarray:
    """The inner face (eyes, nose, mouth) as float grey, rotated level and resampled so that the
    eye centres are ``iod`` px apart: 2 x 2.1 ``iod``, eye midpoint at (1, 0.7) ``iod``."""
    import cv2

    left, right = eye_centres(points)
    d = right - left
    scale = iod / float(np.hypot(*d))
    mid = (left + right) / 2.0
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if scale < 1.0:  # area-average first so that downsampling does not alias detail into the crop
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        mid, scale = mid * scale, 1.0
    w, h = int(round(2 * iod)), int(round(2.1 * iod))
    rot = cv2.getRotationMatrix2D((float(mid[0]), float(mid[1])), math.degrees(math.atan2(d[1], d[0])), scale)
    rot[:, 2] += np.array([w / 2.0, 0.7 * iod]) - mid
    return cv2.warpAffine(gray, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def blur_sigma(gray: np.ndarray) -> float:
    """The Gaussian blur (sigma, px of ``gray``) that its edges carry, by re-blurring.

    On the strongest 20% of gradients, the gradient energy of an edge blurred by sigma falls by
    ``sigma^2 / (sigma^2 + r^2)`` when it is blurred again by ``r``; the ratio gives sigma back.
    A ratio, so it does not depend on the face's contrast or brightness.
    """
    import cv2

    def energy(img: np.ndarray) -> np.ndarray:
        gx = cv2.Sobel(img, cv2.CV_32F, 1, 0)
        gy = cv2.Sobel(img, cv2.CV_32F, 0, 1)
        return (gx * gx + gy * gy)[4:-4, 4:-4]

    e0 = energy(gray)
    strong = e0 >= np.percentile(e0, 80)
    base = float(e0[strong].mean())
    if base <= 1e-6:  # a flat patch: no edge to judge
        return float("inf")
    ratio = min(0.999, float(energy(cv2.GaussianBlur(gray, (0, 0), _REBLUR_SIGMA))[strong].mean()) / base)
    rho = math.sqrt(ratio)
    return _REBLUR_SIGMA * rho / math.sqrt(1.0 - rho * rho)


def face_sharpness(rgb: np.ndarray, points: np.ndarray | None) -> tuple[float | None, float | None, str | None]:
    """(sharpness, blur sigma, why not measured) of a face, on the scale of its own eye distance.

    The inner face is resampled to :data:`SHARPNESS_IOD_PX` between the eye centres and its blur
    sigma estimated there (:func:`blur_sigma`), so the same face reads the same at any size and
    whatever box the detector drew. Sharpness is ``100 / sigma^2``: about 60-100 on sharp photos,
    30 at sigma 1.8 px (4.5% of the eye distance), 25 at 2 px, 11 at 3 px.
    """
    if points is None:
        return None, None, "no landmarks"
    left, right = eye_centres(points)
    iod = float(np.hypot(*(right - left)))
    if iod < MIN_SHARPNESS_IOD_PX:
        return None, None, f"eyes {iod:.0f} px apart, under {MIN_SHARPNESS_IOD_PX:.0f} px: too small to judge sharpness"
    sigma = blur_sigma(aligned_face_gray(rgb, points))
    if not math.isfinite(sigma):
        return 0.0, None, None
    return round(100.0 / max(sigma, 0.1) ** 2, 2), round(sigma, 3), None


def exposure(crop_rgb: np.ndarray, *, dark: int = 8, bright: int = 247) -> dict[str, float]:
    """Mean luminance (0..1), fractions of clipped dark/bright pixels, and left/right balance."""
    y = (0.299 * crop_rgb[..., 0] + 0.587 * crop_rgb[..., 1] + 0.114 * crop_rgb[..., 2])
    half = y.shape[1] // 2
    left, right = float(y[:, :half].mean()), float(y[:, half:].mean())
    return {
        "mean": round(float(y.mean()) / 255.0, 4),
        "contrast": round(float(y.std()) / 255.0, 4),
        "clipped_dark": round(float((y <= dark).mean()), 4),
        "clipped_bright": round(float((y >= bright).mean()), 4),
        # > 0: the image-right half of the face is brighter (side light from image right).
        "side_balance": round((right - left) / 255.0, 4),
    }


def background_edge_density(rgb: np.ndarray, face_boxes: Sequence[Sequence[float]], *, work_side: int = 320) -> float:
    """Canny edge density outside the estimated person regions (a clutter measure, 0..1).

    A person region is estimated from each face box: 1.8 face widths either side of the face
    centre, from 0.6 face heights above the face down to the bottom of the frame.
    """
    import cv2

    h, w = rgb.shape[:2]
    s = min(1.0, work_side / float(max(h, w)))
    small = (cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
             if s < 1 else rgb)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 80, 160) > 0
    mask = np.ones_like(edges, dtype=bool)
    for x0, y0, x1, y1 in face_boxes:
        fw, fh = (x1 - x0), (y1 - y0)
        cx = (x0 + x1) / 2.0
        px0, px1 = int(max(0, (cx - 1.8 * fw) * s)), int(min(small.shape[1], (cx + 1.8 * fw) * s))
        py0 = int(max(0, (y0 - 0.6 * fh) * s))
        mask[py0:, px0:px1] = False
    if mask.sum() < 0.05 * mask.size:  # the person fills the frame: no background to judge
        return 0.0
    return round(float(edges[mask].mean()), 4)


def perceptual_hash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(rgb)))


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def box_overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area over the area of ``a``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(1e-9, (a[2] - a[0]) * (a[3] - a[1]))
    return ix * iy / area


def face_measures(rgb: np.ndarray, face: Any) -> dict[str, Any]:
    """Everything measured on one face (a :class:`runner.vision.faces.Face`).

    A measure the face is too small (or has no landmarks) for is None, and ``unmeasured`` says why.
    """
    h, w = rgb.shape[:2]
    out: dict[str, Any] = {
        "height_rel": round(face.height / float(h), 4),
        "width_rel": round(face.width / float(w), 4),
        "truncation": truncation(face.box, w, h),
    }
    why: dict[str, str] = {}
    lm = None if face.landmarks is None else np.asarray(face.landmarks, dtype=np.float64)
    if lm is not None:
        out["eyes"] = eye_openness(rgb, lm)
        if out["eyes"] is None:
            eye_w = (_dist(lm[36], lm[39]) + _dist(lm[42], lm[45])) / 2.0
            why["eyes"] = f"eyes {eye_w:.0f} px wide, under {MIN_EYE_WIDTH_PX:.0f} px: too small to judge openness"
        out["mouth_open"] = mouth_openness(lm)
        out["smile"] = smile_proxy(lm)
        inside = (lm[:, 0] >= 0) & (lm[:, 0] < w) & (lm[:, 1] >= 0) & (lm[:, 1] < h)
        out["landmarks_outside"] = round(1.0 - float(inside.mean()), 4)
    else:
        out.update(eyes=None, mouth_open=None, smile=None, landmarks_outside=None)
        why["eyes"] = "no landmarks (the face backend gave 5 keypoints only)"
    out["blur"], out["blur_sigma"], blur_why = face_sharpness(rgb, lm if lm is not None else face.keypoints)
    if blur_why:
        why["blur"] = blur_why
    crop = face_crop(rgb, face.box)
    out["exposure"] = exposure(crop) if crop is not None else None
    out["unmeasured"] = why
    return out
