"""Typed edits of a prompt's network tags: the values of XYZ axes and sweeps, and what they do.

A value is ``VALUE`` (applies to the tags ``unnamed`` selects; the XYZ axes pass the host's rule
"every scheduled tag") or ``name=VALUE`` (every tag of that network, plain or not). Each edit
parses the prompt's tags with the one grammar (:mod:`~lib_scheduled_lora.core.tags`), changes the
chosen tags and writes them back in canonical form; the rest of the prompt is untouched. Values'
numbers go through the one number grammar.

* ``apply_schedule``: the first-pass schedule(s) (both te and unet, or the moving one);
* ``apply_hires``: the hires pass's schedule;
* ``apply_strength``: every multiplier scaled by a factor;
* ``apply_te`` / ``apply_unet``: one part scaled (a te/unet split);
* ``apply_switch``: the first switch point (T in ``A@T:B``) moved;
* ``apply_ramp``: the first pass replaced by a ramp from 0 to the tag's peak shaped by an
  exponent p (value · t^p at t = 0, ¼, ½, ¾, 1: p = 1 linear, p > 1 late, p < 1 early).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lib_scheduled_lora.core.numbers import NumberSyntaxError, format_number, read_number
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule
from lib_scheduled_lora.core.tags import NetworkTag, TagMatch, map_tags
from lib_scheduled_lora.errors import ScheduleSyntaxError

_NAMED = re.compile(r"^\s*([^=:<>]+?)\s*=(.*)$", re.S)
RAMP_POINTS = 5

Selector = Callable[[NetworkTag], bool]


def every_tag(tag: NetworkTag) -> bool:
    return True


def split_name(value: str) -> tuple[str | None, str]:
    """``"wday=0@0.3:1"`` -> ("wday", "0@0.3:1"); ``"0@0.3:1"`` -> (None, "0@0.3:1")."""
    m = _NAMED.match(str(value))
    if m:
        return m.group(1), m.group(2).strip()
    return None, str(value).strip()


def parse_schedule_value(value: str) -> tuple[str | None, Schedule]:
    name, text = split_name(value)
    return name, parse_schedule(text, tag=str(value), offset=len(str(value)) - len(text))


def parse_number_value(value: str) -> tuple[str | None, float]:
    """``"wday=0.5"`` -> ("wday", 0.5), in the schedule grammar's number syntax (no ``1_0``, ``nan``)."""
    name, text = split_name(value)
    try:
        return name, read_number(text)
    except NumberSyntaxError as exc:
        raise ScheduleSyntaxError(str(value), text, len(str(value)) - len(text) + 1, exc.problem) from None


def schedule_label(value: str) -> str:
    name, schedule = parse_schedule_value(value)
    return f"{name}={schedule.format()}" if name else schedule.format()


def number_label(value: str) -> str:
    name, number = parse_number_value(value)
    return f"{name}={format_number(number)}" if name else format_number(number)


def rewrite(prompt: str, name: str | None, change: Callable[[NetworkTag], NetworkTag], unnamed: Selector) -> str:
    """``prompt`` with ``change`` applied to the tags of network ``name`` (or those ``unnamed``
    selects when ``name`` is None)."""

    def wanted(tag: NetworkTag) -> bool:
        return unnamed(tag) if name is None else tag.name == name

    def fn(match: TagMatch) -> NetworkTag | None:
        if match.tag is None or not wanted(match.tag):
            return None
        return change(match.tag)

    return map_tags(prompt, fn)


def _scheduled_parts(tag: NetworkTag) -> list[str]:
    """Which first-pass schedules an axis replaces: both when they are the same, otherwise the
    non-constant ones (``<lora:x:1:0@0.3:1>`` keeps its te of 1), or both when neither moves."""
    if tag.te == tag.unet:
        return ["te", "unet"]
    moving = [k for k in ("te", "unet") if not getattr(tag, k).is_constant]
    return moving or ["te", "unet"]


