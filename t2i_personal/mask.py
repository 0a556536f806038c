"""Automatic subject masks for the masked loss (``data.masks: files``), written as ``img.mask.png`` beside each
image for you to look at and fix before training:

    python -m t2i_personal.mask data/my-dog --class-noun dog
    python -m t2i_personal.mask data/my-dog --class-noun dog --threshold 0.5 --overwrite
    python -m t2i_personal.mask data/my-dog --class-noun dog --soft

A text-prompted segmentation model through transformers (CLIPSeg, Lüddecke & Ecker 2022; default
``CIDAS/clipseg-rd64-refined``, or any hub id / local folder of a ``CLIPSegForImageSegmentation``) scores every
pixel for the class noun; the sigmoid of its logits, resized to the image, is cut at ``--threshold`` (0.3 by
default, as OneTrainer's CLIPSeg masking) into white subject / black background, or kept as soft weights with
``--soft``. Existing masks are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .data.images import load_image_folder, mask_file_for, save_image_atomic
from .errors import UserError

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"


class ClipSegMasker:
    def __init__(self, source: str = DEFAULT_MODEL, device: str = "cpu"):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        from .weights import offline_error

        try:
            self.processor = CLIPSegProcessor.from_pretrained(source)
            self.model = CLIPSegForImageSegmentation.from_pretrained(source, use_safetensors=True).to(device).eval()
        except OSError as exc:
            raise offline_error("segmentation model", source, exc,
                                f"Download it where there is internet (huggingface-cli download {source}) or pass "
                                "--model with a local folder.") from exc
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


def mask_folder(folder: str | Path, class_noun: str, masker, *, threshold: float | None = 0.3,
                overwrite: bool = False, batch_size: int = 8, progress: bool = True) -> list[Path]:
    """Write ``img.mask.png`` for every image of ``folder`` without one (all with ``overwrite``); returns them."""
    todo = [(path, image) for path, image in load_image_folder(folder, what="images to mask")
            if overwrite or not mask_file_for(path).exists()]
    written = []
    for start in tqdm(range(0, len(todo), batch_size), desc="masking", unit="batch", disable=not progress):
        chunk = todo[start:start + batch_size]
        for (path, _), probability in zip(chunk, masker([image for _, image in chunk], class_noun)):
            values = probability >= threshold if threshold is not None else probability
            mask = Image.fromarray(np.round(values.astype(np.float32) * 255).astype(np.uint8), mode="L")
            written.append(save_image_atomic(mask, mask_file_for(path)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2i_personal.mask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of instance images")
    parser.add_argument("--class-noun", required=True, help="what to segment, e.g. dog")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="CLIPSeg hub id or local folder")
    parser.add_argument("--threshold", type=float, default=0.3, help="subject where the probability reaches this")
    parser.add_argument("--soft", action="store_true", help="keep the probabilities as grey levels instead")
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        written = mask_folder(args.folder, args.class_noun, ClipSegMasker(args.model, args.device),
                              threshold=None if args.soft else args.threshold, overwrite=args.overwrite)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} masks ({', '.join(p.name for p in written[:3])}{', ...' if len(written) > 3 else ''}); "
          "look at them, then train with data.masks: files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
