"""Networks applied in a layer's forward instead of its weight: ``y = layer(x) + Σ m·Δy(x)``.

Two uses, one hook:

* *bypass* (a low-rank LoRA/LoCon whose multiplier keeps changing): ``Δy = scale·up(mid(down(x)))``,
  no weight writes (:func:`lib_scheduled_lora.core.networks.algorithms.lora_bypass`);
* *forward-time* (the host streams the layer's weights per forward, so there is no weight to
  write: accelerate's sequential offload keeps the parameters on the ``meta`` device between
  forwards): low-rank modules as above, any other Linear/Conv2d module through its dense ΔW,
  ``Δy = F.linear(x, ΔW)`` or the layer's convolution with ΔW.

The hook reads each network's multiplier from the engine at call time, so a schedule acts on the
next forward. Factors and dense ΔW are moved to the input's device and dtype once per hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_scheduled_lora.core.networks.algorithms import lora_bypass
from lib_scheduled_lora.core.networks.base import LowRankFactors, NetworkModule
from lib_scheduled_lora.errors import ScheduledLoraError


def can_run_in_forward(module: NetworkModule, layer: nn.Module) -> str | None:
    """Why ``module`` cannot be applied in ``layer``'s forward, or None when it can."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return f"{type(layer).__name__} layers are changed only through their weights"
    if module.algorithm == "ia3" or module.dora or module.changes_bias:
        return "its weight difference depends on the layer's own weights (IA3, DoRA) or changes a bias"
    return None


class OutputDelta:
    """Forward hook adding ``Σ m·Δy(x)`` for the networks of one layer.

    ``parts`` are ``(net index, network module)``; ``multiplier(net)`` gives a network's multiplier
    now; ``dense`` allows modules without low-rank factors (forward-time mode).
    """

    def __init__(
        self,
        layer: nn.Module,
        parts: list[tuple[int, NetworkModule]],
        multiplier: Callable[[int], float],
        *,
        dense: bool = False,
    ):
        self.layer = layer
        self.multiplier = multiplier
        self.parts: list[tuple[int, NetworkModule, LowRankFactors | None]] = []
        for net, module in parts:
            factors = module.low_rank() if module.can_bypass else None
            problem = can_run_in_forward(module, layer) if factors is None else None
            if factors is None and (not dense or problem is not None):
                raise ScheduledLoraError(f"{module.key}: cannot be applied in the layer's forward ({problem or 'no low-rank form'})")
            self.parts.append((net, module, factors))
        self._ready: dict[tuple[Any, ...], Any] = {}
        self.conv = isinstance(layer, nn.Conv2d)

    @property
    def nets(self) -> set[int]:
        return {net for net, _, _ in self.parts}

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for net, network_module, factors in self.parts:
            m = self.multiplier(net)
            if m == 0.0:
                continue
            if factors is not None:
                f = self._factors(net, factors, x)
                output = output + (m * f.scale) * lora_bypass(x, f.down, f.up, f.mid, self._conv_args())
            else:
                output = output + m * self._dense(net, network_module, x)
        return output

    def _conv_args(self) -> dict[str, Any] | None:
        layer = self.layer
        if not isinstance(layer, nn.Conv2d):
            return None
        return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)

    def _factors(self, net: int, factors: LowRankFactors, x: torch.Tensor) -> LowRankFactors:
        key = ("factors", net, x.device, x.dtype)
        ready = self._ready.get(key)
        if ready is None:

            def shape(t: torch.Tensor) -> torch.Tensor:
                t = t.to(device=x.device, dtype=x.dtype)
                if self.conv and t.dim() == 2:
                    return t[:, :, None, None]
                if not self.conv and t.dim() == 4:
                    return t.flatten(1)
                return t

            mid = None if factors.mid is None else shape(factors.mid)
            ready = self._ready[key] = LowRankFactors(shape(factors.down), shape(factors.up), mid, factors.scale)
        return ready

    def _dense(self, net: int, network_module: NetworkModule, x: torch.Tensor) -> torch.Tensor:
        key = ("dense", net, x.device, x.dtype)
        delta = self._ready.get(key)
        if delta is None:
            weight = self.layer.weight  # on the meta device while streamed: its shape is still right
            assert isinstance(weight, torch.Tensor)
            # ΔW of these modules does not read the base values: a stand-in gives shape and device.
            stand_in = torch.empty(tuple(weight.shape), dtype=torch.float32, device=x.device)
            delta = self._ready[key] = network_module.weight_delta(stand_in).to(x.dtype)
        if self.conv:
            conv = self._conv_args()
            assert conv is not None
            return F.conv2d(x, delta, **conv)
        return F.linear(x, delta)

    def extra_bytes(self) -> int:
        total = 0
        for value in self._ready.values():
            tensors = [value] if isinstance(value, torch.Tensor) else [value.down, value.up, value.mid]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
