"""The toy world: 64x64 pictures of one shape on a background, each with a plain-English caption and exact labels.

A scene is one shape (circle, square, triangle, star, cross) of one colour and size, at one of five positions, on a
plain, striped or checkered background of one colour. Its caption says so in a fixed word order, e.g.
"a small red star on a striped blue background, bottom left"; captions may leave attributes out, so that a prompt
such as "a star" or "a red star on a green background" is in the language the model learns.

Everything is a pure function of (seed, index): `scene(seed, i)` is the same scene on every machine, and `render`
draws it with Pillow alone. Beyond the base world, the "wide" world adds shapes, colours and object textures the base
model never sees (a heart, a diamond, a ring; orange, cyan, pink; striped, dotted and two-tone objects): the VAE and
the evaluator are trained on it, as a real VAE and a real image encoder have seen far more than one captioned set,
and the DreamBooth subjects come from it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 3  # drawn at 192 px, then box-filtered down: smooth edges, identical on every machine

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (225, 40, 40),
    "yellow": (245, 215, 35),
    "green": (45, 190, 70),
    "blue": (55, 105, 240),
    "purple": (155, 65, 215),
    "white": (240, 240, 240),
}
# Darker shades: a "blue background" is not the blue of a blue shape, so object and background stay apart.
BACKGROUNDS = {
    "black": (22, 22, 26),
    "gray": (115, 115, 122),
    "blue": (28, 48, 118),
    "green": (28, 92, 48),
    "red": (118, 28, 34),
}
PATTERNS = ("plain", "striped", "checkered")
SIZES = {"small": 9.0, "large": 15.0}  # radius in pixels
POSITIONS = {
    "top left": (20, 20),
    "top right": (44, 20),
    "bottom left": (20, 44),
    "bottom right": (44, 44),
    "center": (32, 32),
}
_JITTER = 3.0  # pixels, on the position and (a third of it) on the radius

# Only in the wide world (VAE and evaluator training, DreamBooth subjects); no base caption ever names them.
EXTRA_SHAPES = ("heart", "diamond", "ring")
EXTRA_COLOURS = {"orange": (250, 140, 20), "cyan": (40, 220, 230), "pink": (250, 130, 200)}
TEXTURES = ("plain", "striped", "dotted", "two-tone")  # of the object; the base world's objects are all plain

ALL_SHAPES = SHAPES + EXTRA_SHAPES
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}

# Words the tokenizer must know: every caption word, the generic noun "shape", and rare words for new subjects.
TRIGGER_WORDS = ("sks", "zwx", "ohwx", "qwe")
VOCABULARY = sorted(
    {"a", "an", "on", "background", "shape", "with", "spots", "stripes", *TRIGGER_WORDS}
    | set(ALL_SHAPES) | set(ALL_COLOURS) | set(BACKGROUNDS) | set(PATTERNS) | set(SIZES)
    | {w for p in POSITIONS for w in p.split()} | {w for t in TEXTURES for w in t.split("-")}
)


@dataclass(frozen=True)
class Scene:
    """Labels and exact geometry of one picture. `texture_colour` is the second colour of a textured object."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    pattern: str
    cx: float
    cy: float
    radius: float
    texture: str = "plain"
    texture_colour: str | None = None

    def labels(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in LABELS}


# What the evaluator predicts, and the classes of each.
LABELS = {
    "shape": ALL_SHAPES,
    "colour": tuple(ALL_COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "pattern": PATTERNS,
    "texture": TEXTURES,
}


def _rng(seed: int, index: int, stream: str) -> random.Random:
    return random.Random(f"lens-toy:{stream}:{seed}:{index}")


def _place(rng: random.Random, size: str, position: str) -> tuple[float, float, float]:
    x, y = POSITIONS[position]
    return (x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER),
            SIZES[size] + rng.uniform(-_JITTER / 3, _JITTER / 3))


def scene(seed: int, index: int, wide: bool = False) -> Scene:
    """Scene `index` of the world with `seed`; `wide` draws from the wide world (new shapes, colours, textures)."""
    rng = _rng(seed, index, "wide" if wide else "base")
    shape = rng.choice(ALL_SHAPES if wide else SHAPES)
    colours = ALL_COLOURS if wide else COLOURS
    colour = rng.choice(list(colours))
    size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    background = rng.choice([b for b in BACKGROUNDS if b != colour])  # never a blue shape on a blue background
    pattern = rng.choice(PATTERNS)
    texture, texture_colour = "plain", None
    if wide and rng.random() < 0.5:
        texture = rng.choice(TEXTURES[1:])
        texture_colour = rng.choice([c for c in ALL_COLOURS if c != colour])
    return Scene(shape, colour, size, position, background, pattern, *_place(rng, size, position), texture, texture_colour)


