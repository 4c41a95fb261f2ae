"""The XYZ-grid axes' values: parsing, canonical labels, and rewriting a prompt's tags.

Axis values are ``SCHED`` (applies to every scheduled tag of the prompt) or ``name=SCHED`` (to
every tag of that network, plain or not). Grid cells get a copy of the processing object, so an
axis only rewrites that copy's prompt; the schedule then travels in the prompt like any other
(and lands in the infotext). XYZ splits values on commas (CSV, so quotes work): write keyframes
inside one value with ``;`` (``0@0;1@0.5``) or quote the value (``"0@0,1@0.5"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lib_scheduled_lora.core.numbers import NumberSyntaxError, format_number, read_number
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule
from lib_scheduled_lora.core.tags import NetworkTag, TagMatch, map_tags
from lib_scheduled_lora.errors import ScheduleSyntaxError
from lib_scheduled_lora.hosts.ownership import is_ours

_NAMED = re.compile(r"^\s*([^=:<>]+?)\s*=(.*)$", re.S)


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


def _targets(name: str | None) -> Callable[[NetworkTag], bool]:
    if name is None:
        return is_ours
    return lambda tag: tag.name == name


def _rewrite(prompt: str, name: str | None, change: Callable[[NetworkTag], NetworkTag]) -> str:
    wanted = _targets(name)

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


def apply_schedule(prompt: str, value: str) -> str:
    name, schedule = parse_schedule_value(value)
    return _rewrite(
        prompt, name, lambda tag: tag.with_schedules(**{k: schedule for k in _scheduled_parts(tag)})
    )


def apply_hires(prompt: str, value: str) -> str:
    name, schedule = parse_schedule_value(value)
    return _rewrite(prompt, name, lambda tag: tag.with_schedules(hr=schedule))


def apply_strength(prompt: str, value: str) -> str:
    name, factor = parse_number_value(value)
    return _rewrite(prompt, name, lambda tag: tag.scaled(factor))


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


def apply_switch(prompt: str, value: str) -> str:
    name, position = parse_number_value(value)

    def change(tag: NetworkTag) -> NetworkTag:
        parts = [k for k in ("te", "unet") if getattr(tag, k).switch_points]
        if tag.te == tag.unet:
            parts = ["te", "unet"] if parts else []
        try:
            return tag.with_schedules(**{k: with_switch(getattr(tag, k), position) for k in parts})
        except ValueError as exc:
            raise ScheduleSyntaxError(
                tag.format(), str(value), 1, f"cannot be the switch point: {exc}"
            ) from None

    return _rewrite(prompt, name, change)


AXES = {
    "Scheduled LoRA: schedule": (apply_schedule, schedule_label),
    "Scheduled LoRA: switch point": (apply_switch, number_label),
    "Scheduled LoRA: strength": (apply_strength, number_label),
    "Scheduled LoRA: hires schedule": (apply_hires, schedule_label),
}


def find_xyz_module(scripts_data: Iterable[Any], loaded: Mapping[str, Any]) -> Any | None:
    """The loaded "X/Y/Z plot" script's module (the one holding ``AxisOption`` and ``axis_options``).

    Every WebUI so far loads it as ``scripts/xyz_grid.py`` (module name ``xyz_grid.py``), found
    among the loaded scripts; a host that moves it elsewhere (newer Forge Neo builds) is found by
    looking at the loaded modules (``loaded``: ``sys.modules``) for the same two names.
    """

    def is_xyz(module: Any) -> bool:
        return isinstance(getattr(module, "AxisOption", None), type) and isinstance(
            getattr(module, "axis_options", None), list
        )

    for data in scripts_data:
        module = getattr(data, "module", None)
        if getattr(data.script_class, "__module__", None) in ("xyz_grid.py", "xyz_grid") and is_xyz(module):
            return module
    for data in scripts_data:
        module = getattr(data, "module", None)
        if is_xyz(module):
            return module
    for module in list(loaded.values()):
        if is_xyz(module):
            return module
    return None
