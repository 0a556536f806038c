"""Concept data: instance images (+ per-image captions) and prior samples, as a deterministic dataset.

Every random choice (crop, flip, the rescale augmentation's scale, position and prompt prefix) is drawn from a
``random.Random`` seeded by (seed, epoch, index), and the sampler yields ``(index, epoch)`` pairs, so any
micro-batch can be rebuilt from its position in the stream: that is what makes resuming bit-exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .captions import prompt_for_image, render_prompt
from .images import load_image_alpha, load_image_folder, load_image_rgb, mask_file_for
from .buckets import nearest_bucket
from .sampling import EndlessBatchSampler
from .transforms import RESCALE_PREFIXES, ImageTransform


@dataclass
class Example:
    image: Image.Image
    path: Path
    prompt: str
    concept: int
    is_prior: bool
    bare_prompt: str | None = None  # an instance with a caption file: its concept's instance prompt (caption dropout)
    subject_mask: Image.Image | None = None  # data.masks: "L", white = subject, the image's size


def load_instance_examples(concepts, max_pixels: int, masks: str = "none") -> list[Example]:
    """Every instance image with its prompt (caption file or the concept's prompt) and, with ``masks`` ("files":
    ``img.mask.png`` beside ``img.png``; "alpha": the image's alpha channel), its subject mask."""
    examples = []
    for ci, concept in enumerate(concepts):
        for folder in concept.instance_dirs:
            for path, image in load_image_folder(folder, what=f"instance images of concept '{concept.identifier}'",
                                                 max_pixels=max_pixels):
                prompt = prompt_for_image(path, concept.instance_prompt, concept.identifier, concept.class_noun)
                bare = render_prompt(concept.instance_prompt, concept.identifier, concept.class_noun)
                mask = None if masks == "none" else subject_mask(path, image.size, masks, max_pixels)
                examples.append(Example(image, path, prompt, ci, False, bare if bare != prompt else None, mask))
    return examples


def subject_mask(image_path: Path, size: tuple[int, int], source: str, max_pixels: int) -> Image.Image:
    from ..errors import ConfigError

    if source == "alpha":
        mask = load_image_alpha(image_path, max_pixels=max_pixels)
        if mask is None:
            raise ConfigError(f"data.masks is 'alpha' but {image_path} has no alpha channel: save it as a PNG with "
                              f"transparency around the subject, or use data.masks: files with "
                              f"{mask_file_for(image_path).name}")
    else:
        path = mask_file_for(image_path)
        if not path.is_file():
            raise ConfigError(f"data.masks is 'files' but {image_path} has no mask {path.name} beside it (white = "
                              "subject, black = background, the image's size); add it or set data.masks: none")
        mask = load_image_rgb(path, max_pixels=max_pixels).convert("L")
    if mask.size != size:
        raise ConfigError(f"the subject mask of {image_path} is {mask.size[0]}x{mask.size[1]} but the image is "
                          f"{size[0]}x{size[1]}: masks must have their image's size")
    return mask


def class_prompt(concept) -> str:
    return render_prompt(concept.class_prompt, concept.identifier, concept.class_noun)


def rescale_prompt_variants(prompts) -> list[str]:
    """Every prefixed prompt the rescale augmentation can give ``prompts`` (the instance prompts)."""
    return [prefix + p for p in prompts for prefix in RESCALE_PREFIXES]


class ConceptDataset(torch.utils.data.Dataset):
    """Item ``(index, epoch)`` -> instance sample (+ the paired prior sample of the same concept).

    Concepts are balanced: item ``i`` belongs to concept ``i % K`` whatever each concept's image count, so with
    several concepts each is trained equally often (a concept with 3 photos is not drowned by one with 20).

    With a rescaling ``transform`` (``ImageTransform(rescale=True)``, Custom Diffusion's augmentation) only instance
    samples are rescaled and get its prompt prefix; prior samples use the same transform without it and an
    all-ones loss mask. ``prompt_index`` must then also hold the prefixed instance prompts
    (:func:`rescale_prompt_variants`).
    """

    def __init__(self, instances: list[Example], priors: list[list[Example]] | None, transform: ImageTransform,
                 prompt_index: dict[str, int], seed: int, with_pixels: bool = True, caption_dropout: float = 0.0,
                 mask_background_weight: float = 0.0, buckets: list[tuple[int, int]] | None = None):
        self.instances, self.priors = instances, priors
        self.transform, self.prompt_index, self.seed, self.with_pixels = transform, prompt_index, seed, with_pixels
        self.caption_dropout, self.mask_background_weight = caption_dropout, mask_background_weight
        self.masked = any(e.subject_mask is not None for e in instances)  # every sample then carries a loss mask
        self.prior_transform = transform.without_rescale() if transform.rescale else transform
        concepts = sorted({e.concept for e in instances})
        self.by_concept = [[i for i, e in enumerate(instances) if e.concept == c] for c in concepts]
        largest = max(max(len(g) for g in self.by_concept), max((len(p) for p in priors), default=0) if priors else 0)
        self.length = len(self.by_concept) * largest
        # data.buckets: the (width, height) each instance is cut to (its prior samples too); None: the square
        self.sizes = [nearest_bucket(e.image.size, buckets) for e in instances] if buckets else None

    def instance_position(self, index: int) -> int:
        members = self.by_concept[index % len(self.by_concept)]
        return members[(index // len(self.by_concept)) % len(members)]

    def item_sizes(self) -> list[tuple[int, int]]:
        """Per dataset index, the (width, height) its samples are cut to (what the bucket sampler groups by)."""
        side = self.transform.resolution
        return [self.sizes[self.instance_position(i)] if self.sizes else (side, side) for i in range(self.length)]

    def example_targets(self, key: tuple[bool, int]) -> list[tuple[int, int] | None]:
        """Every size an example is cut to (a prior image: each bucket of its concept's instances)."""
        if self.sizes is None:
            return [None]
        is_prior, pos = key
        if not is_prior:
            return [self.sizes[pos]]
        concept = self.example(key).concept
        return sorted({self.sizes[i] for i, e in enumerate(self.instances) if e.concept == concept})

    def __len__(self) -> int:
        return self.length

    def example_keys(self) -> list[tuple[bool, int]]:
        """Every (is_prior, position) this dataset can emit; latents are cached per key."""
        keys = [(False, i) for i in range(len(self.instances))]
        if self.priors:
            offset = 0
            for group in self.priors:
                keys += [(True, offset + j) for j in range(len(group))]
                offset += len(group)
        return keys

    def example(self, key: tuple[bool, int]) -> Example:
        is_prior, pos = key
        if not is_prior:
            return self.instances[pos]
        for group in self.priors:
            if pos < len(group):
                return group[pos]
            pos -= len(group)
        raise IndexError(key)

    def _sample(self, key, rng: random.Random, target: tuple[int, int] | None = None) -> dict:
        ex = self.example(key)
        transform = self.prior_transform if ex.is_prior else self.transform
        out = transform(ex.image, rng, target) if self.with_pixels else transform.plan(ex.image.size, rng, target)
        prompt = ex.prompt
        # drawn only when asked for, so runs without caption dropout keep their random streams
        if self.caption_dropout and not ex.is_prior and rng.random() < self.caption_dropout and ex.bare_prompt:
            prompt = ex.bare_prompt
        prompt = prompt if out.prompt_prefix is None else out.prompt_prefix + prompt
        if prompt not in self.prompt_index:
            raise KeyError(f"prompt {prompt!r} is not in the dataset's prompt index (with the rescale augmentation the "
                           "index must hold rescale_prompt_variants of the instance prompts)")
        mask = out.mask
        if ex.subject_mask is not None:
            mask = transform.subject_mask(ex.subject_mask, out, self.mask_background_weight, target)
        elif mask is None and (self.transform.rescale or self.masked):
            mask = self.transform.full_mask(target)  # prior samples: not rescaled or masked, the whole latent counts
        side = self.transform.resolution
        width, height = target or (side, side)
        return {"key": key, "prompt": self.prompt_index[prompt], "is_prior": ex.is_prior,
                "pixels": out.pixels, "flipped": out.flipped, "target": (width, height),
                "original_size": out.original_size, "crop_top_left": out.crop_top_left, "mask": mask}

    def __getitem__(self, item: tuple[int, int]) -> list[dict]:
        index, epoch = item
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        slot = index // len(self.by_concept)
        inst_pos = self.instance_position(index)
        target = self.sizes[inst_pos] if self.sizes else None
        samples = [self._sample((False, inst_pos), rng, target)]
        if self.priors:
            concept = self.instances[inst_pos].concept
            offset = sum(len(g) for g in self.priors[:concept])
            group = self.priors[concept]
            samples.append(self._sample((True, offset + slot % len(group)), rng, target))
        return samples


def collate(items: list[list[dict]]) -> dict:
    """Instances first, then their prior samples (as diffusers' DreamBooth concatenates them)."""
    flat = [s for item in items for s in item if not s["is_prior"]] + [s for item in items for s in item if s["is_prior"]]
    batch = {k: [s[k] for s in flat] for k in ("key", "prompt", "flipped", "original_size", "crop_top_left", "target")}
    batch["is_prior"] = torch.tensor([s["is_prior"] for s in flat])
    batch["pixels"] = torch.stack([s["pixels"] for s in flat]) if flat[0]["pixels"] is not None else None
    # loss masks (1, h, w) at latent resolution with the rescale augmentation, else None
    batch["mask"] = torch.stack([s["mask"] for s in flat]) if flat[0].get("mask") is not None else None
    return batch


class StreamBatchSampler(EndlessBatchSampler):
    """Micro-batches from an endless stream of per-epoch permutations, starting at any micro-batch.

    Global micro-batch ``m`` covers stream positions ``[m*B*P, (m+1)*B*P)``; process ``r`` of ``P`` takes its
    contiguous share. Position ``p`` is ``permutation(seed, p // N)[p % N]``.
    """

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, num_processes: int = 1, rank: int = 0):
        self.length, self.batch_size, self.seed, self.start = length, batch_size, seed, start
        self.num_processes, self.rank = num_processes, rank
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = torch.randperm(self.length, generator=g).tolist()
        return self._perm_cache[epoch]

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        first = (micro_step * self.num_processes + self.rank) * self.batch_size
        return [(self._perm(p // self.length)[p % self.length], p // self.length) for p in range(first, first + self.batch_size)]
