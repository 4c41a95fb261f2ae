"""Where a model evaluation sits in the sampling schedule, as a (fractional) step index.

Samplers do not all evaluate the model once per step: Heun and DPM2 evaluate twice, DDIM drops
the last step, img2img skips the first ones. Counting calls is therefore wrong; what identifies
an evaluation is its noise level. These pure functions turn a noise level (sigma, or a diffusers
timestep) into a step index by locating it on the sampler's own grid of step noise levels, so
an extra evaluation between two steps gets a fractional index between them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any


def fractional_index(grid: Sequence[float], value: float, *, log: bool = False) -> float:
    """Position of ``value`` on a monotone ``grid`` as a fractional index in [0, len(grid) - 1].

    Linear interpolation between neighbours (in log space with ``log=True``, which puts a
    geometric-mean sigma such as DPM2's midpoint exactly half-way). Values outside the grid are
    clamped to its ends. The grid may be increasing or decreasing.
    """
    n = len(grid)
    if n == 0:
        raise ValueError("empty grid")
    if n == 1:
        return 0.0
    points = [_transform(g, log) for g in grid]
    x = _transform(value, log)
    descending = points[0] > points[-1]
    if descending:
        points = [-p for p in points]
        x = -x
    if x <= points[0]:
        return 0.0
    if x >= points[-1]:
        return float(n - 1)
    hi = bisect.bisect_right(points, x)
    lo = hi - 1
    span = points[hi] - points[lo]
    return lo + ((x - points[lo]) / span if span > 0 else 0.0)


def _transform(value: float, log: bool) -> float:
    if not log:
        return float(value)
    # sigma = 0 (the end of every k-diffusion schedule) is the far end of the grid.
    return math.log(value) if value > 0 else -math.inf


def step_grid(timesteps: Sequence[float], order: int = 1) -> list[float]:
    """The noise levels of the main steps, from a sampler's list of evaluations.

    Diffusers schedulers list one timestep per model evaluation, ``order`` of them per step
    except the last: Heun repeats each step's timestep (t0, t1, t1, t2, t2, ...), KDPM2
    interleaves midpoints (t0, t0.5, t1, t1.5, ...). Every ``order``-th entry is a main step.
    PLMS evaluates its first step twice (t0, t1, t1, t2, ...), so repeats are dropped.
    """
    grid: list[float] = []
    for t in list(timesteps)[:: max(1, order)]:
        if not grid or float(t) != grid[-1]:
            grid.append(float(t))
    return grid


def scheduler_step_position(scheduler: Any, timestep: Any) -> float:
    """The fractional step index of a UNet call at ``timestep`` under a diffusers scheduler.

    ``timestep`` may be a number or a tensor (batched: all entries are equal in a pipeline).
    """
    if timestep is None:
        return 0.0
    t = float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return 0.0
    return fractional_index(step_grid(timesteps, int(getattr(scheduler, "order", 1) or 1)), t)
