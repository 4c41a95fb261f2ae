"""The algorithm functions and module classes against first-principles maths (no third-party code).

Each ΔW is checked through what it must *do* to a layer: e.g. a LoCon ΔW convolved with x must
equal the 1x1 up-conv of the kxk down-conv of x; a Kronecker ΔW must be the block matrix of
w1[i, j] · w2. The oracles against LyCORIS and diffusers/PEFT are in test_oracles_*.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_scheduled_lora.core.networks import algorithms as alg
from lib_scheduled_lora.core.networks.modules import (
    FullModule,
    IA3Module,
    LohaModule,
    LokrModule,
    LoraModule,
    NormModule,
    build_module,
)
from lib_scheduled_lora.errors import NetworkFileError

ATOL = 1e-5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- LoRA / LoCon ------------------------------------------------------------------------------


def test_lora_linear_is_up_times_down():
    up, down = rand(6, 3, seed=1), rand(3, 5, seed=2)
    x = rand(4, 5, seed=3)
    delta = alg.lora(up, down)
    assert delta.shape == (6, 5)
    torch.testing.assert_close(x @ delta.T, (x @ down.T) @ up.T, atol=ATOL, rtol=0)


def test_locon_delta_equals_kxk_down_then_1x1_up():
    up, down = rand(6, 3, 1, 1, seed=1), rand(3, 4, 3, 3, seed=2)
    x = rand(2, 4, 7, 7, seed=3)
    delta = alg.lora(up, down)
    assert delta.shape == (6, 4, 3, 3)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), F.conv2d(F.conv2d(x, down, padding=1), up), atol=ATOL, rtol=0)


def test_tucker_lora_equals_down_mid_up_chain():
    down, mid, up = rand(3, 4, 1, 1, seed=1), rand(3, 3, 3, 3, seed=2), rand(6, 3, 1, 1, seed=3)
    x = rand(2, 4, 7, 7, seed=4)
    delta = alg.lora(up, down, mid)
    assert delta.shape == (6, 4, 3, 3)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), chain, atol=1e-4, rtol=0)


# -- LoHa --------------------------------------------------------------------------------------


def test_loha_is_hadamard_of_two_low_rank_products():
    w1a, w1b, w2a, w2b = rand(6, 2, seed=1), rand(2, 5, seed=2), rand(6, 2, seed=3), rand(2, 5, seed=4)
    delta = alg.loha(w1a, w1b, w2a, w2b)
    for i in range(6):
        for j in range(5):
            expected = sum(w1a[i, r] * w1b[r, j] for r in range(2)) * sum(w2a[i, r] * w2b[r, j] for r in range(2))
            assert abs(delta[i, j] - expected) < ATOL


def test_tucker_loha_halves_are_tucker_rebuilds():
    t1, w1a, w1b = rand(2, 2, 3, 3, seed=1), rand(2, 6, seed=2), rand(2, 4, seed=3)
    t2, w2a, w2b = rand(2, 2, 3, 3, seed=4), rand(2, 6, seed=5), rand(2, 4, seed=6)
    delta = alg.loha(w1a, w1b, w2a, w2b, t1, t2)
    assert delta.shape == (6, 4, 3, 3)

    def half(t, wa, wb):  # W[p, r, k, l] = Σ_ij t[i, j, k, l] wa[i, p] wb[j, r], written as loops
        out = torch.zeros(6, 4, 3, 3)
        for i in range(2):
            for j in range(2):
                out += t[i, j][None, None] * (wa[i][:, None] * wb[j][None, :])[:, :, None, None]
        return out

    torch.testing.assert_close(delta, half(t1, w1a, w1b) * half(t2, w2a, w2b), atol=1e-4, rtol=0)


# -- LoKr --------------------------------------------------------------------------------------


def test_lokr_is_kronecker_block_matrix():
    w1, w2 = rand(2, 3, seed=1), rand(4, 5, seed=2)
    delta = alg.lokr(w1, w2)
    assert delta.shape == (8, 15)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(delta[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5], w1[i, j] * w2)


def test_lokr_conv_flat_and_4d_w2_give_the_same_layer_weight():
    w1 = rand(2, 2, seed=1)
    w2 = rand(3, 4, 3, 3, seed=2)
    as_4d = alg.lokr(w1, w2)
    as_flat = alg.lokr(w1, w2.reshape(3, -1))
    assert as_4d.shape == (6, 8, 3, 3)
    torch.testing.assert_close(as_flat.reshape(as_4d.shape), as_4d)
    # every kernel tap is the Kronecker product of w1 and that tap of w2
    torch.testing.assert_close(as_4d[:, :, 1, 2], torch.kron(w1, w2[:, :, 1, 2]))


def test_lokr_factor_variants():
    wa, wb = rand(4, 2, seed=1), rand(2, 5, seed=2)
    torch.testing.assert_close(alg.lokr_factor(None, wa, wb), wa @ wb)
    t, ta, tb = rand(2, 2, 3, 3, seed=3), rand(2, 4, seed=4), rand(2, 5, seed=5)
    expected = torch.einsum("ijkl,ip,jr->prkl", t, ta, tb)
    torch.testing.assert_close(alg.lokr_factor(None, ta, tb, t), expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        alg.lokr_factor(None, wa, None)


# -- IA3, full, norm ---------------------------------------------------------------------------


def test_ia3_scales_input_or_output_channels():
    weight, w_out, w_in = rand(6, 5, seed=1), rand(6, seed=2), rand(5, seed=3)
    torch.testing.assert_close(alg.ia3(weight, w_out, on_input=False), torch.diag(w_out) @ weight)
    torch.testing.assert_close(alg.ia3(weight, w_in, on_input=True), weight @ torch.diag(w_in))
    conv = rand(6, 5, 3, 3, seed=4)
    lyco_layout = w_in.reshape(1, 5, 1, 1)  # LyCORIS stores conv IA3 vectors as [1, C, 1, 1]
    torch.testing.assert_close(alg.ia3(conv, lyco_layout, on_input=True), conv * w_in[None, :, None, None])
    with pytest.raises(ValueError, match="input channels"):
        alg.ia3(weight, w_out, on_input=True)


# -- DoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_output", [True, False])
def test_dora_gives_the_magnitudes_and_keeps_directions(per_output):
    base, delta = rand(6, 4, seed=1), rand(6, 4, seed=2) * 0.3
    axis_len = 6 if per_output else 4
    magnitude = rand(axis_len, seed=3).abs() + 0.5
    magnitude = magnitude.reshape(6, 1) if per_output else magnitude.reshape(1, 4)
    result = base + alg.dora(base, delta, magnitude)
    norms = result.norm(dim=1 if per_output else 0)
    torch.testing.assert_close(norms, magnitude.reshape(-1), atol=1e-5, rtol=1e-5)
    direction = (base + delta) / (base + delta).norm(dim=1 if per_output else 0, keepdim=True)
    torch.testing.assert_close(result / norms.reshape(magnitude.shape), direction, atol=1e-5, rtol=1e-5)


def test_dora_conv_per_output_and_per_input():
    base, delta = rand(6, 4, 3, 3, seed=1), rand(6, 4, 3, 3, seed=2) * 0.3
    out_mag = rand(6, 1, 1, 1, seed=3).abs() + 0.5
    result = base + alg.dora(base, delta, out_mag)
    torch.testing.assert_close(result.reshape(6, -1).norm(dim=1), out_mag.reshape(-1), atol=1e-5, rtol=1e-5)
    in_mag = rand(1, 4, 1, 1, seed=4).abs() + 0.5
    result = base + alg.dora(base, delta, in_mag)
    torch.testing.assert_close(result.transpose(0, 1).reshape(4, -1).norm(dim=1), in_mag.reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("magnitude_shape", "weight_shape", "per_output"),
    [
        ((8, 1), (8, 8), True),  # square weight: the [out, 1] layout still says per-output
        ((1, 8), (8, 8), False),
        ((8, 1, 1, 1), (8, 4, 3, 3), True),
        ((1, 4, 1, 1), (8, 4, 3, 3), False),
        ((8,), (8, 4), True),
        ((4,), (8, 4), False),
        ((8,), (8, 8), False),  # 1-D and square: legacy per-input
    ],
)
def test_dora_convention_is_read_from_the_shape(magnitude_shape, weight_shape, per_output):
    assert alg.dora_is_per_output(torch.ones(magnitude_shape), weight_shape) is per_output


# -- Module classes: scale rules, reshapes, dtypes ---------------------------------------------


def lora_weights(out=6, inp=5, rank=3, alpha=None, conv=None, seed=0, dtype=torch.float32):
    if conv:
        weights = {"lora_up.weight": rand(out, rank, 1, 1, seed=seed), "lora_down.weight": rand(rank, inp, *conv, seed=seed + 1)}
    else:
        weights = {"lora_up.weight": rand(out, rank, seed=seed), "lora_down.weight": rand(rank, inp, seed=seed + 1)}
    if alpha is not None:
        weights["alpha"] = torch.tensor(float(alpha))
    return {k: v.to(dtype) for k, v in weights.items()}


def test_lora_scale_is_alpha_over_rank_and_defaults_to_one():
    base = rand(6, 5, seed=9)
    plain = alg.lora(*(lora_weights()[k] for k in ("lora_up.weight", "lora_down.weight")))
    with_alpha = LoraModule("k", lora_weights(alpha=1.5))
    assert with_alpha.rank == 3 and with_alpha.alpha == 1.5 and with_alpha.scale == 0.5
    torch.testing.assert_close(with_alpha.weight_delta(base), plain * 0.5)
    no_alpha = LoraModule("k", lora_weights())
    assert no_alpha.alpha is None and no_alpha.scale == 1.0
    torch.testing.assert_close(no_alpha.weight_delta(base), plain)
    overridden = LoraModule("k", {**lora_weights(alpha=1.5), "scale": torch.tensor(0.25)})
    assert overridden.scale == 0.25


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_computed_in_float32(dtype):
    module = LoraModule("k", lora_weights(alpha=2, dtype=dtype))
    base = rand(6, 5, seed=9).to(dtype)
    delta = module.weight_delta(base)
    assert delta.dtype == torch.float32 and delta.shape == base.shape
    up, down = (lora_weights(dtype=dtype)[k].float() for k in ("lora_up.weight", "lora_down.weight"))
    torch.testing.assert_close(delta, (up @ down) * (2 / 3))


def test_1x1_conv_lora_fits_a_linear_layer_and_back():
    conv_module = LoraModule("k", lora_weights(conv=(1, 1), alpha=3))
    linear_base = rand(6, 5, seed=9)
    delta = conv_module.weight_delta(linear_base)
    assert delta.shape == (6, 5)
    linear_module = LoraModule("k", lora_weights(alpha=3))
    conv_base = rand(6, 5, 1, 1, seed=9)
    torch.testing.assert_close(linear_module.weight_delta(conv_base), delta.reshape(6, 5, 1, 1))


def test_shape_mismatch_names_the_module_and_file():
    module = LoraModule("lora_unet_x", lora_weights(), source="net.safetensors")
    with pytest.raises(NetworkFileError, match=r"net\.safetensors: lora_unet_x: .*\[6, 5\].*\[7, 5\]"):
        module.weight_delta(torch.zeros(7, 5))


def test_mismatched_ranks_are_a_file_error():
    weights = {"lora_up.weight": rand(6, 2), "lora_down.weight": rand(3, 5)}
    with pytest.raises(NetworkFileError, match="different ranks"):
        build_module("lora_unet_x", weights, "f.safetensors")


def test_loha_rank_and_scale():
    weights = {"hada_w1_a": rand(6, 2), "hada_w1_b": rand(2, 5, seed=1), "hada_w2_a": rand(6, 2, seed=2),
               "hada_w2_b": rand(2, 5, seed=3), "alpha": torch.tensor(1.0)}
    module = LohaModule("k", weights)
    assert module.rank == 2 and module.scale == 0.5
    expected = alg.loha(weights["hada_w1_a"], weights["hada_w1_b"], weights["hada_w2_a"], weights["hada_w2_b"]) * 0.5
    torch.testing.assert_close(module.weight_delta(torch.zeros(6, 5)), expected)


def test_lokr_alpha_applies_only_to_a_factorised_side():
    w1, w2 = rand(2, 3), rand(4, 5, seed=1)
    whole = LokrModule("k", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(8.0)})
    assert whole.rank is None and whole.scale == 1.0  # A1111: no dim, so alpha is ignored
    torch.testing.assert_close(whole.weight_delta(torch.zeros(8, 15)), torch.kron(w1, w2))
    w2a, w2b = rand(4, 2, seed=2), rand(2, 5, seed=3)
    split = LokrModule("k", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert split.rank == 2 and split.scale == 0.5
    torch.testing.assert_close(split.weight_delta(torch.zeros(8, 15)), torch.kron(w1, w2a @ w2b) * 0.5)
    w1a, w1b = rand(2, 1, seed=4), rand(1, 3, seed=5)
    both = LokrModule("k", {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert both.rank == 2  # w2's rank, as A1111 reads lokr_w2_b last


def test_ia3_ignores_alpha_and_depends_on_the_base():
    w = rand(6, seed=1)
    module = IA3Module("k", {"weight": w, "on_input": torch.tensor(0), "alpha": torch.tensor(4.0)})
    base = rand(6, 5, seed=2)
    assert module.scale == 1.0
    torch.testing.assert_close(module.weight_delta(base), base * w[:, None])
    on_input = IA3Module("k", {"weight": rand(5, seed=3), "on_input": torch.tensor(True)})
    assert on_input.on_input


def test_full_and_norm_have_weight_and_bias_deltas():
    diff, diff_b = rand(6, 5), rand(6, seed=1)
    full = FullModule("k", {"diff": diff.half(), "diff_b": diff_b.half()})
    torch.testing.assert_close(full.weight_delta(torch.zeros(6, 5)), diff.half().float())
    bias = full.bias_delta(torch.zeros(6))
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, diff_b.half().float())
    assert LoraModule("k", lora_weights()).bias_delta(torch.zeros(6)) is None
    norm = NormModule("k", {"w_norm": rand(8, seed=2), "b_norm": rand(8, seed=3)})
    torch.testing.assert_close(norm.weight_delta(torch.ones(8)), rand(8, seed=2))
    torch.testing.assert_close(norm.bias_delta(None), rand(8, seed=3))


def test_dora_module_returns_dora_weight_minus_base():
    weights = {**lora_weights(alpha=1.5), "dora_scale": rand(6, 1, seed=7).abs() + 1}
    module = LoraModule("k", weights)
    assert module.dora and module.low_rank() is None
    base = rand(6, 5, seed=9)
    plain = LoraModule("k", lora_weights(alpha=1.5)).weight_delta(base)
    merged = base + plain
    expected = merged * (weights["dora_scale"] / merged.norm(dim=1, keepdim=True)) - base
    torch.testing.assert_close(module.weight_delta(base), expected, atol=1e-5, rtol=1e-5)


def test_unknown_and_partial_groups():
    module, unused = build_module("k", {"lora_up.weight": rand(6, 3)})
    assert module is None and unused == ["lora_up.weight"]
    module, unused = build_module("k", {**lora_weights(), "lokr_t1": rand(1), "alpha": torch.tensor(1.0)})
    assert isinstance(module, LoraModule) and unused == ["lokr_t1"]
    module, unused = build_module("k", {"lora_A.weight": rand(3, 5), "lora_B.weight": rand(6, 3)})
    assert isinstance(module, LoraModule) and unused == []


# -- Bypass factors reproduce the merged weight ------------------------------------------------


def bypass(factors, x, conv_padding=None):
    if factors.down.dim() == 2:
        return F.linear(F.linear(x, factors.down), factors.up) * factors.scale
    h = F.conv2d(x, factors.down, padding=conv_padding if factors.mid is None else 0)
    if factors.mid is not None:
        h = F.conv2d(h, factors.mid, padding=conv_padding)
    return F.conv2d(h, factors.up) * factors.scale


@pytest.mark.parametrize(
    ("weights", "target"),
    [
        (lora_weights(alpha=2), (6, 5)),
        (lora_weights(alpha=2, conv=(3, 3)), (6, 5, 3, 3)),
        (lora_weights(alpha=2, conv=(1, 1)), (6, 5)),  # SD1 1x1-conv proj_in LoRA on a Linear proj_in
        (lora_weights(alpha=2), (6, 5, 1, 1)),
        ({**lora_weights(alpha=2, conv=(1, 1)), "lora_mid.weight": rand(3, 3, 3, 3, seed=5)}, (6, 5, 3, 3)),
    ],
)
def test_low_rank_factors_match_weight_delta(weights, target):
    module = LoraModule("k", weights)
    base = torch.zeros(target)
    delta = module.weight_delta(base)
    factors = module.low_rank(target)
    if len(target) == 2:
        x = rand(3, target[1], seed=8)
        torch.testing.assert_close(bypass(factors, x), F.linear(x, delta), atol=1e-4, rtol=0)
    else:
        x = rand(2, target[1], 5, 5, seed=8)
        pad = target[2] // 2
        torch.testing.assert_close(bypass(factors, x, pad), F.conv2d(x, delta, padding=pad), atol=1e-4, rtol=0)
    own = module.low_rank()  # the file's own layout
    assert own.scale == factors.scale == module.scale


def test_low_rank_is_none_for_other_algorithms():
    loha = LohaModule("k", {"hada_w1_a": rand(6, 2), "hada_w1_b": rand(2, 5), "hada_w2_a": rand(6, 2), "hada_w2_b": rand(2, 5)})
    assert loha.low_rank() is None


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 6), inp=st.integers(1, 6), rank=st.integers(1, 4),
    alpha=st.one_of(st.none(), st.floats(0.1, 16)), mult=st.floats(-2, 2),
)
def test_weight_delta_is_linear_in_the_factors(out, inp, rank, alpha, mult):
    """Property: scaling lora_up by c scales ΔW by c; ΔW·(rank/alpha) does not depend on alpha."""
    weights = lora_weights(out, inp, rank, alpha)
    base = torch.zeros(out, inp)
    delta = LoraModule("k", weights).weight_delta(base)
    scaled = LoraModule("k", {**weights, "lora_up.weight": weights["lora_up.weight"] * mult}).weight_delta(base)
    torch.testing.assert_close(scaled, delta * mult, atol=1e-4, rtol=1e-4)
    unscaled = delta / (alpha / rank if alpha is not None else 1.0)
    torch.testing.assert_close(unscaled, weights["lora_up.weight"] @ weights["lora_down.weight"], atol=1e-4, rtol=1e-4)
    assert not math.isnan(float(delta.sum()))


# -- dyn= (rank limit) ---------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True])
def test_rank_limit_keeps_the_first_components_and_the_file_scale(conv):
    """``dyn=k``: ΔW = up[:, :k] · down[:k] · alpha / r — the scale stays that of the full rank,
    as the WebUI's rebuild_conventional cuts the factors after calc_scale read the file's rank."""
    up = rand(6, 4, 1, 1, seed=1) if conv else rand(6, 4, seed=1)
    down = rand(4, 5, 3, 3, seed=2) if conv else rand(4, 5, seed=2)
    weights = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}
    module = LoraModule("k", weights)
    base = rand(6, 5, 3, 3, seed=3) if conv else rand(6, 5, seed=3)
    cut = module.rank_limited(2)
    assert cut.rank == 2 and cut.scale == module.scale == 0.5 and module.rank == 4
    expected = (up.reshape(6, 4)[:, :2] @ down.reshape(4, -1)[:2]).reshape(base.shape) * 0.5
    torch.testing.assert_close(cut.weight_delta(base), expected, atol=ATOL, rtol=0)
    # bypass factors describe the same ΔW
    factors = cut.low_rank(base.shape)
    assert factors.down.shape[0] == 2 and factors.up.shape[1] == 2 and factors.scale == 0.5
    assert module.rank_limited(4) is module and module.rank_limited(9) is module


def test_rank_limit_zero_is_no_change_and_not_bypassed():
    module = LoraModule("k", lora_weights(alpha=1.5))
    cut = module.rank_limited(0)
    assert torch.count_nonzero(cut.weight_delta(rand(6, 5))) == 0
    assert cut.low_rank((6, 5)) is None


def test_rank_limit_leaves_tucker_loha_and_lokr_whole():
    tucker = LoraModule(
        "k",
        {"lora_up.weight": rand(6, 2, 1, 1), "lora_down.weight": rand(2, 5, 1, 1), "lora_mid.weight": rand(2, 2, 3, 3)},
    )
    loha = LohaModule(
        "k",
        {"hada_w1_a": rand(6, 2), "hada_w1_b": rand(2, 5), "hada_w2_a": rand(6, 2, seed=1), "hada_w2_b": rand(2, 5, seed=2)},
    )
    for module in (tucker, loha):
        assert module.rank_limited(1) is module
