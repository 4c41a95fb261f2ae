"""Scheduled networks on a diffusers pipeline (or any object shaped like one).

``attach`` hooks the pipeline's text encoder(s) and UNet. Each UNet call is placed on the
sampling schedule by its timestep (so Heun's and DPM2's extra evaluations, and img2img's
shortened schedules, get the right position without counting calls), and the engine brings the
weights to that position before the UNet runs. The text encoders get their ``te`` schedule at
step 0, where the pipeline encodes the prompt.

    with attach(pipe, networks):
        image = pipe(prompt, num_inference_steps=20).images[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork, ScheduledWeights
from lib_scheduled_lora.core.positions import scheduler_step_position

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class AttachedSchedules:
    """The hooks and engine of one :func:`attach`; leaving the context restores everything."""

    def __init__(self, pipe: Any, networks: Sequence[ScheduledNetwork], settings: EngineSettings | None):
        self.pipe = pipe
        parts = {name: getattr(pipe, name) for name in COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)}
        # A ModuleDict only groups the existing modules (no copy), giving the parameter names
        # "unet.…", "text_encoder.…" that the name mapping expects for diffusers models.
        self.weights = ScheduledWeights(nn.ModuleDict(parts), networks, settings)
        self.positions: list[float] = []  # every UNet evaluation's step position (for tests/plots)
        self._handles = [parts["unet"].register_forward_pre_hook(self._before_unet, with_kwargs=True)]
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                self._handles.append(parts[name].register_forward_pre_hook(self._before_text_encoder))

    def _steps(self) -> int:
        return int(getattr(self.pipe.scheduler, "num_inference_steps", None) or 1)

    def _before_text_encoder(self, module: nn.Module, args: tuple) -> None:
        self.weights.set_position("te", 0, self._steps())

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        steps = self._steps()
        step = scheduler_step_position(self.pipe.scheduler, timestep)
        self.positions.append(step)
        self.weights.set_position("unet", step, steps)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.weights.restore()

    def __enter__(self) -> AttachedSchedules:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attach(pipe: Any, networks: Sequence[ScheduledNetwork], settings: EngineSettings | None = None) -> AttachedSchedules:
    """Make ``pipe``'s next generations follow the networks' schedules until the context exits."""
    return AttachedSchedules(pipe, networks, settings)
