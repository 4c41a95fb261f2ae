"""SD.Next (vladmandic/sdnext, diffusers backend): the adapter logic, against duck-typed host objects.

``hosts/sdnext_script.py`` imports the host's modules and hands them to :class:`SDNextHost` and
:class:`SDNextIntegration`; everything here runs without SD.Next in ``tests/test_host_sdnext.py``,
which replays the host's call order (``modules/processing.py`` and ``processing_diffusers.py`` at
058a7f0c) on a real diffusers pipeline.

SD.Next is a diffusers host, so this adapter is the diffusers adapter's machinery
(:mod:`lib_scheduled_lora.hosts.diffusers`) driven by SD.Next's hooks. Per generation ``p``:

1. ``Script.process`` -> :meth:`SDNextIntegration.begin`: wraps the registered ``lora`` handler so
   that scheduled tags never reach SD.Next's own ``@`` evaluation (:class:`ScheduledLoraHandler`),
   and wraps ``p.init`` to validate every prompt's tags: the one hook whose exception stops the job
   before sampling (script hooks swallow theirs; the API answers HTTP 500 with the message).
2. ``Script.process_batch`` (after the host parsed the batch's tags, before it fuses its own LoRAs)
   -> :meth:`begin_batch`: forward pre-hooks on the UNet and the text encoders, and a wrapper around
   the pipeline's ``callback_on_step_end`` (``p.task_args``, which SD.Next merges into the call).
3. Each UNet call: the first one of a pipeline call opens :meth:`Runtime.sampling_pass` on the
   scheduler's own grid of the steps the pipeline runs (so step 0 gets its weights before it is
   evaluated, after SD.Next fused its plain LoRAs: our copies include them and we put them back as
   found); every call is placed by its timestep (Heun's and DPM2's extra evaluations included).
   The step callback closes the pass after the pipeline's last step or when it raises (interrupt,
   skip): weights are restored before SD.Next touches its networks again (hires, refiner,
   detailer, the next request). Text encoders run inside :meth:`Runtime.conditioning` when SD.Next
   applies LoRAs to them (``lora_apply_te``).
4. ``postprocess_batch`` and ``on_after_process`` (which also runs after an interrupt, when
   ``postprocess`` does not) -> :meth:`end_batch`: hooks removed, every weight restored (a guard).

Why hooks and not only the step callback: the callback runs after each step, so it can set the
weights of step ``i + 1`` but never those of step 0, and it does not see a second-order sampler's
second evaluation. The UNet pre-hook sees every evaluation; the callback only marks the end.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lib_scheduled_lora.core.engine import EngineSettings, ScheduledNetwork
from lib_scheduled_lora.core.positions import PassGrid, scheduler_grid
from lib_scheduled_lora.core.session import PassSession, Runtime
from lib_scheduled_lora.core.tags import TAG_PATTERN, NetworkTag
from lib_scheduled_lora.errors import ScheduleSyntaxError
from lib_scheduled_lora.hosts.a1111 import (
    DEFAULT_MODE,
    INFOTEXT_ENABLED,
    INFOTEXT_MODE,
    STATE_ATTR,
    GenerationState,
    PassRecord,
    webui_settings,
)
from lib_scheduled_lora.hosts.diffusers import pipeline_parts, unet_timestep
from lib_scheduled_lora.hosts.ownership import (
    MARK_KEY,
    TAG_ATTR,
    Owner,
    Route,
    TagIndex,
    batch_warning,
    check_arguments,
    is_ours,
    rewrite_params,
    route,
    scheduled_tags,
    stand_in_items,
    tag_text,
    validate_prompts,
)
from lib_scheduled_lora.hosts.patching import set_wrapper

log = logging.getLogger("scheduled_lora")

# SD.Next's per-block UNet strengths (modules/lora/extra_networks_lora.py: parse): down, mid, up.
PER_BLOCK_KEYS = ("in", "mid", "out")
# Our own arguments and schedule syntax: a tag with none of them is SD.Next's whatever we read.
_SCHEDULE_SYNTAX = re.compile(r"[@~]|:(?:hr|hrte|hrunet)=")
# The stand-in item that tells SD.Next's prompt-embedding cache that the hires pass encodes with
# the hires te schedules (its cache key holds the network items, not our multipliers).
PASS_KEY = f"{MARK_KEY}_pass"


# What the schedule editor (javascript/scheduled_lora_editor.js) reads in SD.Next's UI where A1111's
# differs (checked in the real UI at 058a7f0c): the hires switch and its steps, and the samplers
# that evaluate twice per step on SD.Next's diffusers schedulers (positions measured through the
# adapter: Heun and KDPM2 a at the next step, KDPM2 between steps; A1111's names are not SD.Next's
# second-order samplers, and its "DPM++ SDE" runs once per step).
EDITOR_CONFIG = {
    "tabs": {
        "txt2img": {
            "hires": "#txt2img_enable_hr input[type=checkbox]",
            "hiresSteps": "#txt2img_steps_alt input[type=number]",
        },
    },
    "secondOrder": {
        "Heun": "end", "KDPM2": "mid", "KDPM2 a": "end",
        "DPM2": None, "DPM2 a": None, "DPM++ 2S a": None, "DPM++ SDE": None,
    },
}


# -- the host ------------------------------------------------------------------------------------


class SDNextHost:
    """:class:`~lib_scheduled_lora.core.session.HostAdapter` for SD.Next's current pipeline.

    ``shared`` is ``modules.shared`` (``sd_model`` is the diffusers pipeline, possibly wrapped with
    a ``.pipe``); ``lora_load``/``lora_common`` return SD.Next's ``modules.lora`` modules (its
    index of network files and its record of loaded networks).
    """

    def __init__(self, shared: Any, lora_load: Callable[[], Any], lora_common: Callable[[], Any] | None = None):
        self.shared = shared
        self._lora_load = lora_load
        self._lora_common = lora_common or (lambda: None)

    def pipeline(self) -> Any:
        model = self.shared.sd_model
        return getattr(model, "pipe", model)

    def parts(self) -> dict[str, nn.Module]:
        return pipeline_parts(self.pipeline())

    def model(self) -> nn.Module:
        # Hires swaps the pipeline object (img2img from_pipe) but keeps the components: always
        # the current ones, grouped without copying.
        return nn.ModuleDict(self.parts())

    def model_key(self) -> object:
        info = getattr(self.shared.sd_model, "sd_checkpoint_info", None)
        return (tuple((name, id(module)) for name, module in self.parts().items()), getattr(info, "filename", None))

    def find_network_file(self, name: str) -> str | None:
        index = self._lora_load()
        if index is None:
            return None
        entry = index.available_network_aliases.get(name)
        if entry is None:
            index.list_available_networks()  # as SD.Next's gather_networks does before giving up
            entry = index.available_network_aliases.get(name)
        return None if entry is None else entry.filename

    def settle(self, model: nn.Module) -> None:
        """Nothing pending: SD.Next fuses (or writes from its backup) in ``activate``, before the
        pipeline runs, and our scopes open only inside the pipeline call."""

    def settings(self) -> EngineSettings:
        return webui_settings(self.shared.opts)

    def state(self) -> object:
        common = self._lora_common()
        loaded = getattr(common, "loaded_networks", None) or ()
        return tuple((n.name, n.te_multiplier, str(n.unet_multiplier), n.dyn_dim) for n in loaded)

    def applies_te(self, p: Any) -> bool:
        """Whether SD.Next applies LoRAs to the text encoders for ``p`` (``extra_networks.
        activate_filtered``): the request's ``lora_apply_te``, else the option (default off)."""
        value = getattr(p, "lora_apply_te", None)
        if value is None:
            value = getattr(self.shared.opts, "lora_apply_te", False)
        return bool(value)


