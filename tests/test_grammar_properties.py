"""Property tests of the grammar: round trips, robustness on arbitrary text, and evaluation
against an independent reference model.

Schedules and tags are generated structurally (from values and positions, not from text), so the
round trip also covers schedules nobody would type: huge/tiny numbers, -0.0, keyframes sharing
positions, switches at a piece's own start.
"""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_scheduled_lora.core.schedule import WHITESPACE, Schedule, parse_schedule
from lib_scheduled_lora.core.tags import KINDS, NAMED_KEYS, NetworkTag, find_tags, parse_tag
from lib_scheduled_lora.errors import ScheduleSyntaxError

SETTINGS = settings(max_examples=int(os.environ.get("SCHEDULE_PROPERTY_EXAMPLES", 75)), deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=False, allow_infinity=False)
nice_value = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 0.3, 1e-05, 2.5e20]), any_float)
nice_pos = st.one_of(st.sampled_from([0.0, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 6.0, 10.0, -0.5]), st.floats(-2, 50), any_float)


@st.composite
def raw_schedules(draw, values=nice_value, positions=nice_pos, max_pieces=4, max_keyframes=4):
    """Keyframes as written, [[(value, pos or None), ...], ...], with non-decreasing switches."""
    pieces = []
    start = 0.0
    for k in range(draw(st.integers(1, max_pieces))):
        n = draw(st.integers(1, max_keyframes))
        piece = []
        for j in range(n):
            pos = None if j == 0 and draw(st.booleans()) else draw(positions)
            piece.append((draw(values), pos))
        switch = max(start if pos is None else pos for _, pos in piece)
        if k > 0 and switch < start:
            # Make the written last keyframe the switch: at the start or after it.
            later = draw(st.one_of(st.just(start), st.floats(min_value=start, allow_infinity=False)))
            piece[-1] = (piece[-1][0], later)
            switch = max(start if pos is None else pos for _, pos in piece)
        pieces.append(piece)
        start = switch
    return pieces


schedules = raw_schedules().map(Schedule.from_pieces)
small_schedules = raw_schedules(max_pieces=3, max_keyframes=3).map(Schedule.from_pieces)  # four per tag

# Moderate numbers for evaluation properties (no overflow in the reference computation).
moderate_raw = raw_schedules(
    values=st.floats(-10, 10, allow_nan=False), positions=st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0, 6.0]), st.floats(-1, 30))
)

name_text = st.text(
    alphabet=st.characters(blacklist_characters=":>=", blacklist_categories=("Cs",)), min_size=1, max_size=10
).filter(lambda s: s.strip(WHITESPACE))
pass_key = st.text(
    alphabet=st.characters(blacklist_characters=":>=", blacklist_categories=("Cs",)), min_size=1, max_size=6
).filter(lambda s: s.strip(WHITESPACE) and s not in NAMED_KEYS)
pass_value = st.text(alphabet=st.characters(blacklist_characters=":>", blacklist_categories=("Cs",)), max_size=8)


@st.composite
def tags(draw):
    te = draw(small_schedules)
    unet = draw(st.one_of(st.just(te), small_schedules))
    hrte = draw(st.one_of(st.just(te), st.just(unet), small_schedules))
    hrunet = draw(st.one_of(st.just(unet), st.just(hrte), small_schedules))
    return NetworkTag(
        kind=draw(st.sampled_from(KINDS)),
        name=draw(name_text),
        te=te, unet=unet, hrte=hrte, hrunet=hrunet,
        dyn=draw(st.one_of(st.none(), st.integers(0, 999_999_999))),
        passthrough=tuple(draw(st.lists(st.tuples(pass_key, pass_value), max_size=3))),
    )


# -- round trips ------------------------------------------------------------------------------


@SETTINGS
@given(schedules)
def test_schedule_text_round_trip(schedule):
    text = schedule.format()
    again = parse_schedule(text)
    assert again == schedule
    assert hash(again) == hash(schedule)
    assert again.format() == text  # canonical: formatting is a fixed point


@SETTINGS
@given(schedules)
def test_schedule_json_round_trip(schedule):
    assert Schedule.from_json(schedule.to_json()) == schedule


@SETTINGS
@given(tags())
def test_tag_round_trip(tag):
    text = tag.format()
    again = parse_tag(text)
    assert again == tag
    assert again.format() == text


@settings(SETTINGS, max_examples=40)
@given(st.lists(tags(), min_size=1, max_size=3), st.text(alphabet="ab ,>()\n", max_size=5))
def test_tags_are_found_again_in_a_prompt(tag_list, glue):
    # No '<' or ':' in the glue: "<a: " before a tag would make the host regex (and us) read one
    # long "<a:...>" tag that swallows ours, which is the host's behaviour, not a parser bug.
    prompt = (" " + glue + " ").join(t.format() for t in tag_list)
    found = find_tags(prompt)
    assert [m.tag for m in found] == tag_list
    for m in found:
        assert prompt[m.start:m.end] == m.text


