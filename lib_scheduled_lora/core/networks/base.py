"""What every network module type provides to the rest of the package.

A network file holds one *module* per targeted layer (kohya name such as
``lora_unet_down_blocks_0_attentions_0_proj_in``). Every algorithm we support is linear in the
multiplier m once the base weight W is known:

    W(m) = W + m · ΔW(W)

(ΔW depends on W only for IA3 and DoRA), so a module only has to give ΔW at unit strength.
Modules also say what they can do without being probed: the size of their ΔW (``delta_numel``,
``fits``), whether they change the layer's bias (``changes_bias``), and whether they can run in
*bypass* mode (``can_bypass``: y = W·x + m·scale·up(mid(down(x))), no weight writes).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class LowRankFactors:
    """ΔW = scale · up · [mid] · down, in the layer's own layout.

    Linear layer: down [r, in], up [out, r]. Conv layer: down [r, in, kh, kw] (or [r, in, 1, 1]
    when ``mid`` is given), mid [r, r, kh, kw] (Tucker) or None, up [out, r, 1, 1].
    Tensors live where the file was loaded (CPU); callers move them.
    """

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    scale: float


class NetworkModule(ABC):
    """One layer's worth of a network file."""

    key: str  # kohya base name, without the ".lora_up.weight"-style suffix
    algorithm: str  # "lora", "loha", "lokr", "ia3", "full", "norm" (+ ``dora`` flag)

    @property
    def dora(self) -> bool:
        return False

    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        return None

    # -- what the module can do (declared, never probed) -------------------------------------------

    def delta_numel(self) -> int | None:
        """How many values ΔW has, from the file's tensors alone; None when it depends on the layer."""
        return None

    def fits(self, shape: Sequence[int]) -> str | None:
        """Why this module cannot change a weight of ``shape``, or None when it can.

        The WebUI reshapes ΔW onto the layer whenever the number of values matches (a 1x1-conv
        LoRA on a Linear ``proj_in``), so the number of values is what must agree.
        """
        numel = self.delta_numel()
        if numel is not None and numel != math.prod(shape):
            return f"ΔW has {numel} elements, the layer's weight has shape {list(shape)}"
        return None

    @property
    def changes_bias(self) -> bool:
        """True when the module also changes the layer's bias (full ``diff_b``, norm ``b_norm``)."""
        return False

    @property
    def can_bypass(self) -> bool:
        """True when :meth:`low_rank` gives factors (a low-rank module without DoRA or a bias term)."""
        return False

    # -- the maths ----------------------------------------------------------------------------

    @abstractmethod
    def weight_delta(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW at multiplier 1, float32, shape and device of ``base`` (the target weight)."""

    def accumulate(self, acc: torch.Tensor, base: torch.Tensor, alpha: float) -> None:
        """``acc += alpha · ΔW`` for a float32 ``acc`` shaped like ``base`` (the target weight).

        The same arithmetic as adding :meth:`weight_delta`, so that a cached ΔW (the engine) and
        one computed here (merging) give the same bits.
        """
        acc.add_(self.weight_delta(base).view_as(acc), alpha=alpha)

    def bias_delta(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Δbias at multiplier 1 (float32, on base_bias's device), or None when there is none."""
        return None

    def low_rank(self, target_shape: Sequence[int] | None = None) -> LowRankFactors | None:
        """The factors for bypass mode laid out for a weight of ``target_shape``, or None."""
        return None

    def rank_limited(self, rank: int) -> NetworkModule:
        """This module with its factorisation cut to the first ``rank`` components (the WebUI's
        ``dyn=``); modules the WebUI does not cut return themselves."""
        return self


@dataclass
class Network:
    """A loaded network file: modules keyed by kohya base name."""

    name: str
    path: str
    modules: dict[str, NetworkModule]
    metadata: dict[str, str] = field(default_factory=dict)
    unrecognised_keys: list[str] = field(default_factory=list)
    # keys whose values hold NaN or ±inf (only a network loaded with allow_non_finite has any)
    non_finite_keys: list[str] = field(default_factory=list)

    def rank_limited(self, rank: int) -> Network:
        """A copy whose modules keep only their first ``rank`` components (``<lora:x:1:dyn=8>``)."""
        modules = {key: module.rank_limited(rank) for key, module in self.modules.items()}
        return replace(self, name=f"{self.name} (dyn={rank})", modules=modules)
