"""One small class per module type, each built from one layer's group of keys.

Semantics follow the AUTOMATIC1111 WebUI (extensions-builtin/Lora/network.py ``finalize_updown``):

    ΔW = reshape(rebuild(factors) [+ bias]) · scale          scale = alpha / dim, or 1
    DoRA: ΔW ← m · (W + ΔW) / ‖W + ΔW‖ − W    (norm per output row or input column, by
                                                 dora_scale's shape: see algorithms.dora)
    the host applies a multiplier linearly: W + mult · ΔW

``dim`` is the rank of the factorised part (LoRA: lora_down rows; LoHa: hada_w1_b rows; LoKr: the
rows of lokr_w2_b, else lokr_w1_b, and no scaling when neither side is factorised). IA3, full and
norm modules have no dim, so alpha is ignored for them. A ``scale`` key overrides alpha / dim.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import overload

import torch

from lib_scheduled_lora.core.networks import algorithms
from lib_scheduled_lora.core.networks.base import LowRankFactors, NetworkModule
from lib_scheduled_lora.errors import NetworkFileError

Tensor = torch.Tensor

# Keys every module type understands besides its own.
COMMON_SUFFIXES = ("alpha", "scale", "dora_scale", "bias")


@overload
def _f32(tensor: Tensor, device: torch.device | str = "cpu") -> Tensor: ...
@overload
def _f32(tensor: None, device: torch.device | str = "cpu") -> None: ...
def _f32(tensor: Tensor | None, device: torch.device | str = "cpu") -> Tensor | None:
    return None if tensor is None else tensor.to(device=device, dtype=torch.float32)


def _scalar(tensor: Tensor | None) -> float | None:
    return None if tensor is None else float(tensor.float().reshape(-1)[0])


class BaseModule(NetworkModule):
    """What every module type shares: scale, reshape to the target, optional DoRA and bias terms."""

    algorithm = "?"
    suffixes: tuple[str, ...] = ()  # the keys this type reads, besides COMMON_SUFFIXES

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", *, dora_per_output: bool | None = None):
        self.key = key
        self.source = source
        self._alpha = _scalar(weights.get("alpha"))
        self._scale = _scalar(weights.get("scale"))
        self._dora_scale = weights.get("dora_scale")
        # None: decide per-output / per-input from dora_scale's shape, as the WebUI does. Formats that
        # say which convention they use (PEFT: always per-output) pass it explicitly.
        self._dora_per_output = dora_per_output
        self._updown_bias = weights.get("bias")  # A1111: a "bias" key is added to ΔW before scaling
        self.dim: int | None = None

    # -- what the loader and inspect read ------------------------------------------------------
    @property
    def dora(self) -> bool:
        return self._dora_scale is not None

    @property
    def rank(self) -> int | None:
        return self.dim

    @property
    def alpha(self) -> float | None:
        return self._alpha

    @property
    def scale(self) -> float:
        """alpha / dim (A1111 ``calc_scale``): 1 when either is missing; a ``scale`` key wins."""
        if self._scale is not None:
            return self._scale
        if self.dim is not None and self._alpha is not None:
            return self._alpha / self.dim
        return 1.0

    @property
    def in_features(self) -> int | None:
        """The layer input width the factors imply (for guessing the base model), when knowable."""
        return None

    @property
    def is_conv(self) -> bool:
        return False

    # -- the maths -------------------------------------------------------------------------------
    def _updown(self, base: Tensor) -> Tensor:
        """ΔW before reshape and scale, float32 on base's device (``base`` is float32)."""
        raise NotImplementedError

    def _shape_error(self, delta_shape, shape) -> NetworkFileError:
        return NetworkFileError(
            self.source,
            f"{self.key}: the module's weight difference has shape {list(delta_shape)} but the layer's "
            f"weight is {list(shape)}; was this network made for another base model?",
        )

    def _fit(self, delta: Tensor, shape: torch.Size) -> Tensor:
        # The WebUI reshapes ΔW to the target whenever the number of values matches, e.g. a 1x1
        # conv LoRA (SD1 proj_in) applied to a Linear proj_in (SD2 / SDXL).
        if delta.shape == shape:
            return delta
        if delta.numel() == math.prod(shape):
            return delta.reshape(shape)
        raise self._shape_error(delta.shape, shape)

    def weight_delta(self, base: Tensor) -> Tensor:
        base32 = base.detach().to(torch.float32)
        delta = self._updown(base32)
        if self._updown_bias is not None:
            delta = delta + _f32(self._updown_bias, delta.device).reshape(delta.shape)
        delta = self._fit(delta, base.shape) * self.scale
        if self._dora_scale is not None:
            magnitude = _f32(self._dora_scale, delta.device)
            delta = algorithms.dora(base32, delta, magnitude, self._dora_per_output)
        return delta

    def _bias_tensor(self) -> Tensor | None:
        return None

    @property
    def changes_bias(self) -> bool:
        return self._bias_tensor() is not None

    def bias_delta(self, base_bias: Tensor | None) -> Tensor | None:
        # A1111 multiplies the bias difference by the multiplier only, never by alpha / dim.
        diff = self._bias_tensor()
        if diff is None:
            return None
        device = base_bias.device if base_bias is not None else "cpu"
        diff = _f32(diff, device)
        if base_bias is not None and diff.numel() == base_bias.numel():
            diff = diff.reshape(base_bias.shape)
        return diff


