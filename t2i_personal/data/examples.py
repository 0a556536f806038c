"""Procedural example concept images for the quickstart (no downloads, deterministic).

``python -m t2i_personal.data.examples examples/toy-dog`` draws a small "dog" with a unique spotted pattern on
varied backgrounds, 5 images at 128 px, the subject of ``configs/quickstart.yaml``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .images import save_image_atomic

BACKGROUNDS = [(120, 180, 90), (230, 230, 240), (235, 210, 160), (70, 80, 110), (200, 160, 120)]


def draw_toy_dog(seed: int, size: int = 128) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), BACKGROUNDS[seed % len(BACKGROUNDS)])
    d = ImageDraw.Draw(img)
    s = size / 128
    dx, dy = rng.randint(-12, 12) * s, rng.randint(-8, 8) * s
    body = (30 * s + dx, 60 * s + dy, 96 * s + dx, 92 * s + dy)
    fur, spot = (205, 120, 50), (60, 30, 20)
    d.ellipse(body, fill=fur)
    d.ellipse((78 * s + dx, 38 * s + dy, 108 * s + dx, 68 * s + dy), fill=fur)  # head
    d.polygon([(84 * s + dx, 42 * s + dy), (88 * s + dx, 28 * s + dy), (94 * s + dx, 42 * s + dy)], fill=spot)  # ear
    for x in (38, 52, 72, 86):  # legs
        d.rectangle((x * s + dx, 88 * s + dy, (x + 6) * s + dx, 108 * s + dy), fill=fur)
    for cx, cy in ((48, 70), (64, 78), (74, 66)):  # the unique marking: three dark spots
        d.ellipse(((cx - 5) * s + dx, (cy - 5) * s + dy, (cx + 5) * s + dx, (cy + 5) * s + dy), fill=spot)
    d.ellipse((96 * s + dx, 48 * s + dy, 100 * s + dx, 52 * s + dy), fill=(0, 0, 0))  # eye
    d.line((30 * s + dx, 66 * s + dy, 16 * s + dx, 52 * s + dy), fill=fur, width=int(5 * s))  # tail
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def write_examples(folder: str | Path, count: int = 5, size: int = 128) -> list[Path]:
    folder = Path(folder)
    return [save_image_atomic(draw_toy_dog(i, size), folder / f"toy-dog-{i}.png") for i in range(count)]


if __name__ == "__main__":
    for p in write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples/toy-dog"):
        print(p)
