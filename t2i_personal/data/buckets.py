"""Aspect-ratio buckets (``data.buckets``): images keep their shape instead of being cut to a square.

The buckets are the (width, height) pairs on a ``step`` grid with about the pixel count of the ``resolution``
square (w·h ≤ resolution²) and an aspect ratio between 1:``max_aspect`` and ``max_aspect``:1, the square
included. Each instance image goes to the bucket nearest its own aspect ratio (in log scale), is resized to cover it
and cropped by the transform as before; its prior sample is cut to the same bucket, so a micro-batch is one bucket.

:class:`BucketBatchSampler` makes, per epoch and from ``(seed, epoch)`` alone, a list of single-bucket micro-batches
(each bucket's items shuffled and chunked; a last partial chunk filled from the bucket's start) in shuffled order,
so the bucket order is a function of seed and step like everything else: resuming replays it, and process ``r`` of
``P`` takes micro-batches ``r, r + P, ...``.
"""

from __future__ import annotations

import math

import torch

from .sampling import EndlessBatchSampler


def bucket_sizes(resolution: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets, sorted by aspect ratio."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], -wh[0] * wh[1]))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest ``size``'s (log scale); the larger one on a tie."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


class BucketBatchSampler(EndlessBatchSampler):
    """Endless single-bucket micro-batches of ``(index, epoch)`` items, from any micro-batch on (see the module)."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int, start: int = 0, num_processes: int = 1,
                 rank: int = 0):
        self.groups = [[i for i, s in enumerate(sizes) if s == size] for size in sorted(set(sizes))]
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.num_processes, self.rank = num_processes, rank
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            batches = []
            for group in self.groups:
                order = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
                for first in range(0, len(order), self.batch_size):
                    batches.append([order[(first + k) % len(order)] for k in range(self.batch_size)])
            if len(self._epoch_cache) > 4:
                self._epoch_cache.clear()
            self._epoch_cache[epoch] = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return self._epoch_cache[epoch]

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        position = micro_step * self.num_processes + self.rank
        epoch = position // self.per_epoch
        return [(index, epoch) for index in self._epoch(epoch)[position % self.per_epoch]]