def moved(base: Scene, seed: int, index: int, **fixed) -> Scene:
    """`base` (a subject's look: shape, colours, texture) in scene `index`'s setting, with `fixed` attributes kept.

    Size, position, background and pattern come from the scene unless given in `fixed`.
    """
    other = scene(seed, index)
    setting = {k: fixed.get(k, getattr(other, k)) for k in ("size", "position", "background", "pattern")}
    if setting["background"] == base.colour:
        setting["background"] = next(b for b in BACKGROUNDS if b != base.colour)
    rng = _rng(seed, index, "moved")
    return replace(base, **setting, **dict(zip(("cx", "cy", "radius"), _place(rng, setting["size"], setting["position"]))))


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------
def caption(s: Scene, keep: dict[str, bool] | None = None, subject: str | None = None) -> str:
    """The scene in words, in the world's fixed order: article, size, colour, shape, background phrase, position.

    `keep` switches attributes off (missing keys: on): size, colour, shape (off: the generic noun "shape"),
    pattern, background, position. `subject` (e.g. "sks") takes the colour's place and stands for the object's look.
    """
    keep = keep or {}
    words = []
    if keep.get("size", True):
        words.append(s.size)
    if subject:
        words.append(subject)
    elif keep.get("colour", True):
        words.append(s.colour)
    words.append(s.shape if keep.get("shape", True) else "shape")
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    setting = [w for w, on in ((s.pattern, keep.get("pattern", True)), (s.background, keep.get("background", True))) if on]
    if setting:
        text += " on a " + " ".join(setting) + " background"
    if keep.get("position", True):
        text += ", " + s.position
    return text


# Chance that a training caption leaves an attribute out (the shape: is called just "shape").
# High enough that short prompts such as "a star" or "a red star on a green background" are common.
DROP = {"size": 0.5, "colour": 0.35, "shape": 0.1, "pattern": 0.5, "background": 0.4, "position": 0.5}


def caption_variants(s: Scene, seed: int, index: int) -> tuple[str, str]:
    """Two training captions of a scene: the full one, and one with attributes left out at random (`DROP`)."""
    rng = _rng(seed, index, "caption")
    return caption(s), caption(s, {name: rng.random() >= p for name, p in DROP.items()})


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
def _tint(rgb: tuple[int, int, int], amount: float = 0.3) -> tuple[int, int, int]:
    return tuple(round(c + (255 - c) * amount) for c in rgb)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> Image.Image:
    """A white-on-black mask of the shape at `size` pixels (coordinates are already scaled)."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        h = r * 0.85
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=255)
    elif shape == "star":
        d.polygon(_star(cx, cy, r * 1.1), fill=255)
    elif shape == "cross":
        w = r * 0.36
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    elif shape == "heart":
        lobe = r * 0.52
        d.ellipse([cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], fill=255)
        d.ellipse([cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=255)
        d.polygon([(cx - 1.96 * lobe, cy - r * 0.1), (cx + 1.96 * lobe, cy - r * 0.1), (cx, cy + r)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")
    return mask


def _pattern_image(first, second, pattern: str, size: int, period: int, origin: tuple[int, int] = (0, 0)) -> Image.Image:
    """`first` everywhere, with `second` in vertical stripes, checks or dots (period in scaled pixels), aligned so
    that a stripe or a dot starts at `origin`."""
    image = Image.new("RGB", (size, size), first)
    d = ImageDraw.Draw(image)
    half = period // 2
    ox, oy = origin[0] % period, origin[1] % period
    if pattern == "striped":
        for x in range(ox - period, size, period):
            d.rectangle([x, 0, x + half - 1, size], fill=second)
    elif pattern == "checkered":
        for y in range(0, size, half):
            for x in range((y // half) % 2 * half, size, period):
                d.rectangle([x, y, x + half - 1, y + half - 1], fill=second)
    elif pattern == "dotted":  # a staggered grid of dots
        r = period * 0.28
        for row, y in enumerate(range(oy - period, size + period, period)):
            for x in range(ox - period + row % 2 * half, size + period, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=second)
    return image


def render(s: Scene, with_mask: bool = False) -> Image.Image | tuple[Image.Image, Image.Image]:
    """The scene as a 64x64 RGB image; `with_mask` also returns the object's coverage (L, 255 = object)."""
    k = _SUPERSAMPLE
    size = IMAGE_SIZE * k
    bg = BACKGROUNDS[s.background]
    canvas = _pattern_image(bg, _tint(bg), s.pattern, size, 16 * k)
    mask = _shape_mask(s.shape, s.cx * k, s.cy * k, s.radius * k, size)
    colour = ALL_COLOURS[s.colour]
    second = ALL_COLOURS[s.texture_colour] if s.texture_colour else colour
    corner = (round((s.cx - s.radius) * k), round((s.cy - s.radius) * k))  # textures start at the object's corner
    if s.texture == "striped":  # horizontal, unlike the backgrounds' vertical stripes
        fill = _pattern_image(colour, second, "striped", size, 8 * k, corner[::-1]).transpose(Image.Transpose.TRANSPOSE)
    elif s.texture == "dotted":
        fill = _pattern_image(colour, second, "dotted", size, 8 * k, (corner[0] + 4 * k, corner[1] + 4 * k))
    elif s.texture == "two-tone":  # upper half one colour, lower half the other
        fill = Image.new("RGB", (size, size), colour)
        ImageDraw.Draw(fill).rectangle([0, round(s.cy * k), size, size], fill=second)
    else:
        fill = Image.new("RGB", (size, size), colour)
    canvas.paste(fill, (0, 0), mask)
    return (canvas.reduce(k), mask.reduce(k)) if with_mask else canvas.reduce(k)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Images -> uint8 array [N, 64, 64, 3]."""
    return np.stack([np.asarray(im, dtype=np.uint8) for im in images])
