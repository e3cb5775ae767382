"""The synthetic domains: how each one draws an image and writes its captions.

Four domains with their own vocabularies (geometric shapes, rendered glyphs,
textures, procedural scenes), three caption styles each (descriptive, terse
alt-text, noisy web filename). Captions of shapes and glyphs do not name
colours, and those of textures only in the descriptive style: when captions
named them, colour alone told a batch's captions apart, and a small model
learnt colours and never the shapes and digits the tasks ask for (16k pairs
x 12 epochs: the ten digit names' text embeddings at cosine 0.9-0.99 to each
other, digits at chance). Shapes are mostly one to a picture and large, glyphs
large, bold and little turned (generator v5): with v4's smaller, two-or-three
shapes and thinner glyphs a tiny CLIP's validation top-1 after 64k samples was
21% on digits and 31% on shapes, with v5 32% and 56% (16k pairs x 4 epochs,
no patch dropout, the val split; chosen there, never on the test tasks). Each `make_*` takes a seeded generator, the
image size and optionally the label to draw, and returns one `Drawn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "pink": (240, 130, 190),
}
COUNT_WORDS = ["one", "two", "three", "four"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = list("ABCDEFGHKMRSTXYZ")
PATTERNS = ["stripes", "checkerboard", "polka dots", "zigzag", "grid", "speckles"]
SCENES = ["beach", "forest", "mountains", "night sky", "desert", "city skyline"]


@dataclass(frozen=True)
class Drawn:
    """One generated sample before encoding: image, true caption, labels."""

    image: Image.Image
    caption: str
    domain: str
    label: str
    style: str


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _other_color(rng, avoid: str) -> str:
    return _pick(rng, [c for c in COLORS if c != avoid])


def _luminance(colour: tuple[int, int, int]) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting_color(rng, fg: str, min_difference: float = 80.0) -> str:
    """A background a glyph in `fg` is readable on: luminance at least `min_difference` apart
    (a yellow digit on a pink sign was a blur to a 64-pixel model)."""
    return _pick(rng, [c for c in COLORS if abs(_luminance(COLORS[c]) - _luminance(COLORS[fg])) >= min_difference])


def _style(rng) -> str:
    return _pick(rng, ["descriptive", "descriptive", "terse", "noisy"])


def finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Every drawn image's own colour cast, brightness and sensor noise.

    Why: with only the drawn parameters, two images of a class were often the
    same picture (a scene is a gradient and a few objects), so held-out images
    repeated training ones and a task measured recall. Per-channel gains of
    +-12%, a brightness offset of +-12 and Gaussian noise (sigma up to 5) make
    every image new while a class stays recognisable (and its colour names
    true).
    """
    pixels = np.asarray(img, dtype=np.float32)
    gains = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    offset = np.float32(rng.uniform(-12, 12))
    sigma = np.float32(rng.uniform(0, 5))
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
    return Image.fromarray(np.clip(pixels * gains + offset + noise, 0, 255).astype(np.uint8), "RGB")


def _noise_tag(rng) -> str:
    return f"{_pick(rng, ['IMG', 'DSC', 'photo', 'image', 'pic'])}_{int(rng.integers(1000, 9999))}"


