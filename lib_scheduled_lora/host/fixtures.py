"""Test networks for a real checkpoint (integration tests and the in-host benchmark).

Writes a kohya LoRA (Linear layers of attention and feed-forward; the text encoder's too with
``text_encoder=True``) and a LoCon (also every 3x3/1x1 convolution) for an SD 1.x single-file
checkpoint, with module names in the checkpoint's own ldm layout
(``lora_unet_input_blocks_1_1_proj_in``), which A1111's builtin Lora and this extension both
resolve. Random factors sized so that ΔW is about a quarter of W: a schedule visibly changes a
tiny random model's images. The text encoder is left out by default because a random tiny
checkpoint's UNet turns some perturbed conditionings into NaNs (the host's own Lora included).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_UNET_LINEAR = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
_UNET_CONV = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:in_layers\.2|out_layers\.3|skip_connection|op|conv))\.weight$"
)
_TE = re.compile(
    r"^cond_stage_model\.transformer\.(text_model\.encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12]))\.weight$"
)


def make_networks(
    checkpoint: str | Path, out_dir: str | Path, rank: int = 4, seed: int = 0, text_encoder: bool = False
) -> dict[str, Path]:
    """Write ``sl_lora.safetensors`` and ``sl_locon.safetensors``; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    locon: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            unet = _UNET_LINEAR.match(key)
            conv = _UNET_CONV.match(key)
            te = _TE.match(key) if text_encoder else None
            if not (unet or conv or te):
                continue
            weight = f.get_tensor(key).float()
            if weight.dim() not in (2, 4):
                continue
            base = ("lora_te_" + te.group(1) if te else "lora_unet_" + (unet or conv).group(1)).replace(
                ".", "_"
            )
            out_features, in_features = weight.shape[:2]
            r = min(rank, out_features, in_features)
            # ΔW at about a quarter of the layer's own spread: visible, yet no overflow on a random model
            std = math.sqrt(0.25 * max(float(weight.std()), 1e-4) / math.sqrt(r))
            if weight.dim() == 2:
                down = torch.randn(r, in_features, generator=generator) * std
                up = torch.randn(out_features, r, generator=generator) * std
            else:
                k = weight.shape[2:]
                down = torch.randn(r, in_features, *k, generator=generator) * std / math.sqrt(k[0] * k[1])
                up = torch.randn(out_features, r, 1, 1, generator=generator) * std
            entry = {
                f"{base}.lora_down.weight": down,
                f"{base}.lora_up.weight": up,
                f"{base}.alpha": torch.tensor(float(r)),
            }
            if weight.dim() == 4 and weight.shape[2:] != (1, 1) or conv:
                locon.update(entry)
            else:
                lora.update(entry)
                locon.update(entry)
    paths = {"sl_lora": out_dir / "sl_lora.safetensors", "sl_locon": out_dir / "sl_locon.safetensors"}
    save_file({k: v.contiguous() for k, v in lora.items()}, str(paths["sl_lora"]))
    save_file({k: v.contiguous() for k, v in locon.items()}, str(paths["sl_locon"]))
    return paths
