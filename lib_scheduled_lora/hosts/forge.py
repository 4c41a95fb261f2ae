"""Forge main and Forge Neo: the adapter logic, against duck-typed host objects.

Forge is an AUTOMATIC1111 fork: prompts, extra-network activation, the conditioning cache, the
k-diffusion/timestep samplers and ``on_cfg_denoiser`` work as there, so :class:`ForgeIntegration`
is :class:`~lib_scheduled_lora.hosts.a1111.A1111Integration` (tag routing, validation before
sampling, per-segment ``te`` strengths, pass scopes opened inside the sampler function, positions
from the sampler's own sigmas) with Forge's way of holding weights. ``forge_script.py`` hands in
the host's modules; ``tests/test_host_forge.py`` replays the host's call order against recorded
stand-ins of the three patcher layouts with real torch weights.

How Forge holds LoRA weights (verified at Forge main dfdcbab6 and Neo 2026-08; Neo 2026-09 read):
a patcher (``forge_objects.unet`` / ``forge_objects.clip.patcher``) collects the host's plain
LoRAs as patches and writes them when the model is *loaded* (``sampling_prepare`` for the UNet,
``get_learned_conditioning`` for the text encoders), either baked into new weight tensors (its
backup keeps the originals) or, on the fly, as per-forward patches (fp8/nf4/gguf storage with an
"(fp16 LoRA)" option, or Neo's low-VRAM path). We never give it our networks:

* **Baked** (the host's own patches are merged into the weights): our core engine
  (:class:`~lib_scheduled_lora.core.session.Runtime`) writes ``round(W + Σ m·ΔW)`` over the
  weights Forge has just written, seen through :func:`model_view` under ldm/sgm names. The
  conditioning scope first makes Forge load the text encoder (the very call
  ``get_learned_conditioning`` makes next, then a no-op); the pass scope opens inside the sampler
  function, after ``sampling_prepare``. Both close before Forge loads anything again, so Forge's
  backups never see our values; our own originals are kept as the engine keeps them (swapped
  buffers on the CPU; in place with the original in host RAM on a GPU: no second copy there).
* **On the fly** (the host's setting, or weights we cannot write exactly: quantized tensors, fp8
  with a scale): our networks are turned into patches with the host's own ``load_lora`` and key
  maps and added to the layers' per-forward lists with our multiplier as their strength
  (:class:`OnlineWeights`): Forge main's ``forge_online_loras``, Neo's ``weight_function``. The
  host merges them with its own ``merge_lora_to_weight`` in every forward, exactly as it merges its
  own on-the-fly LoRAs; nothing is written into the model, and leaving the scope removes our
  entries.

Forge's patcher layouts differ between builds; :func:`detect_layout` reads the features and
refuses anything unrecognised before sampling (:class:`~lib_scheduled_lora.errors.HostLayoutError`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from lib_scheduled_lora.core.engine import ScheduledNetwork
from lib_scheduled_lora.core.positions import PassGrid, noise_level
from lib_scheduled_lora.core.session import Evaluation, Runtime, place_evaluation
from lib_scheduled_lora.core.tags import NetworkTag
from lib_scheduled_lora.errors import HostLayoutError, UnsupportedModelError
from lib_scheduled_lora.hosts.a1111 import (
    A1111Host,
    A1111Integration,
    GenerationState,
)

log = logging.getLogger("scheduled_lora")


# -- which Forge ------------------------------------------------------------------------------------


class Layout(Enum):
    """The patcher layouts we know (features, not version strings, tell them apart)."""

    FORGE_MAIN = "Forge main (lora_patches + LoraLoader, forge_online_loras)"
    NEO_2026_08 = "Forge Neo 2026-08 (patches with an on-the-fly flag, LowVramPatch)"
    NEO_2026_09 = "Forge Neo 2026-09 (weight_wrapper_patches, OnlineLoRAPatch)"

    @property
    def is_neo(self) -> bool:
        return self is not Layout.FORGE_MAIN


def _defining_module(obj: object, attribute: str) -> Any:
    """The module whose class (in ``obj``'s MRO) defines ``attribute``."""
    for klass in type(obj).__mro__:
        if attribute in vars(klass):
            return sys.modules.get(klass.__module__)
    return None


def detect_layout(patcher: Any) -> Layout:
    """The layout of a Forge ``ModelPatcher`` (``forge_objects.unet``); raises HostLayoutError for
    one we do not know (writing weights the wrong way could corrupt the model)."""
    model = getattr(patcher, "model", None)
    loader = getattr(model, "lora_loader", None)
    if isinstance(getattr(patcher, "lora_patches", None), dict) and all(
        hasattr(loader, name) for name in ("refresh", "backup", "loaded_hash")
    ):
        return Layout.FORGE_MAIN
    if (
        isinstance(getattr(patcher, "patches", None), dict)
        and isinstance(getattr(patcher, "backup", None), dict)
        and isinstance(getattr(patcher, "weight_wrapper_patches", None), dict)
        and hasattr(patcher, "patches_uuid")
        and hasattr(model, "current_weight_patches_uuid")
    ):
        module = _defining_module(patcher, "add_patches")
        if hasattr(module, "OnlineLoRAPatch"):
            return Layout.NEO_2026_09
        if hasattr(module, "LowVramPatch") and callable(getattr(patcher, "use_online_lora", None)):
            return Layout.NEO_2026_08
    kind = type(patcher)
    raise HostLayoutError(
        f"Scheduled LoRA does not recognise this Forge build's LoRA patcher ({kind.__module__}.{kind.__qualname__}); "
        f"it knows {', '.join(layout.value for layout in Layout)}. Scheduled tags are refused rather than risk "
        "writing the model the wrong way; plain tags work as usual"
    )


@dataclass(frozen=True)
class ForgeBackend:
    """The host functions the adapter calls, handed in by ``forge_script.py``: Forge's own LoRA
    reading and merging (``backend.patcher.lora``), its model loader, and its on-the-fly setting."""

    load_lora: Callable[[dict, dict], tuple[dict, dict]]  # (state dict, key map) -> (patches, unmatched)
    unet_key_map: Callable[[Any, dict], dict]  # model_lora_keys_unet(model, {})
    clip_key_map: Callable[[Any, dict], dict]  # model_lora_keys_clip(model, {})
    merge: Callable[..., torch.Tensor]  # merge_lora_to_weight(patches, weight, key, computation_dtype=...)
    load_model: Callable[[Any], Any]  # memory_management.load_model_gpu(patcher)
    online_setting: Callable[[], bool]  # dynamic_args' "online_lora": an "(fp16 LoRA)" storage option


# The UNet storage dtypes for which Forge main bakes even with an "(fp16 LoRA)" option
# (extensions-builtin/sd_forge_lora/networks.py: load_networks); Neo keeps the setting as is.
BAKED_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


def host_on_the_fly(layout: Layout, setting: bool, storage_dtype: Any) -> bool:
    """Whether the host's own Lora applies its networks on the fly (else it bakes them)."""
    return setting and (layout.is_neo or storage_dtype not in BAKED_STORAGE)


# -- the model as the engine sees it ----------------------------------------------------------------

FAMILIES = {"is_sdxl": "sdxl", "is_sd2": "sd2", "is_sd1": "sd1"}


def model_family(sd_model: Any) -> str | None:
    """"sd1" / "sd2" / "sdxl" from Forge's own flags (``ForgeDiffusionEngine.is_sd1`` ...), or
    None for the families the core's name mapping does not cover (Flux, SD3, Chroma, ...)."""
    for flag, family in FAMILIES.items():
        if getattr(sd_model, flag, False) is True:
            return family
    return None


def model_view(objects: Any, family: str) -> nn.Module:
    """Forge's UNet and text encoders under the ldm/sgm names :mod:`~lib_scheduled_lora.core.naming`
    reads (``model.diffusion_model.*``, ``cond_stage_model.transformer.*``,
    ``conditioner.embedders.{0,1}.transformer.*``). The view only *refers* to Forge's modules: its
    parameters are Forge's parameter objects, looked up afresh each time (Forge replaces them when
    it bakes)."""
    view = nn.Module()
    unet = nn.Module()
    unet.diffusion_model = objects.unet.model.diffusion_model
    view.model = unet
    encoders = objects.clip.cond_stage_model

    def transformer(name: str) -> nn.Module | None:
        found = getattr(getattr(encoders, name, None), "transformer", None)
        return found if isinstance(found, nn.Module) else None

    if family == "sdxl":
        embedders = nn.ModuleList([nn.Module(), nn.Module()])
        for index, name in enumerate(("clip_l", "clip_g")):
            module = transformer(name)
            if module is not None:
                embedders[index].transformer = module
        conditioner = nn.Module()
        conditioner.embedders = embedders
        view.conditioner = conditioner
    else:
        module = transformer("clip_h" if family == "sd2" else "clip_l")
        if module is not None:
            stage = nn.Module()
            stage.transformer = module
            view.cond_stage_model = stage
    return view


def _plain(t: Any) -> bool:
    """A tensor the engine can write exactly: a plain float tensor (not a quantized subclass)."""
    return type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor and t.is_floating_point()


def writable(root: nn.Module) -> bool:
    """Whether every weight under ``root`` is a plain float tensor of a layer without a weight
    scale (fp8 checkpoints with ``scale_weight`` store W / scale; bnb/gguf tensors are quantized)."""
    for module in root.modules():
        if isinstance(getattr(module, "scale_weight", None), torch.Tensor):
            return False
        for param in module.parameters(recurse=False):
            if not _plain(param):
                return False
    return True


# -- the host adapter -------------------------------------------------------------------------------


def _patch_state(patcher: Any) -> object:
    """What a patcher has written into its model: Forge main's LoraLoader hash, Neo's patches uuid."""
    model = getattr(patcher, "model", None)
    loader = getattr(model, "lora_loader", None)
    if loader is not None:
        return ("loaded", id(loader), getattr(loader, "loaded_hash", None))
    return ("uuid", id(model), getattr(model, "current_weight_patches_uuid", None))


class ForgeHost(A1111Host):
    """:class:`~lib_scheduled_lora.core.session.HostAdapter` for Forge main and Forge Neo
    (``shared`` = modules.shared; the builtin Lora's ``networks`` module indexes the files as on
    A1111)."""

    def sd_model(self) -> Any:
        return self.shared.sd_model

    def objects(self) -> Any:
        """``sd_model.forge_objects``: the patchers the sampler and the text encoder use now."""
        return self.shared.sd_model.forge_objects

    def family(self) -> str | None:
        return model_family(self.shared.sd_model)

    def model(self) -> nn.Module:
        return model_view(self.objects(), self.family() or "sd1")

    def settle(self, model) -> None:
        """Nothing to do at this point: Forge writes its own patches when it loads a patcher, and
        the integration opens every scope right after that load (see the module docstring); until
        the scope closes nothing loads again."""

    def state(self) -> object:
        objects = self.objects()
        return (_patch_state(objects.unet), _patch_state(objects.clip.patcher))

    def check_model(self, tags: Sequence[NetworkTag]) -> Layout:
        """The layout; raises when scheduled ``tags`` cannot run on the loaded model."""
        layout = detect_layout(self.objects().unet)
        if self.family() is None:
            kind = type(self.shared.sd_model).__name__
            raise UnsupportedModelError(
                f"{tags[0].format()}: scheduled strengths on Forge cover SD 1.x, SD 2.x and SDXL; the loaded model is "
                f"{kind} (use a plain <lora:name:weight> tag with it)"
            )
        return layout


# -- on the fly: our networks as the host's own per-forward patches --------------------------------

_MISSING = object()


@dataclass
class HostPatches:
    """One network file read by the host's own ``load_lora``, per component: ``{key: value}``
    where key is the model key (or ``(key, offset[, function])``) and value the host's patch."""

    unet: dict[Any, Any]
    clip: dict[Any, Any]
    unmatched: list[str]

    def of(self, component: str) -> dict[Any, Any]:
        return self.unet if component == "unet" else self.clip


def rank_cut(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """``dyn=N`` on a LoRA file as the WebUI means it: the first N components of every low-rank
    module, scale kept at alpha / the file's rank (so alpha becomes alpha·N/rank for the host's
    loader, which divides by the rank it sees). Modules with a Tucker ``lora_mid`` are not cut."""
    out = dict(state)
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        up_key, mid_key, alpha_key = base + ".lora_up.weight", base + ".lora_mid.weight", base + ".alpha"
        full = down.shape[0]
        if rank >= full or mid_key in state or up_key not in state:
            continue
        out[key] = down[:rank].contiguous()
        out[up_key] = state[up_key][:, :rank].contiguous()
        if alpha_key in state:
            out[alpha_key] = state[alpha_key] * (rank / full)
    return out


def read_host_patches(backend: ForgeBackend, path: str, dyn: int | None, objects: Any) -> HostPatches:
    """``path`` (a .safetensors file: never unpickled) through the host's own key maps and loader."""
    from safetensors.torch import load_file

    state = load_file(path)
    if any(key.startswith("lora_unet__") for key in state):  # as Forge Neo's load_networks does
        state = {("lora_unet_" + k[len("lora_unet__") :] if k.startswith("lora_unet__") else k): v for k, v in state.items()}
    if dyn is not None:
        state = rank_cut(state, dyn)
    unet, rest = backend.load_lora(state, backend.unet_key_map(objects.unet.model, {}))
    clip, rest = backend.load_lora(rest, backend.clip_key_map(objects.clip.cond_stage_model, {}))
    return HostPatches(dict(unet), dict(clip), sorted(rest))


@dataclass
class HostPatchCache:
    """Host patches of the networks in use, per (file, its mtime, dyn, model)."""

    limit: int = 8
    _entries: dict[tuple, HostPatches] = field(default_factory=dict)

    def get(self, backend: ForgeBackend, path: str, dyn: int | None, objects: Any) -> HostPatches:
        key = (path, os.path.getmtime(path), dyn, id(objects.unet.model), id(objects.clip.cond_stage_model))
        found = self._entries.pop(key, None)
        if found is None:
            found = read_host_patches(backend, path, dyn, objects)
            if found.unmatched:
                log.warning(
                    "%s: %d keys match no layer of this model (first: %s)",
                    os.path.basename(path), len(found.unmatched), found.unmatched[0],
                )
        self._entries[key] = found  # most recent last
        while len(self._entries) > self.limit:
            self._entries.pop(next(iter(self._entries)))
        return found

    def clear(self) -> None:
        self._entries.clear()


def _split(key: Any) -> tuple[str, Any, Any]:
    """A host patch key: ``"a.b.weight"`` or ``("a.b.weight", offset[, function])``."""
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1] if len(key) > 1 else None, key[2] if len(key) > 2 else None


def _locate(root: nn.Module, key: str, what: str) -> tuple[nn.Module, str]:
    module_name, _, child = key.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        raise HostLayoutError(f"{key}: the host's LoRA key names no layer of the loaded model") from None
    if not hasattr(module, what):
        raise HostLayoutError(
            f"{key}: this layer ({type(module).__name__}) has no {what}; the host cannot apply on-the-fly "
            "patches to it, so neither can Scheduled LoRA"
        )
    return module, child


class ForgeMainOnline:
    """Forge main: ``layer.forge_online_loras[child]`` is a list of patches the layer's forward
    merges into a copy of its weight (``backend/operations.py: get_weight_and_bias``, in the
    weight's dtype). Ours are appended after the host's; :meth:`restore` puts the dict back."""

    ATTR = "forge_online_loras"

    def __init__(self, root: nn.Module):
        self.root = root
        self._saved: dict[tuple[int, str], tuple[nn.Module, str, bool, Any]] = {}

    def set(self, key: str, entries: list[list]) -> None:
        module, child = _locate(self.root, key, "parameters_manual_cast")
        ident = (id(module), child)
        if ident not in self._saved:
            own = self.ATTR in vars(module)
            original = vars(module)[self.ATTR].get(child, _MISSING) if own else _MISSING
            self._saved[ident] = (module, child, own, original)
        _, _, own, original = self._saved[ident]
        table = vars(module).get(self.ATTR)
        if table is None:
            table = {}
            setattr(module, self.ATTR, table)
        host = [] if original is _MISSING else list(original)
        if entries:
            table[child] = host + entries
        elif original is _MISSING:
            table.pop(child, None)
        else:
            table[child] = original

    def installed(self) -> bool:
        """Our entries are still where we put them (the host has not reloaded the patcher)."""
        return all(self.ATTR in vars(module) for module, _, _, _ in self._saved.values())

    def restore(self) -> None:
        for module, child, own, original in self._saved.values():
            table = vars(module).get(self.ATTR)
            if not own:
                if table is not None:
                    table.pop(child, None)
                    if not table:
                        delattr(module, self.ATTR)
            elif table is not None:
                if original is _MISSING:
                    table.pop(child, None)
                else:
                    table[child] = original
        self._saved.clear()


class _NeoPatch:
    """One layer's ``weight_function`` entry: our patches merged the host's way."""

    def __init__(self, key: str, merge: Callable[..., torch.Tensor], module: nn.Module, child: str):
        self.key, self.merge, self.module, self.child = key, merge, module, child
        self.entries: list[list] = []

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.entries:
            return weight
        if weight is getattr(self.module, self.child, None):
            # Neo's non-manual-cast path hands the parameter itself; its merge works in place.
            weight = weight.clone()
        return self.merge(self.entries, weight, self.key, computation_dtype=weight.dtype)


class NeoOnline:
    """Forge Neo: each layer's ``weight_function``/``bias_function`` list runs in every forward
    (``backend/operations.py``), where the host's own on-the-fly LoRA sits (a ``LowVramPatch`` in
    2026-08, an ``OnlineLoRAPatch`` in 2026-09). Ours is one more function at the end of a copy of
    the list; :meth:`restore` puts the host's list object back."""

    def __init__(self, root: nn.Module, merge: Callable[..., torch.Tensor]):
        self.root, self.merge = root, merge
        self._saved: dict[tuple[int, str], tuple[nn.Module, str, bool, Any, _NeoPatch]] = {}

    def set(self, key: str, entries: list[list]) -> None:
        module, child = _locate(self.root, key, "weight_function")
        attribute = f"{child}_function"
        ident = (id(module), attribute)
        if ident not in self._saved:
            own = attribute in vars(module)
            original = getattr(module, attribute, [])
            patch = _NeoPatch(key, self.merge, module, child)
            setattr(module, attribute, [*original, patch])
            self._saved[ident] = (module, attribute, own, original, patch)
        self._saved[ident][4].entries = entries

    def installed(self) -> bool:
        return all(patch in getattr(module, attribute, ()) for module, attribute, _, _, patch in self._saved.values())

    def restore(self) -> None:
        for module, attribute, own, original, _ in self._saved.values():
            if own:
                setattr(module, attribute, original)
            elif attribute in vars(module):
                delattr(module, attribute)
        self._saved.clear()


Installer = ForgeMainOnline | NeoOnline


def installer_for(layout: Layout, root: nn.Module, backend: ForgeBackend) -> Installer:
    return NeoOnline(root, backend.merge) if layout.is_neo else ForgeMainOnline(root)


class OnlineWeights:
    """Our networks at the schedules' values, applied by the host on the fly (the same small
    interface as the engine's ScheduledWeights: ``set_position``, ``multipliers``, ``restore``).

    A patch entry is ``[m, value, 1.0, offset, function]``: the host's own format with our
    multiplier where the host puts a tag's strength, so a network at ``m`` here is the host's
    ``<lora:x:m>`` on the fly, bit for bit. Only layers of networks whose multiplier changed are
    updated; a multiplier of 0 leaves the layer's list as the host had it.
    """

    def __init__(
        self,
        networks: Sequence[ScheduledNetwork],
        patches: Sequence[HostPatches],
        installers: Mapping[str, Installer],
    ):
        self.networks = list(networks)
        self.installers = dict(installers)  # component ("unet" | "te") -> installer
        self._multipliers: dict[tuple[int, str], float] = {}
        self._keys: dict[str, dict[str, list[tuple[int, Any, Any, Any]]]] = {}
        for component in self.installers:
            by_key: dict[str, list[tuple[int, Any, Any, Any]]] = {}
            for index, network_patches in enumerate(patches):
                for raw, value in network_patches.of("unet" if component == "unet" else "clip").items():
                    key, offset, function = _split(raw)
                    by_key.setdefault(key, []).append((index, value, offset, function))
            self._keys[component] = by_key

    def set_position(self, component: str, step: float, steps: int) -> None:
        installer = self.installers.get(component)
        if installer is None:
            return
        changed = set()
        for index, scheduled in enumerate(self.networks):
            m = scheduled.schedule(component).at(step, steps)
            if self._multipliers.get((index, component), 0.0) != m:
                changed.add(index)
            self._multipliers[(index, component)] = m
        if not changed:
            return
        for key, parts in self._keys[component].items():
            if not any(index in changed for index, _, _, _ in parts):
                continue
            entries = [
                [self._multipliers[(index, component)], value, 1.0, offset, function]
                for index, value, offset, function in parts
                if self._multipliers[(index, component)] != 0.0
            ]
            installer.set(key, entries)

    def multiplier(self, net: int, component: str) -> float:
        return self._multipliers.get((net, component), 0.0)

    def multipliers(self, component: str) -> dict[str, float]:
        return {scheduled.name: self.multiplier(i, component) for i, scheduled in enumerate(self.networks)}

    def installed(self) -> bool:
        return all(installer.installed() for installer in self.installers.values())

    def reinstall(self, component: str, step: float, steps: int) -> None:
        """Put our entries back after the host rebuilt its per-forward lists (it reloaded)."""
        installer = self.installers[component]
        installer.restore()
        self._multipliers = {k: v for k, v in self._multipliers.items() if k[1] != component}
        self.set_position(component, step, steps)

    def restore(self) -> None:
        for installer in self.installers.values():
            installer.restore()
        self._multipliers.clear()


class OnlinePass:
    """One sampling pass on the fly: :meth:`evaluate` places each evaluation on the pass's grid
    (as :class:`~lib_scheduled_lora.core.session.PassSession` does for the engine)."""

    owner: object = None

    def __init__(self, weights: OnlineWeights, grid: PassGrid, hires: bool, trace: list[Evaluation]):
        self.weights, self.grid, self.hires, self.trace = weights, grid, hires, trace
        self.evaluations = 0
        self.position: float | None = None

    def evaluate(self, noise: float | None) -> float:
        self.position = place_evaluation(self.weights, self.grid, self.hires, self.trace, noise, self.evaluations)
        self.evaluations += 1
        return self.position

    def resync(self) -> bool:
        if self.position is None or self.weights.installed():
            return False
        self.weights.reinstall("unet", self.position, self.grid.steps)
        return True


# -- Forge Neo's own scheduler ---------------------------------------------------------------------

# extensions-builtin/sd_forge_lora_schedule/scripts/control.py (Neo 2026-09): <lora:name:[w@t,...]>
NEO_SCHEDULE_SYNTAX = re.compile(r"<lora:([^:>]+):\[([^\]>]+)\]>")


def neo_schedule_syntax(text: str) -> bool:
    return NEO_SCHEDULE_SYNTAX.fullmatch(text) is not None


# -- the integration ---------------------------------------------------------------------------------


def _resync(session: Any, module: Any, args: tuple) -> None:
    session.resync()
    return None


class ForgeIntegration(A1111Integration):
    """:class:`A1111Integration` with Forge's weights: the engine over :func:`model_view` when the
    host bakes, :class:`OnlineWeights` when it applies LoRAs on the fly."""

    def __init__(
        self,
        runtime: Runtime,
        extra_networks: Any,
        prompt_parser: Any,
        backend: ForgeBackend,
        builtin_scheduler: Callable[[], bool] = lambda: False,
    ):
        super().__init__(runtime, extra_networks, prompt_parser)
        self.backend = backend
        self.builtin_scheduler = builtin_scheduler  # Neo's "LoRA Control Integrated" is loaded
        self.patches = HostPatchCache()
        self.online_current: OnlinePass | None = None
        self._online_open: list[OnlineWeights] = []

    @property
    def host(self) -> ForgeHost:
        return self.runtime.host  # type: ignore[return-value]

    # -- before sampling ------------------------------------------------------------------------------

    def begin(self, p: Any, enabled: bool) -> GenerationState:
        self.host_syntax = neo_schedule_syntax if self.builtin_scheduler() else None
        self._restore_online()
        state = super().begin(p, enabled)
        if self.host_syntax is not None:
            for prompt in self._all_prompts(p):
                for match in state.tags.in_prompt(prompt):
                    if self.host_syntax(match.text):
                        log.info(
                            "Scheduled LoRA: %s is in Forge Neo's own schedule syntax; left to its LoRA Control "
                            "(it needs on-the-fly LoRA and reads the lagging sampling step)", match.text,
                        )
        return state

    def _check_model(self, p: Any, tags: list[NetworkTag]) -> None:
        self.host.check_model(tags)

    def online(self, component: str) -> bool:
        """Whether ``component`` ("unet" or "te") gets our networks on the fly: when the host
        applies its own that way, or when its weights cannot be written exactly."""
        objects = self.host.objects()
        layout = detect_layout(objects.unet)
        if host_on_the_fly(layout, self.backend.online_setting(), getattr(objects.unet.model, "storage_dtype", None)):
            return True
        root = objects.unet.model if component == "unet" else objects.clip.cond_stage_model
        return not writable(root)

    def _online_weights(self, networks: Sequence[ScheduledNetwork], component: str) -> OnlineWeights:
        objects = self.host.objects()
        layout = detect_layout(objects.unet)
        root = objects.unet.model if component == "unet" else objects.clip.cond_stage_model
        patches = [
            self.patches.get(self.backend, n.network.path, self._dyn(n), objects) for n in networks
        ]
        weights = OnlineWeights(networks, patches, {component: installer_for(layout, root, self.backend)})
        self._online_open.append(weights)
        return weights

    @staticmethod
    def _dyn(scheduled: ScheduledNetwork) -> int | None:
        # LoadedNetworks names a rank-limited network "name (dyn=N)" (Network.rank_limited).
        found = re.search(r" \(dyn=(\d+)\)$", scheduled.network.name)
        return int(found.group(1)) if found else None

    def _close_online(self, weights: OnlineWeights) -> None:
        try:
            weights.restore()
        finally:
            if weights in self._online_open:
                self._online_open.remove(weights)

    def _restore_online(self) -> int:
        count = 0
        while self._online_open:
            self._close_online(self._online_open[-1])
            count += 1
        self.online_current = None
        return count

    def describe(self) -> dict[str, Any]:
        """For ``/scheduled-lora/v1/info``: the layout and where our networks go, for the loaded model."""
        try:
            layout = detect_layout(self.host.objects().unet)
        except (AttributeError, HostLayoutError) as exc:
            return {"layout": None, "problem": str(exc)}
        return {
            "layout": layout.name,
            "family": self.host.family(),
            "on_the_fly": {"unet": self.online("unet"), "te": self.online("te")},
        }

    # -- conditioning ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _conditioning_scope(self, model: Any, networks: list[ScheduledNetwork], steps: int) -> Iterator[Any]:
        if not networks:
            yield None
            return
        # Forge writes its own text-encoder patches when it loads the encoder: do now what
        # get_learned_conditioning does first (then a no-op), so they are final before we write.
        self.backend.load_model(model.forge_objects.clip.patcher)
        if not self.online("te"):
            with self.runtime.conditioning(networks, steps) as weights:
                yield weights
            return
        online = self._online_weights(networks, "te")
        try:
            online.set_position("te", 0, max(1, steps))
            yield online
        finally:
            self._close_online(online)

    # -- every sampling pass -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _pass_scope(self, tags: list, grid: PassGrid, hires: bool, state: GenerationState, sampler: Any):
        if not self.online("unet"):
            with super()._pass_scope(tags, grid, hires, state, sampler) as session:
                yield session
            return
        networks = self.runtime.scheduled(tags, hires)
        weights = self._online_weights(networks, "unet")
        session = OnlinePass(weights, grid, hires, state.trace)
        session.owner = sampler
        previous, self.online_current = self.online_current, session
        unet = self.host.objects().unet.model.diffusion_model
        hook = unet.register_forward_pre_hook(functools.partial(_resync, session))
        try:
            yield session
        finally:
            hook.remove()
            self.online_current = previous
            self._close_online(weights)

    def on_cfg_denoiser(self, params: Any) -> None:
        session = self.online_current
        if session is None:
            return super().on_cfg_denoiser(params)
        denoiser = getattr(params, "denoiser", None)
        if session.owner is not None and getattr(denoiser, "sampler", session.owner) is not session.owner:
            return None
        session.evaluate(noise_level(getattr(params, "sigma", None)))
        return None

    # -- the end ----------------------------------------------------------------------------------------

    def finish(self, p: Any) -> GenerationState | None:
        leftovers = self._restore_online()
        if leftovers:
            log.warning("Scheduled LoRA: removed %d on-the-fly patch set(s) left at the end of the generation", leftovers)
        return super().finish(p)

    def clear(self) -> None:
        """The model changed: forget every cache (and put anything still open back)."""
        self._restore_online()
        self.patches.clear()
        self.runtime.clear()
