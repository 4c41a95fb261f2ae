"""AUTOMATIC1111 WebUI v1.10: the adapter logic, against duck-typed host objects.

``scripts/scheduled_lora.py`` imports the host's modules and hands them to :class:`A1111Host` and
:class:`A1111Integration`; everything here is exercised without a WebUI by
``tests/test_host_a1111.py``, which replays the host's call order (``process_images_inner``).

Per generation (``p``), in the host's order:

1. ``Script.process`` -> :meth:`A1111Integration.begin`: wraps the host's ``lora`` handler (and its
   ``lyco`` alias) so that scheduled tags never reach the builtin's ``float()``, and sets instance
   wrappers on ``p`` (a shallow copy per XYZ cell gets its own at its own ``process``):
   ``p.init`` validates every prompt's tags (raising stops the job before sampling: script hooks
   swallow exceptions, ``p.init`` does not), ``p.cached_params`` adds our switch to the cond cache
   key, ``p.get_conds_with_caching`` runs the host's text-encoder call inside
   :meth:`Runtime.conditioning` (te schedules, per pass: ``hires_steps`` is set for the hires conds).
2. ``process_before_every_sampling`` (first pass, hires pass, img2img) -> :meth:`before_sampling`:
   wraps the fresh sampler's ``func`` (the k-diffusion/timestep function the host calls inside
   ``launch_sampling``). The wrapper reads the pass's exact noise grid from the call's arguments,
   opens :meth:`Runtime.sampling_pass` and closes it in ``finally``: weights are restored when the
   pass ends, raises, or is interrupted, and before the host re-activates networks for hires.
3. ``on_cfg_denoiser`` -> :meth:`on_cfg_denoiser`: the pass's session places the evaluation by
   ``params.sigma`` (a sigma, or a timestep for DDIM/PLMS) and updates the UNet.
4. ``postprocess`` -> :meth:`finish`: a guard restore (normally a no-op) and the optional plot.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_scheduled_lora.core.engine import EngineSettings, Mode, ScheduledNetwork, engine_mode
from lib_scheduled_lora.core.positions import PassGrid, grid_for_call, noise_level
from lib_scheduled_lora.core.session import Evaluation, PassSession, Runtime
from lib_scheduled_lora.core.tags import NetworkTag
from lib_scheduled_lora.hosts.ownership import (
    HostSyntax,
    Owner,
    TagIndex,
    batch_warning,
    is_ours,
    rewrite_params,
    route,
    scheduled_tags,
    validate_prompts,
)
from lib_scheduled_lora.hosts.patching import ORIGINAL_ATTR
from lib_scheduled_lora.hosts.patching import set_wrapper as _set_wrapper
from lib_scheduled_lora.hosts.patching import unwrapped as _unwrapped

log = logging.getLogger("scheduled_lora")

DEFAULT_MODE: Mode = "auto"
DEFAULT_CACHE_MB = 2048
DEFAULT_DEVICE_BUDGET_MB = 0  # lean: nothing of ours kept on the GPU beyond the layer being written
INFOTEXT_ENABLED = "Scheduled LoRA"
INFOTEXT_MODE = "Scheduled LoRA mode"
STATE_ATTR = "scheduled_lora_state"


def _patched_types() -> tuple[type, ...]:
    import torch

    return (
        torch.nn.Linear,
        torch.nn.Conv2d,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        torch.nn.MultiheadAttention,
    )



def webui_settings(opts: Any) -> EngineSettings:
    """The engine settings from Settings → Scheduled LoRA, the same options on every WebUI host
    (A1111, Forge, SD.Next). A value an old or hand-edited config makes unusable (text, negative,
    NaN) falls back to its default rather than failing a generation."""

    def megabytes(key: str, default: float) -> float:
        try:
            value = float(getattr(opts, key, default))
        except (TypeError, ValueError):
            return float(default)
        return value if math.isfinite(value) and value >= 0 else float(default)

    return EngineSettings(
        mode=engine_mode(getattr(opts, "scheduled_lora_mode", DEFAULT_MODE), DEFAULT_MODE),
        cache_budget_mb=megabytes("scheduled_lora_cache_mb", DEFAULT_CACHE_MB),
        device_budget_mb=megabytes("scheduled_lora_device_budget_mb", DEFAULT_DEVICE_BUDGET_MB),
    )

class A1111Host:
    """:class:`~lib_scheduled_lora.core.session.HostAdapter` for A1111 (``shared`` = modules.shared;
    the builtin Lora extension's ``networks`` module is looked up in ``sys.modules``)."""

    def __init__(self, shared: Any, networks: Callable[[], Any] | None = None):
        self.shared = shared
        self._networks = networks or (lambda: sys.modules.get("networks"))

    @property
    def networks(self) -> Any:
        return self._networks()

    def model(self):
        return self.shared.sd_model

    def model_key(self) -> object:
        model = self.shared.sd_model
        info = getattr(model, "sd_checkpoint_info", None)
        return (id(model), getattr(info, "filename", None))

    def find_network_file(self, name: str) -> str | None:
        nets = self.networks
        if nets is None:
            return None
        entry = nets.available_network_aliases.get(name)
        if entry is None:
            nets.list_available_networks()  # as the builtin does before giving up on a name
            entry = nets.available_network_aliases.get(name)
        return None if entry is None else entry.filename

    def settle(self, model) -> None:
        """Let the builtin Lora finish with every layer before we copy weights.

        It applies its networks lazily in each layer's forward and, when its set changed, first
        restores the layer from its CPU backup (taking that backup on first use). Doing that now
        means its backups hold the original weights, never ours, and that it finds nothing to
        change while we sample. With ``lora_functional`` it instead restores from its backup in
        every forward: restoring and dropping those backups now makes that a no-op.
        """
        nets = self.networks
        if nets is None:
            return
        functional = bool(getattr(self.shared.opts, "lora_functional", False))
        types = _patched_types()
        for module in model.modules():
            if getattr(module, "network_layer_name", None) is None or not isinstance(module, types):
                continue
            if functional:
                nets.network_restore_weights_from_backup(module)
                nets.network_reset_cached_weight(module)
            else:
                nets.network_apply_weights(module)

    def state(self) -> object:
        """The builtin's ``wanted_names`` (networks.py ``network_apply_weights``): when it changes,
        every patched layer is restored from the builtin's backup and re-applied in its next forward."""
        nets = self.networks
        loaded = getattr(nets, "loaded_networks", None) or ()
        return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded)

    @staticmethod
    def unet(model) -> Any:
        """The UNet the sampler calls (ldm/sgm ``model.diffusion_model``), or None."""
        return getattr(getattr(model, "model", None), "diffusion_model", None)

    def settings(self) -> EngineSettings:
        return webui_settings(self.shared.opts)


