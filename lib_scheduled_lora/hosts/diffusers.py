"""The diffusers adapter: scheduled networks on a diffusers pipeline (or any object shaped like one).

The second implementation of the host interface (:mod:`lib_scheduled_lora.core.session`):

* the model's modules: the pipeline's ``unet`` / ``text_encoder`` / ``text_encoder_2``, grouped
  in a ``ModuleDict`` so that parameter names read ``unet.…``, ``text_encoder.…``;
* conditioning: a forward pre-hook on each text encoder opens ``runtime.conditioning`` (the ``te``
  schedule at step 0) and its forward hook closes it, so the text encoders are changed only while
  they encode;
* passes and evaluations: each UNet call is placed on the scheduler's own grid of timesteps (so
  Heun's and DPM2's extra evaluations and img2img's shortened schedules get the right position
  without counting calls); a new grid (a new generation, other steps or another scheduler) opens a
  new pass, and the pass stays open until the next one or the end of :func:`attach`.

    with attach(pipe, networks):
        image = pipe(prompt, num_inference_steps=20).images[0]

The ΔW cache and the merge buffers belong to the pipeline and outlive :func:`attach`
(:func:`pipeline_state`; pass ``cache=`` to share or bound the cache), so repeated generations
with the same network objects rebuild nothing and allocate nothing; load networks through one
:class:`~lib_scheduled_lora.core.library.NetworkLibrary` to keep the objects. They cost host RAM
(about one copy of the targeted weights, and the ΔW cache's budget) until the pipeline is gone
or ``pipeline_state(pipe).clear()``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lib_scheduled_lora.core.delta_cache import DeltaCache
from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork
from lib_scheduled_lora.core.live import BufferPool
from lib_scheduled_lora.core.positions import noise_level, scheduler_grid
from lib_scheduled_lora.core.session import Evaluation, PassSession, Runtime

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_CACHE_MB = 2048.0

@dataclass
class PipelineState:
    """What repeated generations on one pipeline share: the ΔW cache and the merge buffers."""

    cache: DeltaCache
    pool: BufferPool = field(default_factory=BufferPool)

    def clear(self) -> None:
        self.cache.clear()
        self.pool.clear()


# One state per pipeline object, alive as long as the pipeline is.
_PIPELINES: weakref.WeakKeyDictionary[Any, PipelineState] = weakref.WeakKeyDictionary()


def pipeline_parts(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's components that networks change, by the names :mod:`naming` reads."""
    return {n: getattr(pipe, n) for n in COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)}


def unet_timestep(args: tuple, kwargs: dict) -> float | None:
    """The timestep of one UNet call (a forward pre-hook's arguments: ``unet(sample, timestep, ...)``)."""
    return noise_level(kwargs.get("timestep", args[1] if len(args) > 1 else None))


class DiffusersHost:
    """:class:`~lib_scheduled_lora.core.session.HostAdapter` for a diffusers pipeline."""

    def __init__(self, pipe: Any, settings: EngineSettings):
        self.pipe = pipe
        self._settings = settings
        self.parts = pipeline_parts(pipe)
        # A ModuleDict only groups the existing modules (no copy).
        self._model = nn.ModuleDict(self.parts)

    def model(self) -> nn.Module:
        return self._model

    def find_network_file(self, name: str) -> str | None:
        return None  # networks come loaded (attach's argument)

    def settle(self, model: nn.Module) -> None:
        pass  # no host networks of its own

    def settings(self) -> EngineSettings:
        return self._settings

    def model_key(self) -> object:
        return tuple((name, id(module)) for name, module in self.parts.items())

    def state(self) -> object:
        return None


def pipeline_state(pipe: Any, budget_mb: float = DEFAULT_CACHE_MB) -> PipelineState:
    """The ΔW cache and merge buffers that :func:`attach` uses for ``pipe``."""
    state = _PIPELINES.get(pipe)
    if state is None:
        state = _PIPELINES[pipe] = PipelineState(DeltaCache(int(budget_mb * 2**20)))
    return state


class AttachedSchedules:
    """The hooks and runtime of one :func:`attach`; leaving the context restores everything."""

    def __init__(
        self,
        pipe: Any,
        networks: Sequence[ScheduledNetwork],
        settings: EngineSettings | None,
        cache: DeltaCache | None,
    ):
        self.pipe = pipe
        self.networks = list(networks)
        settings = settings or EngineSettings()
        self.host = DiffusersHost(pipe, settings)
        state = pipeline_state(pipe, settings.cache_budget_mb)
        self.runtime = Runtime(self.host, cache=cache if cache is not None else state.cache, pool=state.pool)
        self.trace: list[Evaluation] = []  # every UNet evaluation (for tests and plots)
        self.te_multipliers: dict[str, float] = {}  # what the text encoders last encoded with
        self._session: PassSession | None = None
        self._pass = contextlib.ExitStack()
        self._conditioning = contextlib.ExitStack()
        parts = self.host.parts
        self._handles = [parts["unet"].register_forward_pre_hook(self._before_unet, with_kwargs=True)]
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                self._handles.append(parts[name].register_forward_pre_hook(self._before_text_encoder))
                self._handles.append(parts[name].register_forward_hook(self._after_text_encoder))

    @property
    def positions(self) -> list[float]:
        """The step position of every UNet evaluation so far."""
        return [e.position for e in self.trace]

    def _steps(self) -> int:
        return int(getattr(self.pipe.scheduler, "num_inference_steps", None) or 1)

    def _before_text_encoder(self, module: nn.Module, args: tuple) -> None:
        self._conditioning.close()  # a text encoder that raised last time
        weights = self._conditioning.enter_context(self.runtime.conditioning(self.networks, self._steps()))
        if weights is not None:
            self.te_multipliers = weights.multipliers("te")

    def _after_text_encoder(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._conditioning.close()

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = scheduler_grid(self.pipe.scheduler)
        if self._session is None or self._session.grid != grid:
            self._pass.close()
            self._session = self._pass.enter_context(self.runtime.sampling_pass(self.networks, grid, trace=self.trace))
        if self._session is None:
            return
        self._session.evaluate(unet_timestep(args, kwargs))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            self._conditioning.close()
            self._pass.close()
        finally:
            self._session = None
            self.runtime.restore_all()

    def __enter__(self) -> AttachedSchedules:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attach(
    pipe: Any,
    networks: Sequence[ScheduledNetwork],
    settings: EngineSettings | None = None,
    *,
    cache: DeltaCache | None = None,
) -> AttachedSchedules:
    """Make ``pipe``'s next generations follow the networks' schedules until the context exits.

    ``cache``: the ΔW cache to use (default: the pipeline's own, kept between attaches).
    """
    return AttachedSchedules(pipe, networks, settings, cache)
