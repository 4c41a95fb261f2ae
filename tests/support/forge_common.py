"""What the recorded Forge layouts (``support.forge_main``, ``support.forge_neo_2026_08``,
``support.forge_neo_2026_09``) share: the model objects Forge builds for an SD 1.x / SDXL
checkpoint, its LoRA reading (``load_lora`` with the kohya key maps, ldm names) and the lora
patch arithmetic of ``merge_lora_to_weight``.

The model: ``KModel`` holding ``diffusion_model`` (the ldm UNet names, as Forge's
``IntegratedUNet2DConditionModel``: ``input_blocks.1.1.proj_in``), and ``JointTextEncoder`` (a
ModuleDict) holding ``clip_l`` (and ``clip_g``), each an ``IntegratedCLIP`` with a transformers
``transformer``. Patch keys are parameter names under the patcher's model
(``diffusion_model.input_blocks.1.1.proj_in.weight``, ``clip_l.transformer.text_model...``).
Every layer with a weight carries the attributes Forge's operations give it
(``parameters_manual_cast``; Neo's ``weight_function``/``bias_function`` come from the class).
"""

from __future__ import annotations

import torch
from torch import nn

from support.sd_layouts import ModuleTree, TinySD, _hf_key, ldm_state_dict


def set_attr_raw(root: nn.Module, key: str, value) -> None:
    module_name, _, child = key.rpartition(".")
    setattr(root.get_submodule(module_name), child, value)


def lora_delta(value, shape, dtype, strength) -> torch.Tensor:
    """``strength · alpha/rank · up @ down`` as Forge's merge computes a "lora" patch."""
    up, down, alpha = value[0], value[1], value[2]
    mat1, mat2 = up.to(dtype), down.to(dtype)
    scale = alpha / mat2.shape[0] if alpha is not None else 1.0
    diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(shape)
    return (strength * scale) * diff


def load_lora(lora, to_load):
    """comfyui_lora_collection/lora.py: load_lora, for kohya LoRA/LoCon keys."""
    patches, loaded = {}, set()
    for x, key in to_load.items():
        up = f"{x}.lora_up.weight"
        if up not in lora:
            continue
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        patches[key] = ("lora", (lora[up], lora[f"{x}.lora_down.weight"], alpha, None, None))
        loaded.update({up, f"{x}.lora_down.weight", f"{x}.alpha"})
    return patches, {k: v for k, v in lora.items() if k not in loaded}


def unet_key_map(model, key_map={}):  # noqa: B006 - the host's signature (a shared default dict)
    for name in dict(model.named_parameters()):
        if name.startswith("diffusion_model.") and name.endswith(".weight"):
            key_map["lora_unet_" + name[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = name
    return key_map


def clip_key_map(model, key_map={}):  # noqa: B006
    prefixes = {"clip_l": "lora_te1_" if hasattr(model, "clip_g") else "lora_te_", "clip_g": "lora_te2_"}
    for name in dict(model.named_parameters()):
        encoder, _, rest = name.partition(".transformer.")
        if encoder in prefixes and name.endswith(".weight"):
            key_map[prefixes[encoder] + rest[: -len(".weight")].replace(".", "_")] = name
    return key_map


class KModel(nn.Module):
    def __init__(self, diffusion_model: nn.Module, storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = storage_dtype


class IntegratedCLIP(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


class JointTextEncoder(nn.ModuleDict):
    pass


def mark_layers(root: nn.Module) -> None:
    """The attribute every Forge operation layer has."""
    for module in root.modules():
        if "weight" in dict(module.named_parameters(recurse=False)):
            module.parameters_manual_cast = False


def forge_modules(model: TinySD) -> tuple[KModel, JointTextEncoder]:
    """Forge's UNet (KModel) and text encoders for a tiny SD 1.x / SDXL model: the UNet under its
    ldm/sgm names, the text encoders as transformers models (Forge converts SDXL's OpenCLIP one)."""
    root = "model.diffusion_model."
    unet = ModuleTree({k[len(root) :]: v for k, v in ldm_state_dict(model).items() if k.startswith(root)})
    encoders = {"clip_l": model.text_encoder}
    if model.text_encoder_2 is not None:
        encoders["clip_g"] = model.text_encoder_2
    clip = JointTextEncoder(
        {
            name: IntegratedCLIP(ModuleTree({_hf_key(k): v for k, v in encoder.state_dict().items()}))
            for name, encoder in encoders.items()
        }
    )
    kmodel = KModel(unet)
    mark_layers(kmodel)
    mark_layers(clip)
    return kmodel, clip
