"""Test networks for a real checkpoint (integration tests and the in-host benchmark).

Writes a kohya LoRA (Linear layers of attention and feed-forward; the text encoder's too with
``text_encoder=True``), a LoCon (also every 3x3/1x1 convolution) and a LoHa (the LoCon's layers)
for an SD 1.x, SD 2.x or SDXL single-file checkpoint, with UNet module names in the checkpoint's
own ldm/sgm layout (``lora_unet_input_blocks_1_1_proj_in``), which A1111's builtin Lora and this extension both
resolve (A1111: via its ``lora_unet`` -> ``diffusion_model`` fallback). Names come from the
engine's own model index (:func:`lib_scheduled_lora.core.naming.model_index`), so text encoders get
the HF-style kohya names the WebUI resolves (``lora_te_`` / ``lora_te1_`` / ``lora_te2_``), with
OpenCLIP q/k/v as row thirds of the fused attention weight.
Random factors sized so that ΔW is about a quarter of W: a schedule visibly changes a
tiny random model's images. The text encoder is left out by default because a random tiny
checkpoint's UNet turns some perturbed conditionings into NaNs (the host's own Lora included).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_scheduled_lora.core.naming import UNET, Slot, model_index

_UNET_LINEAR = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
_UNET_CONV = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:in_layers\.2|out_layers\.3|skip_connection|op|conv))\.weight$"
)
# Text-encoder layers the tests target (kohya names as the model index gives them: the HF-style
# ones the WebUI resolves, also for OpenCLIP encoders, whose q/k/v are row thirds of one weight;
# A1111 applies an OpenCLIP attention only when q, k, v and out are all present).
_TE_LAYER = re.compile(r"_text_model_encoder_layers_\d+_(?:self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")


def _lora(weight: torch.Tensor, base: str, r: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon module (conv: kxk down, 1x1 up) with ΔW at about a quarter of the
    layer's own spread: visible, yet no overflow on a random model."""
    out_features, in_features = weight.shape[:2]
    std = math.sqrt(0.25 * max(float(weight.std()), 1e-4) / math.sqrt(r))
    if weight.dim() == 2:
        down = torch.randn(r, in_features, generator=generator) * std
        up = torch.randn(out_features, r, generator=generator) * std
    else:
        k = weight.shape[2:]
        down = torch.randn(r, in_features, *k, generator=generator) * std / math.sqrt(k[0] * k[1])
        up = torch.randn(out_features, r, 1, 1, generator=generator) * std
    return {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(float(r))}


def _loha(weight: torch.Tensor, base: str, r: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa module, ΔW = (w1a·w1b) ⊙ (w2a·w2b) (conv: flattened kxk inputs), each half
    at about the square root of a quarter of the layer's spread."""
    out_features, flat_in = weight.shape[0], weight[0].numel()
    half = math.sqrt(0.25 * max(float(weight.std()), 1e-4))
    std = math.sqrt(half / math.sqrt(r))
    module = {f"{base}.alpha": torch.tensor(float(r))}
    for name, shape in (("w1_a", (out_features, r)), ("w1_b", (r, flat_in)), ("w2_a", (out_features, r)), ("w2_b", (r, flat_in))):
        module[f"{base}.hada_{name}"] = torch.randn(*shape, generator=generator) * std
    return module


def make_networks(
    checkpoint: str | Path,
    out_dir: str | Path,
    rank: int = 4,
    seed: int = 0,
    text_encoder: bool = False,
    prefix: str = "sl",
) -> dict[str, Path]:
    """Write ``{prefix}_lora``, ``{prefix}_locon`` and ``{prefix}_loha`` (``.safetensors``);
    returns {name: path}. The LoHa covers the LoCon's layers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    locon: dict[str, torch.Tensor] = {}
    loha: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        index = model_index({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        # One kohya name per weight: the first the index lists (the checkpoint's own layout, the
        # first prefix), in the checkpoint's key order.
        names: dict[Slot, str] = {}
        for name, slot in index.slots.items():
            names.setdefault(slot, name)
        for slot, base in names.items():
            conv = slot.component == UNET and _UNET_CONV.match(slot.weight)
            if slot.component == UNET:
                if not (conv or _UNET_LINEAR.match(slot.weight)):
                    continue
            elif not (text_encoder and _TE_LAYER.search(base)):
                continue
            weight = f.get_tensor(slot.weight).float()
            if slot.rows is not None:
                weight = weight[slot.rows[0] : slot.rows[1]]
            if weight.dim() not in (2, 4):
                continue
            r = min(rank, *weight.shape[:2])
            entry = _lora(weight, base, r, generator)
            if conv:
                locon.update(entry)
            else:
                lora.update(entry)
                locon.update(entry)
            loha.update(_loha(weight, base, r, generator))
    paths = {}
    for kind, tensors in (("lora", lora), ("locon", locon), ("loha", loha)):
        paths[f"{prefix}_{kind}"] = out_dir / f"{prefix}_{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(paths[f"{prefix}_{kind}"]))
    return paths


def make_networks_for_webui(
    get: Callable[[str], Any], post: Callable[[str], Any], lora_dir: str | Path, checkpoint: str | None = None
) -> dict[str, Path]:
    """:func:`make_networks` for the checkpoint a running WebUI has loaded (or ``checkpoint``),
    into its ``lora_dir``, then let it rescan. ``get``/``post`` call its API by path."""
    if checkpoint is None:
        models = get("/sdapi/v1/sd-models")
        # The option holds a title, "name.safetensors [hash]"; the hash part may be missing.
        loaded = get("/sdapi/v1/options").get("sd_model_checkpoint", "").split(" [")[0]
        checkpoint = next(
            (m["filename"] for m in models if m["title"].split(" [")[0] == loaded), models[0]["filename"]
        )
    paths = make_networks(checkpoint, lora_dir)
    post("/sdapi/v1/refresh-loras")
    return paths

