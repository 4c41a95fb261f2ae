"""The tag grammar (docs/schedule-syntax.md, sections "Tag", "Examples" and "Errors")."""

from __future__ import annotations

import pytest

from lib_scheduled_lora.core.schedule import Schedule, parse_schedule
from lib_scheduled_lora.core.tags import (
    NetworkTag,
    TagMatch,
    find_tags,
    map_tags,
    parse_tag,
    replace_tag,
    tags_in_prompt,
)
from lib_scheduled_lora.errors import ScheduleSyntaxError

S = parse_schedule
ONE = Schedule.constant(1)


def schedules(tag: NetworkTag) -> dict[str, str]:
    return {"te": str(tag.te), "unet": str(tag.unet), "hrte": str(tag.hrte), "hrunet": str(tag.hrunet)}


# -- the document's examples ---------------------------------------------------------------------


def test_doc_constant():
    tag = parse_tag("<lora:x:0.8>")
    assert schedules(tag) == dict.fromkeys(("te", "unet", "hrte", "hrunet"), "0.8")
    assert tag.unet.values(20) == [0.8] * 20


def test_doc_ramp():
    tag = parse_tag("<lora:x:0@0,1@0.5>")
    assert tag.te == tag.unet == S("0@0,1@0.5")
    assert tag.unet.values(20)[10:] == [1.0] * 10
    assert tag.unet.at(5, 20) == pytest.approx(10 / 19)


def test_doc_plain_te_and_unet_step_ramp():
    tag = parse_tag("<lora:x:1:0@5,1@6>")
    assert tag.te == ONE
    assert tag.unet.in_steps
    assert tag.unet.values(20) == [0.0] * 6 + [1.0] * 14


def test_doc_named_te_ramp_and_unet():
    tag = parse_tag("<lora:x:te=0@0,1@1:unet=1>")
    assert tag.te == S("0@0,1@1") and tag.unet == ONE
    assert (tag.hrte, tag.hrunet) == (tag.te, tag.unet)


def test_doc_wday():
    tag = parse_tag("<lora:wday:0@0.3:1>")
    assert tag.name == "wday"
    assert tag.te == tag.unet == S("0@0.3:1")
    assert tag.unet.values(20) == [0.0] * 6 + [1.0] * 14
    assert tag.te.values(20) == [0.0] * 6 + [1.0] * 14


def test_doc_first_half_only():
    assert parse_tag("<lora:x:1@0.5:0>").unet.values(20) == [1.0] * 10 + [0.0] * 10


def test_doc_step_then_ramp():
    tag = parse_tag("<lora:x:0@0.2:0.5,1@1>")
    assert tag.unet == S("0@0.2:0.5,1@1")
    assert tag.unet.at_position(0.2) == 0.5 and tag.unet.at_position(0.19) == 0.0
    assert tag.unet.at_position(0.6) == pytest.approx(0.75)


def test_doc_hires():
    tag = parse_tag("<lora:x:0@0.3:1:hr=0.6>")
    assert tag.schedules(False) == (S("0@0.3:1"), S("0@0.3:1"))
    assert tag.schedules(True) == (Schedule.constant(0.6), Schedule.constant(0.6))
    assert tag.unet.values(20) == [0.0] * 6 + [1.0] * 14


def test_doc_error_example():
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_tag("<lora:x:0@0.3:abc>")
    assert str(info.value) == "<lora:x:0@0.3:abc>: 'abc' at column 15 is not a number"


def test_doc_tag_forms():
    assert schedules(parse_tag("<lora:NAME>")) == dict.fromkeys(("te", "unet", "hrte", "hrunet"), "1")
    assert schedules(parse_tag("<lora:NAME:0.5:0.7>")) == {"te": "0.5", "unet": "0.7", "hrte": "0.5", "hrunet": "0.7"}
    tag = parse_tag("<lora:NAME:0.5:0@0.3:1>")
    assert (tag.te, tag.unet) == (Schedule.constant(0.5), S("0@0.3:1"))


@pytest.mark.parametrize("kind", ["lora", "lyco", "loractl"])
def test_aliases(kind):
    tag = parse_tag(f"<{kind}:x:0@0.3:1>")
    assert tag.kind == kind
    assert tag.format() == f"<{kind}:x:0@0.3:1>"


