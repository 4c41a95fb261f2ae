"""Sweeps: a grid of one prompt with one network's tag changed along typed axes.

An :class:`Axis` is a kind of change (:data:`KINDS`: strength, te or unet strength, switch point,
ramp shape, schedule, hires schedule) and its values, written as the XYZ grid writes them: a
comma-separated list (CSV, so quotes work; ``;`` separates keyframes inside a schedule) where a
numeric item may be a range, ``0.25-2 (+0.25)`` (start-end, step) or ``0-0.8 [5]`` (start-end,
count), or ``1-4`` (step 1). Every number is read with the one number grammar.

Cells are the prompt with the edits of their x and y values applied (through
:mod:`~lib_scheduled_lora.core.tag_edits`, to every tag of the named network); edits that replace a
schedule run before those that scale or move it, so ``schedule × strength`` scales each schedule.

**Same mean strength** (``same_mean``): the schedule axis' values are rescaled to a mean UNet
multiplier of 1 over the pass's steps, so that crossed with a strength axis every cell of a
strength column has that strength as its mean: a schedule is compared with the constant of the
same average, not with a weaker one. The constant schedule is added as the first row when absent.
Exported to the XYZ grid the same sweep is the normalised schedules × the strengths.

Numbers per cell (:func:`image_distance`): the RMS distance, in [0, 1] RGB, from the image
without the network and from the image with the network at a constant 1.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lib_scheduled_lora.core import tag_edits
from lib_scheduled_lora.core.numbers import NUMBER, NumberSyntaxError, format_number, read_number
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule
from lib_scheduled_lora.core.tags import NetworkTag, TagMatch, find_tags, map_tags
from lib_scheduled_lora.errors import ScheduledLoraError

MAX_VALUES = 64  # per axis: a typo like ``0-100 (+0.001)`` should not start 100 000 generations


@dataclass(frozen=True)
class Kind:
    name: str
    title: str  # the header word
    numeric: bool  # values are numbers (else schedules)
    order: int  # edits apply in this order: replace a schedule, move it, scale it
    edit: Callable[..., str]


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("schedule", "schedule", False, 0, tag_edits.apply_schedule),
        Kind("ramp", "ramp shape", True, 0, tag_edits.apply_ramp),
        Kind("hires", "hires schedule", False, 0, tag_edits.apply_hires),
        Kind("switch", "switch point", True, 1, tag_edits.apply_switch),
        Kind("strength", "strength x", True, 2, tag_edits.apply_strength),
        Kind("te", "te strength x", True, 2, tag_edits.apply_te),
        Kind("unet", "unet strength x", True, 2, tag_edits.apply_unet),
    )
}


class SweepError(ScheduledLoraError, ValueError):
    """A sweep that cannot be built: names the axis, the value and the problem."""


# -- values -----------------------------------------------------------------------------------

_N = NUMBER.pattern
_RANGE_STEP = re.compile(rf"^\s*({_N})\s*-\s*({_N})\s*\(\s*({_N})\s*\)\s*$", re.ASCII)
_RANGE_COUNT = re.compile(rf"^\s*({_N})\s*-\s*({_N})\s*\[\s*([0-9]+)\s*\]\s*$", re.ASCII)
_RANGE_PLAIN = re.compile(rf"^\s*({_N})\s*-\s*({_N})\s*$", re.ASCII)


def split_values(text: str) -> list[str]:
    """XYZ's value list: CSV (quotes keep commas), surrounding spaces dropped, empty items skipped."""
    row = next(csv.reader([text], skipinitialspace=True), [])
    return [item.strip() for item in row if item.strip()]