# -- which tags are SD.Next's own ------------------------------------------------------------------


def unreadable_host_tag(text: str, tags: TagIndex) -> bool:
    """A tag our grammar cannot read and that uses none of our syntax (``@``, ``~``, ``hr=``...):
    SD.Next's own (``<lora:x:1:high>`` for Wan's two transformers, or a word it reads as the
    default strength). It stays the host's, untouched; a malformed *schedule* is an error."""
    if _SCHEDULE_SYNTAX.search(text):
        return False
    try:
        tags.parse(text)
    except ScheduleSyntaxError:
        return True
    return False


def check_tag(text: str, tag: NetworkTag) -> None:
    """SD.Next's rules on top of the common ones: per-block strengths (``in=``, ``mid=``, ``out=``)
    pass through on plain tags, are an error on scheduled ones (one UNet schedule per network
    until per-block schedules exist), and may not be schedules themselves (SD.Next would evaluate
    them once, at step 0, with loractl's arithmetic)."""
    scheduled = is_ours(tag)
    if scheduled:
        check_arguments(text, tag)
    for key, value in tag.passthrough:
        if key not in PER_BLOCK_KEYS:
            continue
        column = text.find(f":{key}=") + 2
        if scheduled:
            raise ScheduleSyntaxError(
                text,
                f"{key}={value}",
                column,
                "is an SD.Next per-block strength; this tag's strength is scheduled by Scheduled LoRA, which has "
                "one UNet schedule per network: remove it, or give this network a plain strength",
            )
        if _SCHEDULE_SYNTAX.search(f"{value}"):
            raise ScheduleSyntaxError(
                text,
                f"{key}={value}",
                column,
                "is a per-block schedule: SD.Next evaluates it once, at step 0, and Scheduled LoRA has no "
                "per-block schedules yet: write a plain number",
            )


