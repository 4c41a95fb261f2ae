"""``inspect FILE``: what a network file holds (algorithm, rank, alpha per kind of layer, base model).

A file that cannot be read, or holds no LoRA/LyCORIS keys, raises NetworkFileError: the dispatcher
prints it as one ``error: FILE: problem`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from lib_scheduled_lora.commands import options
from lib_scheduled_lora.errors import path_text

MAX_UNRECOGNISED_SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=options.path, help="a LoRA / LyCORIS / diffusers-PEFT .safetensors file")
    parser.add_argument("--modules", action="store_true", help="also list every module (one line each)")


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _rank_text(info) -> str:
    return "-" if info.rank is None else str(info.rank)


def _alpha_text(info) -> str:
    # No alpha means alpha = rank (scale 1); IA3 / full / norm / unfactorised LoKr use no alpha at all.
    if info.rank is None:
        return "-"
    return "=rank" if info.alpha is None else _number(info.alpha)


def _joined(texts) -> str:
    """Distinct values, numbers in numeric order: '4' or '4, 8'."""
    def order(text):
        try:
            return (0, float(text), text)
        except ValueError:
            return (1, 0.0, text)

    return ", ".join(sorted(set(texts), key=order))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_report(network, show_modules: bool = False) -> str:
    from lib_scheduled_lora.core.networks.describe import describe_module
    from lib_scheduled_lora.core.networks.family import guess_family

    infos = [describe_module(key, module) for key, module in network.modules.items()]
    family = guess_family(network.modules, network.metadata)
    lines = [f"file: {network.path}"]
    lines.append(f"base model: {family.label} ({'; '.join(family.reasons)})")

    counts: dict[str, int] = {}
    for info in infos:
        counts[info.component] = counts.get(info.component, 0) + 1
    parts = [f"UNet {counts.get('unet', 0)}", f"text encoder {counts.get('text-encoder', 0)}"]
    parts += [f"{name} {n}" for name, n in counts.items() if name not in ("unet", "text-encoder")]
    te_prefixes = sorted({info.key.split("_")[1] for info in infos if info.component == "text-encoder"})
    te_note = f" [{', '.join(te_prefixes)}]" if len(te_prefixes) > 1 else ""
    lines.append(f"modules: {len(infos)} ({', '.join(parts)}{te_note})")

    groups: dict[str, list] = {}
    for info in infos:
        groups.setdefault(info.kind, []).append(info)
    rows: list[tuple[str, ...]] = [("layer kind", "modules", "algorithm", "rank", "alpha", "dora")]
    for kind in sorted(groups, key=lambda k: (k.startswith("text-encoder"), k)):
        members = groups[kind]
        algorithms = sorted({i.label for i in members})
        dora = {i.dora for i in members}
        rows.append((
            kind,
            str(len(members)),
            ", ".join(algorithms),
            _joined(_rank_text(i) for i in members),
            _joined(_alpha_text(i) for i in members),
            "yes" if dora == {True} else "no" if dora == {False} else "some",
        ))
    lines += ["", *_table(rows)]

    if show_modules:
        rows = [("module", "algorithm", "rank", "alpha", "dora")]
        for info in sorted(infos, key=lambda i: i.key):
            rows.append((
                info.key,
                info.label,
                _rank_text(info),
                _alpha_text(info),
                "yes" if info.dora else "no",
            ))
        lines += ["", *_table(rows)]

    if network.non_finite_keys:
        keys = network.non_finite_keys
        lines += ["", f"NaN or infinite values in {len(keys)} tensor(s) (merge and generate refuse this file):"]
        lines += [f"  {key}" for key in keys[:MAX_UNRECOGNISED_SHOWN]]
        if len(keys) > MAX_UNRECOGNISED_SHOWN:
            lines.append(f"  ... and {len(keys) - MAX_UNRECOGNISED_SHOWN} more")
    else:
        lines += ["", "values: all finite"]

    unrecognised = network.unrecognised_keys
    if unrecognised:
        lines += ["", f"unrecognised keys ({len(unrecognised)}, not applied):"]
        lines += [f"  {key}" for key in unrecognised[:MAX_UNRECOGNISED_SHOWN]]
        if len(unrecognised) > MAX_UNRECOGNISED_SHOWN:
            lines.append(f"  ... and {len(unrecognised) - MAX_UNRECOGNISED_SHOWN} more")
    else:
        lines += ["", "unrecognised keys: none"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lib_scheduled_lora.core.networks.loader import load_network

    network = load_network(args.file, allow_non_finite=True)  # described, and flagged below
    print(format_report(network, show_modules=args.modules))
    if network.non_finite_keys:
        print(
            f"warning: {path_text(network.path)}: {len(network.non_finite_keys)} tensor(s) hold NaN or "
            f"infinite values (first: {network.non_finite_keys[0]}); merge and generate refuse this file",
            file=sys.stderr,
        )
    return 0
