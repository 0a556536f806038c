"""What an evaluation scores: trained results (generated here) and folders of existing images, each a
:class:`Source` with its concepts and their reference images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, ModelLoadError
from ..record import RECORD_NAME, read_record
from ..training.checkpoint import checkpoint_label

#: the name of a model's FreeCure twin (``--freecure``): generated with attribute repair, scored beside it
FREECURE_SUFFIX = "+freecure"


@dataclass
class Source:
    """One thing being evaluated: a trained result (``model_dir``) or a folder of existing images (``images_dir``).

    ``concepts``: ``[{"identifier", "class_noun"}]``; ``references``: per concept, the reference image files.
    """

    name: str
    concepts: list[dict]
    references: list[list[Path]]
    model_dir: Path | None = None
    images_dir: Path | None = None
    resolution: int | None = None
    record: dict | None = None
    freecure: bool = False  # generate with FreeCure attribute repair (a second source of the same model)


def _instance_dirs(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _reference_files(dirs: Sequence[str], model_dir: Path | None) -> list[Path]:
    from ..data.images import list_image_files

    files: list[Path] = []
    for d in dirs:
        candidates = [Path(d).expanduser()]
        if model_dir is not None and not candidates[0].is_absolute():
            candidates += [model_dir / d, model_dir.parent / d]
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            raise ConfigError(f"reference image folder {d} (a concept's instance_dir"
                              f"{' in ' + str(model_dir) if model_dir else ''}) does not exist here; pass "
                              "--references DIR (once per concept) to point at the concept's images")
        files += list_image_files(folder)
    return files


def load_model_source(model_dir: str | Path, references: Sequence[str] | None = None,
                      need_references: bool = True) -> Source:
    """A trained result: its concepts and reference images from ``personalization.json`` (the reference folders
    are only looked up with ``need_references``)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder (expected a training output_dir holding "
                          "personalization.json, or a checkpoints/checkpoint-*/ folder)")
    try:
        folder, record = read_record(path)
    except ModelLoadError as exc:
        raise ConfigError(f"--model {model_dir} is not a t2i-personal result: {exc}") from exc
    concepts = [{"identifier": c["identifier"], "class_noun": c["class_noun"]} for c in record.get("concepts", [])]
    if not concepts:
        raise ConfigError(f"{folder / RECORD_NAME} lists no concepts")
    config = record.get("config", {})
    cfg_concepts = config.get("concepts", [])
    if not need_references:
        refs = [[] for _ in concepts]
    elif references:
        if len(references) != len(concepts):
            raise ConfigError(f"{len(references)} --references folders for {len(concepts)} concepts of {model_dir}")
        refs = [_reference_files([r], None) for r in references]
    else:
        refs = [_reference_files(_instance_dirs(c.get("instance_dir")), path.resolve()) if i < len(cfg_concepts)
                else [] for i, c in enumerate(cfg_concepts or concepts)]
    resolution = config.get("data", {}).get("resolution")
    name = checkpoint_label(path) or path.resolve().name
    return Source(name, concepts, refs, model_dir=path, resolution=resolution, record=record)


def load_images_source(images_dir: str | Path, concepts: Sequence[dict], references: Sequence[str] | None,
                       name: str | None = None) -> Source:
    """A folder of existing images laid out as ``DIR/<prompt-index>-<slug>/*.png`` (what :func:`generate` writes)."""
    path = Path(images_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--images {images_dir}: no such folder")
    refs = [_reference_files([r], None) for r in references] if references else [[] for _ in concepts]
    if references and len(references) != len(concepts):
        raise ConfigError(f"{len(references)} --references folders for {len(concepts)} concepts")
    return Source(name or path.resolve().name, list(concepts), refs, images_dir=path)


def parse_concept(text: str) -> dict:
    """``"sks:dog"`` or ``"sks:corgi dog"`` -> ``{"identifier": "sks", "class_noun": "dog"}``."""
    identifier, sep, noun = text.partition(":")
    if not sep or not identifier.strip() or not noun.strip():
        raise ConfigError(f"--concept {text!r}: expected IDENTIFIER:CLASS_NOUN, e.g. sks:dog")
    return {"identifier": identifier.strip(), "class_noun": noun.strip()}


def make_names_distinct(sources: Sequence[Source]) -> None:
    """Distinct folder names, also against names that already end in -N."""
    taken: set[str] = set()
    for s in sources:
        base, n = s.name, 0
        while s.name in taken:
            n += 1
            s.name = f"{base}-{n}"
        taken.add(s.name)


def with_freecure_twins(sources: Sequence[Source]) -> list[Source]:
    """Each trained result followed by its FreeCure twin; after :func:`make_names_distinct`, so "dog-1" pairs with
    "dog-1+freecure"."""
    return [v for s in sources for v in
            ([s, replace(s, name=s.name + FREECURE_SUFFIX, freecure=True)] if s.model_dir is not None else [s])]
