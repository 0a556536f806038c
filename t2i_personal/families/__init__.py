"""Model families: one module per model generation (``sd.py``, ``sdxl.py``, ``sd3.py``, ``flux.py``); ``base.py``
says what a family is, ``transformer.py`` what the flow-matching transformer families share.

``family_named("sdxl")`` gives a family by the name written in configs and ``personalization.json``;
``family_of_pipeline_class`` / ``family_of_single_file`` / ``family_of_denoiser`` recognise a model.
"""

from __future__ import annotations

from ..errors import ModelLoadError
from .base import Conditioning, ModelFamily
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

# Most specific first: the first family that claims a model is its family (SD's claims would match SD3's names).
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (Flux(), StableDiffusion3(), StableDiffusionXL(),
                                                        StableDiffusion())}


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of_pipeline_class(class_name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.claims_pipeline(class_name):
            return family
    raise ModelLoadError(f"{class_name} is not a pipeline of a supported model family ({', '.join(sorted(FAMILIES))})")


def family_of_single_file(keys: set[str] | None) -> ModelFamily:
    """The family of an original-layout checkpoint by its tensor names; ``None`` (a pickle, which cannot be
    inspected without loading it) and unknown layouts are read as SD, as diffusers' own loader assumes."""
    for family in FAMILIES.values():
        if keys is not None and family.claims_single_file(keys):
            return family
    return FAMILIES["sd"]


def family_of_denoiser(denoiser) -> ModelFamily:
    """The family of a denoiser (UNet, transformer) by its architecture."""
    for family in FAMILIES.values():
        if family.claims_denoiser(denoiser):
            return family
    raise ModelLoadError(f"{type(denoiser).__name__} is not the denoiser of a supported model family")


def family_of_pipeline(pipe) -> ModelFamily:
    """The family of a loaded diffusers pipeline (e.g. one ``load_personalized`` returned)."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    raise ModelLoadError(f"{type(pipe).__name__} is not a pipeline of a supported model family")


def call_defaults(pipe) -> dict:
    """The call arguments a loaded pipeline's family needs (``ModelFamily.call_defaults``); none for other pipelines."""
    try:
        return family_of_pipeline(pipe).call_defaults(pipe)
    except ModelLoadError:
        return {}


__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "call_defaults", "family_named", "family_of_denoiser", "family_of_pipeline", "family_of_pipeline_class",
           "family_of_single_file"]
