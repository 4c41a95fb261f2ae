"""The host interface: what a host adapter tells the engine, and the scopes the core gives back.

A host adapter (the diffusers runner, A1111; Forge and SD.Next next) implements
:class:`HostAdapter` and drives a :class:`Runtime` with four kinds of calls:

========================== =================================================================
the host tells              the adapter calls
========================== =================================================================
the model's modules         ``HostAdapter.model()`` (parameter names as :mod:`naming` reads them)
where conditioning happens  ``with runtime.conditioning(networks, steps):`` around the host's
                            text-encoder call of one pass (``te`` schedules at the pass's step 0)
pass boundaries             ``with runtime.sampling_pass(networks, grid) as session:`` around one
                            sampler run, ``grid`` being the sampler's own noise grid
every model evaluation      ``session.evaluate(noise)`` right before the UNet runs
restore points              leaving either scope restores every weight it wrote (normally, on an
                            exception, on an interrupt); ``runtime.restore_all()`` as a guard
========================== =================================================================

The core gives back: weights that equal ``round(W + Σ m·ΔW)`` at every evaluation, the position of
each evaluation on the schedule (``session.evaluate`` returns it; ``trace`` records it), and
bit-identical weights outside the scopes. Networks for tags come from ``runtime.scheduled(tags,
hires)`` (files found by the host, loaded once and kept).

Before either scope copies any weight, :meth:`HostAdapter.settle` makes the host's own LoRA state
final (A1111 applies its networks lazily inside each layer's forward and restores from its own
CPU backups whenever its set of networks changes): the host's backups then never see our writes,
and our copies include the host's plain networks, which stay in place when we restore.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from lib_scheduled_lora.core.delta_cache import DeltaCache
from lib_scheduled_lora.core.engine import Component, EngineSettings, ScheduledNetwork, ScheduledWeights
from lib_scheduled_lora.core.library import LoadedNetworks
from lib_scheduled_lora.core.live import BufferPool
from lib_scheduled_lora.core.networks.base import Network
from lib_scheduled_lora.core.positions import PassGrid
from lib_scheduled_lora.core.tags import NetworkTag
from lib_scheduled_lora.errors import MissingNetworkError

log = logging.getLogger("scheduled_lora")


class HostAdapter(Protocol):
    """What a host must provide. Small on purpose: every host implements the same six."""

    def model(self) -> nn.Module:
        """The module whose ``named_parameters()`` the engine binds (A1111: ``shared.sd_model``)."""

    def find_network_file(self, name: str) -> str | None:
        """The file the host's own index gives for a tag's name or alias, or None."""

    def settle(self, model: nn.Module) -> None:
        """Make the host's own network weights final before we copy any weight (may be a no-op)."""

    def settings(self) -> EngineSettings:
        """The user's engine settings (mode, ΔW cache budget)."""

    def model_key(self) -> object:
        """Changes when the loaded model changes (the ΔW cache is cleared then)."""

    def state(self) -> object:
        """Changes whenever the host's own networks would rewrite weights (A1111: the builtin's
        set of loaded networks and multipliers, which other extensions may change mid-pass)."""


@dataclass
class Evaluation:
    """One model evaluation, for the plot, logs and tests."""

    hires: bool
    noise: float | None
    position: float
    multipliers: dict[str, float]


class PositionedWeights(Protocol):
    """What a pass moves per evaluation: the engine, or a host's own per-forward patches."""

    def set_position(self, component: Component, step: float, steps: int) -> None: ...

    def multipliers(self, component: Component) -> dict[str, float]: ...


def place_evaluation(
    weights: PositionedWeights, grid: PassGrid, hires: bool, trace: list[Evaluation], noise: float | None, index: int
) -> float:
    """The ``index``-th evaluation of a pass at ``noise``: placed on the pass's grid, the UNet's
    multipliers set there and recorded in ``trace``; returns the fractional step index."""
    position = grid.position(noise, index)
    weights.set_position("unet", position, grid.steps)
    trace.append(Evaluation(hires, noise, position, weights.multipliers("unet")))
    return position


