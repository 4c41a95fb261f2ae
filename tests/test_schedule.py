"""The schedule model and its text form (docs/schedule-syntax.md, section "Schedule")."""

from __future__ import annotations

import json
import math

import pytest

from lib_scheduled_lora.core.schedule import (
    Keyframe,
    Piece,
    Schedule,
    format_number,
    parse_schedule,
)
from lib_scheduled_lora.errors import ScheduleSyntaxError


def values(text: str, steps: int) -> list[float]:
    return parse_schedule(text).values(steps)


# -- the document's examples (schedule part; the tag forms are in test_tags.py) -----------------


def test_constant():
    assert values("0.8", 20) == [0.8] * 20
    assert parse_schedule("0.8").is_constant


def test_ramp_over_the_first_half_then_flat():
    got = values("0@0,1@0.5", 20)
    expected = [min(1.0, (i / 19) / 0.5) for i in range(20)]
    assert got == pytest.approx(expected)
    assert got[9] == pytest.approx(9 / 19 / 0.5) and got[9] < 1
    assert got[10:] == [1.0] * 10


def test_step_ramp_in_step_counts():
    s = parse_schedule("0@5,1@6")
    assert s.in_steps
    assert s.values(20) == [0.0] * 6 + [1.0] * 14


def test_wday_step_schedule():
    # 6/19 >= 0.3 > 5/19: 0 for step indices 0-5, 1 from index 6.
    assert values("0@0.3:1", 20) == [0.0] * 6 + [1.0] * 14


def test_first_half_only():
    assert values("1@0.5:0", 20) == [1.0] * 10 + [0.0] * 10


def test_step_then_ramp_from_the_switch():
    got = values("0@0.2:0.5,1@1", 20)
    assert got[:4] == [0.0] * 4  # 3/19 < 0.2 <= 4/19
    assert got[4] == pytest.approx(0.5 + 0.5 * (4 / 19 - 0.2) / 0.8)
    assert got[19] == 1.0
    assert parse_schedule("0@0.2:0.5,1@1").pieces[1].keyframes[0] == Keyframe(0.5, 0.2)


def test_chained_steps():
    got = values("0@0.2:0.5@0.6:1", 11)
    assert got == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


# -- loractl's own test cases, where the grammar agrees --------------------------------------------


@pytest.mark.parametrize("text", ["1@0,0.5@3,1@6", "0.5@3,1@6,1@0", "1@0;0.5@3;1@6", "1~0,0.5~3,1~6"])
def test_loractl_sorted_positions(text):
    s = parse_schedule(text)
    assert s.pieces == (Piece(0.0, (Keyframe(1, 0), Keyframe(0.5, 3), Keyframe(1, 6))),)
    assert s.in_steps


def test_loractl_fraction_keyframes():
    s = parse_schedule("0.5@0,0.5@0.5,0@1")
    assert [(kf.value, kf.pos) for kf in s.pieces[0].keyframes] == [(0.5, 0), (0.5, 0.5), (0, 1)]
    assert not s.in_steps


def test_loractl_interpolation():
    s = parse_schedule("0.75@0;0.5@3;1@6")
    assert [s.at(i, 30) for i in (0, 3, 6, 9)] == [0.75, 0.5, 1.0, 1.0]
    s = parse_schedule("0.5@5,1.0@10")
    assert s.at(0, 30) == 0.5
    assert s.at(5, 30) == 0.5
    assert s.at(8, 30) == pytest.approx(0.8)
    assert s.at(15, 30) == 1.0


# -- evaluation details -----------------------------------------------------------------------------


def test_fractional_step_inside_a_ramp():
    assert parse_schedule("0@0,1@1").at(2.5, 11) == pytest.approx(0.25)
    assert parse_schedule("0@5,1@6").at(5.5, 20) == pytest.approx(0.5)


def test_fractional_step_around_a_switch():
    s = parse_schedule("0@0.3:1")
    assert s.at(5.6, 20) == 0.0  # 5.6/19 < 0.3
    assert s.at(5.7, 20) == 1.0  # 5.7/19 == 0.3


