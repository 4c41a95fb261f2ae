"""AUTOMATIC1111 WebUI: the "Scheduled LoRA" accordion, settings, and the hooks.

Imported by ``scripts/scheduled_lora.py`` only when the host is AUTOMATIC1111 (it imports the
host's own modules). Thin on purpose: the logic is in :mod:`lib_scheduled_lora.hosts.a1111`
(tested without a WebUI); this file only connects the two.
"""

from __future__ import annotations

import logging

import gradio as gr
from modules import extra_networks, prompt_parser, script_callbacks, scripts, shared

from lib_scheduled_lora.core.engine import MODES
from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.hosts import a1111

log = logging.getLogger("scheduled_lora")

_host = a1111.A1111Host(shared)
_runtime = Runtime(_host)
integration = a1111.A1111Integration(_runtime, extra_networks, prompt_parser)

TITLE = "Scheduled LoRA"


class ScheduledLoraScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(TITLE, open=False, elem_id=f"scheduled_lora_{tab}"):
            enabled = gr.Checkbox(
                value=True,
                label="Enable scheduled strengths (<lora:name:0@0.3:1>)",
                elem_id=f"scheduled_lora_enabled_{tab}",
            )
            gr.HTML(
                f'<div class="scheduled-lora-editor" id="scheduled_lora_editor_{tab}" data-tab="{tab}"></div>'
            )
        self.infotext_fields = [
            (enabled, lambda params: params.get(a1111.INFOTEXT_ENABLED, "on") != "off"),
        ]
        return [enabled]

    def process(self, p, enabled=True, *args, **kwargs):
        integration.begin(p, enabled)

    def before_process_batch(self, p, *args, **kwargs):
        integration.before_batch(p, kwargs.get("prompts") or p.prompts)

    def process_before_every_sampling(self, p, *args, **kwargs):
        integration.before_sampling(p)

    def postprocess(self, p, processed, *args, **kwargs):
        state = integration.finish(p)
        if state is None or not state.passes or not getattr(shared.opts, "scheduled_lora_plot", False):
            return
        image = a1111.plot_passes(state)
        if image is not None:
            processed.images.append(image)
            if processed.infotexts:
                processed.infotexts.append(processed.infotexts[0])


def on_ui_settings():
    section = ("scheduled_lora", TITLE)
    shared.opts.add_option(
        "scheduled_lora_mode",
        shared.OptionInfo(
            a1111.DEFAULT_MODE,
            "Engine mode",
            gr.Radio,
            {"choices": list(MODES)},
            section=section,
            infotext=a1111.INFOTEXT_MODE,
        ).info(
            "auto: per layer, merge (W + m·ΔW written into the weight) or bypass (low-rank side path, no "
            "weight writes) whichever is cheaper for that layer; merge/bypass force one"
        ),
    )
    shared.opts.add_option(
        "scheduled_lora_cache_mb",
        shared.OptionInfo(
            a1111.DEFAULT_CACHE_MB,
            "ΔW cache budget (MB, float32 weight differences kept on the weights' device between generations)",
            gr.Slider,
            {"minimum": 0, "maximum": 16384, "step": 64},
            section=section,
        ),
    )
    shared.opts.add_option(
        "scheduled_lora_plot",
        shared.OptionInfo(
            False, "Append a plot of each network's multipliers per step to the outputs", section=section
        ),
    )


def on_before_ui():
    a1111.install_extra_network_wrapper(extra_networks)


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_cfg_denoiser(integration.on_cfg_denoiser)
script_callbacks.on_model_loaded(lambda sd_model: _runtime.clear())
