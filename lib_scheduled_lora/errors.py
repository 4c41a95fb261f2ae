"""User-facing errors. Each message names what is wrong and where (tag, column, file, key).

The command line prints any of these as one line and exits with code 2; the WebUI adapters show
the message in the UI and return it from the API.
"""

from __future__ import annotations


class ScheduledLoraError(Exception):
    """Base class for every error caused by the user's input rather than by a bug."""


class ScheduleSyntaxError(ScheduledLoraError, ValueError):
    """A malformed tag or schedule.

    ``tag`` is the whole tag text (or the schedule text when there is no tag), ``text`` the
    offending part and ``column`` its 1-based column inside ``tag``.
    """

    def __init__(self, tag: str, text: str, column: int, problem: str):
        self.tag, self.text, self.column, self.problem = tag, text, column, problem
        super().__init__(f"{tag}: {text!r} at column {column} {problem}")


class NetworkFileError(ScheduledLoraError):
    """A network file that cannot be read or understood (corrupt, truncated, not a network)."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class ModelFormatError(ScheduledLoraError):
    """A model (checkpoint or diffusers folder) that cannot be read or written."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class MissingNetworkError(ScheduledLoraError):
    """A tag names a network that is not in the network folders."""


class NotSafetensorsError(ScheduledLoraError):
    """A scheduled tag names a network stored in a pickle format (.pt/.ckpt): never unpickled."""
