"""BLIP image-text scores: ClassDiffusion's "BLIP2-T" (really BLIP-1 ITC) and a true BLIP-2 ITC variant.

ClassDiffusion's official code (its ``utils/blip2t.py``) scores a generated
image against its prompt (identifier replaced by the class noun) with ``Salesforce/blip-itm-large-coco`` loaded as
``BlipForImageTextRetrieval`` and called with ``use_itm_head=False``: the image [CLS] through ``vision_proj`` and the
text [CLS] (BERT, no cross-attention) through ``text_proj``, both L2-normalised, dot product. That is an **ITC
cosine** in [-1, 1] (no temperature, no softmax, not the ITM head) from **BLIP-1**, despite the paper's name.
Images go through the checkpoint's ``BlipProcessor`` (384 x 384). The official code runs fp16 on a GPU; here the
model runs float32, so the last digits may differ.

``variant="blip2"`` uses a true BLIP-2 (``Blip2ForImageTextRetrieval``, default ``Salesforce/blip2-itm-vit-g``) with
``use_image_text_matching_head=False``: the max over the Q-Former's query tokens of the cosine between the projected
query embeddings and the projected text [CLS]. Its numbers are not comparable with the "BLIP2-T" column of
ClassDiffusion's table.

>>> blip = BlipTextScore()                                  # ClassDiffusion's checkpoint and path
>>> blip(images, ["a dog wearing a headphone"] * len(images))
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from .base import Metric
from .cp_clip import load_model_and_processor

VARIANTS = {
    "blip1-itc": {"default": "Salesforce/blip-itm-large-coco",
                  "name": "BLIP-ITC (BLIP-1, the official ClassDiffusion 'BLIP2-T')",
                  "feature": "normalize(vision_proj(image [CLS])) . normalize(text_proj(text [CLS])) "
                             "(BlipForImageTextRetrieval, use_itm_head=False)"},
    "blip2": {"default": "Salesforce/blip2-itm-vit-g",
              "name": "BLIP-2 ITC",
              "feature": "max over Q-Former query tokens of normalize(vision_projection(query)) . "
                         "normalize(text_projection(text [CLS])) "
                         "(Blip2ForImageTextRetrieval, use_image_text_matching_head=False)"},
}


class BlipTextScore(Metric):
    """``metric(images, prompts)`` -> BLIP ITC cosine of each image with its prompt (one per image, or one for all).

    ``variant``: ``"blip1-itc"`` (default; ClassDiffusion's "BLIP2-T") or ``"blip2"``. ``model``: a local folder
    (``save_pretrained`` layout, model + processor, safetensors) or a hub id; default: the variant's checkpoint.
    ``text_form`` records what the caller passes (``"class noun"``: identifier replaced by the class noun, the
    paper's convention, or ``"raw"``).
    """

    name = "BLIP2-T"
    needs_prompts = True

    def __init__(self, model: str | os.PathLike | None = None, *, variant: str = "blip1-itc",
                 text_form: str = "class noun", batch_size: int = 32, progress: bool = True,
                 device: str | torch.device | None = None, allow_pickle: bool = False):
        super().__init__(batch_size=batch_size, progress=progress)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        if text_form not in ("class noun", "raw"):
            raise ValueError(f"text_form must be 'class noun' or 'raw', not {text_form!r}")
        if variant == "blip1-itc":
            from transformers import BlipForImageTextRetrieval as model_cls
            from transformers import BlipProcessor as processor_cls
        else:
            from transformers import Blip2ForImageTextRetrieval as model_cls
            from transformers import Blip2Processor as processor_cls
        self.variant, self.text_form = variant, text_form
        self.source = str(model) if model is not None else VARIANTS[variant]["default"]
        self.model, self.processor, self.pretrained = load_model_and_processor(
            model_cls, processor_cls, self.source, device=device or "cpu", allow_pickle=allow_pickle,
            what=VARIANTS[variant]["name"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _score_pairs(self, pairs: list[tuple[Image.Image, str]]) -> torch.Tensor:
        images, texts = [p[0] for p in pairs], [p[1] for p in pairs]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, torch.float32) if k == "pixel_values" else v.to(self.device))
                  for k, v in inputs.items()}
        if self.variant == "blip1-itc":
            sim = self.model(**inputs, use_itm_head=False).itm_score  # (images, texts)
        else:
            sim = self.model(**inputs, use_image_text_matching_head=False).logits_per_image
        return torch.diagonal(sim).float().cpu()

    def compute(self, images, prompts, references) -> torch.Tensor:
        return self._batched(list(zip(images, prompts)), self._score_pairs, self.name)

    def describe(self) -> dict:
        text = ("prompt with the identifier replaced by the class noun" if self.text_form == "class noun"
                else "raw prompt, identifier included")
        info = VARIANTS[self.variant]
        return {"metric": info["name"], "variant": self.variant, "backbone": type(self.model).__name__,
                "pretrained": self.pretrained, "scale": "raw cosine (ITC)", "feature": info["feature"],
                "preprocess": "the checkpoint's processor", "dtype": "float32", "text": text}
