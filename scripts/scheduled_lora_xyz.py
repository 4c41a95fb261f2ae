"""XYZ grid axes for scheduled LoRA (registered into the loaded X/Y/Z plot script before the UI is
built). The value handling is in ``lib_scheduled_lora.hosts.xyz``."""

from __future__ import annotations

import sys

from modules import script_callbacks, scripts

from lib_scheduled_lora.hosts import xyz


def _xyz_module():
    return xyz.find_xyz_module(scripts.scripts_data, sys.modules)


def _axis(module, label, rewrite, label_of):
    short = label.split(": ", 1)[1]

    def apply(p, x, xs):
        if isinstance(p.prompt, str):
            p.prompt = rewrite(p.prompt, x)
        hr_prompt = getattr(p, "hr_prompt", "")
        if isinstance(hr_prompt, str) and hr_prompt:
            p.hr_prompt = rewrite(hr_prompt, x)

    def format_value(p, opt, x):
        return f"{short}: {label_of(x)}"

    def confirm(p, xs):
        for x in xs:
            label_of(x)  # raises ScheduleSyntaxError naming the value and column

    return module.AxisOption(label, str, apply, format_value=format_value, confirm=confirm)


def register_axes():
    module = _xyz_module()
    if module is None:
        return
    present = {option.label for option in module.axis_options}
    for label, (rewrite, label_of) in xyz.AXES.items():
        if label not in present:
            module.axis_options.append(_axis(module, label, rewrite, label_of))


# xyz_grid.py (the WebUI's own scripts/ folder) is loaded before extensions, so the axes can be
# added right away; this matters with --nowebui, where the API builds the script UIs (and xyz_grid
# freezes its list of axes) before the before_ui callbacks run. The callback covers script reloads.
register_axes()
script_callbacks.on_before_ui(register_axes)
