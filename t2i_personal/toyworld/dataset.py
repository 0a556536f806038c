"""Rendering many toy-world examples at once (in worker processes) for pretraining and evaluation."""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import world


@dataclass
class WorldSet:
    """``images``: uint8 (N, 64, 64, 3); one caption, scene and face-label map (N, 64, 64) per image."""

    images: np.ndarray
    captions: list[str]
    scenes: list[world.Scene]
    face_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def tensor(self, index) -> torch.Tensor:
        """Images at ``index`` as float (B, 3, 64, 64) in [-1, 1]."""
        x = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0


def _subject_with_accessories(rng: random.Random) -> world.Scene:
    """A personal subject, sometimes dressed up: the oracle must still read a hat on the personal dog."""
    name = rng.choice(list(world.SUBJECTS))
    if world.SUBJECTS[name].cls not in world.ANIMATE:
        return world.subject_scene(name, rng)
    return world.subject_scene(name, rng, hat=rng.choice(world.HAT_COLOURS) if rng.random() < 0.3 else None,
                               glasses=rng.random() < 0.3,
                               scarf=rng.choice(world.SCARF_COLOURS) if rng.random() < 0.3 else None)


def _render_one(args):
    seed, kind, with_labels, scene_options = args
    rng = random.Random(seed)
    style = None
    if kind == "world":
        s = world.sample_scene(rng, **scene_options)
    elif kind == "faces":
        s = world.sample_scene(rng, cls="face")
    elif kind == "oracle":  # the ordinary world plus personal subjects and both styles, for the oracle to read
        u = rng.random()
        s = _subject_with_accessories(rng) if u < 0.2 else world.sample_scene(rng, allow_held_out=True)
        style = rng.choice(world.STYLES) if rng.random() < 0.1 else None
    elif kind == "held_out":
        c = rng.choice(world.held_out_combinations())
        s = world.sample_scene(rng, cls=c[0], colour=c[1], scene=c[2], allow_held_out=True)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    r = world.render(s, style=style)
    caption = world.describe(s, rng)
    return r.image, caption, s, (r.face_label_map() if with_labels else None)


def render_set(n: int, seed: int = 0, kind: str = "world", *, face_labels: bool = False,
               workers: int | None = None, **scene_options) -> WorldSet:
    """``n`` examples whose seeds are ``seed * 10**9 + i``: the same set on any machine and worker count.
    ``scene_options`` (e.g. ``accessory_rate``) go to ``world.sample_scene`` for the ``"world"`` kind."""
    jobs = [(seed * 1_000_000_000 + i, kind, face_labels, scene_options) for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 16)
    if workers > 1 and n >= 256:
        with ProcessPoolExecutor(workers) as pool:
            out = list(pool.map(_render_one, jobs, chunksize=256))
    else:
        out = [_render_one(j) for j in jobs]
    images = np.stack([o[0] for o in out])
    labels = np.stack([o[3] for o in out]) if face_labels else None
    return WorldSet(images, [o[1] for o in out], [o[2] for o in out], labels)
