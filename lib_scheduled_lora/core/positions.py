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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# -- WebUI samplers: the grid a k-diffusion / timestep sampler is handed ---------------------

SIGMA, TIMESTEP, RANGE, COUNT = "sigma", "timestep", "range", "count"


@dataclass(frozen=True)
class PassGrid:
    """One sampling pass: ``steps`` steps, and the noise level of each step (``values``).

    ``kind`` says how an evaluation is placed: by sigma (log scale), by timestep (linear), in a
    log-linear sigma range (``values == (sigma_max, sigma_min)``), or by counting evaluations
    (``evaluations_per_step`` of them per step).
    """

    kind: str
    values: tuple[float, ...]
    steps: int
    evaluations_per_step: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            object.__setattr__(self, "steps", 1)

    def position(self, noise: float | None, evaluation: int) -> float:
        """The fractional step index (0 .. steps - 1) of an evaluation at ``noise``, the
        ``evaluation``-th (0-based) of this pass."""
        last = float(self.steps - 1)
        if self.kind == COUNT or noise is None or not math.isfinite(noise) or not self.values:
            return min(last, max(0.0, evaluation / max(self.evaluations_per_step, 1e-9)))
        if self.kind == RANGE:
            hi, lo = self.values
            if not (hi > lo > 0) or noise <= 0:
                return last if noise <= lo else 0.0
            fraction = (math.log(hi) - math.log(noise)) / (math.log(hi) - math.log(lo))
            return min(last, max(0.0, fraction * last))
        return _snap(min(last, fractional_index(self.values, noise, log=self.kind == SIGMA)))


# A sigma that went through another dtype (float32 grid, float64 arithmetic, fp16 autocast) can
# land a hair before its step; a switch "at" that step must still take effect there.
SNAP = 1e-4


def _snap(position: float) -> float:
    nearest = round(position)
    return float(nearest) if abs(position - nearest) < SNAP else position


def _floats(values: Any) -> list[float]:
    if values is None:
        return []
    if hasattr(values, "detach"):
        values = values.detach().cpu().reshape(-1).tolist()
    return [float(v) for v in values]


def grid_for_call(kwargs: Mapping[str, Any], launch_steps: int | None, func_name: str = "") -> PassGrid:
    """The grid of one call of a sampler function, from its keyword arguments.

    ``launch_steps`` is the step count the host announced for the pass (A1111:
    ``launch_sampling(steps, ...)``: ``steps``, or ``t_enc + 1`` in img2img/hires); it is used
    where the arguments carry no grid.
    """
    fallback = max(1, int(launch_steps or 1))
    name = func_name.lower()
    sigmas = _floats(kwargs.get("sigmas", kwargs.get("sigma_sched")))
    if len(sigmas) >= 2:
        # N + 1 entries, evaluations at the first N (the last, usually 0, is where sampling ends).
        return PassGrid(SIGMA, tuple(sigmas[:-1]), len(sigmas) - 1)
    timesteps = _floats(kwargs.get("timesteps"))
    if timesteps:
        if "unipc" in name:
            # UniPC evaluates once per step on its own time grid (steps = len(timesteps)).
            return PassGrid(COUNT, (), len(timesteps))
        # DDIM/PLMS: for i in range(len - 1): index = len - 1 - i; model(x, timesteps[index]).
        evaluated = tuple(reversed(timesteps[1:]))
        if not evaluated:
            return PassGrid(COUNT, (), 1)
        return PassGrid(TIMESTEP, evaluated, len(evaluated))
    if "sigma_min" in kwargs and "sigma_max" in kwargs:
        n = int(kwargs.get("n") or fallback)
        return PassGrid(RANGE, (float(kwargs["sigma_max"]), float(kwargs["sigma_min"])), n)
    return PassGrid(COUNT, (), fallback)


# -- diffusers schedulers ---------------------------------------------------------------------


def scheduler_grid(scheduler: Any, evaluations: int | None = None) -> PassGrid:
    """The pass grid of a diffusers scheduler after ``set_timesteps``: its main steps' timesteps
    (:func:`step_grid`), ``num_inference_steps`` steps. Duck-typed: no diffusers import.

    ``evaluations``: how many of the scheduler's timesteps the pipeline runs, when it starts part
    of the way (img2img and hires pipelines run the last ``strength`` of them, and announce the
    count as their ``num_timesteps``). The pass is then those steps only, as a WebUI's img2img
    pass is: its first evaluation is step 0 of the schedule.
    """
    steps = int(getattr(scheduler, "num_inference_steps", None) or 1)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return PassGrid(COUNT, (), steps)
    order = int(getattr(scheduler, "order", 1) or 1)
    if evaluations is not None and 0 < evaluations < len(timesteps):
        grid = step_grid(list(timesteps)[len(timesteps) - evaluations :], order)
        return PassGrid(TIMESTEP, tuple(grid), len(grid))
    return PassGrid(TIMESTEP, tuple(step_grid(timesteps, order)), steps)


def noise_level(value: Any) -> float | None:
    """A sigma or timestep argument as one number (batched tensors hold equal entries)."""
    if value is None:
        return None
    return float(value.reshape(-1)[0]) if hasattr(value, "reshape") else float(value)
