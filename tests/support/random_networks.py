"""The one random-network writer of the tests and the benchmarks.

Every test or bench network is a kohya-format LoRA/LoCon or LoHa with random factors for a list
of :class:`Layer` (kohya name + the target weight's shape). Where the layers come from differs by
caller, and has one function each here:

* :func:`module_layers` - a diffusers module tree (the bench's SD 1.5 UNet, kohya's default layer
  choice for LoRA / LoCon);
* :func:`checkpoint_layers` - a single-file checkpoint, named through the engine's own model index
  (the real-WebUI tests and in-host bench);
* ``support.sd_layouts.kohya_lora_state`` - every layer of a tiny SD model (unit tests).

Sizes: LoRA conv layers get a kxk ``lora_down`` and a 1x1 ``lora_up`` (LoCon); LoHa conv layers
flatten the kernel into ``hada_w*_b``. ``std(layer, rank)`` gives the two factors' spreads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lib_scheduled_lora.core.networks.files import write_safetensors_atomic


@dataclass(frozen=True)
class Layer:
    key: str  # kohya base name
    shape: tuple[int, ...]  # the target weight: [out, in] or [out, in, kh, kw]
    spread: float = 1.0  # the target weight's standard deviation (for ΔW scaled to the layer)

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.shape[2:]


Spread = Callable[[Layer, int], tuple[float, float]]


def constant(down: float, up: float | None = None) -> Spread:
    return lambda layer, rank: (down, down if up is None else up)


def random_network(
    layers: Iterable[Layer],
    kind: str = "lora",
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    seed: int = 0,
    std: Spread | None = None,
    alpha: Callable[[int], float] = float,
) -> dict[str, torch.Tensor]:
    """kohya tensors of a ``kind`` ("lora": LoRA/LoCon, "loha") network on ``layers``.

    Rank: ``conv_rank`` for kxk convolutions (default ``rank``), capped by the layer's widths.
    ``alpha(rank)`` gives each module's alpha (default alpha = rank: scale 1); ``std`` the factors'
    spreads (default 0.1 both).
    """
    std = std or constant(0.1)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        out_features, in_features = layer.shape[:2]
        wanted = conv_rank if conv_rank is not None and layer.kernel and layer.kernel != (1, 1) else rank
        r = min(wanted, out_features, in_features)
        a, b = std(layer, r)
        key = layer.key
        if kind == "loha":
            fan_in = in_features * math.prod(layer.kernel)
            for side in ("w1", "w2"):
                tensors[f"{key}.hada_{side}_a"] = torch.randn(out_features, r, generator=generator) * a
                tensors[f"{key}.hada_{side}_b"] = torch.randn(r, fan_in, generator=generator) * b
        else:
            ones = (1, 1) if layer.kernel else ()
            tensors[f"{key}.lora_down.weight"] = torch.randn(r, in_features, *layer.kernel, generator=generator) * a
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, r, *ones, generator=generator) * b
        tensors[f"{key}.alpha"] = torch.tensor(alpha(r))
    return tensors


def write(tensors: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None) -> Path:
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
    write_safetensors_atomic(tensors, path, {"ss_network_module": "networks.lora"}, force=True)
    return Path(path)


# -- layers of a diffusers module tree (the bench) -----------------------------------------------

TRANSFORMER = ".attentions."
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


def module_layers(unet: nn.Module, kind: str, prefix: str = "lora_unet_") -> list[Layer]:
    """kohya's default choice: a LoRA trains every Linear and 1x1 Conv inside the transformer
    blocks (192 layers in SD 1.5); a LoCon (and here a LoHa) also the ResNet blocks and the
    down/up-samplers."""
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        in_transformer = TRANSFORMER in name and (isinstance(module, nn.Linear) or module.kernel_size == (1, 1))
        in_conv_block = any(block in name for block in CONV_BLOCKS)
        if in_transformer or (kind != "lora" and in_conv_block):
            layers.append(Layer(prefix + name.replace(".", "_"), tuple(module.weight.shape)))
    return layers


def bench_std(kind: str) -> Spread:
    """The bench's spreads: a LoRA's up at 0.02 (ΔW a small change), LoHa halves at 0.1 / 1/√fan-in."""
    if kind == "loha":
        return lambda layer, rank: (0.1, 1 / math.sqrt(layer.shape[1] * math.prod(layer.kernel)))
    return lambda layer, rank: (1 / math.sqrt(layer.shape[1] * max(1, len(layer.kernel))), 0.02)


def write_network(unet: nn.Module, kind: str, path: Path, *, rank: int = 32, conv_rank: int = 16, seed: int = 0) -> int:
    """The bench's random ``kind`` ("lora", "locon", "loha") network for ``unet`` in fp16; returns
    its layer count. LoHa's Hadamard product squares the rank, so it gets half of each."""
    if kind == "loha":
        rank, conv_rank = rank // 2, conv_rank // 2
    layers = module_layers(unet, kind)
    alpha = float if kind == "loha" else (lambda r: r / 2)
    tensors = random_network(
        layers, "loha" if kind == "loha" else "lora", rank=rank, conv_rank=conv_rank, seed=seed, std=bench_std(kind), alpha=alpha
    )
    write(tensors, path, torch.float16)
    return len(layers)