def test_switch_tolerates_rounding_below_the_position():
    # A position computed from noise levels can land a hair below the switch.
    assert parse_schedule("0@6:1").at(6 - 1e-12, 20) == 1.0
    assert parse_schedule("0@6:1").at(6 - 1e-6, 20) == 0.0
    assert parse_schedule("0@0.3:1").at_position(0.3 - 1e-12) == 1.0
    assert parse_schedule("0@0.3:1").at_position(0.3 - 1e-6) == 0.0


def test_one_step_sits_at_position_zero():
    assert parse_schedule("0@0.3:1").at(0, 1) == 0.0
    assert parse_schedule("0@0,1@1").values(1) == [0.0]
    assert parse_schedule("2@0:3").values(1) == [3.0]  # a switch at 0 applies from the first step


def test_step_mode_ignores_the_step_count():
    s = parse_schedule("0@2:1")
    assert s.in_steps
    assert s.values(4) == [0, 0, 1, 1]
    assert s.values(40)[:3] == [0, 0, 1]


def test_fraction_mode_scales_with_the_step_count():
    s = parse_schedule("0@1:1")  # all positions <= 1: fractions; switch at the last step
    assert not s.in_steps
    assert s.values(4) == [0, 0, 0, 1]
    assert s.values(10)[-2:] == [0, 1]


def test_flat_before_first_and_after_last_keyframe():
    s = parse_schedule("0.2@0.4,0.6@0.6")
    assert s.at_position(-1) == 0.2
    assert s.at_position(0.4) == 0.2
    assert s.at_position(0.5) == pytest.approx(0.4)
    assert s.at_position(5) == 0.6


def test_jump_inside_a_piece_takes_the_later_keyframe_at_its_position():
    s = parse_schedule("0@0,0@0.5,1@0.5,1@1")
    assert s.at_position(0.5 - 1e-6) == 0.0
    assert s.at_position(0.5) == 1.0


def test_negative_and_zero_width_switches():
    assert parse_schedule("0@-0.5:1").values(3) == [1, 1, 1]
    assert parse_schedule("0@0.5:1@0.5:2").at_position(0.5) == 2.0


def test_keyframes_before_a_later_piece_start_shape_its_ramp():
    s = parse_schedule("0@0.5:0@0.1,1@0.9")
    assert s.at_position(0.4) == 0.0
    assert s.at_position(0.5) == pytest.approx(0.5)


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        parse_schedule("1").at(0, 0)


# -- is_constant, switch_points, scaled --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, constant",
    [
        ("0.8", True),
        ("0.5@0.3", True),
        ("0.5@0,0.5@1", True),
        ("1@0.5:1", True),
        ("0@0.5:1@0.5:0", True),  # the middle piece never shows
        ("1@0.5:0@0.1,1@0.2,1@0.7", True),  # the dip lies before the piece takes over
        ("0@0.3:1", False),
        ("0@0,1@1", False),
        ("1@0.5:0@0.5,1@0.6", False),
        ("0@0,0@0.5,1@0.5", False),
        ("1@0.5:1,2@0.7", False),
    ],
)
def test_is_constant(text, constant):
    assert parse_schedule(text).is_constant is constant


def test_switch_points():
    assert parse_schedule("0@0.2:0.5@0.6:1").switch_points == (0.2, 0.6)
    assert parse_schedule("0@0,1@0.5").switch_points == ()
    assert parse_schedule("1@0.4,0@0.2:1").switch_points == (0.4,)


def test_scaled():
    s = parse_schedule("0.5@0,1@0.5:2").scaled(0.5)
    assert s == parse_schedule("0.25@0,0.5@0.5:1")
    assert s.at_position(0.25) == pytest.approx(0.375)
    assert parse_schedule("0@5,1@6").scaled(2).in_steps
    with pytest.raises(ValueError):
        s.scaled(math.nan)


def test_constant_constructor():
    assert Schedule.constant(0.8) == parse_schedule("0.8")
    assert Schedule.constant(1) == parse_schedule("1.0")
    with pytest.raises(ValueError):
        Schedule.constant(math.inf)