def hires_items(tag: NetworkTag) -> list[str]:
    """The stand-in items of a scheduled tag in the hires pass (see :data:`PASS_KEY`)."""
    return [*stand_in_items(tag), f"{PASS_KEY}=hires"]


# -- the lora handler ---------------------------------------------------------------------------


class ScheduledLoraHandler:
    """Stands in for SD.Next's ``lora`` extra-network handler: plain tags (and constant schedules,
    as plain numbers) go to it, scheduled ones are taken out (our engine applies them), so that
    SD.Next never evaluates a schedule of ours. With the switch off everything goes to SD.Next
    unchanged: what a user gets without this extension."""

    _scheduled_lora_wrapper = True

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name
        parameters = inspect.signature(inner.activate).parameters
        self._filters = "include" in parameters and "exclude" in parameters

    # SD.Next passes include/exclude (its text-encoder filter) only to handlers whose activate
    # names them (extra_networks.activate inspects the signature): ours does, and passes them on.
    def activate(self, p, params_list, step=0, include=None, exclude=None):
        state: GenerationState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.enabled:
            return self._inner_activate(p, params_list, step, include, exclude)
        readable = [params for params in params_list if not _unreadable(params, state.tags)]
        routes = route("lora", readable, True, state.tags)
        rewrite_params(routes)  # SD.Next, its prompt cache and other extensions read these objects
        ours = {id(r.params) for r in routes if r.owner is not Owner.HOST}
        return self._inner_activate(p, [x for x in params_list if id(x) not in ours], step, include, exclude)

    def _inner_activate(self, p, params_list, step, include, exclude):
        if self._filters:
            return self.inner.activate(p, params_list, step=step, include=include, exclude=exclude)
        return self.inner.activate(p, params_list, step=step)

    def deactivate(self, p, *args, **kwargs):
        return self.inner.deactivate(p, *args, **kwargs)

    def __getattr__(self, item):
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)


def _unreadable(params: Any, tags: TagIndex) -> bool:
    items = getattr(params, "items", None) or []
    if not items or not all(isinstance(item, str) for item in items):
        return False
    return unreadable_host_tag(tag_text("lora", items), tags)


