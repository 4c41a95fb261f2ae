"""``python -m lib_scheduled_lora merge MODEL --lora FILE[:W] ... -o OUT``: bake networks into a model.

MODEL is a diffusers folder, a single-file ldm/sgm ``.safetensors`` checkpoint, or ``demo`` (the
built-in demo model; its shipped networks can then be named without a path: ``--lora
wday_locon:2``); OUT gets the same layout (a merged demo folder is a ``generate --model``). Each
network is added at its constant strength W (default 1).

Order of the checks: the output path, every network file (readable, finite), the model's
headers and the networks against them; then the weights are read and written. An interrupted
merge leaves nothing (Ctrl-C, SIGTERM) or a staging entry that the next run removes (SIGKILL):
see :mod:`lib_scheduled_lora.core.staging`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib_scheduled_lora.commands import options

DEMO = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        type=options.path,
        metavar="MODEL",
        help=f"diffusers model folder, single-file .safetensors checkpoint, or '{DEMO}' (the built-in "
        f"demo model; ./{DEMO} for a folder of that name)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=options.path,
        dest="loras",
        required=True,
        metavar="FILE[:W]",
        help="network file and its strength (default 1); repeatable. With the demo model, a shipped "
        "network's name works too (wday, wday_locon, wday_loha)",
    )
    parser.add_argument(
        "-o", "--output", type=options.path, required=True, metavar="OUT", help="where to write the merged model"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--strict", action="store_true", help="fail when any layer of a network matches nothing in the model"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    parser.add_argument(
        "--dtype", choices=("keep", "fp16", "bf16", "fp32"), default="keep",
        help="tensor type of the output's floating-point weights (default: each keeps its own)",
    )


def _demo_network(spec: tuple[str, float]) -> tuple[str, float]:
    """A shipped demo network named without a path (``wday_locon``) -> its file; anything else as is."""
    from lib_scheduled_lora.core.library import NetworkLibrary
    from lib_scheduled_lora.demo import layout as demo

    name, weight = spec
    if Path(name).exists() or Path(name).name != name:
        return spec
    library = NetworkLibrary.scan([demo.NETWORKS_DIR])  # a name, looked up in the index, never joined
    found = library.files.get(name)
    return (str(found), weight) if found is not None else spec


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import show_progress, terminal_progress
    from lib_scheduled_lora.commands.rank_options import tool_name
    from lib_scheduled_lora.core.bake import OUTPUT_DTYPES
    from lib_scheduled_lora.core.merge import check_merge_output, load_networks, merge_model, parse_lora_spec
    from lib_scheduled_lora.core.network_writer import baked_metadata, source_records

    components = None
    model = args.model
    if model == DEMO:
        from lib_scheduled_lora.demo import layout as demo

        model, components = str(demo.WEIGHTS_DIR), {c: list(f) for c, f in demo.WEIGHT_FILES.items()}
    specs = [parse_lora_spec(spec) for spec in args.loras]
    if components is not None:
        specs = [_demo_network(spec) for spec in specs]
    if Path(model).exists():
        check_merge_output(model, args.output, force=args.force)  # before reading anything large
    networks = load_networks(specs)  # fail on a bad network before reading a large model
    records = source_records([(p, w, "network") for p, w in specs])
    metadata = baked_metadata(records, dtype=args.dtype, tool=tool_name())
    with terminal_progress("merging", unit="layer", enabled=show_progress(args.quiet)) as progress:
        result = merge_model(
            model,
            networks,
            args.output,
            force=args.force,
            strict=args.strict,
            progress=progress,
            components=components,
            dtype=OUTPUT_DTYPES[args.dtype],
            metadata=metadata,
        )
    report = result.report
    for net in report.networks:
        warning = net.warning()
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{net.name} at {net.weight:g}: {net.matched} layer(s) merged, {len(net.unmatched)} unmatched")
    print(
        f"wrote {result.output} ({report.family}, {report.layout} layout): "
        f"{len(result.changed)} tensor(s) changed in {len(result.files_written)} file(s)"
    )
    return 0
