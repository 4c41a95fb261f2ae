"""Sweeps: typed axes with the XYZ range syntax, cell prompts, same-mean schedules, the export to
the XYZ grid (the XYZ axes' own functions rebuild every cell), the grid picture and the command
on the demo model."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lib_scheduled_lora.cli import main
from lib_scheduled_lora.core import tag_edits
from lib_scheduled_lora.core.schedule import parse_schedule
from lib_scheduled_lora.core.sweep import (
    Axis,
    SweepError,
    image_distance,
    mean_multiplier,
    plan_sweep,
    split_values,
    sweep_report,
)
from lib_scheduled_lora.core.tags import tags_in_prompt
from lib_scheduled_lora.errors import ScheduleSyntaxError
from lib_scheduled_lora.hosts import xyz
from lib_scheduled_lora.hosts.sweep_grid import CURVE, save_sweep, sweep_grid

# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "values"),
    [
        ("strength", "0.25-2 (+0.25)", ["0.25", "0.5", "0.75", "1", "1.25", "1.5", "1.75", "2"]),
        ("switch", "0-0.8 [5]", ["0", "0.2", "0.4", "0.6", "0.8"]),
        ("strength", "1-3", ["1", "2", "3"]),
        ("strength", "2-1 (-0.5)", ["2", "1.5", "1"]),
        ("strength", "0.1-0.3 (+0.1)", ["0.1", "0.2", "0.3"]),  # no float noise in labels
        ("strength", "0.5, 1,1.5 , 0-1 [2]", ["0.5", "1", "1.5", "0", "1"]),
        ("schedule", '0@0.3:1, "0@0,1@1", 0@0;1@0.5, 0-1 [3]', ["0@0.3:1", "0@0,1@1", "0@0,1@0.5", "0", "0.5", "1"]),
        ("ramp", "0.5, 1, 2", ["0.5", "1", "2"]),
    ],
)
def test_axis_values_follow_the_xyz_syntax(kind, text, values):
    assert list(Axis.parse(kind, text).values) == values


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("strength", "1, x", "strength x: 'x' is not a number"),
        ("strength", "1, nan", "is not a finite number"),
        ("strength", "0-1 (+0)", "never reaches 1"),
        ("strength", "1-0 (+0.5)", "never reaches 0"),
        ("strength", "0-1000 (+1)", "1001 values; at most 64"),
        ("switch", "0-1 [0]", "at least 1 value"),
        ("speed", "1", "'speed' is not an axis kind"),
        ("strength", " , ", "no values"),
    ],
)
def test_bad_axis_values_are_one_line_errors(kind, text, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace("+", r"\+")) as info:
        Axis.parse(kind, text)
    assert "\n" not in str(info.value)


def test_a_bad_schedule_names_its_column():
    with pytest.raises(ScheduleSyntaxError, match="at column"):
        Axis.parse("schedule", "0@0.3:x")


def test_command_line_values_keep_their_commas():
    assert Axis.parse("schedule", ["0@0,1@1", "0@0.3:1"], split=False).values == ("0@0,1@1", "0@0.3:1")
    assert split_values('a, "b,c" ,, d') == ["a", "b,c", "d"]


# -- cells ------------------------------------------------------------------------------------


def test_cells_apply_the_schedule_before_the_strength():
    prompt = "a cat <lora:wday:0.8> <lora:other:0@0.5:1>"
    plan = plan_sweep(prompt, Axis.parse("strength", "0.5, 2"), Axis.parse("schedule", "0@0.3:1, 1"), network="wday", steps=10)
    assert plan.network == "wday" and (plan.rows, plan.columns) == (2, 2)
    assert [c.prompt for c in plan.cells] == [
        "a cat <lora:wday:0@0.3:0.5> <lora:other:0@0.5:1>",
        "a cat <lora:wday:0@0.3:2> <lora:other:0@0.5:1>",
        "a cat <lora:wday:0.5> <lora:other:0@0.5:1>",
        "a cat <lora:wday:2> <lora:other:0@0.5:1>",
    ]
    assert plan.cell(1, 0).label == "0@0.3:2"
    assert plan.references() == {
        "no network": "a cat <lora:other:0@0.5:1>",
        "full strength": "a cat <lora:wday:1> <lora:other:0@0.5:1>",
    }


def test_same_mean_schedules_have_each_columns_mean():
    strengths = Axis.parse("strength", "0.5-1.5 [3]")
    plan = plan_sweep("<lora:x:1>", strengths, Axis.parse("schedule", ["0@0.3:1", "0@0,1@1", "1@0.5:0"], split=False),
                      steps=20, same_mean=True)
    assert plan.row_labels()[0] == "schedule constant"  # the constant comes first
    assert plan.rows == 4
    for cell in plan.cells:
        assert mean_multiplier(cell.tag.unet, 20) == pytest.approx(float(strengths.values[cell.x]), abs=5e-4)
    assert plan.cell(2, 1).label == "0@0.3:2.1429"  # 1.5 / (14/20)
    with pytest.raises(SweepError, match="'0' has mean 0 over 20 steps"):
        plan_sweep("<lora:x:1>", strengths, Axis.parse("schedule", "0"), same_mean=True)
    with pytest.raises(SweepError, match="needs a strength axis and a schedule axis"):
        plan_sweep("<lora:x:1>", strengths, Axis.parse("switch", "0.5"), same_mean=True)


def test_the_network_must_be_named_when_the_prompt_has_several():
    with pytest.raises(SweepError, match="name the network to sweep \\(the prompt has 2: a, b\\)"):
        plan_sweep("<lora:a:1> <lora:b:1>", Axis.parse("strength", "1"))
    with pytest.raises(SweepError, match="no network tag; add one"):
        plan_sweep("a cat", Axis.parse("strength", "1"))
    with pytest.raises(SweepError, match="no tag of network 'c'"):
        plan_sweep("<lora:a:1>", Axis.parse("strength", "1"), network="c")


def test_the_xyz_export_rebuilds_every_cell():
    """The XYZ grid applies its axes to copies of the prompt (Y before X when the Y axis replaces
    schedules): the exported values rebuild exactly the sweep's cells, also for same-mean."""
    for same_mean in (False, True):
        prompt = "a dog <lora:wday:0@0.3:1>"
        plan = plan_sweep(prompt, Axis.parse("strength", "0.5, 1.5"), Axis.parse("schedule", ["0@0,1@1", "0@0.5:1"], split=False),
                          same_mean=same_mean)
        (x_kind, x_values), (y_kind, y_values) = plan.xyz_axes()
        assert (x_kind, y_kind) == ("strength", "schedule")
        apply_x = xyz.AXES["Scheduled LoRA: strength"][0]
        apply_y = xyz.AXES["Scheduled LoRA: schedule"][0]
        xs, ys = split_values(x_values), split_values(y_values)
        rebuilt = [apply_x(apply_y(prompt, y), x) for y in ys for x in xs]
        assert rebuilt == [c.prompt for c in plan.cells]


