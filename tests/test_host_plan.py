"""Tag planning (which tags the host keeps), validation, batch warning, XYZ rewriting, install.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_scheduled_lora.core.tags import parse_tag
from lib_scheduled_lora.errors import MissingNetworkError, ScheduleSyntaxError
from lib_scheduled_lora.hosts import xyz
from lib_scheduled_lora.hosts.ownership import (
    Owner,
    TagIndex,
    batch_warning,
    host_strengths,
    is_ours,
    rewrite_params,
    route,
    scheduled_tags,
    validate_prompts,
)

ROOT = Path(__file__).resolve().parent.parent


def P(*items):
    return SimpleNamespace(items=list(items))


@dataclass
class Split:
    host: list
    ours: list
    ignored: list


def split_params(kind, params_list, enabled, tags=None):
    """route() then rewrite_params(), as the A1111 handler wrapper does."""
    routes = route(kind, params_list, enabled, tags or TagIndex())
    rewrite_params(routes)
    return Split(
        host=[r.params for r in routes if r.owner is Owner.HOST],
        ours=[r.tag for r in routes if r.owner is Owner.OURS],
        ignored=[r.text for r in routes if r.owner is Owner.DROPPED],
    )


def test_split_keeps_plain_params_objects_and_takes_schedules():
    plain, plain2, sched, named = (
        P("a", "0.8"),
        P("b", "0.5", "1", "lbw=OUTD"),
        P("c", "0@0.3", "1"),
        P("d", "hr=0.5"),
    )
    split = split_params("lora", [plain, plain2, sched, named], enabled=True)
    assert split.host == [plain, plain2]
    assert [t.format() for t in split.ours] == ["<lora:c:0@0.3:1>", "<lora:d:1:hr=0.5>"]
    off = split_params("lora", [plain, sched, P("x", "0@abc")], enabled=False)
    assert off.host == [plain] and off.ignored == ["<lora:c:0@0.3:1>", "<lora:x:0@abc>"]


def test_constant_schedules_become_plain_host_params():
    class Params(SimpleNamespace):
        pass

    split = split_params(
        "lora", [Params(items=["a", "0.8@0,0.8@1", "lbw=X"]), Params(items=["b", "0.5", "hr=0.5"])], True
    )
    assert [p.items for p in split.host] == [["a", "0.8", "0.8", "lbw=X"], ["b", "0.5", "hr=0.5"]]
    assert all(isinstance(p, Params) for p in split.host) and split.ours == []


def _block_weight_reader(items):
    """How LoRA Block Weight reads a tag (lora_block_weight.py syntaxdealer + multidealer): te and
    unet from ``te=``/``unet=`` or positions 1 and 2 (an ``@`` there reads as 1), then float()."""

    def pick(key, index):
        for item in items:
            if key in item:
                return item.replace(key, "")
        if index + 1 > len(items) or "=" in items[index]:
            return None
        return items[index] if "@" not in items[index] else 1

    te, unet = pick("te=", 1), pick("unet=", 2)
    te = 1 if te is None and unet is None else te if te is not None else unet
    unet = te if unet is None else unet
    return float(te), float(unet)


def test_other_extensions_read_plain_numbers_and_never_a_schedule():
    """After activation the params objects (shared with every reader of the prompt's network
    data) hold the host's plain numbers for constant schedules, and a stand-in for scheduled
    tags, while we still find our tags in them."""
    tags = ["0.5@0,0.5@1:lbw=OUTS", "0~0.3:1", "te=1:unet=0@0.3:1", "unet=0.5@0,0.5@1", "0@0.3:1"]
    params = [P(f"n{i}", *text.split(":")) for i, text in enumerate(tags)]
    with pytest.raises(ValueError):
        [_block_weight_reader(p.items) for p in params]  # what LoRA Block Weight did before
    data = {"lora": params}
    split = split_params("lora", params, enabled=True)
    assert [p.items for p in split.host] == [["n0", "0.5", "0.5", "lbw=OUTS"], ["n3", "1", "0.5"]]
    assert [_block_weight_reader(p.items) for p in params] == [(0.5, 0.5), (1.0, 1.0), (1.0, 1.0), (1.0, 0.5), (1.0, 1.0)]
    assert params[1].items[0] == "n1" and params[1].items[1].startswith("scheduled_lora=")
    assert [t.format() for t in scheduled_tags(data, TagIndex())] == ["<lora:n1:0@0.3:1>", "<lora:n2:1:0@0.3:1>", "<lora:n4:0@0.3:1>"]
    again = split_params("lora", params, enabled=True)  # the hires pass re-activates: same result
    assert [t.format() for t in again.ours] == [t.format() for t in split.ours]
    # Two schedules of one network stay distinct for the host's conditioning cache (items ==).
    a, b = P("x", "0@0.3", "1"), P("x", "0@0.6", "1")
    split_params("lora", [a, b], enabled=True)
    assert a.items != b.items


def test_block_weight_arguments_on_scheduled_tags_are_errors():
    files = {"a": "/x/a.safetensors"}.get
    validate_prompts(["<lora:a:0.5:lbw=OUTS:start=3>"], files, TagIndex())  # plain: the host's and LBW's
    with pytest.raises(ScheduleSyntaxError) as error:
        validate_prompts(["cat <lora:a:0@0.3:1:lbw=OUTS>"], files, TagIndex())
    assert error.value.column == 17 and error.value.text == "lbw=OUTS"
    assert "LoRA Block Weight" in str(error.value) and "plain strength" in str(error.value)
    with pytest.raises(ScheduleSyntaxError, match="start=N is 0@N:1"):
        validate_prompts(["<lora:a:0@0,1@1:start=3>"], files, TagIndex())


def test_split_passes_host_additional_network_entries():
    extra = SimpleNamespace(items=["add", 0.7])  # the host appends a float for its "Additional network"
    assert split_params("lora", [extra], enabled=True).host == [extra]


def test_scheduled_tags_from_extra_network_data_all_kinds():
    data = {"lora": [P("a", "0.5"), P("b", "0@0.5:1")], "loractl": [P("c", "0.5")], "hypernet": [P("h")]}
    assert [t.format() for t in scheduled_tags(data, TagIndex())] == ["<lora:b:0@0.5:1>", "<loractl:c:0.5>"]


def test_validate_reports_syntax_missing_and_returns_ours():
    files = {"a": "/x/a.safetensors", "b": "/x/b.safetensors"}
    ours = validate_prompts(["<lora:a:0.5> <lora:b:0@0.3:1>"], files.get, TagIndex())
    assert [t.name for t in ours] == ["b"]
    with pytest.raises(ScheduleSyntaxError, match="column"):
        validate_prompts(["<lora:a:0@0.3:abc>"], files.get, TagIndex())
    with pytest.raises(MissingNetworkError, match="'zz'"):
        validate_prompts(["<lora:zz:0.5>"], files.get, TagIndex())


def test_batch_warning_only_when_schedules_differ():
    assert batch_warning(["<lora:a:0@0.3:1> x", "<lora:a:0@0.3:1> y"], TagIndex()) is None
    assert batch_warning(["<lora:a:0.5>", "<lora:a:0.7>"], TagIndex()) is None  # plain ones: the host's business
    assert "prompt(s) 2" in batch_warning(["<lora:a:0@0.3:1>", "<lora:a:0@0.6:1>"], TagIndex())


def test_xyz_schedule_axis_rewrites_scheduled_tags_or_named():
    prompt = "cat <lora:a:0@0.3:1> <lora:b:0.5> <lora:c:1:0@0.5:1:lbw=X>"
    out = xyz.apply_schedule(prompt, "1@0.5:0")
    assert out == "cat <lora:a:1@0.5:0> <lora:b:0.5> <lora:c:1:1@0.5:0:lbw=X>"
    assert (
        xyz.apply_schedule(prompt, "b=0@0;1@1")
        == "cat <lora:a:0@0.3:1> <lora:b:0@0,1@1> <lora:c:1:0@0.5:1:lbw=X>"
    )
    assert xyz.schedule_label("b = 0@0;1@1") == "b=0@0,1@1"


def test_xyz_switch_strength_hires():
    prompt = "<lora:a:0@0.3:1> <lora:b:0.5>"
    assert xyz.apply_switch(prompt, "0.6") == "<lora:a:0@0.6:1> <lora:b:0.5>"
    assert xyz.apply_switch(prompt, "8") == "<lora:a:0@8:1> <lora:b:0.5>"
    assert xyz.apply_strength(prompt, "0.5") == "<lora:a:0@0.3:0.5> <lora:b:0.5>"
    assert xyz.apply_strength(prompt, "b=2") == "<lora:a:0@0.3:1> <lora:b:1>"
    assert xyz.apply_hires(prompt, "0.6") == "<lora:a:0@0.3:1:hr=0.6> <lora:b:0.5>"
    assert parse_tag("<lora:a:0@0.3:1:hr=0.6>").schedules(True)[1].at(0, 10) == 0.6
    assert xyz.number_label("a=0.50") == "a=0.5"
    with pytest.raises(ScheduleSyntaxError):
        xyz.number_label("abc")
    with pytest.raises(ScheduleSyntaxError):
        xyz.schedule_label("0@0.3:x")


def _install_module():
    spec = importlib.util.spec_from_file_location("sl_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_installs_only_what_is_missing_with_the_hosts_pip():
    install = _install_module()
    calls = []
    launch = SimpleNamespace(
        is_installed=lambda name: name != "safetensors", run_pip=lambda cmd, desc=None: calls.append(cmd)
    )
    assert install.main(launch) == ["safetensors>=0.4"]
    assert calls == ["install safetensors>=0.4"]
    calls.clear()
    launch.is_installed = lambda name: name not in ("torch", "gradio")
    assert install.main(launch) == [] and calls == []  # never torch/gradio, never an upgrade


@pytest.mark.parametrize("value", ["1_0", "nan", "inf", "0x1", "1e999", "１"])
def test_xyz_numbers_follow_the_schedule_grammar(value):
    # float() accepts all of these ("1_0" became a strength of 10); the schedule grammar none.
    with pytest.raises(ScheduleSyntaxError, match="is not a"):
        xyz.apply_strength("<lora:a:0@0.3:1>", value)
    with pytest.raises(ScheduleSyntaxError, match="is not a"):
        xyz.apply_switch("<lora:a:0@0.3:1>", f"a={value}")


@pytest.mark.parametrize(
    "text, strengths",
    [
        ("<lora:x>", (1.0, 1.0)),
        ("<lora:x:0.8>", (0.8, 0.8)),
        ("<lyco:x:0.5:0.7:8:lbw=1,0>", (0.5, 0.7)),
        ("<lora:x:0.5:hr=0.5>", (0.5, 0.5)),  # the host ignores hr=, but the value is the same
        ("<lora:x:0.5:hrte=0.5@0.3>", (0.5, 0.5)),  # a constant written with a position
        ("<lora:x:0.5@0.3>", (0.5, 0.5)),  # constant: the host gets it as plain numbers
        ("<lora:x:1@0.5:1>", (1.0, 1.0)),
        ("<loractl:x:0.8>", None),  # the host does not know this kind
        ("<lora:x:0.5:hr=0.6>", None),  # the host would ignore hr=
        ("<lora:x:0@0.3:1>", None),
        ("<lora:x:1:0@5,1@6>", None),
    ],
)
def test_one_decision_says_which_tags_the_host_keeps(text, strengths):
    tag = parse_tag(text)
    assert host_strengths(tag) == strengths
    assert is_ours(tag) is (strengths is None)
