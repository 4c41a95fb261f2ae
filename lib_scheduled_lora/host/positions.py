"""Where a model evaluation sits in a sampling pass, from the grid the sampler itself iterates.

A1111's samplers receive their whole noise grid as an argument: k-diffusion samplers a descending
``sigmas`` tensor (``N + 1`` entries ending in 0, already cut for img2img: the host passes
``sigmas[steps - t_enc - 1:]`` so that the pass has ``t_enc + 1`` steps), the timestep samplers
(DDIM, PLMS) an ascending ``timesteps`` array that they walk backwards from the end, evaluating
``len(timesteps) - 1`` times. :func:`grid_for_call` reads that argument (the adapter wraps the
sampler function to see it) and :meth:`PassGrid.position` turns the noise level of each
evaluation (``params.sigma`` in ``on_cfg_denoiser``: a sigma, or a timestep for DDIM/PLMS) into a
fractional step index. Second-order samplers' extra evaluations therefore land between steps by
their noise level (DPM2's geometric-mean sigma exactly half-way, Heun's corrector at the next
step's sigma), and nothing depends on ``shared.state.sampling_step``, which lags by one.

Samplers whose evaluations are not on the grid they are handed fall back to counting:
UniPC (one evaluation per step on its own time grid) and unknown samplers; DPM fast/adaptive
(only ``sigma_min``/``sigma_max`` given) are placed log-linearly between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lib_scheduled_lora.positions import fractional_index

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


def counting_grid(steps: int, total_evaluations: int | None) -> PassGrid:
    """For an evaluation no captured grid covers: place it by the host's own counter."""
    steps = max(1, int(steps or 1))
    per_step = (total_evaluations / steps) if total_evaluations else 1.0
    return PassGrid(COUNT, (), steps, max(1.0, per_step))


def steps_of_evaluations(positions: Sequence[float]) -> list[int]:
    """Integer step indices of a list of positions (for logs and tests)."""
    return [int(math.floor(p + 1e-9)) for p in positions]
