"""GET /scheduled-lora/v1/info: version, settings, and the XYZ axis indices (for API callers that
build ``script_args`` for the "x/y/z plot" script)."""

from __future__ import annotations

import sys

from modules import script_callbacks, scripts, shared

import lib_scheduled_lora
from lib_scheduled_lora.hosts import a1111, xyz
from lib_scheduled_lora.hosts.detect import host_kind

HOST = host_kind()


def _axes(is_img2img: bool) -> dict[str, int]:
    if HOST == "sdnext":
        from lib_scheduled_lora.hosts.sdnext_script import xyz_axes

        return xyz_axes(is_img2img)
    module = xyz.find_xyz_module(scripts.scripts_data, sys.modules)
    if module is None:
        return {}
    options = [
        x
        for x in module.axis_options
        if type(x) is module.AxisOption or getattr(x, "is_img2img", None) == is_img2img
    ]
    return {x.label: i for i, x in enumerate(options) if x.label in xyz.AXES}


def on_app_started(demo, app):
    @app.get("/scheduled-lora/v1/info")
    def info():
        return {
            "version": lib_scheduled_lora.__version__,
            "mode": getattr(shared.opts, "scheduled_lora_mode", a1111.DEFAULT_MODE),
            "cache_mb": getattr(shared.opts, "scheduled_lora_cache_mb", a1111.DEFAULT_CACHE_MB),
            "device_budget_mb": a1111.webui_settings(shared.opts).device_budget_mb,
            "xyz_axes": {"txt2img": _axes(False), "img2img": _axes(True)},
            "host": HOST,
            "forge": _forge() if HOST == "forge" else None,
        }


def _forge():
    from lib_scheduled_lora.hosts.forge_script import integration

    return integration.describe()


script_callbacks.on_app_started(on_app_started)
