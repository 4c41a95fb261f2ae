"""Argument types for the numeric command-line options, read with the one number grammar
(:mod:`lib_scheduled_lora.core.numbers`) and checked against bounds before any work starts.

Each function returns a callable for argparse's ``type=``; a bad value becomes one line,
``error: argument --steps: 0 is out of range (1 to 1000)``, and exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lib_scheduled_lora.core.numbers import NumberSyntaxError, read_integer, read_number
from lib_scheduled_lora.errors import elide

# diffusers' schedulers refuse more sampling steps than the model has training timesteps: 1000 for
# every Stable Diffusion model and the demo model. The same bound for ``schedule``, whose rows are
# those steps (and a billion rows would only fill the memory).
MAX_STEPS = 1000
# torch.Generator.manual_seed takes any unsigned 64-bit integer (2**64 overflows).
MAX_SEED = 2**64 - 1
# Image sides: Stable Diffusion's VAE works in 8x8-pixel latents, so a side must be a multiple of
# 8, and 8192 is beyond what any SD model was trained for (and would need tens of GB). The parser
# takes 8 and up, so that the demo model can say it draws 32x32 only; for an SD model ``generate``
# asks for 64 and up (below, the UNet's three downsamplings leave less than one latent pixel).
SIZE_STEP, MAX_SIZE, MIN_IMAGE_SIDE = 8, 8192, 64
# Guidance: the WebUI's slider is 1-30; 0 is the unconditional model; far above 30 the image only
# saturates. Negative guidance is not something these pipelines are meant for.
MAX_CFG = 100.0

Parse = Callable[[str], float]
ParseInt = Callable[[str], int]


def _shown(text: str) -> str:
    return repr(elide(text, 40))


def integer(low: int, high: int) -> ParseInt:
    """A whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = read_integer(text)
        except NumberSyntaxError as exc:
            raise argparse.ArgumentTypeError(f"{_shown(exc.text)} {exc.problem}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{elide(str(value), 40)} is out of range ({low} to {high})")
        return value

    parse.__name__ = "whole number"  # argparse names the type in some of its own messages
    return parse


def number(low: float, high: float) -> Parse:
    """A finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = read_number(text)
        except NumberSyntaxError as exc:
            raise argparse.ArgumentTypeError(f"{_shown(exc.text)} {exc.problem}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{_shown(text.strip())} is out of range ({low:g} to {high:g})")
        return value

    parse.__name__ = "number"
    return parse


def image_side(text: str) -> int:
    """An image width or height: a multiple of 8 pixels up to 8192."""
    value = integer(SIZE_STEP, MAX_SIZE)(text)
    if value % SIZE_STEP:
        raise argparse.ArgumentTypeError(
            f"{value} is not a multiple of {SIZE_STEP} (the VAE's latent pixels are {SIZE_STEP}x{SIZE_STEP}; "
            f"try {max(SIZE_STEP, value - value % SIZE_STEP)} or {value - value % SIZE_STEP + SIZE_STEP})"
        )
    return value


def path(text: str) -> str:
    """A file or folder name: not empty (``''`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


steps = integer(1, MAX_STEPS)
seed = integer(0, MAX_SEED)
cfg = number(0.0, MAX_CFG)
