"""``resize NET.safetensors -o OUT.safetensors --rank N | --sv-ratio R | --sv-fro F | --sv-cumulative F``:
one network at a lower rank (or at the rank a kept-energy rule picks per layer), as a LoRA/LoCon.

The same SVD as ``merge-networks`` with one input at strength 1, so any kind can be resized into
a LoRA (``--model BASE`` where the kind needs the base model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lib_scheduled_lora.commands.rank_options import (
    add_output_arguments,
    add_rank_arguments,
    check_output,
    networks_family,
    open_model,
    rank_rule,
    write_made_network,
)
from lib_scheduled_lora.errors import RankRuleError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("network", metavar="NET.safetensors", help="the network file to resize")
    add_output_arguments(parser)
    add_rank_arguments(parser, what="the output")
    parser.add_argument("--model", metavar="BASE", help="base model, for kinds whose ΔW needs it (IA3, DoRA, LoHa/LoKr convs)")


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.core.network_merge import merge_into_one
    from lib_scheduled_lora.core.network_writer import source_records
    from lib_scheduled_lora.core.networks.loader import load_network

    rule = rank_rule(args)
    if rule is None:
        raise RankRuleError("resize", "needs --rank N or one of --sv-ratio, --sv-fro, --sv-cumulative")
    output = check_output(args.output, args.force)
    network = load_network(args.network)
    with open_model(args.model) as model, terminal_progress("resizing", unit="layer", enabled=not args.quiet) as progress:
        merged = merge_into_one([(network, 1.0)], rule, model=model, device=args.device, progress=progress)
        family = model.index.family if model is not None else networks_family([(network, 1.0)])
    old = sorted({m.rank for m in network.modules.values() if m.rank is not None})
    extra = {"input_ranks": old, **({"base_model": Path(args.model).name} if args.model else {})}
    records = source_records([(args.network, 1.0, "network")])
    write_made_network("resize", merged, args, output, records, family=family, extra=extra)
    print(f"wrote {output} ({rule.describe()}, {args.dtype})")
    return 0
