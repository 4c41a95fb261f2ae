"""A random diffusers-format pipeline folder with Stable Diffusion 1.5's UNet, for in-host benchmarks
on hosts that load diffusers folders (SD.Next: ``models/Diffusers/<name>``).

    python bench/make_diffusers_model.py /path/to/sdnext/models/Diffusers/sd15-random [--widths 0.5]

The UNet has SD 1.5's configuration (860 M parameters, the real layer names and shapes, fp32;
``--widths F`` scales its channel widths: 0.5 gives 215 M parameters, the same blocks and names),
random weights; the text encoder is CLIP-L's width (768) with 2 layers and the VAE is small, so
that the UNet dominates the time as it does with a real model. Weights that diffusers initialises
to all zeros get small random values (a zero layer would make its LoRA's effect vanish). The
tokenizer is the CLIP one in shared/data. Not a test helper: nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
)


def main() -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from support.tiny_models import clip_tokenizer_dir
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--widths", type=float, default=1.0, help="scale of the UNet's channel widths (1: SD 1.5)")
    args = ap.parse_args()
    folder = clip_tokenizer_dir()
    if folder is None:
        raise SystemExit("error: no CLIP tokenizer in shared/data (set CLIP_TOKENIZER_DIR)")
    torch.manual_seed(args.seed)
    widths = tuple(int(round(c * args.widths / 32)) * 32 for c in SD15_UNET["block_out_channels"])
    unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": widths})
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for module in (unet, text_encoder, vae):
            for param in module.parameters():
                if param.dim() >= 2 and not param.any():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=CLIPTokenizer.from_pretrained(str(folder)),
        unet=unet.eval(), scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    print(f"wrote {args.out} (UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters)")


if __name__ == "__main__":
    main()
