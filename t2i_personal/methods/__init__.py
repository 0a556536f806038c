"""Personalization methods, dispatched on the explicit ``method.name`` key."""

from .base import Conditioning, Method, TrainStep, denoise, weighted_mse
from .dreambooth import DreamBooth

METHODS: dict[str, type[Method]] = {"dreambooth": DreamBooth}


def build_method(config) -> Method:
    return METHODS[config.name](config)


__all__ = ["METHODS", "Conditioning", "DreamBooth", "Method", "TrainStep", "build_method", "denoise", "weighted_mse"]