class ScheduledExtraNetwork:
    """Stands in for the host's ``lora`` handler: plain tags go to it unchanged (the very same
    params objects), scheduled ones are taken out (our engine applies them), so that the builtin
    never sees a schedule. With the accordion's switch off, everything is passed on unchanged
    to a handler that is not the builtin (e.g. loractl's), or scheduled tags are dropped with a
    comment when it is the builtin (it would fail on them)."""

    _scheduled_lora_wrapper = True

    def __init__(self, inner: Any, host_syntax: HostSyntax | None = None):
        self.inner = inner
        self.name = inner.name
        self.host_syntax = host_syntax  # tags the host's own scheduler reads (Forge Neo), left to it

    def activate(self, p, params_list):
        state = getattr(p, STATE_ATTR, None)
        enabled = state.enabled if state is not None else True
        if not enabled and type(self.inner).__name__ != "ExtraNetworkLora":
            return self.inner.activate(p, params_list)
        tags = state.tags if state is not None else TagIndex()
        routes = route("lora", params_list, enabled, tags, self.host_syntax)
        rewrite_params(routes)  # the host, other extensions and the hires pass read these objects
        if state is not None:
            state.ignored.extend(r.text for r in routes if r.owner is Owner.DROPPED and r.text not in state.ignored)
        return self.inner.activate(p, [r.params for r in routes if r.owner is Owner.HOST])

    def deactivate(self, p):
        return self.inner.deactivate(p)

    def __getattr__(self, item):
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)


def install_extra_network_wrapper(
    extra_networks: Any, host_syntax: HostSyntax | None = None
) -> ScheduledExtraNetwork | None:
    """Wrap the registered ``lora`` handler (and every alias pointing at it); idempotent."""
    registry, aliases = extra_networks.extra_network_registry, extra_networks.extra_network_aliases
    inner = registry.get("lora")
    if inner is None:
        return None
    if getattr(inner, "_scheduled_lora_wrapper", False):
        wrapper = inner
        inner = wrapper.inner
        wrapper.host_syntax = host_syntax
    else:
        wrapper = ScheduledExtraNetwork(inner, host_syntax)
        registry["lora"] = wrapper
    for alias, handler in list(aliases.items()):
        if handler is inner:
            aliases[alias] = wrapper
    return wrapper