class LoraModule(BaseModule):
    """LoRA / LoCon: ΔW = up @ down (conv: kxk down, 1x1 up; Tucker: 1x1 down, kxk mid, 1x1 up)."""

    algorithm = "lora"
    suffixes = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.up = weights["lora_up.weight"]
        self.down = weights["lora_down.weight"]
        self.mid = weights.get("lora_mid.weight")
        self.dim: int = self.down.shape[0]
        up_rank = self.up.shape[1] if self.up.dim() >= 2 else None
        if up_rank != self.dim or (self.mid is not None and tuple(self.mid.shape[:2]) != (self.dim, self.dim)):
            mid = f", lora_mid {list(self.mid.shape)}" if self.mid is not None else ""
            raise NetworkFileError(
                source,
                f"{key}: lora_up {list(self.up.shape)} and lora_down {list(self.down.shape)}{mid} have different ranks",
            )

    @property
    def in_features(self) -> int | None:
        return self.down.shape[1] if self.down.dim() >= 2 else None

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4 or self.mid is not None

    def delta_numel(self) -> int | None:
        if self.down.dim() < 2:
            return None
        inner = self.down.shape[1:] if self.mid is None else (self.down.shape[1], *self.mid.shape[2:])
        return self.up.shape[0] * math.prod(inner)

    @property
    def can_bypass(self) -> bool:
        return self._dora_scale is None and self._updown_bias is None and self.dim != 0

    def _updown(self, base: Tensor) -> Tensor:
        d = base.device
        return algorithms.lora(_f32(self.up, d), _f32(self.down, d), _f32(self.mid, d))

    def rank_limited(self, rank: int) -> LoraModule:
        """ΔW from the first ``rank`` columns of up and rows of down, as the WebUI's ``dyn=``
        (``lyco_helpers.rebuild_conventional``): the scale stays alpha / the file's rank, and a
        Tucker (``lora_mid``) module is not cut."""
        if self.mid is not None or rank >= self.dim:
            return self
        limited = copy.copy(self)
        limited._scale = self.scale
        limited.up = self.up[:, :rank]
        limited.down = self.down[:rank]
        limited.dim = rank
        return limited

    def low_rank(self, target_shape: Sequence[int] | None = None) -> LowRankFactors | None:
        """Factors for bypass mode, float32 on CPU.

        Without ``target_shape`` they keep the file's layout (Linear: down [r, in], up [out, r]; conv:
        up [out, r, 1, 1]). With it, they are laid out for that layer, as weight_delta's reshape
        would: a 1x1-conv LoRA on a Linear layer gives 2-D factors, a Linear LoRA on a 1x1 conv 4-D
        ones. None when the module cannot be bypassed (DoRA, a bias term, or no layout fits).
        """
        if not self.can_bypass:
            return None
        down, up, mid = _f32(self.down), _f32(self.up), _f32(self.mid)
        rank, out_dim = self.dim, up.shape[0]
        if target_shape is None:
            if down.dim() == 2 and mid is None:
                return LowRankFactors(down=down, up=up.reshape(out_dim, rank), mid=None, scale=self.scale)
            spatial = [1] * (max(down.dim(), 4) - 2)
            return LowRankFactors(
                down=down if down.dim() > 2 else down.reshape(rank, -1, *spatial),
                up=up.reshape(out_dim, rank, *spatial),
                mid=mid,
                scale=self.scale,
            )
        target = tuple(target_shape)
        own_shape = [out_dim, down.shape[1], *mid.shape[2:]] if mid is not None else [out_dim, *down.shape[1:]]
        if out_dim != target[0]:
            raise self._shape_error(own_shape, target)
        ones = [1] * (len(target) - 2)
        if mid is not None:
            if len(target) != mid.dim() or tuple(mid.shape[2:]) != target[2:] or down.numel() != rank * target[1]:
                return None
            return LowRankFactors(
                down=down.reshape(rank, target[1], *ones),
                up=up.reshape(out_dim, rank, *ones),
                mid=mid,
                scale=self.scale,
            )
        if down.numel() != rank * math.prod(target[1:]):
            raise self._shape_error(own_shape, target)
        return LowRankFactors(
            down=down.reshape(rank, *target[1:]),
            up=up.reshape(out_dim, rank, *ones),
            mid=None,
            scale=self.scale,
        )


