"""The picture of a sweep (Pillow only, as the WebUIs ship it): a labelled grid whose every cell
has, under its image, a small curve of its UNet multiplier per step (one scale for the whole grid,
so curves compare), its schedule, and its numbers. Also writes the grid and its JSON atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lib_scheduled_lora.core.sweep import SweepPlan

CURVE_H = 30
LINE_H = 12
PAD = 6
CURVE = (31, 119, 180)
GREY = (200, 200, 200)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _wrap(draw, text: str, width: int, font) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
        while draw.textlength(line, font=font) > width and len(line) > 1:  # one long word: cut it
            cut = len(line)
            while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    return lines or [""]


def _fit(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_curve(draw, box: tuple[int, int, int, int], values: Sequence[float], lo: float, hi: float) -> None:
    """``values`` (one per step) as a line in ``box`` (left, top, right, bottom) on the scale lo..hi."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=GREY)
    span = (hi - lo) or 1.0

    def y(v: float) -> float:
        return bottom - 2 - (bottom - top - 4) * (v - lo) / span

    if lo < 0 < hi:
        draw.line((left, y(0.0), right, y(0.0)), fill=GREY)
    n = len(values)
    points = [(left + 2 + (right - left - 4) * (i / max(1, n - 1)), y(v)) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill=CURVE, width=2)
    elif points:
        draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=CURVE)


def sweep_grid(
    plan: SweepPlan,
    images: Sequence[Any],
    *,
    cell_notes: Sequence[str] | None = None,
    title: str | None = None,
    cell_size: int | None = None,
):
    """The grid image. ``images`` row by row as ``plan.cells``; ``cell_notes`` a line per cell (its
    numbers). Small images are enlarged (nearest) to ``cell_size`` (default: at least 128 px)."""
    from PIL import Image, ImageDraw

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    w0, h0 = images[0].size
    scale = max(1, (cell_size or 128) // max(w0, h0)) if max(w0, h0) < (cell_size or 128) else 1
    cw, ch = w0 * scale, h0 * scale
    cw = max(cw, 120)
    col_lines = [_wrap(probe, label, cw, font) for label in plan.column_labels()]
    row_labels = plan.row_labels()
    row_w = max([0] + [int(probe.textlength(line, font=font)) for label in row_labels for line in _wrap(probe, label, 180, font)]) + 2 * PAD
    title_lines = _wrap(probe, title, max(400, row_w + plan.columns * (cw + PAD)), font) if title else []
    title_h = LINE_H * len(title_lines) + (PAD if title else 0)
    header_h = LINE_H * max(len(lines) for lines in col_lines) + PAD
    notes = [_wrap(probe, note, cw, font)[:2] for note in cell_notes] if cell_notes else None
    notes_lines = max((len(n) for n in notes), default=0) if notes else 0
    under = PAD + CURVE_H + 2 + LINE_H * (1 + notes_lines)
    cell_h = ch + under
    width = row_w + plan.columns * (cw + PAD) + PAD
    width = max(width, max((int(probe.textlength(t, font=font)) for t in title_lines), default=0) + 2 * PAD)
    height = PAD + title_h + header_h + plan.rows * (cell_h + PAD)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * LINE_H), line, fill="black", font=font)
    top = PAD + title_h
    for c, lines in enumerate(col_lines):
        x = row_w + c * (cw + PAD)
        for i, line in enumerate(lines):
            draw.text((x, top + i * LINE_H), line, fill="black", font=font)
    curves = [cell.unet_values(plan.steps) for cell in plan.cells]
    lo = min(0.0, *(min(v) for v in curves))
    hi = max(1.0, *(max(v) for v in curves))
    for r, label in enumerate(row_labels):
        y = top + header_h + r * (cell_h + PAD)
        for i, line in enumerate(_wrap(probe, label, 180, font)):
            draw.text((PAD, y + ch // 2 - LINE_H // 2 + i * LINE_H), line, fill="black", font=font)
        for c in range(plan.columns):
            k = r * plan.columns + c
            x = row_w + c * (cw + PAD)
            image = images[k]
            if scale != 1:
                image = image.resize((w0 * scale, h0 * scale), Image.Resampling.NEAREST)
            out.paste(image.convert("RGB"), (x, y))
            curve_top = y + ch + PAD // 2
            draw_curve(draw, (x, curve_top, x + cw - 1, curve_top + CURVE_H), curves[k], lo, hi)
            text_y = curve_top + CURVE_H + 2
            draw.text((x, text_y), _fit(draw, plan.cells[k].label, cw, font), fill="black", font=font)
            for i, line in enumerate(notes[k] if notes else []):
                draw.text((x, text_y + (1 + i) * LINE_H), line, fill=(90, 90, 90), font=font)
    return out


def save_sweep(image, path: str | os.PathLike, report: Mapping[str, Any], infotext: str | None = None) -> tuple[Path, Path]:
    """Write the grid PNG (with a WebUI ``parameters`` chunk when given) and ``<name>.json`` beside
    it, each atomically (a temporary file renamed into place)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    info.add_text("scheduled_lora_sweep", json.dumps({k: report[k] for k in ("network", "x", "y", "same_mean") if k in report}))
    _atomic(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    json_path = path.with_suffix(".json")
    _atomic(json_path, lambda handle: handle.write(json.dumps(report, indent=2).encode("utf-8")))
    return path, json_path


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
