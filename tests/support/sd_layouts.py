"""Tiny SD 1.x / 2.x / SDXL models with the real block structure, in both layouts.

The diffusers side comes from the real classes (UNet2DConditionModel, CLIPTextModel...) with tiny
widths. The ldm/sgm side is built from those weights; ``test_naming`` checks that diffusers' own
single-file converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``) turn it back into exactly the diffusers weights, so the ldm names
used by the tests are the ones diffusers — and the WebUI — agree on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from lib_scheduled_lora.core.naming import unet_diffusers_to_ldm
from lib_scheduled_lora.core.networks.base import NetworkModule
from support.random_networks import Layer, constant, random_network

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class TinySD:
    family: str
    unet: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module | None = None

    @property
    def components(self) -> dict[str, nn.Module]:
        parts = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = self.text_encoder_2
        return parts

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.{name}": tensor
            for prefix, module in self.components.items()
            for name, tensor in module.state_dict().items()
        }

    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        return ldm_state_dict(self)


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8)
    if family == "sdxl":
        # SDXL: three levels, no attention on the first, deeper transformers further down,
        # linear projections, and the "text_time" added embedding (label_emb in sgm).
        return UNet2DConditionModel(
            **common,
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=40,  # te1 16 + te2 24, as 768 + 1280 in the real model
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        )
    return UNet2DConditionModel(
        **common,
        block_out_channels=(16, 32, 64, 64),
        attention_head_dim=2 if family == "sd1" else (2, 4, 8, 8),
        cross_attention_dim=24 if family == "sd1" else 40,
        use_linear_projection=family == "sd2",
    )


def tiny_clip(hidden: int, projection: bool = False, vocab_size: int = 1000, layers: int = 2) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


@functools.cache
def tiny_sd(family: str) -> TinySD:
    """A tiny model of ``family`` with every parameter random (so that no two tensors are alike)."""
    torch.manual_seed({"sd1": 1, "sd2": 2, "sdxl": 3}[family])
    if family == "sdxl":
        model = TinySD(family, _unet(family), tiny_clip(16), tiny_clip(24, projection=True))
    else:
        model = TinySD(family, _unet(family), tiny_clip(24 if family == "sd1" else 40))
    with torch.no_grad():
        for module in model.components.values():
            module.eval()
            for p in module.parameters():
                p.normal_()
    return model


# -- ldm/sgm layout ---------------------------------------------------------------------------


def _hf_key(name: str) -> str:
    """transformers 5 may omit the ``text_model.`` level; checkpoints and kohya never do."""
    if name.startswith(("encoder.", "embeddings.", "final_layer_norm.")):
        return "text_model." + name
    return name


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights -> OpenCLIP names (fused q/k/v), the inverse of diffusers'."""
    state = {_hf_key(k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    layer_parts = {
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
    }
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"], dim=0
            )
            for hf, oc in layer_parts.items():
                out[dst + f"{oc}.{leaf}"] = state[src + f"{hf}.{leaf}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    else:  # SD 2.x checkpoints carry one too; diffusers reads its width to split q/k/v
        hidden = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(hidden)
    return out


def ldm_state_dict(model: TinySD) -> dict[str, torch.Tensor]:
    """The single-file checkpoint names of ``model`` (SD1/SD2 ldm, SDXL sgm)."""
    unet = model.unet.state_dict()
    up_attention = {i for i, block in enumerate(model.unet.up_blocks) if hasattr(block, "attentions")}
    out = {}
    for name, tensor in unet.items():
        ldm = unet_diffusers_to_ldm(name, up_attention, model.unet.config.layers_per_block)
        assert ldm is not None, name
        out["model.diffusion_model." + ldm] = tensor
    te = model.text_encoder.state_dict()
    if model.family == "sd1":
        out.update({"cond_stage_model.transformer." + _hf_key(k): v for k, v in te.items()})
    elif model.family == "sd2":
        out.update({"cond_stage_model.model." + k: v for k, v in hf_clip_to_open_clip(te).items()})
    else:
        out.update({"conditioner.embedders.0.transformer." + _hf_key(k): v for k, v in te.items()})
        te2 = model.text_encoder_2.state_dict()
        out.update({"conditioner.embedders.1.model." + k: v for k, v in hf_clip_to_open_clip(te2).items()})
    # Parts of a checkpoint that no network targets, so that nothing assumes they are absent.
    out["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    return out


# -- kohya names ----------------------------------------------------------------------------


def kohya_keys(model: TinySD) -> dict[str, str]:
    """kohya name -> diffusers module (prefixed), for every module with a weight, as kohya's trainer names them.

    SD 1.x/2.x: ``lora_unet_`` + diffusers path; SDXL: kohya converts the UNet to sgm names first.
    Text encoders: ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_``/``lora_te2_`` + path under the model.
    """
    keys: dict[str, str] = {}
    up_attention = {i for i, block in enumerate(model.unet.up_blocks) if hasattr(block, "attentions")}
    for name, module in model.unet.named_modules():
        if "weight" not in dict(module.named_parameters(recurse=False)):
            continue
        path = name
        if model.family == "sdxl":
            path = unet_diffusers_to_ldm(name, up_attention, 2)
        keys["lora_unet_" + path.replace(".", "_")] = "unet." + name
    prefixes = (
        {"text_encoder": "lora_te_"}
        if model.family != "sdxl"
        else {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    )
    for component, prefix in prefixes.items():
        for name, module in getattr(model, component).named_modules():
            if "weight" not in dict(module.named_parameters(recurse=False)):
                continue
            keys[prefix + _hf_key(name + ".").rstrip(".").replace(".", "_")] = f"{component}.{name}"
    return keys


# -- fake network modules -----------------------------------------------------------------------


class FakeModule(NetworkModule):
    """ΔW = a fixed tensor (or ``value`` everywhere), optionally with a bias delta."""

    algorithm = "full"

    def __init__(
        self, key: str, shape: tuple[int, ...], value: float = 1.0, delta: torch.Tensor | None = None
    ):
        self.key, self.shape, self.value, self.delta = key, tuple(shape), value, delta

    def delta_numel(self) -> int:
        return math.prod(self.shape)

    def weight_delta(self, base: torch.Tensor) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.to(device=base.device, dtype=torch.float32).reshape(base.shape)
        return torch.full(base.shape, self.value, dtype=torch.float32, device=base.device)


class FakeBiasModule(FakeModule):
    """Also changes the layer's bias (by ``value`` everywhere)."""

    @property
    def changes_bias(self) -> bool:
        return True

    def bias_delta(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        shape = base_bias.shape if base_bias is not None else (self.shape[0],)
        return torch.full(shape, self.value, dtype=torch.float32)


# -- kohya LoRA files -------------------------------------------------------------------------


def kohya_lora_state(
    model: TinySD, select=None, rank: int = 2, seed: int = 0, scale: float = 0.1, alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon state dict for every Linear/Conv2d layer of ``model`` (those ``select(key)`` keeps).

    Conv layers get a kxk ``lora_down`` and a 1x1 ``lora_up`` (LoCon). One alpha for all layers
    (alpha != rank, so the alpha/rank scale is exercised): diffusers' kohya loader drops per-layer
    alphas of SD 1.x attention layers (PEFT warns "alpha_pattern keys did not match"), and it is the
    oracle here.
    """
    layers = []
    for key, module_name in kohya_keys(model).items():
        if select is not None and not select(key):
            continue
        component, _, path = module_name.partition(".")
        layer = getattr(model, component).get_submodule(path)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            layers.append(Layer(key, tuple(layer.weight.shape)))
    return random_network(layers, "lora", rank=rank, seed=seed, std=constant(scale), alpha=lambda r: alpha)


class ModuleTree(nn.Module):
    """A module tree with the given parameter names, for layouts without importable classes
    (the WebUI's ldm/sgm models): the engine sees the same names and parameters."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in state.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
