"""Low-rank cuts: kohya's rank rules, the SVD's optimality, the factored path, lycoris' extractor.

Oracles: the rules' definitions worked by hand on chosen singular values; Eckart–Young (the rank-r
SVD is the closest rank-r matrix, its error the dropped singular values); ``lycoris.utils``'
``extract_linear`` / ``extract_conv`` (independent code) on the same matrices.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_scheduled_lora.core.lowrank import RankRule, choose_rank, low_rank, low_rank_of_product
from lib_scheduled_lora.errors import RankRuleError, ScheduledLoraError

S = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])  # Σ = 15.75, Σ² = 85.3125


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (RankRule("rank", 3), 3),
        (RankRule("rank", 99), 6),  # capped by the layer
        (RankRule("sv_ratio", param=3), 2),  # σ > 8/3: 8, 4
        (RankRule("sv_ratio", param=8), 3),  # σ > 1 strictly: 8, 4, 2
        (RankRule("sv_ratio", param=1), 1),  # nothing above σ₁ itself: still 1
        (RankRule("sv_cumulative", param=0.75), 2),  # 8/15.75 = .508, 12/15.75 = .762
        (RankRule("sv_cumulative", param=0.762), 3),  # just above 12/15.75
        (RankRule("sv_cumulative", param=1.0), 6),
        (RankRule("sv_fro", param=0.9), 2),  # sqrt(64/85.3125) = .866 < .9 <= sqrt(80/85.3125) = .968
        (RankRule("sv_fro", param=0.99), 3),  # sqrt(84/85.3125) = .9923
        (RankRule("sv_fro", param=0.95, rank=1), 1),  # the cap wins
    ],
)
def test_rank_rules(rule, expected):
    assert choose_rank(S, rule, conv=False) == expected


def test_conv_rank_applies_to_kxk_convolutions_only():
    rule = RankRule("rank", 4, conv_rank=2)
    assert choose_rank(S, rule, conv=True) == 2
    assert choose_rank(S, rule, conv=False) == 4
    delta = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    assert low_rank(delta, rule, device="cpu").rank == 2
    assert low_rank(torch.randn(8, 6, 1, 1), rule, device="cpu").rank == 4  # 1x1: a linear layer


def test_a_zero_difference_gets_rank_one_and_a_rank_is_a_cap():
    assert low_rank(torch.zeros(5, 7), RankRule("rank", 4), device="cpu").rank == 1
    up, down = torch.randn(9, 2), torch.randn(2, 11)
    cut = low_rank(up @ down, RankRule("rank", 6), device="cpu")  # rank 2 in truth
    assert cut.rank == 2 and cut.fro_kept == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(12, 9), (10, 6, 3, 3), (8, 5, 1, 1)])
def test_the_cut_is_the_closest_matrix_of_its_rank(shape):
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(*shape, generator=g, dtype=torch.float64).float()
    full = low_rank(delta, RankRule("rank", 99), device="cpu")
    torch.testing.assert_close(full.delta(), delta, atol=1e-5, rtol=1e-5)  # full rank: exact
    assert full.fro_kept == pytest.approx(1.0)
    cut = low_rank(delta, RankRule("rank", 3), device="cpu")
    assert cut.up.shape[:2] == (shape[0], 3) and cut.down.shape == (3, *shape[1:])
    s = torch.linalg.svdvals(delta.reshape(shape[0], -1).double())
    dropped = math.sqrt(float(s[3:].pow(2).sum()))
    assert float((cut.delta() - delta).double().norm()) == pytest.approx(dropped, rel=1e-4)  # Eckart–Young
    assert cut.fro_kept == pytest.approx(math.sqrt(float(s[:3].pow(2).sum() / s.pow(2).sum())), rel=1e-6)
    assert cut.sum_kept == pytest.approx(float(s[:3].sum() / s.sum()), rel=1e-6)
    assert cut.energy_kept == pytest.approx(cut.fro_kept**2)


def test_the_factored_path_equals_the_dense_svd():
    g = torch.Generator().manual_seed(2)
    ups = [torch.randn(40, 3, generator=g), torch.randn(40, 5, generator=g)]
    downs = [torch.randn(3, 36, generator=g), torch.randn(5, 36, generator=g)]
    dense = sum(u @ d for u, d in zip(ups, downs))
    for rule in (RankRule("rank", 4), RankRule("sv_fro", param=0.95), RankRule("rank", 64)):
        a = low_rank_of_product(ups, downs, (40, 4, 3, 3), rule, device="cpu")
        b = low_rank(dense.reshape(40, 4, 3, 3), rule, device="cpu")
        assert a.rank == b.rank and a.full_rank == b.full_rank == 36
        torch.testing.assert_close(a.delta(), b.delta(), atol=1e-4, rtol=1e-4)
        assert a.fro_kept == pytest.approx(b.fro_kept, abs=1e-6)
    assert low_rank_of_product(ups, downs, (40, 36), RankRule("rank", 64), device="cpu").rank == 8


@pytest.mark.parametrize("conv", [False, True])
def test_matches_lycoris_extractors(conv):
    pytest.importorskip("lycoris")
    from lycoris.utils import extract_conv, extract_linear

    g = torch.Generator().manual_seed(3)
    delta = torch.randn(24, 10, 3, 3, generator=g) if conv else torch.randn(24, 30, generator=g)
    (down, up, _), mode = (extract_conv if conv else extract_linear)(delta, "fixed", 4)
    assert mode == "low rank"
    theirs = (up.reshape(24, 4) @ down.reshape(4, -1)).reshape(delta.shape)
    ours = low_rank(delta, RankRule("rank", 4), device="cpu")
    torch.testing.assert_close(ours.delta(), theirs, atol=1e-4, rtol=1e-4)
    # the factors split σ evenly (lycoris puts it all in up); the product is what counts
    assert torch.allclose(ours.up.reshape(24, 4).norm(dim=0), ours.down.reshape(4, -1).norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="rank"), "--rank: is needed"),
        (dict(method="sv_fro", param=1.5), "--sv-fro 1.5: must be a fraction in (0, 1]"),
        (dict(method="sv_cumulative", param=0.0), "--sv-cumulative 0: must be a fraction"),
        (dict(method="sv_ratio", param=0.5), "--sv-ratio 0.5: must be at least 1"),
        (dict(method="rank", rank=0), "--rank 0: must be a whole number"),
        (dict(method="svd"), "svd: is not a rank rule"),
    ],
)
def test_bad_rules_are_one_line_errors(kwargs, message):
    with pytest.raises(RankRuleError) as info:
        RankRule(**kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert isinstance(info.value, ScheduledLoraError)


def test_rule_descriptions():
    assert RankRule("rank", 8, 4).describe() == "rank 8 (conv 4)"
    assert RankRule("sv_fro", 32, param=0.9).describe() == "sv_fro 0.9 (rank ≤ 32)"
    assert RankRule("sv_ratio", param=2).describe() == "sv_ratio 2"
