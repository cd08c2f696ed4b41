"""The picture of a classify run's drift, drawn with Pillow alone.

Every classify run draws one, and importing matplotlib for it cost about a second: a
tenth of a small run. The colours are matplotlib's first two, as in the training plots.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REFERENCE, THIS_RUN = (31, 119, 180), (255, 127, 14)
INK, GRID = (40, 40, 40), (225, 225, 225)
SHOWN_CLASSES = 30  # past this, the classes whose shares are largest, and a count of the rest
ROW, BAR = 22, 8  # pixels per class, and per bar of its pair
PANEL_WIDTH, MARGIN = 420, 16


def drift_distributions(distributions: dict, title: str, path: Path) -> Path:
    """A classify run against its model's reference (`cnnpipe.monitoring.drift.run_drift`): the share of each
    predicted class, and the calibrated-confidence histogram over the reference's bins."""
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    classes = [(_shortened(str(label)), run_share, reference_share) for label, run_share, reference_share
               in sorted(distributions["classes"], key=lambda c: -max(c[1], c[2]))]
    shown = classes[:SHOWN_CLASSES]
    label_width = int(max([small.getlength(c[0]) for c in shown] + [40])) + 8
    plot_height = max(200, ROW * len(shown))
    top = 70
    width = MARGIN * 3 + label_width + PANEL_WIDTH * 2 + 40
    height = top + plot_height + 60 + (20 if len(classes) > len(shown) else 0)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 10), title, font=font, fill=INK)
    legend_x = width - MARGIN - 200
    for offset, (colour, name) in enumerate(((REFERENCE, "reference"), (THIS_RUN, "this run"))):
        draw.rectangle((legend_x + 100 * offset, 14, legend_x + 100 * offset + 12, 26), fill=colour)
        draw.text((legend_x + 100 * offset + 18, 12), name, font=small, fill=INK)

    left = MARGIN + label_width
    _class_shares(draw, shown, (left, top, left + PANEL_WIDTH, top + plot_height), small)
    if len(classes) > len(shown):
        draw.text((MARGIN, top + plot_height + 40), f"and {len(classes) - len(shown)} classes more, "
                  "with smaller shares", font=small, fill=INK)
    right = left + PANEL_WIDTH + MARGIN + 40
    _confidence(draw, distributions["bins"], (right, top, right + PANEL_WIDTH, top + plot_height), small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def _class_shares(draw: ImageDraw.ImageDraw, classes: list, box: tuple[int, int, int, int], font) -> None:
    left, top, right, bottom = box
    scale = _axis(draw, max([max(c[1], c[2]) for c in classes] + [0.01]), box, font, "share of predictions")
    draw.text((left, top - 24), "predicted classes", font=font, fill=INK)
    # A few classes spread over the panel's height rather than crowding its top.
    row = (bottom - top) / max(1, len(classes))
    bar = min(2 * BAR, int(row * 0.36))
    for index, (label, run_share, reference_share) in enumerate(classes):
        y = int(top + index * row + (row - 2 * bar) / 2)
        draw.text((left - 6, y + bar), label, font=font, fill=INK, anchor="rm")
        for offset, (share, colour) in enumerate(((reference_share, REFERENCE), (run_share, THIS_RUN))):
            if share:
                draw.rectangle((left, y + offset * bar, left + share * scale, y + (offset + 1) * bar - 1), fill=colour)


def _confidence(draw: ImageDraw.ImageDraw, bins: list, box: tuple[int, int, int, int], font) -> None:
    """The reference's histogram as bars, this run's as a step line over them."""
    left, top, right, bottom = box
    draw.text((left, top - 24), "calibrated confidence", font=font, fill=INK)
    peak = max([max(b[2], b[3]) for b in bins] + [0.01])
    x = lambda value: left + value * (right - left)  # noqa: E731 - confidence runs 0 to 1
    y = lambda share: bottom - share / peak * (bottom - top) * 0.95  # noqa: E731
    for tick in range(6):
        draw.text((x(tick / 5), bottom + 4), f"{tick / 5:.1f}", font=font, fill=INK, anchor="mt")
    draw.text(((left + right) // 2, bottom + 22), "confidence", font=font, fill=INK, anchor="mt")
    for step in _ticks(peak):
        draw.line((left, y(step), right, y(step)), fill=GRID)
        draw.text((left - 4, y(step)), f"{step:g}", font=font, fill=INK, anchor="rm")
    for low, high, _, reference_share in bins:
        if reference_share:
            draw.rectangle((x(low), y(reference_share), x(high), bottom), fill=_light(REFERENCE))
    steps: list[tuple[float, float]] = []
    for low, high, run_share, _ in bins:
        steps += [(x(low), y(run_share)), (x(high), y(run_share))]
    if steps:
        draw.line([(steps[0][0], bottom), *steps, (steps[-1][0], bottom)], fill=THIS_RUN, width=2)
    draw.line((left, bottom, right, bottom), fill=INK)


def _axis(draw: ImageDraw.ImageDraw, peak: float, box: tuple[int, int, int, int], font, name: str) -> float:
    """Gridlines and labels along the bottom of a horizontal bar chart; pixels per unit of share."""
    left, top, right, bottom = box
    scale = (right - left) / (peak * 1.05)
    for step in _ticks(peak):
        draw.line((left + step * scale, top, left + step * scale, bottom), fill=GRID)
        draw.text((left + step * scale, bottom + 4), f"{step:g}", font=font, fill=INK, anchor="mt")
    draw.line((left, top, left, bottom), fill=INK)
    draw.text(((left + right) // 2, bottom + 22), name, font=font, fill=INK, anchor="mt")
    return scale


def _ticks(peak: float) -> list[float]:
    """Round steps from 0 to `peak`: about five of them, each 1, 2 or 5 times a power of ten."""
    raw = peak / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [round(i * step, 10) for i in range(int(peak / step) + 1)]


def _shortened(label: str, limit: int = 32) -> str:
    return label if len(label) <= limit else label[:limit - 1] + "…"


def _light(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.6) for c in colour)
