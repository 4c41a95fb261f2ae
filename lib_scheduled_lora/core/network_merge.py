"""Several networks at chosen strengths -> one LoRA/LoCon network; one network -> a smaller one.

Two ways, chosen per call:

* **exact** (no rank rule): every input layer must be LoRA/LoCon (Tucker ``lora_mid`` included,
  no DoRA). Their factors are stacked: ``up = [up₁ … upₙ]``, ``down = [w₁s₁·down₁; …; wₙsₙ·downₙ]``
  with alpha = the summed rank, so ``up·down = Σ wᵢ·ΔWᵢ`` exactly (what kohya's ``--concat`` and
  peft's ``combination_type="cat"`` do). A Tucker layer becomes plain first
  (``down' = mid ×₂ down``, the same ΔW at the same rank).
* **SVD** (a :class:`~lib_scheduled_lora.core.lowrank.RankRule`): any kind. ``Σ wᵢ·ΔWᵢ`` of each
  layer (each module's own ΔW, :func:`~lib_scheduled_lora.core.combine.delta_sum`) is cut by the
  rule; LoRA-only layers are decomposed from their factors without forming ΔW. Resizing a
  network is this with one input at strength 1.

1-D layers (LayerNorm/GroupNorm ``w_norm``) are summed exactly in both ways and written as norm
modules (the WebUI and this package read them; a LoRA cannot hold them). A bias change (a full
module's ``diff_b``) cannot be part of a LoRA either: it is left out and reported.

Layer names: without a model, inputs meet by their kohya names as written. With a model (needed
for IA3 and DoRA, whose ΔW depends on the base weight, and for LoHa/LoKr layers that flatten a
conv kernel into 2-D factors) every layer is mapped onto the model's weights, so files that name
the same layer in different layouts meet, and the output uses the name kohya's trainer gives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lib_scheduled_lora.core.combine import Term, delta_sum
from lib_scheduled_lora.core.lowrank import RankRule, default_device, low_rank, low_rank_of_product
from lib_scheduled_lora.core.model_reader import ModelReader
from lib_scheduled_lora.core.naming import Slot
from lib_scheduled_lora.core.networks.base import Network, NetworkModule
from lib_scheduled_lora.core.networks.modules import (
    FullModule,
    IA3Module,
    LohaModule,
    LokrModule,
    LoraModule,
    NormModule,
)
from lib_scheduled_lora.errors import NetworkFileError

Progress = Callable[[str, int, int], None]
RULE_NEEDED = (
    "only LoRA/LoCon layers without DoRA concatenate exactly; give a rank rule "
    "(--rank N, --sv-ratio R, --sv-fro F or --sv-cumulative F) to merge through ΔW and SVD"
)


@dataclass(frozen=True)
class LayerReport:
    """One output layer: what went in and what was kept."""

    key: str
    algorithms: tuple[str, ...]  # of the inputs on this layer ("lora", "loha", "lora+dora"...)
    shape: tuple[int, ...]
    input_rank: int | None  # Σ of the inputs' ranks (None when an input has no rank: full, IA3...)
    rank: int | None  # the output's (None: a norm layer, written as it is)
    full_rank: int | None  # how many singular values ΔW has
    fro_kept: float  # ‖ΔW_out‖ / ‖ΔW_in‖ along the kept components (kohya's "fro retained")
    sum_kept: float  # Σ kept σ / Σ σ
    exact: bool

    @property
    def energy_kept(self) -> float:
        return self.fro_kept**2


@dataclass
class MergedNetwork:
    """The output network's kohya tensors (float32, CPU) and the report."""

    tensors: dict[str, torch.Tensor]
    layers: list[LayerReport]
    rule: RankRule | None
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (input key, why it is not in the output)

    @property
    def exact(self) -> bool:
        return all(layer.exact for layer in self.layers)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers if layer.rank is not None]

    def mean_fro_kept(self) -> float:
        low_rank = [layer.fro_kept for layer in self.layers if layer.rank is not None]
        return sum(low_rank) / len(low_rank) if low_rank else 1.0


@dataclass
class _Input:
    module: NetworkModule
    weight: float
    source: str


