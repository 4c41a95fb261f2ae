"""XYZ grid axes for scheduled LoRA (registered into the loaded X/Y/Z plot script before the UI is
built). The value handling is in ``lib_scheduled_lora.hosts.xyz``."""

from __future__ import annotations

import sys

from modules import script_callbacks, scripts

from lib_scheduled_lora.hosts import xyz
from lib_scheduled_lora.hosts.detect import host_kind


def _xyz_module():
    return xyz.find_xyz_module(scripts.scripts_data, sys.modules)


def _axis(module, label):
    apply, format_value, confirm = xyz.axis_callbacks(label)
    return module.AxisOption(label, str, apply, format_value=format_value, confirm=confirm)


def register_axes():
    if host_kind() == "sdnext":
        return  # SD.Next's XYZ grid has other classes: hosts/sdnext_script.py registers there
    module = _xyz_module()
    if module is None:
        return
    present = {option.label for option in module.axis_options}
    for label in xyz.AXES:
        if label not in present:
            module.axis_options.append(_axis(module, label))


# xyz_grid.py (the WebUI's own scripts/ folder) is loaded before extensions, so the axes can be
# added right away; this matters with --nowebui, where the API builds the script UIs (and xyz_grid
# freezes its list of axes) before the before_ui callbacks run. The callback covers script reloads.
register_axes()
script_callbacks.on_before_ui(register_axes)
