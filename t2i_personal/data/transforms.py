"""The training transform: resize, crop and flip an image into a square tensor in [-1, 1].

:class:`ImageTransform` also implements Custom Diffusion's random-rescale augmentation (the subject pasted
small on a blank canvas or zoomed in, with a loss mask and a prompt prefix). ``plan`` computes the geometry
without pixels, so cached-latent training draws the same random numbers as pixel training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "RESCALE_CANVAS_VALUE",
    "RESCALE_LARGE_PREFIXES",
    "RESCALE_PREFIXES",
    "RESCALE_SMALL_PREFIXES",
    "ImageTransform",
    "TransformedImage",
]

# Custom Diffusion's random-rescale augmentation (Kumari et al. 2023, the official code and diffusers'
# examples/custom_diffusion): the scaled image sits on a canvas of zeros in [-1, 1] space (mid grey, as the
# official code pastes onto np.zeros after normalising), and the prompt says how far away the subject is.
RESCALE_CANVAS_VALUE = 0.0
RESCALE_SMALL_PROBABILITY = 0.66
RESCALE_SMALL_PREFIXES: tuple[str, ...] = ("a far away ", "very small ")  # scale < 0.6 * resolution
RESCALE_LARGE_PREFIXES: tuple[str, ...] = ("zoomed in ", "close up ")  # scale > resolution
RESCALE_PREFIXES: tuple[str, ...] = RESCALE_SMALL_PREFIXES + RESCALE_LARGE_PREFIXES


@dataclass(frozen=True)
class TransformedImage:
    """Output of :class:`ImageTransform`.

    ``crop_top_left`` is measured in the resized, un-flipped image (SDXL micro-conditioning). With the rescale
    augmentation the image is resized so its shorter side is ``rescale_size``; ``crop_top_left`` is then the
    top-left of what is taken from it (a ``rescale_size`` square that is pasted, or a ``resolution`` square),
    ``rescale_offset`` is where that square was pasted on the canvas (``rescale_size <= resolution``) or where the
    ``resolution`` crop sits inside the scaled square (``rescale_size > resolution``), ``mask`` is the loss mask at
    latent resolution and ``prompt_prefix`` the prefix for the prompt (or None).
    """

    pixels: torch.Tensor | None  # float32, (3, resolution, resolution), in [-1, 1]; None from ``plan``
    original_size: tuple[int, int]  # (h, w) before resizing
    crop_top_left: tuple[int, int]  # (top, left)
    flipped: bool
    resized_size: tuple[int, int] | None = None  # (w, h) after resizing the shorter side
    mask: torch.Tensor | None = None  # rescale only: float32 (1, resolution // f, resolution // f), 1 = in the loss
    prompt_prefix: str | None = None  # rescale only: "a far away ", "very small ", "zoomed in ", "close up " or None
    rescale_size: int | None = None  # rescale only: side of the scaled square image
    rescale_offset: tuple[int, int] | None = None  # rescale only: (top, left), see the class docstring


def _to_pixels(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return pixels / 127.5 - 1.0


class ImageTransform:
    """Resize shorter side, crop to a square and optionally flip; randomness from ``rng``.

    With ``rescale=True`` (Custom Diffusion's augmentation, for instance images) the image is instead resized to a
    random scale: with probability 0.66 a side drawn from ``[resolution // 3, resolution]``, pasted at a random
    position on a blank canvas (``RESCALE_CANVAS_VALUE``), with a latent-resolution loss mask that is 1 over the
    pasted region shrunk by a one-latent-pixel margin; otherwise a side drawn from
    ``[int(1.2 * resolution), int(1.4 * resolution))`` and randomly cropped to ``resolution``, mask all ones.
    ``center_crop`` then decides how the scaled square is taken from a non-square image. A scale below
    ``0.6 * resolution`` prefixes the prompt with "a far away " / "very small ", a scale above ``resolution`` with
    "zoomed in " / "close up ". ``vae_scale_factor`` (pixels per latent pixel) sets the mask's resolution.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False, *,
                 rescale: bool = False, vae_scale_factor: int | None = None):
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if rescale:
            if (not isinstance(vae_scale_factor, int) or isinstance(vae_scale_factor, bool) or vae_scale_factor <= 0):
                raise ValueError(f"rescale needs vae_scale_factor, a positive integer (pixels per latent pixel), "
                                 f"got {vae_scale_factor!r}")
            if resolution % vae_scale_factor:
                raise ValueError(f"resolution {resolution} is not a multiple of vae_scale_factor {vae_scale_factor}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rescale = bool(rescale)
        self.vae_scale_factor = vae_scale_factor

    def __repr__(self) -> str:
        extra = f", rescale=True, vae_scale_factor={self.vae_scale_factor}" if self.rescale else ""
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}{extra})"
        )

    def without_rescale(self) -> "ImageTransform":
        """The same transform with the rescale augmentation off (what prior samples get)."""
        return ImageTransform(self.resolution, self.center_crop, self.random_flip)

    def full_mask(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """An all-ones loss mask at latent resolution, (1, h, w) (for samples that are not rescaled); ``size`` is
        the (width, height) the image is cut to (default the square ``resolution``)."""
        if not self.vae_scale_factor:
            raise ValueError("full_mask needs vae_scale_factor")
        width, height = size or (self.resolution, self.resolution)
        return torch.ones(1, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def plan(self, size: tuple[int, int], rng: random.Random, target: tuple[int, int] | None = None) -> TransformedImage:
        """The geometry (resized size, crop, flip) for an image of ``size`` = (width, height), without pixels, cut to
        ``target`` = (width, height) (default the ``resolution`` square; an aspect-ratio bucket otherwise).

        Draws from ``rng`` exactly as ``__call__`` does, so cached-latent training sees the same flips."""
        if self.rescale:
            return self._plan_rescale(size, rng)
        width, height = size
        new_w, new_h, top, left = self._cover(size, target or (self.resolution, self.resolution), rng)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        return TransformedImage(pixels=None, original_size=(height, width), crop_top_left=(top, left),
                                flipped=flipped, resized_size=(new_w, new_h))

    def _cover(self, size: tuple[int, int], target, rng: random.Random) -> tuple[int, int, int, int]:
        """(new_w, new_h, top, left): resized to just cover ``target`` ((width, height), or a square's side), and
        where the ``target`` rectangle is cut."""
        target_w, target_h = (target, target) if isinstance(target, int) else target
        width, height = size
        scale = max(target_w / width, target_h / height)
        new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        if self.center_crop:
            # Same rounding as the diffusers training scripts, so crop coords match.
            return new_w, new_h, int(round((new_h - target_h) / 2.0)), int(round((new_w - target_w) / 2.0))
        # Always draw both so rng consumption does not depend on the aspect ratio.
        return new_w, new_h, rng.randint(0, new_h - target_h), rng.randint(0, new_w - target_w)

    def _plan_rescale(self, size: tuple[int, int], rng: random.Random) -> TransformedImage:
        res, f = self.resolution, self.vae_scale_factor
        width, height = size
        # The official draws (np.random.randint, exclusive high): [res // 3, res + 1) or [1.2 res, 1.4 res).
        if rng.random() < RESCALE_SMALL_PROBABILITY:
            side = rng.randint(res // 3, res)
        else:
            low, high = int(1.2 * res), int(1.4 * res)
            side = rng.randint(low, max(low, high - 1))
        # The scaled square inside the resized image: centred or random, as without the augmentation.
        new_w, new_h, sq_top, sq_left = self._cover(size, side, rng)
        # Where the square goes on the canvas (side <= res), or where the crop sits inside it (side > res).
        outer, inner = (res, side) if side <= res else (side, res)
        top, left = rng.randint(0, outer - inner), rng.randint(0, outer - inner)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        latent = res // f
        if side > res:
            mask = torch.ones(1, latent, latent)
            crop = (sq_top + top, sq_left + left)
        else:
            mask = torch.zeros(1, latent, latent)
            # The official margin: latent rows top // f + 1 .. (top + side) // f - 1 (exclusive).
            mask[0, top // f + 1: (top + side) // f - 1, left // f + 1: (left + side) // f - 1] = 1.0
            crop = (sq_top, sq_left)
        if side < 0.6 * res:
            prefix = rng.choice(RESCALE_SMALL_PREFIXES)
        elif side > res:
            prefix = rng.choice(RESCALE_LARGE_PREFIXES)
        else:
            prefix = None
        return TransformedImage(pixels=None, original_size=(height, width), crop_top_left=crop, flipped=flipped,
                                resized_size=(new_w, new_h), mask=mask, prompt_prefix=prefix, rescale_size=side,
                                rescale_offset=(top, left))

    def __call__(self, image: Image.Image, rng: random.Random, target: tuple[int, int] | None = None) -> TransformedImage:
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = self.plan(image.size, rng, target)
        if self.rescale:
            return self._apply_rescale(image, plan)
        (width, height), (top, left) = target or (self.resolution, self.resolution), plan.crop_top_left
        if plan.resized_size != image.size:
            # PIL's bilinear filter widens its support when downscaling (antialiased).
            image = image.resize(plan.resized_size, Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + width, top + height))
        pixels = _to_pixels(image)
        if plan.flipped:
            pixels = pixels.flip(-1)
        return TransformedImage(pixels=pixels.contiguous(), original_size=plan.original_size,
                                crop_top_left=plan.crop_top_left, flipped=plan.flipped, resized_size=plan.resized_size)

    def subject_mask(self, mask: Image.Image, plan: TransformedImage, background_weight: float,
                     target: tuple[int, int] | None = None) -> torch.Tensor:
        """A per-image subject mask ("L", white = subject) through the same resize, crop and flip as its image,
        averaged down to latent resolution: (1, h, w) loss weights, 1 on the subject and ``background_weight``
        elsewhere (``data.masks``)."""
        (width, height), (top, left) = target or (self.resolution, self.resolution), plan.crop_top_left
        if plan.resized_size != mask.size:
            mask = mask.resize(plan.resized_size, Image.Resampling.BILINEAR)
        values = torch.from_numpy(np.asarray(mask.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0)
        if plan.flipped:
            values = values.flip(-1)
        f = self.vae_scale_factor
        values = torch.nn.functional.adaptive_avg_pool2d(values[None, None], (height // f, width // f))[0]
        return values + background_weight * (1.0 - values)

    def _apply_rescale(self, image: Image.Image, plan: TransformedImage) -> TransformedImage:
        res, side, (top, left) = self.resolution, plan.rescale_size, plan.crop_top_left
        if plan.resized_size != image.size:
            image = image.resize(plan.resized_size, Image.Resampling.BILINEAR)
        taken = min(side, res)  # the pasted square, or the final crop
        content = _to_pixels(image.crop((left, top, left + taken, top + taken)))
        if plan.flipped:  # the content, not the canvas: the mask stays where the content is
            content = content.flip(-1)
        if side > res:
            pixels = content
        else:
            pixels = torch.full((3, res, res), RESCALE_CANVAS_VALUE, dtype=torch.float32)
            y, x = plan.rescale_offset
            pixels[:, y: y + side, x: x + side] = content
        return TransformedImage(pixels=pixels.contiguous(), original_size=plan.original_size,
                                crop_top_left=plan.crop_top_left, flipped=plan.flipped, resized_size=plan.resized_size,
                                mask=plan.mask, prompt_prefix=plan.prompt_prefix, rescale_size=side,
                                rescale_offset=plan.rescale_offset)
