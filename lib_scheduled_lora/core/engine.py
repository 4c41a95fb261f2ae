"""The per-step weight engine: W = W_base + Σ_k m_k(t) · ΔW_k at every model evaluation.

Design, in the order it matters:

* Exact. Every targeted weight (or row slice of a fused weight) is copied once, bit for bit, on
  its own device. An update recomputes ``W = W_base + Σ m_k ΔW_k`` in float32 from that copy and
  rounds once to the weight's dtype; nothing is ever added and later subtracted (in fp16/bf16
  that drifts). Leaving the context restores every copy, also on exceptions and interrupts.
* Lazy. ``set_position`` evaluates the schedules; only networks whose multiplier changed mark
  their layers dirty, and only dirty layers are rewritten. A step schedule costs one update at
  its switch, a constant one a single update at the start.
* Fast. ΔW is cached in float32 on the weight's device (within a byte budget, across
  generations), so an update is a single pass over memory: read base and ΔW, write W. A
  low-rank LoRA/LoCon layer whose multiplier keeps changing can instead run in *bypass* mode,
  ``y = W_base·x + m·scale·up(mid(down(x)))``, which writes no weights at all. ``auto`` picks,
  per layer, whichever moves fewer bytes and does fewer FLOPs for that layer's real input size
  (see :func:`_bypass_is_cheaper`); ``merge`` and ``bypass`` force one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lib_scheduled_lora.core.combine import Term, combine
from lib_scheduled_lora.core.delta_cache import DeltaCache
from lib_scheduled_lora.core.naming import Target, map_network
from lib_scheduled_lora.core.networks.algorithms import lora_bypass
from lib_scheduled_lora.core.networks.base import LowRankFactors, Network
from lib_scheduled_lora.core.schedule import Schedule

log = logging.getLogger(__name__)

Mode = Literal["auto", "merge", "bypass"]
MODES: tuple[Mode, ...] = ("auto", "merge", "bypass")


def engine_mode(value: object, default: Mode = "auto") -> Mode:
    """A settings value as a mode (an unknown one, from an old or hand-edited config: the default)."""
    return next((mode for mode in MODES if mode == value), default)
Component = Literal["te", "unet"]
TEXT_COMPONENTS = frozenset({"te", "te2"})


@dataclass(frozen=True)
class EngineSettings:
    """User settings (the WebUI exposes them in Settings → Scheduled LoRA)."""

    mode: Mode = "auto"
    cache_budget_mb: float = 2048.0  # float32 ΔW kept on the weights' device


@dataclass(frozen=True)
class ScheduledNetwork:
    """A loaded network with the schedules of one sampling pass."""

    network: Network
    te: Schedule
    unet: Schedule

    @property
    def name(self) -> str:
        return self.network.name

    def schedule(self, component: str) -> Schedule:
        return self.te if component in TEXT_COMPONENTS else self.unet


@dataclass
class _Contribution:
    """One network's part in one layer."""

    net: int  # index into the engine's networks
    target: Target
    bypass: bool = False
    undecided: bool = False  # auto mode: bypass until the first forward shows the input size
    delta: torch.Tensor | None = None  # float32 ΔW held for this generation (merge mode)
    bias_delta: torch.Tensor | None = None


@dataclass
class _Layer:
    """One weight (or row slice of a fused weight) and everything that writes to it.

    The original values are kept bit for bit. For a whole weight the original *tensor* is the
    backup: while a network acts on the layer, ``param.data`` points at a second buffer that holds
    ``round(W + Σ m·ΔW)``, and going back to the base model (a multiplier of 0, or the end of the
    generation) points it at the original again — no copy, and bit-identical by construction. A
    row slice of a fused weight (SD 2 / SDXL OpenCLIP q/k/v) cannot be swapped alone, so its rows
    are cloned and copied back instead.
    """

    param: nn.Parameter
    rows: tuple[int, int] | None
    bias_param: nn.Parameter | None
    module: nn.Module | None  # for bypass hooks; None for row slices
    component: str
    parts: list[_Contribution] = field(default_factory=list)
    base: torch.Tensor | None = None  # the original values (taken at the first write)
    base_bias: torch.Tensor | None = None
    spare: torch.Tensor | None = None  # the buffer that holds merged values (whole weights)
    on_spare: bool = False  # param.data points at ``spare`` (``param.data`` is a new object per access)

    @property
    def weight(self) -> torch.Tensor:
        """The live values (what the model computes with)."""
        data = self.param.data
        return data if self.rows is None else data[self.rows[0] : self.rows[1]]

    @property
    def bias(self) -> torch.Tensor | None:
        if self.bias_param is None:
            return None
        data = self.bias_param.data
        return data if self.rows is None else data[self.rows[0] : self.rows[1]]

    def writable(self) -> torch.Tensor:
        """The tensor to write merged values into, keeping the originals first."""
        if self.base is None:
            self.base_bias = None if self.bias is None else self.bias.clone()
            if self.rows is not None:
                self.base = self.weight.clone()
            else:
                self.base = self.param.data
        if self.rows is None and not self.on_spare:
            if self.spare is None:
                self.spare = torch.empty_like(self.base)
            self.param.data = self.spare
            self.on_spare = True
        return self.weight

    def back_to_base(self) -> None:
        """Every multiplier is 0 (or the generation ended): the original values, exactly."""
        if self.base is None:
            return
        if self.rows is None:
            self.param.data = self.base
            self.on_spare = False
        else:
            self.weight.copy_(self.base)
        if self.bias is not None and self.base_bias is not None:
            self.bias.copy_(self.base_bias)

    def release(self) -> None:
        self.back_to_base()
        self.base = self.base_bias = self.spare = None