# ---------------------------------------------------------------- shapes
def _polygon(cx, cy, r, sides, rotation=0.0):
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * i / sides),
         cy + r * math.sin(rotation + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _star(cx, cy, r, tilt: float = 0.0):
    points = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + math.pi * i / 5 + tilt
        points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return points


def _draw_shape(draw, shape, cx, cy, r, fill, tilt: float = 0.0):
    """One shape of radius r at (cx, cy), turned by `tilt` radians (a few degrees: still that shape)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * math.sqrt(2), 4, math.pi / 4 + tilt), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2 + tilt), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r, tilt), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, tilt), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, tilt), fill=fill)


def make_shapes(rng, size: int, label: str | None = None) -> Drawn:
    shape = label or _pick(rng, SHAPES)
    color = _pick(rng, list(COLORS))
    count = 1 if rng.random() < 0.75 else 2  # mostly one: two shapes are half as many pixels each
    big = bool(rng.integers(2))
    bg = _pick(rng, ["white", "grey"])
    img = Image.new("RGB", (size, size), (250, 250, 250) if bg == "white" else (200, 200, 200))
    draw = ImageDraw.Draw(img)
    r = size * (0.36 if big else 0.26) * rng.uniform(0.9, 1.1) / max(1, count ** 0.5)
    for i in range(count):
        cx = size * (i + 0.5) / count + rng.uniform(-size / 12, size / 12)
        cy = size / 2 + rng.uniform(-size / 8, size / 8)
        _draw_shape(draw, shape, cx, cy, r, COLORS[color], rng.uniform(-0.15, 0.15))
    plural = shape if count == 1 else shape + "s"
    style = _style(rng)
    if style == "descriptive":
        caption = f"{COUNT_WORDS[count - 1]} {'large' if big else 'small'} {plural} on a {bg} background"
    elif style == "terse":
        caption = f"{shape} icon" if count == 1 else f"{count} {plural}"
    else:
        caption = f"{_noise_tag(rng)} {shape} clipart vector free download"
    return Drawn(finish(img, rng), caption, "shapes", shape, style)


# ---------------------------------------------------------------- glyphs
def make_glyphs(rng, size: int, label: str | None = None) -> Drawn:
    is_digit = label is not None or bool(rng.random() < 0.85)
    if is_digit:
        name = label.removeprefix("digit ") if label else _pick(rng, DIGITS)
        char = str(DIGITS.index(name))
    else:
        char = _pick(rng, LETTERS)
        name = char
    fg = _pick(rng, list(COLORS))
    bg = _contrasting_color(rng, fg)
    img = Image.new("RGB", (size, size), COLORS[bg])
    # the glyph on a layer of its own, turned a little, of a random size, weight and place: one
    # font at one size gave the same picture for a digit and a colour pair again and again
    layer = Image.new("L", (size, size), 0)
    font = ImageFont.load_default(size=int(size * rng.uniform(0.75, 0.95)))
    x = size / 2 + rng.uniform(-size / 10, size / 10)
    y = size / 2 + rng.uniform(-size / 10, size / 10)
    ImageDraw.Draw(layer).text((x, y), char, fill=255, font=font, anchor="mm",
                               stroke_width=int(rng.integers(1, 3)), stroke_fill=255)
    layer = layer.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR, center=(x, y))
    img.paste(Image.new("RGB", (size, size), COLORS[fg]), (0, 0), layer)
    style = _style(rng)
    what = f"digit {name}" if is_digit else f"letter {char}"
    if style == "descriptive":
        caption = f"the {what} written on a sign"
    elif style == "terse":
        caption = f"{what} {char}" if is_digit else f"letter {char}"
    else:
        caption = f"{_noise_tag(rng)} {char} font typography number sign"
    return Drawn(finish(img, rng), caption, "glyphs", f"digit {name}" if is_digit else f"letter {char}", style)


# ---------------------------------------------------------------- textures
def make_textures(rng, size: int, label: str | None = None) -> Drawn:
    pattern = label or _pick(rng, PATTERNS)
    c1 = _pick(rng, list(COLORS))
    c2 = _contrasting_color(rng, c1)  # orange grid lines on yellow were invisible at 64 px
    a, b = np.array(COLORS[c1], np.float32), np.array(COLORS[c2], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.uniform(5, 12))
    phase = float(rng.uniform(0, period))
    angle = float(rng.uniform(0, math.pi))
    u = xx * math.cos(angle) + yy * math.sin(angle) + phase
    v = -xx * math.sin(angle) + yy * math.cos(angle) + phase
    if pattern == "stripes":
        mask = (u // period) % 2 == 0
    elif pattern == "checkerboard":
        mask = ((u // period) + (v // period)) % 2 == 0
    elif pattern == "polka dots":
        mask = ((u % period - period / 2) ** 2 + (v % period - period / 2) ** 2) < (period / 3.2) ** 2
    elif pattern == "zigzag":
        mask = ((u + np.abs((v % period) - period / 2)) // (period / 1.5)) % 2 == 0
    elif pattern == "grid":
        mask = ((u % period) < 1.6) | ((v % period) < 1.6)
    else:  # speckles
        mask = rng.random((size, size)) < rng.uniform(0.15, 0.45)
    pixels = np.where(mask[..., None], a, b).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    style = _style(rng)
    if style == "descriptive":
        caption = f"a seamless {c1} and {c2} {pattern} pattern texture"
    elif style == "terse":
        caption = f"{pattern} texture"
    else:
        caption = f"background_{pattern.replace(' ', '_')}_{int(rng.integers(99))} wallpaper hd"
    return Drawn(finish(img, rng), caption, "textures", pattern, style)


# ---------------------------------------------------------------- scenes
def _tint(colour, rng, spread: float = 30.0):
    """A scene's sky or ground colour, moved by up to `spread` per channel: no two skies alike."""
    return tuple(float(np.clip(c + rng.uniform(-spread, spread), 0, 255)) for c in colour)


def _gradient(size, top, bottom):
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    column = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return Image.fromarray(np.repeat(column, size, axis=1).astype(np.uint8), "RGB")


def make_scenes(rng, size: int, label: str | None = None) -> Drawn:
    scene = label or _pick(rng, SCENES)
    s = size
    horizon = int(s * rng.uniform(0.5, 0.75))
    jitter = lambda: rng.uniform(-s / 8, s / 8)
    if scene == "beach":
        img = _gradient(s, _tint((250, 170, 90), rng), _tint((250, 220, 160), rng))
        d = ImageDraw.Draw(img)
        cx, r = s / 2 + jitter(), s * 0.12
        d.ellipse([cx - r, horizon - r, cx + r, horizon + r], fill=(250, 120, 40))
        d.rectangle([0, horizon, s, s], fill=(40, 90, 170))
        d.rectangle([0, int(s * 0.88), s, s], fill=(230, 210, 150))
        detail = "the sun setting over the sea"
    elif scene == "forest":
        img = _gradient(s, _tint((150, 200, 240), rng), _tint((200, 230, 250), rng))
        d = ImageDraw.Draw(img)
        d.rectangle([0, horizon, s, s], fill=(60, 120, 50))
        for _ in range(int(rng.integers(3, 7))):
            x = rng.uniform(0, s)
            h = rng.uniform(s * 0.25, s * 0.45)
            d.rectangle([x - 1.5, horizon - h * 0.3, x + 1.5, horizon + 2], fill=(100, 60, 30))
            d.polygon([(x - h / 4, horizon - h * 0.25), (x + h / 4, horizon - h * 0.25), (x, horizon - h)],
                      fill=(20, 100, 40))
        detail = "tall green pine trees"
    elif scene == "mountains":
        img = _gradient(s, _tint((120, 170, 230), rng), _tint((210, 230, 250), rng))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 4))):
            x, h = rng.uniform(0, s), rng.uniform(s * 0.35, s * 0.6)
            d.polygon([(x - h, horizon + 4), (x + h, horizon + 4), (x, horizon - h)], fill=(110, 110, 120))
            d.polygon([(x - h * 0.25, horizon - h * 0.75), (x + h * 0.25, horizon - h * 0.75), (x, horizon - h)],
                      fill=(250, 250, 250))
        d.rectangle([0, horizon + 4, s, s], fill=(90, 130, 80))
        detail = "snowy peaks under a blue sky"
    elif scene == "night sky":
        img = _gradient(s, _tint((5, 10, 40), rng), _tint((30, 40, 90), rng))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(10, 25))):
            x, y = rng.uniform(0, s), rng.uniform(0, horizon)
            d.point((x, y), fill=(255, 255, 230))
        cx, cy, r = s * 0.7 + jitter(), s * 0.25, s * 0.1
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 210))
        d.rectangle([0, horizon, s, s], fill=(10, 20, 20))
        detail = "a full moon and stars"
    elif scene == "desert":
        img = _gradient(s, _tint((120, 190, 250), rng), _tint((230, 230, 250), rng))
        d = ImageDraw.Draw(img)
        cx, r = s * 0.25 + jitter(), s * 0.09
        d.ellipse([cx - r, s * 0.15 - r, cx + r, s * 0.15 + r], fill=(255, 230, 80))
        d.rectangle([0, horizon, s, s], fill=(230, 190, 110))
        x = s * 0.65 + jitter()
        d.rectangle([x - 2, horizon - s * 0.25, x + 2, horizon + 3], fill=(50, 140, 60))
        d.rectangle([x - 7, horizon - s * 0.17, x - 2, horizon - s * 0.14], fill=(50, 140, 60))
        detail = "sand dunes and a cactus"
    else:  # city skyline
        img = _gradient(s, _tint((70, 90, 140), rng), _tint((180, 150, 160), rng))
        d = ImageDraw.Draw(img)
        x = 0.0
        while x < s:
            w, h = rng.uniform(s * 0.08, s * 0.18), rng.uniform(s * 0.25, s * 0.6)
            d.rectangle([x, s - h, x + w, s], fill=(40, 40, 50))
            for wy in range(int(s - h + 3), s - 3, 5):
                d.point((x + w / 2, wy), fill=(250, 220, 120))
            x += w + 1
        detail = "tall buildings with lit windows"
    style = _style(rng)
    if style == "descriptive":
        caption = f"a landscape of a {scene} with {detail}"
    elif style == "terse":
        caption = scene
    else:
        caption = f"{_noise_tag(rng)} beautiful {scene} wallpaper 4k"
    return Drawn(finish(img, rng), caption, "scenes", scene, style)


DOMAINS: dict[str, Callable[..., Drawn]] = {
    "shapes": make_shapes,
    "glyphs": make_glyphs,
    "textures": make_textures,
    "scenes": make_scenes,
}

# Held-out zero-shot classification tasks: (domain, class names, templates).
TASKS = {
    "shapes": (SHAPES, ["a photo of a {}.", "a {} shape.", "an icon of a {}."]),
    "digits": ([f"digit {d}" for d in DIGITS], ["the {}.", "a sign with the {}.", "the {} written on a sign."]),
    "textures": (PATTERNS, ["a {} pattern.", "a {} texture.", "a seamless {} background."]),
    "scenes": (SCENES, ["a photo of a {}.", "a landscape of a {}.", "a {} wallpaper."]),
}
TASK_DOMAIN = {"shapes": "shapes", "digits": "glyphs", "textures": "textures", "scenes": "scenes"}
