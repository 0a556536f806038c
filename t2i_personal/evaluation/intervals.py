"""Intervals for a figure measured over several training runs, each read on many images.

A figure such as "the subject is recognised in 0.72 of the images" varies for two reasons: which images were drawn
(within one run) and how the run itself came out (its training seed; another machine's floating point acts like
another seed, and a LoRA tuned hard amplifies it). The interval here covers both, by a two-level percentile
bootstrap (Davison & Hinkley, 1997, §3.8): draw the training seeds with replacement, then within each drawn seed its
images with replacement, and take the mean of what was drawn; the 2.5 / 97.5 percentiles of ``resamples`` such means
are the 95 % interval. With one training seed it covers the images only, and says so (``seeds == 1``).

A *difference* between two runs (a method against the baseline) is paired: both trained with the same seeds and
read on the same prompts and noise seeds, so one resample draws seed and image indices once and applies them to
both; the interval of the mean difference is far narrower than the two intervals side by side suggest, because
the shared luck (an easy seed, an easy prompt) cancels.

The interval of the mean says where the figure of *these* runs lies; where *one more* run (a user's, on another
machine) should land is wider: :func:`one_run_interval` draws a single training seed, then its images, so it
spans the run-to-run spread itself. Seen through few seeds it is still too narrow (it knows only their spread).

``scores`` are ``[seeds, images]`` arrays (0/1 outcomes or any per-image score), one row per training seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    seeds: int
    images: int  # per seed

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 2, signed: bool = False) -> str:
        """``0.72 [0.61, 0.83]``; signed (a difference): ``+0.12 [-0.03, +0.27]``, with `` ~0`` appended when the
        interval contains 0 (no evidence of a difference)."""
        f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        text = f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}]"
        return text + (" ~0" if signed and not self.excludes_zero else "")

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "seeds": self.seeds, "images": self.images}


def _as_grid(scores) -> np.ndarray:
    grid = np.asarray(scores, dtype=np.float64)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"scores must be [training seeds, images] with at least one of each, not shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("scores contain NaN or infinity: score every image, or drop the images that cannot be read")
    return grid


def _resampled_means(grids: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """The bootstrap means of each grid, drawn with the same seed and image indices for all (pairing)."""
    seeds, images = grids[0].shape
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(0, seeds, size=(resamples, seeds))
    image_index = rng.integers(0, images, size=(resamples, seeds, images))
    return [grid[seed_index[..., None], image_index].mean(axis=(1, 2)) for grid in grids]


def _interval(point: float, means: np.ndarray, shape: tuple[int, int]) -> Interval:
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(point), float(low), float(high), *shape)


def bootstrap_interval(scores, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of ``scores`` (``[seeds, images]``) with its two-level 95 % percentile-bootstrap interval."""
    grid = _as_grid(scores)
    return _interval(grid.mean(), _resampled_means([grid], resamples, seed)[0], grid.shape)


def paired_difference(scores, baseline, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of ``scores − baseline`` with its paired two-level interval; both ``[seeds, images]``, row *i* of each
    trained with the same seed and column *j* read on the same prompt and noise."""
    a, b = _as_grid(scores), _as_grid(baseline)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same training seeds and images on both sides: shapes "
                         f"{a.shape} and {b.shape}")
    mine, theirs = _resampled_means([a, b], resamples, seed)
    return _interval(a.mean() - b.mean(), mine - theirs, a.shape)


def one_run_interval(scores, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Where one more training run's figure (read on as many images) should land: the 2.5 / 97.5 percentiles of
    the mean of one drawn training seed's images, drawn with replacement. ``mean`` is the mean of ``scores``."""
    grid = _as_grid(scores)
    seeds, images = grid.shape
    rng = np.random.default_rng(seed)
    drawn = grid[rng.integers(0, seeds, size=(resamples, 1)), rng.integers(0, images, size=(resamples, images))]
    return _interval(grid.mean(), drawn.mean(axis=1), grid.shape)