# -- robustness: only ScheduleSyntaxError, with a column that points at the text ------------------

grammar_alphabet = list("<>:lorayctunehd=@~,;.+-eE0123456789 xnaif") + ["nan", "inf", "lora", "te=", "hr=", "dyn="]
grammar_text = st.lists(st.sampled_from(grammar_alphabet), max_size=30).map("".join)
any_text = st.one_of(grammar_text, st.text(max_size=30))


def check_error(err: ScheduleSyntaxError, tag: str) -> None:
    assert err.tag == tag
    assert 1 <= err.column <= max(1, len(tag))
    assert tag[err.column - 1:].startswith(err.text)
    assert str(err).startswith(f"{tag}: {err.text!r} at column {err.column} ")


@SETTINGS
@given(any_text)
def test_parse_schedule_only_raises_syntax_errors(text):
    try:
        parse_schedule(text)
    except ScheduleSyntaxError as err:
        check_error(err, text)


@SETTINGS
@given(st.one_of(any_text, st.tuples(st.sampled_from(["<lora:", "<lyco:x:", "<loractl:n:0@0.3:"]), grammar_text).map(
    lambda parts: parts[0] + parts[1].replace(">", "") + ">"
)))
def test_parse_tag_only_raises_syntax_errors(text):
    try:
        parse_tag(text)
    except ScheduleSyntaxError as err:
        check_error(err, text)


@SETTINGS
@given(any_text)
def test_find_tags_never_raises_and_reports_columns_inside_the_tag(prompt):
    for m in find_tags(prompt):
        assert prompt[m.start:m.end] == m.text
        assert (m.tag is None) != (m.error is None)
        if m.error is not None:
            check_error(m.error, m.text)


# -- evaluation against a reference model --------------------------------------------------------


def reference_value(raw: list[list[tuple[float, float | None]]], pos: float) -> float:
    """The doc's semantics, computed naively from the keyframes as written (no tolerance)."""
    start, switches, pieces = 0.0, [], []
    for piece in raw:
        # Stable sort: of keyframes sharing a position, the one written last holds after it.
        kfs = sorted((((start if p is None else p), v) for v, p in piece), key=lambda kf: kf[0])
        pieces.append(kfs)
        start = kfs[-1][0]
        switches.append(start)
    active = next((k for k, s in enumerate(switches[:-1]) if pos < s), len(pieces) - 1)
    kfs = pieces[active]
    if pos <= kfs[0][0]:
        return kfs[0][1]
    if pos >= kfs[-1][0]:
        return kfs[-1][1]
    for (p0, v0), (p1, v1) in zip(kfs, kfs[1:]):
        if p0 <= pos < p1:
            return v0 + (v1 - v0) * (pos - p0) / (p1 - p0)
    raise AssertionError("unreachable")


@SETTINGS
@given(moderate_raw, st.floats(-2, 35))
def test_evaluation_matches_the_reference(raw, pos):
    positions = [p for piece in raw for _, p in piece if p is not None] + [0.0]
    if min(abs(pos - p) for p in positions) < 1e-6:
        pos += 1e-3  # stay clear of breakpoints, where only the tie rules matter (tested by example)
        if min(abs(pos - p) for p in positions) < 1e-6:
            return
    schedule = Schedule.from_pieces(raw)
    assert math.isclose(schedule.at_position(pos), reference_value(raw, pos), rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(moderate_raw.map(Schedule.from_pieces), st.integers(1, 40))
def test_values_stay_within_the_keyframe_values(schedule, steps):
    all_values = [kf.value for piece in schedule.pieces for kf in piece.keyframes]
    got = schedule.values(steps)
    assert len(got) == steps
    assert all(min(all_values) <= v <= max(all_values) for v in got)
    if schedule.is_constant:
        assert len(set(got)) == 1
        assert all(schedule.at_position(p) == got[0] for p in (-1e6, -1, 0.123, 0.5, 7.7, 1e6))


@SETTINGS
@given(schedules, st.floats(-1e300, 1e300), st.floats(-10, 10))
def test_evaluation_is_finite_for_any_schedule(schedule, pos, factor):
    assert math.isfinite(schedule.at_position(pos))
    scaled = schedule.scaled(factor) if all(
        math.isfinite(kf.value * factor) for p in schedule.pieces for kf in p.keyframes
    ) else schedule
    assert math.isfinite(scaled.at_position(pos))


@SETTINGS
@given(moderate_raw.map(Schedule.from_pieces), st.floats(-3, 3), st.floats(-2, 35))
def test_scaled_multiplies_every_evaluation(schedule, factor, pos):
    assert math.isclose(schedule.scaled(factor).at_position(pos), factor * schedule.at_position(pos), rel_tol=1e-9, abs_tol=1e-9)