# -- layers of a single-file checkpoint (real-WebUI tests, in-host bench) --------------------------

_UNET_LINEAR = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
_UNET_CONV = re.compile(
    r"^model\.diffusion_model\.(.+\.(?:in_layers\.2|out_layers\.3|skip_connection|op|conv))\.weight$"
)
# Text-encoder layers (kohya names as the model index gives them: the HF-style ones the WebUI
# resolves, also for OpenCLIP encoders, whose q/k/v are row thirds of one weight; A1111 applies an
# OpenCLIP attention only when q, k, v and out are all present).
_TE_LAYER = re.compile(r"_text_model_encoder_layers_\d+_(?:self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")


# The same layers in a diffusers-format model folder (SD.Next's models/Diffusers/<name>).
_DIFFUSERS_LINEAR = re.compile(r"^unet\.(.+\.(?:to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2))\.weight$")
_DIFFUSERS_CONV = re.compile(
    r"^unet\.(.+_blocks\.\d+\.(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv))\.weight$"
)
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _tensor_files(model: Path) -> dict[str, Path]:
    """{weight name: file} of a single-file checkpoint, or of a diffusers folder's UNet and text
    encoders (names prefixed ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``, as the engine
    sees a pipeline's components)."""
    from safetensors import safe_open

    if model.is_file():
        with safe_open(str(model), framework="pt") as f:
            return {key: model for key in f.keys()}
    files = {}
    for component in DIFFUSERS_COMPONENTS:
        for path in sorted((model / component).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                files.update({f"{component}.{key}": path for key in f.keys()})
    return files


def checkpoint_layers(checkpoint: str | Path, text_encoder: bool = False) -> tuple[list[Layer], list[Layer]]:
    """(attention/feed-forward layers, 3x3/1x1 convolutions) of an ldm/sgm checkpoint or a
    diffusers model folder, named the first way the engine's model index names each weight (the
    model's own layout), with each weight's spread."""
    from safetensors import safe_open

    from lib_scheduled_lora.core.naming import UNET, Slot, model_index

    model = Path(checkpoint)
    files = _tensor_files(model)
    linear_re, conv_re = (_UNET_LINEAR, _UNET_CONV) if model.is_file() else (_DIFFUSERS_LINEAR, _DIFFUSERS_CONV)
    shapes = {}
    for key, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            shapes[key] = tuple(f.get_slice(key.split(".", 1)[1] if not model.is_file() else key).get_shape())
    index = model_index(shapes)
    names: dict[Slot, str] = {}
    for name, slot in index.slots.items():
        names.setdefault(slot, name)
    linear: list[Layer] = []
    conv: list[Layer] = []
    for slot, key in names.items():
        is_conv = slot.component == UNET and bool(conv_re.match(slot.weight))
        if slot.component == UNET:
            if not (is_conv or linear_re.match(slot.weight)):
                continue
        elif not (text_encoder and _TE_LAYER.search(key)):
            continue
        with safe_open(str(files[slot.weight]), framework="pt") as f:
            weight = f.get_tensor(slot.weight.split(".", 1)[1] if not model.is_file() else slot.weight).float()
        if slot.rows is not None:
            weight = weight[slot.rows[0] : slot.rows[1]]
        if weight.dim() not in (2, 4):
            continue
        layer = Layer(key, tuple(weight.shape), max(float(weight.std()), 1e-4))
        (conv if is_conv else linear).append(layer)
    return linear, conv


def visible_std(kind: str) -> Spread:
    """Factors for ΔW at about a quarter of each layer's own spread: a schedule visibly changes a
    tiny random model's images, without overflow."""
    if kind == "loha":

        def loha(layer: Layer, rank: int) -> tuple[float, float]:
            s = math.sqrt(math.sqrt(0.25 * layer.spread) / math.sqrt(rank))
            return s, s

        return loha

    def lora(layer: Layer, rank: int) -> tuple[float, float]:
        s = math.sqrt(0.25 * layer.spread / math.sqrt(rank))
        return s / (math.sqrt(math.prod(layer.kernel)) if layer.kernel else 1.0), s

    return lora
