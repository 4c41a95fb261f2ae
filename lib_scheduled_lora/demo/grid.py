"""A labelled image grid (PIL only, default font): rows = prompts, columns = settings."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def _font():
    try:
        return ImageFont.load_default()
    except OSError:  # pragma: no cover
        return None


def _wrap(draw, text: str, width: int, font) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines or [""]


def labelled_grid(
    cells: list[list[Image.Image]],
    column_labels: list[str],
    row_labels: list[str],
    scale: int = 4,
    title: str | None = None,
    pad: int = 4,
    cell_labels: list[list[str]] | None = None,
) -> Image.Image:
    """``cells[r][c]`` (all the same size) upscaled ``scale``x (nearest), with labels; optional
    ``cell_labels[r][c]`` is written under each cell (e.g. its metrics)."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    w, h = cells[0][0].size
    cw, ch = w * scale, h * scale
    line_h = 12
    col_lines = [_wrap(probe, label, cw, font) for label in column_labels]
    header_h = line_h * max(len(lines) for lines in col_lines) + pad
    row_w = max(int(probe.textlength(label, font=font)) for label in row_labels) + 2 * pad
    title_h = line_h + 2 * pad if title else 0
    width = row_w + len(column_labels) * (cw + pad) + pad
    under = line_h if cell_labels else 0
    ch_total = ch + under
    height = title_h + header_h + len(row_labels) * (ch_total + pad) + pad
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, lines in enumerate(col_lines):
        x = row_w + c * (cw + pad)
        for i, line in enumerate(lines):
            draw.text((x, title_h + i * line_h), line, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = title_h + header_h + r * (ch_total + pad)
        draw.text((pad, y + ch // 2 - line_h // 2), label, fill="black", font=font)
        for c, cell in enumerate(cells[r]):
            out.paste(cell.resize((cw, ch), Image.Resampling.NEAREST), (row_w + c * (cw + pad), y))
            if cell_labels:
                draw.text((row_w + c * (cw + pad), y + ch + 1), cell_labels[r][c], fill="black", font=font)
    return out
