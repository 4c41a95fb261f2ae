"""Peak memory (RSS) of baking a LoRA into a single-file checkpoint of real size.

    python bench/bake_memory.py --family sdxl --work /tmp/bake      # SDXL: 2.6 B UNet parameters
    python bench/bake_memory.py --family sd15 --work /tmp/bake --before 98b8cd0

The checkpoint is synthetic but has the real model's layer names (ldm/sgm layout, as the WebUI
loads it) and shapes in fp16: the diffusers UNet / CLIP classes are built on the meta device for
their names and shapes only, converted to checkpoint names with the package's own conversion, and
written tensor by tensor (random values), so building it needs no memory either. The LoRA (rank
32, fp16) targets every attention / feed-forward Linear of the UNet, kohya's default.

Each bake runs ``python -m lib_scheduled_lora merge`` in a child process and reports its peak
resident set (``ru_maxrss``) and wall time. ``--before COMMIT`` also runs that commit's package
(exported with ``git archive``) on the same files, for a before/after table. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tests"))

from support.random_networks import Layer, random_network, write  # noqa: E402

from lib_scheduled_lora.core.naming import model_index, unet_diffusers_to_ldm  # noqa: E402
from lib_scheduled_lora.core.safetensors_stream import Planned, StreamingWriter  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)


def checkpoint_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of the real model (names as the WebUI's files have them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from support.sd_layouts import hf_clip_to_open_clip
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L, max_position_embeddings=77))
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2,
        )
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G, max_position_embeddings=77)) if family == "sdxl" else None
    up_attention = {i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    shapes = {}
    for name, tensor in unet.state_dict().items():
        shapes["model.diffusion_model." + unet_diffusers_to_ldm(name, up_attention, 2)] = tuple(tensor.shape)

    def hf(name: str) -> str:
        return name if name.startswith("text_model.") else "text_model." + name

    te_root = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
    shapes.update({te_root + hf(k): tuple(v.shape) for k, v in te.state_dict().items()})
    if te2 is not None:
        open_clip = hf_clip_to_open_clip(te2.state_dict())
        shapes.update({"conditioner.embedders.1.model." + k: tuple(v.shape) for k, v in open_clip.items()})
    shapes.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()})
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    generator = torch.Generator().manual_seed(0)
    planned = [Planned(name, torch.float16, shape) for name, shape in shapes.items()]
    with StreamingWriter(path, planned, {"format": "pt"}, force=True) as writer:
        for item in planned:
            tensor = torch.empty(item.shape, dtype=torch.float32).normal_(0, 0.02, generator=generator)
            writer.write(item.name, tensor.half())


def lora_layers(shapes: dict[str, tuple[int, ...]]) -> list[Layer]:
    """kohya's default LoRA layers: the UNet's attention and feed-forward Linears (and 1x1 proj_in/out)."""
    index = model_index(shapes)
    wanted = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2")
    return [
        Layer(name, slot.shape)
        for slot, name in index.kohya_names.items()
        if name.startswith("lora_unet_") and name.endswith(wanted)
    ]


def measure(package_root: Path, checkpoint: Path, lora: Path, output: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one ``merge`` in a child process."""
    output.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    command = [sys.executable, "-m", "lib_scheduled_lora", "merge", str(checkpoint), "--lora", str(lora), "-o", str(output), "--quiet"]
    # a fresh parent per bake, so that RUSAGE_CHILDREN sees that bake alone
    probe = (
        "import resource, subprocess, sys, time; start = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], env=env, cwd=package_root, check=True,
                          capture_output=True, text=True)
    peak_kb, seconds = done.stdout.split()[-2:]
    return int(peak_kb) / 2**20, float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--work", default=None, help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--before", default=None, help="also bake with this commit's package")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bake-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, lora, output = work / f"{args.family}.safetensors", work / "lora.safetensors", work / "baked.safetensors"
    shapes = checkpoint_shapes(args.family)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    unet_params = sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.diffusion_model."))
    if not checkpoint.exists():
        start = time.perf_counter()
        write_checkpoint(checkpoint, shapes)
        print(f"wrote {checkpoint} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    layers = lora_layers(shapes)
    write(random_network(layers, rank=32, seed=1, alpha=lambda r: r / 2), lora, torch.float16)
    size = checkpoint.stat().st_size / 2**30
    print(f"{args.family}: {params / 1e9:.2f} B parameters ({unet_params / 1e9:.2f} B UNet), "
          f"checkpoint {size:.2f} GB fp16, LoRA rank 32 on {len(layers)} layers ({lora.stat().st_size / 2**20:.0f} MB)")
    rows = []
    if args.before:
        old = work / f"package-{args.before}"
        if not old.exists():
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(HERE), "archive", args.before, "lib_scheduled_lora"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        rows.append((f"before ({args.before})", *measure(old, checkpoint, lora, output)))
    rows.append(("now", *measure(HERE, checkpoint, lora, output)))
    print("\n| code | peak RSS | checkpoint | ratio | seconds |\n|---|---:|---:|---:|---:|")
    for label, peak, seconds in rows:
        print(f"| {label} | {peak:.2f} GB | {size:.2f} GB | {peak / size:.2f}x | {seconds:.0f} |")
    if not args.keep:
        for path in (output, lora) if args.work else (output, lora, checkpoint):
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
