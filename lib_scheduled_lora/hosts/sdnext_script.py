"""SD.Next: the "Scheduled LoRA" accordion, settings, XYZ axes and the hooks.

Imported by ``scripts/scheduled_lora.py`` only when the host is SD.Next (it imports the host's own
modules). Thin on purpose: the logic is in :mod:`lib_scheduled_lora.hosts.sdnext` (tested without
SD.Next); this file only connects the two.
"""

from __future__ import annotations

import html
import json
import logging

import gradio as gr
from modules import extra_networks, processing_callbacks, script_callbacks, scripts_manager, shared
from modules.logger import log as host_log

from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.hosts import a1111, sdnext, webui_script, xyz

# SD.Next logs through its own handlers (console and sdnext.log), as it does for lycoris's logger.
for _name in ("scheduled_lora", "lib_scheduled_lora"):
    logging.getLogger(_name).handlers = host_log.handlers
    logging.getLogger(_name).setLevel(min(logging.INFO, host_log.getEffectiveLevel()))
    logging.getLogger(_name).propagate = False


def _lora_load():
    from modules.lora import lora_load

    return lora_load


def _lora_common():
    from modules.lora import lora_common

    return lora_common


_host = sdnext.SDNextHost(shared, _lora_load, _lora_common)
_runtime = Runtime(_host)
integration = sdnext.SDNextIntegration(_runtime, extra_networks, lambda: processing_callbacks.diffusers_callback)

TITLE = webui_script.TITLE


class ScheduledLoraScript(scripts_manager.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts_manager.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(TITLE, open=False, elem_id=f"scheduled_lora_{tab}"):
            enabled = gr.Checkbox(
                value=True,
                label="Enable scheduled strengths (<lora:name:0@0.3:1>)",
                elem_id=f"scheduled_lora_enabled_{tab}",
            )
            config = html.escape(json.dumps(sdnext.EDITOR_CONFIG), quote=True)
            gr.HTML(
                f'<div class="scheduled-lora-editor" id="scheduled_lora_editor_{tab}" data-tab="{tab}" '
                f'data-host-config="{config}"></div>'
            )
        # SD.Next's Restore applies a callable field's result only when it is a gr.update (any
        # other value goes through its name-based skip list, which expects a string key).
        self.infotext_fields = [
            (enabled, lambda params: gr.update(value=params.get(a1111.INFOTEXT_ENABLED, "on") != "off")),
        ]
        return [enabled]

    # The API passes alwayson_scripts args as sent (possibly none): every argument has a default.
    def process(self, p, enabled=True, *args, **kwargs):
        integration.begin(p, enabled)

    def before_process_batch(self, p, enabled=True, *args, **kwargs):
        integration.before_batch(p, kwargs.get("prompts") or p.prompts)

    def process_batch(self, p, enabled=True, *args, **kwargs):
        integration.begin_batch(p)

    def postprocess_batch(self, p, enabled=True, *args, **kwargs):
        integration.end_batch()

    def postprocess(self, p, processed, enabled=True, *args, **kwargs):
        state = integration.finish(p)
        if state is None or not state.passes or not getattr(shared.opts, "scheduled_lora_plot", False):
            return
        image = a1111.plot_passes(state)
        if image is not None:
            processed.images.append(image)
            if processed.infotexts:
                processed.infotexts.append(processed.infotexts[0])


def on_ui_settings():
    webui_script.add_settings(shared, gr)


# -- XYZ grid: SD.Next's classes live in scripts/xyz/xyz_grid_classes.py (a namespace package),
# loaded before extensions; both of its grid scripts copy the list when they build their UI.


def _xyz_classes():
    try:
        import scripts.xyz.xyz_grid_classes as classes  # type: ignore[import-not-found]
    except ImportError:
        return None
    return classes


def register_xyz_axes() -> None:
    classes = _xyz_classes()
    if classes is None:
        return
    present = {option.label for option in classes.axis_options}
    for label in xyz.AXES:
        if label not in present:
            apply, format_value, confirm = xyz.axis_callbacks(label)
            classes.axis_options.append(classes.AxisOption(label, str, apply, fmt=format_value, confirm=confirm))


def xyz_axes(is_img2img: bool) -> dict[str, int]:
    """Our axes' indices in the XYZ scripts' type dropdowns (SD.Next's API also takes the labels)."""
    classes = _xyz_classes()
    if classes is None:
        return {}
    options = [
        x for x in classes.axis_options
        if type(x) is classes.AxisOption or getattr(x, "is_img2img", None) == is_img2img
    ]
    return {x.label: i for i, x in enumerate(options) if x.label in xyz.AXES}


def register_infotext_setting() -> None:
    """Restore reads "Scheduled LoRA mode: X" from an infotext into an override of the option."""
    from modules import infotext

    entry = (a1111.INFOTEXT_MODE, "scheduled_lora_mode")
    if entry not in infotext.mapping:
        infotext.mapping.append(entry)


register_xyz_axes()
register_infotext_setting()
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(lambda: sdnext.install_handler(extra_networks))
script_callbacks.on_after_process(lambda p: integration.end_batch())
script_callbacks.on_model_loaded(lambda sd_model: _runtime.clear())
