"""CP-CLIP (Gen4Gen's Composition-Personalization CLIP) with an injectable open-vocabulary detector.

Definition (the Gen4Gen paper, Yeh et al. 2024), per generated image with concepts O′:

1. detect with OWL-ViT (default ``google/owlvit-base-patch32``), the concepts' class nouns as text queries; each
   predicted box gets the query it scores highest on (transformers' ``post_process_object_detection``), boxes not
   above ``threshold`` (default 0.1, the HF default) are dropped;
2. per class noun, keep the top box; when k concepts share a class noun keep its top-k boxes after NMS
   (``same_class="top-k"``, the default) or still only one (``same_class="literal"``, the paper read literally);
3. crop the image to each kept box (tight crop, then the CLIP model's own preprocessing);
4. S_ij = mean cosine of crop i's CLIP image embedding with every reference image of concept j (CLIP-I's cached
   reference embeddings), S_i = max over **all** concepts j;
5. CP-CLIP = sum over kept crops of S_i, divided by |O′|: a concept that is not detected adds 0.

The detection rate (kept boxes / |O′|) is reported per image beside the score. Raw cosine scale, like CLIP-I.

A detector is any callable ``detector(image, queries, threshold)`` returning a dict with ``boxes`` (K, 4) in pixel
``x0, y0, x1, y1``, ``scores`` (K,) and ``labels`` (K,) indices into ``queries`` (the layout transformers'
post-processing returns), so tests and other detectors (Grounding DINO, ...) plug in without OWL-ViT.

>>> cp = CPClipScore("builtin:toy-clip")                         # OWL-ViT google/owlvit-base-patch32 by default
>>> result = cp.evaluate(images, concepts=[("dog", "data/dog"), ("cat", "data/cat")])
>>> result.to_dict()["detection_rate_mean"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ModelLoadError
from ..weights import HUB_ID, check_weights_dir, offline_error
from .base import MetricResult, to_pil_list
from .clip import DEFAULT_CLIP, ClipImageScore
from .loading import MetricModel

DEFAULT_DETECTOR = "google/owlvit-base-patch32"
DEFAULT_THRESHOLD = 0.1
DEFAULT_NMS_IOU = 0.3

Detector = Callable[[Image.Image, list[str], float], dict]


@dataclass
class Concept:
    """One concept of a composition: its class noun (the detector query) and its reference pictures."""

    class_noun: str
    references: Any
    name: str | None = None


@dataclass
class CPClipResult(MetricResult):
    """Per-image CP-CLIP plus per-image detection rate (kept boxes / number of concepts)."""

    detection_rate: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def to_dict(self) -> dict:
        rate = float(self.detection_rate.mean()) if self.detection_rate.numel() else float("nan")
        return {**super().to_dict(), "detection_rate_mean": rate,
                "detection_rate": [float(v) for v in self.detection_rate]}


# ------------------------------------------------------------------------------------------------------- loading


def load_model_and_processor(model_cls, processor_cls, source: str | os.PathLike, *, device="cpu",
                             allow_pickle: bool = False, what: str = "model"):
    """``model_cls`` and ``processor_cls`` ``from_pretrained(source)``: a local folder (safetensors unless
    ``allow_pickle``) or a hub id, float32, eval mode; offline / missing models give a clear
    :class:`~t2i_personal.errors.ModelLoadError` (the same wording as :func:`load_metric_model`).

    Returns ``(model, processor, pretrained)``, ``pretrained`` being the resolved folder or the hub id.
    """
    src = str(source).strip()
    path = Path(src).expanduser()
    local = path.is_dir()
    if local:
        check_weights_dir(path, allow_pickle, "model.safetensors")
    elif not HUB_ID.match(src):
        raise ModelLoadError(f"{what} {src!r} is neither a local folder nor a hub id (org/name)")
    try:
        model = model_cls.from_pretrained(src, use_safetensors=None if allow_pickle else True,
                                          local_files_only=local)
        processor = processor_cls.from_pretrained(src, local_files_only=local)
    except (OSError, ValueError) as exc:
        if local:
            raise ModelLoadError(f"could not load the {what} folder {src} (model + processor): {exc}") from exc
        raise offline_error(what, src, exc) from exc
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, processor, str(path.resolve()) if local else src


# ------------------------------------------------------------------------------------------------------- OWL-ViT


class OwlVitDetector:
    """OWL-ViT (transformers ``OwlViTForObjectDetection`` + ``OwlViTProcessor``) as a CP-CLIP detector.

    ``source``: a local folder (``save_pretrained`` layout, safetensors) or a hub id; an offline machine without the
    model cached gets a :class:`~t2i_personal.errors.ModelLoadError` saying how to provide it.
    """

    def __init__(self, source: str | os.PathLike = DEFAULT_DETECTOR, *, device: str | torch.device = "cpu",
                 allow_pickle: bool = False):
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        model, processor, self.pretrained = load_model_and_processor(
            OwlViTForObjectDetection, OwlViTProcessor, source, device=device, allow_pickle=allow_pickle,
            what="OWL-ViT detector")
        self.model, self.processor, self.source = model, processor, str(source)


    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, image: Image.Image, queries: list[str], threshold: float) -> dict:
        inputs = self.processor(text=[list(queries)], images=image, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        target = torch.tensor([[image.height, image.width]], device=self.device)
        post = getattr(self.processor, "post_process_grounded_object_detection", None)
        if post is not None:
            result = post(outputs=outputs, threshold=threshold, target_sizes=target)[0]
        else:  # pragma: no cover - older transformers
            result = self.processor.post_process_object_detection(outputs=outputs, threshold=threshold,
                                                                  target_sizes=target)[0]
        return {"boxes": result["boxes"].cpu(), "scores": result["scores"].cpu(), "labels": result["labels"].cpu()}

    def describe(self) -> dict:
        return {"detector": "OWL-ViT (transformers OwlViTForObjectDetection)", "detector_pretrained": self.pretrained}


# ------------------------------------------------------------------------------------------------------- CP-CLIP


class CPClipScore:
    """CP-CLIP: ``metric(images, concepts)`` -> one score per image; :meth:`evaluate` adds the detection rate.

    ``clip``: a :class:`ClipImageScore`, a loaded open_clip :class:`MetricModel` or a source for one (reference
    embeddings are cached per concept by image content). ``detector``: an :class:`OwlVitDetector`, a source for one
    (folder or hub id), or any callable with the detector interface (module docstring). ``concepts``: a sequence of
    :class:`Concept`, ``(class_noun, references)`` pairs or dicts with ``class_noun`` and ``references`` keys; all
    images passed in one call share the composition.
    """

    name = "CP-CLIP"

    def __init__(self, clip: ClipImageScore | MetricModel | str = DEFAULT_CLIP, *,
                 detector: Detector | str | os.PathLike | None = DEFAULT_DETECTOR,
                 threshold: float = DEFAULT_THRESHOLD, same_class: str = "top-k", nms_iou: float = DEFAULT_NMS_IOU,
                 pretrained: str | None = None, batch_size: int = 32, progress: bool = True,
                 device: str | torch.device | None = None, allow_pickle: bool = False):
        if same_class not in ("top-k", "literal"):
            raise ValueError(f"same_class must be 'top-k' (k boxes when k concepts share a class noun) or "
                             f"'literal' (one box per class noun), not {same_class!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], not {threshold}")
        self.clip = clip if isinstance(clip, ClipImageScore) else ClipImageScore(
            clip, pretrained=pretrained, batch_size=batch_size, progress=progress, device=device,
            allow_pickle=allow_pickle)
        if detector is None or isinstance(detector, (str, os.PathLike)):
            detector = OwlVitDetector(detector or DEFAULT_DETECTOR, device=device or "cpu", allow_pickle=allow_pickle)
        self.detector = detector
        self.threshold, self.same_class, self.nms_iou = threshold, same_class, nms_iou

    # ------------------------------------------------------------------------------------------------- per image

    def _kept_boxes(self, image: Image.Image, queries: list[str], counts: list[int]) -> torch.Tensor:
        """(B, 4) kept boxes: per query, its top box (top-k after NMS when k concepts share it) above threshold."""
        from torchvision.ops import nms

        out = self.detector(image, queries, self.threshold)
        boxes = torch.as_tensor(out["boxes"], dtype=torch.float32).reshape(-1, 4)
        scores = torch.as_tensor(out["scores"], dtype=torch.float32).reshape(-1)
        labels = torch.as_tensor(out["labels"]).reshape(-1).long()
        kept = []
        for q, k in enumerate(counts):
            mask = (labels == q) & (scores > self.threshold)  # strict, as transformers' post-processing
            if not mask.any():
                continue
            b, s = boxes[mask], scores[mask]
            k = 1 if self.same_class == "literal" else k
            order = nms(b, s, self.nms_iou) if k > 1 else torch.argsort(s, descending=True)
            kept.append(b[order[:k]])
        return torch.cat(kept) if kept else torch.zeros(0, 4)

    @staticmethod
    def _crop(image: Image.Image, box: torch.Tensor) -> Image.Image | None:
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, y0 = max(0, round(x0)), max(0, round(y0))
        x1, y1 = min(image.width, round(x1)), min(image.height, round(y1))
        if x1 - x0 < 1 or y1 - y0 < 1:
            return None  # a degenerate box (outside the image or empty) is no crop
        return image.crop((x0, y0, x1, y1))

    def _score(self, images: list[Image.Image], concepts: list[Concept]) -> tuple[torch.Tensor, torch.Tensor]:
        refs = [self.clip.reference_embeddings(c.references) for c in concepts]
        queries = list(dict.fromkeys(c.class_noun for c in concepts))
        counts = [sum(c.class_noun == q for c in concepts) for q in queries]
        scores, rates = [], []
        for image in images:
            boxes = self._kept_boxes(image, queries, counts)
            crops = [c for c in (self._crop(image, b) for b in boxes) if c is not None]
            rates.append(len(crops) / len(concepts))
            if not crops:
                scores.append(0.0)
                continue
            emb = self.clip._batched(crops, self.clip._embed_images, f"{self.name} crops")
            per_concept = torch.stack([(emb @ r.T).mean(dim=1) for r in refs], dim=1)  # (crops, concepts): S_ij
            scores.append(float(per_concept.max(dim=1).values.sum()) / len(concepts))
        return torch.tensor(scores, dtype=torch.float32), torch.tensor(rates, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------------------ API

    def __call__(self, images, concepts: Sequence) -> torch.Tensor:
        return self.evaluate(images, concepts).per_image

    def evaluate(self, images, concepts: Sequence) -> CPClipResult:
        concepts = normalize_concepts(concepts)
        pil = to_pil_list(images)
        if not pil:
            return CPClipResult(torch.zeros(0), self.describe(), torch.zeros(0))
        scores, rates = self._score(pil, concepts)
        return CPClipResult(scores, {**self.describe(), "concepts": [c.name or c.class_noun for c in concepts]},
                            rates)

    def describe(self) -> dict:
        clip = self.clip.describe()
        det = self.detector.describe() if hasattr(self.detector, "describe") else {
            "detector": f"custom {type(self.detector).__name__}"}
        return {"metric": self.name, "backbone": clip["backbone"], "pretrained": clip["pretrained"],
                "scale": "raw cosine", **det, "threshold": self.threshold,
                "same_class": ("top-k boxes (after NMS, IoU " f"{self.nms_iou}) when k concepts share a class noun"
                               if self.same_class == "top-k" else "literal: one box per class noun"),
                "crop": "tight box crop, then the CLIP model's preprocessing",
                "aggregation": "sum over kept crops of max over concepts of mean cosine to the concept's references, "
                               "divided by the number of concepts (a missing concept adds 0)"}


def normalize_concepts(concepts: Sequence) -> list[Concept]:
    out = []
    for c in concepts:
        if isinstance(c, Concept):
            out.append(c)
        elif isinstance(c, dict):
            out.append(Concept(c["class_noun"], c["references"], c.get("name")))
        elif isinstance(c, (tuple, list)) and len(c) in (2, 3):
            out.append(Concept(*c))
        else:
            raise ValueError(f"a concept is a Concept, a (class_noun, references) pair or a dict, not {c!r}")
    if not out:
        raise ValueError("CP-CLIP needs at least one concept")
    for c in out:
        if not isinstance(c.class_noun, str) or not c.class_noun.strip():
            raise ValueError(f"concept {c.name or c!r}: class_noun must be a non-empty string")
    return out