@dataclass
class _Layer:
    key: str  # the output's kohya name
    shape: tuple[int, ...] | None  # None: not knowable without the model
    slot: Slot | None
    inputs: list[_Input]

    def label(self) -> tuple[str, ...]:
        return tuple(_algorithm(i.module) for i in self.inputs)


def merge_into_one(
    sources: Sequence[tuple[Network, float]],
    rule: RankRule | None = None,
    *,
    model: ModelReader | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> MergedNetwork:
    """``Σ wᵢ·networkᵢ`` as one network: exact without ``rule``, through SVD with one.

    Raises NetworkFileError (naming the file and layer) before any work when a layer cannot be
    merged the chosen way, or needs ``model`` and none is given; with ``model``, a network for
    another base model is refused as :func:`~lib_scheduled_lora.core.merge.plan_merge` refuses it.
    ``progress(label, done, total)`` after each layer; it may raise to cancel.
    """
    layers, dropped = _gather(sources, model)
    for layer in layers:
        _check(layer, rule, model)
    device = torch.device(device) if device is not None else default_device()
    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerReport] = []
    for done, layer in enumerate(layers, 1):
        report = _merge_layer(layer, rule, model, device, tensors, dropped)
        if report is not None:
            reports.append(report)
        if progress is not None:
            progress("layers", done, len(layers))
    return MergedNetwork(tensors, reports, rule, dropped)


# -- gathering the layers ------------------------------------------------------------------------


def _gather(
    sources: Sequence[tuple[Network, float]], model: ModelReader | None
) -> tuple[list[_Layer], list[tuple[str, str]]]:
    layers: dict[str, _Layer] = {}
    dropped: list[tuple[str, str]] = []
    if model is None:
        for network, weight in sources:
            for key, module in network.modules.items():
                layer = layers.setdefault(key, _Layer(key, _own_shape(module), None, []))
                if layer.shape is None:
                    layer.shape = _own_shape(module)
                layer.inputs.append(_Input(module, float(weight), network.path))
        return list(layers.values()), dropped

    from lib_scheduled_lora.core.merge import plan_merge

    index = model.index
    for network, weight in sources:
        plan = plan_merge(index, [(network, weight)])  # refuses networks for another model
        dropped += [(f"{network.path}: {key}", reason) for key, reason in plan.networks[0].unmatched_reasons]
        for parts in plan.parts.values():
            for part in parts:
                slot = index.slots[part.key]
                name = index.kohya_names[slot]
                layer = layers.setdefault(name, _Layer(name, slot.shape, slot, []))
                layer.inputs.append(_Input(part.module, float(weight), network.path))
    return list(layers.values()), dropped


def _own_shape(module: NetworkModule) -> tuple[int, ...] | None:
    """The layer's weight shape as the module's own tensors tell it, or None when they cannot
    (a factor with the conv kernel flattened into its columns, IA3)."""
    if isinstance(module, LoraModule):
        out_dim = module.up.shape[0]
        if module.mid is not None:
            return (out_dim, module.down.shape[1], *module.mid.shape[2:])
        return (out_dim, *module.down.shape[1:])
    if isinstance(module, FullModule):
        return tuple(module.diff.shape)
    if isinstance(module, NormModule):
        return tuple(module.w_norm.shape)
    if isinstance(module, LohaModule):
        if module.t1 is not None:
            return (module.w1a.shape[1], module.w1b.shape[1], *module.t1.shape[2:])
        if module.w1b.dim() == 4:
            return (module.w1a.shape[0], *module.w1b.shape[1:])
        return None  # [out, in·kh·kw]: a Linear or a flattened conv, the factors do not say
    if isinstance(module, LokrModule) and module.w2 is not None and module.w2.dim() == 4:
        w1 = module.w1 if module.w1 is not None else None
        a, b = (w1.shape[0], w1.shape[1]) if w1 is not None else (_rows(module.w1a), _cols(module.w1b))
        if a is None or b is None:
            return None
        return (a * module.w2.shape[0], b * module.w2.shape[1], *module.w2.shape[2:])
    return None