def test_typed_edits():
    prompt = "<lora:x:0.5:0@0.3:1> <lora:y:1>"
    assert tag_edits.apply_te(prompt, "x=2") == "<lora:x:1:0@0.3:1> <lora:y:1>"
    assert tag_edits.apply_unet(prompt, "x=2") == "<lora:x:0.5:0@0.3:2> <lora:y:1>"
    assert tag_edits.apply_ramp("<lora:x:2>", "x=2") == "<lora:x:0@0,0.125@0.25,0.5@0.5,1.125@0.75,2@1>"
    assert tag_edits.apply_ramp("<lora:x:1>", "x=1") == "<lora:x:0@0,0.25@0.25,0.5@0.5,0.75@0.75,1@1>"
    with pytest.raises(ScheduleSyntaxError, match="is not a ramp shape"):
        tag_edits.apply_ramp("<lora:x:1>", "x=0")
    assert xyz.apply_strength("<lora:x:1> <lora:y:0@0.5:1>", "2") == "<lora:x:1> <lora:y:0@0.5:2>"  # XYZ: scheduled tags only
    assert tag_edits.apply_strength("<lora:x:1> <lora:y:0@0.5:1>", "2") == "<lora:x:2> <lora:y:0@0.5:2>"


# -- numbers, picture, files ------------------------------------------------------------------


def test_image_distance():
    black, white = Image.new("RGB", (4, 4), "black"), Image.new("RGB", (4, 4), "white")
    grey = Image.new("RGB", (4, 4), (51, 51, 51))
    assert image_distance(black, black) == 0.0
    assert image_distance(black, white) == pytest.approx(1.0)
    assert image_distance(black, grey) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="different sizes"):
        image_distance(black, Image.new("RGB", (2, 2)))


def test_grid_has_a_curve_under_every_cell_and_files_beside_it(tmp_path):
    plan = plan_sweep("<lora:x:1>", Axis.parse("strength", "1, 2"), Axis.parse("schedule", ["0@0.5:1", "1"], split=False), steps=8)
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue", "black")]
    grid = sweep_grid(plan, images, cell_notes=["d0 0.10"] * 4, title="t")
    pixels = grid.load()
    found = {(x, y) for x in range(grid.width) for y in range(grid.height) if pixels[x, y] == CURVE}
    assert found
    # one curve per cell: curve pixels in each of the four cell columns and both rows
    xs, ys = sorted({x for x, _ in found}), sorted({y for _, y in found})
    assert xs[-1] - xs[0] > grid.width // 3 and ys[-1] - ys[0] > 128
    report = sweep_report(plan, numbers=[{"from no network": 0.1}] * 4, infotexts=["i"] * 4)
    png, json_path = save_sweep(grid, tmp_path / "g.png", report, infotext="p")
    assert Image.open(png).text["parameters"] == "p"
    data = json.loads(json_path.read_text())
    assert [c["schedule"] for c in data["cells"]] == ["0@0.5:1", "0@0.5:2", "1", "2"]
    assert data["cells"][1]["unet_per_step"] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.png"]


@pytest.mark.slow
def test_command_on_the_demo_model(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sweep", "a white wday <lora:wday_locon:1>", "--strengths", "1, 2", "--schedules", "0@0.3:1",
            "--same-mean", "--steps", "4", "-o", str(out)]
    assert main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["cells"]) == 4 and data["same_mean"] and data["network"] == "wday_locon"
    assert set(data["cells"][0]["numbers"]) == {"from no network", "from full strength", "colour", "concept"}
    full = next(c for c in data["cells"] if c["schedule"] == "1")
    assert full["numbers"]["from full strength"] == 0.0  # the constant 1 cell is the reference itself
    assert "Steps: 4" in data["cells"][0]["infotext"]
    assert tags_in_prompt(data["cells"][3]["prompt"])[0][1].unet == parse_schedule("0@0.3:2.6666")  # 2 × round(1 / 0.75, 4)
    grid = Image.open(out)
    assert grid.width > 2 * 128 and grid.height > 2 * 128


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", "a wday <lora:wday:1>", "--strengths", "1, two", "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: strength x: 'two' is not a number"
    assert main(["sweep", "a wday <lora:nope:1>", "--strengths", "1", "-o", str(tmp_path / "g.png")]) == 2
    assert "no network named 'nope'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
