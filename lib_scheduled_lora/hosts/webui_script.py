"""The WebUI side that AUTOMATIC1111 and Forge share: the "Scheduled LoRA" accordion (a
``scripts.Script`` class) and the settings section.

Built from the host's own modules, handed in by the host's script module
(:mod:`.a1111_script`, :mod:`.forge_script`), so that importing this file imports no host module.
"""

from __future__ import annotations

from typing import Any

from lib_scheduled_lora.core.engine import MODES
from lib_scheduled_lora.hosts import a1111

TITLE = "Scheduled LoRA"


def script_class(scripts: Any, gr: Any, shared: Any, integration: a1111.A1111Integration) -> type:
    """The AlwaysVisible script: the accordion (switch + schedule editor) and the hooks."""

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

    return ScheduledLoraScript


def add_settings(shared: Any, gr: Any) -> None:
    """Settings -> Scheduled LoRA (an ``on_ui_settings`` callback's body), the same on every WebUI
    host; :func:`lib_scheduled_lora.hosts.a1111.webui_settings` reads them."""
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
            "ΔW cache budget (MB of float32 weight differences kept in host memory between generations)",
            gr.Slider,
            {"minimum": 0, "maximum": 16384, "step": 64},
            section=section,
        ),
    )
    shared.opts.add_option(
        "scheduled_lora_device_budget_mb",
        shared.OptionInfo(
            a1111.DEFAULT_DEVICE_BUDGET_MB,
            "GPU memory budget (MB for originals and ΔW kept on the GPU for faster updates; 0: none)",
            gr.Slider,
            {"minimum": 0, "maximum": 16384, "step": 64},
            section=section,
        ).info("never more than the GPU's free memory minus 1.5 GiB, read when each pass starts"),
    )
    shared.opts.add_option(
        "scheduled_lora_plot",
        shared.OptionInfo(
            False, "Append a plot of each network's multipliers per step to the outputs", section=section
        ),
    )
