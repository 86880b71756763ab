"""An offline OCR and image-QA suite rendered with Pillow: deterministic for a (seed, split), no download.

Five categories, in turn: `word` and `number` and `phrase` (read the text), `box_text` (read the word in the box of
a given colour) and `box_colour` (name the colour of the box holding a given word). Each image varies the font
(DejaVu faces), size, colours, position, a light rotation and pixel noise; widths stay within 100-400 px.

Splits: every word and number is assigned to `train` or `test` by a hash of its text, so the strings of the two
splits never overlap (a model trained on `train` is tested on strings it never saw); colour names are a closed set
shared by both. Sample i depends only on (seed, split, i), so a larger --n extends a smaller one.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .data import Sample, write_tsv
from .errors import EvalError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CATEGORIES = ("word", "number", "phrase", "box_text", "box_colour")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf",
              "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed-Bold.ttf")
COLOURS = {"red": (210, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 210), "orange": (235, 130, 10),
           "purple": (130, 50, 170), "black": (15, 15, 15)}
WORDS = tuple("""
apple river stone cloud garden window orange silver market bridge candle forest yellow planet rocket butter castle
dragon engine feather guitar harbor island jacket kettle ladder magnet needle ocean pencil quartz rabbit saddle
tunnel umbrella valley wagon yogurt zebra anchor basket carpet desert eagle falcon glacier hammer igloo jungle kitten
lemon mirror napkin oyster parrot ribbon shadow tiger velvet walnut canyon meadow pepper summer winter autumn morning
evening silent gentle bright purple copper marble timber cotton linen paper letter signal button circle square arrow
bottle camera doctor farmer hunter jewel knight lantern monkey nickel orbit pilot queen radio sugar ticket violin
whistle branch breeze cabin cactus cherry coffee comet crystal dolphin domino echo fabric fossil galaxy ginger helmet
honey insect ivory jasmine koala lagoon lizard maple melon mosaic nectar noodle olive onion palace panda pearl pillow
pirate pumpkin puzzle raven saturn scarf shovel spider statue tomato trumpet tulip turtle vessel vortex waffle walrus
willow wizard yacht zipper blanket cereal compass cookie donkey fiddle goblet hazel kernel lobster mango muffin
nugget otter pebble quill rhythm salmon thunder tractor trophy velour widget
""".split())


def in_split(text: str, split: str) -> bool:
    """A quarter of all strings (by CRC-32 of the lower-cased text) belong to `test`, the rest to `train`."""
    return (zlib.crc32(text.lower().encode()) % 4 == 0) == (split == "test")


class SyntheticSuite(Sequence):
    """The first `n` samples of the suite, each drawn when indexed (a training set larger than memory allows)."""

    def __init__(self, n: int = 200, seed: int = 0, split: str = "test"):
        if split not in SPLITS:
            raise EvalError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if n < 1:
            raise EvalError(f"--n must be at least 1, got {n}")
        self.n, self.seed, self.split = n, seed, split
        self.words = [w for w in WORDS if in_split(w, split)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return _sample(i, random.Random(f"kimivl-synthetic:{self.seed}:{self.split}:{i}"), self.words, self.split)


def make_synthetic(n: int = 200, seed: int = 0, split: str = "test") -> list[Sample]:
    """`n` samples of the suite (see the module docstring); index i is the i-th sample, category i mod 5."""
    return list(SyntheticSuite(n, seed, split))


def write_synthetic(out: str | os.PathLike, n: int = 200, seed: int = 0, split: str = "test") -> Path:
    """Write the suite as a TSV (the layout `read_tsv` reads) with a `split` column."""
    return write_tsv(make_synthetic(n, seed, split), out)


# ---- one sample ---------------------------------------------------------------------------------------------------
def _sample(i: int, rng: random.Random, words: list[str], split: str) -> Sample:
    category = CATEGORIES[i % len(CATEGORIES)]
    if category in ("word", "number", "phrase"):
        text = {"word": lambda: _cased(rng, rng.choice(words)), "number": lambda: _number(rng, split),
                "phrase": lambda: " ".join(_cased(rng, w) for w in rng.sample(words, rng.randint(2, 3)))}[category]()
        question = {"word": "What is the word in the image?", "number": "What number is written in the image?",
                    "phrase": "What text is written in the image?"}[category]
        image, answer = _render_text(rng, text), text
    else:
        names = rng.sample(sorted(COLOURS), rng.randint(2, 3))
        labels = [_cased(rng, w) for w in rng.sample(words, len(names))]
        image = _render_boxes(rng, names, labels)
        k = rng.randrange(len(names))
        if category == "box_text":
            question, answer = f"What word is written in the {names[k]} box?", labels[k]
        else:
            question, answer = f'What colour is the box that contains the word "{labels[k]}"?', names[k]
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # noise does not compress; level 1 is as small, 3x faster
    return Sample(index=str(i), question=question, answers=[answer], images=[buf.getvalue()], category=category,
                  extra={"split": split})


def _cased(rng: random.Random, word: str) -> str:
    return rng.choice((word, word, word.capitalize(), word.upper()))


def _number(rng: random.Random, split: str) -> str:
    while True:
        text = rng.choice((
            lambda: str(rng.randint(0, 99999)),
            lambda: f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}",
            lambda: f"{rng.randint(1000, 999999):,}",
            lambda: f"{rng.randint(1, 100)}%",
            lambda: f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
        ))()
        if in_split(text, split):
            return text


# ---- rendering ----------------------------------------------------------------------------------------------------
@functools.cache
def _font_paths() -> tuple[str, ...]:
    paths = tuple(str(FONT_DIR / f) for f in FONT_FILES if (FONT_DIR / f).is_file())
    if not paths:
        log.warning("no DejaVu fonts in %s: using Pillow's default font (images differ from the reference suite)",
                    FONT_DIR)
    return paths


@functools.cache
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def _pick_face(rng: random.Random) -> str | None:
    paths = _font_paths()
    return rng.choice(paths) if paths else None


def _colours(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, ink): light on dark one time in five, dark on light otherwise."""
    light = tuple(rng.randint(190, 255) for _ in range(3))
    dark = tuple(rng.randint(0, 90) for _ in range(3))
    return (dark, light) if rng.random() < 0.2 else (light, dark)


