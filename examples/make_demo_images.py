"""Write a small folder of generated demo images (coloured shapes), so the quick start needs no data set.

Usage: python examples/make_demo_images.py OUT_DIR [--count N]

Needs: no extra (Pillow comes with the base install). The default OUT_DIR of the README, demo-images/, is ignored
by git.
"""
from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], rng: random.Random) -> Image.Image:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=36)
    args = parser.parse_args()
    rng = random.Random(0)
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    for i in range(args.count):
        shape, colour, bg = combos[i % len(combos)]
        folder = args.out / shape
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{colour}-{shape}-on-{bg}-{i:03d}.{'jpg' if i % 2 else 'png'}"
        draw(shape, COLOURS[colour], BACKGROUNDS[bg], rng).save(path)
        (folder / f"{path.name}.txt").write_text(f"a {colour} {shape} on a {bg} background\n")
    print(f"wrote {args.count} images under {args.out}")


if __name__ == "__main__":
    main()
