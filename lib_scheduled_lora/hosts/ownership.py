"""Which tags the host's own Lora keeps, which we take, and whether a generation may start.

One decision, :func:`host_strengths`: a tag whose meaning the host's own Lora extension reproduces
exactly (a host kind, constant schedules, the same strengths in the hires pass) stays with the
host, so such tags are pixel-identical to the host by construction; every other tag is ours and
must never reach the host's ``float()``.

WebUI hosts (A1111, Forge) parse ``<kind:a:b:c>`` into an items list (``"a", "b", "c"``, with
``key=value`` items named) and hand the lists of one pass to their extra-network handlers. We see
the same lists; :class:`TagIndex` re-joins them into the tag text the user wrote and parses each
distinct text once per generation. :func:`route` decides, without side effects, what happens to
each params object; :func:`rewrite_params` then rewrites the shared params objects (the one side
effect, explained there).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from lib_scheduled_lora.core.numbers import NUMBER, format_number
from lib_scheduled_lora.core.tags import KINDS, NetworkTag, TagMatch, find_tags, parse_tag
from lib_scheduled_lora.errors import (
    MissingNetworkError,
    NotSafetensorsError,
    ScheduleSyntaxError,
    elide,
    excerpt,
)

# The kinds the WebUI's builtin Lora extension answers to ("loractl" is ours only).
HOST_KINDS = ("lora", "lyco")


# -- the decision ---------------------------------------------------------------------------------


def host_strengths(tag: NetworkTag) -> tuple[float, float] | None:
    """``(te, unet)`` with which the host's own Lora does exactly what ``tag`` means, or None when
    the tag is ours (a schedule, a hires override, or a kind the host does not know).

    A constant schedule (``<lora:x:0.8@0,0.8@1>``) counts as the host's: handed over as plain
    numbers it is pixel-identical to ``<lora:x:0.8>`` by construction.
    """
    if tag.kind not in HOST_KINDS:
        return None
    schedules = (tag.te, tag.unet, tag.hrte, tag.hrunet)
    if not all(s.is_constant for s in schedules):
        return None
    te, unet, hrte, hrunet = (s.at_position(0) for s in schedules)
    if (hrte, hrunet) != (te, unet):
        return None  # the host ignores hr=/hrte=/hrunet=
    return te, unet


def is_ours(tag: NetworkTag) -> bool:
    return host_strengths(tag) is None


# -- parsing once ---------------------------------------------------------------------------------


def tag_text(kind: str, items: Sequence[Any]) -> str:
    """The tag text a host items list came from (the host split it on ``:``)."""
    return f"<{kind}:{':'.join(str(item) for item in items)}>"


@dataclass
class TagIndex:
    """Every tag text of one generation parsed once (prompts, and the host's items lists)."""

    _matches: dict[str, TagMatch] = field(default_factory=dict)
    _prompts: dict[str, list[TagMatch]] = field(default_factory=dict)

    def in_prompt(self, prompt: str | None) -> list[TagMatch]:
        """The tags of ``prompt`` (parsed or with their error), in order."""
        prompt = prompt or ""
        found = self._prompts.get(prompt)
        if found is None:
            found = [self._matches.setdefault(m.text, m) for m in find_tags(prompt)]
            self._prompts[prompt] = found
        return found

    def parse(self, text: str) -> NetworkTag:
        """The tag of one whole tag text; raises its ScheduleSyntaxError."""
        match = self._matches.get(text)
        if match is None:
            try:
                match = TagMatch(0, len(text), text, tag=parse_tag(text))
            except ScheduleSyntaxError as exc:
                match = TagMatch(0, len(text), text, error=exc)
            self._matches[text] = match
        if match.error is not None:
            raise match.error
        assert match.tag is not None
        return match.tag


# -- routing a handler's params -------------------------------------------------------------------

TAG_ATTR = "scheduled_lora_tag"  # our parsed tag, kept on a params object whose items we rewrote
MARK_KEY = "scheduled_lora"  # the named item that stands in for a schedule in rewritten items


class Owner(Enum):
    HOST = "host"  # passed on to the host's handler
    OURS = "ours"  # applied per step by our engine
    DROPPED = "dropped"  # neither: the switch is off (scheduled tag) or the tag is malformed


@dataclass(frozen=True)
class Route:
    """What happens to one params object of a host handler call."""

    params: Any
    owner: Owner
    tag: NetworkTag | None  # None for entries that are no text tag, and malformed ones
    text: str  # the tag as written (for messages)
    new_items: list[str] | None = None  # what rewrite_params gives the params object, if anything


def params_tag(kind: str, params: Any, tags: TagIndex) -> NetworkTag | None:
    """The tag of one params object: ours when we marked it, else parsed from its items.
    None for params that are not a text tag (e.g. the host's own "additional network" entry,
    whose multiplier is a float); raises ScheduleSyntaxError for a malformed one."""
    tag = getattr(params, TAG_ATTR, None)
    if tag is not None:
        return tag
    items = list(getattr(params, "items", None) or [])
    if not items or any(not isinstance(item, str) for item in items[1:]):
        return None
    return tags.parse(tag_text(kind, items))


def _reads_as_written(items: Sequence[Any]) -> bool:
    """The host's float() reads the strengths exactly as written: the first two positional
    arguments and ``te=``/``unet=`` are plain numbers."""
    texts = [str(item) for item in items[1:]]
    positional = [text for text in texts if "=" not in text][:2]
    named = [text.partition("=")[2] for text in texts if text.partition("=")[0] in ("te", "unet")]
    return all(NUMBER.fullmatch(text.strip()) for text in positional + named)


def host_items(tag: NetworkTag, strengths: tuple[float, float]) -> list[str]:
    """The items the host's Lora reads as ``tag`` (plain numbers; our own arguments dropped)."""
    items = [tag.name, format_number(strengths[0]), format_number(strengths[1])]
    if tag.dyn is not None:
        items.append(f"dyn={tag.dyn}")
    return items + [f"{key}={value}" for key, value in tag.passthrough]


def stand_in_items(tag: NetworkTag) -> list[str]:
    """What other readers of the prompt's network data see for a scheduled tag.

    Other extensions read the same params objects after activation (LoRA Block Weight parses
    their items with ``float()``, fails on ``~`` or ``te=0@0,1@1``, and then drops its block
    weights for every network of the prompt). They see ``[name, "scheduled_lora=<digest>"]``: a
    network with no strength of theirs (the host never loads it; we apply it per step), and items
    that still differ between schedules, so the host's conditioning cache keys stay apart.
    """
    digest = hashlib.sha1(tag.format().encode()).hexdigest()[:12]
    return [tag.name, f"{MARK_KEY}={digest}"]


HostSyntax = Callable[[str], bool]  # True for a tag text the host's own scheduler reads (Forge Neo)


def route(
    kind: str, params_list: Iterable[Any], enabled: bool, tags: TagIndex, host_syntax: HostSyntax | None = None
) -> list[Route]:
    """Decide, for each params object of a host handler call, who applies it. No side effects.

    Plain tags go to the host as the very same objects (named arguments we do not own, such as
    ``lbw=``, included). Constant schedules go to the host rewritten to its plain numbers, so that
    other extensions read the strength the host applies. Scheduled tags are ours when ``enabled``
    and dropped otherwise (the host would fail on them); either way their items become a stand-in.
    Malformed tags are dropped: the generation is stopped before sampling with the parse error
    (:func:`validate_prompts`). Tags in the host's own schedule syntax (``host_syntax``: Forge
    Neo's built-in "LoRA Control", ``<lora:x:[1@0,0@1]>``) stay the host's, untouched.
    """
    routes = []
    for params in params_list:
        items = getattr(params, "items", [])
        if host_syntax is not None and items and host_syntax(tag_text(kind, items)):
            routes.append(Route(params, Owner.HOST, None, tag_text(kind, items)))
            continue
        try:
            tag = params_tag(kind, params, tags)
        except ScheduleSyntaxError:
            routes.append(Route(params, Owner.DROPPED, None, tag_text(kind, items)))
            continue
        if tag is None:
            routes.append(Route(params, Owner.HOST, None, tag_text(kind, items)))
            continue
        strengths = host_strengths(tag)
        if strengths is not None:
            new = None if _reads_as_written(items) else host_items(tag, strengths)
            routes.append(Route(params, Owner.HOST, tag, tag.format(), new))
        else:
            owner = Owner.OURS if enabled else Owner.DROPPED
            routes.append(Route(params, owner, tag, tag.format(), stand_in_items(tag)))
    return routes


def rewrite_params(routes: Iterable[Route]) -> None:
    """Give the host's params objects their new items: in place, because the host, other
    extensions and the next (hires) pass all read these very objects (see :func:`stand_in_items`).
    ``positional``/``named`` are re-derived with the params object's own class; a scheduled tag
    keeps its parsed tag on the object (:data:`TAG_ATTR`), so the hires pass finds it again."""
    for r in routes:
        if r.new_items is None:
            continue
        r.params.__dict__.update(vars(type(r.params)(items=r.new_items)))
        if r.owner is not Owner.HOST and r.tag is not None:
            setattr(r.params, TAG_ATTR, r.tag)


def scheduled_tags(extra_network_data: Mapping[str, Sequence[Any]] | None, tags: TagIndex) -> list[NetworkTag]:
    """Our tags among one pass's extra-network data (``{kind: [params, ...]}``), in prompt order
    per kind. The host builds that data from the batch's first prompt only."""
    found: list[NetworkTag] = []
    for kind in KINDS:
        for params in (extra_network_data or {}).get(kind, ()):
            try:
                tag = params_tag(kind, params, tags)
            except ScheduleSyntaxError:
                continue  # reported by validate_prompts before sampling
            if tag is not None and is_ours(tag):
                found.append(tag)
    return found


# -- validation before sampling -------------------------------------------------------------------

# LoRA Block Weight's arguments. It applies them to the networks the host's Lora loads (it scales
# their factors, and changes their multipliers from its own denoiser callback for start/stop), so
# on a tag we apply they would silently do nothing.
BLOCK_WEIGHT_KEYS = ("lbw", "w", "lbwe", "start", "stop", "step")


def check_arguments(text: str, tag: NetworkTag) -> None:
    """Refuse arguments that only the host's own Lora (with LoRA Block Weight) acts on, on a tag
    that Scheduled LoRA applies; raises ScheduleSyntaxError naming the argument and its column."""
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
                f"is a LoRA Block Weight argument, which only the WebUI's own Lora acts on (Scheduled LoRA "
                f"applies this tag): {fix}",
            )


