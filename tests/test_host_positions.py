"""Step positions per sampler family, replaying how A1111's samplers call the model.

The evaluation sequences below follow k-diffusion (the commit A1111 pins) and A1111's
``sd_samplers_timesteps_impl``: which noise level each model call gets, given the grid the host
passes to the sampler function (``sigmas=...`` or ``timesteps=...``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_scheduled_lora.core.positions import COUNT, RANGE, SIGMA, TIMESTEP, grid_for_call
from lib_scheduled_lora.core.schedule import parse_schedule


def karras(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> list[float]:
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def ancestral_down(s_from: float, s_to: float, eta: float = 1.0) -> float:
    if s_to == 0:
        return 0.0
    up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    return (s_to**2 - up**2) ** 0.5


def evaluations(sampler: str, sigmas: list[float]) -> list[float]:
    """The sigma of every model call of a k-diffusion sampler over ``sigmas`` (N + 1 entries)."""
    out = []
    for i in range(len(sigmas) - 1):
        s, nxt = sigmas[i], sigmas[i + 1]
        out.append(s)
        if sampler == "heun" and nxt > 0:
            out.append(nxt)
        elif sampler == "dpm_2" and nxt > 0:
            out.append(math.exp((math.log(s) + math.log(nxt)) / 2))
        elif sampler == "dpm_2_ancestral":
            down = ancestral_down(s, nxt)
            if down > 0:
                out.append(math.exp((math.log(s) + math.log(down)) / 2))
        elif sampler == "dpmpp_2s_ancestral":
            down = ancestral_down(s, nxt)
            if down > 0:
                out.append(math.exp((math.log(s) + math.log(down)) / 2))  # sigma_fn(t + h / 2)
        elif sampler == "dpmpp_sde" and nxt > 0:
            out.append(math.exp((math.log(s) + math.log(nxt)) / 2))
    return out


FIRST_ORDER = ["euler", "euler_ancestral", "lms", "dpmpp_2m"]
SECOND_ORDER = ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"]


@pytest.mark.parametrize("sampler", FIRST_ORDER)
def test_first_order_samplers_evaluate_once_per_step_at_integer_positions(sampler):
    sigmas = karras(20)
    grid = grid_for_call({"sigmas": torch.tensor(sigmas)}, 20, f"sample_{sampler}")
    assert grid.kind == SIGMA and grid.steps == 20
    positions = [grid.position(s, i) for i, s in enumerate(evaluations(sampler, sigmas))]
    assert positions == pytest.approx(list(range(20)))
    # wday: 0 for step indices 0-5, 1 from 6 (6/19 >= 0.3)
    wday = parse_schedule("0@0.3:1")
    assert [wday.at(p, grid.steps) for p in positions] == [0.0] * 6 + [1.0] * 14


@pytest.mark.parametrize("sampler", SECOND_ORDER)
def test_second_order_samplers_place_extra_evaluations_between_steps(sampler):
    n = 10
    sigmas = karras(n)
    grid = grid_for_call({"sigmas": sigmas}, n, f"sample_{sampler}")
    evals = evaluations(sampler, sigmas)
    assert len(evals) == 2 * n - 1
    positions = [grid.position(s, i) for i, s in enumerate(evals)]
    main, extra = positions[0::2], positions[1::2]
    assert main == pytest.approx(list(range(n)))
    for i, p in enumerate(extra):
        assert i < p <= i + 1, (i, p)
    assert positions == sorted(positions)
    if sampler in ("dpm_2", "dpmpp_sde"):
        assert extra == pytest.approx([i + 0.5 for i in range(n - 1)])  # geometric mean: half-way
    if sampler in ("dpm_2_ancestral", "dpmpp_2s_ancestral"):
        # at eta 1, exp((log σ_i + log σ_down) / 2) is σ_i+1 itself (the editor draws them there)
        assert extra == pytest.approx([i + 1 for i in range(n - 1)])
    if sampler == "heun":
        assert extra == pytest.approx([i + 1 for i in range(n - 1)])  # the corrector runs at the next sigma


def test_img2img_pass_has_t_enc_plus_one_steps():
    steps, denoise = 20, 0.5
    t_enc = int(min(denoise, 0.999) * steps)
    sigmas = karras(steps)
    sigma_sched = sigmas[steps - t_enc - 1 :]  # what the host passes
    grid = grid_for_call({"sigmas": torch.tensor(sigma_sched)}, t_enc + 1, "sample_euler")
    assert grid.steps == t_enc + 1
    positions = [grid.position(s, i) for i, s in enumerate(evaluations("euler", sigma_sched))]
    assert positions == pytest.approx(list(range(t_enc + 1)))


def test_img2img_fix_steps_runs_the_requested_steps():
    requested, denoise = 20, 0.5
    steps = int(requested / min(denoise, 0.999))
    t_enc = requested - 1
    sigmas = karras(steps)
    grid = grid_for_call({"sigmas": sigmas[steps - t_enc - 1 :]}, t_enc + 1)
    assert grid.steps == requested


def test_discard_penultimate_sigma_keeps_n_steps():
    sigmas = karras(21)
    sigmas = sigmas[:-2] + sigmas[-1:]
    grid = grid_for_call({"sigmas": sigmas}, 20, "sample_dpm_2")
    assert grid.steps == 20


def _ddim_timesteps(steps: int) -> list[int]:
    return [min(999, t + 1) for t in range(0, 1000, 1000 // steps)]


def test_ddim_evaluates_len_minus_one_times_over_its_own_steps():
    timesteps = _ddim_timesteps(20)
    grid = grid_for_call({"timesteps": torch.tensor(timesteps)}, 20, "ddim")
    assert grid.kind == TIMESTEP and grid.steps == 19
    calls = [float(timesteps[len(timesteps) - 1 - i]) for i in range(len(timesteps) - 1)]
    positions = [grid.position(t, i) for i, t in enumerate(calls)]
    assert positions == pytest.approx(list(range(19)))
    ramp = parse_schedule("0@0,1@1")
    assert ramp.at(positions[-1], grid.steps) == 1.0


def test_plms_first_step_second_evaluation_is_at_the_next_timestep():
    timesteps = _ddim_timesteps(10)
    grid = grid_for_call({"timesteps": timesteps}, 10, "plms")
    n = len(timesteps)
    calls = [timesteps[n - 1], timesteps[n - 2]] + [timesteps[n - 1 - i] for i in range(1, n - 1)]
    positions = [grid.position(float(t), i) for i, t in enumerate(calls)]
    assert positions == pytest.approx([0, 1] + list(range(1, n - 1)))


def test_ddim_img2img_uses_the_cut_timesteps():
    timesteps = _ddim_timesteps(20)
    t_enc = 10
    grid = grid_for_call({"timesteps": timesteps[:t_enc]}, t_enc + 1, "ddim")
    assert grid.steps == t_enc - 1
    assert grid.position(float(timesteps[t_enc - 1]), 0) == 0
    assert grid.position(float(timesteps[1]), 8) == pytest.approx(t_enc - 2)


def test_unipc_counts_evaluations():
    grid = grid_for_call({"timesteps": _ddim_timesteps(20)}, 20, "unipc")
    assert grid.kind == COUNT and grid.steps == 20
    assert [grid.position(500.0, i) for i in (0, 5, 19, 25)] == [0, 5, 19, 19]


def test_dpm_fast_is_placed_log_linearly_between_sigma_max_and_min():
    grid = grid_for_call({"sigma_min": 0.03, "sigma_max": 14.6, "n": 11}, 11, "sample_dpm_fast")
    assert grid.kind == RANGE and grid.steps == 11
    assert grid.position(14.6, 0) == 0
    assert grid.position(0.03, 9) == pytest.approx(10)
    assert grid.position(math.sqrt(14.6 * 0.03), 4) == pytest.approx(5)


def test_unknown_sampler_falls_back_to_the_host_step_count():
    grid = grid_for_call({}, 8, "sample_custom")
    assert grid.kind == COUNT and grid.steps == 8
    assert grid.position(None, 3) == 3


def test_hires_pass_has_its_own_step_count():
    hires = grid_for_call({"sigmas": karras(30)[30 - 10 - 1 :]}, 11)  # hires steps=10, denoise 0.35
    assert hires.steps == 11
    schedule = parse_schedule("0.6")
    assert schedule.at(hires.position(karras(30)[19], 0), hires.steps) == 0.6


def test_one_step_pass():
    grid = grid_for_call({"sigmas": [14.6, 0.0]}, 1)
    assert grid.steps == 1 and grid.position(14.6, 0) == 0
    assert parse_schedule("0@0.3:1").at(0, 1) == 0.0
