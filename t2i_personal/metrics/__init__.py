"""Personalization metrics: CLIP-T, CLIP-I, TI-CLIP (open_clip) and DINO-I (transformers), as raw cosine.

>>> from t2i_personal.metrics import ClipTextScore, ClipImageScore, DinoImageScore
>>> clip_t = ClipTextScore("builtin:toy-clip")                      # or ClipTextScore("ViT-B-32", pretrained="openai")
>>> scores = clip_t(images, ["a dog on the beach"] * len(images))  # one score per image (tensor)
>>> clip_t.evaluate(images, prompts).to_dict()                     # + mean, backbone, pretrained tag, scale

Every result records its backbone, pretrained tag and ``scale: "raw cosine"``.
"""

from .base import Metric, MetricResult, to_pil_list
from .clip import ClipImageScore, ClipTextScore, TIClipScore
from .dino import DinoImageScore
from .loading import MetricModel, load_metric_model

__all__ = ["ClipImageScore", "ClipTextScore", "DinoImageScore", "Metric", "MetricModel", "MetricResult",
           "TIClipScore", "load_metric_model", "to_pil_list"]