@dataclass
class PassRecord:
    hires: bool
    grid: PassGrid
    tags: list


@dataclass
class GenerationState:
    """What we keep on ``p`` (as ``p.scheduled_lora_state``)."""

    enabled: bool = True
    validated: bool = False
    tags: TagIndex = field(default_factory=TagIndex)  # every tag text of this generation, parsed once
    ignored: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    trace: list[Evaluation] = field(default_factory=list)
    warned_batches: set = field(default_factory=set)


def _resync_hook(session: PassSession, module: Any, args: tuple) -> None:
    session.resync()
    return None  # a forward pre-hook's non-None result would replace the UNet's inputs


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any):
    """``owner.name = value`` for the duration (an instance attribute, or a module's global)."""
    had_own = name in vars(owner)
    previous = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


class SegmentedEncoder:
    """Text-encoder calls of one conditioning, each prompt-editing segment at its own ``te`` strength.

    The host encodes all segments of a prompt (``[a:b:0.5]`` -> ``a`` until step 10, ``b`` after)
    in one ``model.get_learned_conditioning(texts)`` call. A segment's conditioning is used from the
    step after the previous segment's ``end_at_step`` (``reconstruct_cond_batch``), so that step is
    where its ``te`` schedules are read: texts are grouped by those strengths, encoded per group,
    and put back in order. The segment boundaries come from the host's own
    ``get_learned_conditioning_prompt_schedules``, captured as it computes them, and are matched
    to the encoder calls in order (the host encodes each distinct prompt once, in prompt order).
    """

    def __init__(self, weights: Any, steps: int, encode: Callable[[Any], Any]):
        self.weights, self.steps, self.encode = weights, max(1, steps), encode
        self.schedules: list[list] = []
        self.cursor = 0

    def capture(self, compute: Callable[..., list]) -> Callable[..., list]:
        @functools.wraps(compute)
        def wrapper(*args, **kwargs):
            schedules = compute(*args, **kwargs)
            self.schedules.extend(schedules)
            return schedules

        return wrapper

    def _starts(self, texts: list[str]) -> list[int]:
        while self.cursor < len(self.schedules):
            schedule = self.schedules[self.cursor]
            self.cursor += 1
            if [text for _, text in schedule] == texts:
                return [0] + [int(end) + 1 for end, _ in schedule[:-1]]
        return [0] * len(texts)  # not one of the captured prompts: the pass's start

    def _strengths(self, step: int) -> tuple[float, ...]:
        return tuple(n.te.at(step, self.steps) for n in self.weights.networks)

    def __call__(self, texts):
        items = list(texts)
        groups: dict[tuple[float, ...], list[int]] = {}
        starts = self._starts(items)
        for index, step in enumerate(starts):
            groups.setdefault(self._strengths(step), []).append(index)
        if len(groups) == 1:
            self.weights.set_position("te", starts[0], self.steps)
            return self.encode(texts)
        parts: dict[int, Any] = {}
        for indices in groups.values():
            self.weights.set_position("te", starts[indices[0]], self.steps)
            subset = [items[i] for i in indices]
            conds = self.encode(type(texts)(subset, copy_from=texts) if hasattr(texts, "copy_from") else subset)
            for j, i in enumerate(indices):
                parts[i] = {k: v[j] for k, v in conds.items()} if isinstance(conds, dict) else conds[j]
        import torch

        ordered = [parts[i] for i in range(len(items))]
        if isinstance(ordered[0], dict):
            return {k: torch.stack([part[k] for part in ordered]) for k in ordered[0]}
        return torch.stack(ordered)


