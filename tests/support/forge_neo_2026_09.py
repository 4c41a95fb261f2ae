"""Forge Neo 2026-09 (Haoming02/sd-webui-forge-classic, neo, read 2026-11-30): the LoRA patcher as
recorded, where it differs from 2026-08 (``support.forge_neo_2026_08``).

``backend/patcher/base.py``: on-the-fly LoRAs are ``OnlineLoRAPatch(filename, key, [strength_patch,
value, strength_model, offset, function])`` objects in ``weight_wrapper_patches[key]`` (added with
``add_weight_wrapper``; ``has_online_lora`` is "any wrapper"), put into each layer's
``weight_function`` by ``load``; baked patches are 5-tuples. Forge Neo's own scheduler,
``extensions-builtin/sd_forge_lora_schedule`` ("LoRA Control Integrated"), rewrites
``OnlineLoRAPatch.patch[0][0]`` per step for tags written ``<lora:name:[w@t,...]>``.
"""

from __future__ import annotations

import uuid

from support import forge_neo_2026_08 as neo08
from support.forge_common import clip_key_map, load_lora, unet_key_map

__all__ = ["ModelPatcher", "OnlineLoRAPatch", "merge_lora_to_weight", "load_lora", "unet_key_map", "clip_key_map"]

merge_lora_to_weight = neo08.merge_lora_to_weight
get_weight_and_bias = neo08.get_weight_and_bias


class OnlineLoRAPatch:
    def __init__(self, name, key, patch):
        self.name = name
        self.key = key
        self.patch = [patch]

    def __call__(self, weight):
        return merge_lora_to_weight(self.patch, weight, self.key, computation_dtype=weight.dtype)


class ModelPatcher(neo08.ModelPatcher):
    use_online_lora = None  # gone in this layout: on-the-fly patches are weight wrappers

    def has_online_lora(self):
        return len(self.weight_wrapper_patches) > 0

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        keys = set(dict(self.model.named_parameters()))
        loaded = []
        for key, value in patches.items():
            if key not in keys:
                continue
            loaded.append(key)
            if online_mode:
                self.add_weight_wrapper(key, OnlineLoRAPatch(filename, key, [strength_patch, value, strength_model, None, None]))
            else:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
        self.patches_uuid = uuid.uuid4()
        return loaded

    def load(self):
        if self.model.current_weight_patches_uuid == self.patches_uuid:
            return
        if self.model.current_weight_patches_uuid is not None:
            self.unpatch_model()
        self.loads = getattr(self, "loads", 0) + 1
        for key in self.patches:
            self.patch_weight_to_device(key)
        for key, wrappers in self.weight_wrapper_patches.items():
            module = self.model.get_submodule(key.rpartition(".")[0])
            module.weight_function = [*module.weight_function, *wrappers]
        self.model.current_weight_patches_uuid = self.patches_uuid
