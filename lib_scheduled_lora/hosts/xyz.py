"""The XYZ-grid axes: the core's typed tag edits (:mod:`lib_scheduled_lora.core.tag_edits`) with
the WebUI's rule for unnamed values.

Axis values are ``SCHED`` (applies to every scheduled tag of the prompt: the tags the host's own
Lora does not take, :func:`~lib_scheduled_lora.hosts.ownership.is_ours`) or ``name=SCHED`` (to
every tag of that network, plain or not). Grid cells get a copy of the processing object, so an
axis only rewrites that copy's prompt; the schedule then travels in the prompt like any other
(and lands in the infotext). XYZ splits values on commas (CSV, so quotes work): write keyframes
inside one value with ``;`` (``0@0;1@0.5``) or quote the value (``"0@0,1@0.5"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lib_scheduled_lora.core import tag_edits
from lib_scheduled_lora.core.tag_edits import number_label, schedule_label, split_name, with_switch
from lib_scheduled_lora.hosts.ownership import is_ours

__all__ = ["AXES", "axis_callbacks", "find_xyz_module", "number_label", "schedule_label", "split_name", "with_switch"]


def apply_schedule(prompt: str, value: str) -> str:
    return tag_edits.apply_schedule(prompt, value, is_ours)


def apply_hires(prompt: str, value: str) -> str:
    return tag_edits.apply_hires(prompt, value, is_ours)


def apply_strength(prompt: str, value: str) -> str:
    return tag_edits.apply_strength(prompt, value, is_ours)


def apply_switch(prompt: str, value: str) -> str:
    return tag_edits.apply_switch(prompt, value, is_ours)


def apply_ramp(prompt: str, value: str) -> str:
    return tag_edits.apply_ramp(prompt, value, is_ours)


def apply_te(prompt: str, value: str) -> str:
    return tag_edits.apply_te(prompt, value, is_ours)


def apply_unet(prompt: str, value: str) -> str:
    return tag_edits.apply_unet(prompt, value, is_ours)


AXES = {
    "Scheduled LoRA: schedule": (apply_schedule, schedule_label),
    "Scheduled LoRA: switch point": (apply_switch, number_label),
    "Scheduled LoRA: strength": (apply_strength, number_label),
    "Scheduled LoRA: hires schedule": (apply_hires, schedule_label),
    "Scheduled LoRA: ramp shape": (apply_ramp, number_label),
    "Scheduled LoRA: te strength": (apply_te, number_label),
    "Scheduled LoRA: unet strength": (apply_unet, number_label),
}


def axis_callbacks(label: str) -> tuple[Callable[[Any, str, list], None], Callable[[Any, Any, str], str], Callable[[Any, list], None]]:
    """``(apply(p, x, xs), format_value(p, opt, x), confirm(p, xs))`` of the axis ``label``, as
    every WebUI's XYZ grid calls them (each host wraps them in its own ``AxisOption``).

    ``apply`` rewrites the cell's prompt and hires prompt; ``confirm`` raises ScheduleSyntaxError
    (naming the value and column) before the grid starts.
    """
    rewrite, label_of = AXES[label]
    short = label.split(": ", 1)[1]

    def apply(p: Any, x: str, xs: list) -> None:
        if isinstance(p.prompt, str):
            p.prompt = rewrite(p.prompt, x)
        hr_prompt = getattr(p, "hr_prompt", "")
        if isinstance(hr_prompt, str) and hr_prompt:
            p.hr_prompt = rewrite(hr_prompt, x)

    def format_value(p: Any, opt: Any, x: str) -> str:
        return f"{short}: {label_of(x)}"

    def confirm(p: Any, xs: list) -> None:
        for x in xs:
            label_of(x)

    return apply, format_value, confirm


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