class LohaModule(BaseModule):
    """LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), optionally with Tucker cores t1 / t2."""

    algorithm = "loha"
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.w1a, self.w1b = weights["hada_w1_a"], weights["hada_w1_b"]
        self.w2a, self.w2b = weights["hada_w2_a"], weights["hada_w2_b"]
        self.t1, self.t2 = weights.get("hada_t1"), weights.get("hada_t2")
        self.dim = self.w1b.shape[0]

    @property
    def in_features(self) -> int | None:
        if self.t1 is not None or self.w1b.dim() == 4:
            return self.w1b.shape[1]
        return None  # plain conv LoHa flattens the kernel into w1b's columns

    @property
    def is_conv(self) -> bool:
        return self.t1 is not None or self.w1b.dim() == 4

    def delta_numel(self) -> int | None:
        return _half_numel(self.w1a, self.w1b, self.t1)

    def _updown(self, base: Tensor) -> Tensor:
        d = base.device
        return algorithms.loha(
            _f32(self.w1a, d), _f32(self.w1b, d), _f32(self.w2a, d), _f32(self.w2b, d), _f32(self.t1, d), _f32(self.t2, d)
        )


class LokrModule(BaseModule):
    """LoKr: ΔW = w1 ⊗ w2, each side whole or factorised (w_a @ w_b), w2 optionally Tucker (t2)."""

    algorithm = "lokr"
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.w1, self.w1a, self.w1b = (weights.get(f"lokr_w1{s}") for s in ("", "_a", "_b"))
        self.w2, self.w2a, self.w2b = (weights.get(f"lokr_w2{s}") for s in ("", "_a", "_b"))
        self.t2 = weights.get("lokr_t2")
        # A1111: alpha / dim applies only when a side is factorised, dim being that side's rank
        # (w2's when both are, as w2_b is looked at last).
        # (module_type_for guarantees a factorised side has both of its factors)
        if self.w1 is None and self.w1b is not None:
            self.dim = self.w1b.shape[0]
        if self.w2 is None and self.w2b is not None:
            self.dim = self.w2b.shape[0]

    def _updown(self, base: Tensor) -> Tensor:
        d = base.device
        w1 = algorithms.lokr_factor(_f32(self.w1, d), _f32(self.w1a, d), _f32(self.w1b, d))
        w2 = algorithms.lokr_factor(_f32(self.w2, d), _f32(self.w2a, d), _f32(self.w2b, d), _f32(self.t2, d))
        return algorithms.lokr(w1, w2)

    @property
    def is_conv(self) -> bool:
        return self.t2 is not None or (self.w2 is not None and self.w2.dim() == 4)

    def delta_numel(self) -> int | None:
        # A Kronecker product has the product of its factors' sizes (a conv w1 is broadcast).
        sides = (_factor_numel(self.w1, self.w1a, self.w1b, None), _factor_numel(self.w2, self.w2a, self.w2b, self.t2))
        return None if None in sides else math.prod(n for n in sides if n is not None)


class IA3Module(BaseModule):
    """IA3: ΔW = W ⊙ w, w scaling input channels (``on_input``) or output channels."""

    algorithm = "ia3"
    suffixes = ("weight", "on_input")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.w = weights["weight"]
        on_input = weights.get("on_input")
        self.on_input = bool(_scalar(on_input)) if on_input is not None else False

    def fits(self, shape) -> str | None:
        axis = 1 if self.on_input else 0
        if len(shape) <= axis or self.w.numel() != shape[axis]:
            side = "input" if self.on_input else "output"
            return f"IA3 vector has {self.w.numel()} values, the layer's weight {list(shape)} has other {side} channels"
        return None

    def _updown(self, base: Tensor) -> Tensor:
        try:
            return algorithms.ia3(base, _f32(self.w, base.device), self.on_input)
        except ValueError as exc:
            raise NetworkFileError(self.source, f"{self.key}: {exc}") from None


