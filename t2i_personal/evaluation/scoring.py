"""Scoring the evaluation's images: every registered metric per image (:func:`score`), and set-level FID / KID of
each model's images against a reference folder (:func:`set_distances`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelLoadError
from ..weights import hub_offline
from .layout import ImageRow
from .registry import INPUT_CLASS_PROMPT, INPUT_CONCEPTS, INPUT_REFERENCES, METRICS, MetricOptions
from .sources import Source


def score(rows: list[ImageRow], sources: Sequence[Source], prompts: Sequence[Sequence[Any]],
          metrics: dict[str, Any]) -> dict[str, dict]:
    """Fill ``row.scores`` for every metric (NaN where a metric does not apply, e.g. TI-CLIP of a prompt without a
    scene); returns each metric's ``describe()``. Each metric runs batched over all images of a model at once."""
    from ..data.images import load_image_rgb

    images = [load_image_rgb(r.path) for r in tqdm(rows, desc="loading images", unit="img", leave=False,
                                                     disable=len(rows) < 2)]
    table = _ScoreTable(rows, sources, prompts, images)
    for name, metric in metrics.items():
        spec = METRICS[name]
        values = [math.nan] * len(rows)
        extras = {c: [math.nan] * len(rows) for c in spec.extra_columns}
        if spec.input == INPUT_CONCEPTS:
            table.by_concepts(name, metric, values, extras)
        elif spec.input == INPUT_REFERENCES:
            table.by_references(name, metric, values)
        else:
            table.by_text("class_prompt" if spec.input == INPUT_CLASS_PROMPT else "scene", metric, values)
        for row, v in zip(rows, values):
            row.scores[name] = float(v)
        for c, vs in extras.items():
            for row, v in zip(rows, vs):
                row.scores[f"{name}_{c}"] = float(v)
    return {name: metric.describe() for name, metric in metrics.items()}


class _ScoreTable:
    """The images with their sources and prompts; each method fills one metric's per-image ``values``."""

    def __init__(self, rows: list[ImageRow], sources: Sequence[Source], prompts: Sequence[Sequence[Any]], images):
        self.rows, self.sources, self.prompts, self.images = rows, sources, prompts, images
        self.source_of = {s.name: i for i, s in enumerate(sources)}

    def _prompt(self, row: ImageRow):
        return self.prompts[self.source_of[row.model]][row.prompt_index]

    def _references(self, name: str, s: int, c: int) -> list[Path]:
        refs = self.sources[s].references[c] if c < len(self.sources[s].references) else []
        if not refs:
            raise ConfigError(f"{name} needs reference images of concept {self.sources[s].concepts[c]} of "
                              f"{self.sources[s].name}: pass --references DIR")
        return refs

    def by_concepts(self, name: str, metric, values: list, extras: dict[str, list]) -> None:
        # group by (model, the prompt's concepts): the references are embedded once per composition
        comp: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i, row in enumerate(self.rows):
            cs = tuple(self._prompt(row).concept_indices)
            if cs:  # a prompt showing no concept is not scored (NaN)
                comp.setdefault((self.source_of[row.model], cs), []).append(i)
        for (s, cs), idx in comp.items():
            concepts = [{"name": self.sources[s].concepts[c]["identifier"],
                         "class_noun": self.sources[s].concepts[c]["class_noun"],
                         "references": self._references(name, s, c)} for c in cs]
            batch = [self.images[i] for i in idx]
            result = metric.evaluate(batch, concepts) if hasattr(metric, "evaluate") else None
            out = result.per_image if result is not None else metric(batch, concepts)
            for i, v in zip(idx, out.tolist()):
                values[i] = v
            for c in extras:
                for i, v in zip(idx, torch.as_tensor(getattr(result, c)).tolist()):
                    extras[c][i] = v

    def by_references(self, name: str, metric, values: list) -> None:
        # group by (model, concept): the reference embeddings are computed once per concept
        groups: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(self.rows):
            for c in self._prompt(row).concept_indices:
                groups.setdefault((self.source_of[row.model], c), []).append(i)
        sums: dict[int, list[float]] = {}
        for (s, c), idx in groups.items():
            out = metric([self.images[i] for i in idx], references=self._references(name, s, c))
            for i, v in zip(idx, out.tolist()):
                sums.setdefault(i, []).append(v)
        for i, vs in sums.items():  # a multi-concept prompt: mean over its concepts
            values[i] = sum(vs) / len(vs)

    def by_text(self, attr: str, metric, values: list) -> None:
        idx, texts = [], []
        for i, row in enumerate(self.rows):
            text = getattr(self._prompt(row), attr)
            if text:
                idx.append(i)
                texts.append(text)
        if idx:
            out = metric([self.images[i] for i in idx], texts)
            for i, v in zip(idx, out.tolist()):
                values[i] = v