def test_loractl_difference_a_at_t_colon_b_is_a_step():
    # In loractl this is te=A@T, unet=B; here it is one step schedule (documented difference).
    tag = parse_tag("<lora:x:1@0.5:0>")
    assert tag.te == tag.unet == S("1@0.5:0")


# -- loractl's params_to_weights cases ------------------------------------------------------------


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("<lora:loraname:1.0>", {"te": "1", "unet": "1", "hrte": "1", "hrunet": "1"}),
        ("<lora:loraname:0.5@0,1@1:hr=0.6>", {"te": "0.5@0,1@1", "unet": "0.5@0,1@1", "hrte": "0.6", "hrunet": "0.6"}),
        ("<lora:loraname:te=0.5@0,1@1>", dict.fromkeys(("te", "unet", "hrte", "hrunet"), "0.5@0,1@1")),
        ("<lora:loraname:unet=0.5@0,1@1>", {"te": "1", "unet": "0.5@0,1@1", "hrte": "1", "hrunet": "0.5@0,1@1"}),
        ("<lora:loraname:unet=0.5@0,1@1:hrte=0.5>", {"te": "1", "unet": "0.5@0,1@1", "hrte": "0.5", "hrunet": "0.5@0,1@1"}),
        ("<lora:loraname:hr=0.6:hrte=0.5>", {"te": "1", "unet": "1", "hrte": "0.5", "hrunet": "0.6"}),
        (
            "<lora:loraname:0.8@0.15,0@0.3:hr=0>",
            {"te": "0.8@0.15,0@0.3", "unet": "0.8@0.15,0@0.3", "hrte": "0", "hrunet": "0"},
        ),
    ],
)
def test_loractl_params_to_weights(tag, expected):
    assert schedules(parse_tag(tag)) == expected


# -- arguments ----------------------------------------------------------------------------------


def test_named_overrides_positional():
    tag = parse_tag("<lora:x:0.5:te=0.7>")
    assert tag.te == tag.unet == Schedule.constant(0.7)  # unet falls back to the final te, as in the host
    tag = parse_tag("<lora:x:0.5:0.6:unet=0.8>")
    assert (str(tag.te), str(tag.unet)) == ("0.5", "0.8")


def test_hrunet_falls_back_to_hr_then_unet():
    tag = parse_tag("<lora:x:0.2:0.3:hrunet=0.9>")
    assert schedules(tag) == {"te": "0.2", "unet": "0.3", "hrte": "0.2", "hrunet": "0.9"}
    tag = parse_tag("<lora:x:0.2:0.3:hr=0.5:hrunet=0.9>")
    assert schedules(tag) == {"te": "0.2", "unet": "0.3", "hrte": "0.5", "hrunet": "0.9"}


def test_dyn_positional_and_named():
    assert parse_tag("<lora:x:1:0.5:8>").dyn == 8
    assert parse_tag("<lora:x:dyn=16>").dyn == 16
    assert parse_tag("<lora:x:1:0.5:8:dyn=4>").dyn == 4
    assert parse_tag("<lora:x:0.5>").dyn is None


def test_schedule_continues_until_a_bare_piece_or_a_named_argument():
    tag = parse_tag("<lora:x:0@0.3:1:0.5@0,1@1:hrte=0.5>")
    assert (str(tag.te), str(tag.unet), str(tag.hrte)) == ("0@0.3:1", "0.5@0,1@1", "0.5")
    tag = parse_tag("<lora:x:unet=0@0.5:lbw=1,0:0.7>")
    assert (str(tag.te), str(tag.unet)) == ("0.7", "0@0.5")
    assert tag.passthrough == (("lbw", "1,0"),)
    tag = parse_tag("<lora:x:te=0@0.3:1:unet=0.5>")
    assert (str(tag.te), str(tag.unet)) == ("0@0.3:1", "0.5")


def test_passthrough_kept_verbatim_and_in_order():
    tag = parse_tag("<lora:x:start=3:0.5:lbw=1,0,0,1:stop=10:lbw=2>")
    assert tag.passthrough == (("start", "3"), ("lbw", "1,0,0,1"), ("stop", "10"), ("lbw", "2"))
    assert tag.format() == "<lora:x:0.5:start=3:lbw=1,0,0,1:stop=10:lbw=2>"
    # Keys are matched exactly, as the host does: " te" is not te.
    assert parse_tag("<lora:x: te=0.5>").passthrough == ((" te", "0.5"),)