# -- canonical text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("1.0", "1"),
        ("0.30", "0.3"),
        ("+.5", "0.5"),
        ("-0", "0"),
        ("1e-5", "1e-05"),
        ("2.5E+20", "2.5e+20"),
        ("0.8@0", "0.8"),
        ("0.8@0.5", "0.8@0.5"),
        ("0@0,1@0.5", "0@0,1@0.5"),  # ramps keep their @0
        ("0,1@0.5", "0@0,1@0.5"),
        ("0@0.3:1", "0@0.3:1"),
        ("0@0.3:1@0.3", "0@0.3:1"),
        ("0@0.3:1@0.5", "0@0.3:1@0.5"),
        ("0@0.2:0.5@0.2,1@1", "0@0.2:0.5,1@1"),
        ("0@0.2:0.5@0.1,1@1", "0@0.2:0.5@0.1,1@1"),
        (" 0 ~ 0.3 : 1 ; 2 @ 0.9 ", "0@0.3:1,2@0.9"),
        ("1@6,0.5@3,1@0", "1@0,0.5@3,1@6"),
        ("0@5.0,1@6.0", "0@5,1@6"),
    ],
)
def test_canonical_text(text, canonical):
    s = parse_schedule(text)
    assert s.format() == canonical == str(s)
    assert parse_schedule(canonical) == s


def test_non_final_piece_prints_its_position_even_at_its_start():
    # "0:1" would read as two arguments; the switch at 0 must be spelled out.
    s = Schedule.from_pieces([[(0, None)], [(1, None)]])
    assert s.format() == "0@0:1"
    assert parse_schedule(s.format()) == s
    s = Schedule.from_pieces([[(0, 0.3)], [(1, None)], [(2, None)]])
    assert s.format() == "0@0.3:1@0.3:2"
    assert parse_schedule(s.format()) == s


def test_format_number():
    assert [format_number(x) for x in (1.0, 0.3, 1e-05, -2.0, 1e16, 0.1 + 0.2)] == [
        "1", "0.3", "1e-05", "-2", "1e+16", "0.30000000000000004",
    ]


def test_equal_meaning_texts_are_equal_and_hash_equal():
    a, b = parse_schedule("0~0.3;1@0.5"), parse_schedule("0 @ 0.3 , 1.0 @ .5")
    assert a == b and hash(a) == hash(b)
    assert len({a, b, parse_schedule("0@0.3,1@0.6")}) == 2


def test_repr_is_the_canonical_text():
    assert repr(parse_schedule("0~0.3:1.0")) == "Schedule('0@0.3:1')"


# -- JSON -------------------------------------------------------------------------------------


def test_to_json_shape_and_round_trip():
    s = parse_schedule("0@0.2:0.5,1@1")
    data = s.to_json()
    assert data == {
        "in_steps": False,
        "pieces": [{"start": 0.0, "keyframes": [[0.0, 0.2]]}, {"start": 0.2, "keyframes": [[0.5, 0.2], [1.0, 1.0]]}],
    }
    assert Schedule.from_json(json.loads(json.dumps(data))) == s


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"pieces": []},
        {"pieces": [{"start": 0, "keyframes": []}]},
        {"pieces": [{"start": 0.1, "keyframes": [[1, 0]]}]},  # first piece must start at 0
        {"pieces": [{"start": 0, "keyframes": [[1, 0.5], [0, 0.2]]}]},  # unsorted
        {"pieces": [{"start": 0, "keyframes": [[1, "x"]]}]},
        {"pieces": [{"start": 0, "keyframes": [[1, 0]]}], "in_steps": True},  # no position > 1
        {"pieces": [{"start": 0, "keyframes": [[0, 0.5]]}, {"start": 0.5, "keyframes": [[1, 0.3]]}]},
        [1, 2],
    ],
)
def test_from_json_rejects_malformed_data(data):
    with pytest.raises(ValueError):
        Schedule.from_json(data)


# -- construction checks ----------------------------------------------------------------------


