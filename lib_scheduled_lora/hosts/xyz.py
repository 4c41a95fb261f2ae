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

from lib_scheduled_lora.core import tag_edits
from lib_scheduled_lora.core.tag_edits import number_label, schedule_label, split_name, with_switch
from lib_scheduled_lora.hosts.ownership import is_ours

__all__ = ["AXES", "number_label", "schedule_label", "split_name", "with_switch"]


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
