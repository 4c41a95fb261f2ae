"""The per-step weight engine: W = W_base + Σ_k m_k(t) · ΔW_k at every model evaluation.

Design, in the order it matters:

* Exact. An update computes ``round(W_base + Σ m_k ΔW_k)`` in float32 from the original values and
  rounds once (:func:`lib_scheduled_lora.core.combine.combine`); nothing is ever added and later
  subtracted (in fp16/bf16 that drifts). Leaving the context restores every original bit for
  bit, also on exceptions and interrupts, where the host expects the weight now
  (:mod:`lib_scheduled_lora.core.live`: swapped buffers on the CPU, in-place writes with the
  original in host RAM on accelerators, parameters the host moves mid-generation followed).
* Lean. On an accelerator nothing is kept on the device by default: no second copy of the
  targeted weights, no device ΔW cache; an update needs one layer's temporaries at a time. A user
  budget (``device_budget_mb``) lets the engine keep originals and ΔW on the device for speed, as
  far as the device's free memory allows.
* Lazy. ``set_position`` evaluates the schedules; only layers of networks whose multiplier
  changed are rewritten. A step schedule costs one update at its switch, a constant one a single
  update at the start.
* Fast. In host memory ΔW is cached in float32 (within a byte budget, across generations), so an
  update is one pass over memory. A low-rank LoRA/LoCon layer whose multiplier keeps changing can
  instead run in *bypass* mode (``y = W_base·x + m·scale·up(mid(down(x)))``, no weight writes).
  ``auto`` picks per layer: on the CPU whichever costs less for the layer's real input size
  (:func:`_bypass_is_cheaper`); on an accelerator bypass for ramps (a merge there would copy the
  original back from host RAM at every change) and merges for constant and step schedules.
  ``merge`` and ``bypass`` force one. Layers the host streams per forward (no writable weight)
  get the networks in their forward (:mod:`lib_scheduled_lora.core.layer_hooks`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lib_scheduled_lora.core.combine import Term
from lib_scheduled_lora.core.delta_cache import DeltaCache
from lib_scheduled_lora.core.layer_hooks import OutputDelta
from lib_scheduled_lora.core.live import BufferPool, LiveTensor, is_host_memory, nbytes
from lib_scheduled_lora.core.naming import Target, map_network
from lib_scheduled_lora.core.networks.base import LowRankFactors, Network, NetworkModule
from lib_scheduled_lora.core.schedule import Schedule
from lib_scheduled_lora.errors import ScheduledLoraError

log = logging.getLogger(__name__)

Mode = Literal["auto", "merge", "bypass"]
MODES: tuple[Mode, ...] = ("auto", "merge", "bypass")
Component = Literal["te", "unet"]
TEXT_COMPONENTS = frozenset({"te", "te2"})


def engine_mode(value: object, default: Mode = "auto") -> Mode:
    """A settings value as a mode (an unknown one, from an old or hand-edited config: the default)."""
    return next((mode for mode in MODES if mode == value), default)


@dataclass(frozen=True)
class EngineSettings:
    """User settings (the WebUI exposes them in Settings → Scheduled LoRA)."""

    mode: Mode = "auto"
    cache_budget_mb: float = 2048.0  # float32 ΔW kept in host memory between generations
    device_budget_mb: float = 0.0  # accelerator memory for originals and ΔW (0: nothing kept there)


# Free accelerator memory the engine leaves to the host's own work (activations, VAE) when it
# uses its device budget: what auto looks at before trading memory for speed.
DEVICE_HEADROOM = 1.5 * 2**30


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on an accelerator (None when the backend cannot tell)."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


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
    undecided: bool = False  # auto mode on the CPU: bypass until the first forward shows the input size
    delta: torch.Tensor | None = None  # float32 ΔW held for this generation
    bias_delta: torch.Tensor | None = None

    @property
    def module(self) -> NetworkModule:
        return self.target.module


@dataclass
class _Layer:
    """One weight (or row slice of a fused weight), its bias, and everything that writes to them."""

    weight: LiveTensor
    bias: LiveTensor | None
    module: nn.Module | None  # for forward hooks; None for row slices
    component: str
    parts: list[_Contribution] = field(default_factory=list)
    hook: OutputDelta | None = None  # bypassed or forward-time parts
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    forward_time: bool = False  # the host streams this layer's weights: every part in the forward

    def in_forward(self, net: int) -> bool:
        """Whether network ``net`` acts on this layer through the forward hook (not the weight)."""
        return any(part.net == net and part.bypass for part in self.parts)


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
    ldm/sgm model). ``cache`` and ``pool`` may be shared between generations (the runtime does).

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
        pool: BufferPool | None = None,
    ):
        self.settings = settings or EngineSettings()
        self.networks = list(networks)
        self.cache = cache if cache is not None else DeltaCache(int(self.settings.cache_budget_mb * 2**20))
        self.cache.begin_generation()
        self.pool = pool
        self.stats = UpdateStats()
        self.unmatched: dict[str, list[str]] = {}
        self._multipliers: dict[tuple[int, str], float] = {}  # (net, component) -> m in force
        self._layers: dict[tuple[str, tuple[int, int] | None], _Layer] = {}
        self._modes_chosen = False
        self._device_budget: dict[torch.device, int] = {}
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
            if layer.bias is None and target.bias:
                # A later network may change the bias where an earlier one did not (LoRA, then a
                # full network with diff_b): the layer's bias is bound by whichever asks first.
                layer.bias = LiveTensor(params[target.bias], target.rows, self.pool)
            return layer
        module_name = target.weight.rpartition(".")[0]
        layer = _Layer(
            weight=LiveTensor(params[target.weight], target.rows, self.pool),
            bias=LiveTensor(params[target.bias], target.rows, self.pool) if target.bias else None,
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
            on_cpu = is_host_memory(layer.weight.data.device)
            for part in parts:
                changes = _count_changes(self.networks[part.net].unet, steps)
                if mode == "bypass":
                    part.bypass = True
                elif mode == "auto" and on_cpu:
                    part.bypass = part.undecided = changes > 1
                elif mode == "auto":
                    # A merge on an accelerator copies the original back from host RAM at each
                    # change; bypass costs a few kernels per evaluation and writes nothing.
                    part.bypass = changes > 1
            bypassed = [p for p in parts if p.bypass]
            if bypassed:
                self._hook_layer(layer, bypassed, steps)

    def _hook_layer(self, layer: _Layer, parts: list[_Contribution], steps: int, *, dense: bool = False) -> None:
        """Apply ``parts`` in the layer's forward (replacing a hook it had)."""
        assert layer.module is not None  # _can_bypass / forward-time: a whole Linear or Conv2d
        self._unhook(layer)
        component = layer.component

        def multiplier(net: int) -> float:  # parts switched to merging add nothing here
            return self.multiplier(net, component) if layer.in_forward(net) else 0.0

        layer.hook = OutputDelta(layer.module, [(p.net, p.module) for p in parts], multiplier, dense=dense)
        layer.handles.append(layer.module.register_forward_hook(layer.hook))
        if any(p.undecided for p in parts):
            layer.handles.append(layer.module.register_forward_pre_hook(_AutoDecision(self, layer, steps)))

    @staticmethod
    def _unhook(layer: _Layer) -> None:
        for handle in layer.handles:
            handle.remove()
        layer.handles.clear()
        layer.hook = None

    # -- the context --------------------------------------------------------------------------

    def __enter__(self) -> ScheduledWeights:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put every touched weight back, bit for bit, and remove hooks. Idempotent."""
        for layer in self._layers.values():
            self._unhook(layer)
        with torch.no_grad():
            for layer in self._layers.values():
                layer.weight.release()
                if layer.bias is not None:
                    layer.bias.release()
        for layer in self._layers.values():
            layer.forward_time = False
            for part in layer.parts:
                part.delta = part.bias_delta = None
                part.bypass = part.undecided = False
        self._multipliers.clear()
        self._modes_chosen = False
        self._device_budget.clear()

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
                if _component(layer.component) != component or layer.forward_time:
                    continue
                if any(part.net in changed and not part.bypass for part in layer.parts):
                    self._write(layer, steps)

    def multiplier(self, net: int, component: str) -> float:
        return self._multipliers.get((net, _component(component)), 0.0)

    def multipliers(self, component: Component) -> dict[str, float]:
        """The multiplier in force per network name (for logs, plots and tests)."""
        return {scheduled.name: self.multiplier(i, component) for i, scheduled in enumerate(self.networks)}

    def _write(self, layer: _Layer, steps: int = 1) -> None:
        if not layer.weight.writable:
            self._to_forward_time(layer, steps)
            return
        merged = [
            (self.multiplier(part.net, layer.component), part)
            for part in layer.parts
            if not part.bypass and self.multiplier(part.net, layer.component) != 0.0
        ]
        self.stats.layer_updates += 1
        if not merged:
            layer.weight.to_base()
            if layer.bias is not None:
                layer.bias.to_base()
            return
        layer.weight.take_backup(on_device=self._spend_device_budget(layer.weight))
        terms = [Term(m, part.module, self._delta(layer, part)) for m, part in merged]
        layer.weight.write(terms)
        if layer.bias is not None:
            bias_terms = [Term(m, None, p.bias_delta) for m, p in merged if p.bias_delta is not None]
            if bias_terms:
                layer.bias.write(bias_terms)
            else:
                layer.bias.to_base()
        out = layer.weight.data
        self.stats.bytes_moved += nbytes(out) * 2 + sum(nbytes(t.delta) for t in terms)

    def _to_forward_time(self, layer: _Layer, steps: int) -> None:
        """The host keeps this layer's weights elsewhere and streams them per forward: apply every
        network of the layer in its forward from now on (it has no weight of ours to restore)."""
        if layer.forward_time:
            return
        if layer.module is None:
            raise _not_streamable(layer, "a row slice of a fused weight")
        layer.forward_time = True
        for part in layer.parts:
            part.bypass, part.undecided = True, False
        try:
            self._hook_layer(layer, layer.parts, steps, dense=True)
        except ScheduledLoraError as exc:
            raise _not_streamable(layer, str(exc)) from None
        log.info("%s: weights streamed by the host; networks applied in its forward", layer.parts[0].target.weight)

    def _delta(self, layer: _Layer, part: _Contribution) -> torch.Tensor | None:
        """ΔW of one part: held for the generation, from the ΔW cache, or built (and kept when the
        budget allows). On an accelerator without a device budget: None (built by the kernel, not kept)."""
        if part.delta is not None:
            return part.delta
        module = part.module
        network = self.networks[part.net].network
        live = layer.weight
        device = live.data.device
        if layer.bias is not None and part.bias_delta is None and module.changes_bias:
            part.bias_delta = module.bias_delta(layer.bias.base())
        if not is_host_memory(device):
            # On an accelerator ΔW is held (for this pass only) within the user's device budget;
            # without one, combine() builds it per update and drops it.
            self.stats.delta_rebuilds += 1
            if not self._fits_device_budget(device, live.data.numel() * 4):
                return None
            part.delta = module.weight_delta(live.base().to(device))
            self._spend(device, nbytes(part.delta))
            return part.delta
        shared = not _depends_on_base(module)  # ΔW of IA3/DoRA depends on the base: this pass only
        key = (part.target.key, part.target.weight, part.target.rows, device)
        delta = self.cache.get(network, key) if shared else None
        if delta is not None:
            part.delta = delta
            return delta
        self.stats.delta_rebuilds += 1
        delta = module.weight_delta(live.base())
        if not shared or self.cache.put(network, key, delta):
            part.delta = delta
        return delta

    # -- the device budget --------------------------------------------------------------------------

    def _budget(self, device: torch.device) -> int:
        """Bytes of the user's device budget left, never more than the device can spare now."""
        if device not in self._device_budget:
            budget = int(self.settings.device_budget_mb * 2**20)
            free = free_device_memory(device)
            if free is not None:
                budget = min(budget, max(0, int(free - DEVICE_HEADROOM)))
            self._device_budget[device] = budget
        return self._device_budget[device]

    def _fits_device_budget(self, device: torch.device, size: int) -> bool:
        return self._budget(device) >= size

    def _spend(self, device: torch.device, size: int) -> None:
        self._device_budget[device] = self._budget(device) - size

    def _spend_device_budget(self, live: LiveTensor) -> bool:
        """Whether ``live``'s original may be kept on its (accelerator) device."""
        data = live.data
        if live.backup is not None or is_host_memory(data.device):
            return False
        size = nbytes(data)
        if not self._fits_device_budget(data.device, size):
            return False
        self._spend(data.device, size)
        return True

    # -- introspection --------------------------------------------------------------------------

    @property
    def layers(self) -> int:
        return len(self._layers)

    def bypassed_layers(self) -> int:
        return sum(any(p.bypass for p in layer.parts) for layer in self._layers.values())

    def memory(self) -> dict[tuple[str, str], int]:
        """Extra bytes the engine holds now, by (role, device): originals kept as copies, merge
        buffers, ΔW held for this generation, factors prepared for forward hooks. (The ΔW cache
        shared between generations is :attr:`cache`'s.)"""
        out: dict[tuple[str, str], int] = defaultdict(int)
        deltas: dict[int, torch.Tensor] = {}
        for layer in self._layers.values():
            for live in (layer.weight, layer.bias):
                if live is not None:
                    for role, size in live.extra_bytes().items():
                        out[role] += size
            for part in layer.parts:
                if part.delta is not None:
                    deltas[id(part.delta)] = part.delta
            if layer.hook is not None and layer.module is not None:
                weight = getattr(layer.module, "weight", None)
                device = str(weight.device) if isinstance(weight, torch.Tensor) else "?"
                out[("forward factors", device)] += layer.hook.extra_bytes()
        for delta in deltas.values():
            out[("ΔW", str(delta.device))] += nbytes(delta)
        return {key: value for key, value in out.items() if value}

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


