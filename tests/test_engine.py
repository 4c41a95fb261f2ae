"""The per-step weight engine: exact restore, exact values, lazy updates, bypass, caching."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from support.sd_layouts import ModuleTree, kohya_lora_state, ldm_state_dict, tiny_sd
from torch import nn

from lib_scheduled_lora.core.delta_cache import DeltaCache
from lib_scheduled_lora.core.engine import (
    EngineSettings,
    ScheduledNetwork,
    ScheduledWeights,
    _bypass_is_cheaper,
)
from lib_scheduled_lora.core.merge import merge_networks
from lib_scheduled_lora.core.networks.loader import load_network
from lib_scheduled_lora.core.schedule import Schedule, parse_schedule

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _model(family: str = "sd1", dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.ModuleDict:
    """A private copy of a tiny SD model (the builder caches its result), as the engine sees it."""
    parts = copy.deepcopy(tiny_sd(family)).components
    return nn.ModuleDict(parts).to(device=device, dtype=dtype)


def _network(tmp_path, family: str = "sd1", seed: int = 0, name: str = "net", select=None):
    state = kohya_lora_state(tiny_sd(family), select=select, seed=seed)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return load_network(path, name=name)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), f"{key} changed"
        assert value.dtype == snapshot[key].dtype


def _sched(text: str) -> Schedule:
    return parse_schedule(text)


def _run(weights: ScheduledWeights, steps: int) -> None:
    weights.set_position("te", 0, steps)
    for i in range(steps):
        weights.set_position("unet", i, steps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_weights_are_bit_identical_after_a_generation(tmp_path, device, dtype, mode):
    model = _model(dtype=dtype, device=device)
    before = _snapshot(model)
    net = ScheduledNetwork(_network(tmp_path), te=_sched("0.5@0,1@1"), unet=_sched("0@0,1@0.5,-0.5@1"))
    with ScheduledWeights(model, [net], EngineSettings(mode=mode)) as weights:
        _run(weights, 7)
        assert weights.stats.layer_updates > 0  # the text encoder is always merged
    _assert_identical(model, before)


@pytest.mark.parametrize("failure", [RuntimeError("sampler broke"), KeyboardInterrupt()])
def test_weights_are_restored_after_an_exception_or_interrupt(tmp_path, failure):
    model = _model(dtype=torch.float16)
    before = _snapshot(model)
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0,1@1"))
    with pytest.raises(type(failure)), ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
        weights.set_position("te", 0, 10)
        for i in range(10):
            weights.set_position("unet", i, 10)
            if i == 4:
                raise failure
    _assert_identical(model, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strength", [0.8, -1.5])
def test_constant_schedule_equals_a_static_merge(tmp_path, dtype, strength):
    """Same weights as baking the network in once (lib_scheduled_lora.core.merge), to one rounding."""
    network = _network(tmp_path)
    model = _model(dtype=dtype)
    static = merge_networks(dict(model.state_dict()), [(network, strength)]).tensors
    assert len(static) > 10
    net = ScheduledNetwork(network, te=Schedule.constant(strength), unet=Schedule.constant(strength))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
        _run(weights, 5)
        live = model.state_dict()
        for key, value in static.items():
            ours, theirs = live[key].float(), value.float()
            one_rounding = torch.finfo(dtype).eps * theirs.abs().clamp_min(torch.finfo(dtype).tiny)
            assert torch.all((ours - theirs).abs() <= one_rounding), key


def test_step_schedule_costs_one_update_at_the_switch(tmp_path):
    model = _model()
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0.3:1"))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
        weights.set_position("te", 0, 20)
        te_updates = weights.stats.layer_updates
        unet_layers = sum(1 for t in weights.iter_targets() if t.component == "unet")
        for i in range(20):
            weights.set_position("unet", i, 20)
            expected = 0 if i < 6 else unet_layers  # 6/19 is the first position >= 0.3
            assert weights.stats.layer_updates - te_updates == expected, i


def test_ramp_updates_at_every_change_only(tmp_path):
    model = _model()
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0,1@0.5"))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge")) as weights:
        unet_layers = sum(1 for t in weights.iter_targets() if t.component == "unet")
        for i in range(11):
            weights.set_position("unet", i, 11)
            weights.set_position("unet", i, 11)  # a second evaluation at the same position is free
        # m = 0 at step 0 (no change from the base), then changes at steps 1..5, flat after.
        assert weights.stats.layer_updates == 5 * unet_layers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_does_not_drift(tmp_path, dtype):
    """Recomputing from the original weights: the history of multipliers leaves no trace."""
    network = _network(tmp_path)
    fresh, model = _model(dtype=dtype), _model(dtype=dtype)
    ramp = ScheduledNetwork(network, te=_sched("1"), unet=_sched("0@0,1@0.01,-1@0.02,0.3@0.03,1@0.04"))
    flat = ScheduledNetwork(network, te=_sched("1"), unet=_sched("1"))
    with ScheduledWeights(model, [ramp], EngineSettings(mode="merge")) as weights:
        for _ in range(3):
            for i in range(0, 5):
                weights.set_position("unet", i, 101)
        after_history = _snapshot(model)
    with ScheduledWeights(fresh, [flat], EngineSettings(mode="merge")) as weights:
        weights.set_position("unet", 0, 101)
        direct = _snapshot(fresh)
    for key in direct:
        if key.startswith("unet."):
            assert torch.equal(after_history[key], direct[key]), key


def test_bypass_gives_the_merged_outputs_without_writing_weights(tmp_path):
    model = _model()
    unet = model["unet"]
    with torch.no_grad():  # tiny_sd draws every weight from N(0, 1): tame it for a real forward
        for p in unet.parameters():
            p.mul_(0.2)
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0,1.3@1"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for mode in ("merge", "bypass"):
        before = _snapshot(unet)
        with torch.no_grad(), ScheduledWeights(model, [net], EngineSettings(mode=mode)) as weights:
            outputs[mode] = []
            for i in range(4):
                weights.set_position("unet", i, 4)
                outputs[mode].append(unet(x, 500, encoder_hidden_states=context).sample)
                if mode == "bypass":
                    _assert_identical(unet, before)
            assert (weights.bypassed_layers() > 0) == (mode == "bypass")
    for merged, bypassed in zip(outputs["merge"], outputs["bypass"]):
        torch.testing.assert_close(bypassed, merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs["merge"][0], outputs["merge"][-1])  # the network did act


def test_two_networks_on_the_same_layers_add_up(tmp_path):
    a, b = _network(tmp_path, seed=1, name="a"), _network(tmp_path, seed=2, name="b")
    model, expected = _model(), _model()
    nets = [
        ScheduledNetwork(a, te=_sched("1"), unet=_sched("0.5")),
        ScheduledNetwork(b, te=_sched("1"), unet=_sched("-2")),
    ]
    static = merge_networks(dict(expected.state_dict()), [(a, 0.5), (b, -2.0)]).tensors
    with ScheduledWeights(model, nets, EngineSettings(mode="merge")) as weights:
        weights.set_position("unet", 0, 10)
        live = model.state_dict()
        for key, value in static.items():
            if key.startswith("unet."):
                torch.testing.assert_close(live[key], value, rtol=1e-6, atol=1e-6)
        assert weights.multipliers("unet") == {"a": 0.5, "b": -2.0}


def test_text_encoder_follows_the_te_schedule_only(tmp_path):
    network = _network(tmp_path)
    model = _model()
    before = _snapshot(model)
    net = ScheduledNetwork(network, te=_sched("0.25"), unet=_sched("1"))
    static = merge_networks(dict(_model().state_dict()), [(network, 0.25)]).tensors
    with ScheduledWeights(model, [net]) as weights:
        weights.set_position("te", 0, 10)
        live = model.state_dict()
        assert all(torch.equal(live[k], before[k]) for k in live if k.startswith("unet."))
        te_keys = [k for k in static if k.startswith("text_encoder.")]
        assert te_keys
        for key in te_keys:
            torch.testing.assert_close(live[key], static[key], rtol=1e-6, atol=1e-6)


def test_delta_cache_is_reused_by_the_next_generation(tmp_path):
    model = _model()
    cache = DeltaCache(2**30)
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0.3:1"))
    rebuilds = []
    for _ in range(2):
        with ScheduledWeights(model, [net], EngineSettings(mode="merge"), cache=cache) as weights:
            _run(weights, 10)
            rebuilds.append(weights.stats.delta_rebuilds)
    assert rebuilds[0] > 0 and rebuilds[1] == 0
    assert cache.bytes > 0


def test_delta_cache_budget_is_respected(tmp_path):
    model = _model()
    net = ScheduledNetwork(_network(tmp_path), te=_sched("1"), unet=_sched("0@0,1@1"))
    with ScheduledWeights(model, [net], EngineSettings(mode="merge", cache_budget_mb=0.01)) as weights:
        _run(weights, 4)
        assert weights.cache.bytes <= 0.01 * 2**20
        assert weights.stats.delta_rebuilds > weights.layers  # rebuilt from factors at each change


def test_fused_attention_rows_in_the_ldm_layout(tmp_path):
    """SD 2's OpenCLIP text encoder fuses q/k/v into in_proj_weight: each LoRA owns its rows."""
    network = _network(tmp_path, family="sd2", select=lambda key: "self_attn_q_proj" in key and "layers_0_" in key)
    model = ModuleTree(ldm_state_dict(tiny_sd("sd2")))
    before = _snapshot(model)
    name = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    d = before[name].shape[0] // 3
    net = ScheduledNetwork(network, te=_sched("1"), unet=_sched("1"))
    with ScheduledWeights(model, [net]) as weights:
        weights.set_position("te", 0, 5)
        live = model.state_dict()[name]
        assert not torch.equal(live[:d], before[name][:d])  # q rows changed
        assert torch.equal(live[d:], before[name][d:])  # k and v rows untouched
    _assert_identical(model, before)


