"""What every network module type provides to the rest of the package.

A network file holds one *module* per targeted layer (kohya name such as
``lora_unet_down_blocks_0_attentions_0_proj_in``). Every algorithm we support is linear in the
multiplier m once the base weight W is known:

    W(m) = W + m · ΔW(W)

(ΔW depends on W only for IA3 and DoRA), so a module only has to give ΔW at unit strength.
Low-rank modules also expose their factors, so that the engine can run them in *bypass* mode
(y = W·x + m·scale·up(mid(down(x))), no weight writes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    @abstractmethod
    def weight_delta(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW at multiplier 1, float32, shape and device of ``base`` (the target weight)."""

    def bias_delta(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Δbias at multiplier 1 (float32, on base_bias's device), or None when there is none."""
        return None

    def low_rank(self) -> LowRankFactors | None:
        """The factors for bypass mode, or None when this module cannot be bypassed."""
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

    def rank_limited(self, rank: int) -> Network:
        """A copy whose modules keep only their first ``rank`` components (``<lora:x:1:dyn=8>``)."""
        modules = {key: module.rank_limited(rank) for key, module in self.modules.items()}
        return replace(self, name=f"{self.name} (dyn={rank})", modules=modules)