@dataclass
class UpdateStats:
    """Counters for tests and the benchmark."""

    layer_updates: int = 0
    bytes_moved: int = 0  # read base + ΔW, write W, per update
    delta_rebuilds: int = 0


class ScheduledWeights:
    """Keeps a model's targeted weights at the schedules' values; a context manager.

    ``model`` is the module whose ``named_parameters()`` carry the names that
    :func:`lib_scheduled_lora.core.naming.map_network` understands (a diffusers pipeline's components
    in a ``ModuleDict`` with keys ``unet``/``text_encoder``/``text_encoder_2``, or the WebUI's
    ldm/sgm model). ``cache`` may be shared between generations (see :class:`DeltaCache`).

    >>> with ScheduledWeights(model, networks) as weights:        # doctest: +SKIP
    ...     weights.set_position("te", 0, steps)
    ...     for i in range(steps):
    ...         weights.set_position("unet", i, steps)
    ...         ...                                             # run the UNet
    """

    def __init__(
        self,
        model: nn.Module,
        networks: Sequence[ScheduledNetwork],
        settings: EngineSettings | None = None,
        cache: DeltaCache | None = None,
    ):
        self.settings = settings or EngineSettings()
        self.networks = list(networks)
        self.cache = cache if cache is not None else DeltaCache(int(self.settings.cache_budget_mb * 2**20))
        self.stats = UpdateStats()
        self.unmatched: dict[str, list[str]] = {}
        self._multipliers: dict[tuple[int, str], float] = {}  # (net, component) -> m in force
        self._layers: dict[tuple[str, tuple[int, int] | None], _Layer] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._modes_chosen = False
        self._bind(model)

    # -- setting up -------------------------------------------------------------------------

    def _bind(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        for index, scheduled in enumerate(self.networks):
            mapping = map_network(scheduled.network.modules, shapes)
            if mapping.unmatched:
                self.unmatched[scheduled.name] = list(mapping.unmatched)
                log.warning(
                    "%s: %d keys match no layer of this model (first: %s)",
                    scheduled.name, len(mapping.unmatched), mapping.unmatched[0],
                )
            for target in mapping.targets:
                layer = self._layer_for(target, params, modules)
                layer.parts.append(_Contribution(net=index, target=target))

    def _layer_for(self, target: Target, params: dict, modules: dict) -> _Layer:
        key = (target.weight, target.rows)
        layer = self._layers.get(key)
        if layer is not None:
            if layer.bias_param is None and target.bias:
                # A later network may change the bias where an earlier one did not (LoRA, then a
                # full network with diff_b): the layer's bias is bound by whichever asks first.
                layer.bias_param = params[target.bias]
            return layer
        module_name = target.weight.rpartition(".")[0]
        layer = _Layer(
            param=params[target.weight],
            rows=target.rows,
            bias_param=params[target.bias] if target.bias else None,
            module=modules.get(module_name) if target.rows is None else None,
            component=target.component,
        )
        self._layers[key] = layer
        return layer

    def _choose_modes(self, steps: int) -> None:
        """Merge or bypass per UNet contribution, once, at the first UNet position."""
        mode = self.settings.mode
        for layer in self._layers.values():
            if layer.component != "unet":
                continue
            parts = [p for p in layer.parts if _can_bypass(layer, p)]
            for part in parts:
                if mode == "bypass":
                    part.bypass = True
                elif mode == "auto" and layer.weight.device.type == "cpu":
                    # On a GPU a merge is a few microseconds of memory traffic and bypass costs
                    # kernel launches on every evaluation, so auto only weighs up on the CPU.
                    changes = _count_changes(self.networks[part.net].unet, steps)
                    part.bypass = part.undecided = changes > 1
            bypassed = [p for p in parts if p.bypass]
            if bypassed:
                assert layer.module is not None  # _can_bypass: a Linear or Conv2d
                hook = _BypassHook(self, layer, bypassed, steps)
                self._hooks.append(layer.module.register_forward_hook(hook))
                if any(p.undecided for p in bypassed):
                    self._hooks.append(layer.module.register_forward_pre_hook(hook.decide))

    # -- the context --------------------------------------------------------------------------

    def __enter__(self) -> ScheduledWeights:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put every touched weight back, bit for bit, and remove hooks. Idempotent."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for layer in self._layers.values():
                layer.release()
        for layer in self._layers.values():
            for part in layer.parts:
                part.delta = part.bias_delta = None
                part.bypass = part.undecided = False
        self._multipliers.clear()
        self._modes_chosen = False

    # -- per evaluation -----------------------------------------------------------------------

    def set_position(self, component: Component, step: float, steps: int) -> None:
        """Bring ``component``'s layers ("te" or "unet") to the schedules' values at ``step``."""
        if component == "unet" and not self._modes_chosen:
            self._choose_modes(steps)
            self._modes_chosen = True
        changed: set[int] = set()
        for index, scheduled in enumerate(self.networks):
            m = scheduled.schedule(component).at(step, steps)
            previous = self._multipliers.get((index, component), 0.0)  # weights start at base
            self._multipliers[(index, component)] = m
            if previous != m:
                changed.add(index)
        if not changed:
            return
        with torch.no_grad():
            for layer in self._layers.values():
                if _component(layer.component) != component:
                    continue
                if any(part.net in changed and not part.bypass for part in layer.parts):
                    self._write(layer)

    def multiplier(self, net: int, component: str) -> float:
        return self._multipliers.get((net, _component(component)), 0.0)

    def multipliers(self, component: Component) -> dict[str, float]:
        """The multiplier in force per network name (for logs, plots and tests)."""
        return {scheduled.name: self.multiplier(i, component) for i, scheduled in enumerate(self.networks)}

    def _write(self, layer: _Layer) -> None:
        merged = [
            (self.multiplier(part.net, layer.component), part)
            for part in layer.parts
            if not part.bypass and self.multiplier(part.net, layer.component) != 0.0
        ]
        self.stats.layer_updates += 1
        if not merged:
            layer.back_to_base()
            return
        out = layer.writable()
        assert layer.base is not None
        terms = [Term(m, part.target.module, self._delta(layer, part)) for m, part in merged]
        combine(layer.base, terms, out=out)
        bias = layer.bias
        if bias is not None and layer.base_bias is not None:
            combine(layer.base_bias, [Term(m, None, p.bias_delta) for m, p in merged if p.bias_delta is not None], out=bias)
        self.stats.bytes_moved += _nbytes(out) * 2 + sum(_nbytes(t.delta) for t in terms if t.delta is not None)

    def _delta(self, layer: _Layer, part: _Contribution) -> torch.Tensor:
        if part.delta is not None:
            return part.delta
        module = part.target.module
        network = self.networks[part.net].network
        shared = not _depends_on_base(module)
        key = (part.target.key, part.target.weight, part.target.rows, layer.weight.device)
        delta = self.cache.get(network, key) if shared else None
        if delta is None:
            assert layer.base is not None  # taken by writable() before any ΔW is needed
            delta = module.weight_delta(layer.base)
            self.stats.delta_rebuilds += 1
            keep = self.cache.put(network, key, delta) if shared else True
        else:
            keep = True
        if layer.bias is not None:
            part.bias_delta = module.bias_delta(layer.base_bias)
        if keep:
            part.delta = delta
        return delta

    # -- introspection --------------------------------------------------------------------------

    @property
    def layers(self) -> int:
        return len(self._layers)

    def bypassed_layers(self) -> int:
        return sum(any(p.bypass for p in layer.parts) for layer in self._layers.values())

    def base_bytes(self) -> int:
        """Extra memory for keeping the originals: merge buffers, cloned rows and biases."""
        extra = 0
        for layer in self._layers.values():
            for t in (layer.spare, layer.base_bias, layer.base if layer.rows is not None else None):
                extra += 0 if t is None else _nbytes(t)
        return extra

    def iter_targets(self) -> Iterator[Target]:
        for layer in self._layers.values():
            for part in layer.parts:
                yield part.target


def _component(target_component: str) -> str:
    return "te" if target_component in TEXT_COMPONENTS else "unet"


def _count_changes(schedule: Schedule, steps: int) -> int:
    """How many times the multiplier changes over the steps (leaving 0 at the start counts)."""
    values = [0.0, *schedule.values(steps)]
    return sum(1 for a, b in zip(values, values[1:]) if a != b)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _depends_on_base(module) -> bool:
    return module.algorithm == "ia3" or module.dora


# CPU arithmetic per byte of memory traffic: a 2-core AVX2 machine does ~50-100 GFLOP/s of
# float32 matmul against ~10 GB/s of streaming bandwidth. Only the order of magnitude matters.
CPU_FLOPS_PER_BYTE = 8.0


def _bypass_is_cheaper(layer: _Layer, factors: LowRankFactors, tokens: int, changes_per_eval: float) -> bool:
    """Per evaluation: low-rank FLOPs of bypass against the bytes a merged update moves.

    bypass: 2·T·r·(in·k² + out) FLOPs every evaluation (down then up, T output positions);
    merge:  (read base + read ΔW + write W [+ an fp32 accumulator for fp16/bf16]) per change.
    """
    rank = factors.down.shape[0]
    fan_in = factors.down[0].numel()
    fan_out = factors.up.shape[0]
    bypass_flops = 2.0 * tokens * rank * (fan_in + fan_out)
    elt = layer.weight.element_size()
    per_update = layer.weight.numel() * (2 * elt + 4 + (0 if elt == 4 else 8))
    return bypass_flops < CPU_FLOPS_PER_BYTE * per_update * changes_per_eval


def _can_bypass(layer: _Layer, part: _Contribution) -> bool:
    return part.target.module.can_bypass and isinstance(layer.module, (nn.Linear, nn.Conv2d))


class _BypassHook:
    """Forward hook adding m·scale·up(mid(down(x))) for the bypassed networks of one layer."""

    def __init__(self, engine: ScheduledWeights, layer: _Layer, parts: list[_Contribution], steps: int):
        self.engine = engine
        self.layer = layer
        self.module = layer.module
        self.steps = steps
        self.parts = [(part, factors) for part in parts if (factors := part.target.module.low_rank()) is not None]
        self._ready: dict[tuple[int, torch.device, torch.dtype], LowRankFactors] = {}

    def decide(self, module: nn.Module, args: tuple) -> None:
        """Auto mode, first forward: keep bypass or switch to merge, now that T is known."""
        x = args[0]
        channels = x.shape[1] if isinstance(module, nn.Conv2d) else x.shape[-1]
        tokens = max(1, x.numel() // max(1, channels))
        switched = False
        for part, factors in self.parts:
            if not part.undecided:
                continue
            part.undecided = False
            rate = _count_changes(self.engine.networks[part.net].unet, self.steps) / max(1, self.steps)
            if not _bypass_is_cheaper(self.layer, factors, tokens, rate):
                part.bypass = False
                switched = True
        if switched:
            with torch.no_grad():
                self.engine._write(self.layer)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for part, factors in self.parts:
            if not part.bypass:
                continue
            m = self.engine.multiplier(part.net, "unet")
            if m == 0.0:
                continue
            f = self._prepared(part.net, factors, x)
            output = output + (m * f.scale) * self._low_rank_forward(f, x)
        return output

    def _prepared(self, net: int, factors: LowRankFactors, x: torch.Tensor) -> LowRankFactors:
        key = (net, x.device, x.dtype)
        ready = self._ready.get(key)
        if ready is None:
            conv = isinstance(self.module, nn.Conv2d)

            def shape(t: torch.Tensor) -> torch.Tensor:
                t = t.to(device=x.device, dtype=x.dtype)
                if conv and t.dim() == 2:
                    return t[:, :, None, None]
                if not conv and t.dim() == 4:
                    return t.flatten(1)
                return t

            mid = None if factors.mid is None else shape(factors.mid)
            ready = LowRankFactors(shape(factors.down), shape(factors.up), mid, factors.scale)
            self._ready[key] = ready
        return ready

    def _low_rank_forward(self, f: LowRankFactors, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if isinstance(module, nn.Conv2d):
            conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
            return lora_bypass(x, f.down, f.up, f.mid, conv)
        return lora_bypass(x, f.down, f.up)
