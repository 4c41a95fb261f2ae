"""Forge Neo 2026-08 (exo101/sd-webui-forge-neo-v3 5692d2d1, "neo-2.26"): the LoRA patcher as
recorded (ComfyUI v0.27.1's model_patcher, v0.3.77's lora).

``backend/patcher/base.py: ModelPatcher``: ``patches[key]`` lists of tuples
``(strength_patch, value, strength_model, offset, function, online)`` (the filename is dropped),
``patches_uuid`` renewed by ``add_patches``, ``clone()`` copies the per-key lists and shares
``backup``; ``partially_load``/``load``: when the model's ``current_weight_patches_uuid`` differs,
restore the backups, then bake each patched key (``patch_weight_to_device``: backup = the
original Parameter, merge a fp32 copy, ``stochastic_rounding`` = a plain cast for float dtypes,
a new Parameter) or, for on-the-fly patches, put a ``LowVramPatch`` in the layer's
``weight_function``. ``backend/patcher/lora.py: merge_lora_to_weight`` works IN PLACE.
``backend/operations.py``: a layer's forward runs every ``weight_function`` on a copy of its weight.
"""

from __future__ import annotations

import collections
import uuid

import torch
from torch import nn

from support.forge_common import clip_key_map, load_lora, lora_delta, set_attr_raw, unet_key_map

__all__ = ["ModelPatcher", "LowVramPatch", "merge_lora_to_weight", "load_lora", "unet_key_map", "clip_key_map"]

Dimension = collections.namedtuple("Dimension", ["weight", "inplace_update"])

CPU = torch.device("cpu")


def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    for p in patches:
        strength, v, strength_model, offset, function = p[:5]
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        patch_type, value = v
        assert patch_type == "lora"
        weight += function(lora_delta(value, weight.shape, computation_dtype, strength).type(weight.dtype))
    return weight


class LowVramPatch:
    def __init__(self, key, patches):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return merge_lora_to_weight(self.patches[self.key], weight, self.key, computation_dtype=weight.dtype)


class ForgeWeights:  # backend/operations.py: the class defaults every Forge layer inherits
    parameters_manual_cast = False
    weight_function: list = []
    bias_function: list = []


def as_neo_layers(root: nn.Module) -> None:
    """Give every weight-holding layer the ForgeWeights class attributes (as Neo's ops do)."""
    for module in root.modules():
        if "weight" in dict(module.named_parameters(recurse=False)) and not isinstance(module, ForgeWeights):
            module.__class__ = type(f"Forge{type(module).__name__}", (type(module), ForgeWeights), {})


class ModelPatcher:
    def __init__(self, model, load_device=CPU, offload_device=CPU):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches = {}
        self.backup = {}
        self.weight_wrapper_patches = {}
        self.patches_uuid = uuid.uuid4()
        if not hasattr(model, "current_weight_patches_uuid"):
            model.current_weight_patches_uuid = None
        as_neo_layers(model)

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.backup = self.backup
        return n

    def use_online_lora(self, key):
        patches = self.patches.get(key)
        return patches is not None and any(p[-1] for p in patches)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        keys = set(dict(self.model.named_parameters()))
        loaded = []
        for key, value in patches.items():
            if key in keys:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None, online_mode))
                loaded.append(key)
        self.patches_uuid = uuid.uuid4()
        return loaded

    def unpatch_model(self):
        for module in self.model.modules():
            if "weight_function" in vars(module):
                module.weight_function = []
        for key, bk in self.backup.items():
            set_attr_raw(self.model, key, bk.weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None

    def patch_weight_to_device(self, key):
        module_name, _, child = key.rpartition(".")
        weight = getattr(self.model.get_submodule(module_name), child)
        if key not in self.backup:
            self.backup[key] = Dimension(weight.to(device=self.offload_device, copy=False), False)
        temp = weight.to(torch.float32, copy=True)  # lora_compute_dtype: fp32 on the CPU
        out = merge_lora_to_weight(self.patches[key], temp, key)
        set_attr_raw(self.model, key, nn.Parameter(out.to(weight.dtype), requires_grad=False))

    def online_functions(self, module, key):
        module.weight_function = [LowVramPatch(key, self.patches)]

    def load(self):
        """partially_load -> load (everything fits: no lowvram layers)."""
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return
        if self.model.current_weight_patches_uuid is not None:
            self.unpatch_model()
        self.loads = getattr(self, "loads", 0) + 1
        for key in self.patches:
            module = self.model.get_submodule(key.rpartition(".")[0])
            if self.use_online_lora(key):
                self.online_functions(module, key)
            else:
                self.patch_weight_to_device(key)
        for key, wrappers in self.weight_wrapper_patches.items():
            module = self.model.get_submodule(key.rpartition(".")[0])
            module.weight_function = [*module.weight_function, *wrappers]
        self.model.current_weight_patches_uuid = self.patches_uuid


def get_weight_and_bias(layer):
    """backend/operations.py weights_manual_cast / get_weight_and_bias: every weight_function on
    a copy of the weight (the host sets manual cast for layers with functions)."""
    weight = layer.weight
    if layer.weight_function:
        weight = weight.clone()
    for f in layer.weight_function:
        weight = f(weight)
    return weight
