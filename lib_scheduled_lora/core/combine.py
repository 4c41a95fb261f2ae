"""The one kernel: ``W = round(W_base + Σ_k m_k · ΔW_k)``, shared by the per-step engine and merging
(and :func:`delta_sum`, ``Σ_k m_k · ΔW_k`` alone, for merging networks into one).

Accumulated in float32 from the true base and rounded once to the output's dtype, so fp16/bf16
weights never drift (nothing is added and later subtracted) and every caller of the same terms
gets the same bits. A term's ΔW is either given (the engine's cache) or added by its module
(:meth:`NetworkModule.accumulate`), with the same arithmetic. Extra memory: a float32
accumulator the size of the weight (none for a float32 output) and a ΔW being added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib_scheduled_lora.core.networks.base import NetworkModule


@dataclass(frozen=True)
class Term:
    """``multiplier · ΔW`` of one module on one weight (or row slice of a fused weight)."""

    multiplier: float
    module: NetworkModule | None  # computes ΔW when ``delta`` is None
    delta: torch.Tensor | None = None  # ΔW at unit strength, float32, as many values as the base


def combine(base: torch.Tensor, terms: Sequence[Term], out: torch.Tensor | None = None) -> torch.Tensor:
    """``out ← round(base + Σ m·ΔW)``; returns ``out`` (a new tensor like ``base`` when None).

    ``base`` is only read. ``out`` may be on another device than ``base`` (the engine keeps some
    bases in host RAM); the sum is formed on ``out``'s device.
    """
    if out is None:
        out = torch.empty_like(base)
    terms = [t for t in terms if t.multiplier != 0.0]
    base = base.to(out.device, non_blocking=True)
    if not terms:
        out.copy_(base)
        return out
    if out.dtype == torch.float32:
        acc = out
        first = terms[0]
        if first.delta is not None:  # one fused pass: out = base + m·ΔW
            torch.add(base, first.delta.view_as(base).to(out.device), alpha=first.multiplier, out=acc)
            terms = terms[1:]
        else:
            acc.copy_(base)
    else:
        acc = base.to(torch.float32, copy=True)  # base itself stays intact (IA3/DoRA read it)
    for term in terms:
        if term.delta is not None:
            acc.add_(term.delta.view_as(acc).to(acc.device), alpha=term.multiplier)
        else:
            assert term.module is not None, "a term needs a delta or a module"
            term.module.accumulate(acc, base, term.multiplier)  # ΔW of IA3/DoRA reads the true base
    if acc is not out:
        out.copy_(acc)  # the single rounding
    return out


def delta_sum(base: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """``Σ m·ΔW`` in float32 on ``base``'s device, without the base: what one merged network holds
    for this weight. Each term is added with :func:`combine`'s arithmetic (IA3/DoRA read ``base``)."""
    acc = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for term in terms:
        if term.multiplier == 0.0:
            continue
        if term.delta is not None:
            acc.add_(term.delta.view_as(acc).to(acc.device), alpha=term.multiplier)
        else:
            assert term.module is not None, "a term needs a delta or a module"
            term.module.accumulate(acc, base, term.multiplier)
    return acc
