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


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler of the named kind built from a pipeline's scheduler config."""
    import diffusers

    class_name, extra = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(config, **extra)
