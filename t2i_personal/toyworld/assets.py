"""The toy world's personalization data, shipped as small PNG folders (regenerate: ``python -m t2i_personal.toyworld.assets``).

- ``subjects/{dog,car,face}/``: 5 instance images of each personal subject (never seen in pretraining), on
  varied scenes, for DreamBooth / Custom Diffusion / learned tokens / FreeCure.
- ``style/outline-poster/{people,scenes}/``: 20 StyleRef images in the personal art style (thick outlines,
  3-level palette), 10 people and 10 objects in scenes, with a caption file each (``{V}`` is the style token).
  Single-StyleForge trains on both folders; Multi-StyleForge binds ``people/`` to [V] and ``scenes/`` to [W].
- ``style/aux-painted/``: 20 auxiliary images for StyleForge (a generic "digital painting" look, mostly people
  and backgrounds), the role curated internet paintings play in the paper.

Every image is a pure function of its index, so the folders are reproducible byte for byte.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image

from ..data.images import save_image_atomic
from . import world

ASSETS = Path(__file__).resolve().parent / "assets"
SUBJECT_IMAGES = 5
STYLE_IMAGES = 20


def subject_dir(name: str) -> Path:
    """The folder of personal subject ``name`` (dog, car or face)."""
    if name not in world.SUBJECTS:
        raise KeyError(f"unknown personal subject {name!r}; subjects: {', '.join(world.SUBJECTS)}")
    return ASSETS / "subjects" / name


def style_dirs(style: str = "outline-poster") -> dict[str, Path]:
    """StyleRef folders of the personal style: ``{"people": ..., "scenes": ...}``."""
    return {part: ASSETS / "style" / style / part for part in ("people", "scenes")}


def _style_scene(i: int, rng: random.Random) -> world.Scene:
    # Alternate people and things so the style binds to both, as the StyleForge paper prescribes.
    return world.sample_scene(rng, cls="face" if i % 2 == 0 else rng.choice(world.CLASSES[:-1]), accessory_rate=0.2)


def _caption_for_style(s: world.Scene) -> str:
    return "a {V} style painting of " + world.describe(s, full=True)[len("a photo of "):]


def write_assets(root: str | Path = ASSETS) -> list[Path]:
    root = Path(root)
    written = []
    for name in world.SUBJECTS:
        rng = random.Random(f"subject-{name}")
        scenes = rng.sample(world.SCENES, SUBJECT_IMAGES)
        for i, scene in enumerate(scenes):
            img = world.render(world.subject_scene(name, rng, scene=scene)).image
            written.append(save_image_atomic(Image.fromarray(img), root / "subjects" / name / f"{name}-{i}.png"))
    for folder, style in (("outline-poster", "outline-poster"), ("aux-painted", "painted")):
        rng = random.Random(f"style-{folder}")
        for i in range(STYLE_IMAGES):
            s = _style_scene(i, rng)
            part = ("people" if s.cls == "face" else "scenes") if style == "outline-poster" else ""
            path = save_image_atomic(Image.fromarray(world.render(s, style=style).image),
                                     root / "style" / folder / part / f"{folder}-{i:02d}.png")
            if style == "outline-poster":
                path.with_suffix(".txt").write_text(_caption_for_style(s) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_assets(sys.argv[1] if len(sys.argv) > 1 else ASSETS):
        print(p)
