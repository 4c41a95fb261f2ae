"""What ``inspect`` says about a network's modules: component, kind of layer, algorithm label.

Pure functions of kohya names and module objects; the loader does not need them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib_scheduled_lora.core.networks.base import NetworkModule
from lib_scheduled_lora.core.networks.modules import LohaModule, LokrModule, LoraModule

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")

def component_of(key: str) -> str:
    """'unet', 'text-encoder' (te/te1/te2/te3), 'transformer' or 'other' for a kohya base name."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return "text-encoder"
    if key.startswith("lora_unet_"):
        return "unet"
    if key.startswith("lora_transformer_"):
        return "transformer"
    return "other"


def layer_kind(key: str) -> str:
    """A coarse kind of layer from a kohya base name (diffusers or SGM UNet naming)."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        if "_self_attn_" in key:
            return "text-encoder attention"
        if "_mlp_" in key:
            return "text-encoder mlp"
        return "text-encoder other"
    name = key.removeprefix("lora_unet_").removeprefix("lora_transformer_")
    if "_attn1_" in name or name.endswith("_attn1"):
        return "self-attention"
    if "_attn2_" in name or name.endswith("_attn2"):
        return "cross-attention"
    if "_ff_" in name:
        return "feed-forward"
    if name.endswith(("_proj_in", "_proj_out")):
        return "proj in/out"
    if re.search(r"(^|_)norm(\d*|_out)?$", name):
        return "norm"
    if re.search(r"_(time_emb_proj|emb_layers_1)$", name):
        return "resnet time-embedding"
    if re.search(r"_(conv1|conv2|conv_shortcut|in_layers_2|out_layers_3|skip_connection)$", name):
        return "resnet conv"
    if re.search(r"(samplers_\d+_conv|_op|blocks_\d+_\d+_conv)$", name):
        return "down/upsampler conv"
    if name in ("conv_in", "conv_out", "input_blocks_0_0", "out_2"):
        return "conv in/out"
    if re.match(r"(time_embed|time_embedding|add_embedding|label_emb)", name):
        return "time/label embedding"
    return "other"


@dataclass(frozen=True)
class ModuleInfo:
    """What inspect prints about one module."""

    key: str
    algorithm: str
    rank: int | None
    alpha: float | None
    dora: bool
    component: str
    kind: str
    label: str  # the algorithm as people name it: "locon", "loha (tucker)", ...


def algorithm_label(module: NetworkModule) -> str:
    """'lora', 'locon' (kxk conv down), a '(tucker)' variant, or the module's algorithm."""
    name = module.algorithm
    if isinstance(module, LoraModule):
        if module.mid is not None:
            return "locon (tucker)"
        return "locon" if module.down.dim() == 4 and tuple(module.down.shape[2:]) != (1, 1) else "lora"
    if isinstance(module, LohaModule) and module.t1 is not None:
        return f"{name} (tucker)"
    if isinstance(module, LokrModule) and module.t2 is not None:
        return f"{name} (tucker)"
    return name


def describe_module(key: str, module: NetworkModule) -> ModuleInfo:
    return ModuleInfo(
        key=key,
        algorithm=module.algorithm,
        rank=module.rank,
        alpha=module.alpha,
        dora=module.dora,
        component=component_of(key),
        kind=layer_kind(key),
        label=algorithm_label(module),
    )