_FID_HINT = ("(On the command line: --fid-feature builtin:toy-clip, or --fid-feature /path/to/a/local/dino-or-open_clip "
             "folder.)")


def check_fid_feature(feature: str) -> None:
    """Fail before any generation where the default Inception extractor cannot load: torch-fidelity missing, or
    its weights neither in torch hub's cache nor downloadable (``HF_HUB_OFFLINE`` set)."""
    from ..metrics.fid import INCEPTION, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL

    if feature != INCEPTION:
        return
    try:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        _TORCH_FIDELITY_AVAILABLE = False
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModelLoadError("--fid-feature inception (the default) needs the torch-fidelity package (pip install "
                             f"torch-fidelity) and its weights {INCEPTION_WEIGHTS_FILE}; torch-fidelity is not "
                             f"installed. {_FID_HINT} Such numbers are not comparable with Inception FIDs.")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file() and hub_offline():
        raise ModelLoadError(f"--fid-feature inception (the default): its weights {INCEPTION_WEIGHTS_FILE} are not in "
                             f"{cached.parent} and this machine is offline (HF_HUB_OFFLINE); download "
                             f"{INCEPTION_WEIGHTS_URL} to that folder. {_FID_HINT}")


def set_distances(rows: list[ImageRow], sources: Sequence[Source], reference: str | Path,
                  options: MetricOptions) -> tuple[dict[str, dict], dict]:
    """Set-level FID and KID (:class:`~t2i_personal.metrics.ImageSetDistance`, feature extractor
    ``options.fid_feature``) of each model's images (all prompts together) against the ``reference`` folder.

    Returns ``({model: {"fid", "kid", "kid_std", "kid_x1e3", "kid_std_x1e3", "kid_subset_size",
    "feature_extractor", "count_generated", "count_reference", "reference", ...}}, describe())``.
    """
    from ..metrics import ImageSetDistance

    try:
        metric = ImageSetDistance(options.fid_feature, pretrained=options.fid_pretrained,
                                  batch_size=options.batch_size, progress=options.progress, device=options.device,
                                  allow_pickle=options.allow_pickle)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--fid-feature {options.fid_feature}: {exc} {_FID_HINT}") from exc
    out: dict[str, dict] = {}
    for source in sources:
        paths = [r.path for r in rows if r.model == source.name]
        try:
            result = metric.evaluate(paths, str(reference))
        except ValueError as exc:  # fewer than 2 images on a side
            raise ConfigError(f"FID/KID of {source.name} against --fid-reference {reference}: {exc}") from exc
        info = result.to_dict()
        out[source.name] = {"fid": info.get("fid"), "kid": info.get("kid"), "kid_std": info.get("kid_std"),
                            "kid_x1e3": info.get("kid_x1e3"), "kid_std_x1e3": info.get("kid_std_x1e3"),
                            "kid_subset_size": info.get("kid_subset_size"),
                            "feature_extractor": info.get("feature_extractor"),
                            "count_generated": result.count_generated, "count_reference": result.count_reference,
                            "reference": str(reference), **({"note": info["note"]} if "note" in info else {})}
    return out, metric.describe()
