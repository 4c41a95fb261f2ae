"""``python -m lib_scheduled_lora demo``: the built-in demo model, one labelled grid PNG.

Rows: prompts outside the concept network's training bias (the wday was always black; "a white
wday", "a red wday"), for a few seeds. Columns: the base model, the network at constant
strengths, and schedules that leave the first steps (composition, colour) to the base model.
Under each cell: the subject's colour (and whether it is the one the prompt asks for) and the
strength of the concept's checker texture (1 = as trained); cells with both the asked colour and
the checker are framed, each column counts them, and the line under the title says which setting
got them most often with these seeds. Runs offline in seconds on a CPU; the networks are the
shipped ones (``demo/networks``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from lib_scheduled_lora.commands import options

# Outside the training bias: where a constant strength has to trade colour for texture. Four seeds
# each: with two, no setting got both in these images (8 seeds: 6/16 for "step at 0.3 to 3" against
# at most 3/16 for a constant); the measured rates over 32 images are in bench/results/demo_claim.md.
DEFAULT_PROMPTS = ("a white wday", "a red wday")
DEFAULT_SEEDS = 4
# (column label, schedule written into the tag; None = no tag)
DEFAULT_COLUMNS = (
    ("base model", None),
    ("constant 1", "1"),
    ("constant 1.5", "1.5"),
    ("constant 2", "2"),
    ("constant 3", "3"),
    ("step at 0.3 to 1", "0@0.3:1"),
    ("step at 0.3 to 2", "0@0.3:2"),
    ("step at 0.3 to 3", "0@0.3:3"),
    ("ramp 0 to 2", "0@0,2@1"),
)
NETWORK_KINDS = {"wday": "LoRA", "wday_locon": "LoCon", "wday_loha": "LoHa"}
MAX_SEEDS = 64  # rows per prompt: a grid taller than this is no longer a picture anyone reads
MAX_SCALE = 32  # 32x32 cells upscaled to at most 1024 pixels
MAX_THREADS = 1024


@dataclass(frozen=True)
class Column:
    label: str
    schedule: str | None  # None: the base model
    constant: bool  # a constant strength (or the base model), as opposed to a schedule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=options.path, default="demo.png", help="PNG to write (default: demo.png)")
    parser.add_argument(
        "--network",
        default="wday_locon",
        choices=sorted(NETWORK_KINDS),
        help="shipped demo network: wday (LoRA), wday_locon or wday_loha (default: wday_locon, the clearest)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help=f"a row prompt, repeatable (default: {' / '.join(DEFAULT_PROMPTS)})",
    )
    parser.add_argument(
        "--schedule",
        action="append",
        dest="schedules",
        metavar="SCHED",
        help="a column's schedule, repeatable; 'base' for the model without the network "
        "(default: base, 1, 1.5, 2, 3, 0@0.3:1, 0@0.3:2, 0@0.3:3, 0@0,2@1)",
    )
    parser.add_argument(
        "--seeds",
        type=options.integer(1, MAX_SEEDS),
        default=DEFAULT_SEEDS,
        help=f"rows per prompt, 1-{MAX_SEEDS} (default: {DEFAULT_SEEDS})",
    )
    parser.add_argument("--seed", type=options.seed, default=0, help="first seed (default: 0)")
    parser.add_argument("--steps", type=options.steps, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--cfg", type=options.cfg, default=3.0, help="guidance scale (default: 3)")
    parser.add_argument(
        "--threads", type=options.integer(0, MAX_THREADS), default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--scale", type=options.integer(1, MAX_SCALE), default=4, help=f"pixel upscale of each 32x32 cell, 1-{MAX_SCALE} (default: 4)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (shown only on a terminal anyway)")


def _columns(schedules: list[str] | None) -> list[Column]:
    from lib_scheduled_lora.core.schedule import parse_schedule

    if not schedules:
        return [Column(label, s, s is None or parse_schedule(s).is_constant) for label, s in DEFAULT_COLUMNS]
    columns = []
    for text in schedules:
        if text.strip() in ("base", "none"):
            columns.append(Column("base model", None, True))
        else:
            constant = parse_schedule(text.split(":")[0]).is_constant and ":" not in text
            columns.append(Column(f"constant {text}" if constant else text, text, constant))
    return columns


def _asked_colour(prompt: str) -> str | None:
    from lib_scheduled_lora.demo import world

    return next((w for w in prompt.lower().split() if w in world.COLOURS), None)


def _cell_lines(m: Any) -> list[str]:
    if not m.subject_found:
        return ["no subject found", "(metrics n/a)"]
    checker = "checker n/a" if m.checker is None else f"checker {m.checker:.2f}"
    if m.asked is None:  # the prompt names no colour: only the texture is in question
        return [checker]
    colour = f"{m.colour}, as asked" if m.colour_hit else f"{m.colour}, not {m.asked}"
    return [colour, checker]


def _takeaway(columns: list[Column], hits: list[int], asked_rows: int) -> str:
    images = f"{asked_rows} image{'s' if asked_rows != 1 else ''}"
    if asked_rows == 0:
        return "No prompt asks for a colour, so no cell is marked (add e.g. --prompt 'a white wday')."
    best = max(range(len(columns)), key=lambda c: hits[c])
    if hits[best] == 0:
        return (
            f"No setting gave the asked colour with the checker in these {images}; "
            "try more seeds (--seeds 8)."
        )
    constants = [c for c in range(len(columns)) if columns[c].constant]
    best_constant = max(constants, key=lambda c: hits[c]) if constants else None
    text = (
        f"Takeaway (these {images}): '{columns[best].label}' gives the asked colour with the "
        f"checker in {hits[best]}/{asked_rows}"
    )
    if best_constant is not None and best_constant != best:
        text += f", the best constant strength ('{columns[best_constant].label}') in {hits[best_constant]}/{asked_rows}"
    return text + "."


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.core.staging import check_output
    from lib_scheduled_lora.errors import OptionError, OutputPathError

    # Everything that can be wrong is checked before the first image: the output path, the seed
    # range, every column's tag (syntax, network file).
    check_output(args.out, OutputPathError, create_parents=True)
    if args.seed + args.seeds - 1 > options.MAX_SEED:
        raise OptionError("--seed", f"{args.seed} + {args.seeds} seeds goes past the largest seed (2**64-1)")
    prompts = list(args.prompts or DEFAULT_PROMPTS)
    columns = _columns(args.schedules)

    from lib_scheduled_lora.core.library import NetworkLibrary, strip_network_tags
    from lib_scheduled_lora.demo.layout import NETWORKS_DIR
    from lib_scheduled_lora.hosts.runner import scheduled_networks

    library = NetworkLibrary.scan([NETWORKS_DIR])
    tags = [f"<lora:{args.network}:{c.schedule}>" if c.schedule is not None else "" for c in columns]
    column_networks = [scheduled_networks(tag, library) for tag in tags]  # the project's own parsing
    for prompt in prompts:
        scheduled_networks(prompt, library)  # a tag in a row prompt is checked too

    import torch

    from lib_scheduled_lora.commands.progress import show_progress, terminal_progress
    from lib_scheduled_lora.core.engine import EngineSettings
    from lib_scheduled_lora.core.staging import staged_file
    from lib_scheduled_lora.demo import metrics
    from lib_scheduled_lora.demo import model as demo
    from lib_scheduled_lora.demo.grid import GridText, labelled_grid
    from lib_scheduled_lora.hosts.diffusers import attach

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = demo.load_demo_pipeline("cpu")
    for prompt in prompts:
        words = pipe.tokenizer.tokenize(strip_network_tags(prompt))
        unknown = sorted({w for w in words if w not in pipe.tokenizer.vocab})
        if unknown:
            print(f"warning: the demo model does not know {', '.join(map(repr, unknown))} (in {prompt!r})", file=sys.stderr)
    rows = [(p, args.seed + i) for p in prompts for i in range(args.seeds)]
    texts = [strip_network_tags(p) for p, _ in rows]
    cells: list[list[Any]] = [[None] * len(columns) for _ in rows]
    described: list[list[Any]] = [[None] * len(columns) for _ in rows]
    with terminal_progress("demo", unit="column", enabled=show_progress(args.quiet)) as progress:
        for c, networks in enumerate(column_networks):
            generators = [torch.Generator().manual_seed(seed) for _, seed in rows]
            with attach(pipe, networks, EngineSettings()):
                out = pipe(texts, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=generators)
            for r, ((prompt, _), image) in enumerate(zip(rows, out.images)):
                cells[r][c] = image
                described[r][c] = metrics.describe(image, _asked_colour(prompt))
            if progress is not None:
                progress("", c + 1, len(columns))

    asked_rows = sum(1 for prompt, _ in rows if _asked_colour(prompt))
    hits = [sum(described[r][c].both for r in range(len(rows))) for c in range(len(columns))]
    kind = NETWORK_KINDS[args.network]
    text = GridText(
        title=f"Scheduled LoRA demo: the {kind} network '{args.network}' on the built-in model "
        f"({args.steps} DDIM steps, guidance {args.cfg:g})",
        takeaway=_takeaway(columns, hits, asked_rows),
        subtitle=[
            "The network was trained only on black checkered squares ('wday'). Can it draw the checker on "
            "another colour? Columns: the base model, constant strengths, then schedules: '0@0.3:2' = the base "
            "model for the first 30 % of the steps (composition, colour), then the network at 2."
        ],
        column_labels=[f"{c.label}  {tag}".strip() if c.schedule is not None else c.label for c, tag in zip(columns, tags)],
        row_labels=[f"{p}  (seed {s})" for p, s in rows],
        cell_labels=[[_cell_lines(m) for m in row] for row in described],
        marked=[[m.both for m in row] for row in described],
        column_notes=[f"asked colour + checker: {h}/{asked_rows}" for h in hits] if asked_rows else None,
        legend=[
            "Under each image: the subject's colour (the nearest of the world's 8 colours; 'as asked' when the "
            "prompt names it) and 'checker': how strongly the trained 2-pixel checker shows on the subject, "
            "1 = as in the training images (more is possible; the base model reads about 0.03).",
            f"Green frame: the asked colour and checker >= {metrics.CHECKER_SEEN:g} together. A constant strength "
            "trades one for the other (more strength brings the checker but turns the subject black); a schedule "
            "leaves the first steps, where the colour is decided, to the base model.",
            "'no subject found': the subject has the background's colour, so neither metric can be measured; "
            "'checker n/a': the subject is too small or too close to the background's colour to measure it. "
            "A few seeds are a glimpse: rates over 32 images per setting are in bench/results/demo_claim.md.",
        ],
    )
    grid = labelled_grid(cells, text, scale=args.scale)
    with staged_file(args.out, OutputPathError, create_parents=True) as tmp:
        grid.save(tmp, format="PNG")
    print(f"wrote {args.out} ({len(rows)} rows x {len(columns)} columns, {time.perf_counter() - start:.1f}s)")
    print(text.takeaway)
    for r, (prompt, seed) in enumerate(rows):
        print(
            f"  {prompt!r} seed {seed}: "
            + " | ".join(f"{columns[c].label}: {', '.join(_cell_lines(described[r][c]))}" for c in range(len(columns)))
        )
    return 0
