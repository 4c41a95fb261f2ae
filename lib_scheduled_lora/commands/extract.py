"""``extract BASE TUNED -o OUT.safetensors --rank N [--conv-rank N]``: a LoRA from a fine-tune.

BASE and TUNED are models as ``merge`` takes them (a diffusers folder or a single-file
``.safetensors`` checkpoint; the two may differ in layout). Layer by layer: TUNED − BASE, cut by
the rank rule (``--sv-*`` rules cap at ``--rank``). k×k convolutions are extracted only with
``--conv-rank`` (LoCon).
"""

from __future__ import annotations

import argparse
import sys

from lib_scheduled_lora.commands.rank_options import (
    _number,
    add_output_arguments,
    add_rank_arguments,
    check_output,
    rank_rule,
    write_made_network,
)
from lib_scheduled_lora.errors import RankRuleError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the base model")
    parser.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    add_output_arguments(parser)
    add_rank_arguments(parser, what="the extracted LoRA")
    parser.add_argument(
        "--min-diff", type=_number, default=0.0, metavar="X",
        help="treat layers whose largest change is at most X as unchanged (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.commands.progress import terminal_progress
    from lib_scheduled_lora.core.extract import extract_lora
    from lib_scheduled_lora.core.model_reader import ModelReader
    from lib_scheduled_lora.core.network_writer import source_records

    rule = rank_rule(args)
    if rule is None or rule.rank is None:
        raise RankRuleError("extract", "needs --rank N (the largest rank with an --sv-* rule)")
    output = check_output(args.output, args.force)
    with ModelReader(args.base) as base, ModelReader(args.tuned) as tuned:
        with terminal_progress("extracting", unit="layer", enabled=not args.quiet) as progress:
            extracted = extract_lora(base, tuned, rule, min_diff=args.min_diff, device=args.device, progress=progress)
        family = base.index.family
    if not extracted.layers:
        raise RankRuleError("extract", f"{args.tuned} does not differ from {args.base} in any LoRA layer")
    files = [(p, None, role) for p, role in ((args.base, "base"), (args.tuned, "tuned"))]
    records = source_records([f for f in files if not _is_folder(f[0])])
    extra = {"unchanged_layers": extracted.unchanged, "not_extracted": len(extracted.not_extracted)}
    write_made_network("extract", extracted, args, output, records, family=family, extra=extra)
    if extracted.not_extracted:
        print(
            f"note: {len(extracted.not_extracted)} changed weight(s) are not LoRA layers and were left out "
            f"(first: {extracted.not_extracted[0]})" + ("" if rule.conv_rank else "; --conv-rank adds k×k convolutions"),
            file=sys.stderr,
        )
    print(f"wrote {output} ({rule.describe()}, {args.dtype}; {extracted.unchanged} layer(s) unchanged)")
    return 0


def _is_folder(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_dir()
