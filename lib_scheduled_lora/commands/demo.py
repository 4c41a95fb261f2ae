"""``python -m lib_scheduled_lora demo``: the built-in demo model, one labelled grid PNG.

Rows: prompts inside the concept network's training bias ("a wday": always black) and outside
it ("a white wday"), for a few seeds. Columns: the base model, the network at 1, a strength
sweep, and schedules that leave the first steps (composition, colour) to the base model.
Under each cell: its colour fidelity (``col``: 1 = the colour the prompt asks for, or black
when it names none) and concept fidelity (``wday``: 1 = the trained checker texture).
Runs offline in seconds on a CPU; the networks are the shipped ones (``demo/networks``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

DEFAULT_PROMPTS = ("a wday", "a white wday")
# (column label, schedule written into the tag; None = no tag)
DEFAULT_COLUMNS = (
    ("base model", None),
    ("network at 1", "1"),
    ("1.5", "1.5"),
    ("2", "2"),
    ("3", "3"),
    ("step at 0.3", "0@0.3:1"),
    ("step at 0.3 to 2", "0@0.3:2"),
    ("step at 0.3 to 3", "0@0.3:3"),
    ("ramp to 2", "0@0,2@1"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo.png", help="PNG to write (default: demo.png)")
    parser.add_argument(
        "--network",
        default="wday_locon",
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
        help="a column's schedule, repeatable (default: base, 1, 1.5, 2, 3, 0@0.3:1, 0@0.3:2, 0@0.3:3, 0@0,2@1)",
    )
    parser.add_argument("--seeds", type=int, default=2, help="rows per prompt, seeds SEED.. (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default: 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--scale", type=int, default=4, help="pixel upscale of each 32x32 cell (default: 4)")


def _requested_colour(prompt: str) -> str:
    from lib_scheduled_lora.demo import world

    words = prompt.lower().split()
    return next((w for w in words if w in world.COLOURS), world.CONCEPT_COLOUR)


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_scheduled_lora.core.engine import EngineSettings
    from lib_scheduled_lora.core.library import NetworkLibrary, strip_network_tags
    from lib_scheduled_lora.demo import metrics
    from lib_scheduled_lora.demo import model as demo
    from lib_scheduled_lora.demo.grid import labelled_grid
    from lib_scheduled_lora.hosts.diffusers import attach
    from lib_scheduled_lora.hosts.runner import scheduled_networks

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    prompts = list(args.prompts or DEFAULT_PROMPTS)
    if args.schedules:
        columns = [("base model", None) if s in ("base", "none") else (s, s) for s in args.schedules]
    else:
        columns = list(DEFAULT_COLUMNS)
    pipe = demo.load_demo_pipeline("cpu")
    library = NetworkLibrary.scan([demo.NETWORKS_DIR])
    rows = [(p, args.seed + i) for p in prompts for i in range(args.seeds)]
    texts = [strip_network_tags(p) for p, _ in rows]
    cells: list[list[Any]] = [[None] * len(columns) for _ in rows]
    notes = [[""] * len(columns) for _ in rows]
    labels = []
    for c, (label, schedule) in enumerate(columns):
        tag = f"<lora:{args.network}:{schedule}>" if schedule is not None else ""
        labels.append(f"{label} {tag}".strip() if label != schedule else tag)
        networks = scheduled_networks(tag, library)  # the project's own tag parsing and loading
        generators = [torch.Generator().manual_seed(seed) for _, seed in rows]
        with attach(pipe, networks, EngineSettings()):
            out = pipe(texts, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=generators)
        for r, ((prompt, _), image) in enumerate(zip(rows, out.images)):
            cells[r][c] = image
            colour = _requested_colour(prompt)
            notes[r][c] = (
                f"col {metrics.attribute_fidelity(image, colour):.2f} "
                f"wday {metrics.concept_fidelity(image):.2f}"
            )
    row_labels = [f"{p}  (seed {s})" for p, s in rows]
    title = (
        f"scheduled LoRA demo: {args.network}, {args.steps} DDIM steps, cfg {args.cfg:g}; "
        "col = colour fidelity, wday = concept fidelity"
    )
    grid = labelled_grid(cells, labels, row_labels, scale=args.scale, title=title, cell_labels=notes)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(rows)} rows x {len(columns)} columns, {time.perf_counter() - start:.1f}s)")
    for r, (prompt, seed) in enumerate(rows):
        print(
            f"  {prompt!r} seed {seed}: "
            + " | ".join(f"{labels[c]}: {notes[r][c]}" for c in range(len(columns)))
        )
    return 0
