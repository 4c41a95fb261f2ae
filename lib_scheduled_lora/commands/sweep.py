"""``sweep PROMPT --strengths ... --schedules ... -o grid.png``: a labelled grid of one network's
tag changed along typed axes, and a JSON of every cell's numbers beside it.

Axes: ``--strengths`` (x) and ``--schedules`` (y) for the common question, or ``--x KIND=VALUES``
/ ``--y KIND=VALUES`` with KIND one of strength, te, unet, switch, ramp, schedule, hires. Values
as the XYZ grid writes them: ``0.25-2 (+0.25)``, ``0-0.8 [5]``, ``0.5, 1, 1.5`` (``--x``/``--y``:
CSV, ``;`` between a schedule's keyframes); ``--strengths`` / ``--schedules`` take one value or
range per argument (a schedule keeps its own commas).
``--same-mean`` rescales the schedules to each strength's mean (see ``core/sweep.py``).

The model is the built-in demo model unless ``--model`` is given (as for ``generate``); on the demo
each cell also gets the demo's colour (``col``) and concept (``wday``) fidelity. Every cell gets its
RMS distance from the image without the network (``d0``) and with it at 1 (``d1``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_scheduled_lora.hosts.samplers import SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt with the network's tag (e.g. 'a white wday <lora:wday_locon:1>')")
    parser.add_argument("--network", help="the network to sweep (default: the prompt's only network tag)")
    parser.add_argument("--strengths", nargs="+", metavar="VALUES", help="x axis: strength factors ('0.5-2 (+0.5)')")
    parser.add_argument("--schedules", nargs="+", metavar="SCHED", help="y axis: schedules ('0@0.3:1' '0@0,1@1')")
    parser.add_argument("--x", metavar="KIND=VALUES", help="x axis of any kind (instead of --strengths)")
    parser.add_argument("--y", metavar="KIND=VALUES", help="y axis of any kind (instead of --schedules)")
    parser.add_argument("--same-mean", action="store_true", help="schedules scaled to the mean strength of each column")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--model", help="diffusers folder or single-file .safetensors (default: the built-in demo model)")
    parser.add_argument("--config", help="diffusers folder whose configs describe a single-file --model (offline)")
    parser.add_argument("--lora-dir", action="append", default=[], help="folder of network files (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's; demo: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: euler (demo: ddim, as trained)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--no-numbers", action="store_true", help="skip the reference images and distances")
    parser.add_argument("-o", "--output", default="sweep.png", help="grid PNG to write (the JSON goes beside it)")


def _axis(option: str, text: str | None, default_kind: str, values: list[str] | None):
    from lib_scheduled_lora.core.sweep import Axis, SweepError

    if text is not None:
        kind, sep, rest = text.partition("=")
        if not sep:
            raise SweepError(f"--{option} {text!r}: write KIND=VALUES (e.g. strength=0.5-2 (+0.5))")
        return Axis.parse(kind.strip(), rest)
    if values:
        return Axis.parse(default_kind, values, split=False)
    return None


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.core.library import NetworkLibrary
    from lib_scheduled_lora.core.sweep import SweepError, plan_sweep, sweep_report
    from lib_scheduled_lora.hosts.runner import GenerationRequest, load_pipeline
    from lib_scheduled_lora.hosts.samplers import LABELS
    from lib_scheduled_lora.hosts.sweep_grid import save_sweep, sweep_grid
    from lib_scheduled_lora.hosts.sweep_run import run_sweep

    x = _axis("x", args.x, "strength", args.strengths)
    y = _axis("y", args.y, "schedule", args.schedules)
    if x is None:
        x, y = y, None
    if x is None:
        raise SweepError("give at least one axis (--strengths, --schedules, --x or --y)")
    plan = plan_sweep(args.prompt, x, y, network=args.network, steps=args.steps, same_mean=args.same_mean)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise SweepError(f"{output}: the grid is written as a .png")
    demo_metrics = None
    cfg = args.cfg
    if args.model is None:
        from lib_scheduled_lora.demo import model as demo

        pipe, label, default_dirs = demo.load_demo_pipeline(), "built-in demo model", [str(demo.NETWORKS_DIR)]
        demo_metrics = _demo_metrics(args.prompt)
        cfg = 3.0 if cfg is None else cfg
        sampler = args.sampler or "ddim"
    else:
        sampler = args.sampler or "euler"
        (pipe, label), default_dirs = load_pipeline(args.model, args.config), []
    library = NetworkLibrary.scan(list(args.lora_dir) or default_dirs)
    library.find(plan.network)  # a missing network fails before any generation
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg_scale=cfg,
        seed=args.seed, sampler=sampler, width=args.width, height=args.height,
    )
    with terminal_progress("sweep", unit="image") as progress:
        result = run_sweep(
            pipe, plan, request, library, model_label=label, metrics=demo_metrics,
            with_numbers=not args.no_numbers, progress=progress,
        )
    notes = [_note(n) for n in result.numbers]
    title = (
        f"{args.prompt} | {label}, {LABELS[sampler]}, {args.steps} steps, seed {args.seed}"
        + ("; d0/d1 = RMS distance from no network / the network at 1" if not args.no_numbers else "")
        + ("; col = colour, wday = concept fidelity" if demo_metrics else "")
    )
    grid = sweep_grid(plan, result.images, cell_notes=notes, title=title)
    settings = {"model": label, "sampler": LABELS[sampler], "seed": args.seed, "cfg": cfg}
    report = sweep_report(plan, numbers=result.numbers, infotexts=result.infotexts, settings=settings)
    png, json_path = save_sweep(grid, output, report, infotext=result.infotexts[0])
    print(f"wrote {png} ({plan.rows} x {plan.columns} cells) and {json_path}")
    for cell, numbers in zip(plan.cells, result.numbers):
        shown = ", ".join(f"{k} {v:.3f}" for k, v in numbers.items())
        print(f"  {cell.label:<28} {shown}")
    return 0


SHORT = {"from no network": "d0", "from full strength": "d1", "colour": "col", "concept": "wday"}


def _note(numbers: dict[str, float]) -> str:
    return " ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in numbers.items())


def _demo_metrics(prompt: str):
    from lib_scheduled_lora.demo import metrics, world

    words = prompt.lower().replace("<", " ").split()
    colour = next((w for w in words if w in world.COLOURS), world.CONCEPT_COLOUR)

    def measure(image, cell) -> dict[str, float]:
        return {
            "colour": round(metrics.attribute_fidelity(image, colour), 4),
            "concept": round(metrics.concept_fidelity(image), 4),
        }

    return measure
