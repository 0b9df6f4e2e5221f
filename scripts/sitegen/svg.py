"""Inline SVG charts drawn at generation time: no JavaScript, no external files.

Every chart is a single ``<svg>`` element on one line (so Markdown keeps it as raw HTML) with a
``<title>`` for screen readers and hover text. Colours come from CSS classes in
``site/assets/atlas.css`` so the charts follow the light and dark palettes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scripts.sitegen.text import h


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def sparkline(points: Sequence[tuple[int, int]], width: int = 140, height: int = 28) -> str:
    """Citations per year as a small line with a dot on the last year.

    ``points`` are ``(year, count)`` pairs in ascending year order; empty input gives ``""``.
    """
    if not points:
        return ""
    top = max(c for _, c in points) or 1
    pad = 3
    n = len(points)
    step = (width - 2 * pad) / max(n - 1, 1)
    xy = [(pad + i * step, height - pad - (c / top) * (height - 2 * pad)) for i, (_, c) in enumerate(points)]
    poly = " ".join(f"{_num(x)},{_num(y)}" for x, y in xy)
    first, last = points[0], points[-1]
    label = f"Citations per year, {first[0]}–{last[0]}: " + ", ".join(f"{y}: {c}" for y, c in points)
    lx, ly = xy[-1]
    return (
        f'<svg class="atlas-spark" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{h(label)}</title>'
        f'<polyline points="{poly}" fill="none" stroke-width="1.5"/>'
        f'<circle cx="{_num(lx)}" cy="{_num(ly)}" r="2.2"/></svg>'
    )


def year_chart(
    counts: Mapping[str, Mapping[int, int]],
    labels: Mapping[str, str],
    width: int = 720,
    height: int = 260,
) -> str:
    """Grouped bars: works per year, one bar per series (taxonomy branch), with a legend.

    ``counts`` maps a series id to ``{year: count}``; ``labels`` gives each series' display name.
    Series keep the order of ``counts``; years run from the earliest to the latest with data.
    """
    years = sorted({y for series in counts.values() for y in series})
    if not years:
        return '<p class="atlas-empty">No works in the catalog yet.</p>'
    years = list(range(years[0], years[-1] + 1))
    series = list(counts)
    top = max((c for s in counts.values() for c in s.values()), default=1) or 1
    left, right, bottom, legend_h = 34, 8, 36, 22
    plot_w, plot_h = width - left - right, height - bottom - legend_h
    group_w = plot_w / len(years)
    bar_w = max(group_w * 0.8 / max(len(series), 1), 1.0)
    parts = [
        f'<svg class="atlas-chart" role="img" width="100%" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="xMidYMid meet"><title>Works per year by taxonomy branch</title>'
    ]
    for frac in (0.0, 0.5, 1.0):  # gridlines and y labels
        y = legend_h + plot_h * (1 - frac)
        value = round(top * frac)
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_num(y)}" y2="{_num(y)}"/>')
        parts.append(f'<text class="axis" x="{left - 4}" y="{_num(y + 4)}" text-anchor="end">{value}</text>')
    label_every = max(1, len(years) // 14)
    for i, year in enumerate(years):
        gx = left + i * group_w + group_w * 0.1
        for j, sid in enumerate(series):
            c = counts[sid].get(year, 0)
            if not c:
                continue
            bh = plot_h * c / top
            x, y = gx + j * bar_w, legend_h + plot_h - bh
            tip = f"{labels.get(sid, sid)}, {year}: {c} work{'s' if c != 1 else ''}"
            parts.append(
                f'<rect class="s{j}" x="{_num(x)}" y="{_num(y)}" width="{_num(bar_w)}" '
                f'height="{_num(bh)}"><title>{h(tip)}</title></rect>'
            )
        if i % label_every == 0:
            tx = left + (i + 0.5) * group_w
            ty = height - bottom + 16
            parts.append(f'<text class="axis" x="{_num(tx)}" y="{ty}" text-anchor="middle">{year}</text>')
    lx = left
    for j, sid in enumerate(series):  # legend
        name = labels.get(sid, sid)
        total = sum(counts[sid].values())
        parts.append(f'<rect class="s{j}" x="{lx}" y="4" width="12" height="12"/>')
        parts.append(f'<text class="legend" x="{lx + 16}" y="14">{h(name)} ({total})</text>')
        lx += 28 + 8 * (len(name) + len(str(total)) + 3)
    parts.append("</svg>")
    return "".join(parts)


def load_bars(load: Sequence[float], width: int = 160, height: int = 36) -> str:
    """Tokens per expert as small bars, the dashed line marking a perfectly even load."""
    if not load:
        return ""
    top = max(load) or 1.0
    mean = sum(load) / len(load)
    n = len(load)
    bw = width / n
    parts = [
        f'<svg class="atlas-load" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>'
        + h("Tokens per expert: " + ", ".join(f"e{i}: {v:g}" for i, v in enumerate(load)))
        + "</title>"
    ]
    gap = min(2.0, bw * 0.2)
    for i, v in enumerate(load):
        bh = (height - 2) * v / top
        parts.append(
            f'<rect x="{_num(i * bw + gap / 2)}" y="{_num(height - bh)}" width="{_num(max(bw - gap, 0.3))}" '
            f'height="{_num(bh)}"/>'
        )
    my = height - (height - 2) * mean / top
    parts.append(f'<line x1="0" x2="{width}" y1="{_num(my)}" y2="{_num(my)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt_value(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _y_label(text: str, y: float) -> str:
    """A y-axis title, rotated, centred at height ``y``."""
    return (
        f'<text x="12" y="{y:.0f}" text-anchor="middle" transform="rotate(-90 12 {y:.0f})">{h(text)}</text>'
    )


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    *,
    highlight: Sequence[str] = (),
    width: int = 640,
    height: int = 300,
) -> str:
    """Curves of ``(x, y)`` points, one per named series; ``highlight`` draws some in front, thicker.

    Each curve carries a ``<title>`` with its name and last value; the axes are linear, with the
    y range fitted to the data.
    """
    pts = [p for _, s in series for p in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 <= y0:
        y1 = y0 + 1.0
    left, right, top, bottom = 48, 130 if highlight else 12, 12, 36
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg class="atlas-chart atlas-lines" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{h(f"{y_label} against {x_label}")}</title>'
    ]
    for t in _ticks(y0, y1):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_num(py(t))}" y2="{_num(py(t))}"/>'
        )
        parts.append(f'<text x="{left - 4}" y="{_num(py(t) + 4)}" text-anchor="end">{t:.2f}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{_num(px(t))}" y="{height - 20}" text-anchor="middle">{t:,.0f}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">{h(x_label)}</text>')
    parts.append(_y_label(y_label, top + ph / 2))
    order = [s for s in series if s[0] not in highlight] + [s for s in series if s[0] in highlight]
    ends: list[tuple[float, float, str]] = []
    for name, s in order:
        if not s:
            continue
        poly = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in s)
        cls = "hi" if name in highlight else "lo"
        parts.append(
            f'<polyline class="{cls}" points="{poly}" fill="none">'
            f"<title>{h(f'{name}: {s[-1][1]:.3f}')}</title></polyline>"
        )
        if name in highlight:
            ends.append((py(s[-1][1]), px(s[-1][0]), name))
    placed: list[tuple[float, float, str]] = []
    for ly, lx, name in sorted(ends):  # label the highlighted curves where they end, 10 px apart
        placed.append((max(ly, placed[-1][0] + 10) if placed else ly, lx, name))
    overflow = (placed[-1][0] - (height - bottom)) if placed else 0
    for ly, lx, name in placed:  # a crowded column of labels moves up to stay inside the chart
        y = ly - max(overflow, 0)
        parts.append(f'<text class="end" x="{_num(lx + 4)}" y="{_num(y + 3)}">{h(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter(
    points: Sequence[tuple[str, float, float]],
    x_label: str,
    y_label: str,
    *,
    labelled: Sequence[str] | None = None,
    width: int = 640,
    height: int = 320,
) -> str:
    """Named points ``(name, x, y)``, each a dot with a ``<title>``; the names in ``labelled`` (all,
    when ``None``) also get a text label beside the dot."""
    if not points:
        return ""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    left, right, top, bottom = 48, 90, 12, 36
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg class="atlas-chart atlas-scatter" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{h(f"{y_label} against {x_label}")}</title>'
    ]
    for t in _ticks(y0, y1):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{_num(py(t))}" y2="{_num(py(t))}"/>'
        )
        parts.append(f'<text x="{left - 4}" y="{_num(py(t) + 4)}" text-anchor="end">{t:.2f}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{_num(px(t))}" y="{height - 20}" text-anchor="middle">{t:.2f}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle">{h(x_label)}</text>')
    parts.append(_y_label(y_label, top + ph / 2))
    for name, x, y in points:
        parts.append(
            f'<circle cx="{_num(px(x))}" cy="{_num(py(y))}" r="3.5">'
            f"<title>{h(f'{name}: {x:.3f}, {y:.3f}')}</title></circle>"
        )
        if labelled is None or name in labelled:
            parts.append(f'<text x="{_num(px(x) + 5)}" y="{_num(py(y) + 3)}">{h(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def hbars(items: Sequence[tuple[str, float]], unit: str, *, width: int = 640, row: int = 16) -> str:
    """Horizontal bars, one per ``(name, value)``, longest first as given, value printed at the end."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1.0
    label_w, value_w = 170, 70
    bw = width - label_w - value_w
    height = row * len(items) + 4
    parts = [
        f'<svg class="atlas-chart atlas-bars" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{h(unit)}</title>'
    ]
    for i, (name, v) in enumerate(items):
        y = 2 + i * row
        w = bw * max(v, 0) / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + row - 4}" text-anchor="end">{h(name)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{_num(w)}" height="{row - 4}">'
            f"<title>{h(f'{name}: {v:g} {unit}')}</title></rect>"
            f'<text x="{_num(label_w + w + 4)}" y="{y + row - 4}">{_fmt_value(v)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
