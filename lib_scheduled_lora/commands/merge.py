"""``python -m lib_scheduled_lora merge MODEL --lora FILE[:W] ... -o OUT``: bake networks into a model.

MODEL is a diffusers folder or a single-file ldm/sgm ``.safetensors`` checkpoint; OUT gets the
same layout. Each network is added at its constant strength W (default 1).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="diffusers model folder or single-file .safetensors checkpoint"
    )
    parser.add_argument(
        "--lora",
        action="append",
        dest="loras",
        required=True,
        metavar="FILE[:W]",
        help="network file and its strength (default 1); repeatable",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write the merged model"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--strict", action="store_true", help="fail when any layer of a network matches nothing in the model"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dtype", choices=("keep", "fp16", "bf16", "fp32"), default="keep",
        help="tensor type of the output's floating-point weights (default: each keeps its own)",
    )


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.commands.rank_options import tool_name
    from lib_scheduled_lora.core.bake import OUTPUT_DTYPES
    from lib_scheduled_lora.core.merge import load_networks, merge_model, parse_lora_spec
    from lib_scheduled_lora.core.network_writer import baked_metadata, source_records

    specs = [parse_lora_spec(spec) for spec in args.loras]
    networks = load_networks(specs)  # fail on a bad network before reading a large model
    records = source_records([(p, w, "network") for p, w in specs])
    metadata = baked_metadata(records, dtype=args.dtype, tool=tool_name())
    with terminal_progress("merging", unit="layer", enabled=not args.quiet) as progress:
        result = merge_model(
            args.model, networks, args.output, force=args.force, strict=args.strict, progress=progress,
            dtype=OUTPUT_DTYPES[args.dtype], metadata=metadata,
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
