"""A terminal progress bar (tqdm, on stderr) for the core's ``progress(label, done, total)`` callbacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def terminal_progress(
    description: str, *, unit: str = "item", enabled: bool = True
) -> Iterator[Callable[[str, int, int], None] | None]:
    """A callback that draws one bar per label (file, pass), or None when disabled."""
    if not enabled:
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