def _text_layer(text: str, font, ink: tuple[int, ...], pad: int = 2) -> Image.Image:
    left, top, right, bottom = font.getbbox(text)
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=font, fill=(*ink, 255))
    return layer


def _noisy(rng: random.Random, image: Image.Image) -> Image.Image:
    """Blend in uniform pixel noise drawn from `rng` (Pillow's own noise generator is not seedable)."""
    noise = Image.frombytes("L", image.size, rng.randbytes(image.width * image.height)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.04, 0.15))


def _render_text(rng: random.Random, text: str) -> Image.Image:
    bg, ink = _colours(rng)
    size, face = rng.randint(18, 40), _pick_face(rng)
    while True:  # shrink until the rotated text fits in 392 px
        font = _font(face, size)
        layer = _text_layer(text, font, ink).rotate(rng.uniform(-5, 5), resample=Image.BICUBIC, expand=True)
        if layer.width <= 392 or size <= 10:
            break
        size -= 2
    width = min(max(layer.width + rng.randint(8, 80), 100), 400)
    height = max(layer.height + rng.randint(8, 40), 32)
    image = Image.new("RGB", (width, height), bg)
    image.paste(layer, (rng.randint(0, max(width - layer.width, 0)), rng.randint(0, height - layer.height)), layer)
    return _noisy(rng, image)


def _render_boxes(rng: random.Random, names: list[str], labels: list[str]) -> Image.Image:
    width, height = rng.randint(240, 400), rng.randint(90, 150)
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    slot = width // len(names)
    for k, (name, label) in enumerate(zip(names, labels)):
        x0, y0 = k * slot + rng.randint(3, 10), rng.randint(5, height // 3)
        x1, y1 = (k + 1) * slot - rng.randint(3, 10), height - rng.randint(5, height // 3)
        draw.rectangle((x0, y0, x1, y1), outline=COLOURS[name], width=rng.randint(2, 4))
        size, face = rng.randint(12, 22), _pick_face(rng)
        while True:  # shrink until the word fits inside its box
            font = _font(face, size)
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            if right - left <= x1 - x0 - 10 or size <= 8:
                break
            size -= 1
        cx, cy = (x0 + x1 - (right - left)) // 2 - left, (y0 + y1 - (bottom - top)) // 2 - top
        draw.text((cx, cy), label, font=font, fill=ink)
    image = image.rotate(rng.uniform(-3, 3), resample=Image.BICUBIC, fillcolor=bg)
    return _noisy(rng, image)
