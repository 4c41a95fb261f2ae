"""A weight difference ΔW as a LoRA: the SVD cut to a target rank or to a kept-energy rule.

Rules (``RankRule``), the same as kohya's ``networks/resize_lora.py`` so that numbers carry over:

* ``rank``: the first N singular values (N capped by the layer);
* ``sv_ratio R``: every singular value larger than σ₁ / R;
* ``sv_fro F``: the fewest values whose Frobenius norm is at least F of the whole
  (``sqrt(Σ_{i<r} σᵢ²) / sqrt(Σ σᵢ²) >= F``);
* ``sv_cumulative F``: the fewest values whose sum is at least F of the whole.

With a rule, ``rank`` (``conv_rank`` for k×k convolutions) is the cap. A rank is always a cap:
components below 1e-5·σ₁ (float32 noise of a lower-rank ΔW) are never kept. A zero ΔW gets
rank 1, as kohya does. Each layer reports what it kept: ``fro_kept`` (kohya's "fro retained", ‖ΔW_r‖/‖ΔW‖),
``energy_kept`` (its square, the share of Σσ²) and ``sum_kept`` (Σ_{i<r} σᵢ / Σ σᵢ).

The factors split the singular values evenly (``up = U·√S``, ``down = √S·Vᴴ``) so that neither
factor holds all the magnitude (fp16/bf16 outputs keep their range). The SVD runs in float32 on
the GPU when there is one. A sum of low-rank products (LoRA/LoCon inputs) is decomposed from its
factors (QR of the stacked factors, then the SVD of a small R×R core): the same singular values
as the dense ΔW without ever forming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib_scheduled_lora.core.numbers import format_number
from lib_scheduled_lora.errors import RankRuleError

METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # kohya's: below this the largest singular value means "ΔW is zero"
# Components below this share of σ₁ are float32 noise of a lower-rank ΔW (a sum of rank-4 LoRAs
# has no 9th component); never kept, so that a rank is a cap and not a padding.
NOISE = 1e-5


@dataclass(frozen=True)
class RankRule:
    """How many components each layer keeps (see the module docstring).

    ``rank`` is the rank for method ``"rank"`` and the cap for the others (None: no cap);
    ``conv_rank`` the same for k×k convolutions (None: ``rank``). 1×1 convolutions count as
    linear layers, as in kohya's scripts.
    """

    method: str = "rank"
    rank: int | None = None
    conv_rank: int | None = None
    param: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RankRuleError(self.method, f"is not a rank rule (one of {', '.join(METHODS)})")
        for name, value in (("--rank", self.rank), ("--conv-rank", self.conv_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RankRuleError(f"{name} {value}", "must be a whole number of at least 1")
        if self.method == "rank":
            if self.rank is None:
                raise RankRuleError("--rank", "is needed (or one of --sv-ratio, --sv-fro, --sv-cumulative)")
            if self.param is not None:
                raise RankRuleError(f"rank rule {self.param}", "a fixed rank takes no parameter")
            return
        option = "--" + self.method.replace("_", "-")
        if self.param is None or not math.isfinite(self.param):
            raise RankRuleError(option, "needs a finite number")
        if self.method == "sv_ratio" and self.param < 1:
            raise RankRuleError(f"{option} {format_number(self.param)}", "must be at least 1 (σ₁ / σ is kept up to it)")
        if self.method in ("sv_fro", "sv_cumulative") and not 0 < self.param <= 1:
            raise RankRuleError(f"{option} {format_number(self.param)}", "must be a fraction in (0, 1]")

    def cap(self, conv: bool) -> int | None:
        """The largest rank a layer may get (``conv``: a k×k convolution)."""
        if conv and self.conv_rank is not None:
            return self.conv_rank
        return self.rank

    def describe(self) -> str:
        """``rank 8 (conv 4)``, ``sv_fro 0.9 (rank ≤ 32)``: for reports and metadata."""
        conv = f"conv {self.conv_rank}" if self.conv_rank is not None and self.conv_rank != self.rank else ""
        if self.method == "rank":
            return f"rank {self.rank}" + (f" ({conv})" if conv else "")
        assert self.param is not None
        caps = [f"rank ≤ {self.rank}"] if self.rank is not None else []
        caps += [conv.replace("conv ", "conv ≤ ")] if conv else []
        return f"{self.method} {format_number(self.param)}" + (f" ({', '.join(caps)})" if caps else "")

    def to_json(self) -> str:
        return json.dumps(
            {"method": self.method, "rank": self.rank, "conv_rank": self.conv_rank, "param": self.param},
            sort_keys=True,
        )


def is_kxk_conv(shape: Sequence[int]) -> bool:
    """A convolution with a kernel larger than 1×1 (those get ``conv_rank``)."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def choose_rank(singular_values: torch.Tensor, rule: RankRule, conv: bool) -> int:
    """How many of ``singular_values`` (descending) ``rule`` keeps: between 1 and their number."""
    s = singular_values.detach().to("cpu", torch.float64)
    n = int(s.numel())
    if n == 0:
        return 0
    if rule.method == "rank":
        wanted = rule.cap(conv) or n
    elif rule.method == "sv_ratio":
        assert rule.param is not None
        wanted = int((s > s[0] / rule.param).sum())
    else:
        assert rule.param is not None
        values = s.pow(2) if rule.method == "sv_fro" else s
        target = rule.param**2 if rule.method == "sv_fro" else rule.param
        total = float(values.sum())
        shares = torch.cumsum(values, 0) / total if total > 0 else torch.ones_like(values)
        # the first index whose running share reaches the target (a hair of slack for rounding)
        wanted = int(torch.searchsorted(shares, torch.tensor([target - 1e-12], dtype=shares.dtype))[0]) + 1
    cap = rule.cap(conv)
    if cap is not None:
        wanted = min(wanted, cap)
    wanted = min(wanted, int((s > s[0] * NOISE).sum()))
    if float(s[0]) <= MIN_SV:
        wanted = 1
    return max(1, min(wanted, n))


