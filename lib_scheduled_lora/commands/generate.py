"""``generate``: one image from a prompt whose ``<lora:...>`` tags carry schedules (diffusers).

Everything that can be checked without sampling is checked first, cheapest first: the output
path, the model's files, the network folders, every tag (syntax, LoRA Block Weight arguments,
missing networks), the network files (readable, finite), then the model is loaded and each network
is checked against it. Only then does sampling start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_scheduled_lora.commands import options
from lib_scheduled_lora.hosts.samplers import LABELS, SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt with <lora:NAME:SCHEDULE> tags")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument(
        "--model",
        type=options.path,
        help="diffusers folder, single-file .safetensors, or a folder written by `merge demo` "
        "(default: the built-in demo model)",
    )
    parser.add_argument("--config", type=options.path, help="diffusers folder whose configs describe a single-file --model (offline)")
    parser.add_argument("--lora-dir", action="append", type=options.path, default=[], help="folder of network files (repeatable)")
    parser.add_argument("--steps", type=options.steps, default=20, help=f"sampling steps, 1-{options.MAX_STEPS} (default 20)")
    parser.add_argument(
        "--cfg", type=options.cfg, default=None, help=f"guidance scale, 0-{options.MAX_CFG:g} (default: the model's)"
    )
    parser.add_argument("--seed", type=options.seed, default=1, help="0 to 2**64-1 (default 1)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler")
    parser.add_argument(
        "--width", type=options.image_side, help="image width, a multiple of 8 (default: the model's)"
    )
    parser.add_argument("--height", type=options.image_side, help="image height (default: the model's)")
    parser.add_argument("--mode", choices=("auto", "merge", "bypass"), default="auto", help="engine mode")
    parser.add_argument("-o", "--output", type=options.path, default="outputs/scheduled-lora.png", help="PNG to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (shown only on a terminal anyway)")


def _check_size(args: argparse.Namespace, demo_model: bool) -> None:
    from lib_scheduled_lora.errors import OptionError

    for option, value in (("--width", args.width), ("--height", args.height)):
        if value is None:
            continue
        if demo_model:
            from lib_scheduled_lora.demo.layout import IMAGE_SIZE

            if value != IMAGE_SIZE:
                raise OptionError(
                    option, f"the demo model draws {IMAGE_SIZE}x{IMAGE_SIZE} images only (got {value}); leave it out"
                )
        elif value < options.MIN_IMAGE_SIDE:
            raise OptionError(option, f"{value} is too small for a Stable Diffusion model (at least {options.MIN_IMAGE_SIDE})")


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import show_progress
    from lib_scheduled_lora.core.library import NetworkLibrary
    from lib_scheduled_lora.core.staging import check_output
    from lib_scheduled_lora.errors import OptionError, OutputPathError
    from lib_scheduled_lora.hosts.runner import (
        GenerationRequest,
        check_model,
        generate,
        load_pipeline,
        scheduled_networks,
    )

    check_output(args.output, OutputPathError, create_parents=True)
    if args.model == "demo":  # the word names the built-in model, as in `merge demo`; ./demo is a path
        args.model = None
    demo_model = args.model is None or _is_demo_folder(args.model)
    _check_size(args, demo_model)
    if args.model is not None and not demo_model:
        check_model(args.model, args.config)
    for folder in args.lora_dir:
        if not Path(folder).is_dir():
            raise OptionError("--lora-dir", f"{folder!r} is not a folder")
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
    from lib_scheduled_lora.demo.layout import NETWORKS_DIR

    default_dirs = [str(NETWORKS_DIR)] if args.model is None else []
    library = NetworkLibrary.scan(list(args.lora_dir) or default_dirs)
    scheduled_networks(request.prompt, library)  # every tag and network file, before the model loads
    if demo_model:
        from lib_scheduled_lora.demo import model as demo  # imports diffusers: after the cheap checks

        if args.model is None:
            pipe, label = demo.load_demo_pipeline(), "built-in demo model"
        else:
            pipe, label = demo.load_demo_pipeline(directory=args.model), Path(args.model).name
    else:
        pipe, label = load_pipeline(args.model, args.config)
    result = generate(pipe, request, library, model_label=label, progress=show_progress(args.quiet))
    out = Path(args.output)
    result.save(out)
    print(f"model: {result.model_label}")
    for name, values in result.unet_multipliers.items():
        shown = ", ".join(f"{v:g}" for v in values)
        print(f"{name}: unet multipliers per evaluation [{shown}]")
    print(f"sampler: {LABELS[args.sampler]}, steps: {args.steps}, seed: {args.seed}")
    print(f"wrote {out}")
    return 0


def _is_demo_folder(model: str) -> bool:
    from lib_scheduled_lora.demo.layout import is_demo_folder

    return is_demo_folder(model)