class PassSession:
    """One sampling pass: an engine at the pass's UNet schedules and the pass's grid."""

    owner: object = None  # the host's sampler object this pass belongs to (set by the adapter)

    def __init__(
        self, runtime: Runtime, weights: ScheduledWeights, grid: PassGrid, hires: bool, trace: list[Evaluation]
    ):
        self.runtime = runtime
        self.weights = weights
        self.host_state = runtime.host.state()
        self.grid = grid
        self.hires = hires
        self.trace = trace
        self.evaluations = 0
        self.position: float | None = None

    def evaluate(self, noise: float | None) -> float:
        """Bring the UNet to the schedules' values for an evaluation at ``noise``; returns its
        fractional step index."""
        self.position = place_evaluation(self.weights, self.grid, self.hires, self.trace, noise, self.evaluations)
        self.evaluations += 1
        return self.position

    def resync(self) -> bool:
        """Call right before the model runs: when the host's own networks changed since this
        pass's engine took its copies (another extension changed a multiplier mid-pass, e.g. LoRA
        Block Weight's ``start=``), the host would rewrite our merged weights from its backups.
        Hand the layers back, let the host apply its new state, and take fresh copies."""
        state = self.runtime.host.state()
        if state == self.host_state:
            return False
        self.weights = self.runtime.reopen(self.weights)
        self.host_state = state
        if self.position is not None:
            self.weights.set_position("unet", self.position, self.grid.steps)
        return True


@dataclass
class Runtime:
    """Process-wide state of one host integration: loaded networks, the ΔW cache, open scopes."""

    host: HostAdapter
    cache: DeltaCache = field(default_factory=lambda: DeltaCache(0))
    loaded: LoadedNetworks = field(default_factory=LoadedNetworks)
    pool: BufferPool = field(default_factory=BufferPool)  # merge buffers reused by the next pass
    _open: list[ScheduledWeights] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    current: PassSession | None = None

    # -- networks -------------------------------------------------------------------------------

    def network(self, tag: NetworkTag) -> Network:
        path = self.host.find_network_file(tag.name)
        if path is None:
            raise MissingNetworkError(f"{tag.format()}: no network named {tag.name!r} in the Lora folders")
        return self.loaded.load(path, tag.name, tag.dyn)

    def scheduled(self, tags: Sequence[NetworkTag], hires: bool) -> list[ScheduledNetwork]:
        """The networks of ``tags`` with the schedules of the first or the hires pass."""
        return [ScheduledNetwork(self.network(tag), *tag.schedules(hires)) for tag in tags]

    # -- engines --------------------------------------------------------------------------------

    def _engine(self, networks: Sequence[ScheduledNetwork]) -> ScheduledWeights:
        settings = self.host.settings()
        key = self.host.model_key()
        self.cache.bind(key)
        self.pool.bind(key)
        self.cache.set_budget(int(settings.cache_budget_mb * 2**20))
        model = self.host.model()
        self.host.settle(model)
        weights = ScheduledWeights(model, networks, settings, cache=self.cache, pool=self.pool)
        self._open.append(weights)
        return weights

    def reopen(self, weights: ScheduledWeights) -> ScheduledWeights:
        """Restore ``weights`` and open a new engine for the same networks on the current model."""
        with self._lock:
            self._close(weights)
            return self._engine(weights.networks)

    def _close(self, weights: ScheduledWeights) -> None:
        try:
            weights.restore()
        finally:
            if weights in self._open:
                self._open.remove(weights)

    @contextlib.contextmanager
    def conditioning(self, networks: Sequence[ScheduledNetwork], steps: int) -> Iterator[ScheduledWeights | None]:
        """The text encoders at the networks' ``te`` schedules (step 0 of the pass) for one host
        conditioning call; restored on exit."""
        if not networks:
            yield None
            return
        with self._lock:
            weights = self._engine(networks)
            try:
                weights.set_position("te", 0, max(1, steps))
                yield weights
            finally:
                self._close(weights)

    @contextlib.contextmanager
    def sampling_pass(
        self,
        networks: Sequence[ScheduledNetwork],
        grid: PassGrid,
        *,
        hires: bool = False,
        trace: list[Evaluation] | None = None,
    ) -> Iterator[PassSession | None]:
        """An engine for one sampler run; :attr:`current` is its session while it runs."""
        if not networks:
            yield None
            return
        with self._lock:
            session = PassSession(self, self._engine(networks), grid, hires, [] if trace is None else trace)
            previous, self.current = self.current, session
            try:
                yield session
            finally:
                self.current = previous
                self._close(session.weights)

    def restore_all(self) -> int:
        """Restore every engine still open (a guard; the scopes already restore). Returns how many."""
        count = 0
        while self._open:
            self._close(self._open[-1])
            count += 1
        self.current = None
        return count

    def clear(self) -> None:
        """Forget cached ΔW, buffers and networks (the model changed)."""
        self.restore_all()
        self.cache.clear()
        self.pool.clear()
        self.loaded.clear()
