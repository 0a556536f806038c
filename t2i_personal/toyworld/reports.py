"""Loss curves and sample grids written next to each pretrained model's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.images import make_image_grid


def save_loss_curve(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """``history``: series name -> [(step, value)]; drawn on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in history.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, columns: int, scale: int = 2) -> Image.Image:
    """uint8 (N, H, W, 3) -> one grid image, upscaled ``scale``× with nearest neighbours so pixels stay visible."""
    grid = make_image_grid([Image.fromarray(img) for img in images], columns=columns)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def labelled_rows(rows: dict[str, list[np.ndarray]], header: list[str], scale: int = 2) -> Image.Image:
    """One labelled row per entry of ``rows`` (name -> blocks of uint8 (N, H, W, 3) images, each block one header
    column, blocks separated by a gap): the comparison picture benchmarks put in the README."""
    font = ImageFont.load_default(size=12)
    label_w, header_h, gap = 150, 18, 12
    first = next(iter(rows.values()))
    h, w = first[0].shape[1] * scale, first[0].shape[2] * scale
    block_w = [len(block) * w for block in first]
    canvas = Image.new("RGB", (label_w + sum(block_w) + gap * (len(first) - 1), header_h + len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for title, width in zip(header, block_w):
        draw.text((x + 2, 2), title, fill="black", font=font)
        x += width + gap
    for r, (name, blocks) in enumerate(rows.items()):
        y = header_h + r * h
        draw.text((4, y + h // 2 - 7), name, fill="black", font=font)
        x = label_w
        for block in blocks:
            canvas.paste(image_grid(block, columns=len(block), scale=scale), (x, y))
            x += len(block) * w + gap
    return canvas
