"""Personalization metrics: CLIP-T, CLIP-I, TI-CLIP (open_clip) and DINO-I (transformers), as raw cosine; CP-CLIP
(Gen4Gen, OWL-ViT crops), BLIP ITC ("BLIP2-T") and set-level FID/KID (torchmetrics).

>>> from t2i_personal.metrics import ClipTextScore, ClipImageScore, DinoImageScore
>>> clip_t = ClipTextScore("builtin:toy-clip")                      # or ClipTextScore("ViT-B-32", pretrained="openai")
>>> scores = clip_t(images, ["a dog on the beach"] * len(images))  # one score per image (tensor)
>>> clip_t.evaluate(images, prompts).to_dict()                     # + mean, backbone, pretrained tag, scale

Every result records its backbone, pretrained tag and ``scale: "raw cosine"``.
"""

from .base import Metric, MetricResult, to_pil_list
from .blip import BlipTextScore
from .clip import ClipImageScore, ClipTextScore, TIClipScore
from .cp_clip import Concept, CPClipResult, CPClipScore, OwlVitDetector
from .dino import DinoImageScore
from .fid import DistanceResult, ImageSetDistance
from .loading import MetricModel, load_metric_model

__all__ = ["BlipTextScore", "CPClipResult", "CPClipScore", "ClipImageScore", "ClipTextScore", "Concept",
           "DinoImageScore", "DistanceResult", "ImageSetDistance", "Metric", "MetricModel", "MetricResult",
           "OwlVitDetector", "TIClipScore", "load_metric_model", "to_pil_list"]
