"""Step positions of model evaluations, for every sampler family, from their noise levels."""

from __future__ import annotations

import math

import pytest

from lib_scheduled_lora.core.positions import fractional_index, scheduler_grid, step_grid
from lib_scheduled_lora.hosts.samplers import SAMPLERS, make_scheduler


def test_fractional_index_interpolates_and_clamps():
    grid = [14.6, 7.0, 3.0, 1.0]  # a descending sigma grid
    assert fractional_index(grid, 14.6) == 0.0
    assert fractional_index(grid, 3.0) == 2.0
    assert fractional_index(grid, 5.0) == pytest.approx(1.5)
    assert fractional_index(grid, 99.0) == 0.0
    assert fractional_index(grid, 0.0) == 3.0
    assert fractional_index([1.0, 2.0, 4.0], 3.0) == pytest.approx(1.5)  # ascending works too
    assert fractional_index([5.0], 1.0) == 0.0


def test_log_interpolation_puts_a_geometric_midpoint_half_way():
    """DPM2 evaluates at sqrt(sigma_i * sigma_i+1): half a step in log-sigma."""
    grid = [10.0, 2.5, 0.4]
    assert fractional_index(grid, math.sqrt(10.0 * 2.5), log=True) == pytest.approx(0.5)
    assert fractional_index(grid + [0.0], 0.0, log=True) == 3.0


def test_step_grid_takes_the_main_steps():
    assert step_grid([9, 6, 6, 3, 3, 0, 0], order=2) == [9, 6, 3, 0]  # Heun
    assert step_grid([9, 7.5, 6, 4.5, 3, 1.5, 0], order=2) == [9, 6, 3, 0]  # DPM2 midpoints
    assert step_grid([9, 6, 6, 3, 0], order=1) == [9, 6, 3, 0]  # PLMS's doubled first step


def _scheduler(name: str, steps: int):
    import diffusers

    config = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).config
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    return scheduler


def _positions(name: str, steps: int) -> list[float]:
    scheduler = _scheduler(name, steps)
    grid = scheduler_grid(scheduler)
    return [grid.position(float(t), i) for i, t in enumerate(scheduler.timesteps)]


@pytest.mark.parametrize("name", ["euler", "euler_a", "lms", "dpmpp_2m", "ddim", "unipc"])
def test_first_order_samplers_evaluate_once_per_step(name):
    assert _positions(name, 8) == [float(i) for i in range(8)]


@pytest.mark.parametrize("name", ["heun", "dpm2_a"])
def test_second_order_correction_sits_at_the_next_steps_noise_level(name):
    """2N-1 evaluations; the correction of step i is evaluated at sigma_{i+1}."""
    positions = _positions(name, 6)
    assert len(positions) == 2 * 6 - 1
    assert positions[0] == 0.0
    assert positions == sorted(positions)
    assert [round(p) for p in positions[1:]] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_dpm2_midpoints_sit_between_steps():
    positions = _positions("dpm2", 6)
    main, extra = positions[0::2], positions[1::2]
    assert main == [float(i) for i in range(6)]
    for i, p in enumerate(extra):
        assert i < p < i + 1
    # The timestep of the geometric-mean sigma, placed linearly on the timestep grid: not half-way.
    twenty = _positions("dpm2", 20)[1::2]
    assert [round(p, 3) for p in twenty[:3]] == [0.491, 1.491, 2.491]  # SD 1.x betas, 20 steps


def test_plms_counts_its_doubled_first_step_once():
    assert _positions("plms", 6) == [0.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_every_listed_sampler_builds():
    for name in SAMPLERS:
        assert _scheduler(name, 4).timesteps is not None
