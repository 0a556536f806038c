"""Files written beside instance images for the user to read and edit (captions, subject masks)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from .images import load_image_folder


def batches_to_write(folder: str | Path, side_file: Callable[[Path], Path], *, what: str, overwrite: bool,
                     batch_size: int, progress: bool) -> Iterator[list[tuple[Path, object]]]:
    """Batches of (image path, image) of ``folder`` whose side file does not exist yet (all with ``overwrite``)."""
    todo = [(path, image) for path, image in load_image_folder(folder, what=f"images to {what}")
            if overwrite or not side_file(path).exists()]
    for start in tqdm(range(0, len(todo), batch_size), desc=f"{what}ing", unit="batch", disable=not progress):
        yield todo[start:start + batch_size]


def side_file_parser(prog: str, doc: str, *, class_noun_help: str, model: str, model_help: str,
                     files: str) -> argparse.ArgumentParser:
    """The arguments every side-file command takes: the folder, the class noun, the model, overwrite, device."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of instance images")
    parser.add_argument("--class-noun", required=True, help=class_noun_help)
    parser.add_argument("--model", default=model, help=model_help)
    parser.add_argument("--overwrite", action="store_true", help=f"replace existing {files}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def load_transformers_model(model_class, processor_class, source: str, device: str, what: str):
    """(processor, model in eval mode) from a hub id or local folder, safetensors only; offline: the error says how
    to get it."""
    from ..weights import offline_error

    try:
        processor = processor_class.from_pretrained(source)
        model = model_class.from_pretrained(source, use_safetensors=True).to(device).eval()
    except OSError as exc:
        raise offline_error(what, source, exc, f"Download it where there is internet (huggingface-cli download "
                                               f"{source}) or pass --model with a local folder.") from exc
    return processor, model
