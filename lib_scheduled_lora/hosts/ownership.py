"""Which tags the host keeps, which we take, and whether a generation may start.

The host (A1111, Forge) parses ``<kind:a:b:c>`` into an items list (``"a", "b", "c"``, with
``key=value`` items named) and hands the lists of one pass to its extra-network handlers. We see
the same lists: :func:`tag_from_items` re-joins them into the tag text the user wrote and parses
it with the core grammar. A tag whose meaning the host's own Lora extension reproduces exactly
(:attr:`NetworkTag.is_plain`) stays with the host, so plain tags are pixel-identical to the host
by construction; every other tag is ours and must not reach the host's ``float()``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_scheduled_lora.errors import ScheduledLoraError, ScheduleSyntaxError
from lib_scheduled_lora.core.library import MissingNetworkError
from lib_scheduled_lora.core.schedule import format_number
from lib_scheduled_lora.core.tags import HOST_KINDS, KINDS, NetworkTag, find_tags, parse_tag

log = logging.getLogger("scheduled_lora")

OUR_KINDS = tuple(k for k in KINDS if k not in HOST_KINDS)  # ("loractl",): the host has no handler


class NotSafetensorsError(ScheduledLoraError):
    """A scheduled tag names a network stored in a pickle format (.pt/.ckpt)."""


def tag_text(kind: str, items: Sequence[Any]) -> str:
    return f"<{kind}:{':'.join(str(item) for item in items)}>"


def tag_from_items(kind: str, items: Sequence[Any]) -> NetworkTag:
    """The parsed tag of one host ExtraNetworkParams ``items`` list; raises ScheduleSyntaxError."""
    return parse_tag(tag_text(kind, items))


def host_items(tag: NetworkTag) -> list[str] | None:
    """The host's items for a tag whose meaning the host reproduces exactly, or None when it is ours.

    Besides plain tags that covers constant schedules (``<lora:x:0.8@0,0.8@1>``): handing them to
    the host as ``[name, te, unet]`` makes them pixel-identical to ``<lora:x:0.8>`` by construction.
    """
    if tag.kind not in HOST_KINDS:
        return None
    schedules = (tag.te, tag.unet, tag.hrte, tag.hrunet)
    if not all(s.is_constant for s in schedules):
        return None
    te, unet, hrte, hrunet = (s.at_position(0) for s in schedules)
    if (hrte, hrunet) != (te, unet):
        return None
    items = [tag.name, format_number(te), format_number(unet)]
    if tag.dyn is not None:
        items.append(f"dyn={tag.dyn}")
    items += [f"{key}={value}" for key, value in tag.passthrough]
    return items


def is_ours(tag: NetworkTag) -> bool:
    """True for tags the host cannot do exactly (schedules, hires overrides, our own kinds)."""
    return not tag.is_plain and host_items(tag) is None


@dataclass
class Split:
    """One handler call's params, divided: ``host`` goes to the host's Lora handler unchanged."""

    host: list[Any] = field(default_factory=list)
    ours: list[NetworkTag] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # tag texts dropped (disabled, or malformed)


TAG_ATTR = "scheduled_lora_tag"  # our parsed tag, kept on a params object whose items we rewrote
MARK_KEY = "scheduled_lora"  # the named item that stands in for a schedule in rewritten items


def _set_items(params: Any, items: list[str]) -> None:
    """Give a host params object new items, re-deriving ``positional``/``named`` with its own class."""
    params.__dict__.update(vars(type(params)(items=items)))


def _mark(params: Any, tag: NetworkTag) -> None:
    """Rewrite a scheduled tag's params for every other reader of the prompt's extra-network data.

    Other extensions read the same params objects after activation (LoRA Block Weight parses
    their items with ``float()``, fails on ``~`` or ``te=0@0,1@1``, and then drops its block
    weights for every network of the prompt). They see ``[name, "scheduled_lora=<digest>"]``: a
    network with no strength of theirs (the host never loads it; we apply it per step), and
    items that still differ between schedules, so the host's conditioning cache keys stay apart.
    """
    digest = hashlib.sha1(tag.format().encode()).hexdigest()[:12]
    _set_items(params, [tag.name, f"{MARK_KEY}={digest}"])
    setattr(params, TAG_ATTR, tag)


def _params_tag(kind: str, params: Any) -> NetworkTag | None:
    """The tag of one params object: ours when we marked it, else parsed from its items.
    None for params that are not a text tag (e.g. the host's own "additional network" entry);
    raises ScheduleSyntaxError for a malformed one."""
    tag = getattr(params, TAG_ATTR, None)
    if tag is not None:
        return tag
    items = list(getattr(params, "items", None) or [])
    if not items or any(not isinstance(item, str) for item in items[1:]):
        return None
    return tag_from_items(kind, items)


def split_params(kind: str, params_list: Iterable[Any], enabled: bool) -> Split:
    """Divide a host handler's ``params_list`` (objects with ``.items``).

    Plain tags are passed on as the very same objects (named arguments we do not own, such as
    ``lbw=``, included). Constant schedules are rewritten in place to the host's plain numbers
    (so that other extensions read the same strength the host applies) and passed on. Scheduled
    tags are ours when ``enabled``; when disabled they are dropped (the host would fail on them)
    and listed in ``ignored``; either way their items are rewritten (:func:`_mark`). Malformed
    tags are dropped too: the generation is stopped before sampling with the parse error (see
    :func:`validate_prompts`).
    """
    split = Split()
    for params in params_list:
        try:
            tag = _params_tag(kind, params)
        except ScheduleSyntaxError:
            split.ignored.append(tag_text(kind, params.items))
            continue
        if tag is None or tag.is_plain:
            split.host.append(params)
        elif not is_ours(tag):
            _set_items(params, host_items(tag))  # a constant schedule
            split.host.append(params)
        else:
            _mark(params, tag)
            if enabled:
                split.ours.append(tag)
            else:
                split.ignored.append(tag.format())
    return split


def scheduled_tags(extra_network_data: Mapping[str, Sequence[Any]] | None) -> list[NetworkTag]:
    """Our tags among one pass's extra-network data (``{kind: [params, ...]}``), in prompt order
    per kind. The host builds that data from the batch's first prompt only."""
    tags: list[NetworkTag] = []
    for kind in KINDS:
        for params in (extra_network_data or {}).get(kind, ()):
            try:
                tag = _params_tag(kind, params)
            except ScheduleSyntaxError:
                continue  # reported by validate_prompts before sampling
            if tag is not None and is_ours(tag):
                tags.append(tag)
    return tags


# LoRA Block Weight's arguments. It applies them to the networks the host's Lora loads (it scales
# their factors, and changes their multipliers from its own denoiser callback for start/stop), so
# on a scheduled tag they would silently do nothing.
BLOCK_WEIGHT_KEYS = ("lbw", "w", "lbwe", "start", "stop", "step")


def _check_host_only_arguments(text: str, tag: NetworkTag) -> None:
    for key, value in tag.passthrough:
        if key in BLOCK_WEIGHT_KEYS:
            column = text.find(f":{key}=") + 2
            fix = (
                "write the steps into the schedule instead (start=N is 0@N:1, stop=N is 1@N:0)"
                if key in ("start", "stop", "step")
                else "remove it, or give this network a plain strength"
            )
            raise ScheduleSyntaxError(
                text,
                f"{key}={value}",
                column,
                "is a LoRA Block Weight argument; it only acts on networks the WebUI's own Lora loads, "
                f"and this tag's strength is scheduled by Scheduled LoRA: {fix}",
            )


def validate_prompts(
    prompts: Iterable[str], find_file: Callable[[str], str | None], *, check_names: bool = True
) -> list[NetworkTag]:
    """Raise the first problem of any prompt's network tags, before anything is sampled.

    Problems: a malformed tag (ScheduleSyntaxError, naming tag, text and column); a network name
    the host does not know (MissingNetworkError; the host itself only logs it); a scheduled tag
    whose file is not ``.safetensors`` (NotSafetensorsError). Returns our tags, all prompts.
    """
    ours: list[NetworkTag] = []
    seen: set[str] = set()
    for prompt in prompts:
        for match in find_tags(prompt or ""):
            if match.error is not None:
                raise match.error
            tag = match.tag
            assert tag is not None
            scheduled = is_ours(tag)
            if scheduled:
                _check_host_only_arguments(match.text, tag)
                ours.append(tag)
            if not check_names or (match.text in seen):
                continue
            seen.add(match.text)
            path = find_file(tag.name)
            if path is None:
                raise MissingNetworkError(f"{match.text}: no network named {tag.name!r} in the Lora folders")
            if scheduled and Path(path).suffix.lower() != ".safetensors":
                raise NotSafetensorsError(
                    f"{match.text}: {Path(path).name} is not a .safetensors file; scheduled strengths read only "
                    "safetensors (convert the file, or use a plain <lora:name:weight> tag)"
                )
    return ours


def batch_warning(prompts: Sequence[str]) -> str | None:
    """A message when the prompts of one batch ask for different scheduled tags.

    The host activates the first prompt's networks for the whole batch (``parse_prompts``); so do
    we, and say so.
    """
    if len(prompts) < 2:
        return None

    def key(prompt: str) -> tuple[str, ...]:
        return tuple(m.tag.format() for m in find_tags(prompt or "") if m.tag is not None and is_ours(m.tag))

    first = key(prompts[0])
    differing = [i + 1 for i, prompt in enumerate(prompts) if key(prompt) != first]
    if not differing:
        return None
    return (
        f"Scheduled LoRA: prompt(s) {', '.join(map(str, differing))} of this batch ask for other schedules than "
        f"prompt 1 ({' '.join(first) or 'none'}); like the host, the whole batch uses prompt 1's networks"
    )
