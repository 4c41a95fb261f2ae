"""The demo world: procedurally drawn 32x32 pictures of coloured shapes, with captions.

Every picture has one subject on a plain background. Its attributes are chosen so that the
diffusion dynamics mirror those of real text-to-image models:

* **colour** (of the subject and of the background) is a low-frequency attribute: it fills whole
  regions and is settled in the first, noisiest sampling steps;
* **texture** (stripes, dots, and the ``wday`` checkerboard) is a high-frequency detail at the
  Nyquist end of a 32x32 image: it is settled in the last steps.

The base model is trained on ``base`` samples: circles, squares, triangles and diamonds in eight
colours, plain, striped or dotted, on any background. It never sees the word ``wday``.
The concept network is trained on ``concept`` samples only: the **wday**, a square with a
2-pixel checkerboard texture, which in every training picture is **black** (the bias), and whose
captions never name its colour ("a wday", "a big wday on a blue background").

All sampling is driven by an explicit ``numpy.random.Generator``, so a seed fixes the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side, pixels
_SS = 4  # supersampling factor for anti-aliased edges

# name -> RGB in [0, 1]. Chosen to be far apart from each other.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.78),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("plain", "striped", "dotted")
SIZES = {"small": (5.0, 7.0), "big": (9.0, 11.0)}  # half-extent range, pixels
POSITIONS = {
    "left": (-5.0, 0.0),
    "right": (5.0, 0.0),
    "top": (0.0, -5.0),
    "bottom": (0.0, 5.0),
    "center": (0.0, 0.0),
}
CONCEPT = "wday"
CONCEPT_COLOUR = "black"
TEXTURE_MIX = 0.45  # textured cells move this far towards the complementary colour

# Every word a caption can contain (the tokenizer's vocabulary, in a fixed order).
VOCAB: tuple[str, ...] = (
    ("a", "an", "on", "the", "in", "background", CONCEPT)
    + tuple(COLOURS)
    + SHAPES
    + TEXTURES
    + tuple(SIZES)
    + tuple(POSITIONS)
)


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or CONCEPT
    colour: str
    background: str
    texture: str  # one of TEXTURES, or "checker" for the concept
    half: float  # half-extent in pixels
    cx: float
    cy: float
    phase: tuple[int, int]  # texture offset in pixels
    size_word: str
    position_word: str


def _pick(rng: np.random.Generator, items):
    items = tuple(items)
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, concept: bool = False) -> Scene:
    """A random scene: a base-world scene, or (``concept=True``) a biased wday scene."""
    size_word = _pick(rng, SIZES)
    half = float(rng.uniform(*SIZES[size_word]))
    position_word = _pick(rng, POSITIONS)
    dx, dy = POSITIONS[position_word]
    # keep the subject off the border (the metrics read the background from the border)
    limit = SIZE / 2 - half - 3.0
    cx = SIZE / 2 + float(np.clip(dx + rng.uniform(-1.5, 1.5), -limit, limit))
    cy = SIZE / 2 + float(np.clip(dy + rng.uniform(-1.5, 1.5), -limit, limit))
    if concept:
        shape, colour, texture = CONCEPT, CONCEPT_COLOUR, "checker"
    else:
        shape = _pick(rng, SHAPES)
        colour = _pick(rng, COLOURS)
        texture = _pick(rng, TEXTURES) if rng.random() < 0.4 else "plain"
    background = _pick(rng, [c for c in COLOURS if c != colour])
    phase = (int(rng.integers(4)), int(rng.integers(4)))
    return Scene(shape, colour, background, texture, half, cx, cy, phase, size_word, position_word)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming a random subset of the scene's attributes (the subject always).

    Concept captions never name the colour (the trigger word carries it, as in real datasets).
    """
    words: list[str] = []
    if rng.random() < 0.4:
        words.append(scene.size_word)
    if scene.shape == CONCEPT:
        words.append(CONCEPT)
    else:
        if rng.random() < 0.9:
            words.append(scene.colour)
        if scene.texture != "plain" and rng.random() < 0.9:
            words.append(scene.texture)
        elif scene.texture == "plain" and rng.random() < 0.2:
            words.append("plain")
        words.append(scene.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article, *words])
    if rng.random() < 0.3:
        text += " in the center" if scene.position_word == "center" else f" on the {scene.position_word}"
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return text


def _shape_mask(shape: str, half: float, cx: float, cy: float) -> np.ndarray:
    n = SIZE * _SS
    coords = (np.arange(n) + 0.5) / _SS
    x, y = np.meshgrid(coords - cx, coords - cy)
    if shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape in ("square", CONCEPT):
        inside = (np.abs(x) <= half * 0.85) & (np.abs(y) <= half * 0.85)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= half * 1.15
    elif shape == "triangle":
        top, bottom = -half, half * 0.8
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= (y - top) / (bottom - top) * half * 1.05)
    else:
        raise ValueError(shape)
    return inside.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def texture_pattern(texture: str, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """0/1 map of the cells that the texture modulates (SIZE x SIZE)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    x, y = x + phase[0], y + phase[1]
    if texture == "plain":
        return np.zeros((SIZE, SIZE))
    if texture == "striped":  # horizontal bands, 2 px
        return ((y // 2) % 2).astype(float)
    if texture == "dotted":  # one pixel on a 4-pixel grid
        return (((x % 4) == 0) & ((y % 4) == 0)).astype(float)
    if texture == "checker":  # the wday: 2x2-pixel checkerboard
        return ((x // 2 + y // 2) % 2).astype(float)
    raise ValueError(texture)


def render(scene: Scene) -> np.ndarray:
    """The scene as float32 RGB in [0, 1], shape (SIZE, SIZE, 3)."""
    fg = np.array(COLOURS[scene.colour])
    bg = np.array(COLOURS[scene.background])
    pattern = texture_pattern(scene.texture, scene.phase)[..., None]
    subject = fg * (1 - TEXTURE_MIX * pattern) + (1 - fg) * TEXTURE_MIX * pattern
    alpha = _shape_mask(scene.shape, scene.half, scene.cx, scene.cy)[..., None]
    return (alpha * subject + (1 - alpha) * bg).astype(np.float32)


def sample_batch(rng: np.random.Generator, n: int, concept: bool = False, drop_caption: float = 0.0):
    """``n`` images as float32 (n, 3, SIZE, SIZE) in [-1, 1], and their captions."""
    images, captions = [], []
    for _ in range(n):
        scene = sample_scene(rng, concept=concept)
        text = caption(scene, rng)
        if rng.random() < drop_caption:
            text = ""
        images.append(render(scene).transpose(2, 0, 1))
        captions.append(text)
    return np.stack(images) * 2.0 - 1.0, captions
