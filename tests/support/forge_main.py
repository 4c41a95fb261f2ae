"""Forge main (lllyasviel/stable-diffusion-webui-forge dfdcbab6): the LoRA patcher as recorded.

The parts the adapter touches, with the host's own behaviour (read at that commit and checked in
the running host, see the Forge notes): ``backend/patcher/base.py: ModelPatcher`` (``lora_patches``
keyed by ``(filename, strength_patch, strength_model, online)``, entries are lists, ``clone()``
shares them), ``backend/patcher/lora.py: LoraLoader.refresh`` (hash of the keys; restore the
backups; bake from the backup in fp32 into a new ``Parameter``, or leave the patches in
``layer.forge_online_loras`` for the forward), ``merge_lora_to_weight`` (clones, lora patches only:
the tests' networks are LoRA/LoCon), ``load_lora`` and the key maps (ldm names),
``backend/operations.py: get_weight_and_bias`` (what a layer's forward computes with), and
``memory_management.load_models_gpu`` (a patcher already loaded is not loaded again).
"""

from __future__ import annotations

import torch
from torch import nn

from support.forge_common import (
    clip_key_map,
    load_lora,
    lora_delta,
    set_attr_raw,
    unet_key_map,
)

__all__ = ["ModelPatcher", "LoraLoader", "merge_lora_to_weight", "load_lora", "unet_key_map", "clip_key_map"]

CPU = torch.device("cpu")


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)
    for strength, v, strength_model, _offset, function in (tuple(p[:5]) for p in patches):
        function = function or (lambda a: a)
        if strength_model != 1.0:
            weight *= strength_model
        patch_type, value = v
        assert patch_type == "lora"
        weight += function(lora_delta(value, weight.shape, computation_dtype, strength).type(weight.dtype))
    if dtype_backup is not None:
        weight = weight.to(dtype=dtype_backup)
    return weight


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            set_attr_raw(self.model, k, w)
        self.backup = {}
        for (key, online_mode), current in all_patches.items():
            module_name, _, child = key.rpartition(".")
            parent = self.model.get_submodule(module_name)
            weight = getattr(parent, child)
            if online_mode:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = current
                self.online_backup.append(parent)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)  # on the CPU: the Parameter itself
            weight = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32)
            set_attr_raw(self.model, key, nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model, load_device=CPU, offload_device=CPU):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        lora_patches = self.lora_patches.get(identifier, {})
        keys = set(dict(self.model.named_parameters()))
        loaded = []
        for key, value in patches.items():
            if key in keys:
                lora_patches.setdefault(key, []).append([strength_patch, value, strength_model, None, None])
                loaded.append(key)
        self.lora_patches[identifier] = lora_patches
        return loaded

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches, self.offload_device)

    # memory_management.LoadedModel.model_load calls refresh_loras (after moving the model).
    def load(self):
        self.refresh_loras()


def get_weight_and_bias(layer):
    """backend/operations.py: the weight a layer's forward computes with."""
    weight = layer.weight
    patches = getattr(layer, "forge_online_loras", None)
    if patches is not None and patches.get("weight") is not None:
        weight = merge_lora_to_weight(patches["weight"], weight, "online weight lora", computation_dtype=weight.dtype)
    return weight
