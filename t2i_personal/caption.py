"""Automatic captions for instance images, written as side files for you to read and edit before training:

    python -m t2i_personal.caption data/my-dog --class-noun dog
    python -m t2i_personal.caption data/my-dog --class-noun dog --model Salesforce/blip-image-captioning-large
    python -m t2i_personal.caption data/toy-dog --class-noun dog --model builtin:toy-oracle

Each image ``dog1.jpg`` gets ``dog1.txt`` (existing ones are kept unless ``--overwrite``), written atomically. A
caption always holds the identifier: the first mention of the class noun becomes ``{V} {C}`` ("a dog on the grass"
-> "a {V} {C} on the grass"); a caption without it gets ``a photo of {V} {C}, `` in front. Training renders
``{V}``/``{C}`` (``data/captions.py``), and ``data.caption_dropout`` sometimes trains with the bare instance prompt.

Captioners: a transformers BLIP captioning model (hub id or local folder; default
``Salesforce/blip-image-captioning-base``), or ``builtin:toy-oracle``, which describes toy-world renders from the
toy world's oracle's readings (class, colour, pattern, scene, accessories) in the world's own caption language.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .atomic import write_text_atomic
from .data.captions import caption_path_for
from .data.side_files import batches_to_write, load_transformers_model, side_file_parser
from .errors import UserError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
TOY_ORACLE = "builtin:toy-oracle"


def with_identifier(caption: str, class_noun: str) -> str:
    """``caption`` with its first mention of ``class_noun`` as ``{V} {C}`` (or ``a photo of {V} {C}, `` in front)."""
    caption = " ".join(caption.strip().split())
    if "{V}" in caption:
        return caption
    pattern = re.compile(rf"\b{re.escape(class_noun)}\b", re.IGNORECASE)
    if pattern.search(caption):
        return pattern.sub("{V} {C}", caption, count=1)
    return f"a photo of {{V}} {{C}}, {caption}" if caption else "a photo of {V} {C}"


class BlipCaptioner:
    """A transformers BLIP captioning model (``BlipForConditionalGeneration``), greedy decoding."""

    def __init__(self, source: str, device: str = "cpu", max_new_tokens: int = 30):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.processor, self.model = load_transformers_model(BlipForConditionalGeneration, BlipProcessor, source,
                                                             device, "captioning model")
        self.device, self.max_new_tokens = device, max_new_tokens

    def __call__(self, images) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class ToyOracleCaptioner:
    """Toy-world renders described from the oracle's readings, as ``world.describe`` words them."""

    def __init__(self, device: str = "cpu"):
        from .toyworld.oracle import Oracle

        self.oracle = Oracle.from_pretrained(device=device)

    def __call__(self, images) -> list[str]:
        from .toyworld import world

        captions = []
        for r in self.oracle.read(images):
            scene = world.Scene(cls=r["cls"], colour=r["colour"] or "red", pattern=r["pattern"] or "plain",
                                scene=r["scene"], hat=r["hat"], glasses=bool(r["glasses"]),
                                hair_colour=r["hair_colour"] or "black", hair_length=r["hair_length"] or "short",
                                expression=r["expression"] or "neutral")
            caption = world.describe(scene, full=True)
            if r["scarf"]:  # the oracle reads whether there is a scarf, not its colour
                caption = caption.replace(" wearing ", " wearing a scarf and ", 1) if " wearing " in caption else \
                    re.sub(rf"\b({re.escape(world.NOUN[r['cls']])})\b", r"\1 wearing a scarf", caption, count=1)
            captions.append(caption)
        return captions


def load_captioner(model: str = DEFAULT_MODEL, device: str = "cpu"):
    return ToyOracleCaptioner(device) if model == TOY_ORACLE else BlipCaptioner(model, device)


def caption_folder(folder: str | Path, class_noun: str, captioner, *, overwrite: bool = False, batch_size: int = 8,
                   progress: bool = True) -> list[Path]:
    """Write a caption file for every image of ``folder`` that has none (all with ``overwrite``); returns them."""
    written = []
    for chunk in batches_to_write(folder, caption_path_for, what="caption", overwrite=overwrite,
                                  batch_size=batch_size, progress=progress):
        for (path, _), caption in zip(chunk, captioner([image for _, image in chunk])):
            target = caption_path_for(path)
            write_text_atomic(target, with_identifier(caption, class_noun) + "\n")
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = side_file_parser("python -m t2i_personal.caption", __doc__,
                              class_noun_help="what the subject is (its first mention becomes {V} {C})",
                              model=DEFAULT_MODEL, model_help=f"BLIP hub id or local folder, or {TOY_ORACLE}",
                              files="caption files")
    args = parser.parse_args(argv)
    try:
        written = caption_folder(args.folder, args.class_noun, load_captioner(args.model, args.device),
                                 overwrite=args.overwrite, batch_size=args.batch_size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"{path}: {path.read_text().strip()}")
    print(f"wrote {len(written)} caption files; read and edit them, then train (they are used as the images' prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
