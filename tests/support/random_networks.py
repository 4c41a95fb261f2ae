"""Random networks with kohya names for the real SD 1.5 UNet layer shapes.

kohya's defaults: a LoRA targets every Linear and 1x1 Conv inside the Transformer2DModel blocks
(192 layers in SD 1.5); a LoCon adds the ResNet blocks and the down/up-samplers (3x3 convs at the
conv rank, their 1x1/Linear layers at the main rank). The LoHa here covers the LoCon's layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib_scheduled_lora.core.networks.files import write_safetensors_atomic

TRANSFORMER = ".attentions."
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


def kohya_name(module_name: str) -> str:
    return "lora_unet_" + module_name.replace(".", "_")


def targets(unet: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """(module name, module) of the layers a kohya-default network of ``kind`` trains."""
    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        in_transformer = TRANSFORMER in name and (isinstance(module, nn.Linear) or module.kernel_size == (1, 1))
        in_conv_block = any(block in name for block in CONV_BLOCKS)
        if in_transformer or (kind != "lora" and in_conv_block):
            out.append((name, module))
    return out


def _shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


def lora_tensors(name: str, module: nn.Module, rank: int, conv_rank: int, gen: torch.Generator) -> dict:
    out_dim, in_dim, kernel = _shape(module)
    r = conv_rank if kernel and kernel != (1, 1) else rank
    down = torch.randn(r, in_dim, *kernel, generator=gen) / (in_dim * max(1, len(kernel))) ** 0.5
    up = torch.randn(out_dim, r, *((1, 1) if kernel else ()), generator=gen) * 0.02
    key = kohya_name(name)
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(float(r) / 2)}


def loha_tensors(name: str, module: nn.Module, rank: int, conv_rank: int, gen: torch.Generator) -> dict:
    out_dim, in_dim, kernel = _shape(module)
    r = conv_rank if kernel and kernel != (1, 1) else rank
    fan_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
    key = kohya_name(name)
    tensors = {}
    for side in ("w1", "w2"):
        tensors[f"{key}.hada_{side}_a"] = torch.randn(out_dim, r, generator=gen) * 0.1
        tensors[f"{key}.hada_{side}_b"] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
    tensors[f"{key}.alpha"] = torch.tensor(float(r))
    return tensors


def write_network(unet: nn.Module, kind: str, path: Path, *, rank: int = 32, conv_rank: int = 16, seed: int = 0) -> int:
    """Write a random ``kind`` ("lora", "locon", "loha") network for ``unet``; returns its layer count."""
    gen = torch.Generator().manual_seed(seed)
    build = loha_tensors if kind == "loha" else lora_tensors
    if kind == "loha":
        rank, conv_rank = rank // 2, conv_rank // 2  # LoHa's Hadamard product squares the rank
    tensors: dict[str, torch.Tensor] = {}
    layers = targets(unet, kind)
    for name, module in layers:
        tensors.update(build(name, module, rank, conv_rank, gen))
    tensors = {k: v.to(torch.float16).contiguous() for k, v in tensors.items()}
    write_safetensors_atomic(tensors, path, {"ss_network_module": "networks.lora"}, force=True)
    return len(layers)
