"""Every sampler the runner lists draws a sensible image on the built-in demo model.

The demo model's cosine schedule puts timestep 999 at sigma ≈ 20291 (Stable Diffusion's: 14.6).
Started there, Heun and DPM2 a drew pure noise and the other ancestral samplers threw the seed's
composition away; hosts/samplers.make_scheduler caps the first sigma at SD's (see there).

Closeness, measured at 10 steps on these prompts and seeds (mean absolute pixel difference in
[0, 1] to DDIM at the same seed): deterministic samplers 0.01-0.10, ancestral ones (which draw
fresh noise every step, from the seed's generator) 0.12-0.16; DDIM images of *other* seeds differ by 0.26-0.37, and the
broken Heun/DPM2 a images by 0.42. Hence the bounds below: 0.12 for the deterministic samplers
and 0.6 x the other-seed difference for all; and no more high-frequency energy than DDIM's x 1.5
(noise had 5x).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("scipy")  # diffusers' LMS scheduler

from lib_scheduled_lora.demo import model as demo  # noqa: E402
from lib_scheduled_lora.hosts.samplers import SAMPLERS, SIGMA_MAX, capped_alphas_cumprod, make_scheduler  # noqa: E402

PROMPTS = ["a white wday", "a red square", "a blue circle", "a wday"]
STEPS = 10
ANCESTRAL = {"euler_a", "dpm2_a"}


def _total_variation(images: torch.Tensor) -> float:
    return float(
        (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean()
    )


@pytest.fixture(scope="module")
def renders():
    torch.set_num_threads(1)
    pipe = demo.load_demo_pipeline()
    config = pipe.scheduler.config

    def render(sampler: str, first_seed: int = 0) -> torch.Tensor:
        pipe.scheduler = make_scheduler(sampler, config)
        generators = [torch.Generator().manual_seed(first_seed + i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=3.0, generator=generators).tensors

    ddim = render("ddim")
    unrelated = float((render("ddim", first_seed=100) - ddim).abs().mean())
    return render, ddim, unrelated


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"ddim"}))
def test_every_sampler_draws_what_ddim_draws(renders, sampler):
    render, ddim, unrelated = renders
    images = render(sampler)
    assert torch.isfinite(images).all()
    difference = float((images - ddim).abs().mean())
    assert difference < 0.6 * unrelated, (sampler, difference, unrelated)
    if sampler not in ANCESTRAL:
        assert difference < 0.12, (sampler, difference)
    assert _total_variation(images) < 1.5 * _total_variation(ddim), sampler


def test_sigma_space_samplers_start_at_sd_sigma_on_the_demo_schedule():
    config = demo.load_demo_pipeline().scheduler.config
    for name in ("euler", "heun", "dpm2_a", "lms"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(20)
        assert float(scheduler.sigmas.max()) == pytest.approx(SIGMA_MAX, rel=1e-4)
        assert int(scheduler.timesteps[0]) == 999  # still told the timestep it was trained on first
    ddim = make_scheduler("ddim", config)
    assert float(ddim.alphas_cumprod[-1]) < 1e-8  # the alpha-space samplers keep the schedule


def test_capping_changes_only_the_last_timestep():
    import diffusers

    sd = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert capped_alphas_cumprod(sd.alphas_cumprod, SIGMA_MAX + 0.01) is None  # SD itself: untouched
    cosine = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    before = cosine.alphas_cumprod
    after = capped_alphas_cumprod(before, SIGMA_MAX)
    assert torch.equal(after[:-1], before[:-1])
    assert float(((1 - after[-1]) / after[-1]).sqrt()) == pytest.approx(SIGMA_MAX, rel=1e-6)


def test_a_scheduler_made_from_a_made_schedulers_config_is_the_same():
    """Making a sampler from the pipeline's current scheduler config, again and again (what a
    runner does per generation), gives the same noise levels every time."""
    config = demo.load_demo_pipeline().scheduler.config
    first = make_scheduler("euler", config)
    again = make_scheduler("euler", make_scheduler("euler", first.config).config)
    first.set_timesteps(8)
    again.set_timesteps(8)
    assert torch.equal(first.sigmas, again.sigmas)
