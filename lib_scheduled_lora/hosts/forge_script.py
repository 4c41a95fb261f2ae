"""Forge main and Forge Neo: the "Scheduled LoRA" accordion, settings, and the hooks.

Imported by ``scripts/scheduled_lora.py`` only when the host is Forge (it imports the host's own
modules). Thin on purpose: the logic is in :mod:`lib_scheduled_lora.hosts.forge` (tested without
a WebUI), the accordion and settings in :mod:`.webui_script`; this file only connects them and
hands Forge's own LoRA functions to the adapter.
"""

from __future__ import annotations

import gradio as gr
from backend import memory_management
from backend.args import dynamic_args
from backend.patcher import lora as forge_lora
from modules import extra_networks, prompt_parser, script_callbacks, scripts, shared

from lib_scheduled_lora.core.session import Runtime
from lib_scheduled_lora.hosts import a1111, forge, webui_script


def _online_setting() -> bool:
    """The "(fp16 LoRA)" storage options (modules_forge/main_entry.py): a dict on Forge main, an
    object on Neo."""
    if isinstance(dynamic_args, dict):
        return bool(dynamic_args.get("online_lora", False))
    return bool(getattr(dynamic_args, "online_lora", False))


def _builtin_scheduler() -> bool:
    """Forge Neo's "LoRA Control Integrated" (extensions-builtin/sd_forge_lora_schedule) is loaded."""
    return any(type(s).__name__ == "LoRAControl" for s in scripts.scripts_txt2img.alwayson_scripts)


backend = forge.ForgeBackend(
    load_lora=forge_lora.load_lora,
    unet_key_map=forge_lora.model_lora_keys_unet,
    clip_key_map=forge_lora.model_lora_keys_clip,
    merge=forge_lora.merge_lora_to_weight,
    load_model=memory_management.load_model_gpu,
    online_setting=_online_setting,
)
_host = forge.ForgeHost(shared)
_runtime = Runtime(_host)
integration = forge.ForgeIntegration(_runtime, extra_networks, prompt_parser, backend, _builtin_scheduler)

TITLE = webui_script.TITLE
ScheduledLoraScript = webui_script.script_class(scripts, gr, shared, integration)


def on_before_ui():
    a1111.install_extra_network_wrapper(extra_networks, integration.host_syntax)


script_callbacks.on_ui_settings(lambda: webui_script.add_settings(shared, gr))
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_cfg_denoiser(integration.on_cfg_denoiser)
script_callbacks.on_model_loaded(lambda sd_model: integration.clear())
