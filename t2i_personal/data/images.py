"""Safe image loading, folder scanning, training transforms and image saving.

Everything that reads user-supplied images goes through :func:`load_image_rgb`, so
decompression bombs, corrupt files, EXIF rotation and exotic pixel modes are handled
in one place and always produce an 8-bit RGB image or an :class:`ImageLoadError`
that names the offending path.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "RESCALE_CANVAS_VALUE",
    "RESCALE_LARGE_PREFIXES",
    "RESCALE_PREFIXES",
    "RESCALE_SMALL_PREFIXES",
    "ImageLoadError",
    "ImageTransform",
    "TransformedImage",
    "list_image_files",
    "load_image_folder",
    "load_image_rgb",
    "make_image_grid",
    "save_image_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)

MAX_IMAGE_PIXELS = 64_000_000

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Modes whose tRNS/GIF transparency PIL can expand into an alpha channel.
_TRNS_MODES = frozenset({"1", "L", "P", "RGB"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class ImageLoadError(ValueError):
    """An image file or folder could not be used; the message names the path."""


def _accepted_extensions() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


# ---------------------------------------------------------------------------
# Single image
# ---------------------------------------------------------------------------


def load_image_rgb(path: PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``path`` as a fully decoded 8-bit RGB image with EXIF orientation applied.

    Raises :class:`ImageLoadError` (naming the file) for missing, corrupt, truncated or
    oversized (``width * height > max_pixels``) images.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"Image file {path} does not exist; check the path.")
    if not path.is_file():
        raise ImageLoadError(f"Image path {path} is not a file; point it at an image file.")

    try:
        # Our own max_pixels check below replaces PIL's process-wide limit, so PIL's
        # warning would only be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # im.size comes from the header: check it before decoding any pixels.
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageLoadError(_too_large_message(path, width, height, max_pixels))
                # load() inside the try so truncated/corrupt pixel data surfaces here.
                im.load()
                image = _apply_exif_orientation(im, path)
                rgb = _to_rgb8(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses at open() time above 2 * Image.MAX_IMAGE_PIXELS, before our check.
        raise ImageLoadError(
            f"Image file {path} was refused by Pillow as a possible decompression bomb "
            f"({exc}); the limit here is {max_pixels:,} pixels. Downscale the image or "
            "remove it."
        ) from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageLoadError(
            f"Could not read image file {path}: {type(exc).__name__}: {exc}. "
            "The file is corrupt, truncated or not a supported image; "
            "re-export it or remove it from the folder."
        ) from exc

    if rgb.size[0] * rgb.size[1] > max_pixels:  # defensive: decoders may change size
        raise ImageLoadError(_too_large_message(path, rgb.size[0], rgb.size[1], max_pixels))
    return rgb


def _too_large_message(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"Image file {path} is {width}x{height} = {width * height:,} pixels, more than "
        f"the limit of {max_pixels:,} pixels (possible decompression bomb); downscale "
        "the image or, if you trust the file, raise data.max_image_pixels in the training config."
    )


def _apply_exif_orientation(im: Image.Image, path: Path) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as exc:
        # A malformed EXIF block should not cost us an otherwise valid image.
        warnings.warn(
            f"Ignoring unreadable EXIF orientation in {path} ({type(exc).__name__}: {exc}); "
            "the image is used as stored.",
            stacklevel=3,
        )
        return im
    return im if out is None else out


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to a new, detached 8-bit RGB image."""
    if im.mode == "La":  # premultiplied; Pillow only converts it to LA
        im = im.convert("LA")
    mode = im.mode
    if mode in _ALPHA_MODES or (mode in _TRNS_MODES and "transparency" in im.info):
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy()
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im).astype(np.uint16)
        return _grey_to_rgb((arr >> 8).astype(np.uint8))
    if mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            return _grey_to_rgb(_minmax_to_uint8(arr.astype(np.float64)))
        # 32-bit int images from 16-bit sources hold 0..65535: keep the high byte.
        return _grey_to_rgb((arr >> 8).astype(np.uint8))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return _grey_to_rgb(np.round(arr * 255.0).astype(np.uint8))
        return _grey_to_rgb(_minmax_to_uint8(arr))
    if mode == "LAB":
        # Image.convert would reinterpret L*a*b* bytes as RGB; a colour transform is needed.
        from PIL import ImageCms

        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(im, transform)
    # 1, L, P (opaque), CMYK, YCbCr, RGBX, HSV...: Pillow's converters are correct.
    return im.convert("RGB")


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")


# ---------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------