class FullModule(BaseModule):
    """Full / diff: ΔW = diff, Δbias = diff_b."""

    algorithm = "full"
    suffixes = ("diff", "diff_b")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.diff = weights["diff"]
        self.diff_b = weights.get("diff_b")

    @property
    def in_features(self) -> int | None:
        return self.diff.shape[1] if self.diff.dim() >= 2 else None

    @property
    def is_conv(self) -> bool:
        return self.diff.dim() == 4

    def delta_numel(self) -> int | None:
        return self.diff.numel()

    def _updown(self, base: Tensor) -> Tensor:
        return algorithms.full(_f32(self.diff, base.device))

    def _bias_tensor(self) -> Tensor | None:
        return self.diff_b


class NormModule(BaseModule):
    """Norm (LayerNorm / GroupNorm): ΔW = w_norm, Δbias = b_norm."""

    algorithm = "norm"
    suffixes = ("w_norm", "b_norm")

    def __init__(self, key: str, weights: Mapping[str, Tensor], source: str = "", **kwargs):
        super().__init__(key, weights, source, **kwargs)
        self.w_norm = weights["w_norm"]
        self.b_norm = weights.get("b_norm")

    def delta_numel(self) -> int | None:
        return self.w_norm.numel()

    def _updown(self, base: Tensor) -> Tensor:
        return algorithms.norm(_f32(self.w_norm, base.device))

    def _bias_tensor(self) -> Tensor | None:
        return self.b_norm


def _half_numel(w_a: Tensor, w_b: Tensor, t: Tensor | None) -> int:
    """Values of one LoHa half: ``w_a @ w_b`` ([out, in·k·k]) or its Tucker form ([out, in, kh, kw])."""
    if t is None:
        return w_a.shape[0] * math.prod(w_b.shape[1:])
    return w_a.shape[1] * w_b.shape[1] * math.prod(t.shape[2:])


def _factor_numel(w: Tensor | None, w_a: Tensor | None, w_b: Tensor | None, t: Tensor | None) -> int | None:
    """Values of one LoKr factor (see :func:`algorithms.lokr_factor`)."""
    if w is not None:
        return w.numel()
    if w_a is None or w_b is None:
        return None
    return _half_numel(w_a, w_b, t)


def _has(weights: Mapping[str, Tensor], *names: str) -> bool:
    return all(name in weights for name in names)


def module_type_for(weights: Mapping[str, Tensor]) -> type[BaseModule] | None:
    """The module class a group of keys makes, tried in the WebUI's order; None when none fits."""
    if _has(weights, "lora_up.weight", "lora_down.weight"):
        return LoraModule
    if _has(weights, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        return LohaModule
    if _has(weights, "weight"):
        return IA3Module
    has_1 = "lokr_w1" in weights or _has(weights, "lokr_w1_a", "lokr_w1_b")
    has_2 = "lokr_w2" in weights or _has(weights, "lokr_w2_a", "lokr_w2_b")
    if has_1 and has_2:
        return LokrModule
    if "diff" in weights:
        return FullModule
    if "w_norm" in weights:
        return NormModule
    return None


def build_module(
    key: str, weights: Mapping[str, Tensor], source: str = "", *, dora_per_output: bool | None = None
) -> tuple[BaseModule | None, list[str]]:
    """Build the module for one layer's keys (suffix -> tensor).

    Returns (module or None, the suffixes it did not use), so that the caller can report every key
    it could not place. ``lora_A.weight`` / ``lora_B.weight`` are read as lora_down / lora_up.
    """
    weights = dict(weights)
    if _has(weights, "lora_A.weight", "lora_B.weight") and not _has(weights, "lora_down.weight"):
        weights["lora_down.weight"] = weights.pop("lora_A.weight")
        weights["lora_up.weight"] = weights.pop("lora_B.weight")
    if "wd_for_diff" in weights:
        # Newer LyCORIS "DoRA on the difference" changes the maths; no host implements it yet, so
        # the module is reported rather than applied wrongly.
        return None, sorted(weights)
    cls = module_type_for(weights)
    if cls is None:
        return None, sorted(weights)
    try:
        module = cls(key, weights, source, dora_per_output=dora_per_output)
    except (IndexError, RuntimeError) as exc:
        raise NetworkFileError(source, f"{key}: malformed {cls.algorithm} tensors ({exc})") from None
    used = set(cls.suffixes) | set(COMMON_SUFFIXES)
    return module, sorted(k for k in weights if k not in used)
