"""Benchmark reference, not part of the extension: what a per-step LoRA scheduler ported to Forge
does (the loractl ports for Forge/Neo, the refresh_loras approach): at every model evaluation whose
strength changed, load the network again through the host's own Lora at the new strength
(``networks.load_networks``: new patchers) and load the UNet (``load_models_gpu`` ->
``refresh_loras``: restore every patched weight from the backup and merge again).

Install for ``bench/webui_bench.py --refresh-port``: link this folder into the WebUI's
extensions/. Driven through the API only: ``alwayson_scripts: {"refresh port": {"args":
["network name", "step" | "ramp"]}}`` (the prompt carries no tag for it).
"""

import networks
from backend import memory_management
from modules import script_callbacks, scripts, shared

_active = {}


def strength(kind: str, step: int, total: int) -> float:
    position = step / max(1, total - 1)
    return (1.0 if position >= 0.3 else 0.0) if kind == "step" else position


class RefreshPort(scripts.Script):
    def title(self):
        return "refresh port"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process_before_every_sampling(self, p, name="", kind="", *args, **kwargs):
        _active.clear()
        if name:
            _active.update(name=name, kind=kind, strength=None)

    def postprocess(self, p, processed, *args, **kwargs):
        _active.clear()


def on_cfg_denoiser(params):
    if not _active:
        return
    denoiser = params.denoiser
    w = strength(_active["kind"], denoiser.step, denoiser.total_steps)
    if w == _active["strength"]:
        return
    _active["strength"] = w
    sd_model = shared.sd_model
    networks.load_networks([_active["name"]], [w], [w])
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    memory_management.load_models_gpu([sd_model.forge_objects.unet])


script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
