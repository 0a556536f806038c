"""Personalization methods, dispatched on the explicit ``method.name`` key.

``build_method`` composes the chosen method with its add-ons: learned tokens (``concepts[].initializer_token``)
and ClassDiffusion's SPL (``method.spl``).
"""

from .base import LearningRates, Method, TrainStep, weighted_mse
from .classdiffusion import SemanticPreservationLoss
from .custom_diffusion import CustomDiffusion
from .dreambooth import DreamBooth
from .styleforge import StyleForge
from .tokens import LearnedTokens

METHODS: dict[str, type[Method]] = {"dreambooth": DreamBooth, "custom_diffusion": CustomDiffusion,
                                    "styleforge": StyleForge}


def build_method(config, concepts=()) -> Method:
    spl = SemanticPreservationLoss(config.spl, concepts) if getattr(config, "spl", None) else None
    return METHODS[config.name](config, tokens=LearnedTokens(concepts), spl=spl)


__all__ = ["METHODS", "CustomDiffusion", "DreamBooth", "LearningRates", "Method", "StyleForge", "TrainStep",
           "build_method", "weighted_mse"]
