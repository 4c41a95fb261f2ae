"""What ``merge-networks``, ``resize`` and ``extract`` share: the rank rule, the output dtype, the
device, the base model, and writing the result with its metadata and report. Numbers are read
with the one number grammar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib_scheduled_lora.core.lowrank import RankRule
from lib_scheduled_lora.core.numbers import NumberSyntaxError, read_number
from lib_scheduled_lora.errors import RankRuleError

SV_OPTIONS = ("sv_ratio", "sv_fro", "sv_cumulative")


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return read_number(text)
    except NumberSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_rank_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    group = parser.add_argument_group("rank rule")
    group.add_argument("--rank", type=_count, help=f"rank of {what} (with an --sv-* rule: the largest rank)")
    group.add_argument(
        "--conv-rank", type=_count, help="the same for 3x3 (k×k) convolutions (default: --rank)"
    )
    rules = group.add_mutually_exclusive_group()
    rules.add_argument("--sv-ratio", type=_number, metavar="R", help="keep singular values above σ₁ / R (kohya's sv_ratio)")
    rules.add_argument("--sv-fro", type=_number, metavar="F", help="keep the fewest components holding F of the Frobenius norm (0-1)")
    rules.add_argument("--sv-cumulative", type=_number, metavar="F", help="keep the fewest components holding F of Σσ (0-1)")
    parser.add_argument("--device", default=None, help="where the SVD runs (default: cuda when there is one, else cpu)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="the network file to write")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="tensor type of the output (default fp16)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--layers", action="store_true", help="print every layer's rank and kept energy")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def rank_rule(args: argparse.Namespace) -> RankRule | None:
    """The rule the options give, or None when none is given (an exact merge)."""
    for method in SV_OPTIONS:
        value = getattr(args, method, None)
        if value is not None:
            return RankRule(method, args.rank, args.conv_rank, value)
    if args.rank is not None:
        return RankRule("rank", args.rank, args.conv_rank)
    if args.conv_rank is not None:
        raise RankRuleError("--conv-rank", "needs --rank (or an --sv-* rule) as well")
    return None


def check_output(path: str, force: bool) -> Path:
    """Refuse a bad output before any work (the writer checks again when it renames)."""
    from lib_scheduled_lora.errors import NetworkFileError

    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise NetworkFileError(out, "the output must be a .safetensors file")
    if out.exists() and not force:
        raise NetworkFileError(out, "already exists; refusing to overwrite it (use --force to replace it)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise NetworkFileError(out, f"folder {str(folder)!r} does not exist")
    return out


def print_report(merged, *, layers: bool) -> None:
    """The per-layer table (``--layers``) and a one-line summary; what was left out on stderr."""
    from lib_scheduled_lora.core.network_merge import report_lines, warning_lines

    print("\n".join(report_lines(merged, layers=layers)))
    for line in warning_lines(merged):
        print(f"warning: {line}", file=sys.stderr)


def tool_name() -> str:
    import lib_scheduled_lora

    return f"sd-webui-scheduled-lora {lib_scheduled_lora.__version__}"


def write_made_network(
    command: str,
    made: Any,
    args: argparse.Namespace,
    output: Path,
    records: list,
    *,
    family: str | None,
    extra: dict | None,
) -> None:
    """Write a network a command made (``--dtype``, ``--force``), with metadata saying how it was
    made, then print its report (``--layers``)."""
    from lib_scheduled_lora.core.network_writer import NETWORK_DTYPES, made_metadata, write_network

    metadata = made_metadata(command, made, records, family=family, extra=extra, tool=tool_name())
    write_network(made, output, metadata, dtype=NETWORK_DTYPES[args.dtype], force=args.force)
    print_report(made, layers=args.layers)


def networks_family(networks: Sequence[tuple[Any, float]]) -> str | None:
    """The model family all ``(network, weight)`` pairs are for, or None when they disagree."""
    from lib_scheduled_lora.core.networks.family import guess_family

    families = {guess_family(n.modules, n.metadata).family for n, _ in networks}
    return families.pop() if len(families) == 1 else None


def open_model(path: str | None) -> Any:
    """The base model (``--model``) opened for reading, or a context holding None."""
    from lib_scheduled_lora.core.model_reader import ModelReader

    return ModelReader(path) if path else contextlib.nullcontext(None)