def install_handler(extra_networks: Any) -> ScheduledLoraHandler | None:
    """Wrap the registered ``lora`` handler (SD.Next re-creates its registry on a reload); idempotent."""
    registry = extra_networks.extra_network_registry
    inner = registry.get("lora")
    if inner is None:
        return None
    if getattr(inner, "_scheduled_lora_wrapper", False):
        return inner
    wrapper = ScheduledLoraHandler(inner)
    registry["lora"] = wrapper
    return wrapper


# -- one generation ------------------------------------------------------------------------------


@dataclass
class SDNextState(GenerationState):
    """What we keep on ``p`` (as ``p.scheduled_lora_state``)."""

    ours: list[NetworkTag] = field(default_factory=list)  # our tags in any prompt (validated)


class StepEndCallback:
    """``callback_on_step_end`` for the pipeline: SD.Next's own callback (progress, previews,
    interrupt), then the end of our pass after the pipeline's last step or when it raised."""

    _scheduled_lora_wrapper = True

    def __init__(self, integration: SDNextIntegration, original: Callable):
        self.integration = integration
        self.original = original

    def __call__(self, pipe, step, timestep, kwargs):
        try:
            result = self.original(pipe, step, timestep, kwargs)
        except BaseException:
            self.integration.end_pass()  # interrupt / skip: SD.Next's callback raises
            raise
        total = getattr(pipe, "num_timesteps", None)
        if isinstance(total, int) and step + 1 >= total:
            self.integration.end_pass(last_step=True)
        return result


