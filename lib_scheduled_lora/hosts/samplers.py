"""WebUI-style sampler names for diffusers schedulers (used by the standalone runner)."""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class name, extra config). Names follow the WebUI's list.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

LABELS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "plms": "PLMS",
    "unipc": "UniPC",
}

# The k-diffusion family: they integrate in noise level sigma = sqrt((1 - ᾱ) / ᾱ), starting at the
# sigma of the first timestep, instead of stepping in ᾱ like DDIM, PLMS, DPM++ and UniPC.
SIGMA_SPACE = frozenset({"euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms"})

# Stable Diffusion's sigma at timestep 999 (scaled-linear betas 0.00085..0.012): the range these
# samplers are built for. A schedule whose last ᾱ is (nearly) zero, such as the demo model's cosine
# one (sigma 20291 at t = 999), is capped here for them; see make_scheduler.
SIGMA_MAX = 14.6146


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler of the named kind built from a pipeline's scheduler config.

    A sigma-space sampler gets the model's own noise schedule with its last ᾱ raised, when needed,
    so that the first sigma is at most :data:`SIGMA_MAX` (every other timestep unchanged). Starting
    from sigma ≈ 20000, Heun's trapezoid and DPM2's midpoint step to the next sigma (≈ 13 at 20
    steps) multiply the difference between two predictions of the image by the ratio of the
    sigmas (≈ 1600, ≈ 40): the result is noise (or NaN); the ancestral samplers replace the whole
    seed noise by fresh noise in that first step. At sigma 14.6 the model input is already 99.8 %
    noise, as in Stable Diffusion. diffusers does the same for zero-terminal-SNR schedules
    (``rescale_betas_zero_snr`` sets the last ᾱ to 2**-24, sigma 4096), at a level too high for
    the second-order samplers.

    The change is made on the scheduler object (its ``alphas_cumprod``, which these samplers read
    in ``set_timesteps``), never in its config: a scheduler made from another one's config is the
    same scheduler, however often that is repeated.
    """
    import diffusers

    class_name, extra = SAMPLERS[name]
    scheduler = getattr(diffusers, class_name).from_config(config, **extra)
    if name in SIGMA_SPACE:
        capped = capped_alphas_cumprod(scheduler.alphas_cumprod, SIGMA_MAX)
        if capped is not None:
            scheduler.alphas_cumprod = capped
            scheduler.set_timesteps(scheduler.config.num_train_timesteps)  # the sigmas __init__ derives
    return scheduler


def capped_alphas_cumprod(alphas_cumprod: Any, sigma_max: float) -> Any:
    """``alphas_cumprod`` with its last value raised to 1 / (1 + sigma_max²) (sigma_max at the last
    training timestep); None when it already is at least that. Only timestep 999 changes, so the
    model is told the timestep it was trained on first and every later one keeps its noise level."""
    floor = 1.0 / (1.0 + sigma_max**2)
    if float(alphas_cumprod[-1]) >= floor:
        return None
    capped = alphas_cumprod.clone()
    capped[-1] = floor
    return capped
