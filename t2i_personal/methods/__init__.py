"""Personalization methods, dispatched on the explicit ``method.name`` key.

Learned tokens (``concepts[].initializer_token``) and ClassDiffusion's SPL (``method.spl``) compose with each.
"""

from .base import Conditioning, Method, TrainStep, denoise, weighted_mse
from .custom_diffusion import CustomDiffusion
from .dreambooth import DreamBooth
from .styleforge import StyleForge

METHODS: dict[str, type[Method]] = {"dreambooth": DreamBooth, "custom_diffusion": CustomDiffusion,
                                    "styleforge": StyleForge}


def build_method(config, concepts=()) -> Method:
    return METHODS[config.name](config, concepts)


__all__ = ["METHODS", "Conditioning", "CustomDiffusion", "DreamBooth", "Method", "StyleForge", "TrainStep",
           "build_method", "denoise", "weighted_mse"]
