"""Pictures as inline SVG, drawn on the server: no chart library, nothing fetched by the browser.

Every function returns markup safe to put in a page (labels are escaped) with a <title> for
screen readers and tooltips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup

# Colour-blind-safe palette (Okabe-Ito), one per series in order.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def _num(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _svg(width: int, height: int, title: str, body: list[str]) -> Markup:
    # Every piece of text in ``body`` and ``title`` went through html.escape.
    return Markup(  # noqa: S704
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(body)}</svg>'
    )


def histogram(edges: Sequence[float], counts: Sequence[int], title: str, width: int = 280, height: int = 110) -> Markup:
    """A numeric column's histogram: one bar per bin, the range under it."""
    if not counts or len(edges) != len(counts) + 1:
        return Markup("")
    top = max(*counts, 1)
    plot_h, bar_w = height - 22, (width - 2) / len(counts)
    body = []
    for i, count in enumerate(counts):
        h = plot_h * count / top
        body.append(
            f'<rect x="{1 + i * bar_w:.1f}" y="{plot_h - h + 2:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" '
            f'fill="{PALETTE[0]}"><title>{escape(_num(edges[i]))} to {escape(_num(edges[i + 1]))}: {count}</title></rect>'
        )
    body.append(f'<text x="1" y="{height - 4}" class="axis">{escape(_num(edges[0]))}</text>')
    body.append(
        f'<text x="{width - 1}" y="{height - 4}" class="axis" text-anchor="end">{escape(_num(edges[-1]))}</text>'
    )
    return _svg(width, height, title, body)


def bars(items: Sequence[tuple[str, float]], title: str, width: int = 280, bar_h: int = 18) -> Markup:
    """Labelled horizontal bars (a categorical column's top values, missing counts, importances)."""
    if not items:
        return Markup("")
    top = max(*(v for _, v in items), 1e-12)
    label_w, height = width * 0.45, bar_h * len(items) + 2
    body = []
    for i, (label, value) in enumerate(items):
        y = 1 + i * bar_h
        w = (width - label_w - 50) * value / top
        text = label if len(label) <= 22 else label[:21] + "…"
        body.append(f'<text x="{label_w - 4:.1f}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{escape(text)}</text>')
        body.append(
            f'<rect x="{label_w:.1f}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{bar_h - 4}" fill="{PALETTE[0]}">'
            f"<title>{escape(label)}: {escape(_num(value))}</title></rect>"
        )
        body.append(
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h * 0.7:.1f}" class="axis">{escape(_num(value))}</text>'
        )
    return _svg(width, height, title, body)


def scatter(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 240,
    lines: bool = False,
    x_range: tuple[float, float] | None = None,
    y_from_zero: bool = False,
) -> Markup:
    """Points (or lines) per series, with axes' ranges and a legend: trial scores over time by family,
    a metric over time."""
    points = [p for pts in series.values() for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        return Markup("")
    x0, x1 = x_range or (min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if y_from_zero:
        y0, y1 = min(y0, 0.0), max(y1, 0.0)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = (y0, y0 + 1) if y_from_zero else (y0 - 0.5, y1 + 0.5)
    left, right, top, bottom = 52, 10, 10, 40
    pw, ph = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * (x - x0) / (x1 - x0), top + ph * (1 - (y - y0) / (y1 - y0))

    body = [
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" class="axis">{escape(_num(y1))}</text>',
        f'<text x="{left - 4}" y="{top + ph}" text-anchor="end" class="axis">{escape(_num(y0))}</text>',
        f'<text x="{left}" y="{top + ph + 14}" class="axis">{escape(_num(x0))}</text>',
        f'<text x="{left + pw}" y="{top + ph + 14}" text-anchor="end" class="axis">{escape(_num(x1))}</text>',
        f'<text x="{left + pw / 2}" y="{top + ph + 14}" text-anchor="middle" class="axis">{escape(x_label)}</text>',
        f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle" '
        f'class="axis">{escape(y_label)}</text>',
    ]
    legend_x = left
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        finite = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        if lines and len(finite) > 1:
            path = " ".join(
                f"{'M' if j == 0 else 'L'}{a:.1f},{b:.1f}" for j, (a, b) in enumerate(xy(*p) for p in finite)
            )
            body.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y in finite:
            cx, cy = xy(x, y)
            body.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour}">'
                f"<title>{escape(name)}: {escape(_num(y))} at {escape(_num(x))}</title></circle>"
            )
        body.append(f'<circle cx="{legend_x + 5}" cy="{height - 8}" r="4" fill="{colour}"/>')
        body.append(f'<text x="{legend_x + 12}" y="{height - 4}" class="legend">{escape(name)}</text>')
        legend_x += 18 + 7 * len(name)
    return _svg(width, height, title, body)
