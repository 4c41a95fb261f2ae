"""A terminal progress bar (tqdm, on stderr) for the core's ``progress(label, done, total)`` callbacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


def show_progress(quiet: bool = False) -> bool:
    """Progress bars go to stderr, and only when it is a terminal: piped or captured output (a
    script, the tests) stays free of carriage-return lines."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def terminal_progress(
    description: str, *, unit: str = "item", enabled: bool = True
) -> Iterator[Callable[[str, int, int], None] | None]:
    """A callback that draws one bar per label (file, pass), or None when disabled or when stderr
    is not a terminal (:func:`show_progress`)."""
    if not show_progress(not enabled):
        yield None
        return
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def report(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=f"{description} {label}".strip(), unit=unit, leave=False)
        bar.n = done
        bar.refresh()

    try:
        yield report
    finally:
        for bar in bars.values():
            bar.close()
