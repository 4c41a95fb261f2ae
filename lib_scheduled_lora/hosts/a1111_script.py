"""AUTOMATIC1111 WebUI: the "Scheduled LoRA" accordion, settings, and the hooks.

Imported by ``scripts/scheduled_lora.py`` only when the host is AUTOMATIC1111 (it imports the
host's own modules). Thin on purpose: the logic is in :mod:`lib_scheduled_lora.hosts.a1111`
(tested without a WebUI), the accordion and settings in :mod:`.webui_script`; this file only
connects them.
"""

from __future__ import annotations

import gradio as gr
from modules import extra_networks, prompt_parser, script_callbacks, scripts, shared

from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.hosts import a1111, webui_script

_host = a1111.A1111Host(shared)
_runtime = Runtime(_host)
integration = a1111.A1111Integration(_runtime, extra_networks, prompt_parser)

TITLE = webui_script.TITLE
ScheduledLoraScript = webui_script.script_class(scripts, gr, shared, integration)


def on_before_ui():
    a1111.install_extra_network_wrapper(extra_networks)


script_callbacks.on_ui_settings(lambda: webui_script.add_settings(shared, gr))
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_cfg_denoiser(integration.on_cfg_denoiser)
script_callbacks.on_model_loaded(lambda sd_model: _runtime.clear())
