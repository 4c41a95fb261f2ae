"""The prompt tag grammar: ``<lora:NAME:ARGS>`` with schedules (docs/schedule-syntax.md).

The host finds extra-network tags with the regex ``<(\\w+):([^>]+)>`` and splits the arguments on
``:``; the first one is the network name, ``key=value`` items are named, the rest positional
(te, unet, dyn). We keep exactly that split so that whatever the host reads as one argument we
read as one argument, with a single extension: a ``:`` after a schedule piece that ends with a
position continues the schedule (``0@0.3:1``), unless a named argument follows.

A tag is parsed into its four resolved schedules (te, unet, hires te, hires unet). Two tags that
mean the same compare equal, and :meth:`NetworkTag.format` writes the one canonical text for that
meaning (fall-backs are not spelled out). Standard library only, like :mod:`schedule`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lib_scheduled_lora.core.schedule import (
    PIECE_SEPARATOR,
    WHITESPACE,
    Schedule,
    Span,
    parse_pieces,
    piece_ends_with_position,
    split_spans,
)
from lib_scheduled_lora.errors import ScheduleSyntaxError

# The host's own regex (modules/extra_networks.py), so that we see the same tags it does.
TAG_PATTERN = re.compile(r"<(\w+):([^>]+)>")
KINDS = ("lora", "lyco", "loractl")
SCHEDULE_KEYS = ("te", "unet", "hr", "hrte", "hrunet")
NAMED_KEYS = (*SCHEDULE_KEYS, "dyn")
# dyn is a rank limit; more digits than this is a typo, and would also hit Python's limit on
# int() of very long strings.
_MAX_DYN_DIGITS = 9
_DIGITS = re.compile(r"[0-9]+", re.ASCII)

ONE = Schedule.constant(1.0)


@dataclass(frozen=True, repr=False)
class NetworkTag:
    """One parsed network tag, with every fall-back resolved.

    ``te``/``unet`` are the first pass's schedules, ``hrte``/``hrunet`` the hires pass's.
    ``passthrough`` holds the named arguments we do not know (``lbw=``, ``start=``, ...), verbatim
    and in order, for the host and other extensions. Use :meth:`create` to build one with the
    doc's fall-backs, and :meth:`replace` / :meth:`with_schedules` to derive a modified tag.
    """

    kind: str
    name: str
    te: Schedule
    unet: Schedule
    hrte: Schedule
    hrunet: Schedule
    dyn: int | None = None
    passthrough: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "passthrough", tuple((str(k), str(v)) for k, v in self.passthrough))
        # Only what the canonical text can carry, so that format() and parse_tag() stay inverse.
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not _valid_name(self.name):
            raise ValueError(f"not a network name that a tag can carry: {self.name!r}")
        for schedule in (self.te, self.unet, self.hrte, self.hrunet):
            if not isinstance(schedule, Schedule):
                raise ValueError(f"expected a Schedule, got {schedule!r}")
        if self.dyn is not None and (isinstance(self.dyn, bool) or not isinstance(self.dyn, int) or self.dyn < 0):
            raise ValueError(f"dyn must be a non-negative integer or None, got {self.dyn!r}")
        for key, value in self.passthrough:
            if not _valid_passthrough(key, value):
                raise ValueError(f"not a pass-through argument that a tag can carry: {key!r}={value!r}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        kind: str = "lora",
        te: Schedule | None = None,
        unet: Schedule | None = None,
        hr: Schedule | None = None,
        hrte: Schedule | None = None,
        hrunet: Schedule | None = None,
        dyn: int | None = None,
        passthrough: tuple[tuple[str, str], ...] = (),
    ) -> NetworkTag:
        """A tag from the arguments as one would write them; missing ones fall back as the doc
        says (te = 1; unet -> te; hrte -> hr -> te; hrunet -> hr -> unet)."""
        te = ONE if te is None else te
        unet = te if unet is None else unet
        hrte = hrte if hrte is not None else hr if hr is not None else te
        hrunet = hrunet if hrunet is not None else hr if hr is not None else unet
        return cls(kind, name, te, unet, hrte, hrunet, dyn, tuple(passthrough))

    def with_schedules(self, **changes: Schedule) -> NetworkTag:
        """A copy with some of ``te``, ``unet``, ``hr``, ``hrte``, ``hrunet`` replaced.

        A schedule that equalled its fall-back keeps following it: changing ``te`` of
        ``<lora:x:0.5>`` also changes unet and the hires schedules, while an explicit unet stays.
        ``hr`` sets both hires schedules (unless they are given too).
        """
        unknown = set(changes) - set(SCHEDULE_KEYS)
        if unknown:
            raise TypeError(f"unknown schedule argument(s): {sorted(unknown)}")
        te = changes.get("te", self.te)
        unet = changes.get("unet", te if self.unet == self.te else self.unet)
        hr = changes.get("hr")
        hrte = changes.get("hrte", hr if hr is not None else te if self.hrte == self.te else self.hrte)
        hrunet = changes.get("hrunet", hr if hr is not None else unet if self.hrunet == self.unet else self.hrunet)
        return dataclasses.replace(self, te=te, unet=unet, hrte=hrte, hrunet=hrunet)

    def replace(self, **changes: Any) -> NetworkTag:
        """Like ``dataclasses.replace``, but schedule keys (including ``hr``) go through
        :meth:`with_schedules` so that fall-backs keep following."""
        schedules = {k: changes.pop(k) for k in SCHEDULE_KEYS if k in changes}
        tag = dataclasses.replace(self, **changes) if changes else self
        return tag.with_schedules(**schedules) if schedules else tag

    def scaled(self, factor: float) -> NetworkTag:
        """Every multiplier of every pass multiplied by ``factor`` (a strength axis)."""
        return dataclasses.replace(
            self,
            te=self.te.scaled(factor), unet=self.unet.scaled(factor),
            hrte=self.hrte.scaled(factor), hrunet=self.hrunet.scaled(factor),
        )

    # -- queries --------------------------------------------------------------------------------

    def schedules(self, hires: bool) -> tuple[Schedule, Schedule]:
        """(te, unet) for the first pass, or for the hires pass when ``hires``."""
        return (self.hrte, self.hrunet) if hires else (self.te, self.unet)

    # -- text ---------------------------------------------------------------------------------

    def format(self) -> str:
        """The canonical tag text, which parses back to an equal tag.

        te is always written (positional, as the host reads it); unet only when it differs from
        te, positionally after a te that ends with a plain value, otherwise both as ``te=``/
        ``unet=`` (a positional unet would read as the next piece of te). Hires schedules are
        written only where they differ from their fall-back, as one ``hr=`` when both differ in
        the same way. ``dyn=`` is always named; pass-through arguments come last, verbatim.
        """
        args = [self.name]
        te_text, unet_text = self.te.format(), self.unet.format()
        if self.unet == self.te:
            args.append(te_text)
        elif not self.te.ends_with_position:
            args += [te_text, unet_text]
        else:
            args += [f"te={te_text}", f"unet={unet_text}"]
        hrte_differs, hrunet_differs = self.hrte != self.te, self.hrunet != self.unet
        if hrte_differs and hrunet_differs and self.hrte == self.hrunet:
            args.append(f"hr={self.hrte.format()}")
        else:
            if hrte_differs:
                args.append(f"hrte={self.hrte.format()}")
            if hrunet_differs:
                args.append(f"hrunet={self.hrunet.format()}")
        if self.dyn is not None:
            args.append(f"dyn={self.dyn}")
        args += [f"{key}={value}" for key, value in self.passthrough]
        return f"<{self.kind}:{':'.join(args)}>"

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"NetworkTag({self.format()!r})"  # lossless: format() parses back to an equal tag


@dataclass(frozen=True)
class TagMatch:
    """A network tag found in a prompt: its span ``prompt[start:end] == text``, and either the
    parsed ``tag`` or the ``error`` (columns in the error count inside ``text``)."""

    start: int
    end: int
    text: str
    tag: NetworkTag | None = None
    error: ScheduleSyntaxError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- parsing ----------------------------------------------------------------------------------


def parse_tag(text: str) -> NetworkTag:
    """Parse one whole tag such as ``<lora:wday:0@0.3:1>``.

    Raises ScheduleSyntaxError naming the tag, the offending text and its 1-based column.
    """
    match = TAG_PATTERN.fullmatch(text)
    if match is None:
        raise ScheduleSyntaxError(text, text, 1, "is not a network tag of the form <lora:NAME:...>")
    kind = match.group(1)
    if kind not in KINDS:
        raise ScheduleSyntaxError(text, kind, 2, f"is not a LoRA tag kind ({', '.join(KINDS)})")
    segments = split_spans(match.group(2), PIECE_SEPARATOR, match.start(2))
    name = _parse_name(text, segments[0])
    return _parse_arguments(text, kind, name, segments[1:])


def _parse_name(tag: str, segment: Span) -> str:
    name, index = segment
    if not name.strip(WHITESPACE):
        raise ScheduleSyntaxError(tag, PIECE_SEPARATOR, index, "is not followed by a network name")
    if "=" in name:
        # The host would read it as a named argument and take the next item as the name.
        raise ScheduleSyntaxError(tag, name, index + 1, "is a named argument where the network name should be")
    return name  # verbatim: the host does not strip names either


def _parse_arguments(tag: str, kind: str, name: str, segments: list[Span]) -> NetworkTag:
    positional: list[Schedule] = []
    positional_dyn: int | None = None
    named: dict[str, Any] = {}
    passthrough: list[tuple[str, str]] = []
    i = 0
    while i < len(segments):
        segment, index = segments[i]
        if not segment.strip(WHITESPACE):
            raise _empty_argument_error(tag, index, last=i == len(segments) - 1)
        if "=" in segment:
            key, _, value = segment.partition("=")
            value_index = index + len(key) + 1
            if key in NAMED_KEYS:
                if key in named:
                    raise ScheduleSyntaxError(tag, segment, index + 1, f"repeats the argument {key}=")
                if not value.strip(WHITESPACE):
                    raise ScheduleSyntaxError(tag, segment, index + 1, f"has no value after '{key}='")
                if key == "dyn":
                    named[key] = _parse_dyn(tag, value, value_index, "dyn")
                    i += 1
                else:
                    group, i = _take_schedule(segments, i, (value, value_index))
                    named[key] = parse_pieces(group, tag=tag)
            elif not key.strip(WHITESPACE):
                raise ScheduleSyntaxError(tag, segment, index + 1, "has no argument name before '='")
            else:
                passthrough.append((key, value))  # not ours: kept verbatim for the host
                i += 1
            continue
        count = len(positional) + (positional_dyn is not None)
        if count < 2:
            group, i = _take_schedule(segments, i, (segment, index))
            positional.append(parse_pieces(group, tag=tag))
        elif count == 2:
            positional_dyn = _parse_dyn(tag, segment, index, "the third positional argument, dyn")
            i += 1
        else:
            raise ScheduleSyntaxError(
                tag, segment.strip(WHITESPACE), _first_non_space(segment, index) + 1,
                "is a fourth positional argument (the positional arguments are te, unet, dyn)",
            )
    # Named arguments override positional ones, as in the host.
    te = named.get("te", positional[0] if positional else None)
    unet = named.get("unet", positional[1] if len(positional) > 1 else None)
    return NetworkTag.create(
        name, kind=kind, te=te, unet=unet, hr=named.get("hr"), hrte=named.get("hrte"), hrunet=named.get("hrunet"),
        dyn=named.get("dyn", positional_dyn), passthrough=tuple(passthrough),
    )


def _take_schedule(segments: list[Span], i: int, first: Span) -> tuple[list[Span], int]:
    """The ``:``-separated pieces of the schedule starting at segment ``i``, and the index after.

    A piece continues into the next segment when it ends with a position and the next segment
    is not a named argument; anything malformed is left to the schedule parser to report.
    """
    group = [first]
    i += 1
    while i < len(segments) and piece_ends_with_position(group[-1][0]) and "=" not in segments[i][0]:
        group.append(segments[i])
        i += 1
    return group, i


def _parse_dyn(tag: str, text: str, index: int, what: str) -> int:
    stripped = text.strip(WHITESPACE)
    column = _first_non_space(text, index) + 1
    if not _DIGITS.fullmatch(stripped):
        raise ScheduleSyntaxError(tag, stripped, column, f"is not a non-negative integer ({what})")
    if len(stripped) > _MAX_DYN_DIGITS:
        raise ScheduleSyntaxError(tag, stripped, column, f"is too large ({what} is a rank limit)")
    return int(stripped)


def _empty_argument_error(tag: str, index: int, *, last: bool) -> ScheduleSyntaxError:
    problem = "is not followed by anything" if last else "is followed by an empty argument"
    return ScheduleSyntaxError(tag, PIECE_SEPARATOR, index, problem)


def _first_non_space(text: str, index: int) -> int:
    return index + len(text) - len(text.lstrip(WHITESPACE))


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name.strip(WHITESPACE)) and not any(ch in name for ch in ":>=")


def _valid_passthrough(key: str, value: str) -> bool:
    return (
        bool(key.strip(WHITESPACE)) and key not in NAMED_KEYS
        and not any(ch in key for ch in ":>=") and not any(ch in value for ch in ":>")
    )


# -- prompts ----------------------------------------------------------------------------------


def find_tags(prompt: str) -> list[TagMatch]:
    """Every lora/lyco/loractl tag in ``prompt``, parsed or with its error; never raises on
    malformed tags. Other extra networks (``<hypernet:...>``) are not ours and are skipped."""
    matches = []
    for m in TAG_PATTERN.finditer(prompt):
        if m.group(1) not in KINDS:
            continue
        try:
            matches.append(TagMatch(m.start(), m.end(), m.group(0), tag=parse_tag(m.group(0))))
        except ScheduleSyntaxError as exc:
            matches.append(TagMatch(m.start(), m.end(), m.group(0), error=exc))
    return matches


def tags_in_prompt(prompt: str) -> list[tuple[str, NetworkTag]]:
    """(tag text, parsed tag) for every tag of ``prompt`` in order; raises the first malformed
    tag's error, so that a generation never starts with a half-understood schedule."""
    out = []
    for match in find_tags(prompt):
        if match.error is not None:
            raise match.error
        assert match.tag is not None
        out.append((match.text, match.tag))
    return out


def replace_tag(prompt: str, match: TagMatch, new_tag: NetworkTag | str) -> str:
    """``prompt`` with the tag at ``match`` replaced by ``new_tag`` (its canonical text).

    Raises ValueError when ``match`` does not describe ``prompt`` (found in another prompt, or
    the prompt changed since); to replace several tags use :func:`map_tags`.
    """
    if prompt[match.start:match.end] != match.text:
        raise ValueError(f"{match.text!r} is not at {match.start}:{match.end} of the prompt")
    return prompt[:match.start] + str(new_tag) + prompt[match.end:]


def map_tags(prompt: str, fn: Callable[[TagMatch], NetworkTag | str | None]) -> str:
    """``prompt`` with every tag replaced by ``fn(match)`` (None keeps the tag as written).

    Works from the end so that earlier spans stay valid.
    """
    for match in reversed(find_tags(prompt)):
        replacement = fn(match)
        if replacement is not None:
            prompt = replace_tag(prompt, match, replacement)
    return prompt