def expand_item(item: str, axis: str) -> list[float] | None:
    """The numbers of a range item (``0.25-2 (+0.25)``, ``0-0.8 [5]``, ``1-4``), or None when the
    item is not a range. Raises SweepError for a range that cannot be walked."""
    m = _RANGE_STEP.match(item) or _RANGE_COUNT.match(item) or _RANGE_PLAIN.match(item)
    if m is None:
        return None
    start, end = read_number(m.group(1)), read_number(m.group(2))
    if m.re is _RANGE_COUNT:
        count = int(m.group(3))
        if count < 1:
            raise SweepError(f"{axis}: {item!r}: a range needs at least 1 value")
        if count > MAX_VALUES:
            raise SweepError(f"{axis}: {item!r}: {count} values; at most {MAX_VALUES} per axis")
        if count == 1:
            return [start]
        return [_tidy(start + (end - start) * i / (count - 1)) for i in range(count)]
    step = read_number(m.group(3)) if m.re is _RANGE_STEP else 1.0
    if step == 0 or (end - start) * step < 0:
        raise SweepError(f"{axis}: {item!r}: the step {format_number(step)} never reaches {format_number(end)}")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_VALUES:
        raise SweepError(f"{axis}: {item!r}: {count} values; at most {MAX_VALUES} per axis")
    return [_tidy(start + step * i) for i in range(count)]


def _tidy(x: float) -> float:
    """Float noise off a range's values (0.1 + 0.2), so labels and tags read as typed."""
    return round(x, 10) + 0.0


@dataclass(frozen=True)
class Axis:
    kind: str
    values: tuple[str, ...]  # canonical value texts (numbers or schedules), without a network name
    titles: tuple[str, ...] = ()  # what the grid shows for each value (default: the value)

    @classmethod
    def parse(cls, kind: str, items: str | Sequence[str], *, split: bool = True) -> Axis:
        """An axis from XYZ-style text (or several such texts): lists, ranges, checked values.

        ``split=False``: each of ``items`` is one value (or one range), commas and all (the
        command line's separate arguments, where a schedule keeps its commas)."""
        if kind not in KINDS:
            raise SweepError(f"{kind!r} is not an axis kind (one of {', '.join(KINDS)})")
        spec = KINDS[kind]
        texts = [items] if isinstance(items, str) else list(items)
        values: list[str] = []
        for text in texts:
            for item in split_values(text) if split or spec.numeric else [text.strip()]:
                try:
                    numbers = expand_item(item, spec.title)
                except NumberSyntaxError as exc:
                    raise SweepError(f"{spec.title}: {item!r}: {exc.text!r} {exc.problem}") from None
                if numbers is not None:
                    values += [format_number(n) for n in numbers]
                elif spec.numeric:
                    try:
                        values.append(format_number(read_number(item)))
                    except NumberSyntaxError as exc:
                        raise SweepError(f"{spec.title}: {item!r} {exc.problem}") from None
                else:
                    values.append(parse_schedule(item).format())  # ScheduleSyntaxError names the column
        if not values:
            raise SweepError(f"{spec.title}: no values")
        if len(values) > MAX_VALUES:
            raise SweepError(f"{spec.title}: {len(values)} values; at most {MAX_VALUES} per axis")
        return cls(kind, tuple(values))

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    def labels(self) -> list[str]:
        shown = self.titles or self.values
        return [f"{self.spec.title}{'' if self.spec.title.endswith(' x') else ' '}{v}" for v in shown]


def mean_multiplier(schedule: Schedule, steps: int) -> float:
    """The UNet multiplier averaged over the steps of a pass (what a constant would equal)."""
    return sum(schedule.values(steps)) / steps


def normalised(schedule: Schedule, steps: int, axis: str = "schedule") -> Schedule:
    """``schedule`` scaled to mean 1 over ``steps`` (for same-mean comparisons), its values
    rounded to 4 decimals so that tags stay readable (the mean is then 1 within 1e-4)."""
    mean = mean_multiplier(schedule, steps)
    if abs(mean) < 1e-9:
        raise SweepError(
            f"{axis}: {schedule.format()!r} has mean 0 over {steps} steps; it cannot be scaled to a mean strength"
        )
    scaled = schedule.scaled(1.0 / mean)
    return Schedule.from_pieces(
        [[(round(kf.value, 4) + 0.0, kf.pos) for kf in piece.keyframes] for piece in scaled.pieces]
    )


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    prompt: str
    x_value: str
    y_value: str | None
    tag: NetworkTag  # the swept network's (first) tag in this cell
    label: str  # the cell's own line: its schedule, canonical

    def unet_values(self, steps: int) -> list[float]:
        return self.tag.unet.values(steps)


