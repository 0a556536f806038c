"""Safe image loading, folder scanning, image saving and grids.

Everything that reads user-supplied images goes through :func:`load_image_rgb`, so
decompression bombs, corrupt files, EXIF rotation and exotic pixel modes are handled
in one place and always produce an 8-bit RGB image or an :class:`ImageLoadError`
that names the offending path. The training transform lives in :mod:`.transforms`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..atomic import atomic_file
from ..errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
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


class ImageLoadError(UserError, ValueError):
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
    return load_image(path, max_pixels=max_pixels, convert=_to_rgb8)


def load_image_alpha(path: PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image | None:
    """The alpha channel of ``path`` as an 8-bit "L" image (EXIF orientation applied, checks as
    :func:`load_image_rgb`); ``None`` when the image has no transparency."""

    def alpha(im: Image.Image) -> Image.Image | None:
        if "A" not in im.getbands() and not (im.mode == "P" and "transparency" in im.info):
            return None
        return im.convert("RGBA").getchannel("A")

    return load_image(path, max_pixels=max_pixels, convert=alpha)


def load_image(path: PathLike, *, max_pixels: int, convert):
    """Open, check and decode ``path``, apply its EXIF orientation and return ``convert(image)``."""
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
                rgb = convert(image)
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

    if rgb is not None and rgb.size[0] * rgb.size[1] > max_pixels:  # defensive: decoders may change size
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


MASK_SUFFIX = ".mask.png"


def mask_file_for(image_path: PathLike) -> Path:
    """Where an image's subject mask lives: ``dog1.jpg`` -> ``dog1.mask.png`` (white = subject)."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def list_image_files(folder: PathLike) -> list[Path]:
    """Sorted image files directly in ``folder`` (no recursion, no hidden files, no ``*.mask.png`` subject masks)."""
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
        and not p.name.lower().endswith(MASK_SUFFIX)  # img.mask.png is img.png's subject mask (data.masks)
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
    if fmt == "JPEG" and image.mode != "RGB":
        image = _to_rgb8(image)
    # atomic_file's temp name starts with a dot, so list_image_files ignores one left behind by a crash.
    with atomic_file(path, "wb") as handle:
        image.save(handle, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return path


def make_image_grid(
    images: list[Image.Image], rows: int | None = None, *, columns: int | None = None
) -> Image.Image:
    """Paste ``images`` into a near-square RGB grid on white.

    With ``rows`` given, columns are ``ceil(n / rows)`` and fully empty rows are dropped.
    With ``columns`` given instead, the grid is exactly that wide (empty cells stay white).
    Cells are as large as the largest image; smaller images are centred in their cell.
    """
    if not images:
        raise ValueError("make_image_grid needs at least one image.")
    n = len(images)
    if rows is not None and columns is not None:
        raise ValueError("make_image_grid takes rows or columns, not both")
    if columns is not None:
        if columns < 1:
            raise ValueError(f"columns must be >= 1, got {columns}")
        cols = columns
    elif rows is None:
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
