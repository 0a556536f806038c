"""The common interface of personalization metrics, and the image handling they share.

A metric is called as ``metric(images, prompts=None, references=None)`` and returns one score per image as a float
tensor (on the CPU). :meth:`Metric.describe` says what was computed (metric, backbone, pretrained tag, scale,
preprocessing), and :meth:`Metric.evaluate` bundles both with the mean in a :class:`MetricResult`. Work is batched
(``batch_size`` images per forward pass; the batch size does not change results beyond float rounding) with a tqdm
progress bar (``progress=False`` silences it).

Images may be PIL images, file paths, uint8 arrays (H, W, 3) or (N, H, W, 3), or tensors (3, H, W) / (N, 3, H, W),
float in [0, 1] or uint8; a folder path stands for the images in it (sorted by name).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import list_image_files, load_image_rgb

SCALE = "raw cosine"


@dataclass
class MetricResult:
    """Per-image scores, their mean, and what was computed (``info`` is :meth:`Metric.describe`)."""

    per_image: torch.Tensor
    info: dict

    @property
    def mean(self) -> float:
        return float(self.per_image.mean()) if self.per_image.numel() else float("nan")

    def to_dict(self) -> dict:
        return {**self.info, "mean": self.mean, "count": int(self.per_image.numel()),
                "per_image": [float(v) for v in self.per_image]}


class Metric:
    """Base class: subclasses set ``name``, ``needs_prompts`` / ``needs_references`` and implement :meth:`compute`."""

    name: str = "metric"
    needs_prompts: bool = False
    needs_references: bool = False

    def __init__(self, batch_size: int = 32, progress: bool = True, max_cached_references: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        self._reference_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_cached_references = max_cached_references

    def __call__(self, images, prompts: str | Sequence[str] | None = None, references=None) -> torch.Tensor:
        pil = to_pil_list(images)
        if self.needs_prompts:
            if prompts is None:
                raise ValueError(f"{self.name} needs prompts (one per image, or one for all)")
            prompts = [prompts] * len(pil) if isinstance(prompts, str) else list(prompts)
            if len(prompts) != len(pil):
                raise ValueError(f"{self.name}: {len(pil)} images but {len(prompts)} prompts")
        if self.needs_references and references is None:
            raise ValueError(f"{self.name} needs reference images (the concept's real pictures)")
        if not pil:
            return torch.zeros(0)
        return self.compute(pil, prompts, references).float().cpu()

    def compute(self, images: list[Image.Image], prompts: list[str] | None, references) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"metric": self.name, "scale": SCALE}

    def evaluate(self, images, prompts=None, references=None) -> MetricResult:
        return MetricResult(self(images, prompts, references), self.describe())

    # -------------------------------------------------------------------------------------------- shared helpers

    def _batched(self, items: list, fn: Callable[[list], torch.Tensor], desc: str) -> torch.Tensor:
        """``fn`` on consecutive chunks of ``batch_size`` items, concatenated, with a progress bar."""
        out = []
        with tqdm(total=len(items), desc=desc, unit="img", disable=not self.progress or len(items) == 0,
                  leave=False) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                out.append(fn(chunk))
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.zeros(0)

    def reference_embeddings(self, references) -> torch.Tensor:
        """L2-normalised embeddings (R, D) of a concept's reference images, cached by their content.

        The cache key is a hash of the pixels, so the same concept's pictures are embedded once however they are
        passed (folder, list of paths, arrays) and changed pictures are never served stale embeddings.
        """
        pil = to_pil_list(references)
        if not pil:
            raise ValueError(f"{self.name}: the reference image set is empty")
        key = content_key(pil)
        cached = self._reference_cache.get(key)
        if cached is None:
            cached = self._batched(pil, self._embed_images, f"{self.name} references")
            self._reference_cache[key] = cached
            while len(self._reference_cache) > self.max_cached_references:
                self._reference_cache.popitem(last=False)
        else:
            self._reference_cache.move_to_end(key)
        return cached

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _pairwise_with_references(self, images: list[Image.Image], references) -> torch.Tensor:
        """Per generated image: mean cosine with every reference image (mean over all pairs = mean of these)."""
        refs = self.reference_embeddings(references)
        gen = self._batched(images, self._embed_images, self.name)
        return (gen @ refs.T).mean(dim=1)


# ------------------------------------------------------------------------------------------------------- images


def to_pil_list(images: Any) -> list[Image.Image]:
    """Images in any supported form (see the module docstring) as a list of RGB PIL images."""
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)):
        path = Path(images).expanduser()
        # the project's safe loader: EXIF rotation, exotic modes, size limits, a clear error naming a bad file
        files = list_image_files(path) if path.is_dir() else [path]
        return [load_image_rgb(p) for p in files]
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return [_from_array(images)]
        return [_from_array(a) for a in images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [_from_tensor(images)]
        return [_from_tensor(t) for t in images]
    out: list[Image.Image] = []
    for item in images:
        out.extend(to_pil_list(item))
    return out


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    return Image.fromarray(array[..., :3] if array.shape[-1] >= 3 else array[..., 0]).convert("RGB")


def _from_tensor(tensor: torch.Tensor) -> Image.Image:
    t = tensor.detach().cpu()
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    return _from_array(t.numpy())


def content_key(images: list[Image.Image]) -> str:
    digest = hashlib.sha1()
    for im in images:
        digest.update(f"{im.size}{im.mode}".encode())
        digest.update(im.tobytes())
    return digest.hexdigest()
