"""User-facing errors. Each message names what is wrong and where (tag, column, file, key), in one
line of a readable length: long tags, texts and paths are elided in the message (the full values
stay on the exception's attributes).

The command line prints any of these as one line and exits with code 2; the WebUI adapters show
the message in the UI and return it from the API.
"""

from __future__ import annotations

import os

MAX_TAG = 160  # characters of a tag shown in a message (around the column at fault)
MAX_TEXT = 60  # characters of an offending part, of a file name's folder part
MAX_LINE = 300  # characters of a whole error line (the command line's last resort, see one_line)
ELLIPSIS = "…"


def elide(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut in the middle to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head] + ELLIPSIS + text[len(text) - (limit - 1 - head) :]


def excerpt(tag: str, column: int, limit: int = MAX_TAG) -> str:
    """The part of a long ``tag`` around 1-based ``column`` (the column still counts in the full tag)."""
    if len(tag) <= limit:
        return tag
    start = min(max(0, column - 1 - limit // 2), len(tag) - limit)
    shown = tag[start : start + limit]
    return (ELLIPSIS if start > 0 else "") + shown + (ELLIPSIS if start + limit < len(tag) else "")


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as messages show it: a long folder part elided, the file name kept (up to a limit)."""
    text = os.fspath(path)
    if len(text) <= 2 * MAX_TEXT:
        return text
    folder, name = os.path.split(text)
    return elide(folder, MAX_TEXT) + os.sep + elide(name, MAX_TEXT)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` as one line of at most ``limit`` characters (line breaks become spaces; the middle
    of an overlong text is elided). Messages are built short; this only guards the last step."""
    flat = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return elide(flat, limit)


class ScheduledLoraError(Exception):
    """Base class for every error caused by the user's input rather than by a bug."""


class ScheduleSyntaxError(ScheduledLoraError, ValueError):
    """A malformed tag or schedule.

    ``tag`` is the whole tag text (or the schedule text when there is no tag), ``text`` the
    offending part and ``column`` its 1-based column inside ``tag``.
    """

    def __init__(self, tag: str, text: str, column: int, problem: str):
        self.tag, self.text, self.column, self.problem = tag, text, column, problem
        super().__init__(f"{excerpt(tag, column)}: {elide(text)!r} at column {column} {problem}")


class NetworkFileError(ScheduledLoraError):
    """A network file that cannot be read or understood (corrupt, truncated, not a network)."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{path_text(path)}: {problem}")


class ModelFormatError(ScheduledLoraError):
    """A model (checkpoint or diffusers folder) that cannot be read or written."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{path_text(path)}: {problem}")


class MissingNetworkError(ScheduledLoraError):
    """A tag names a network that is not in the network folders."""


class NotSafetensorsError(ScheduledLoraError):
    """A scheduled tag names a network stored in a pickle format (.pt/.ckpt): never unpickled."""


class OutputPathError(ScheduledLoraError):
    """An output (image, merged model) that cannot be written where it was asked for: checked
    before the work starts, and again when writing (a full disk)."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{path_text(path)}: {problem}")


class OptionError(ScheduledLoraError):
    """A command-line option whose value cannot be used (a size the model cannot draw, a range
    that overflows); the parser itself reports malformed values."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option}: {problem}")


class RankRuleError(ScheduledLoraError, ValueError):
    """A rank rule that cannot be applied (``--sv-fro 1.5``); ``what`` names the option and value."""

    def __init__(self, what: str, problem: str):
        self.what, self.problem = what, problem
        super().__init__(f"{what}: {problem}")


class OutputNameError(ScheduledLoraError, ValueError):
    """An output name typed in the UI or sent to the API that would leave its folder."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"output name {elide(name)!r}: {problem}")


class Cancelled(ScheduledLoraError):
    """The user interrupted a long operation; nothing was written."""


class HostLayoutError(ScheduledLoraError):
    """The host's internals are not the ones this adapter knows (a Forge build whose LoRA patcher
    looks different): scheduled tags are refused rather than written the wrong way."""


class UnsupportedModelError(ScheduledLoraError):
    """The loaded model is of a family the name mapping does not cover (Flux, SD3, ... on Forge)."""