def apply_schedule(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    name, schedule = parse_schedule_value(value)
    return rewrite(
        prompt, name, lambda tag: tag.with_schedules(**{k: schedule for k in _scheduled_parts(tag)}), unnamed
    )


def apply_hires(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    name, schedule = parse_schedule_value(value)
    return rewrite(prompt, name, lambda tag: tag.with_schedules(hr=schedule), unnamed)


def apply_strength(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    name, factor = parse_number_value(value)
    return rewrite(prompt, name, lambda tag: tag.scaled(factor), unnamed)


def apply_te(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    """The text encoder's schedules (both passes) scaled by the value; the UNet's kept."""
    name, factor = parse_number_value(value)
    return rewrite(
        prompt, name, lambda tag: tag.with_schedules(te=tag.te.scaled(factor), unet=tag.unet, hrte=tag.hrte.scaled(factor), hrunet=tag.hrunet), unnamed
    )


def apply_unet(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    """The UNet's schedules (both passes) scaled by the value; the text encoder's kept."""
    name, factor = parse_number_value(value)
    return rewrite(
        prompt, name, lambda tag: tag.with_schedules(te=tag.te, unet=tag.unet.scaled(factor), hrte=tag.hrte, hrunet=tag.hrunet.scaled(factor)), unnamed
    )


def with_switch(schedule: Schedule, position: float) -> Schedule:
    """``schedule`` with its first switch point (T in ``A@T:B``) moved to ``position``.

    A schedule without a switch point is returned unchanged. Raises ValueError when the new
    position would put keyframes out of order (e.g. before a ramp inside the first piece).
    """
    if len(schedule.pieces) < 2:
        return schedule
    old = schedule.pieces[0].switch
    raw = [[(kf.value, kf.pos) for kf in piece.keyframes] for piece in schedule.pieces]
    raw[0][-1] = (raw[0][-1][0], position)
    if raw[1][0][1] == old:
        raw[1][0] = (raw[1][0][0], position)
    return Schedule.from_pieces(raw)


def apply_switch(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    name, position = parse_number_value(value)

    def change(tag: NetworkTag) -> NetworkTag:
        parts = [k for k in ("te", "unet") if getattr(tag, k).switch_points]
        if tag.te == tag.unet:
            parts = ["te", "unet"] if parts else []
        try:
            return tag.with_schedules(**{k: with_switch(getattr(tag, k), position) for k in parts})
        except ValueError as exc:
            raise ScheduleSyntaxError(tag.format(), str(value), 1, f"cannot be the switch point: {exc}") from None

    return rewrite(prompt, name, change, unnamed)


def peak(schedule: Schedule) -> float:
    """The largest multiplier a schedule reaches (its keyframes' values bound it)."""
    return max(kf.value for piece in schedule.pieces for kf in piece.keyframes)


def ramp(top: float, exponent: float) -> Schedule:
    """0 -> ``top`` over the pass, ``top · t^exponent`` at t = 0, ¼, ½, ¾, 1 (linear in between)."""
    if not exponent > 0:
        raise ValueError(f"a ramp's exponent must be positive, got {format_number(exponent)}")
    points = [i / (RAMP_POINTS - 1) for i in range(RAMP_POINTS)]
    return Schedule.from_pieces([[(round(top * t**exponent, 6), t) for t in points]])


def apply_ramp(prompt: str, value: str, unnamed: Selector = every_tag) -> str:
    name, exponent = parse_number_value(value)

    def change(tag: NetworkTag) -> NetworkTag:
        try:
            return tag.with_schedules(**{k: ramp(peak(getattr(tag, k)), exponent) for k in _scheduled_parts(tag)})
        except ValueError as exc:
            raise ScheduleSyntaxError(str(value), str(value), 1, f"is not a ramp shape: {exc}") from None

    return rewrite(prompt, name, change, unnamed)