@pytest.mark.parametrize(
    "name",
    ["wday", "my lora", "style.v2-final", "char [outfit] (v1.5)", " padded ", "名前", "a<b", "under_score"],
)
def test_names_as_the_host_reads_them(name):
    tag = parse_tag(f"<lora:{name}:0@0.3:1>")
    assert tag.name == name
    assert parse_tag(tag.format()) == tag


def test_whitespace_around_numbers_is_allowed():
    tag = parse_tag("<lora:x: 0 @ 0.3 : 1 :hr= 0.6 >")
    assert (str(tag.te), str(tag.hrte)) == ("0@0.3:1", "0.6")


# -- canonical text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("<lora:x:0.8>", "<lora:x:0.8>"),
        ("<lora:x>", "<lora:x:1>"),
        ("<lora:x:1.0>", "<lora:x:1>"),
        ("<lora:x:0.5:0.5>", "<lora:x:0.5>"),  # unet equal to te is a fall-back
        ("<lora:x:0.5:1>", "<lora:x:0.5:1>"),
        ("<lora:x:te=0.5:unet=1>", "<lora:x:0.5:1>"),
        ("<lora:x:1:0@5,1@6>", "<lora:x:1:0@5,1@6>"),
        ("<lora:x:unet=0@5,1@6>", "<lora:x:1:0@5,1@6>"),
        ("<lora:x:te=0@0,1@1:unet=1>", "<lora:x:te=0@0,1@1:unet=1>"),
        ("<lora:x:0@0,1@1:unet=1>", "<lora:x:te=0@0,1@1:unet=1>"),
        ("<lora:x:0.5@0.3:unet=1>", "<lora:x:te=0.5@0.3:unet=1>"),  # "0.5@0.3:1" would be one schedule
        ("<lora:x:te=0@0.3:1:unet=0.5>", "<lora:x:0@0.3:1:0.5>"),
        ("<lora:x:0~0.3;1@0.5>", "<lora:x:0@0.3,1@0.5>"),
        ("<lora:x:0@0.3:1:hr=0.6>", "<lora:x:0@0.3:1:hr=0.6>"),
        ("<lora:x:hr=0.6:hrte=0.5>", "<lora:x:1:hrte=0.5:hrunet=0.6>"),
        ("<lora:x:hrte=0.6:hrunet=0.6>", "<lora:x:1:hr=0.6>"),
        ("<lora:x:0.5:hr=0.5>", "<lora:x:0.5>"),
        ("<lora:x:0.2:0.3:hrte=0.3>", "<lora:x:0.2:0.3:hrte=0.3>"),
        ("<lora:x:1:0.5:8>", "<lora:x:1:0.5:dyn=8>"),
        ("<lora:x:lbw=1,0:0.5:dyn=4>", "<lora:x:0.5:dyn=4:lbw=1,0>"),
    ],
)
def test_canonical_tag(text, canonical):
    tag = parse_tag(text)
    assert tag.format() == canonical == str(tag)
    assert parse_tag(canonical) == tag


def test_equal_meaning_tags_are_equal():
    a, b = parse_tag("<lora:x:0.5:0.5:hr=0.5>"), parse_tag("<lora:x:te=0.5>")
    assert a == b and hash(a) == hash(b)
    assert parse_tag("<lora:x:0.5>") != parse_tag("<lyco:x:0.5>")


def test_repr_is_the_canonical_text():
    assert repr(parse_tag("<lora:x:0~0.3:1.0>")) == "NetworkTag('<lora:x:0@0.3:1>')"


# -- building modified tags --------------------------------------------------------------------


def test_create_applies_fall_backs():
    tag = NetworkTag.create("x", te=S("0.5"), hr=S("0.7"))
    assert schedules(tag) == {"te": "0.5", "unet": "0.5", "hrte": "0.7", "hrunet": "0.7"}
    assert tag.format() == "<lora:x:0.5:hr=0.7>"
    assert NetworkTag.create("x") == parse_tag("<lora:x>")


