"""``generate``: one image from a prompt whose ``<lora:...>`` tags carry schedules (diffusers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_scheduled_lora.hosts.samplers import LABELS, SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt with <lora:NAME:SCHEDULE> tags")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--model", help="diffusers folder or single-file .safetensors (default: the built-in demo model)")
    parser.add_argument("--config", help="diffusers folder whose configs describe a single-file --model (offline)")
    parser.add_argument("--lora-dir", action="append", default=[], help="folder of network files (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--mode", choices=("auto", "merge", "bypass"), default="auto", help="engine mode")
    parser.add_argument("-o", "--output", default="outputs/scheduled-lora.png", help="PNG to write")


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.core.library import NetworkLibrary
    from lib_scheduled_lora.core.tags import tags_in_prompt
    from lib_scheduled_lora.hosts.runner import GenerationRequest, generate, load_pipeline

    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=args.seed,
        sampler=args.sampler,
        width=args.width,
        height=args.height,
        mode=args.mode,
    )
    tags_in_prompt(request.prompt)  # a malformed tag fails before the model is loaded
    if args.model is None:
        from lib_scheduled_lora.demo import model as demo

        pipe, label, default_dirs = demo.load_demo_pipeline(), "built-in demo model", [str(demo.NETWORKS_DIR)]
    else:
        (pipe, label), default_dirs = load_pipeline(args.model, args.config), []
    library = NetworkLibrary.scan(list(args.lora_dir) or default_dirs)
    result = generate(pipe, request, library, model_label=label, progress=True)
    out = Path(args.output)
    result.save(out)
    print(f"model: {result.model_label}")
    for name, values in result.unet_multipliers.items():
        shown = ", ".join(f"{v:g}" for v in values)
        print(f"{name}: unet multipliers per evaluation [{shown}]")
    print(f"sampler: {LABELS[args.sampler]}, steps: {args.steps}, seed: {args.seed}")
    print(f"wrote {out}")
    return 0
