"""The evaluation output folder: where each image goes and which seed draws it, and reading the images back.

::

    OUT/<model-name>/<prompt-index:03d>-<slug>/<k>.png   generated images (k = 0 .. images_per_prompt-1)
    OUT/<model-name>/generation.json                     the model and settings that made them
    OUT/results.csv, OUT/summary.json, OUT/report.html, OUT/report/ (grids and charts)

Image ``k`` of prompt ``p`` uses seed ``seed + p * images_per_prompt + k``: deterministic, independent of the
process split and of which images already exist. ``--images DIR`` folders use the same ``<prompt-index>-<slug>/``
layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sources import Source

#: in each generated model's folder: which model and settings made its images (see ``claim_generation_folders``)
GENERATION_RECORD = "generation.json"

def slugify(text: str, limit: int = 48, fallback: str = "prompt") -> str:
    """A folder name from free text: lower-case letters, digits and dashes only (no path can come through)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or fallback


def prompt_dir_name(index: int, text: str) -> str:
    return f"{index:03d}-{slugify(text)}"


@dataclass(frozen=True)
class Job:
    source: int  # index into the sources
    prompt: int  # prompt index
    k: int  # image index within the prompt
    seed: int
    path: Path


def image_seed(seed: int, prompt_index: int, k: int, images_per_prompt: int) -> int:
    return seed + prompt_index * images_per_prompt + k


def plan_jobs(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], out_dir: Path,
              images_per_prompt: int, seed: int) -> list[Job]:
    """Every (source, prompt, k) of generated sources; ``prompts[i]`` are source ``i``'s rendered prompts."""
    jobs = []
    for s, source in enumerate(sources):
        if source.model_dir is None:
            continue
        for p, prompt in enumerate(prompts[s]):
            folder = out_dir / source.name / prompt_dir_name(p, prompt.text)
            for k in range(images_per_prompt):
                jobs.append(Job(s, p, k, image_seed(seed, p, k, images_per_prompt), folder / f"{k}.png"))
    return jobs


@dataclass
class ImageRow:
    model: str
    prompt_index: int
    prompt: str
    seed: int | None
    path: Path
    scores: dict[str, float] = field(default_factory=dict)


def collect_rows(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], out_dir: Path,
                 images_per_prompt: int, seed: int) -> list[ImageRow]:
    """The images to score: the planned files of generated sources, every image of ``--images`` folders."""
    from ..data.images import list_image_files

    rows: list[ImageRow] = []
    for s, source in enumerate(sources):
        if source.model_dir is not None:
            for p, prompt in enumerate(prompts[s]):
                folder = out_dir / source.name / prompt_dir_name(p, prompt.text)
                for k in range(images_per_prompt):
                    path = folder / f"{k}.png"
                    if not path.is_file():
                        raise ConfigError(f"{path} is missing after generation (did another process fail?)")
                    rows.append(ImageRow(source.name, p, prompt.text, image_seed(seed, p, k, images_per_prompt),
                                         path))
            continue
        by_index: dict[int, Path] = {}
        for child in sorted(source.images_dir.iterdir()):
            m = re.match(r"^(\d+)-(.*)$", child.name)
            if not child.is_dir() or not m:
                continue
            index = int(m.group(1))
            if index >= len(prompts[s]):
                raise ConfigError(f"{child}: prompt index {index}, but the prompt set has {len(prompts[s])} prompts")
            expected = prompt_dir_name(index, prompts[s][index].text)
            if child.name != expected:
                raise ConfigError(f"{child.name} does not match prompt {index} of the prompt set "
                                  f"({prompts[s][index].text!r}, expected folder {expected}); are --prompts and "
                                  "--concept the ones the images were made with?")
            by_index[index] = child
        if not by_index:
            raise ConfigError(f"--images {source.images_dir}: no <prompt-index>-<slug>/ folders (the layout "
                              "evaluate.py writes, e.g. 000-a-sks-dog-in-the-jungle/0.png)")
        for index in sorted(by_index):
            for path in list_image_files(by_index[index]):
                rows.append(ImageRow(source.name, index, prompts[s][index].text, None, path))
    return rows