def test_with_schedules_keeps_fall_backs_following():
    tag = parse_tag("<lora:x:0.5>").with_schedules(te=S("0@0.3:1"))
    assert tag.format() == "<lora:x:0@0.3:1>"
    assert tag.hrunet == S("0@0.3:1")
    tag = parse_tag("<lora:x:0.5:0.7>").with_schedules(te=S("0.2"))
    assert tag.format() == "<lora:x:0.2:0.7>"  # an explicit unet stays
    tag = parse_tag("<lora:x:0.5:hr=0.9>").with_schedules(te=S("0.2"))
    assert tag.format() == "<lora:x:0.2:hr=0.9>"
    tag = parse_tag("<lora:x:0.5>").with_schedules(hr=S("0.1"), hrunet=S("0.2"))
    assert schedules(tag) == {"te": "0.5", "unet": "0.5", "hrte": "0.1", "hrunet": "0.2"}
    with pytest.raises(TypeError):
        parse_tag("<lora:x>").with_schedules(tex=ONE)


def test_replace_and_scaled():
    tag = parse_tag("<lora:x:0@0.3:1:dyn=8:lbw=1>")
    assert tag.replace(name="y", dyn=None).format() == "<lora:y:0@0.3:1:lbw=1>"
    assert tag.replace(unet=S("0.5")).format() == "<lora:x:0@0.3:1:0.5:dyn=8:lbw=1>"
    assert parse_tag("<lora:x:0@0.3:1:hr=0.6>").scaled(0.5).format() == "<lora:x:0@0.3:0.5:hr=0.3>"
    assert parse_tag("<lora:x>").scaled(2).format() == "<lora:x:2>"


@pytest.mark.parametrize(
    "changes",
    [{"kind": "hypernet"}, {"name": "a:b"}, {"name": " "}, {"name": "a=b"}, {"dyn": -1}, {"dyn": 1.5},
     {"passthrough": (("te", "1"),)}, {"passthrough": (("k", "a>b"),)}, {"passthrough": (("", "1"),)}],
)
def test_constructor_rejects_what_a_tag_cannot_carry(changes):
    with pytest.raises(ValueError):
        parse_tag("<lora:x>").replace(**changes)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("<lora::1>", "<lora::1>: ':' at column 6 is not followed by a network name"),
        ("<lora: :1>", "<lora: :1>: ':' at column 6 is not followed by a network name"),
        ("<lora:a=b:1>", "<lora:a=b:1>: 'a=b' at column 7 is a named argument where the network name should be"),
        ("<lora:x:0@0.3::1>", "<lora:x:0@0.3::1>: ':' at column 14 is not followed by a piece"),
        ("<lora:x:1::2>", "<lora:x:1::2>: ':' at column 10 is followed by an empty argument"),
        ("<lora:x:1:>", "<lora:x:1:>: ':' at column 10 is not followed by anything"),
        ("<lora:x:0@0.3:>", "<lora:x:0@0.3:>: ':' at column 14 is not followed by a piece"),
        ("<lora:x:0@0.3,>", "<lora:x:0@0.3,>: ',' at column 14 is not followed by a keyframe"),
        ("<lora:x:0@>", "<lora:x:0@>: '0@' at column 9 has no position after '@'"),
        ("<lora:x:te=1,0.5>", "<lora:x:te=1,0.5>: '0.5' at column 14 has no position; only a piece's first keyframe may leave it out"),
        ("<lora:x:one>", "<lora:x:one>: 'one' at column 9 is not a number"),
        ("<lora:x:nan>", "<lora:x:nan>: 'nan' at column 9 is not a finite number"),
        ("<lora:x:1:2:a>", "<lora:x:1:2:a>: 'a' at column 13 is not a non-negative integer (the third positional argument, dyn)"),
        ("<lora:x:1:2:0@0.5>", "<lora:x:1:2:0@0.5>: '0@0.5' at column 13 is not a non-negative integer (the third positional argument, dyn)"),
        ("<lora:x:dyn=1.5>", "<lora:x:dyn=1.5>: '1.5' at column 13 is not a non-negative integer (dyn)"),
        ("<lora:x:dyn=-1>", "<lora:x:dyn=-1>: '-1' at column 13 is not a non-negative integer (dyn)"),
        ("<lora:x:dyn=9999999999>", "<lora:x:dyn=9999999999>: '9999999999' at column 13 is too large (dyn is a rank limit)"),
        ("<lora:x:1:2:3:4>", "<lora:x:1:2:3:4>: '4' at column 15 is a fourth positional argument (the positional arguments are te, unet, dyn)"),
        ("<lora:x:te=1:te=2>", "<lora:x:te=1:te=2>: 'te=2' at column 14 repeats the argument te="),
        ("<lora:x:dyn=1:dyn=2>", "<lora:x:dyn=1:dyn=2>: 'dyn=2' at column 15 repeats the argument dyn="),
        ("<lora:x:hr=>", "<lora:x:hr=>: 'hr=' at column 9 has no value after 'hr='"),
        ("<lora:x:=3>", "<lora:x:=3>: '=3' at column 9 has no argument name before '='"),
        ("<lora:x:unet=0@0.5:1@0.2>", "<lora:x:unet=0@0.5:1@0.2>: '1@0.2' at column 20 lies before the previous switch at 0.5 (switch positions must not decrease)"),
        ("<hypernet:x:1>", "<hypernet:x:1>: 'hypernet' at column 2 is not a LoRA tag kind (lora, lyco, loractl)"),
        ("<lora:x:1", "<lora:x:1: '<lora:x:1' at column 1 is not a network tag of the form <lora:NAME:...>"),
        ("<lora:x:1> ", "<lora:x:1> : '<lora:x:1> ' at column 1 is not a network tag of the form <lora:NAME:...>"),
    ],
)
def test_error_messages(text, message):
    with pytest.raises(ScheduleSyntaxError) as info:
        parse_tag(text)
    assert str(info.value) == message
    err = info.value
    assert err.tag == text
    assert 1 <= err.column <= len(text)
    assert text[err.column - 1:].startswith(err.text)


