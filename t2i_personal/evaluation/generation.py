"""Rendering the evaluation's images: each trained result over its prompts, resumable (existing files are kept)
and split across ``accelerate`` processes; ``+freecure`` sources through FreeCure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..families import call_defaults
from ..freecure.options import FreeCureOptions
from .layout import Job
from .sources import Source

@dataclass
class GenerationOptions:
    """How the images are drawn (``steps``, ``guidance``, size, ``device``, ``dtype``, ...) and, for the
    ``+freecure`` sources, FreeCure's options."""

    steps: int = 30
    guidance: float | None = None  # None: the model's own (the guidance it trained with, else its family's CFG scale)
    height: int | None = None  # default: the model's training resolution
    width: int | None = None
    device: str | None = None
    dtype: str = "float32"
    negative_prompt: str | None = None
    progress: bool = True
    freecure: FreeCureOptions = field(default_factory=FreeCureOptions)  # for the "+freecure" sources
    allow_pickle: bool = False  # results (and FreeCure's models) may hold pickle weights: only if the user says so


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def generate(sources: Sequence[Source], prompts: Sequence[Sequence[Any]], jobs: Sequence[Job],
             options: GenerationOptions, state=None) -> int:
    """Render this process's share of ``jobs`` whose file is missing; returns how many images were written.

    With an ``accelerate.PartialState`` of several processes, rank ``r`` takes jobs ``r, r + world, ...``.
    """
    from ..data.images import save_image_atomic
    from ..inference.pipeline import default_guidance, load_personalized

    if options.dtype not in _DTYPES:
        raise ConfigError(f"--dtype {options.dtype!r}: use one of {', '.join(_DTYPES)}")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = [j for i, j in enumerate(jobs) if i % world == rank and not j.path.is_file()]
    device = options.device or (str(state.device) if state is not None else
                                ("cuda" if torch.cuda.is_available() else "cpu"))
    if not options.progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars
    written = 0
    with tqdm(total=len(mine), desc=f"generating (rank {rank})" if world > 1 else "generating", unit="img",
              disable=not options.progress or not mine) as bar:
        for s, source in enumerate(sources):
            todo = [j for j in mine if j.source == s]
            if not todo:
                continue
            pipe = load_personalized(source.model_dir, device=device, dtype=_DTYPES[options.dtype],
                                     allow_pickle=options.allow_pickle)
            check_prompt_tokens(pipe, prompts[s], source.name)
            guidance = default_guidance(pipe)  # unless options.guidance is given
            defaults = call_defaults(pipe)  # e.g. the T5 window the result was trained with
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            if source.freecure:
                from ..freecure import FreeCure

                pipe = _FreeCureImages(FreeCure(pipe, options.freecure,
                                                allow_pickle=options.freecure.allow_pickle or options.allow_pickle))
            height = options.height or source.resolution or 512
            width = options.width or source.resolution or 512
            for job in todo:
                generator = torch.Generator(device="cpu").manual_seed(job.seed)
                kwargs = {"negative_prompt": options.negative_prompt} if options.negative_prompt else {}
                kwargs.update(defaults)
                image = pipe(prompts[s][job.prompt].text, num_inference_steps=options.steps,
                             guidance_scale=options.guidance or guidance, height=height, width=width, generator=generator,
                             **kwargs).images[0]
                save_image_atomic(image, job.path)
                written += 1
                bar.update(1)
            del pipe
    return written


def check_prompt_tokens(pipe, prompts: Sequence[Any], model: str) -> None:
    """Refuse a prompt longer than the text encoder's window before any image is drawn: diffusers would cut it
    silently, and CLIP-T would then score the image against words the model never read."""
    from ..models.tokenizer import check_pipeline_prompt

    for prompt in prompts:
        check_pipeline_prompt(prompt.text, pipe, prompt.source or "prompt", model)


class _FreeCureImages:
    """FreeCure called like a pipeline: ``.images`` are the repaired images. Explicit attributes that a prompt does
    not name are skipped for that prompt (a prompt set mixes prompts with and without them)."""

    def __init__(self, cure):
        self.cure = cure

    def __call__(self, prompt, *, generator, **kwargs):
        from types import SimpleNamespace

        attributes = self.cure.attributes
        if not isinstance(attributes, str) or attributes != "auto":
            from ..freecure.masks import attribute_list

            named = attribute_list(attributes)
            words = set(re.findall(r"[a-z]+", prompt.lower()))
            kwargs["attributes"] = [a for a in named if set(re.findall(r"[a-z]+", a.lower())) <= words]
        return SimpleNamespace(images=self.cure(prompt, generator=generator, **kwargs).images)