class A1111Integration:
    def __init__(self, runtime: Runtime, extra_networks: Any, prompt_parser: Any = None):
        self.runtime = runtime
        self.extra_networks = extra_networks
        self.prompt_parser = prompt_parser  # modules.prompt_parser: per-segment te strengths
        self.host_syntax: HostSyntax | None = None  # tags the host's own scheduler reads (none on A1111)

    @property
    def host(self) -> A1111Host:
        return self.runtime.host  # type: ignore[return-value]

    # -- 1. process ---------------------------------------------------------------------------

    def begin(self, p: Any, enabled: bool) -> GenerationState:
        leftovers = self.runtime.restore_all()
        if leftovers:
            log.warning("Scheduled LoRA: restored %d engine(s) left open by an earlier generation", leftovers)
        install_extra_network_wrapper(self.extra_networks, self.host_syntax)
        state = GenerationState(enabled=bool(enabled))
        setattr(p, STATE_ATTR, state)
        prompts = self._all_prompts(p)
        has_ours = any(m.tag is None or is_ours(m.tag) for prompt in prompts for m in state.tags.in_prompt(prompt))
        if has_ours:
            if not state.enabled:
                p.extra_generation_params[INFOTEXT_ENABLED] = "off"
            mode = self.host.settings().mode
            if state.enabled and mode != DEFAULT_MODE:
                p.extra_generation_params[INFOTEXT_MODE] = mode
        _set_wrapper(p, "init", lambda original: functools.partial(self._init, p, original))
        _set_wrapper(p, "cached_params", lambda original: functools.partial(self._cached_params, p, original))
        _set_wrapper(
            p,
            "get_conds_with_caching",
            lambda original: functools.partial(self._get_conds_with_caching, p, original),
        )
        return state

    @staticmethod
    def _all_prompts(p: Any) -> list[str]:
        prompts = list(getattr(p, "all_prompts", None) or [])
        if not prompts:
            prompt = getattr(p, "prompt", "")
            prompts = list(prompt) if isinstance(prompt, list) else [prompt]
        if getattr(p, "enable_hr", False):
            prompts += [x for x in (getattr(p, "all_hr_prompts", None) or []) if x not in prompts]
        return prompts

    def _init(self, p: Any, original: Callable, *args, **kwargs):
        state: GenerationState = getattr(p, STATE_ATTR)
        if state.enabled and not state.validated:
            ours = validate_prompts(  # raises: the job stops here
                self._all_prompts(p), self.host.find_network_file, state.tags, host_syntax=self.host_syntax
            )
            if ours:
                self._check_model(p, ours)
            state.validated = True
        return original(*args, **kwargs)

    def _check_model(self, p: Any, tags: list[NetworkTag]) -> None:
        """Raise when the loaded model cannot take scheduled ``tags`` (before sampling; every
        model A1111 loads can)."""

    def _cached_params(self, p: Any, original: Callable, *args, **kwargs):
        state: GenerationState = getattr(p, STATE_ATTR)
        return (original(*args, **kwargs), ("scheduled_lora", state.enabled))

    def _get_conds_with_caching(
        self,
        p: Any,
        original: Callable,
        function,
        required_prompts,
        steps,
        caches,
        extra_network_data,
        hires_steps=None,
    ):
        state: GenerationState = getattr(p, STATE_ATTR)
        tags = scheduled_tags(extra_network_data, state.tags) if state.enabled else []
        if not tags:
            return original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
        hires = hires_steps is not None

        @functools.wraps(function)
        def scheduled_function(model, prompts, *rest, **named):
            # The host's own arguments, passed on as they came: A1111 and Forge main call
            # (model, prompts, steps, hires_steps, use_old_scheduling), Forge Neo has no last one.
            args = (model, prompts, *rest)
            call_steps = rest[0] if rest else named.get("steps", steps)
            call_hires_steps = rest[1] if len(rest) > 1 else named.get("hires_steps")
            use_old_scheduling = rest[2] if len(rest) > 2 else named.get("use_old_scheduling", False)
            with self._conditioning_scope(model, self.runtime.scheduled(tags, hires), steps) as weights:
                if weights is None or all(n.te.is_constant for n in weights.networks) or self.prompt_parser is None:
                    return function(*args, **named)
                # Prompt editing counts in hires steps in the hires pass (prompt_parser's own rule).
                total = call_hires_steps if call_hires_steps is not None and not use_old_scheduling else call_steps
                encoder = SegmentedEncoder(weights, int(total), model.get_learned_conditioning)
                parser = self.prompt_parser
                with _patched(
                    parser,
                    "get_learned_conditioning_prompt_schedules",
                    encoder.capture(parser.get_learned_conditioning_prompt_schedules),
                ), _patched(model, "get_learned_conditioning", encoder):
                    return function(*args, **named)

        return original(scheduled_function, required_prompts, steps, caches, extra_network_data, hires_steps)

    def _conditioning_scope(
        self, model: Any, networks: list[ScheduledNetwork], steps: int
    ) -> contextlib.AbstractContextManager[Any]:
        """The text encoders at the networks' ``te`` schedules around one conditioning call
        (``model`` is the host's model object; other hosts first make their own state final)."""
        return self.runtime.conditioning(networks, steps)

    # -- per batch ----------------------------------------------------------------------------

    def before_batch(self, p: Any, prompts: list[str]) -> None:
        state: GenerationState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.enabled:
            return
        message = batch_warning(list(prompts), state.tags)
        if message and getattr(p, "iteration", 0) not in state.warned_batches:
            state.warned_batches.add(getattr(p, "iteration", 0))
            log.warning(message)
            comment = getattr(p, "comment", None)
            if callable(comment):
                comment(message)

    # -- 2. every sampling pass ---------------------------------------------------------------

    def before_sampling(self, p: Any) -> None:
        state: GenerationState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.enabled:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        data = getattr(p, "hr_extra_network_data", None) if hires else getattr(p, "extra_network_data", None)
        tags = scheduled_tags(data, state.tags)
        sampler = getattr(p, "sampler", None)
        if not tags or sampler is None:
            return
        original = _unwrapped(sampler.func)

        @functools.wraps(original)
        def func(model, x, *args, **kwargs):
            launch = getattr(getattr(sampler, "model_wrap_cfg", None), "steps", None)
            grid = grid_for_call(kwargs, launch, getattr(original, "__name__", ""))
            state.passes.append(PassRecord(hires, grid, tags))
            with self._pass_scope(tags, grid, hires, state, sampler):
                return original(model, x, *args, **kwargs)

        setattr(func, ORIGINAL_ATTR, original)
        sampler.func = func

    @contextlib.contextmanager
    def _pass_scope(self, tags: list, grid: PassGrid, hires: bool, state: GenerationState, sampler: Any):
        """Our engine for one sampler run (opened inside the sampler function, after the host has
        prepared the model), restored when the run ends, raises or is interrupted."""
        runtime = self.runtime
        networks = runtime.scheduled(tags, hires)
        unet = self.host.unet(self.host.model())
        with runtime.sampling_pass(networks, grid, hires=hires, trace=state.trace) as session, contextlib.ExitStack() as stack:
            if session is not None:
                session.owner = sampler
            if session is not None and unet is not None:
                # After every on_cfg_denoiser callback (other extensions' included), before
                # the builtin's lazy per-layer re-application: see PassSession.resync.
                hook = unet.register_forward_pre_hook(functools.partial(_resync_hook, session))
                stack.callback(hook.remove)
            yield session

    # -- 3. every evaluation ------------------------------------------------------------------

    def on_cfg_denoiser(self, params: Any) -> None:
        session = self.runtime.current
        if session is None:
            return
        denoiser = getattr(params, "denoiser", None)
        owner = getattr(session, "owner", None)
        if owner is not None and getattr(denoiser, "sampler", owner) is not owner:
            return
        session.evaluate(noise_level(getattr(params, "sigma", None)))

    # -- 4. the end ---------------------------------------------------------------------------

    def finish(self, p: Any) -> GenerationState | None:
        leftovers = self.runtime.restore_all()
        if leftovers:
            log.warning("Scheduled LoRA: restored %d engine(s) at the end of the generation", leftovers)
        state: GenerationState | None = getattr(p, STATE_ATTR, None)
        if state is not None and state.ignored:
            log.warning("Scheduled LoRA is off for this generation; ignored %s", " ".join(state.ignored))
        return state


def plot_passes(state: GenerationState):
    """The multiplier plot of a generation (None when nothing was scheduled)."""
    from lib_scheduled_lora.hosts.plot import plot_multipliers

    if not state.passes:
        return None
    panels = []
    for hires in (False, True):
        records = [r for r in state.passes if r.hires == hires]
        if not records:
            continue
        evaluations = [e for e in state.trace if e.hires == hires]
        steps = records[0].grid.steps
        series: dict[str, list[tuple[float, float]]] = {}
        # One batch's evaluations are enough: later batches repeat the same positions.
        per_batch = len(evaluations) // max(1, len(records))
        for e in evaluations[: per_batch or len(evaluations)]:
            for name, m in e.multipliers.items():
                series.setdefault(name, []).append((e.position, m))
        title = f"{'hires pass' if hires else 'first pass'}: UNet multiplier per evaluation ({steps} steps)"
        panels.append((title, steps, series))
    return plot_multipliers(panels)
