"""Test networks for a real checkpoint (integration tests and the in-host benchmark).

Writes a kohya LoRA (Linear layers of attention and feed-forward; the text encoder's too with
``text_encoder=True``), a LoCon (also every 3x3/1x1 convolution) and a LoHa (the LoCon's layers)
for an SD 1.x, SD 2.x or SDXL single-file checkpoint, with UNet module names in the checkpoint's
own ldm/sgm layout
(``lora_unet_input_blocks_1_1_proj_in``), which A1111's builtin Lora and this extension both
resolve (A1111: via its ``lora_unet`` -> ``diffusion_model`` fallback). Text-encoder names are the
kohya ones the host resolves for each family:

- SD 1.x  ``cond_stage_model.transformer.text_model.encoder.layers.N.<m>``  -> ``lora_te_text_model_encoder_layers_N_<m>``
- SD 2.x  ``cond_stage_model.model.transformer.resblocks.N.<openclip m>``   -> ``lora_te_text_model_encoder_layers_N_<hf m>``
- SDXL    ``conditioner.embedders.0.transformer.text_model.encoder.layers.N.<m>`` -> ``lora_te1_text_model_encoder_layers_N_<m>``
          ``conditioner.embedders.1.model.transformer.resblocks.N.<openclip m>``  -> ``lora_te2_text_model_encoder_layers_N_<hf m>``

OpenCLIP -> HF names: ``attn.in_proj_weight`` rows [0:d], [d:2d], [2d:3d] -> ``self_attn_q_proj`` / ``_k_proj`` /
``_v_proj``, ``attn.out_proj`` -> ``self_attn_out_proj``, ``mlp.c_fc`` -> ``mlp_fc1``, ``mlp.c_proj`` -> ``mlp_fc2``.
A1111 applies an OpenCLIP layer's q/k/v/out only when all four are present (one fused MultiheadAttention).
Random factors sized so that ΔW is about a quarter of W: a schedule visibly changes a
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
# HF CLIP text encoders: (regex, kohya prefix). SD 1.x: lora_te_; SDXL's first encoder (CLIP ViT-L): lora_te1_.
_TE_HF = (
    (re.compile(
        r"^cond_stage_model\.transformer\.(text_model\.encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12]))\.weight$"
    ), "lora_te_"),
    (re.compile(
        r"^conditioner\.embedders\.0\.transformer\.(text_model\.encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12]))\.weight$"
    ), "lora_te1_"),
)
# OpenCLIP text encoders: SD 2.x (lora_te_), SDXL's second encoder (bigG, lora_te2_).
_TE_OPENCLIP = (
    (re.compile(
        r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
    ), "lora_te_"),
    (re.compile(
        r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
    ), "lora_te2_"),
)
_OPENCLIP_TO_HF = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1", "mlp.c_proj.weight": "mlp_fc2"}


def _te_targets(key: str) -> list[tuple[str, int | None]]:
    """[(kohya module name, row chunk of a fused q/k/v weight or None)] for a text-encoder weight key."""
    for regex, prefix in _TE_HF:
        m = regex.match(key)
        if m:
            return [(prefix + m.group(1).replace(".", "_"), None)]
    for regex, prefix in _TE_OPENCLIP:
        m = regex.match(key)
        if m:
            base = f"{prefix}text_model_encoder_layers_{m.group(1)}_"
            if m.group(2) == "attn.in_proj_weight":
                return [(base + f"self_attn_{p}_proj", i) for i, p in enumerate("qkv")]
            return [(base + _OPENCLIP_TO_HF[m.group(2)], None)]
    return []


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
        for key in f.keys():
            unet = _UNET_LINEAR.match(key)
            conv = _UNET_CONV.match(key)
            te = _te_targets(key) if text_encoder else []
            if not (unet or conv or te):
                continue
            full = f.get_tensor(key).float()
            if full.dim() not in (2, 4):
                continue
            targets = te or [("lora_unet_" + (unet or conv).group(1).replace(".", "_"), None)]
            for base, chunk in targets:
                weight = full if chunk is None else full.chunk(3, 0)[chunk]
                r = min(rank, *weight.shape[:2])
                entry = _lora(weight, base, r, generator)
                if weight.dim() == 4 and weight.shape[2:] != (1, 1) or conv:
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
