"""A small line plot of each network's UNet multiplier per evaluation, drawn with Pillow only
(the WebUI ships Pillow; no matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_multipliers(
    passes: Sequence[tuple[str, int, Mapping[str, Sequence[tuple[float, float]]]]],
    size: tuple[int, int] = (640, 280),
):
    """One panel per pass: ``(title, steps, {network: [(position, multiplier), ...]})``."""
    from PIL import Image, ImageDraw

    width, panel_h = size
    image = Image.new("RGB", (width, panel_h * max(1, len(passes))), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, steps, series) in enumerate(passes):
        top = index * panel_h
        left, right, upper, lower = 48, width - 150, top + 28, top + panel_h - 32
        values = [m for points in series.values() for _, m in points] or [0.0, 1.0]
        lo, hi = min(0.0, min(values)), max(1.0, max(values))
        span = (hi - lo) or 1.0
        last = max(1, steps - 1)

        def xy(
            pos: float,
            m: float,
            left=left,
            right=right,
            upper=upper,
            lower=lower,
            lo=lo,
            span=span,
            last=last,
        ):
            return left + (right - left) * pos / last, lower - (lower - upper) * (m - lo) / span

        draw.text((left, top + 8), title, fill="black")
        draw.rectangle((left, upper, right, lower), outline=(160, 160, 160))
        for level in (lo, 0.0, hi) if lo < 0 else (lo, hi):
            y = xy(0, level)[1]
            draw.line((left, y, right, y), fill=(220, 220, 220))
            draw.text((4, y - 6), f"{level:g}", fill="black")
        draw.text((left, lower + 6), "0", fill="black")
        draw.text((right - 30, lower + 6), f"step {steps - 1}", fill="black")
        for k, (name, points) in enumerate(series.items()):
            colour = COLOURS[k % len(COLOURS)]
            coords = [xy(p, m) for p, m in points]
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for x, y in coords:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            draw.text((right + 10, upper + 14 * k), name[:22], fill=colour)
    return image
