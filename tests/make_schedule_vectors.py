"""Generate tests/schedule_vectors.json: the grammar's shared test vectors.

The browser editor carries its own port of the grammar (javascript/scheduled_lora_grammar.js).
These vectors, computed by the Python core (the reference), are checked by both languages:
tests/test_schedule_vectors.py regenerates them in memory and compares with the file (so the file
cannot go stale silently), and tests/js/grammar.test.js (``node --test tests/js/``) checks that the
JavaScript port produces the same per-step multipliers, canonical text and error messages.

Run ``python tests/make_schedule_vectors.py`` after changing the grammar.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_scheduled_lora.core.schedule import Schedule, format_number, parse_schedule  # noqa: E402
from lib_scheduled_lora.core.tags import find_tags, parse_tag  # noqa: E402
from lib_scheduled_lora.errors import ScheduleSyntaxError  # noqa: E402

VECTORS_PATH = Path(__file__).resolve().parent / "schedule_vectors.json"
STEPS = (1, 2, 20, 30)
# Fractional step indices of the extra evaluations of second-order samplers (Heun: i + 1, DPM2:
# between i and i + 1), evaluated with 20 steps.
HALF_STEPS = 20

# -- inputs ------------------------------------------------------------------------------------

# Every example of docs/schedule-syntax.md, then loractl-compatible forms, then the rest.
DOC_TAGS = [
    "<lora:x:0.8>",
    "<lora:x:0@0,1@0.5>",
    "<lora:x:1:0@5,1@6>",
    "<lora:x:te=0@0,1@1:unet=1>",
    "<lora:wday:0@0.3:1>",
    "<lora:x:1@0.5:0>",
    "<lora:x:0@0.2:0.5,1@1>",
    "<lora:x:0@0.3:1:hr=0.6>",
    "<lora:x:0@0.3:abc>",
]

LORACTL_TAGS = [
    "<lora:x>",
    "<lora:x:1>",
    "<lora:x:0.5:0.8>",
    "<lora:x:0@0,1@1>",
    "<lora:x:1@0,0.2@10>",
    "<lora:x:0.5@0;1@0.5;0@1>",
    "<loractl:x:0@0,1@1>",
    "<lyco:x:0@0.3:1>",
    "<lyco:x:0.7:0.7:16>",
    "<lora:x:te=0.5:unet=0@0,1@1>",
    "<lora:x:unet=0@0,1@0.5:te=1>",
    "<lora:x:hr=0@0,1@1>",
    "<lora:x:hrte=0.2:hrunet=0.4>",
    "<lora:x:1:hrunet=0.5>",
    "<lora:x:0@0.3:1:hrte=0:hrunet=0@0.5:1>",
    "<lora:x:0@0.3:1:te=0.5>",
    "<lora:x:1:dyn=8>",
    "<lora:x:0.5:lbw=ALL:start=5>",
    "<lora:x:0@0.3:1:lbw=1,0,0,1>",
    "<lora:x:0.5:dyn=4:lbw=OUTD>",
    "<lora:x:0@0.3:1:hr=0.6:dyn=16:stop=10>",
    "<lora:My LoRA v2.1:0.6>",
    "<lora:x:0~0.3:1>",
    "<lora:x: 0 @ 0.3 : 1 >",
    "<lora:x:1.0@0.0:0.50>",
    "<lora:x:+1e0@0:.5>",
    "<lora:x:1e-05>",
    "<lora:x:1e16>",
    "<lora:x:-0.0>",
    "<lora:x:-1.5@0.5:2.5>",
    "<lora:x:0@0.2:0.5@0.6:1>",
    "<lora:x:0@0.3:1@0.3:2>",
    "<lora:x:0@0:1>",
    "<lora:x:1@1:0>",
    "<lora:x:0@5:1@10:0.5>",
    "<lora:x:0@0,1@0.5,0.5@0.5,0@1>",
    "<lora:x:1@0.3,0@0.1>",
    "<lora:x:0@0.1,1@0.9:0.5>",
    "<lora:x:0.3@0:0.6@0.5,1@1>",
    "<lora:x:0,1@0.5>",
    "<lora:x:0@0.3:0.5,1@1:te=1>",
    "<lora:x:te=0@0.3:1:unet=1@0.5:0>",
    "<lora:x:0@0.5:1:0.5>",
    "<lora:x:0.5:0@0.5:1:3>",
    "<lora:x:0@0.000001:1>",
    "<lora:x:0@2:1>",
    "<lora:x:0@1.5,1@3>",
    "<lora:x:123456789012345678>",
    "<lora:x:0.1@0,0.30000000000000004@1>",
    "<lora:名前:0@0.3:1>",
    "<lora:x🎉:0@0.3:1>",
]

ERROR_TAGS = [
    "<lora:x🎉:0@0.3:abc>",
    "<lora:x:nan>",
    "<lora:x:-inf@0.5:1>",
    "<lora:x:1e999>",
    "<lora:x:0@0.5@1>",
    "<lora:x:@0.5>",
    "<lora:x:1@>",
    "<lora:x:0,1>",
    "<lora:x:0@0.5,,1@1>",
    "<lora:x:,1@1>",
    "<lora:x:0@0.5;>",
    "<lora:x:0@0.5:>",
    "<lora:x:0@0.5::1>",
    "<lora:x:1:2:3:4>",
    "<lora:x:1:2:3.5>",
    "<lora:x:1:dyn=abc>",
    "<lora:x:1:dyn=1234567890>",
    "<lora:x:te=1:te=2>",
    "<lora:x:te=>",
    "<lora:x:=1>",
    "<lora:x:0@0.5:0@0.2>",
    "<lora:x:0@0.5:1@0.7,0@0.2:1>",
    "<lora: :1>",
    "<lora:te=1:x>",
    "<lora:x:1:>",
    "<lora:x::1>",
    "<lora:x:1 2>",
    "<lora:x:'1'>",
    '<lora:x:"it\'s">',
    "<lora:x:1\t2>",
    "<lora:x:1\xa02>",
    "<lora:x:hr=0@0.5:abc>",
    "<hypernet:x:1>",
    "<lora x>",
]

SCHEDULES = [
    "0.8",
    "0@0,1@0.5",
    "0@5,1@6",
    "0@0.3:1",
    "1@0.5:0",
    "0@0.2:0.5,1@1",
    "0@0.2:0.5@0.6:1",
    "0@0.3:1@0.3:2",
    "0 ; 1@0.5",
    "0@0.3:1:2",
    "0@0.3:x",
    "",
    " ",
    "1@0.5,0@0.5",
]

PROMPTS = [
    "a photo of a cat <lora:wday:0@0.3:1>, <lyco:style:0.6> <hypernet:h:1> <lora:bad:0@0.3:abc>",
    "<lora:a:1><lora:b:0@0,1@1:hr=0.5>",
    "no tags here",
    "<lora:x:1 <lora:y:0.5>",
    "BREAK <loractl:z:te=0@0,1@1:unet=1>\n<lora:w>",
    "<é:<lora:x:1>",
]

WITH_SCHEDULES = [
    ("<lora:x:0.5>", {"te": "0@0.3:1"}),
    ("<lora:x:0.5>", {"unet": "0@0.3:1"}),
    ("<lora:x:0.5>", {"hr": "0.2"}),
    ("<lora:x:0.5:1>", {"te": "0@0,1@1"}),
    ("<lora:x:1:hr=0.5>", {"te": "0@0.3:1"}),
    ("<lora:x:0@0.3:1>", {"te": "1", "unet": "0@0.3:1"}),
    ("<lora:x:0@0.3:1:hrte=1>", {"hrunet": "0@0.5:1"}),
    ("<lora:x:1:dyn=8:lbw=ALL>", {"te": "0@0.3:1"}),
]

NUMBERS = [
    0.0, -0.0, 1.0, -1.0, 0.3, 0.1 + 0.2, 1e-05, 1e-04, 0.0001234, 1.5e-07, 1e16, 1e15, 1.5e16,
    123456789012345678.0, 9007199254740993.0, 1e22, 1e21, 1e100, -2.5e-300, 5e-324, 1.7976931348623157e308,
    0.5, 2.5, 100.0, 1234.5678, 1 / 3, 2 / 3, 6 / 19, 10 / 19, 0.05 * 3, 1e-4 * 3,
]


def random_tags(seed: int = 20240611, count: int = 300) -> list[str]:
    """Tags made of grammar tokens in random order: mostly malformed, a fair share valid.

    Deterministic (a fixed seed), so the file and the in-memory regeneration agree.
    """
    rng = random.Random(seed)
    tokens = [
        "0", "1", "0.5", "0.3", ".5", "1.", "-1", "+2", "1e-5", "2E3", "7", "12", "@", "~", ",", ";",
        ":", ":", ":", "te=", "unet=", "hr=", "hrte=", "hrunet=", "dyn=", "lbw=", "x", " ", "inf", "=",
    ]
    tags = []
    for _ in range(count):
        body = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 9)))
        tags.append(f"<{rng.choice(('lora', 'lyco', 'loractl'))}:n:{body}>")
    return tags


def random_schedules(seed: int = 77, count: int = 60) -> list[list[list[tuple[float, float | None]]]]:
    """Structured schedules (values and positions, not text), round-tripped through the text."""
    rng = random.Random(seed)
    values = [0.0, 0.25, 0.5, 0.8, 1.0, 1.5, -0.5, 1e-05, 0.123456789, 2.0 / 3.0]
    out = []
    for _ in range(count):
        in_steps = rng.random() < 0.3
        pieces = []
        start = 0.0
        for k in range(rng.randint(1, 3)):
            n = rng.randint(1, 3)
            positions = sorted(
                round(rng.uniform(start, 12 if in_steps else 1), rng.choice((1, 2, 3))) for _ in range(n)
            )
            positions = [max(start, p) for p in positions]
            piece: list[tuple[float, float | None]] = [(rng.choice(values), p) for p in positions]
            if k > 0 and rng.random() < 0.5:
                piece[0] = (piece[0][0], None)
            pieces.append(piece)
            start = max(p for _, p in piece if p is not None) if any(p is not None for _, p in piece) else start
        out.append(pieces)
    return out


# -- outputs -----------------------------------------------------------------------------------


def _values(schedule: Schedule, full: bool = True) -> dict[str, Any]:
    """Per-step multipliers for every step count of STEPS, and at the half steps (second-order
    samplers); ``full=False`` keeps only 20 steps (the random vectors, to keep the file small)."""
    if not full:
        return {"20": schedule.values(20)}
    out: dict[str, Any] = {str(n): schedule.values(n) for n in STEPS}
    out["half"] = [schedule.at(i + 0.5, HALF_STEPS) for i in range(HALF_STEPS - 1)]
    return out


def _error(exc: ScheduleSyntaxError) -> dict[str, Any]:
    return {"error": str(exc), "column": exc.column, "offending": exc.text, "problem": exc.problem}


def tag_vector(text: str, full: bool = True) -> dict[str, Any]:
    vector: dict[str, Any] = {"text": text}
    try:
        tag = parse_tag(text)
    except ScheduleSyntaxError as exc:
        vector.update(_error(exc))
        return vector
    vector.update(
        canonical=tag.format(),
        kind=tag.kind,
        name=tag.name,
        dyn=tag.dyn,
        passthrough=[list(kv) for kv in tag.passthrough],
        schedules={key: getattr(tag, key).format() for key in ("te", "unet", "hrte", "hrunet")},
        in_steps={key: getattr(tag, key).in_steps for key in ("te", "unet", "hrte", "hrunet")},
        values={key: _values(getattr(tag, key), full) for key in ("te", "unet", "hrte", "hrunet")},
    )
    return vector


def schedule_vector(text: str) -> dict[str, Any]:
    vector: dict[str, Any] = {"text": text}
    try:
        schedule = parse_schedule(text)
    except ScheduleSyntaxError as exc:
        vector.update(_error(exc))
        return vector
    vector.update(
        canonical=schedule.format(),
        in_steps=schedule.in_steps,
        is_constant=schedule.is_constant,
        ends_with_position=schedule.ends_with_position,
        switch_points=list(schedule.switch_points),
        pieces=schedule.to_json()["pieces"],
        values=_values(schedule),
    )
    return vector


def build() -> dict[str, Any]:
    """The whole vector file as a JSON-ready dict."""
    structured = []
    for raw in random_schedules():
        schedule = Schedule.from_pieces(raw)
        structured.append({
            "raw": [[[v, p] for v, p in piece] for piece in raw],
            "canonical": schedule.format(),
            "values": _values(schedule),
        })
    return {
        "about": "Generated by tests/make_schedule_vectors.py from lib_scheduled_lora; do not edit.",
        "steps": list(STEPS),
        "half_steps": HALF_STEPS,
        "numbers": [[x, format_number(x)] for x in NUMBERS],
        "schedules": [schedule_vector(t) for t in SCHEDULES],
        "structured": structured,
        "tags": [tag_vector(t) for t in DOC_TAGS + LORACTL_TAGS + ERROR_TAGS],
        "random_tags": [tag_vector(t, full=False) for t in random_tags()],
        "prompts": [
            {
                "prompt": p,
                "tags": [
                    {"text": m.text, "canonical": m.tag.format() if m.tag else None,
                     "error": str(m.error) if m.error else None}
                    for m in find_tags(p)
                ],
            }
            for p in PROMPTS
        ],
        "with_schedules": [
            {
                "tag": text,
                "changes": changes,
                "canonical": parse_tag(text).with_schedules(
                    **{k: parse_schedule(v) for k, v in changes.items()}
                ).format(),
            }
            for text, changes in WITH_SCHEDULES
        ],
    }


def dumps(data: dict[str, Any]) -> str:
    """One vector per line: small, and a diff shows which vectors changed."""
    lines = ["{"]
    for k, (key, value) in enumerate(data.items()):
        comma = "," if k < len(data) - 1 else ""
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = [json.dumps(item, ensure_ascii=False) for item in value]
            lines.append(f" {json.dumps(key)}: [\n  " + ",\n  ".join(items) + f"\n ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    VECTORS_PATH.write_text(dumps(build()), encoding="utf-8")
    print(f"wrote {VECTORS_PATH}")


if __name__ == "__main__":
    main()