def _depends_on_base(module: NetworkModule) -> bool:
    return module.algorithm == "ia3" or module.dora


def _not_streamable(layer: _Layer, why: str) -> ScheduledLoraError:
    return ScheduledLoraError(
        f"{layer.parts[0].target.weight}: the host keeps this weight off the model between forwards "
        f"(sequential offload), and {why} cannot be applied in a forward; turn that offload off"
    )


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
    weight = layer.weight.data if isinstance(layer.weight, LiveTensor) else layer.weight
    elt = weight.element_size()
    per_update = weight.numel() * (2 * elt + 4 + (0 if elt == 4 else 8))
    return bypass_flops < CPU_FLOPS_PER_BYTE * per_update * changes_per_eval


def _can_bypass(layer: _Layer, part: _Contribution) -> bool:
    return part.module.can_bypass and isinstance(layer.module, (nn.Linear, nn.Conv2d))


class _AutoDecision:
    """Auto mode on the CPU, first forward of a layer: keep bypass or switch to merge, now that
    the input size is known."""

    def __init__(self, engine: ScheduledWeights, layer: _Layer, steps: int):
        self.engine, self.layer, self.steps = engine, layer, steps

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        channels = x.shape[1] if isinstance(module, nn.Conv2d) else x.shape[-1]
        tokens = max(1, x.numel() // max(1, channels))
        switched = False
        for part in self.layer.parts:
            if not part.undecided:
                continue
            part.undecided = False
            factors = part.module.low_rank()
            rate = _count_changes(self.engine.networks[part.net].unet, self.steps) / max(1, self.steps)
            if factors is not None and not _bypass_is_cheaper(self.layer, factors, tokens, rate):
                part.bypass = False
                switched = True
        if switched:
            with torch.no_grad():
                self.engine._write(self.layer, self.steps)