def test_unmatched_keys_are_reported(tmp_path):
    sdxl_net = _network(tmp_path, family="sdxl", name="xl")
    model = _model("sd1")
    with ScheduledWeights(model, [ScheduledNetwork(sdxl_net, _sched("1"), _sched("1"))]) as weights:
        assert weights.unmatched.get("xl")


def test_auto_mode_weighs_low_rank_flops_against_update_bytes():
    layer = type("L", (), {})()
    layer.weight = torch.empty(320, 320)
    factors = type("F", (), {"down": torch.empty(32, 320), "up": torch.empty(320, 32)})()
    assert _bypass_is_cheaper(layer, factors, tokens=16, changes_per_eval=1.0)  # a deep 4x4 level
    assert not _bypass_is_cheaper(layer, factors, tokens=4096, changes_per_eval=1.0)  # 64x64 tokens
    assert not _bypass_is_cheaper(layer, factors, tokens=16, changes_per_eval=0.0)  # never changes


@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_a_partial_network_is_restored_exactly(tmp_path, mode):
    """Only a few layers (proj_in, to_q, the text encoder's q_proj): the rest is never touched."""
    def few(key: str) -> bool:
        return key.endswith(("proj_in", "attn1_to_q", "self_attn_q_proj"))

    model = _model()
    before = _snapshot(model)
    network = _network(tmp_path, select=few)
    assert 0 < len(network.modules) < 60  # of ~300 layers
    net = ScheduledNetwork(network, te=_sched("0.7"), unet=_sched("0@0,2@0.5:0.3"))
    with ScheduledWeights(model, [net], EngineSettings(mode=mode)) as weights:
        _run(weights, 9)
        assert weights.layers == len(network.modules)
    _assert_identical(model, before)