def test_from_pieces():
    s = Schedule.from_pieces([[(0, 0.3)], [(1, None), (2, 0.9)]])
    assert s == parse_schedule("0@0.3:1,2@0.9")
    with pytest.raises(ValueError):
        Schedule.from_pieces([[(0, 0.5)], [(1, 0.3)]])  # switch goes back
    with pytest.raises(ValueError):
        Schedule.from_pieces([[(0, 0.1), (1, None)]])  # only the first may omit its position
    with pytest.raises(ValueError):
        Schedule.from_pieces([[]])


def test_constructor_checks_consistency():
    piece = Piece(0.0, (Keyframe(1, 0.5),))
    with pytest.raises(ValueError):
        Schedule((piece, Piece(0.4, (Keyframe(0, 0.6),))), False)  # start is not the previous switch
    with pytest.raises(ValueError):
        Schedule((piece,), True)  # no position > 1
    with pytest.raises(ValueError):
        Piece(0.0, (Keyframe(1, 0.5), Keyframe(0, 0.2)))
    with pytest.raises(ValueError):
        Keyframe(math.nan, 0)
    with pytest.raises(ValueError):
        Keyframe(1, math.inf)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("0@0.3:abc", "0@0.3:abc: 'abc' at column 7 is not a number"),
        ("0@", "0@: '0@' at column 1 has no position after '@'"),
        ("0~ ", "0~ : '0~' at column 1 has no position after '~'"),
        ("@0.5", "@0.5: '@0.5' at column 1 has no value before '@'"),
        ("0@0.5,1", "0@0.5,1: '1' at column 7 has no position; only a piece's first keyframe may leave it out"),
        ("0@1@2", "0@1@2: '0@1@2' at column 1 has more than one position mark ('@')"),
        ("nan", "nan: 'nan' at column 1 is not a finite number"),
        ("1@-inf", "1@-inf: '-inf' at column 3 is not a finite number"),
        ("1e999", "1e999: '1e999' at column 1 is not a finite number"),
        ("1_0", "1_0: '1_0' at column 1 is not a number"),
        ("0@0.3::1", "0@0.3::1: ':' at column 6 is not followed by a piece"),
        ("0@0.3:", "0@0.3:: ':' at column 6 is not followed by a piece"),
        (":1", ":1: ':' at column 1 is not preceded by a piece"),
        ("0@0.5,", "0@0.5,: ',' at column 6 is not followed by a keyframe"),
        ("0@0;;1@1", "0@0;;1@1: ';' at column 4 is not followed by a keyframe"),
        (";1@1", ";1@1: ';' at column 1 is not preceded by a keyframe"),
        ("1:2", "1:2: ':' at column 2 follows a piece that does not end at a position, so there is nothing to switch at"),
        (
            "0@0.5:1@0.3:2",
            "0@0.5:1@0.3:2: '1@0.3' at column 7 lies before the previous switch at 0.5 (switch positions must not decrease)",
        ),
        (
            "0@0.5:1@0.4,0@0.2",
            "0@0.5:1@0.4,0@0.2: '1@0.4' at column 7 lies before the previous switch at 0.5 (switch positions must not decrease)",
        ),
        ("0@0.5:1@0.4", "0@0.5:1@0.4: '1@0.4' at column 7 lies before the previous switch at 0.5 (switch positions must not decrease)"),
        ("", ": '' at column 1 is an empty piece"),
    ],
)
def test_error_messages(text, message):
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_schedule(text)
    assert str(info.value) == message
    err = info.value
    assert err.tag == text
    assert text[err.column - 1:].startswith(err.text)


def test_error_column_inside_a_tag():
    tag = "<lora:x:0@0.3:abc>"
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_schedule("0@0.3:abc", tag=tag, offset=8)
    assert str(info.value) == "<lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"
    assert (info.value.tag, info.value.text, info.value.column) == (tag, "abc", 15)


def test_errors_are_value_errors_too():
    # Callers that only know ValueError (e.g. the host's own error handling) still catch them.
    with pytest.raises(ValueError):
        parse_schedule("x")
