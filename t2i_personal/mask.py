"""Automatic subject masks for the masked loss (``data.masks: files``), written as ``img.mask.png`` beside each
image for you to look at and fix before training:

    python -m t2i_personal.mask data/my-dog --class-noun dog
    python -m t2i_personal.mask data/my-dog --class-noun dog --threshold 0.5 --overwrite
    python -m t2i_personal.mask data/my-dog --class-noun dog --soft

A segmentation model through transformers scores every pixel for the class noun:

* a text-prompted one (CLIPSeg, Lüddecke & Ecker 2022; default ``CIDAS/clipseg-rd64-refined``, or any hub id /
  local folder of a ``CLIPSegForImageSegmentation``): the sigmoid of its logits for the class noun;
* a semantic-segmentation one (any ``AutoModelForSemanticSegmentation`` whose labels include the class noun, e.g.
  a SegFormer; ``builtin:toy-segmenter`` for toy-world photos): the softmax probability of that label, upsampled
  to the image. The threshold cuts that probability, not the arg-max: at 0.3 a pixel can be subject while another
  label is likelier, which errs towards keeping the subject whole.

The probability, resized to the image, is cut at ``--threshold`` (0.3 by default, as OneTrainer's CLIPSeg masking)
into white subject / black background, or kept as soft weights with ``--soft``. Existing masks are kept unless
``--overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from .data.images import mask_file_for, save_image_atomic
from .data.side_files import batches_to_write, load_transformers_model, side_file_parser
from .errors import UserError

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
TOY_SEGMENTER = "builtin:toy-segmenter"


class ClipSegMasker:
    def __init__(self, source: str = DEFAULT_MODEL, device: str = "cpu"):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.processor, self.model = load_transformers_model(CLIPSegForImageSegmentation, CLIPSegProcessor, source,
                                                             device, "segmentation model")
        self.device = device

    def __call__(self, images: list[Image.Image], text: str) -> list[np.ndarray]:
        """Per image, the subject probability of every pixel, (H, W) float in [0, 1]."""
        import torch

        inputs = self.processor(text=[text] * len(images), images=images, padding="max_length",
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits.reshape(len(images), *self.model_output_size(inputs))
        probabilities = torch.sigmoid(logits.float())[:, None]
        return [torch.nn.functional.interpolate(p[None], size=(im.height, im.width), mode="bilinear",
                                                align_corners=False)[0, 0].cpu().numpy()
                for p, im in zip(probabilities, images)]

    @staticmethod
    def model_output_size(inputs) -> tuple[int, int]:
        return tuple(inputs["pixel_values"].shape[-2:])


class LabelMasker:
    """A semantic-segmentation model: the class noun must be one of its labels (case-insensitive)."""

    def __init__(self, source: str = TOY_SEGMENTER, device: str = "cpu"):
        from .freecure.masks import load_semantic_segmentation
        from .toyworld.segmenter import DEFAULT_PATH

        self.model, self.processor = load_semantic_segmentation(source, what="segmentation model",
                                                                builtins={TOY_SEGMENTER: DEFAULT_PATH}, device=device)
        self.source, self.device = source, device

    def label_id(self, class_noun: str) -> int:
        label2id = {name.lower(): int(i) for name, i in self.model.config.label2id.items()}
        if class_noun.lower() not in label2id:
            raise UserError(f"the segmentation model {self.source} has no label {class_noun!r}; its labels: "
                            f"{', '.join(sorted(label2id))}. Pass one of them as --class-noun, or use a text-prompted "
                            f"model (--model {DEFAULT_MODEL}).")
        return label2id[class_noun.lower()]

    def __call__(self, images: list[Image.Image], class_noun: str) -> list[np.ndarray]:
        import torch

        label = self.label_id(class_noun)
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        with torch.no_grad():
            probability = self.model(pixel_values=inputs["pixel_values"]).logits.float().softmax(1)[:, label:label + 1]
        # one channel upsampled, not every label's logits: 150 labels at 12 MP would be 7 GB an image
        return [torch.nn.functional.interpolate(p[None], size=(im.height, im.width), mode="bilinear",
                                                align_corners=False)[0, 0].cpu().numpy()
                for p, im in zip(probability, images)]


def load_masker(source: str, device: str = "cpu"):
    """The masker for ``source``: CLIPSeg checkpoints are text-prompted, anything else is read as a semantic
    segmenter (its config's ``model_type`` decides; the hub is asked only for a hub id)."""
    from transformers import AutoConfig

    from .weights import offline_error

    from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

    if source == TOY_SEGMENTER:
        return LabelMasker(source, device)
    if source.startswith("builtin:"):
        raise UserError(f"--model {source}: no such built-in segmentation model; the built-in one is {TOY_SEGMENTER}")
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"--model {source}: not a transformers model folder (no config.json)")
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
    except ValueError as exc:  # a config transformers cannot read (an unknown model_type)
        raise UserError(f"--model {source}: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise offline_error("segmentation model", source, exc, f"Download it where there is internet "
                            f"(huggingface-cli download {source}) or pass --model with a local folder.") from exc
    if model_type == "clipseg":
        return ClipSegMasker(source, device)
    if model_type not in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES:
        raise UserError(f"--model {source} is a {model_type!r} model; masks come from CLIPSeg or a semantic-"
                        f"segmentation model ({', '.join(sorted(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES))})")
    return LabelMasker(source, device)


def mask_folder(folder: str | Path, class_noun: str, masker, *, threshold: float | None = 0.3,
                overwrite: bool = False, batch_size: int = 8, progress: bool = True) -> list[Path]:
    """Write ``img.mask.png`` for every image of ``folder`` without one (all with ``overwrite``); returns them."""
    written = []
    for chunk in batches_to_write(folder, mask_file_for, what="mask", overwrite=overwrite, batch_size=batch_size,
                                  progress=progress):
        for (path, _), probability in zip(chunk, masker([image for _, image in chunk], class_noun)):
            values = probability >= threshold if threshold is not None else probability
            mask = Image.fromarray(np.round(values.astype(np.float32) * 255).astype(np.uint8), mode="L")
            written.append(save_image_atomic(mask, mask_file_for(path)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = side_file_parser("python -m t2i_personal.mask", __doc__, class_noun_help="what to segment, e.g. dog",
                              model=DEFAULT_MODEL, model_help=f"CLIPSeg or semantic-segmentation hub id or local folder, or {TOY_SEGMENTER}", files="masks")
    parser.add_argument("--threshold", type=float, default=0.3, help="subject where the probability reaches this")
    parser.add_argument("--soft", action="store_true", help="keep the probabilities as grey levels instead")
    args = parser.parse_args(argv)
    try:
        written = mask_folder(args.folder, args.class_noun, load_masker(args.model, args.device),
                              threshold=None if args.soft else args.threshold, overwrite=args.overwrite,
                              batch_size=args.batch_size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} masks ({', '.join(p.name for p in written[:3])}{', ...' if len(written) > 3 else ''}); "
          "look at them, then train with data.masks: files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
