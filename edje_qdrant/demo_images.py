"""A small folder of generated demo images (coloured shapes with sidecar captions), so the quick start needs no
data set: ``edje-qdrant demo-images DIR`` (Pillow only; the README's DIR, demo-images/, is ignored by git).
"""
from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One 224 x 224 picture: a ``shape`` in ``colour`` on ``background``, placed and sized by ``rng``."""
    img = Image.new("RGB", (224, 224), background)
    d = ImageDraw.Draw(img)
    cx, cy, r = rng.randint(70, 154), rng.randint(70, 154), rng.randint(35, 65)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def write_demo_images(out: str | os.PathLike[str], count: int = 36) -> list[Path]:
    """Write ``count`` images under ``out`` (one sub-folder per shape, PNG and JPEG alternating), each with a
    caption file ``NAME.txt`` beside it; the same images every time. Returns their paths."""
    root = Path(out)
    rng = random.Random(0)
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    paths = []
    for i in range(count):
        shape, colour, bg = combos[i % len(combos)]
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{colour}-{shape}-on-{bg}-{i:03d}.{'jpg' if i % 2 else 'png'}"
        draw(shape, COLOURS[colour], BACKGROUNDS[bg], rng).save(path)
        (folder / f"{path.name}.txt").write_text(f"a {colour} {shape} on a {bg} background\n")
        paths.append(path)
    return paths
