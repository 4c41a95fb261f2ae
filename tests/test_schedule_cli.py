"""``python -m lib_scheduled_lora schedule``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_scheduled_lora import cli
from lib_scheduled_lora.commands.schedule import NOTE
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule

REPO = Path(__file__).resolve().parent.parent
ALL_COMMANDS = dict(cli.COMMANDS)  # before the fixture below narrows it


@pytest.fixture(autouse=True)
def only_the_schedule_command(monkeypatch):
    # The dispatcher imports every command module to build its parser; these tests are about
    # `schedule` alone and must not depend on the heavier commands (or on their being written yet).
    monkeypatch.setattr(cli, "COMMANDS", {"schedule": cli.COMMANDS["schedule"]})


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["schedule", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str, header_te: str = "te") -> list[tuple[int, float, float]]:
    """The rows under the table header whose te column is called ``header_te``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["step", header_te, header_te.replace("te", "unet")])
    rows = []
    for line in lines[start + 1:]:
        words = line.split()
        if len(words) != 3 or not words[0].isdigit():
            break
        rows.append((int(words[0]), float(words[1]), float(words[2])))
    return rows


def test_table_for_the_wday_example(capsys):
    code, out, err = run_cli(capsys, "<lora:wday:0@0.3:1>", "--steps", "20")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "tag: <lora:wday:0@0.3:1>"
    rows = table_rows(out)
    assert [r[0] for r in rows] == list(range(20))
    assert [r[1] for r in rows] == [0.0] * 6 + [1.0] * 14
    assert [r[2] for r in rows] == [0.0] * 6 + [1.0] * 14
    assert out.rstrip().splitlines()[-1] == f"note: {NOTE}"
    assert "hires" not in out


def test_table_shows_te_and_unet_separately(capsys):
    code, out, _ = run_cli(capsys, "<lora:x:0.5:0@5,1@6>", "--steps", "8")
    assert code == 0
    assert table_rows(out) == [(i, 0.5, 0.0 if i <= 5 else 1.0) for i in range(8)]
    assert "positions are step indices" in out


def test_hires_rows_follow_with_their_own_step_count(capsys):
    code, out, _ = run_cli(capsys, "<lora:x:0@0.3:1:hr=0@0,1@1>", "--steps", "5", "--hr-steps", "5")
    assert code == 0
    assert table_rows(out) == [(0, 0, 0), (1, 0, 0), (2, 1, 1), (3, 1, 1), (4, 1, 1)]  # 0.25 < 0.3 <= 0.5
    hires = table_rows(out, "hrte")
    assert hires == [(i, i / 4, i / 4) for i in range(5)]
    assert out.index("hires pass, 5 steps") > out.index("first pass, 5 steps")


def test_bare_schedule_is_te_and_unet(capsys):
    code, out, _ = run_cli(capsys, "0@0.3:1", "--steps", "20")
    assert code == 0
    assert out.splitlines()[0] == "schedule: 0@0.3:1 (te and unet)"
    assert [r[1:] for r in table_rows(out)] == [(0, 0)] * 6 + [(1, 1)] * 14


def test_values_are_rounded_in_the_table(capsys):
    _, out, _ = run_cli(capsys, "0@0,1@1", "--steps", "4")
    assert [line.split()[1] for line in out.splitlines() if line.split()[:1] == ["1"]] == ["0.3333"]


def test_json(capsys):
    code, out, _ = run_cli(capsys, "<lora:wday:0~0.3:1.0>", "--steps", "20", "--hr-steps", "3", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["tag"] == "<lora:wday:0@0.3:1>"
    assert data["schedule"] is None
    assert data["note"] == NOTE
    first, hires = data["passes"]
    assert (first["pass"], first["steps"], hires["pass"], hires["steps"]) == ("base", 20, "hires", 3)
    assert first["te"]["text"] == first["unet"]["text"] == "0@0.3:1"
    assert Schedule.from_json(first["unet"]) == parse_schedule("0@0.3:1")
    assert [row["unet"] for row in first["rows"]] == [0.0] * 6 + [1.0] * 14
    assert [row["step"] for row in hires["rows"]] == [0, 1, 2]
    assert [row["te"] for row in hires["rows"]] == [0.0, 1.0, 1.0]  # 1/2 >= 0.3


def test_json_for_a_bare_schedule_keeps_full_precision(capsys):
    _, out, _ = run_cli(capsys, "0@0,1@1", "--steps", "4", "--json")
    data = json.loads(out)
    assert (data["tag"], data["schedule"]) == (None, "0@0,1@1")
    assert data["passes"][0]["rows"][1]["te"] == 1 / 3
    assert len(data["passes"]) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("<lora:x:0@0.3:abc>", "error: <lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"),
        ("0@0.5:1@0.2", "error: 0@0.5:1@0.2: '1@0.2' at column 7 lies before the previous switch at 0.5 (switch positions must not decrease)"),
        ("<hypernet:x:1>", "error: <hypernet:x:1>: 'hypernet' at column 2 is not a LoRA tag kind (lora, lyco, loractl)"),
    ],
)
def test_bad_input_exits_2_with_the_column(capsys, text, message):
    code, out, err = run_cli(capsys, text)
    assert code == 2
    assert out == ""
    assert err.strip() == message


@pytest.mark.parametrize("steps", ["0", "-3", "x"])
def test_steps_must_be_a_positive_integer(capsys, steps):
    with pytest.raises(SystemExit) as info:
        cli.main(["schedule", "1", "--steps", steps])
    assert info.value.code == 2
    assert "--steps" in capsys.readouterr().err


def _all_commands_importable() -> bool:
    return all(importlib.util.find_spec(module) is not None for module, _ in ALL_COMMANDS.values())


def test_module_entry_point_in_a_subprocess():
    # Runs the real dispatcher, which imports every command module; skip while one is missing.
    if not _all_commands_importable():
        pytest.skip("not every command module in cli.COMMANDS exists yet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ok = subprocess.run(
        [sys.executable, "-m", "lib_scheduled_lora", "schedule", "<lora:wday:0@0.3:1>", "--steps", "20"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert [r[2] for r in table_rows(ok.stdout)] == [0.0] * 6 + [1.0] * 14
    bad = subprocess.run(
        [sys.executable, "-m", "lib_scheduled_lora", "schedule", "<lora:x:0@0.3:abc>"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: <lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"
