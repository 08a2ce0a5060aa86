"""Small inline SVG charts for the report (no JavaScript, no external files).

Every function returns :class:`markupsafe.Markup` with all text escaped, ready for a template.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from markupsafe import Markup, escape

PALETTE = ["#2f6fde", "#e8590c", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#c92a2a", "#5c940d"]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def bar_chart(
    values: Mapping[str, float],
    *,
    ranges: Mapping[str, Sequence[float]] | None = None,
    status: Mapping[str, str] | None = None,
    width: int = 560,
    bar_height: int = 22,
    as_percent: bool = True,
    title: str = "",
) -> Markup:
    """Horizontal bars, with an optional target [min, max] band per bar and a status label."""
    ranges = ranges or {}
    status = status or {}
    labels = list(values)
    label_w, status_w = 150, 70
    plot_w = width - label_w - status_w - 10
    top = 24 if title else 6
    height = top + len(labels) * (bar_height + 6) + 22
    vmax = max([*values.values(), *(r[1] for r in ranges.values() if len(r) == 2), 0.0])
    vmax = 1.0 if as_percent and vmax <= 1.0 else _nice_max(vmax)
    colors = {"ok": "#2b8a3e", "under": "#e8590c", "over": "#c92a2a"}
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    if title:
        out.append(f'<text x="0" y="15" font-size="13" font-weight="600">{escape(title)}</text>')
    for i, label in enumerate(labels):
        y = top + i * (bar_height + 6)
        v = values[label]
        w = plot_w * (v / vmax if vmax else 0)
        out.append(f'<text x="{label_w - 6}" y="{y + bar_height * 0.7:.1f}" font-size="12" '
                   f'text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{bar_height}" fill="#f1f3f5"/>')
        if label in ranges and len(ranges[label]) == 2:
            lo, hi = ranges[label]
            out.append(
                f'<rect x="{label_w + plot_w * lo / vmax:.1f}" y="{y}" width="{plot_w * max(0.0, hi - lo) / vmax:.1f}" '
                f'height="{bar_height}" fill="#b2f2bb" opacity="0.8"><title>target '
                f'{_fmt(lo * 100) + "%" if as_percent else _fmt(lo)}'
                f' to {_fmt(hi * 100) + "%" if as_percent else _fmt(hi)}</title></rect>'
            )
        st = status.get(label, "")
        color = colors.get(st, PALETTE[0])
        out.append(f'<rect x="{label_w}" y="{y + 5}" width="{w:.1f}" height="{bar_height - 10}" fill="{color}"/>')
        text = f"{v * 100:.1f}%" if as_percent else _fmt(v)
        out.append(f'<text x="{label_w + min(w, plot_w - 40) + 4:.1f}" y="{y + bar_height * 0.7:.1f}" '
                   f'font-size="11">{escape(text)}</text>')
        if st:
            out.append(f'<text x="{label_w + plot_w + 8}" y="{y + bar_height * 0.7:.1f}" font-size="11" fill="{color}" '
                       f'font-weight="600">{escape(st)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def histogram(
    values: Sequence[float],
    *,
    bins: int = 20,
    lo: float | None = None,
    hi: float | None = None,
    threshold: float | None = None,
    width: int = 480,
    height: int = 160,
    title: str = "",
    xlabel: str = "",
) -> Markup:
    """A histogram with an optional vertical threshold line."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return Markup(f'<p class="muted">{escape(title)}: no values</p>')
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    if hi <= lo:
        hi = lo + 1e-6
    counts = [0] * bins
    for v in vals:
        k = int((v - lo) / (hi - lo) * bins)
        counts[min(max(k, 0), bins - 1)] += 1
    cmax = max(counts) or 1
    pad_l, pad_b, pad_t = 30, 28, 20 if title else 6
    pw, ph = width - pad_l - 10, height - pad_b - pad_t
    bw = pw / bins
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    if title:
        out.append(f'<text x="0" y="14" font-size="13" font-weight="600">{escape(title)}</text>')
    for i, c in enumerate(counts):
        h = ph * c / cmax
        out.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + ph - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                   f'height="{h:.1f}" fill="{PALETTE[0]}"><title>{c}</title></rect>')
    out.append(f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#555"/>')
    out.append(f'<text x="{pad_l}" y="{height - 10}" font-size="10">{escape(_fmt(lo))}</text>')
    out.append(f'<text x="{pad_l + pw}" y="{height - 10}" font-size="10" text-anchor="end">{escape(_fmt(hi))}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{cmax}</text>')
    if xlabel:
        out.append(f'<text x="{pad_l + pw / 2}" y="{height - 10}" font-size="10" '
                   f'text-anchor="middle">{escape(xlabel)}</text>')
    if threshold is not None and lo <= threshold <= hi:
        x = pad_l + pw * (threshold - lo) / (hi - lo)
        out.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + ph}" stroke="#c92a2a" '
                   f'stroke-dasharray="4 3"><title>threshold {escape(_fmt(threshold))}</title></line>')
    out.append("</svg>")
    return Markup("".join(out))


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    width: int = 560,
    height: int = 200,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
) -> Markup:
    """Several (x, y) series on shared axes, with a legend."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return Markup(f'<p class="muted">{escape(title)}: no data</p>')

    def ty(y: float) -> float:
        return math.log10(max(y, 1e-12)) if log_y else y

    xs = [p[0] for p in pts]
    ys = [ty(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1e-6
    pad_l, pad_r, pad_t, pad_b = 48, 10, 22 if title else 8, 30
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    out = [f'<svg class="chart" role="img" width="{width}" height="{height + 18 * ((len(series) + 3) // 4)}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    if title:
        out.append(f'<text x="0" y="14" font-size="13" font-weight="600">{escape(title)}</text>')
    out.append(f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#ced4da"/>')
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        path = [
            f"{pad_l + pw * (x - x0) / (x1 - x0):.1f},{pad_t + ph - ph * (ty(y) - y0) / (y1 - y0):.1f}"
            for x, y in s
            if y is not None and math.isfinite(y)
        ]
        if path:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(path)}"/>')
        lx = (i % 4) * (width // 4)
        ly = height + 12 + 18 * (i // 4)
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{color}"/><text x="{lx + 14}" y="{ly}" '
                   f'font-size="11">{escape(name)}</text>')
    ylab = (lambda v: _fmt(10**v)) if log_y else _fmt
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{escape(ylab(y1))}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + ph}" font-size="10" text-anchor="end">{escape(ylab(y0))}</text>')
    out.append(f'<text x="{pad_l}" y="{pad_t + ph + 14}" font-size="10">{escape(_fmt(x0))}</text>')
    out.append(f'<text x="{pad_l + pw}" y="{pad_t + ph + 14}" font-size="10" '
               f'text-anchor="end">{escape(_fmt(x1))}</text>')
    if xlabel:
        out.append(f'<text x="{pad_l + pw / 2}" y="{pad_t + ph + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="10" y="{pad_t + ph / 2}" font-size="10" transform="rotate(-90 10 {pad_t + ph / 2})" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def scatter(
    points: Iterable[Mapping[str, object]],
    *,
    x: str,
    y: str,
    label: str = "label",
    highlight: str = "highlight",
    width: int = 480,
    height: int = 320,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Markup:
    """Scatter of dict points (``x``/``y`` keys); points with a truthy ``highlight`` are ringed."""
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    if not pts:
        return Markup(f'<p class="muted">{escape(title)}: no data</p>')
    xs = [float(p[x]) for p in pts]  # type: ignore[arg-type]
    ys = [float(p[y]) for p in pts]  # type: ignore[arg-type]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    dx = (x1 - x0) or 1e-3
    dy = (y1 - y0) or 1e-3
    x0, x1, y0, y1 = x0 - 0.08 * dx, x1 + 0.08 * dx, y0 - 0.08 * dy, y1 + 0.08 * dy
    pad_l, pad_r, pad_t, pad_b = 48, 10, 22 if title else 8, 34
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    if title:
        out.append(f'<text x="0" y="14" font-size="13" font-weight="600">{escape(title)}</text>')
    out.append(f'<rect x="{pad_l}" y="{pad_t}" width="{pw}" height="{ph}" fill="none" stroke="#ced4da"/>')
    for p, xv, yv in zip(pts, xs, ys):
        cx = pad_l + pw * (xv - x0) / (x1 - x0)
        cy = pad_t + ph - ph * (yv - y0) / (y1 - y0)
        hl = bool(p.get(highlight))
        tip = f"{p.get(label, '')}: {xlabel or x}={_fmt(xv)}, {ylabel or y}={_fmt(yv)}"
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if hl else 4}" '
                   f'fill="{PALETTE[1] if hl else PALETTE[0]}" '
                   f'stroke="{"#000" if hl else "none"}" stroke-width="1.5"><title>{escape(tip)}</title></circle>')
        if hl:
            out.append(f'<text x="{cx + 8:.1f}" y="{cy - 6:.1f}" font-size="11" '
                       f'font-weight="600">{escape(str(p.get(label, "")))}</text>')
    out.append(f'<text x="{pad_l}" y="{pad_t + ph + 14}" font-size="10">{escape(_fmt(x0))}</text>')
    out.append(f'<text x="{pad_l + pw}" y="{pad_t + ph + 14}" font-size="10" '
               f'text-anchor="end">{escape(_fmt(x1))}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" font-size="10" text-anchor="end">{escape(_fmt(y1))}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + ph}" font-size="10" text-anchor="end">{escape(_fmt(y0))}</text>')
    out.append(f'<text x="{pad_l + pw / 2}" y="{height - 6}" font-size="11" '
               f'text-anchor="middle">{escape(xlabel or x)}</text>')
    out.append(f'<text x="12" y="{pad_t + ph / 2}" font-size="11" transform="rotate(-90 12 {pad_t + ph / 2})" '
               f'text-anchor="middle">{escape(ylabel or y)}</text>')
    out.append("</svg>")
    return Markup("".join(out))