@dataclass
class LowRank:
    """ΔW ≈ up · down, in the layer's layout (Linear: up [out, r], down [r, in]; conv: up
    [out, r, 1, 1], down [r, in, kh, kw]), float32 on CPU, and what was kept."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    full_rank: int  # how many singular values ΔW has (nonzero or not): min(out, in·kh·kw)
    fro_kept: float
    sum_kept: float

    @property
    def energy_kept(self) -> float:
        return self.fro_kept**2

    def delta(self) -> torch.Tensor:
        """The approximation itself, shaped like the layer."""
        flat = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1)
        return flat.reshape(self.up.shape[0], *self.down.shape[1:])


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def low_rank(delta: torch.Tensor, rule: RankRule, *, device: torch.device | str | None = None) -> LowRank:
    """The SVD of a dense ``delta`` ([out, in] or [out, in, kh, kw]) cut by ``rule``."""
    shape = tuple(delta.shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"a low-rank layer needs a 2-D or 4-D weight, got shape {list(shape)}")
    device = torch.device(device) if device is not None else default_device()
    matrix = delta.detach().to(device=device, dtype=torch.float32).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _cut(u, s, vh, shape, rule, full_rank=min(matrix.shape))


def low_rank_of_product(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    shape: Sequence[int],
    rule: RankRule,
    *,
    device: torch.device | str | None = None,
) -> LowRank:
    """The same as ``low_rank(Σ upᵢ·downᵢ)`` without forming the sum.

    ``ups[i]`` is [out, rᵢ], ``downs[i]`` [rᵢ, in·kh·kw] (weights and scales already folded in);
    ``shape`` the layer's. Exact: Σ upᵢ·downᵢ = U·Dᵀ with U, D the stacked factors; with
    U = Q_u·R_u and D = Q_d·R_d, its SVD is (Q_u·A)·S·(Q_d·B)ᴴ where A·S·Bᴴ is the SVD of the
    small R_u·R_dᵀ. Falls back to the dense SVD when the total rank is not smaller than the layer.
    """
    device = torch.device(device) if device is not None else default_device()
    up = torch.cat([u.reshape(u.shape[0], -1) for u in ups], 1).to(device, torch.float32)
    down = torch.cat([d.reshape(d.shape[0], -1) for d in downs], 0).to(device, torch.float32)
    out_dim, inner = up.shape[0], down.shape[1]
    full_rank = min(out_dim, inner)
    if up.shape[1] >= full_rank:
        return low_rank((up @ down).reshape(*shape), rule, device=device)
    q_u, r_u = torch.linalg.qr(up)
    q_d, r_d = torch.linalg.qr(down.T)
    a, s, bh = torch.linalg.svd(r_u @ r_d.T)
    return _cut(q_u @ a, s, bh @ q_d.T, tuple(shape), rule, full_rank=full_rank)


def _cut(u, s, vh, shape: tuple[int, ...], rule: RankRule, *, full_rank: int) -> LowRank:
    rank = choose_rank(s, rule, is_kxk_conv(shape))
    s64 = s.detach().to("cpu", torch.float64)
    total_sq, total = float(s64.pow(2).sum()), float(s64.sum())
    fro_kept = math.sqrt(float(s64[:rank].pow(2).sum()) / total_sq) if total_sq > 0 else 1.0
    sum_kept = float(s64[:rank].sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).cpu()
    down = (root[:, None] * vh[:rank]).cpu()
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return LowRank(up.contiguous(), down.contiguous(), rank, full_rank, fro_kept, sum_kept)