@dataclass
class Batch:
    """The hooks of one batch and the scopes they opened."""

    p: Any
    state: SDNextState
    handles: list[Any] = field(default_factory=list)
    session: PassSession | None = None
    grid: PassGrid | None = None  # of the open pass (None: no pass open)
    pass_scope: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    conditioning: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class SDNextIntegration:
    def __init__(self, runtime: Runtime, extra_networks: Any, step_callback: Callable[[], Callable]):
        """``step_callback()`` returns SD.Next's own ``processing_callbacks.diffusers_callback``."""
        self.runtime = runtime
        self.extra_networks = extra_networks
        self.step_callback = step_callback
        self.batch: Batch | None = None

    @property
    def host(self) -> SDNextHost:
        return self.runtime.host  # type: ignore[return-value]

    # -- 1. process ---------------------------------------------------------------------------

    def begin(self, p: Any, enabled: bool) -> SDNextState:
        self.end_batch()
        leftovers = self.runtime.restore_all()
        if leftovers:
            log.warning("Scheduled LoRA: restored %d engine(s) left open by an earlier generation", leftovers)
        install_handler(self.extra_networks)
        state = SDNextState(enabled=bool(enabled))
        setattr(p, STATE_ATTR, state)
        if any(m.tag is not None and is_ours(m.tag) for prompt in self.prompts(p) for m in state.tags.in_prompt(prompt)):
            if not state.enabled:
                p.extra_generation_params[INFOTEXT_ENABLED] = "off"
            mode = self.host.settings().mode
            if state.enabled and mode != DEFAULT_MODE:
                p.extra_generation_params[INFOTEXT_MODE] = mode
        set_wrapper(p, "init", lambda original: functools.partial(self._init, p, original))
        return state

    @staticmethod
    def prompts(p: Any) -> list[str]:
        """Every prompt whose networks SD.Next may activate for ``p``: the batch prompts, the
        hires prompts, and the refiner prompt (which replaces the networks for hires)."""
        prompts = list(getattr(p, "all_prompts", None) or [])
        if not prompts:
            prompt = getattr(p, "prompt", "")
            prompts = list(prompt) if isinstance(prompt, list) else [prompt]
        if getattr(p, "enable_hr", False):
            prompts += [x for x in (getattr(p, "all_hr_prompts", None) or []) if x and x not in prompts]
        refiner = getattr(p, "refiner_prompt", "")
        if isinstance(refiner, str) and refiner and refiner not in prompts:
            prompts.append(refiner)
        return prompts

    def _init(self, p: Any, original: Callable, *args, **kwargs):
        state: SDNextState = getattr(p, STATE_ATTR)
        if state.enabled and not state.validated:
            state.ours = validate_prompts(  # raises: the job stops here, before sampling
                self.prompts(p),
                self.host.find_network_file,
                state.tags,
                host_syntax=lambda text: unreadable_host_tag(text, state.tags),
                check=check_tag,
            )
            state.validated = True
            if state.ours:
                texts = " ".join(dict.fromkeys(tag.format() for tag in state.ours))
                log.info("Scheduled LoRA applies %s per step; SD.Next's own '@' evaluation is skipped for them", texts)
        return original(*args, **kwargs)

    # -- 2. every batch -------------------------------------------------------------------------

    def before_batch(self, p: Any, prompts: Sequence[str]) -> None:
        state: SDNextState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.enabled or len(prompts) < 2:
            return
        # SD.Next's parse_prompts keeps the networks of the last prompt that has any tag.
        used = max((i for i, prompt in enumerate(prompts) if TAG_PATTERN.search(prompt or "")), default=0)
        message = batch_warning(list(prompts), state.tags, used)
        if message and getattr(p, "iteration", 0) not in state.warned_batches:
            state.warned_batches.add(getattr(p, "iteration", 0))
            log.warning(message)

    def begin_batch(self, p: Any) -> None:
        """Hooks for this batch (``process_batch``: tags parsed, SD.Next's LoRAs not yet fused)."""
        self.end_batch()
        state: SDNextState | None = getattr(p, STATE_ATTR, None)
        if state is None or not state.enabled:
            return
        if not state.validated:  # p.init was skipped (p.skip_init): our tags, without stopping the job
            state.ours = [m.tag for prompt in self.prompts(p) for m in state.tags.in_prompt(prompt) if m.tag is not None and is_ours(m.tag)]
        if not state.ours:
            return
        parts = self.host.parts()
        unet = parts.get("unet")
        if unet is None:
            log.warning("Scheduled LoRA: this pipeline has no UNet (%s); schedules are not applied", type(self.host.pipeline()).__name__)
            return
        batch = self.batch = Batch(p, state)
        batch.handles.append(unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                batch.handles.append(parts[name].register_forward_pre_hook(self._before_text_encoder))
                batch.handles.append(parts[name].register_forward_hook(self._after_text_encoder))
        self._install_step_callback(p)
        log.debug("Scheduled LoRA: hooks on %s (UNet %x) for %s", type(self.host.pipeline()).__name__, id(unet), " ".join(t.format() for t in state.ours))

    def _install_step_callback(self, p: Any) -> None:
        task_args = getattr(p, "task_args", None)
        if task_args is None:
            task_args = p.task_args = {}
        current = task_args.get("callback_on_step_end")
        if getattr(current, "_scheduled_lora_wrapper", False):
            return  # n_iter and XYZ cells share the dict: wrap once
        task_args["callback_on_step_end"] = StepEndCallback(self, current or self.step_callback())

    def _networks(self, batch: Batch, hires: bool) -> tuple[list[NetworkTag], list[ScheduledNetwork]]:
        tags = scheduled_tags(getattr(batch.p, "network_data", None), batch.state.tags)
        return tags, self.runtime.scheduled(tags, hires)

    # -- 3. every evaluation --------------------------------------------------------------------

    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch = self.batch
        if batch is None:
            return None
        pipe = self.host.pipeline()
        grid = scheduler_grid(pipe.scheduler, getattr(pipe, "num_timesteps", None))
        if batch.grid != grid:
            self.end_pass()  # a pipeline call without our step callback (or another scheduler)
            self._open_pass(batch, grid)
        if batch.session is not None:
            batch.session.evaluate(unet_timestep(args, kwargs))
        return None  # a forward pre-hook's non-None result would replace the UNet's inputs

    def _open_pass(self, batch: Batch, grid: PassGrid) -> None:
        hires = bool(getattr(batch.p, "is_hr_pass", False))
        tags, networks = self._networks(batch, hires)
        batch.grid = grid
        if not tags:
            log.debug("Scheduled LoRA: no scheduled tag in this pass's network data %s", getattr(batch.p, "network_data", None))
        batch.session = batch.pass_scope.enter_context(
            self.runtime.sampling_pass(networks, grid, hires=hires, trace=batch.state.trace)
        )
        if batch.session is not None:
            batch.state.passes.append(PassRecord(hires, grid, tags))

    def end_pass(self, last_step: bool = False) -> None:
        """Close the open pass (restoring every UNet weight it wrote)."""
        batch = self.batch
        if batch is None:
            return
        session = batch.session
        try:
            batch.pass_scope.close()
        finally:
            batch.session, batch.grid = None, None
        if session is not None:
            evaluations = [e for e in batch.state.trace if e.hires == session.hires][-session.evaluations :]
            log.debug(
                "Scheduled LoRA: %s pass, %d steps, positions %s, UNet multipliers %s",
                "hires" if session.hires else "first", session.grid.steps,
                [round(e.position, 3) for e in evaluations], [e.multipliers for e in evaluations],
            )
        p = batch.p
        if last_step and getattr(p, "enable_hr", False) and not getattr(p, "is_hr_pass", False):
            mark_hires(getattr(p, "network_data", None), batch.state.tags)

    def _before_text_encoder(self, module: nn.Module, args: tuple) -> None:
        batch = self.batch
        if batch is None:
            return
        self.end_pass()  # a text encoder runs: the previous pipeline call is over
        batch.conditioning.close()  # one that raised last time
        if not self.host.applies_te(batch.p):
            return
        hires = bool(getattr(batch.p, "is_hr_pass", False))
        _, networks = self._networks(batch, hires)
        steps = max(1, int(getattr(batch.p, "steps", 1) or 1))
        if all(n.te.at(0, steps) == 0 for n in networks):
            return  # nothing to write; skip binding the model
        batch.conditioning.enter_context(self.runtime.conditioning(networks, steps))

    def _after_text_encoder(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.batch is not None:
            self.batch.conditioning.close()

    # -- 4. the end -----------------------------------------------------------------------------

    def end_batch(self) -> None:
        """Remove this batch's hooks and restore every weight (postprocess_batch, on_after_process,
        and as a guard before the next generation)."""
        batch, self.batch = self.batch, None
        if batch is not None:
            for handle in batch.handles:
                handle.remove()
            try:
                batch.conditioning.close()
                batch.pass_scope.close()
            finally:
                leftovers = self.runtime.restore_all()
                if leftovers:
                    log.warning("Scheduled LoRA: restored %d engine(s) at the end of the batch", leftovers)

    def finish(self, p: Any) -> SDNextState | None:
        self.end_batch()
        state: SDNextState | None = getattr(p, STATE_ATTR, None)
        if state is not None and not state.enabled:
            texts = [m.text for prompt in self.prompts(p) for m in state.tags.in_prompt(prompt) if m.tag is not None and is_ours(m.tag)]
            if texts:
                log.warning("Scheduled LoRA is off for this generation; SD.Next handles %s itself", " ".join(dict.fromkeys(texts)))
        return state


def mark_hires(network_data: Mapping[str, Sequence[Any]] | None, tags: TagIndex) -> None:
    """Give our stand-in items their hires marker, so that SD.Next's prompt-embedding cache (keyed
    by the network items) encodes the hires prompt again, at the hires te schedules."""
    routes = []
    for params in (network_data or {}).get("lora", ()):
        tag = getattr(params, TAG_ATTR, None)
        if tag is not None and is_ours(tag):
            routes.append(Route(params, Owner.OURS, tag, tag.format(), hires_items(tag)))
    rewrite_params(routes)


__all__ = [
    "SDNextHost",
    "SDNextIntegration",
    "ScheduledLoraHandler",
    "StepEndCallback",
    "check_tag",
    "install_handler",
    "mark_hires",
    "unreadable_host_tag",
]
