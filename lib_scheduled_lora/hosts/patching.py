"""Per-instance wrappers of a host's methods, shared by the WebUI adapters.

A WebUI hands scripts its processing object ``p`` and calls methods on it later (``p.init``, the
conditioning cache, ...). An adapter that must run code around such a call sets an instance
attribute that wraps the class's method. XYZ-grid cells are shallow copies of ``p``: their
``__dict__`` carries the wrapper made for the original, bound to the original. Every wrapper is
therefore marked with the method it wraps, so that the copy's own wrapper replaces it instead of
stacking on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ORIGINAL_ATTR = "_scheduled_lora_original"


def unwrapped(method: Any) -> Any:
    """The method under our wrapper (the method itself when it is not ours)."""
    return getattr(method, ORIGINAL_ATTR, method)


def set_wrapper(p: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Install ``make(original)`` as ``p.<name>``. ``original`` is the class's method bound to
    this ``p`` (or another extension's wrapper); our own wrapper from a copied ``p`` (XYZ cells
    are shallow copies) is replaced, never stacked."""
    current = p.__dict__.get(name)
    if current is None or getattr(current, ORIGINAL_ATTR, None) is not None:
        original = getattr(type(p), name).__get__(p, type(p))
    else:
        original = current
    wrapper = make(original)
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(p, name, wrapper)