@dataclass
class SweepPlan:
    prompt: str
    network: str
    steps: int
    x: Axis
    y: Axis | None
    same_mean: bool
    cells: list[Cell] = field(default_factory=list)  # row by row

    @property
    def columns(self) -> int:
        return len(self.x.values)

    @property
    def rows(self) -> int:
        return len(self.y.values) if self.y is not None else 1

    def cell(self, x: int, y: int) -> Cell:
        return self.cells[y * self.columns + x]

    def column_labels(self) -> list[str]:
        return self.x.labels()

    def row_labels(self) -> list[str]:
        return self.y.labels() if self.y is not None else [""]

    def references(self) -> dict[str, str]:
        """The prompts of the comparison images: without the network, and with it at a constant 1."""
        return {"no network": without_network(self.prompt, self.network), "full strength": at_one(self.prompt, self.network)}

    def xyz_axes(self) -> list[tuple[str, str]]:
        """(kind, XYZ value text) of the x and y axes: ``name=value`` items, keyframes with ``;``."""
        out = []
        for axis in (self.x, self.y):
            if axis is not None:
                out.append((axis.kind, ", ".join(f"{self.network}={v.replace(',', ';')}" for v in axis.values)))
        return out


def network_of(prompt: str, network: str | None = None) -> str:
    """The network a sweep changes: ``network``, or the prompt's only network tag."""
    matches = [m for m in find_tags(prompt) if m.tag is not None]
    errors = [m.error for m in find_tags(prompt) if m.error is not None]
    if errors:
        raise errors[0]
    names = list(dict.fromkeys(m.tag.name for m in matches if m.tag is not None))
    if network is not None:
        if network not in names:
            raise SweepError(f"the prompt has no tag of network {network!r} (it has: {', '.join(names) or 'none'})")
        return network
    if len(names) != 1:
        raise SweepError(
            "name the network to sweep (the prompt has "
            + (f"{len(names)}: {', '.join(names)})" if names else "no network tag; add one such as <lora:NAME:1>)")
        )
    return names[0]


def plan_sweep(
    prompt: str,
    x: Axis,
    y: Axis | None = None,
    *,
    network: str | None = None,
    steps: int = 20,
    same_mean: bool = False,
) -> SweepPlan:
    """Every cell's prompt. Raises SweepError / ScheduleSyntaxError naming the axis and value."""
    name = network_of(prompt, network)
    if same_mean:
        kinds = {x.kind, y.kind if y else None}
        if kinds != {"strength", "schedule"}:
            raise SweepError("same mean strength needs a strength axis and a schedule axis")
        schedule_axis = x if x.kind == "schedule" else y
        assert schedule_axis is not None
        scheds = [parse_schedule(v) for v in schedule_axis.values]
        if not any(s.is_constant for s in scheds):
            scheds.insert(0, Schedule.constant(1.0))
        values = tuple(normalised(s, steps, "schedule").format() for s in scheds)
        titles = tuple("constant" if s.is_constant else f"{s.format()} (same mean)" for s in scheds)
        schedule_axis = Axis("schedule", values, titles)
        x, y = (schedule_axis, y) if x.kind == "schedule" else (x, schedule_axis)
    plan = SweepPlan(prompt, name, steps, x, y, same_mean)
    y_values: Sequence[str | None] = y.values if y is not None else [None]
    for j, y_value in enumerate(y_values):
        for i, x_value in enumerate(x.values):
            edits = sorted(
                [(x.spec, x_value)] + ([(y.spec, y_value)] if y is not None and y_value is not None else []),
                key=lambda e: e[0].order,
            )
            cell_prompt = prompt
            for spec, value in edits:
                cell_prompt = spec.edit(cell_prompt, f"{name}={value}")
            tag = _first_tag(cell_prompt, name)
            plan.cells.append(Cell(i, j, cell_prompt, x_value, y_value, tag, _cell_label(tag)))
    return plan


