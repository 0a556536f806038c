"""What the training samplers share: an endless stream of micro-batches that can start at any micro-batch."""

from __future__ import annotations

import torch


class EndlessBatchSampler(torch.utils.data.Sampler):
    """Yields ``self.batch(m)`` for m = start, start + 1, ... (subclasses define ``batch``)."""

    start = 0

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2**62
