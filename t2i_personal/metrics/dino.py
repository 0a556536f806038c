"""DINO-I: subject fidelity as the cosine of DINO ViT [CLS] features of generated and reference images.

Protocol (DreamBooth; ImagenHub's and CustomConcept101's ``evaluate.py``): ``dino_vits16`` (on the hub:
``facebook/dino-vits16``), images resized so the shorter side is 256 (bicubic), center-cropped to 224, scaled to
[0, 1] and normalised with the ImageNet mean and std; the feature is the final-layer-normed [CLS] token
(``last_hidden_state[:, 0]``). Per generated image, the score is the mean cosine with every reference image, so the
mean over images is the mean over all generated x reference pairs. Raw cosine, like the CLIP metrics.

The hub's ``facebook/dino-vits16`` image processor resizes straight to 224 x 224 (no crop), which is not the
protocol, so by default the preprocessing here is explicit; ``preprocess="processor"`` uses the model's own image
processor instead.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import Metric
from .loading import MetricModel, load_metric_model

DEFAULT_DINO = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoImageScore(Metric):
    """DINO-I: ``metric(images, references=concept_images)`` -> per image, mean cosine with every reference image."""

    name = "DINO-I"
    needs_references = True

    def __init__(self, model: MetricModel | str = DEFAULT_DINO, *, resize: int = 256, crop: int = 224,
                 preprocess: str = "protocol", batch_size: int = 32, progress: bool = True,
                 device: str | torch.device | None = None, allow_pickle: bool = False):
        super().__init__(batch_size=batch_size, progress=progress)
        if preprocess not in ("protocol", "processor"):
            raise ValueError(f"preprocess must be 'protocol' (resize {resize} -> crop {crop}, ImageNet "
                             f"normalisation) or 'processor' (the model's image processor), not {preprocess!r}")
        if not isinstance(model, MetricModel):
            model = load_metric_model(model, library="transformers", device=device or "cpu",
                                      allow_pickle=allow_pickle)
        elif device is not None:
            model.model.to(device)
        if model.library != "transformers":
            raise ValueError(f"DINO-I needs a transformers ViT, but {model.source} is a {model.library} model")
        if preprocess == "processor" and model.preprocess is None:
            raise ValueError(f"{model.source} has no image processor (preprocessor_config.json); use "
                             "preprocess='protocol'")
        self.dino = model
        self.preprocess_mode = preprocess
        self.resize, self.crop = resize, crop
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def protocol_pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, crop, crop): shorter side to ``resize`` (bicubic), center crop, [0, 1], ImageNet normalisation."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        image = TF.resize(image, self.resize, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [self.crop, self.crop])
        return (TF.to_tensor(image) - self._mean) / self._std

    @torch.no_grad()
    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        if self.preprocess_mode == "protocol":
            pixels = torch.stack([self.protocol_pixels(im) for im in images])
        else:
            pixels = self.dino.preprocess(images=images, return_tensors="pt")["pixel_values"]
        out = self.dino.model(pixel_values=pixels.to(self.dino.device, torch.float32))
        cls = out.last_hidden_state[:, 0].float()
        return torch.nn.functional.normalize(cls, dim=-1).cpu()

    def compute(self, images, prompts, references) -> torch.Tensor:
        return self._pairwise_with_references(images, references)

    def describe(self) -> dict:
        info = self.dino.describe()
        preprocess = (f"resize shorter side {self.resize} (bicubic) -> center-crop {self.crop}, ImageNet mean/std"
                      if self.preprocess_mode == "protocol" else "the model's image processor")
        return {"metric": self.name, "backbone": info.pop("backbone"), "pretrained": info.pop("pretrained"),
                "scale": "raw cosine", "feature": "last_hidden_state[:, 0] ([CLS])", "preprocess": preprocess,
                "aggregation": "per image: mean over reference images (all pairs)", **info}
