"""Tiny Stable-Diffusion-shaped models with the real diffusers / transformers layer names.

Plain functions, built in code (no download), small enough for a 2-core CI: a UNet2DConditionModel
with two blocks (one cross-attention block, one plain), a 2-layer CLIP text encoder, a tiny VAE, and
a StableDiffusionPipeline made of them. diffusers / transformers are imported inside the functions
so that tests not using them stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)


def tiny_unet(seed: int = 0, **overrides):
    """A diffusers UNet2DConditionModel (SD layout, ~0.8M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides}).eval()


def tiny_clip_config(hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_text_encoder(seed: int = 1, hidden_size: int = 32):
    """A transformers CLIPTextModel with 2 layers, random weights."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_config(hidden_size)).eval()


def clip_text_transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module whose children are ``embeddings`` / ``encoder`` / ``final_layer_norm``.

    transformers 4 nests it under ``text_model``; transformers 5 flattens CLIPTextModel, so
    ``text_encoder`` itself is that module.
    """
    return getattr(text_encoder, "text_model", text_encoder)


class KohyaTextEncoder(torch.nn.Module):
    """Wraps a CLIP text encoder so that its module names are the kohya ones (``text_model.encoder...``)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_model = clip_text_transformer(text_encoder)


def tiny_vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def clip_tokenizer_dir() -> Path | None:
    """The CLIP tokenizer shipped in shared/data (beside the repository, or /work/shared)."""
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("CLIP_TOKENIZER_DIR", "")]
    candidates += [str(p / "shared" / "data" / "clip-vit-large-patch14") for p in (here.parent, here.parent.parent)]
    candidates.append("/work/shared/data/clip-vit-large-patch14")
    for candidate in candidates:
        if candidate and (Path(candidate) / "vocab.json").is_file():
            return Path(candidate)
    return None


def tiny_pipeline(unet=None, text_encoder=None):
    """A StableDiffusionPipeline made of tiny components (tokenizer from shared/data when present)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = None
    folder = clip_tokenizer_dir()
    if folder is not None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder if text_encoder is not None else tiny_text_encoder(),
        tokenizer=tokenizer,
        unet=unet if unet is not None else tiny_unet(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def layer_inputs(module: torch.nn.Module, batch: int = 2, seed: int = 3) -> torch.Tensor:
    """A random input that ``module`` (Linear, Conv2d, LayerNorm or GroupNorm) accepts."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.Linear):
        shape = (batch, module.in_features)
    elif isinstance(module, torch.nn.Conv2d):
        shape = (batch, module.in_channels, 6, 6)
    elif isinstance(module, torch.nn.GroupNorm):
        shape = (batch, module.num_channels, 4, 4)
    elif isinstance(module, torch.nn.LayerNorm):
        shape = (batch, 3, *module.normalized_shape)
    else:
        raise TypeError(f"no input recipe for {type(module).__name__}")
    return torch.randn(shape, generator=generator)


def apply_layer(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s own operation with another weight and bias (no state changes)."""
    import torch.nn.functional as F

    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    raise TypeError(f"cannot apply {type(module).__name__}")
