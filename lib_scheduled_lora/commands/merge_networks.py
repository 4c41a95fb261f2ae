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
    print_report,
    rank_rule,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("networks", nargs="+", metavar="FILE[:W]", help="network files and their strengths (default 1)")
    add_output_arguments(parser)
    add_rank_arguments(parser, what="the merged network")
    parser.add_argument("--model", metavar="BASE", help="base model (diffusers folder or .safetensors checkpoint)")


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.commands.rank_options import tool_name
    from lib_scheduled_lora.core.merge import load_networks, parse_lora_spec
    from lib_scheduled_lora.core.network_merge import merge_into_one
    from lib_scheduled_lora.core.network_writer import (
        NETWORK_DTYPES,
        made_metadata,
        source_records,
        write_network,
    )

    rule = rank_rule(args)
    output = check_output(args.output, args.force)
    specs = [parse_lora_spec(spec) for spec in args.networks]
    networks = load_networks(specs)
    family = None
    with _model(args.model) as model, terminal_progress("merging", unit="layer", enabled=not args.quiet) as progress:
        merged = merge_into_one(networks, rule, model=model, device=args.device, progress=progress)
        family = model.index.family if model is not None else _family(networks)
    records = source_records([(path, weight, "network") for path, weight in specs])
    extra = {"base_model": Path(args.model).name} if args.model else None
    metadata = made_metadata("merge-networks", merged, records, family=family, extra=extra, tool=tool_name())
    write_network(merged, output, metadata, dtype=NETWORK_DTYPES[args.dtype], force=args.force)
    print_report(merged, layers=args.layers)
    print(f"wrote {output} ({'exact' if rule is None else rule.describe()}, {args.dtype})")
    return 0


def _family(networks) -> str | None:
    from lib_scheduled_lora.core.networks.family import guess_family

    families = {guess_family(n.modules, n.metadata).family for n, _ in networks}
    return families.pop() if len(families) == 1 else None


def _model(path: str | None):
    """The base model opened for reading, or a context holding None."""
    import contextlib

    from lib_scheduled_lora.core.model_reader import ModelReader

    return ModelReader(path) if path else contextlib.nullcontext(None)