@pytest.mark.parametrize("order", ["full alone", "full then lora", "lora then full"])
def test_bias_change_does_not_depend_on_tag_order(tmp_path, order):
    """A full network with diff_b changes its layer's bias by 1.0, whether or not a LoRA without
    a bias term targets the same layer first."""
    model = _model()
    weight = "unet.down_blocks.0.attentions.0.proj_in.weight"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    shape = tuple(model.get_parameter(weight).shape)
    full = {f"{key}.diff": torch.zeros(shape), f"{key}.diff_b": torch.ones(shape[0])}
    save_file(full, str(tmp_path / "full.safetensors"))
    full_net = ScheduledNetwork(load_network(tmp_path / "full.safetensors", name="full"), te=_sched("1"), unet=_sched("1"))
    lora_net = ScheduledNetwork(
        _network(tmp_path, select=lambda k: k == key), te=_sched("1"), unet=_sched("0")
    )  # targets the same layer, at 0: only the full network's bias change shows
    networks = {"full alone": [full_net], "full then lora": [full_net, lora_net], "lora then full": [lora_net, full_net]}
    bias = model.get_parameter(weight.replace(".weight", ".bias"))
    before = bias.detach().clone()
    with ScheduledWeights(model, networks[order], EngineSettings(mode="merge")) as weights:
        _run(weights, 4)
        torch.testing.assert_close(bias.detach() - before, torch.ones_like(before), atol=1e-6, rtol=0)
    assert torch.equal(bias.detach(), before)