def _first_tag(prompt: str, name: str) -> NetworkTag:
    return next(m.tag for m in find_tags(prompt) if m.tag is not None and m.tag.name == name)


def _cell_label(tag: NetworkTag) -> str:
    """The cell's schedule, canonical: ``0@0.3:1.43`` (``te 1 / unet …`` when they differ)."""
    if tag.te == tag.unet:
        text = tag.unet.format()
    else:
        text = f"te {tag.te.format()} / unet {tag.unet.format()}"
    if tag.hrunet != tag.unet:
        text += f", hr {tag.hrunet.format()}"
    return text


def without_network(prompt: str, network: str) -> str:
    def fn(match: TagMatch) -> str | None:
        return "" if match.tag is not None and match.tag.name == network else None

    return " ".join(map_tags(prompt, fn).split())


def at_one(prompt: str, network: str) -> str:
    one = Schedule.constant(1.0)

    def change(tag: NetworkTag) -> NetworkTag:
        return tag.with_schedules(te=one, unet=one, hrte=one, hrunet=one)

    return tag_edits.rewrite(prompt, network, change, tag_edits.every_tag)


# -- numbers per cell -------------------------------------------------------------------------


def image_distance(a, b) -> float:
    """RMS distance of two same-sized RGB images (PIL images or HxWx3 uint8 arrays), in [0, 1]."""
    x = np.asarray(a, dtype=np.float64)[..., :3] / 255.0
    y = np.asarray(b, dtype=np.float64)[..., :3] / 255.0
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes: {x.shape} and {y.shape}")
    return float(np.sqrt(np.mean((x - y) ** 2)))


def cell_numbers(image, references: dict[str, object]) -> dict[str, float]:
    """``{"from no network": d, "from full strength": d}`` for one cell's image."""
    return {f"from {name}": round(image_distance(image, ref), 6) for name, ref in references.items()}


def sweep_report(
    plan: SweepPlan,
    *,
    numbers: Sequence[Mapping[str, float]] | None = None,
    infotexts: Sequence[str] | None = None,
    settings: Mapping[str, object] | None = None,
) -> dict:
    """The JSON written beside a grid: the axes, and per cell its prompt, schedules (text and per
    step), mean multiplier, numbers and infotext."""

    def axis(a: Axis | None) -> dict | None:
        return None if a is None else {"kind": a.kind, "values": list(a.values), "labels": a.labels()}

    cells = []
    for k, cell in enumerate(plan.cells):
        unet = cell.unet_values(plan.steps)
        cells.append(
            {
                "x": cell.x,
                "y": cell.y,
                "prompt": cell.prompt,
                "schedule": cell.label,
                "te": cell.tag.te.format(),
                "unet": cell.tag.unet.format(),
                "hires": cell.tag.hrunet.format(),
                "unet_per_step": [round(v, 6) for v in unet],
                "mean_unet": round(sum(unet) / len(unet), 6),
                "numbers": dict(numbers[k]) if numbers is not None else {},
                "infotext": infotexts[k] if infotexts is not None else None,
            }
        )
    return {
        "prompt": plan.prompt,
        "network": plan.network,
        "steps": plan.steps,
        "same_mean": plan.same_mean,
        "x": axis(plan.x),
        "y": axis(plan.y),
        "references": plan.references(),
        "xyz": [{"kind": kind, "values": text} for kind, text in plan.xyz_axes()],
        **dict(settings or {}),
        "cells": cells,
    }
