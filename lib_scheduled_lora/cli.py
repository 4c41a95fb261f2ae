"""``python -m lib_scheduled_lora COMMAND ...``: one subcommand per module in ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import sys

from lib_scheduled_lora.errors import ScheduledLoraError

# name -> (module, one-line help). Command modules import heavy packages (torch, diffusers) inside
# run(), so that building the parser and `schedule` stay fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lib_scheduled_lora.commands.demo", "run the built-in demo model and write a labelled grid PNG"),
    "schedule": ("lib_scheduled_lora.commands.schedule", "print the multiplier of every step for a tag or schedule"),
    "inspect": ("lib_scheduled_lora.commands.inspect", "describe a network file (algorithm, rank, alpha, layers)"),
    "merge": ("lib_scheduled_lora.commands.merge", "bake networks at constant strengths into a model"),
    "generate": ("lib_scheduled_lora.commands.generate", "generate an image with scheduled networks (diffusers)"),
    "merge-networks": ("lib_scheduled_lora.commands.merge_networks", "merge several networks into one (exact or SVD)"),
    "resize": ("lib_scheduled_lora.commands.resize", "change a network's rank (SVD, kohya's rank rules)"),
    "sweep": ("lib_scheduled_lora.commands.sweep", "a labelled grid of one network's strengths and schedules, with numbers"),
    "extract": ("lib_scheduled_lora.commands.extract", "extract a LoRA from a fine-tuned model minus its base"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_scheduled_lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except ScheduledLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
