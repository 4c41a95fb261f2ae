"""Whole generations on a diffusers StableDiffusionPipeline: ours (``attach``) beside what a
diffusers user writes today.

    python bench/diffusers_bench.py                       # CPU: SD 1.5 architecture, 128x128, 8 steps
    python bench/diffusers_bench.py --device cuda --size 512 --steps 20 --dtype float16

The pipeline has SD 1.5's architecture (UNet, CLIP ViT-L text encoder with the tokenizer from
``../shared/data``, VAE) with random weights. The network is a kohya LoRA (rank 32) on the 160
transformer-block linears (attention q/k/v/out and feed-forward), or a LoCon adding the ResNet
convolutions. Configurations, each a whole ``pipe(...)`` call, interleaved ``--runs`` times after a
warm-up, medians and ratios to peft's static fuse in the same run:

* peft static: ``load_lora_weights`` + ``fuse_lora`` once (the host's steady state);
* peft per step: unfused adapter, ``set_adapters`` in ``callback_on_step_end`` (step, ramp);
* ours: ``with attach(pipe, networks):`` around each generation, networks from one
  ``NetworkLibrary`` (constant, step ``0@0.3:1``, ramp ``0@0,1@1``);
* re-merge: the older tools' way, restore every targeted weight from a CPU backup and re-add ΔW
  at each change (ramp).

The images of ours and peft's agree (checked here: constant vs fused, ramp vs per-step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engine_bench import RemergeFromBackup  # noqa: E402 - the same reference as the engine bench
from support.random_networks import constant, module_layers, random_network, write  # noqa: E402
from support.tiny_models import clip_tokenizer_dir  # noqa: E402

from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork  # noqa: E402
from lib_scheduled_lora.core.library import NetworkLibrary  # noqa: E402
from lib_scheduled_lora.core.schedule import parse_schedule  # noqa: E402
from lib_scheduled_lora.hosts.diffusers import attach  # noqa: E402

STEP, RAMP = "0@0.3:1", "0@0,1@1"
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)


def build_pipeline(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = clip_tokenizer_dir()
    if folder is None:
        raise SystemExit("needs the CLIP tokenizer of ../shared/data (CLIP_TOKENIZER_DIR)")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    with torch.no_grad():  # random weights, tamed so that the UNet's output stays finite over the steps
        for p in unet.parameters():
            p.mul_(0.5)
    text_config = CLIPTextConfig.from_pretrained(str(folder))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder)),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def write_network(pipe, kind: str, folder: Path) -> Path:
    """kohya LoRA on the transformer-block linears (rank 32), or LoCon adding ResNet convs (rank 16)."""
    layers = [layer for layer in module_layers(pipe.unet, kind) if "transformer_blocks" in layer.key or kind != "lora"]
    if kind == "lora":
        layers = [layer for layer in layers if len(layer.shape) == 2]
    tensors = random_network(layers, "lora", rank=32, conv_rank=16, seed=1, std=constant(0.05, 0.05), alpha=lambda r: r / 2)
    return write(tensors, folder / f"bench_{kind}.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--networks", default="lora,locon")
    parser.add_argument("--cache-mb", type=float, default=EngineSettings().cache_budget_mb,
                        help="ours: the ΔW cache budget kept with the pipeline (default: the library's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = args.device
    pipe = build_pipeline(device, dtype)
    folder = Path(tempfile.mkdtemp(prefix="sl-diffusers-bench-"))
    results: dict[str, dict] = {}
    for kind in args.networks.split(","):
        path = write_network(pipe, kind, folder)
        library = NetworkLibrary.scan([folder])
        results[kind] = bench_kind(pipe, kind, path, library, args, device)
        print_table(kind, results[kind])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def bench_kind(pipe, kind: str, path: Path, library: NetworkLibrary, args, device: str) -> dict:
    from lib_scheduled_lora.core.tags import parse_tag

    name = path.stem
    steps = args.steps

    def generate(callback=None):
        kwargs = dict(
            prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=args.cfg,
            height=args.size, width=args.size, output_type="np", generator=torch.Generator("cpu").manual_seed(1),
        )
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        with torch.no_grad():
            return pipe(**kwargs).images

    def ours(schedule: str) -> Callable[[], object]:
        tag = parse_tag(f"<lora:{name}:{schedule}>")

        def run():
            networks = [ScheduledNetwork(library.load(tag), *tag.schedules(False))]
            with attach(pipe, networks, EngineSettings(cache_budget_mb=args.cache_mb)):
                return generate()

        return run

    def peft_per_step(schedule: str) -> Callable[[], object]:
        sched = parse_schedule(schedule)

        def callback(p, step, timestep, kwargs):
            p.set_adapters([name], [sched.at(min(step + 1, steps - 1), steps)])  # for the next step
            return kwargs

        def run():
            pipe.set_adapters([name], [sched.at(0, steps)])
            return generate(callback)

        return run

    remerge = RemergeFromBackup(pipe.unet, library.load(parse_tag(f"<lora:{name}:1>")), parse_schedule(RAMP))

    def remerge_run():
        try:
            return generate(lambda p, step, t, kw: (remerge.before_step(step + 1, steps), kw)[1] if step + 1 < steps else kw)
        finally:
            remerge.restore()

    def with_remerge_first():
        remerge.before_step(0, steps)
        return remerge_run()

    configs: dict[str, Callable[[], object]] = {
        "no LoRA": generate,
        "ours: constant 1": ours("1"),
        f"ours: step {STEP}": ours(STEP),
        f"ours: ramp {RAMP}": ours(RAMP),
        f"re-merge from CPU backup: ramp {RAMP}": with_remerge_first,
    }
    peft_labels = ["peft static (fuse_lora)", f"peft per step: step {STEP}", f"peft per step: ramp {RAMP}"]

    def time_it(fn) -> tuple[float, object]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    def peft_round(timed: bool) -> bool:
        """Load the adapter (untimed), time peft's configurations, unload it: peft wraps the
        layers (``base_layer``), which must not stay in the way of the other configurations."""
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - a format peft cannot read: ours only
            print(f"{kind}: peft cannot load it ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
            return False
        try:
            pipe.fuse_lora(lora_scale=1.0, adapter_names=[name])
            elapsed, images[peft_labels[0]] = time_it(generate)
            if timed:
                times[peft_labels[0]].append(elapsed)
            pipe.unfuse_lora()
            for label, schedule in zip(peft_labels[1:], (STEP, RAMP)):
                elapsed, images[label] = time_it(peft_per_step(schedule))
                if timed:
                    times[label].append(elapsed)
        finally:
            pipe.unload_lora_weights()
        return True

    times: dict[str, list[float]] = {label: [] for label in [*configs, *peft_labels]}
    images: dict[str, object] = {}
    has_peft = True
    for timed in (False, *([True] * args.runs)):
        for label, fn in configs.items():
            elapsed, images[label] = time_it(fn)
            if timed:
                times[label].append(elapsed)
        has_peft = peft_round(timed) and has_peft
        if timed:
            print(f"  {kind}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values() if t), flush=True)
    if not has_peft:
        for label in peft_labels:
            times.pop(label, None)
    peft_configs = has_peft
    baseline_label = "peft static (fuse_lora)" if peft_configs else "ours: constant 1"
    baseline = statistics.median(times[baseline_label])
    rows = {
        label: {"median_s": statistics.median(v), "spread_s": max(v) - min(v), "vs_static": statistics.median(v) / baseline}
        for label, v in times.items()
    }
    checks = {}
    if peft_configs:
        import numpy as np

        checks["constant vs peft fused, max abs"] = float(np.abs(images["ours: constant 1"] - images["peft static (fuse_lora)"]).max())
        checks["ramp vs peft per step, max abs"] = float(
            np.abs(images[f"ours: ramp {RAMP}"] - images[f"peft per step: ramp {RAMP}"]).max()
        )
    checks["ours constant vs no LoRA, max abs"] = float(abs(images["ours: constant 1"] - images["no LoRA"]).max())
    return {"baseline": baseline_label, "rows": rows, "checks": checks, "steps": steps, "size": args.size}


def print_table(kind: str, result: dict) -> None:
    print(f"\n{kind} (ratios to {result['baseline']}, {result['size']}px, {result['steps']} steps)")
    print("| configuration | s / generation | spread | vs static |")
    print("|---|---:|---:|---:|")
    for label, row in result["rows"].items():
        print(f"| {label} | {row['median_s']:.2f} | {row['spread_s']:.2f} | {row['vs_static']:.2f}x |")
    for label, value in result["checks"].items():
        print(f"- {label}: {value:.2e}")
    print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
