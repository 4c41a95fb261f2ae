"""Extra accelerator memory of a scheduled LoRA, by accounting, for SD 1.5 and SDXL in fp16.

    python bench/memory_accounting.py

The UNets are built on the ``meta`` device (real layer names and shapes, no memory). A kohya
LoRA targets what kohya's trainer targets by default: every Linear and 1x1 Conv inside the
transformer blocks (``module_layers`` of the shared random-network writer). For each design the
bytes held on the device besides the model:

* previous engine (swap buffers on the device): one merge buffer per targeted weight, in the
  weight's dtype, plus the float32 ΔW cache (default budget 2 GiB);
* this engine, default (``device_budget_mb = 0``): originals in pinned host RAM; on the device only
  the temporaries of the one layer being updated (its original copied in, a float32 accumulator,
  a float32 ΔW) and, for bypassed layers, the low-rank factors (rank 32, fp16).

Host RAM: this engine keeps one copy of every targeted weight (the originals), as A1111 and Forge
keep theirs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.random_networks import module_layers  # noqa: E402

GIB = 2**30
SD15 = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SDXL = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
RANK = 32
CACHE_BUDGET = 2 * GIB


def account(name: str, config: dict, dtype: torch.dtype = torch.float16) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    elt = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in unet.parameters())
    layers = module_layers(unet, "lora")
    targeted = [torch.Size(layer.shape).numel() for layer in layers]
    factors = sum(RANK * (layer.shape[0] + torch.Size(layer.shape[1:]).numel()) * elt for layer in layers)
    largest = max(targeted)
    previous = sum(targeted) * elt + min(CACHE_BUDGET, sum(targeted) * 4)
    temporaries = largest * (elt + 4 + 4)  # original copied in, fp32 accumulator, fp32 ΔW
    return {
        "model": name, "unet_params": total, "layers": len(layers), "targeted_params": sum(targeted),
        "unet_bytes": total * elt, "previous_device_extra": previous,
        "device_extra_merge": temporaries, "device_extra_bypass": factors, "host_backups": sum(targeted) * elt,
    }


def main() -> int:
    rows = [account("SD 1.5", SD15), account("SDXL", SDXL)]
    print("| model (fp16) | UNet | LoRA layers | targeted | previous engine, extra on device | this engine, extra on device (merge / bypass) | originals in host RAM |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['unet_params'] / 1e9:.2f} B ({r['unet_bytes'] / GIB:.2f} GiB) | {r['layers']} | "
            f"{r['targeted_params'] / 1e9:.2f} B | {r['previous_device_extra'] / GIB:.2f} GiB | "
            f"{r['device_extra_merge'] / 2**20:.0f} MiB / {r['device_extra_bypass'] / 2**20:.0f} MiB | "
            f"{r['host_backups'] / GIB:.2f} GiB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
