"""``schedule``: print the multiplier of every step for a tag or a bare schedule.

    python -m lib_scheduled_lora schedule '<lora:wday:0@0.3:1>' --steps 20 [--hr-steps 10] [--json]
    python -m lib_scheduled_lora schedule '0@0.3:1' --steps 20      # te = unet = that schedule

The quickest way to check what a schedule means before spending a generation on it. Standard
library only (no torch), so it starts instantly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from lib_scheduled_lora.commands import options
from lib_scheduled_lora.core.schedule import Schedule, format_number, parse_schedule
from lib_scheduled_lora.core.tags import parse_tag

NOTE = (
    "te multipliers apply where the host computes the text conditioning (step 0, and again at "
    "prompt-editing boundaries); unet multipliers apply at every model evaluation."
)


@dataclass(frozen=True)
class _Pass:
    label: str  # "base" or "hires"
    steps: int
    te: Schedule
    unet: Schedule

    def rows(self) -> list[dict[str, float]]:
        return [{"step": i, "te": self.te.at(i, self.steps), "unet": self.unet.at(i, self.steps)} for i in range(self.steps)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "text", metavar="TAG_OR_SCHEDULE",
        help="a tag such as '<lora:wday:0@0.3:1>' or a bare schedule such as '0@0.3:1' "
        "(te and unet); put '--' before a schedule that starts with '-'",
    )
    parser.add_argument(
        "--steps", type=options.steps, default=20, help=f"sampling steps of the first pass, 1-{options.MAX_STEPS} (default 20)"
    )
    parser.add_argument(
        "--hr-steps", type=options.steps, default=None, help="also show a hires pass with this many steps"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    text = args.text.strip()
    # Syntax errors propagate: the dispatcher prints "error: <tag>: '<text>' at column N ..." and exits 2.
    if text.startswith("<"):
        tag = parse_tag(text)
        header = {"tag": tag.format(), "schedule": None}
        passes = [_Pass("base", args.steps, tag.te, tag.unet)]
        if args.hr_steps is not None:
            passes.append(_Pass("hires", args.hr_steps, tag.hrte, tag.hrunet))
    else:
        schedule = parse_schedule(text)
        header = {"tag": None, "schedule": schedule.format()}
        passes = [_Pass("base", args.steps, schedule, schedule)]
        if args.hr_steps is not None:
            passes.append(_Pass("hires", args.hr_steps, schedule, schedule))
    if args.json:
        print(json.dumps(_report(header, passes), indent=2))
    else:
        print(_table(header, passes))
    return 0


def _report(header: dict[str, str | None], passes: list[_Pass]) -> dict:
    return {
        **header,
        "passes": [
            {
                "pass": p.label, "steps": p.steps,
                "te": {"text": p.te.format(), **p.te.to_json()},
                "unet": {"text": p.unet.format(), **p.unet.to_json()},
                "rows": p.rows(),
            }
            for p in passes
        ],
        "note": NOTE,
    }


def _table(header: dict[str, str | None], passes: list[_Pass]) -> str:
    lines = [f"tag: {header['tag']}" if header["tag"] else f"schedule: {header['schedule']} (te and unet)"]
    for p in passes:
        prefix = "hr" if p.label == "hires" else ""
        lines.append("")
        lines.append(f"{'hires pass' if prefix else 'first pass'}, {p.steps} step{'s' if p.steps != 1 else ''}")
        lines.append(f"  {prefix}te = {p.te}  ({_unit(p.te)})")
        lines.append(f"  {prefix}unet = {p.unet}  ({_unit(p.unet)})")
        lines.append(f"{'step':>6} {prefix + 'te':>8} {prefix + 'unet':>8}")
        for row in p.rows():
            lines.append(f"{row['step']:>6} {_short(row['te']):>8} {_short(row['unet']):>8}")
    lines.append("")
    lines.append(f"note: {NOTE}")
    return "\n".join(lines)


def _unit(schedule: Schedule) -> str:
    if schedule.is_constant:
        return "constant"
    return "positions are step indices" if schedule.in_steps else "positions are fractions of the steps"


def _short(value: float) -> str:
    """Four decimals at most, without trailing zeros (the JSON output has full precision)."""
    return format_number(round(value, 4))
