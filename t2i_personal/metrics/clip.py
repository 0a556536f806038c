"""CLIP-T, CLIP-I and TI-CLIP with open_clip models, reported as raw cosine similarity.

Definitions (the DreamBooth paper's protocol):

* **CLIP-T**: cosine between the L2-normalised image embedding of a generated image and the L2-normalised text
  embedding of its prompt. By convention the prompt has the identifier replaced by the class noun (``a sks dog on the
  beach`` -> ``a dog on the beach``); the caller does the replacement and says which form it passes with
  ``text_form`` (``"class noun"``, the default, or ``"raw"``), which :meth:`describe` records.
* **CLIP-I**: per generated image, the mean cosine with every reference image of the concept; its mean over images is
  the mean over all generated x reference pairs.
* **TI-CLIP**: cosine between an image and a given scene text (e.g. the prompt's context without the subject).

Scale: **raw cosine** in [-1, 1] (the DreamBooth paper's; not CLIPScore's 2.5 x max(cos, 0) nor torchmetrics' 100 x
cos). Every result records the backbone, its pretrained tag and the scale.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import Metric
from .loading import MetricModel, load_metric_model

DEFAULT_CLIP = "builtin:toy-clip"  # CPU friendly; for papers' numbers use ViT-B-32 + openai


class _ClipMetric(Metric):
    def __init__(self, model: MetricModel | str = DEFAULT_CLIP, *, pretrained: str | None = None,
                 batch_size: int = 32, progress: bool = True, device: str | torch.device | None = None,
                 allow_pickle: bool = False):
        super().__init__(batch_size=batch_size, progress=progress)
        if not isinstance(model, MetricModel):
            model = load_metric_model(model, pretrained=pretrained, library="open_clip",
                                      device=device or "cpu", allow_pickle=allow_pickle)
        elif device is not None:
            model.model.to(device)
        if model.library != "open_clip":
            raise ValueError(f"{self.name} needs an open_clip model, but {model.source} is a {model.library} model")
        self.clip = model

    @torch.no_grad()
    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.clip.preprocess(im) for im in images]).to(self.clip.device)
        return self.clip.model.encode_image(pixels, normalize=True).float().cpu()

    @torch.no_grad()
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip.tokenizer(texts).to(self.clip.device)
        return self.clip.model.encode_text(tokens, normalize=True).float().cpu()

    def _image_text(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(texts))  # each distinct text is encoded once (4 images a prompt is typical)
        text_features = self._batched(unique, self._embed_texts, f"{self.name} texts")
        row = {t: i for i, t in enumerate(unique)}
        image_features = self._batched(images, self._embed_images, self.name)
        return (image_features * text_features[[row[t] for t in texts]]).sum(dim=1)

    def compute(self, images, prompts, references) -> torch.Tensor:  # image vs text (CLIP-I overrides)
        return self._image_text(images, prompts)

    def describe(self) -> dict:
        info = self.clip.describe()
        return {"metric": self.name, "backbone": info.pop("backbone"), "pretrained": info.pop("pretrained"),
                "scale": "raw cosine", **info}


class ClipTextScore(_ClipMetric):
    """CLIP-T: ``metric(images, prompts)`` -> cosine of each image with its prompt (one per image, or one for all)."""

    name = "CLIP-T"
    needs_prompts = True

    def __init__(self, model: MetricModel | str = DEFAULT_CLIP, *, text_form: str = "class noun", **kwargs):
        if text_form not in ("class noun", "raw"):
            raise ValueError(f"text_form must be 'class noun' (identifier replaced by the class noun) or 'raw', "
                             f"not {text_form!r}")
        self.text_form = text_form
        super().__init__(model, **kwargs)

    def describe(self) -> dict:
        text = ("prompt with the identifier replaced by the class noun" if self.text_form == "class noun"
                else "raw prompt, identifier included")
        return {**super().describe(), "text": text}


class TIClipScore(_ClipMetric):
    """TI-CLIP: ``metric(images, scene_texts)`` -> cosine of each image with a given scene text."""

    name = "TI-CLIP"
    needs_prompts = True

    def describe(self) -> dict:
        return {**super().describe(), "text": "given scene text"}


class ClipImageScore(_ClipMetric):
    """CLIP-I: ``metric(images, references=concept_images)`` -> per image, mean cosine with every reference image.

    Reference embeddings are cached per concept (by image content), so scoring many prompts of one concept embeds
    its pictures once.
    """

    name = "CLIP-I"
    needs_references = True

    def compute(self, images, prompts, references) -> torch.Tensor:
        return self._pairwise_with_references(images, references)

    def describe(self) -> dict:
        return {**super().describe(), "aggregation": "per image: mean over reference images (all pairs)"}
