"""The schedule model: which multiplier a network gets at each point of sampling.

The grammar and its meaning are fixed by ``docs/schedule-syntax.md`` (normative); this module is
its reference implementation:

    SCHED    := PIECE (":" PIECE)*
    PIECE    := KEYFRAME (("," | ";") KEYFRAME)*
    KEYFRAME := VALUE [("@" | "~") POS]

Inside a piece the multiplier moves linearly between keyframes and is flat outside them; a piece
hands over to the next one at its last keyframe's position ("switch").

Standard library only, on purpose: the WebUI evaluates schedules on its hot path, the command line
must start fast, and a JavaScript port (the UI's schedule editor) mirrors this file line by line,
which is why the parser is a plain hand-written scanner over ASCII rules.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lib_scheduled_lora.core.numbers import NumberSyntaxError, format_number, read_number
from lib_scheduled_lora.errors import ScheduleSyntaxError

# A switch or keyframe at T takes effect at the first evaluation at or after T. Positions are
# computed as i / (N - 1), so 10/19 or 6/20 can land a rounding error below a written 0.5 or 0.3;
# the tolerance makes "at T" mean "at T up to rounding". It is far below any meaningful position.
EPSILON = 1e-9

PIECE_SEPARATOR = ":"
KEYFRAME_SEPARATORS = ",;"
POSITION_MARKS = "@~"
# ASCII only (not Python's Unicode whitespace) so that the JavaScript port behaves the same.
WHITESPACE = " \t\n\r\f\v"



@dataclass(frozen=True)
class Keyframe:
    """A multiplier ``value`` at ``pos`` (a fraction of the steps, or a step count)."""

    value: float
    pos: float

    def __post_init__(self) -> None:
        # Coerce ints so that equality, hashing and the canonical text never depend on whether a
        # caller wrote 1 or 1.0.
        object.__setattr__(self, "value", _finite(self.value, "keyframe value"))
        object.__setattr__(self, "pos", _finite(self.pos, "keyframe position"))


@dataclass(frozen=True)
class Piece:
    """Keyframes sorted by position (stable for equal positions), active from ``start``.

    ``start`` is 0 for the first piece and the previous piece's switch position otherwise. The
    piece hands over to the next one at ``switch`` (its last keyframe's position).
    """

    start: float
    keyframes: tuple[Keyframe, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _finite(self.start, "piece start"))
        object.__setattr__(self, "keyframes", tuple(self.keyframes))
        if not self.keyframes:
            raise ValueError("a piece needs at least one keyframe")
        positions = [kf.pos for kf in self.keyframes]
        if positions != sorted(positions):
            raise ValueError(f"keyframes must be sorted by position: {positions}")

    @property
    def switch(self) -> float:
        """Where this piece hands over to the next one: its last keyframe's position."""
        return self.keyframes[-1].pos

    def at_position(self, pos: float) -> float:
        """The multiplier of this piece alone at ``pos`` (linear inside, flat outside).

        Right-continuous: where two keyframes share a position (a jump), the later one applies
        from that position on, like a switch between pieces.
        """
        kfs = self.keyframes
        i = bisect.bisect_right([kf.pos for kf in kfs], pos + EPSILON) - 1
        if i < 0:
            return kfs[0].value
        if i == len(kfs) - 1:
            return kfs[-1].value
        a, b = kfs[i], kfs[i + 1]
        # b.pos > pos + EPSILON >= a.pos, so the span is positive.
        return _lerp(a.value, b.value, _fraction(pos, a.pos, b.pos))


@dataclass(frozen=True, repr=False)
class Schedule:
    """A whole schedule: pieces that hand over to each other at their switch positions.

    ``in_steps`` is True when positions count steps (some position > 1), False when they are
    fractions of the sampling steps. Immutable and hashable (used as a cache key). Build one with
    :func:`parse_schedule`, :meth:`constant`, :meth:`from_pieces` or :meth:`from_json`; the
    constructor only checks that the parts are consistent.
    """

    pieces: tuple[Piece, ...]
    in_steps: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", tuple(self.pieces))
        if not self.pieces:
            raise ValueError("a schedule needs at least one piece")
        expected_start = 0.0
        for k, piece in enumerate(self.pieces):
            if piece.start != expected_start:
                raise ValueError(f"piece {k} starts at {piece.start}, expected {expected_start}")
            if k > 0 and piece.switch < piece.start:
                raise ValueError(f"piece {k} switches at {piece.switch}, before its start {piece.start}")
            expected_start = piece.switch
        if self.in_steps != _any_step_position(self.pieces):
            # The text cannot say "steps" when every position is <= 1, so such a schedule would
            # not survive its own canonical text.
            raise ValueError("in_steps must be True exactly when some position is greater than 1")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def constant(cls, value: float) -> Schedule:
        """``value`` throughout (what a plain ``<lora:x:0.8>`` means)."""
        return cls((Piece(0.0, (Keyframe(value, 0.0),)),), False)

    @classmethod
    def from_pieces(cls, pieces: Iterable[Iterable[tuple[float, float | None]]]) -> Schedule:
        """Build a schedule from keyframes as written: ``[[(value, pos or None), ...], ...]``.

        As in the text, only a piece's first keyframe may have no position (it then sits at the
        piece's start); keyframes are sorted, starts and ``in_steps`` derived. Raises
        ValueError where the text would be a ScheduleSyntaxError.
        """
        built: list[Piece] = []
        start = 0.0
        for k, raw in enumerate(pieces):
            raw = list(raw)
            if not raw:
                raise ValueError(f"piece {k} has no keyframes")
            if any(pos is None for _, pos in raw[1:]):
                raise ValueError(f"piece {k}: only the first keyframe may omit its position")
            piece, _ = _make_piece(start, raw)
            if k > 0 and piece.switch < start:
                raise ValueError(f"piece {k} switches at {piece.switch}, before the previous switch at {start}")
            built.append(piece)
            start = piece.switch
        return cls(tuple(built), _any_step_position(built))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_json`. Raises ValueError on malformed data (a bug in the caller:
        the UI only sends back what it got or built with the same rules)."""
        try:
            pieces = tuple(
                Piece(_json_number(p["start"]), tuple(Keyframe(_json_number(v), _json_number(pos)) for v, pos in p["keyframes"]))
                for p in data["pieces"]
            )
            in_steps = data.get("in_steps", _any_step_position(pieces))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a schedule in JSON form: {exc!r}") from exc
        if not isinstance(in_steps, bool):
            raise ValueError("in_steps must be a boolean")
        return cls(pieces, in_steps)

    # -- evaluation -----------------------------------------------------------------------------

    def at(self, step: float, steps: int) -> float:
        """The multiplier at 0-based step index ``step`` of a pass with ``steps`` steps.

        ``step`` may be fractional (the extra model evaluations of second-order samplers sit
        between steps). With fractions, step index i sits at i / (steps - 1), so the last step
        is at 1 and a one-step pass is at 0.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if self.in_steps:
            return self.at_position(step)
        return self.at_position(step / (steps - 1) if steps > 1 else 0.0)

    def at_position(self, pos: float) -> float:
        """The multiplier at ``pos``, in this schedule's own unit (fraction or step count)."""
        piece = self.pieces[-1]
        for candidate in self.pieces[:-1]:
            if pos < candidate.switch - EPSILON:
                piece = candidate
                break
        return piece.at_position(pos)

    def values(self, steps: int) -> list[float]:
        """One multiplier per step index 0 .. steps - 1."""
        return [self.at(i, steps) for i in range(steps)]

    @property
    def switch_points(self) -> tuple[float, ...]:
        """The positions where one piece hands over to the next (one fewer than pieces)."""
        return tuple(piece.switch for piece in self.pieces[:-1])

    @property
    def is_constant(self) -> bool:
        """True when the multiplier is the same at every position (a host can apply it once)."""
        probes = self._probe_values()
        return all(v == probes[0] for v in probes)

    def _probe_values(self) -> list[float]:
        """Values that span everything the schedule takes on, for :attr:`is_constant`.

        Each piece is active on [previous switch, own switch) (the first from -inf, the last to
        +inf) and linear between keyframes there, so its range is spanned by its value at the
        interval's start, at the keyframes inside, and at the interval's end (the left limit at
        the switch is the first keyframe sitting at the switch). Pieces whose interval is empty
        (two switches at the same position) never show and are skipped.
        """
        probes: list[float] = []
        last = len(self.pieces) - 1
        for k, piece in enumerate(self.pieces):
            lo = piece.start if k > 0 else -math.inf
            hi = piece.switch if k < last else math.inf
            if k > 0 and k < last and not lo < hi:
                continue
            kfs = piece.keyframes
            probes.append(piece.at_position(lo) if k > 0 else kfs[0].value)
            probes.extend(kf.value for kf in kfs if lo < kf.pos < hi)
            probes.append(kfs[-1].value if k == last else next(kf.value for kf in kfs if kf.pos >= hi))
        return probes

    # -- derived schedules --------------------------------------------------------------------

    def scaled(self, factor: float) -> Schedule:
        """Every value multiplied by ``factor`` (positions unchanged), e.g. for a strength axis."""
        factor = _finite(factor, "scale factor")
        pieces = tuple(
            Piece(p.start, tuple(Keyframe(kf.value * factor, kf.pos) for kf in p.keyframes)) for p in self.pieces
        )
        return Schedule(pieces, self.in_steps)

    # -- text and JSON ------------------------------------------------------------------------

    def format(self) -> str:
        """The canonical text: ``@`` and ``,``, shortest numbers, positions only where needed.

        A position is left out only where the parser puts the keyframe back at the same place:
        the first keyframe of a later piece at the piece's start (``0@0.2:0.5,1@1``) and a lone
        keyframe of the final piece at its start (``0@0.3:1``, ``0.8``). A first-piece ramp keeps
        its ``@0`` for readability, and a non-final piece always prints its last position,
        because without it the ``:`` would read as an argument separator.
        """
        last = len(self.pieces) - 1
        texts = []
        for k, piece in enumerate(self.pieces):
            kfs = piece.keyframes
            words = []
            for j, kf in enumerate(kfs):
                if j == 0 and _may_omit_first_position(piece, k, last):
                    words.append(format_number(kf.value))
                else:
                    words.append(f"{format_number(kf.value)}@{format_number(kf.pos)}")
            texts.append(",".join(words))
        return PIECE_SEPARATOR.join(texts)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        # The canonical text is lossless (it parses back to an equal schedule), and far easier to
        # read in test failures than the nested dataclasses.
        return f"Schedule({self.format()!r})"

    @property
    def ends_with_position(self) -> bool:
        """True when the canonical text ends with ``@POS``, so that a ``:`` written after it
        would continue the schedule instead of starting the next argument."""
        final = self.pieces[-1]
        return not (len(final.keyframes) == 1 and _may_omit_first_position(final, len(self.pieces) - 1, len(self.pieces) - 1))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form for the UI: ``{"in_steps": b, "pieces": [{"start": s, "keyframes": [[v, pos], ...]}]}``."""
        return {
            "in_steps": self.in_steps,
            "pieces": [{"start": p.start, "keyframes": [[kf.value, kf.pos] for kf in p.keyframes]} for p in self.pieces],
        }


# -- parsing ----------------------------------------------------------------------------------

Span = tuple[str, int]
"""A piece of text and the 0-based index where it starts inside the tag."""


@dataclass(frozen=True)
class _RawKeyframe:
    value: float
    pos: float | None
    text: str  # as written, without surrounding whitespace (for error messages)
    index: int  # 0-based index of ``text`` inside the tag


def parse_schedule(text: str, *, tag: str | None = None, offset: int = 0) -> Schedule:
    """Parse a whole schedule such as ``0@0.3:1``.

    Errors name ``tag`` (the schedule text itself when None) and a 1-based column inside it;
    ``offset`` is the 0-based index where ``text`` starts inside ``tag``. Every ``:`` here
    separates pieces, so each piece but the last must end with a position.
    """
    return parse_pieces(split_spans(text, PIECE_SEPARATOR, offset), tag=text if tag is None else tag)


def parse_pieces(segments: Sequence[Span], *, tag: str) -> Schedule:
    """Parse pieces already split on ``:`` (the tag parser groups them first).

    Checks from left to right, so the first error in the text is the one reported.
    """
    pieces: list[Piece] = []
    start = 0.0
    for k, (text, index) in enumerate(segments):
        if not text.strip(WHITESPACE):
            raise _empty_part_error(tag, segments, k, PIECE_SEPARATOR, "piece")
        raw = _parse_piece(text, index, tag)
        if k < len(segments) - 1 and raw[-1].pos is None:
            raise ScheduleSyntaxError(
                tag, PIECE_SEPARATOR, index + len(text) + 1,
                "follows a piece that does not end at a position, so there is nothing to switch at",
            )
        piece, switch_index = _make_piece(start, [(kf.value, kf.pos) for kf in raw])
        if k > 0 and piece.switch < start:
            offender = raw[switch_index]
            raise ScheduleSyntaxError(
                tag, offender.text, offender.index + 1,
                f"lies before the previous switch at {format_number(start)} (switch positions must not decrease)",
            )
        pieces.append(piece)
        start = piece.switch
    return Schedule(tuple(pieces), _any_step_position(pieces))


def piece_ends_with_position(text: str) -> bool:
    """Whether a ``:`` after this piece text continues the schedule (syntactic check only).

    True when the last keyframe as written carries ``@``/``~``. Malformed text is left to the
    parser, which reports it with a column.
    """
    last = re.split(f"[{KEYFRAME_SEPARATORS}]", text)[-1]
    return any(mark in last for mark in POSITION_MARKS)


def split_spans(text: str, separators: str, offset: int = 0) -> list[Span]:
    """Split ``text`` on any of ``separators``, keeping each part's index (plus ``offset``)."""
    spans: list[Span] = []
    begin = 0
    for i, ch in enumerate(text):
        if ch in separators:
            spans.append((text[begin:i], offset + begin))
            begin = i + 1
    spans.append((text[begin:], offset + begin))
    return spans


def _parse_piece(text: str, index: int, tag: str) -> list[_RawKeyframe]:
    parts = split_spans(text, KEYFRAME_SEPARATORS, index)
    keyframes = []
    for j, (part, part_index) in enumerate(parts):
        if not part.strip(WHITESPACE):
            raise _empty_part_error(tag, parts, j, None, "keyframe", source=(text, index))
        keyframes.append(_parse_keyframe(part, part_index, tag, first=j == 0))
    return keyframes


def _parse_keyframe(part: str, index: int, tag: str, *, first: bool) -> _RawKeyframe:
    text, text_index = _strip(part, index)
    marks = [i for i, ch in enumerate(part) if ch in POSITION_MARKS]
    if len(marks) > 1:
        raise ScheduleSyntaxError(tag, text, text_index + 1, "has more than one position mark ('@')")
    if not marks:
        value = _parse_number(part, index, tag)
        if not first:
            raise ScheduleSyntaxError(
                tag, text, text_index + 1, "has no position; only a piece's first keyframe may leave it out",
            )
        return _RawKeyframe(value, None, text, text_index)
    mark = marks[0]
    value_part, pos_part = part[:mark], part[mark + 1:]
    if not value_part.strip(WHITESPACE):
        raise ScheduleSyntaxError(tag, text, text_index + 1, f"has no value before '{part[mark]}'")
    value = _parse_number(value_part, index, tag)
    if not pos_part.strip(WHITESPACE):
        raise ScheduleSyntaxError(tag, text, text_index + 1, f"has no position after '{part[mark]}'")
    pos = _parse_number(pos_part, index + mark + 1, tag)
    return _RawKeyframe(value, pos, text, text_index)


def _parse_number(part: str, index: int, tag: str) -> float:
    text, text_index = _strip(part, index)
    try:
        return read_number(text)
    except NumberSyntaxError as exc:
        raise ScheduleSyntaxError(tag, text, text_index + 1, exc.problem) from None


def _empty_part_error(
    tag: str, parts: Sequence[Span], k: int, separator: str | None, noun: str, *, source: Span | None = None,
) -> ScheduleSyntaxError:
    """The error for an empty piece or keyframe, pointing at the separator next to the gap.

    ``separator`` None means "read it from ``source``" (keyframes may be split by ``,`` or ``;``).
    """

    def separator_at(i: int) -> str:
        if separator is not None:
            return separator
        assert source is not None
        return source[0][i - source[1]]

    if k > 0:
        at = parts[k][1] - 1
        return ScheduleSyntaxError(tag, separator_at(at), at + 1, f"is not followed by a {noun}")
    if len(parts) > 1:
        at = parts[0][1] + len(parts[0][0])
        return ScheduleSyntaxError(tag, separator_at(at), at + 1, f"is not preceded by a {noun}")
    return ScheduleSyntaxError(tag, parts[0][0], parts[0][1] + 1, f"is an empty {noun}")


def _strip(part: str, index: int) -> Span:
    """``part`` without surrounding whitespace, and the index where what is left starts."""
    stripped = part.lstrip(WHITESPACE)
    return stripped.rstrip(WHITESPACE), index + len(part) - len(stripped)


# -- helpers ----------------------------------------------------------------------------------


def _make_piece(start: float, raw: Sequence[tuple[float, float | None]]) -> tuple[Piece, int]:
    """A Piece from keyframes as written, and the written index of its switch keyframe.

    A position-less first keyframe sits at ``start``. The sort is stable, so keyframes at the
    same position keep their written order (the later one wins at that position).
    """
    positioned = [(value, start if pos is None else pos) for value, pos in raw]
    order = sorted(range(len(positioned)), key=lambda j: positioned[j][1])
    piece = Piece(start, tuple(Keyframe(*positioned[j]) for j in order))
    return piece, order[-1]


def _may_omit_first_position(piece: Piece, k: int, last: int) -> bool:
    if piece.keyframes[0].pos != piece.start:
        return False
    if len(piece.keyframes) == 1:
        return k == last  # a non-final piece's only keyframe is its switch: always printed
    return k > 0  # ramps in the first piece keep "@0" for readability


def _any_step_position(pieces: Iterable[Piece]) -> bool:
    return any(kf.pos > 1 for piece in pieces for kf in piece.keyframes)


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}")
    return x


def _json_number(x: Any) -> float:
    return _finite(x, "JSON keyframe entry")


def _fraction(x: float, x0: float, x1: float) -> float:
    """Where ``x`` sits between ``x0 < x1``, clamped to [0, 1]."""
    span = x1 - x0
    if math.isinf(span):  # positions near the float limit: halving is exact and cannot overflow
        x, x0, x1 = x / 2, x0 / 2, x1 / 2
        span = x1 - x0
    return min(1.0, max(0.0, (x - x0) / span))


def _lerp(a: float, b: float, t: float) -> float:
    # Equal values return exactly that value, so that flat ramps stay exactly constant.
    if a == b:
        return a
    diff = b - a
    value = a * (1 - t) + b * t if math.isinf(diff) else a + diff * t
    return min(max(value, min(a, b)), max(a, b))
