"""
The loss-curve picture both scripts write next to their report: an SVG, written by hand (no plotting
library), of one evaluation figure against step, a line per run, with the teacher's level dashed. It is drawn
from the evaluations the runs logged (Logger.records), so it costs no extra evaluation.
"""

import math
from xml.sax.saxutils import escape

from model.common import atomic_write_bytes

COLORS = ("#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 400, 64, 16, 36, 48  # canvas and margins, in pixels


def curves(records, metric: str) -> dict:
    """{run: [(steps done, value), ...]} from the Logger records that carry metric, in logged order."""
    out = {}
    for r in records:
        if r.get(metric) is not None:
            out.setdefault(r["run"], []).append((r["step"] + 1, r[metric]))
    return out


def ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round numbers 1, 2 or 5 times a power of ten apart, about n intervals, from at or below lo to at or
    above hi."""
    raw = ((hi - lo) or abs(hi) or 1.0) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(max(2, math.ceil((hi - first) / step - 1e-9) + 1))]


def loss_svg(runs: dict, title: str, ylabel: str, level: float | None = None, level_name: str = "teacher") -> str:
    """The SVG text: runs {name: [(step, value), ...]} as lines with a dot per evaluation, level (if given)
    as a dashed horizontal line, x and y axes with ticks and labels, and a legend."""
    values = [v for pts in runs.values() for _, v in pts] + ([level] if level is not None else [])
    xt = ticks(0, max(s for pts in runs.values() for s, _ in pts))
    yt = ticks(min(values), max(values))

    def sx(s):  # step -> pixels from the left
        return LEFT + (s - xt[0]) / (xt[-1] - xt[0]) * (W - LEFT - RIGHT)

    def sy(v):  # value -> pixels from the top
        return H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - TOP - BOTTOM)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<path d="M{LEFT},{TOP} V{H - BOTTOM} H{W - RIGHT}" fill="none" stroke="black"/>']
    for s in xt:
        out.append(f'<line x1="{sx(s):.1f}" y1="{H - BOTTOM}" x2="{sx(s):.1f}" y2="{H - BOTTOM + 5}" stroke="black"/>'
                   f'<text x="{sx(s):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{s:g}</text>')
    for v in yt:
        out.append(f'<line x1="{LEFT - 5}" y1="{sy(v):.1f}" x2="{LEFT}" y2="{sy(v):.1f}" stroke="black"/>'
                   f'<line x1="{LEFT}" y1="{sy(v):.1f}" x2="{W - RIGHT}" y2="{sy(v):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 8}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle">step</text>'
               f'<text transform="translate(16,{(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    legend = []  # (name, colour, dashed)
    if level is not None:
        out.append(f'<line data-run="{escape(level_name)}" x1="{LEFT}" y1="{sy(level):.1f}" x2="{W - RIGHT}" '
                   f'y2="{sy(level):.1f}" stroke="black" stroke-dasharray="6,4"/>')
        legend.append((f"{level_name} ({level:.4g})", "black", True))
    for (name, pts), color in zip(runs.items(), COLORS):
        xy = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        out.append(f'<polyline data-run="{escape(name)}" points="{xy}" fill="none" stroke="{color}" '
                   f'stroke-width="2"/>' + "".join(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{color}"/>'
                                                   for s, v in pts))
        legend.append((f"{name} ({pts[-1][1]:.4g} at step {pts[-1][0]})", color, False))
    out.append(f'<rect x="{W - RIGHT - 296}" y="{TOP}" width="290" height="{18 * len(legend) + 6}" fill="white" '
               f'fill-opacity="0.85"/>')
    for i, (label, color, dashed) in enumerate(legend):  # top right, inside the axes
        y, x, dash = TOP + 14 + 18 * i, W - RIGHT - 290, ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{x + 30}" y="{y}">{escape(label)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# what the scripts log and plot: {metric: (title, y-axis label)}
LABELS = {"val_loss": ("white-box distillation: validation loss", "validation loss (CE, nats/token)"),
          "answer_ppl": ("black-box distillation: answer perplexity", "perplexity on held-out teacher answers")}


def write_loss_plot(path, records, metric: str, level: float | None = None) -> bool:
    """Write loss_svg of the runs' logged metric (a LABELS key) to path (atomically); False, and nothing
    written, when no run logged it (e.g. a resumed run that had already finished)."""
    runs = curves(records, metric)
    if not runs:
        return False
    atomic_write_bytes(path, loss_svg(runs, *LABELS[metric], level).encode())
    return True