def _rows(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.shape[0]


def _cols(t: torch.Tensor | None) -> int | None:
    return None if t is None else math.prod(t.shape[1:])


def _algorithm(module: NetworkModule) -> str:
    return module.algorithm + ("+dora" if module.dora else "")


def _needs_base(module: NetworkModule) -> bool:
    return isinstance(module, IA3Module) or module.dora


def _exact_kind(layer: _Layer) -> bool:
    """True when the layer can be merged without SVD: all LoRA/LoCon, or a 1-D layer of norms."""
    if layer.shape is not None and len(layer.shape) == 1:
        return all(isinstance(i.module, (NormModule, FullModule)) for i in layer.inputs)
    return all(i.module.can_bypass for i in layer.inputs)


def _check(layer: _Layer, rule: RankRule | None, model: ModelReader | None) -> None:
    first = layer.inputs[0]
    if rule is None and not _exact_kind(layer):
        odd = next((i for i in layer.inputs if not i.module.can_bypass), first)
        raise NetworkFileError(odd.source, f"{layer.key} is {_algorithm(odd.module)}: {RULE_NEEDED}")
    if model is None:
        needy = next((i for i in layer.inputs if _needs_base(i.module)), None)
        if needy is not None:
            raise NetworkFileError(
                needy.source,
                f"{layer.key} is {_algorithm(needy.module)}, whose ΔW depends on the base weight; "
                "give the base model (--model) to merge it",
            )
        if layer.shape is None:
            raise NetworkFileError(
                first.source,
                f"{layer.key} ({_algorithm(first.module)}) does not tell its layer's shape (a conv kernel "
                "flattened into 2-D factors); give the base model (--model) to merge it",
            )
        sizes = {math.prod(_own_shape(i.module) or layer.shape) for i in layer.inputs}
        if len(sizes) > 1:
            raise NetworkFileError(
                first.source, f"{layer.key}: the networks disagree on this layer's size ({sorted(sizes)} values)"
            )


# -- one layer -----------------------------------------------------------------------------------


def _merge_layer(
    layer: _Layer,
    rule: RankRule | None,
    model: ModelReader | None,
    device: torch.device,
    tensors: dict[str, torch.Tensor],
    dropped: list[tuple[str, str]],
) -> LayerReport | None:
    assert layer.shape is not None
    shape = layer.shape
    inputs = [i for i in layer.inputs if i.weight != 0.0]
    if not inputs:
        dropped.append((layer.key, "every strength on it is 0"))
        return None
    ranks = [i.module.rank for i in inputs]
    input_rank = sum(r for r in ranks if r is not None) if all(r is not None for r in ranks) else None
    if len(shape) == 1:
        return _norm_layer(layer, inputs, model, tensors)
    for i in inputs:
        if i.module.changes_bias:
            dropped.append((f"{i.source}: {layer.key}", "its bias change (a LoRA has no bias)"))
    if all(i.module.can_bypass for i in inputs):
        ups, downs = _stacked_factors(inputs, shape)
        if rule is None:
            total = sum(u.shape[1] for u in ups)
            up = torch.cat(ups, 1)
            down = torch.cat(downs, 0)
            if len(shape) == 4:
                up = up.reshape(shape[0], total, 1, 1)
            _put_lora(tensors, layer.key, up, down.reshape(total, *shape[1:]))
            return LayerReport(layer.key, layer.label(), shape, input_rank, total, None, 1.0, 1.0, True)
        cut = low_rank_of_product(ups, downs, shape, rule, device=device)
    else:
        assert rule is not None
        base = _base(layer, inputs, model)
        delta = delta_sum(base.to(device), [Term(i.weight, i.module) for i in inputs])
        cut = low_rank(delta, rule, device=device)
        del delta
    _put_lora(tensors, layer.key, cut.up, cut.down)
    exact = cut.rank >= cut.full_rank or cut.fro_kept >= 1.0 - 1e-7
    return LayerReport(
        layer.key, layer.label(), shape, input_rank, cut.rank, cut.full_rank, cut.fro_kept, cut.sum_kept, exact
    )


def _stacked_factors(inputs: Sequence[_Input], shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each input's ``(up [out, r], w·scale·down [r, in·kh·kw])`` in float32 (Tucker made plain)."""
    ups, downs = [], []
    for i in inputs:
        factors = i.module.low_rank(shape)
        assert factors is not None
        down = factors.down.reshape(factors.down.shape[0], -1)
        if factors.mid is not None:  # down' = mid ×₂ down: [r, in, kh, kw], the same ΔW
            down = torch.einsum("nmkl,mj->njkl", factors.mid, down).reshape(down.shape[0], -1)
        ups.append(factors.up.reshape(factors.up.shape[0], -1))
        downs.append(down * (i.weight * factors.scale))
    return ups, downs


def _base(layer: _Layer, inputs: Sequence[_Input], model: ModelReader | None) -> torch.Tensor:
    """The layer's base weight (the model's), or zeros of its shape when no input reads it."""
    if model is not None and layer.slot is not None:
        return model.read_slot(layer.slot)
    assert layer.shape is not None and not any(_needs_base(i.module) for i in inputs)
    return torch.zeros(layer.shape, dtype=torch.float32)


def _norm_layer(
    layer: _Layer, inputs: Sequence[_Input], model: ModelReader | None, tensors: dict[str, torch.Tensor]
) -> LayerReport:
    assert layer.shape is not None
    base = _base(layer, inputs, model)
    tensors[f"{layer.key}.w_norm"] = delta_sum(base, [Term(i.weight, i.module) for i in inputs]).cpu()
    biases = [(i.weight, i.module.bias_delta(None)) for i in inputs]
    present = [(w, b) for w, b in biases if b is not None]
    if present:
        tensors[f"{layer.key}.b_norm"] = sum((w * b.reshape(-1) for w, b in present), torch.zeros(present[0][1].numel()))
    return LayerReport(layer.key, layer.label(), layer.shape, None, None, None, 1.0, 1.0, True)


def _put_lora(tensors: dict[str, torch.Tensor], key: str, up: torch.Tensor, down: torch.Tensor) -> None:
    rank = down.shape[0]
    tensors[f"{key}.lora_up.weight"] = up.contiguous().cpu()
    tensors[f"{key}.lora_down.weight"] = down.contiguous().cpu()
    tensors[f"{key}.alpha"] = torch.tensor(float(rank))  # scale 1: the factors hold the strengths


def report_lines(merged: MergedNetwork, *, layers: bool = False) -> list[str]:
    """What a made network's report says: a table of every layer (``layers``) and a summary line."""
    rows = merged.layers
    lines = []
    if layers:
        width = max((len(r.key) for r in rows), default=10)
        lines.append(f"{'layer':{width}}  {'inputs':14} {'in rank':>7} {'rank':>5} {'fro kept':>9} {'energy':>7}")
        for r in rows:
            rank = "-" if r.rank is None else str(r.rank)
            in_rank = "-" if r.input_rank is None else str(r.input_rank)
            kinds = ",".join(sorted(set(r.algorithms)))
            lines.append(f"{r.key:{width}}  {kinds:14} {in_rank:>7} {rank:>5} {r.fro_kept:>9.2%} {r.energy_kept:>7.2%}")
    ranks = merged.ranks
    lowest = min((r for r in rows if r.rank is not None), key=lambda r: r.fro_kept, default=None)
    parts = [f"{len(rows)} layer(s)"]
    if ranks:
        parts.append(f"rank {min(ranks)}" + (f"-{max(ranks)}" if max(ranks) != min(ranks) else ""))
    if merged.exact:
        parts.append("exact")
    elif lowest is not None:
        parts.append(f"fro kept: mean {merged.mean_fro_kept():.2%}, lowest {lowest.fro_kept:.2%} ({lowest.key})")
    lines.append(", ".join(parts))
    return lines


def warning_lines(merged: MergedNetwork, limit: int = 5) -> list[str]:
    out = [f"left out {key}: {why}" for key, why in merged.dropped[:limit]]
    if len(merged.dropped) > limit:
        out.append(f"... and {len(merged.dropped) - limit} more left out")
    return out
