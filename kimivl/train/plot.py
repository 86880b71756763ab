"""A PNG line chart of training curves, drawn with Pillow (already a dependency) rather than matplotlib."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def plot_curves(path: str | os.PathLike, panels: dict[str, list[tuple[float, float]]], xlabel: str = "step",
                size: tuple[int, int] = (640, 300)) -> None:
    """One panel per named series (stacked vertically), each with its axes, min/max labels and the line."""
    panels = {k: v for k, v in panels.items() if v}
    w, h = size
    image = Image.new("RGB", (w, h * max(len(panels), 1)), "white")
    draw = ImageDraw.Draw(image)
    for n, (title, points) in enumerate(panels.items()):
        top, left, right, bottom = n * h + 24, 64, w - 16, n * h + h - 28
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left),  # noqa: E731
                              bottom - (y - y0) / (y1 - y0) * (bottom - top))
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        draw.text((left, n * h + 6), title, fill="black")
        draw.text((4, top), f"{y1:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{y0:.4g}", fill="black")
        draw.text((left, bottom + 6), f"{x0:g}", fill="black")
        draw.text((right - 40, bottom + 6), f"{x1:g}", fill="black")
        draw.text(((left + right) // 2 - 12, bottom + 6), xlabel, fill="black")
        colour = COLOURS[n % len(COLOURS)]
        if len(points) == 1:
            x, y = to_px(*points[0])
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        else:
            draw.line([to_px(x, y) for x, y in points], fill=colour, width=2)
    image.save(path)