# -- prompts ----------------------------------------------------------------------------------


PROMPT = "a cat, <lora:wday:0@0.3:1>, <hypernet:h:1> <lyco:bad:abc> and <loractl:z:0.5:hr=0.2>"


def test_find_tags():
    matches = find_tags(PROMPT)
    assert [m.text for m in matches] == ["<lora:wday:0@0.3:1>", "<lyco:bad:abc>", "<loractl:z:0.5:hr=0.2>"]
    for m in matches:
        assert PROMPT[m.start:m.end] == m.text
    assert matches[0].ok and matches[0].tag == parse_tag("<lora:wday:0@0.3:1>")
    assert not matches[1].ok and matches[1].tag is None
    assert str(matches[1].error) == "<lyco:bad:abc>: 'abc' at column 11 is not a number"
    assert matches[2].tag.hrunet == Schedule.constant(0.2)


def test_find_tags_uses_the_host_regex():
    # The host's "[^>]+" runs to the first '>', and "\w+" needs a word right after '<'.
    assert [m.text for m in find_tags("<lora:a<lora:b:1>")] == ["<lora:a<lora:b:1>"]
    assert find_tags("< lora:x:1> <lora:> <:x> <LORA:x:1>") == []
    assert [m.tag.name for m in find_tags("<lora:x\ny:1>")] == ["x\ny"]


def test_parse_prompt_raises_the_first_error():
    assert [t.name for _, t in tags_in_prompt("<lora:a:1> x <lyco:b:0@0.3:1>")] == ["a", "b"]
    with pytest.raises(ScheduleSyntaxError) as info:
        tags_in_prompt(PROMPT)
    assert info.value.tag == "<lyco:bad:abc>"
    assert tags_in_prompt("no tags <hypernet:x:1>") == []


def test_replace_tag():
    match = find_tags(PROMPT)[0]
    new = match.tag.with_schedules(hr=Schedule.constant(0.6))
    assert replace_tag(PROMPT, match, new) == PROMPT.replace("<lora:wday:0@0.3:1>", "<lora:wday:0@0.3:1:hr=0.6>")
    assert replace_tag("x <lora:a:1> y", find_tags("x <lora:a:1> y")[0], "<lora:b:2>") == "x <lora:b:2> y"
    with pytest.raises(ValueError):
        replace_tag("changed " + PROMPT, match, new)
    with pytest.raises(ValueError):
        replace_tag(PROMPT, TagMatch(0, 5, "<lora"), new)


def test_map_tags_rewrites_every_tag_and_keeps_the_rest():
    out = map_tags(PROMPT, lambda m: m.tag.scaled(2) if m.ok else None)
    assert out == "a cat, <lora:wday:0@0.3:2>, <hypernet:h:1> <lyco:bad:abc> and <loractl:z:1:hr=0.4>"
