"""A labelled image grid (PIL only): rows = prompts, columns = settings, with a title, text under
each cell, optional frames that mark cells, a line under each column and a legend."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

TITLE_SIZE, TEXT_SIZE = 17, 12  # font sizes (pixels) of the title and of every other text
FRAME = 3  # width of a cell's frame, pixels
INK, MUTED, MARK = (0, 0, 0), (90, 90, 90), (0, 150, 60)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font (bundled since Pillow 10.1); the fixed bitmap one before that."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow, or no FreeType
        return ImageFont.load_default()


def _pieces(draw: ImageDraw.ImageDraw, word: str, width: int, face) -> list[str]:
    """A word too wide for a line (a tag) cut into pieces that fit, after ':' or ',' where possible."""
    pieces, rest = [], word
    while draw.textlength(rest, font=face) > width and len(rest) > 1:
        cut = max((i for i in range(1, len(rest) + 1) if draw.textlength(rest[:i], font=face) <= width), default=1)
        soft = max(rest.rfind(":", 0, cut), rest.rfind(",", 0, cut))
        cut = soft + 1 if soft > 0 else cut
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return [*pieces, rest]


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, face) -> list[str]:
    lines, line = [], ""
    words = [piece for word in text.split() for piece in _pieces(draw, word, width, face)]
    for word in words:
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines or [""]


@dataclass
class GridText:
    """Everything written on the grid besides the images."""

    title: str = ""
    subtitle: list[str] = field(default_factory=list)
    column_labels: list[str] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    cell_labels: list[list[list[str]]] | None = None  # [row][column] -> lines under the cell
    marked: list[list[bool]] | None = None  # [row][column] -> framed in the MARK colour
    column_notes: list[str] | None = None  # one line under each column, below the last row
    legend: list[str] = field(default_factory=list)  # lines at the bottom
    takeaway: str = ""  # the one line to read first, in the MARK colour, under the title


def labelled_grid(cells: list[list[Image.Image]], text: GridText, scale: int = 4, pad: int = 6) -> Image.Image:
    """``cells[r][c]`` (all the same size) upscaled ``scale``x (nearest) with ``text`` around them."""
    title_face, face = font(TITLE_SIZE), font(TEXT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = TEXT_SIZE + 3
    w, h = cells[0][0].size
    cw, ch = w * scale, h * scale
    row_w = max(int(probe.textlength(label, font=face)) for label in text.row_labels) + 2 * pad
    width = row_w + len(text.column_labels) * (cw + pad) + pad
    text_w = width - 2 * pad

    title_lines = _wrap(probe, text.title, text_w, title_face) if text.title else []
    top_lines = [*(_wrap(probe, s, text_w, face) for s in text.subtitle)]
    takeaway_lines = _wrap(probe, text.takeaway, text_w, face) if text.takeaway else []
    col_lines = [_wrap(probe, label, cw, face) for label in text.column_labels]
    under = max((len(lines) for row in text.cell_labels or [] for lines in row), default=0) * line_h
    note_lines = [_wrap(probe, note, cw, face) for note in text.column_notes or []]
    notes_h = max((len(lines) for lines in note_lines), default=0) * line_h
    legend_lines = [line for item in text.legend for line in _wrap(probe, item, text_w, face)]

    title_h = len(title_lines) * (TITLE_SIZE + 5)
    top_h = sum(len(lines) for lines in top_lines) * line_h + len(takeaway_lines) * line_h
    header_h = line_h * max((len(lines) for lines in col_lines), default=1) + pad
    row_h = ch + under + pad
    height = (
        pad + title_h + top_h + pad + header_h + len(text.row_labels) * row_h
        + notes_h + (pad + len(legend_lines) * line_h if legend_lines else 0) + pad
    )
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)

    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=INK, font=title_face)
        y += TITLE_SIZE + 5
    for line in takeaway_lines:
        draw.text((pad, y), line, fill=MARK, font=face)
        y += line_h
    for lines in top_lines:
        for line in lines:
            draw.text((pad, y), line, fill=MUTED, font=face)
            y += line_h
    y += pad
    for c, lines in enumerate(col_lines):
        x = row_w + c * (cw + pad)
        for i, line in enumerate(lines):
            draw.text((x, y + i * line_h), line, fill=INK, font=face)
    y += header_h
    for r, label in enumerate(text.row_labels):
        draw.text((pad, y + ch // 2 - line_h // 2), label, fill=INK, font=face)
        for c, cell in enumerate(cells[r]):
            x = row_w + c * (cw + pad)
            out.paste(cell.resize((cw, ch), Image.Resampling.NEAREST), (x, y))
            if text.marked and text.marked[r][c]:
                for k in range(FRAME):
                    draw.rectangle((x + k, y + k, x + cw - 1 - k, y + ch - 1 - k), outline=MARK)
            if text.cell_labels:
                for i, line in enumerate(text.cell_labels[r][c]):
                    draw.text((x, y + ch + 1 + i * line_h), line, fill=INK, font=face)
        y += row_h
    for c, lines in enumerate(note_lines):
        x = row_w + c * (cw + pad)
        for i, line in enumerate(lines):
            draw.text((x, y + i * line_h), line, fill=MARK, font=face)
    y += notes_h
    if legend_lines:
        y += pad
        for line in legend_lines:
            draw.text((pad, y), line, fill=MUTED, font=face)
            y += line_h
    return out
