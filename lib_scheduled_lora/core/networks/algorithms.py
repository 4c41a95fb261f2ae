"""One pure function per network algorithm: the weight difference ΔW a module adds to its layer.

Every function takes float32 tensors and returns ΔW *before* the module's scale (alpha / rank) is
applied, in the layout the factors imply (the caller reshapes it to the target layer, as the WebUI's
``finalize_updown`` does). Shapes follow torch layouts: Linear ``[out, in]``, Conv2d
``[out, in, kh, kw]``.

References: AUTOMATIC1111 ``extensions-builtin/Lora/network_*.py`` + ``lyco_helpers.py`` (the host
semantics we match) and LyCORIS ``lycoris/functional/*.py`` (same formulas, independent code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def tucker_rebuild(core: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """W[i, j, k, l] = Σ_{n,m} core[n, m, k, l] · up[i, n] · down[m, j]  (mode-1/mode-2 products).

    ``up`` is ``[out, r]`` (any trailing 1-dims are dropped), ``down`` ``[r, in]``; result
    ``[out, in, *core.shape[2:]]``. This is A1111's ``rebuild_cp_decomposition``.
    """
    up = up.reshape(up.shape[0], -1)
    down = down.reshape(down.shape[0], -1)
    return torch.einsum("nm...,in,mj->ij...", core, up, down)


def lora(up: Tensor, down: Tensor, mid: Tensor | None = None) -> Tensor:
    """ΔW = up @ down, or with a Tucker core ΔW = mid ×₁ up ×₂ down.

    Linear: up ``[out, r]``, down ``[r, in]`` -> ``[out, in]``.
    LoCon (conv kxk down + 1x1 up): up ``[out, r, 1, 1]``, down ``[r, in, kh, kw]``
    -> ``[out, in, kh, kw]``.
    Tucker: down ``[r, in, 1, 1]``, mid ``[r, r, kh, kw]``, up ``[out, r, 1, 1]``
    -> ``[out, in, kh, kw]``.
    """
    if mid is not None:
        return tucker_rebuild(mid, up, down)
    out_dim, rank = up.shape[0], down.shape[0]
    # explicit widths, not -1: a rank cut to 0 (``dyn=0``) still gives ΔW = 0 of the right shape
    flat = up.reshape(out_dim, rank) @ down.reshape(rank, math.prod(down.shape[1:]))
    return flat.reshape(out_dim, *down.shape[1:])


def lora_bypass(
    x: Tensor, down: Tensor, up: Tensor, mid: Tensor | None = None, conv: Mapping[str, Any] | None = None
) -> Tensor:
    """y_Δ = up(mid(down(x))): what a LoRA/LoCon layer adds to its output at unit scale, without ΔW.

    The bypass forward beside :func:`lora`: ``F.linear(x, lora(up, down))`` (or the conv) up to
    rounding, at r·(in·k² + out) multiply-adds per output position instead of writing a weight.
    Linear (``conv`` None): down ``[r, in]``, up ``[out, r]``. Conv: ``conv`` holds the layer's
    ``stride``/``padding``/``dilation``; down ``[r, in, kh, kw]`` (or ``[r, in, 1, 1]`` when a
    Tucker ``mid`` ``[r, r, kh, kw]`` carries the kernel), up ``[out, r, 1, 1]``.
    """
    if conv is None:
        return F.linear(F.linear(x, down), up)
    if mid is not None:
        return F.conv2d(F.conv2d(F.conv2d(x, down), mid, **conv), up)
    return F.conv2d(F.conv2d(x, down, **conv), up)


def _hada_half(w_a: Tensor, w_b: Tensor, t: Tensor | None) -> Tensor:
    if t is None:
        return w_a.reshape(w_a.shape[0], -1) @ w_b.reshape(w_b.shape[0], -1)
    # Tucker LoHa stores both factors rank-first: w_a [r, out], w_b [r, in].
    return tucker_rebuild(t, w_a.transpose(0, 1), w_b)


def loha(
    w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None = None, t2: Tensor | None = None
) -> Tensor:
    """ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)   (Hadamard product of two low-rank matrices).

    Plain: w1a/w2a ``[out, r]``, w1b/w2b ``[r, in·kh·kw]`` -> ``[out, in·kh·kw]`` (the caller
    reshapes a conv ΔW to ``[out, in, kh, kw]``).
    Tucker: ``half_i = t_i ×₁ w_ia^T ×₂ w_ib`` with t ``[r, r, kh, kw]``, w_ia ``[r, out]``,
    w_ib ``[r, in]`` -> ``[out, in, kh, kw]``. (A1111 ``make_weight_cp``; LyCORIS
    ``HadaWeightTucker``.)
    """
    half1 = _hada_half(w1a, w1b, t1)
    half2 = _hada_half(w2a, w2b, t2)
    if half1.shape != half2.shape:
        # One Tucker half and one plain half (A1111 reshapes the plain one to the other's shape).
        half2 = half2.reshape(half1.shape) if half2.numel() == half1.numel() else half2
        half1 = half1.reshape(half2.shape) if half1.numel() == half2.numel() else half1
    return half1 * half2


def lokr_factor(w: Tensor | None, w_a: Tensor | None, w_b: Tensor | None, t: Tensor | None = None) -> Tensor:
    """One Kronecker factor: ``w`` itself, ``w_a @ w_b``, or with a Tucker core ``t ×₁ w_a^T ×₂ w_b``.

    A factorised conv factor may keep its kernel in ``w_b`` (``[r, in·kh·kw]`` as LyCORIS's module
    stores it, or ``[r, in, kh, kw]``); the result is then ``[out, in·kh·kw]`` or
    ``[out, in, kh, kw]``, which lokr() handles alike.
    """
    if w is not None:
        return w
    if w_a is None or w_b is None:
        raise ValueError("a LoKr factor needs either w or both w_a and w_b")
    if t is not None:
        # Tucker LoKr stores w_a [r, out] and w_b [r, in] (rank first), as A1111/LyCORIS do.
        return tucker_rebuild(t, w_a.transpose(0, 1), w_b)
    flat = w_a.reshape(w_a.shape[0], -1) @ w_b.reshape(w_b.shape[0], -1)
    return flat.reshape(w_a.shape[0], *w_b.shape[1:])


def lokr(w1: Tensor, w2: Tensor) -> Tensor:
    """ΔW = w1 ⊗ w2   (Kronecker product; the small w1 scales blocks of the large w2).

    Linear: w1 ``[a, b]``, w2 ``[c, d]`` -> ``[a·c, b·d]``.
    Conv: w2 ``[c, d, kh, kw]`` -> w1 is broadcast over the kernel: ``[a·c, b·d, kh, kw]``; a w2
    with the kernel flattened into its columns gives ``[a·c, b·d·kh·kw]``, the same numbers in the
    same order, which the caller reshapes to the layer.
    """
    if w2.dim() > w1.dim():
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous())


def ia3(base: Tensor, w: Tensor, on_input: bool) -> Tensor:
    """ΔW = W ⊙ w, with w scaling the input channels (``on_input``) or the output channels.

    ``w`` holds one value per channel (``[C]``, or LyCORIS's conv layout ``[1, C, 1, 1]``).
    W has shape ``[out, in, ...]``; on_input broadcasts w along axis 1, otherwise along axis 0.
    (A1111's ``network_ia3`` broadcasts the same way for Linear layers; for conv layers it relies
    on trailing-dim broadcasting, which only works for the Linear shapes, so we follow LyCORIS's
    explicit channel axis.)
    """
    w = w.reshape(-1)
    view = [1] * base.dim()
    axis = 1 if on_input else 0
    if w.numel() != base.shape[axis]:
        raise ValueError(
            f"IA3 vector has {w.numel()} values but the layer has {base.shape[axis]} "
            f"{'input' if on_input else 'output'} channels"
        )
    view[axis] = -1
    return base * w.reshape(view)


def full(diff: Tensor) -> Tensor:
    """ΔW = diff   (the "full" / "diff" algorithm stores the difference itself)."""
    return diff


def norm(w_norm: Tensor) -> Tensor:
    """ΔW = w_norm   (LayerNorm / GroupNorm weight difference; the bias difference is b_norm)."""
    return w_norm


def dora_is_per_output(magnitude: Tensor, weight_shape: torch.Size | tuple[int, ...]) -> bool:
    """Which DoRA convention a ``dora_scale`` tensor follows, decided from its shape alone.

    per-output (LyCORIS ``wd_on_out=True``, PEFT, diffusers): one magnitude per output row,
        shape ``[out, 1, ...]`` (or ``[out]``);
    per-input (the DoRA paper, kohya, older LyCORIS): one magnitude per input column,
        shape ``[1, in, ...]`` (or ``[in]``).
    A ``[out, 1, ...]`` tensor is per-output even for square weights; a 1-D one is per-output only
    when its length matches out but not in (square 1-D defaults to per-input, for old files).
    This is SD.Next's rule (``modules/lora/network.py``). AUTOMATIC1111 v1.10's
    ``NetworkModule.apply_weight_decompose`` always normalises per input column, whatever the
    shape, so per-output files (LyCORIS ``wd_on_out``, PEFT) apply differently there; per-input
    files agree.
    """
    out_dim = weight_shape[0]
    in_dim = weight_shape[1] if len(weight_shape) >= 2 else None
    if magnitude.dim() >= 2:
        return magnitude.shape[0] == out_dim and all(d == 1 for d in magnitude.shape[1:])
    return magnitude.shape[0] == out_dim and magnitude.shape[0] != in_dim


def dora(base: Tensor, delta: Tensor, magnitude: Tensor, per_output: bool | None = None) -> Tensor:
    """DoRA's weight difference:  ΔW_dora = m · V / ‖V‖ − W,  with V = W + ΔW.

    ‖V‖ is the L2 norm of each output row (per_output) or each input column (per-input), taken over
    every other axis; ``m`` (``dora_scale``) holds the trained magnitudes. ``delta`` is already scaled
    by alpha/rank. The host then applies a multiplier linearly: W + mult·ΔW_dora (A1111 semantics).
    ``per_output=None`` decides the convention from the tensor's shape (dora_is_per_output).
    The norm gets float32 eps added, as LyCORIS does, so that an all-zero row gives 0 instead of NaN.
    """
    merged = base + delta
    if per_output is None:
        per_output = dora_is_per_output(magnitude, merged.shape)
    trailing = [1] * (merged.dim() - 1)
    if per_output:
        col_norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *trailing)
        mag = magnitude.reshape(merged.shape[0], *trailing)
    else:
        rows = merged.transpose(0, 1).reshape(merged.shape[1], -1)
        col_norm = rows.norm(dim=1).reshape(merged.shape[1], *trailing).transpose(0, 1)
        mag = magnitude.reshape(merged.shape[1], *trailing).transpose(0, 1)
    col_norm = col_norm + torch.finfo(merged.dtype).eps
    return merged * (mag / col_norm) - base
