"""``merge-networks A.safetensors[:W] B.safetensors[:W] ... -o OUT.safetensors``: several networks
at chosen strengths -> one kohya-format LoRA/LoCon file.

Exact (ranks concatenated) when every input is LoRA/LoCon and no rank rule is given; otherwise
through ΔW and SVD with ``--rank N`` or an ``--sv-*`` rule (any kind of network: LoHa, LoKr,
DoRA, IA3, full). ``--model BASE`` gives the base model where a kind needs it (IA3 and DoRA
depend on the base weights; LoHa/LoKr conv layers do not tell their kernel).
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("networks", nargs="+", metavar="FILE[:W]", help="network files and their strengths (default 1)")
    add_output_arguments(parser)
    add_rank_arguments(parser, what="the merged network")
    parser.add_argument("--model", metavar="BASE", help="base model (diffusers folder or .safetensors checkpoint)")


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.core.merge import load_networks, parse_lora_spec
    from lib_scheduled_lora.core.network_merge import merge_into_one
    from lib_scheduled_lora.core.network_writer import source_records

    rule = rank_rule(args)
    output = check_output(args.output, args.force)
    specs = [parse_lora_spec(spec) for spec in args.networks]
    networks = load_networks(specs)
    family = None
    with open_model(args.model) as model, terminal_progress("merging", unit="layer", enabled=not args.quiet) as progress:
        merged = merge_into_one(networks, rule, model=model, device=args.device, progress=progress)
        family = model.index.family if model is not None else networks_family(networks)
    records = source_records([(path, weight, "network") for path, weight in specs])
    extra = {"base_model": Path(args.model).name} if args.model else None
    write_made_network("merge-networks", merged, args, output, records, family=family, extra=extra)
    print(f"wrote {output} ({'exact' if rule is None else rule.describe()}, {args.dtype})")
    return 0

