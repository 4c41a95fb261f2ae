"""Test networks for a real checkpoint (integration tests and the in-host benchmark).

A kohya LoRA (the attention and feed-forward Linear layers; the text encoder's too with
``text_encoder=True``), a LoCon (also every 3x3/1x1 convolution) and a LoHa (the LoCon's layers)
for an SD 1.x, SD 2.x or SDXL single-file checkpoint or diffusers model folder, from the one
random-network writer (:mod:`support.random_networks`), named in the model's own layout
(``lora_unet_input_blocks_1_1_proj_in``, ``lora_unet_down_blocks_1_attentions_0_proj_in``), which
the WebUIs' own Lora and this extension all resolve. ΔW is about a quarter of each layer's
spread: a schedule visibly changes a tiny random model's images. The text encoder is left out by default because a random tiny checkpoint's UNet
turns some perturbed conditionings into NaNs (the host's own Lora included).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.random_networks import checkpoint_layers, random_network, visible_std, write


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
    linear, conv = checkpoint_layers(checkpoint, text_encoder)
    networks = {
        "lora": random_network(linear, "lora", rank=rank, seed=seed, std=visible_std("lora")),
        "locon": random_network(linear + conv, "lora", rank=rank, seed=seed + 1, std=visible_std("lora")),
        "loha": random_network(linear + conv, "loha", rank=rank, seed=seed + 2, std=visible_std("loha")),
    }
    return {f"{prefix}_{kind}": write(tensors, out_dir / f"{prefix}_{kind}.safetensors") for kind, tensors in networks.items()}


def make_networks_for_webui(
    get: Callable[[str], Any],
    post: Callable[[str], Any],
    lora_dir: str | Path,
    checkpoint: str | None = None,
    root: str | Path = ".",
) -> dict[str, Path]:
    """:func:`make_networks` for the checkpoint a running WebUI has loaded (or ``checkpoint``),
    into its ``lora_dir``, then let it rescan. ``get``/``post`` call its API by path; a relative
    file name (SD.Next's ``models/Diffusers/<name>``) is relative to the WebUI's ``root``."""
    if checkpoint is None:
        checkpoint = loaded_checkpoint(get)
    paths = make_networks(os.path.join(root, checkpoint), lora_dir)  # an absolute name stays as it is
    post("/sdapi/v1/refresh-loras")
    return paths



def loaded_checkpoint(get: Callable[[str], Any]) -> str:
    """The file of the checkpoint a running WebUI has selected. The option holds a title,
    "name.safetensors [hash]" (the hash part may be missing), or on Forge the bare model name."""
    models = get("/sdapi/v1/sd-models")
    loaded = get("/sdapi/v1/options").get("sd_model_checkpoint", "").split(" [")[0]
    for m in models:
        if loaded in (m["title"].split(" [")[0], m["model_name"], Path(m["filename"]).name, Path(m["filename"]).stem):
            return m["filename"]
    return models[0]["filename"]