def list_image_files(folder: PathLike) -> list[Path]:
    """Sorted image files directly in ``folder`` (no recursion, no hidden files)."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageLoadError(
            f"Image folder {folder} does not exist; it must be a folder of images "
            f"({_accepted_extensions()})."
        )
    if not folder.is_dir():
        raise ImageLoadError(
            f"Image folder {folder} is not a folder; it must be a folder of images "
            f"({_accepted_extensions()})."
        )
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise ImageLoadError(f"Could not list image folder {folder}: {exc}") from exc
    files = [
        p
        for p in entries
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return sorted(files)


def load_image_folder(
    folder: PathLike,
    *,
    what: str = "instance images",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[tuple[Path, Image.Image]]:
    """Load every image in ``folder``; unusable files are skipped with one warning.

    Raises :class:`ImageLoadError` if the folder has no image files or none can be loaded.
    """
    folder = Path(folder)
    files = list_image_files(folder)
    if not files:
        raise ImageLoadError(
            f"The {what} folder {folder} contains no image files (accepted extensions: "
            f"{_accepted_extensions()}; hidden files are ignored); add images to it or "
            "point the config at the right folder."
        )

    loaded: list[tuple[Path, Image.Image]] = []
    failures: list[tuple[Path, str]] = []
    for file in files:
        try:
            loaded.append((file, load_image_rgb(file, max_pixels=max_pixels)))
        except ImageLoadError as exc:
            failures.append((file, str(exc)))

    if failures:
        listing = "\n".join(f"  - {p}: {reason}" for p, reason in failures)
        if not loaded:
            raise ImageLoadError(
                f"None of the {len(files)} file(s) in the {what} folder {folder} could be "
                f"loaded; fix or replace them:\n{listing}"
            )
        warnings.warn(
            f"Skipped {len(failures)} of {len(files)} file(s) in the {what} folder "
            f"{folder}:\n{listing}",
            stacklevel=2,
        )
    return loaded


# ---------------------------------------------------------------------------
# Training transform
# ---------------------------------------------------------------------------


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

    def full_mask(self) -> torch.Tensor:
        """An all-ones loss mask at latent resolution, (1, h, w) (for samples that are not rescaled)."""
        if not self.vae_scale_factor:
            raise ValueError("full_mask needs vae_scale_factor")
        side = self.resolution // self.vae_scale_factor
        return torch.ones(1, side, side)

    def plan(self, size: tuple[int, int], rng: random.Random) -> TransformedImage:
        """The geometry (resized size, crop, flip) for an image of ``size`` = (width, height), without pixels.

        Draws from ``rng`` exactly as ``__call__`` does, so cached-latent training sees the same flips."""
        if self.rescale:
            return self._plan_rescale(size, rng)
        width, height = size
        new_w, new_h, top, left = self._cover(size, self.resolution, rng)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        return TransformedImage(pixels=None, original_size=(height, width), crop_top_left=(top, left),
                                flipped=flipped, resized_size=(new_w, new_h))

    def _cover(self, size: tuple[int, int], side: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(new_w, new_h, top, left): resized so the shorter side is ``side``, and where the ``side`` square is cut."""
        width, height = size
        scale = side / min(width, height)
        new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
        if self.center_crop:
            # Same rounding as the diffusers training scripts, so crop coords match.
            return new_w, new_h, int(round((new_h - side) / 2.0)), int(round((new_w - side) / 2.0))
        # Always draw both so rng consumption does not depend on the aspect ratio.
        return new_w, new_h, rng.randint(0, new_h - side), rng.randint(0, new_w - side)

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

    def __call__(self, image: Image.Image, rng: random.Random) -> TransformedImage:
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = self.plan(image.size, rng)
        if self.rescale:
            return self._apply_rescale(image, plan)
        res, (top, left) = self.resolution, plan.crop_top_left
        if plan.resized_size != image.size:
            # PIL's bilinear filter widens its support when downscaling (antialiased).
            image = image.resize(plan.resized_size, Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + res, top + res))
        pixels = _to_pixels(image)
        if plan.flipped:
            pixels = pixels.flip(-1)
        return TransformedImage(pixels=pixels.contiguous(), original_size=plan.original_size,
                                crop_top_left=plan.crop_top_left, flipped=plan.flipped, resized_size=plan.resized_size)

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


# ---------------------------------------------------------------------------
# Saving and grids
# ---------------------------------------------------------------------------


def save_image_atomic(image: Image.Image, path: PathLike) -> Path:
    """Write ``image`` to ``path`` via a temp file in the same folder and ``os.replace``.

    The format follows the suffix (.png, .jpg/.jpeg, .webp). Returns the final path.
    """
    path = Path(path)
    fmt = _SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot save image to {path}: unsupported suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(_SAVE_FORMATS))}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG" and image.mode != "RGB":
        image = _to_rgb8(image)

    # Leading dot: list_image_files ignores a temp file left behind by a crash.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 honours the umask, unlike tempfile's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
            image.save(fh, format=fmt, **kwargs)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def make_image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Paste ``images`` into a near-square RGB grid on white.

    With ``rows`` given, columns are ``ceil(n / rows)`` and fully empty rows are dropped.
    Cells are as large as the largest image; smaller images are centred in their cell.
    """
    if not images:
        raise ValueError("make_image_grid needs at least one image.")
    n = len(images)
    if rows is None:
        cols = math.ceil(math.sqrt(n))
    else:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        cols = math.ceil(n / rows)
    rows = math.ceil(n / cols)

    cell_w = max(im.size[0] for im in images)
    cell_h = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        rgb = im if im.mode == "RGB" else _to_rgb8(im)
        x = c * cell_w + (cell_w - im.size[0]) // 2
        y = r * cell_h + (cell_h - im.size[1]) // 2
        grid.paste(rgb, (x, y))
    return grid