def validate_prompts(
    prompts: Iterable[str | None],
    find_file: Callable[[str], str | None],
    tags: TagIndex,
    *,
    check_names: bool = True,
    host_syntax: HostSyntax | None = None,
    check: Callable[[str, NetworkTag], None] | None = None,
) -> list[NetworkTag]:
    """Raise the first problem of any prompt's network tags, before anything is sampled.

    Problems: a malformed tag (ScheduleSyntaxError, naming tag, text and column); a network name
    the host does not know (MissingNetworkError; the host itself only logs it); a scheduled tag
    whose file is not ``.safetensors`` (NotSafetensorsError); what ``check(text, tag)`` refuses
    (default: :func:`check_arguments` on our tags; a host may refuse more, also on plain tags).
    Tags in the host's own syntax (``host_syntax(text)`` holds: Forge Neo's scheduler, SD.Next's
    own readings) are the host's to check. Returns our tags, all prompts.
    """
    ours: list[NetworkTag] = []
    seen: set[str] = set()
    for prompt in prompts:
        for match in tags.in_prompt(prompt):
            if host_syntax is not None and host_syntax(match.text):
                continue
            if match.error is not None:
                raise match.error
            tag = match.tag
            assert tag is not None
            scheduled = is_ours(tag)
            if check is not None:
                check(match.text, tag)
            elif scheduled:
                check_arguments(match.text, tag)
            if scheduled:
                ours.append(tag)
            if not check_names or (match.text in seen):
                continue
            seen.add(match.text)
            path = find_file(tag.name)
            if path is None:
                raise MissingNetworkError(
                    f"{excerpt(match.text, 7)}: no network named {elide(tag.name)!r} in the Lora folders"
                )
            if scheduled and Path(path).suffix.lower() != ".safetensors":
                raise NotSafetensorsError(
                    f"{match.text}: {Path(path).name} is not a .safetensors file; scheduled strengths read only "
                    "safetensors (convert the file, or use a plain <lora:name:weight> tag)"
                )
    return ours


def batch_warning(prompts: Sequence[str | None], tags: TagIndex, used: int = 0) -> str | None:
    """A message when the prompts of one batch ask for different scheduled tags.

    The host activates one prompt's networks for the whole batch (``parse_prompts``: A1111 and
    Forge the first prompt's, SD.Next the last one with any network tag: ``used``, 0-based); so
    do we, and say so.
    """
    if len(prompts) < 2:
        return None

    def key(prompt: str | None) -> tuple[str, ...]:
        return tuple(m.tag.format() for m in tags.in_prompt(prompt) if m.tag is not None and is_ours(m.tag))

    chosen = key(prompts[used])
    differing = [i + 1 for i, prompt in enumerate(prompts) if key(prompt) != chosen]
    if not differing:
        return None
    return (
        f"Scheduled LoRA: prompt(s) {', '.join(map(str, differing))} of this batch ask for other schedules than "
        f"prompt {used + 1} ({' '.join(chosen) or 'none'}); like the host, the whole batch uses prompt "
        f"{used + 1}'s networks"
    )
