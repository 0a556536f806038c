"""Tests for t2i_personal.data.images."""

from __future__ import annotations

import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_personal.data.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    list_image_files,
    load_image_folder,
    load_image_rgb,
    make_image_grid,
    save_image_atomic,
)
from t2i_personal.data.transforms import ImageTransform, TransformedImage

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _close(actual, expected, tol=12):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


def _save_rgb(path: Path, size=(16, 12), color=RED) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width x height; pixel data is bogus."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 8) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------


def test_constants():
    assert IMAGE_EXTENSIONS == frozenset(
        {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    )
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert MAX_IMAGE_PIXELS == 64_000_000
    assert issubclass(ImageLoadError, ValueError)


# ---------------------------------------------------------------------------
# load_image_rgb: modes
# ---------------------------------------------------------------------------


def test_rgb_png_roundtrip_and_detached(tmp_path):
    path = _save_rgb(tmp_path / "a.png", (16, 12), GREEN)
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert img.size == (16, 12)
    assert img.getpixel((3, 3)) == GREEN
    assert getattr(img, "fp", None) is None
    os.remove(path)  # pixels must already be in memory
    assert img.copy().getpixel((0, 0)) == GREEN


def test_exif_orientation_6_rotates(tmp_path):
    # Stored 40x20 with a red 10x10 block at the stored top-left, rest blue.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(Image.new("RGB", (10, 10), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    img = load_image_rgb(path)
    assert img.size == (20, 40)  # width/height swapped
    # Stored top-left ends up at the displayed top-right.
    assert _close(img.getpixel((15, 4)), RED), img.getpixel((15, 4))
    assert _close(img.getpixel((4, 4)), BLUE), img.getpixel((4, 4))
    assert _close(img.getpixel((15, 35)), BLUE), img.getpixel((15, 35))


def test_rgba_composited_on_white(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((1, 0), (0, 255, 0, 255))  # opaque green
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    path = tmp_path / "rgba.png"
    im.save(path)
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE  # not red: alpha was composited, not dropped
    assert img.getpixel((1, 0)) == GREEN
    assert _close(img.getpixel((2, 0)), (127, 127, 127), tol=2)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    for name in ("p.png", "p.gif"):
        path = tmp_path / name
        im.save(path, transparency=0)
        with Image.open(path) as check:
            assert check.mode == "P" and "transparency" in check.info
        img = load_image_rgb(path)
        assert img.mode == "RGB"
        assert img.getpixel((0, 0)) == WHITE, name  # transparent black -> white
        assert img.getpixel((1, 0)) == RED, name


def test_la_composited_on_white(tmp_path):
    im = Image.new("LA", (3, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    im.putpixel((2, 0), (200, 255))
    path = tmp_path / "la.png"
    im.save(path)
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (0, 0, 0)
    assert img.getpixel((2, 0)) == (200, 200, 200)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert _close(img.getpixel((4, 4)), RED)


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 32768, 255, 0]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [
        (255,) * 3,
        (128,) * 3,
        (0,) * 3,  # 255 is dark in 16-bit; clipping would wrongly make it white
        (0,) * 3,
    ]


@pytest.mark.parametrize("array,mode,expected", [
    (np.array([[65535, 32768, 0]], dtype=">u2"), "I;16B", [255, 128, 0]),  # 16-bit big-endian: value >> 8
    (np.array([[0, 32768, 65535]], dtype=np.int32), "I", [0, 128, 255]),  # 32-bit int holding 16-bit data
    (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F", [0, 128, 255]),  # float in [0, 1]: x 255
], ids=["I;16B", "I", "F"])
def test_high_bit_depth_tiff_modes(tmp_path, array, mode, expected):
    path = tmp_path / "deep.tif"
    Image.fromarray(array).save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    img = load_image_rgb(path)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize("mode,value,expected", [("1", 1, WHITE), ("L", 77, (77, 77, 77))])
def test_bilevel_and_grey(tmp_path, mode, value, expected):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (4, 4), value).save(path)
    img = load_image_rgb(path)
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == expected


# ---------------------------------------------------------------------------
# load_image_rgb: errors
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path)
    assert str(path) in str(ei.value)
    assert "does not exist" in str(ei.value)


def test_directory_is_not_image(tmp_path):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(folder)
    assert str(folder) in str(ei.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(random.Random(0).randbytes(2048))
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "UnidentifiedImageError" in msg  # the underlying reason is kept
    assert isinstance(ei.value.__cause__, Exception)


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.png"
    Image.fromarray(noise).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "truncated" in msg.lower()


def test_decompression_bomb_own_limit(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)  # ~12 KB on disk, 100 MP declared
    assert path.stat().st_size < 100_000
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError) as ei:
            load_image_rgb(path, max_pixels=1_000_000)
    msg = str(ei.value)
    assert str(path) in msg
    assert "10000x10000" in msg
    assert "1,000,000" in msg
    assert Image.MAX_IMAGE_PIXELS == before  # no process-wide side effect
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_per_call(tmp_path):
    path = _save_rgb(tmp_path / "mid.png", (200, 100))
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path, max_pixels=19_999)
    assert str(path) in str(ei.value)
    assert load_image_rgb(path, max_pixels=20_000).size == (200, 100)
    assert load_image_rgb(path).size == (200, 100)


def test_header_only_bomb_refused_before_decoding(tmp_path):
    # Declared size beyond Pillow's own hard limit: Pillow raises at open() time.
    path = _write_png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path, max_pixels=10**12)
    assert str(path) in str(ei.value)
    assert "decompression bomb" in str(ei.value)
    assert "10000000000" in str(ei.value)  # Pillow's reason (declared pixel count) is kept


def test_header_only_bomb_below_pillow_limit(tmp_path):
    # 150 MP: Pillow only warns at open(); our header check must refuse before load().
    path = _write_png_header_only(tmp_path / "wide.png", 15_000, 10_000)
    with pytest.raises(ImageLoadError) as ei:
        load_image_rgb(path)
    assert str(path) in str(ei.value)
    assert "15000x10000" in str(ei.value)
    assert "64,000,000" in str(ei.value)


# ---------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------


def test_list_image_files_filters_and_sorts(tmp_path):
    _save_rgb(tmp_path / "b.png")
    _save_rgb(tmp_path / "a.JPG")
    _save_rgb(tmp_path / "c.webp")
    _save_rgb(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    _save_rgb(tmp_path / "sub.png" / "nested.png")
    files = list_image_files(tmp_path)
    assert [p.name for p in files] == ["a.JPG", "b.png", "c.webp"]
    assert all(isinstance(p, Path) for p in files)


def test_list_image_files_missing_and_not_folder(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ImageLoadError) as ei:
        list_image_files(missing)
    assert str(missing) in str(ei.value)
    assert "does not exist" in str(ei.value)
    assert "folder of images" in str(ei.value)

    a_file = _save_rgb(tmp_path / "x.png")
    with pytest.raises(ImageLoadError) as ei:
        list_image_files(a_file)
    assert str(a_file) in str(ei.value)
    assert "folder of images" in str(ei.value)


def test_load_folder_empty(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    _save_rgb(tmp_path / ".hidden.png")
    with pytest.raises(ImageLoadError) as ei:
        load_image_folder(tmp_path, what="class images")
    msg = str(ei.value)
    assert str(tmp_path) in msg
    assert "class images" in msg
    assert "no image files" in msg
    assert ".png" in msg and ".jpeg" in msg  # lists accepted extensions


def test_load_folder_only_corrupt(tmp_path):
    bad1 = tmp_path / "bad1.png"
    bad2 = tmp_path / "bad2.jpg"
    bad1.write_bytes(b"not an image")
    bad2.write_bytes(b"")
    with pytest.raises(ImageLoadError) as ei:
        load_image_folder(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg
    assert str(bad1) in msg and str(bad2) in msg


def test_load_folder_one_good_one_bad(tmp_path):
    good = _save_rgb(tmp_path / "good.png", (8, 8), BLUE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    _save_rgb(tmp_path / ".ignored.png")
    with pytest.warns(UserWarning) as record:
        loaded = load_image_folder(tmp_path)
    assert len(record) == 1
    msg = str(record[0].message)
    assert str(bad) in msg
    assert str(good) not in msg
    assert [p for p, _ in loaded] == [good]
    assert loaded[0][1].mode == "RGB" and loaded[0][1].getpixel((0, 0)) == BLUE


def test_load_folder_respects_max_pixels(tmp_path):
    _save_rgb(tmp_path / "small.png", (10, 10))
    big = _save_rgb(tmp_path / "big.png", (100, 100))
    with pytest.warns(UserWarning, match="big.png") as record:
        loaded = load_image_folder(tmp_path, max_pixels=1000)
    assert str(big) in str(record[0].message)
    assert [p.name for p, _ in loaded] == ["small.png"]


def test_load_folder_all_good_no_warning(tmp_path):
    for i in range(3):
        _save_rgb(tmp_path / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_image_folder(tmp_path)
    assert [p.name for p, _ in loaded] == ["0.png", "1.png", "2.png"]


def test_load_folder_missing(tmp_path):
    missing = tmp_path / "instance"
    with pytest.raises(ImageLoadError) as ei:
        load_image_folder(missing)
    assert str(missing) in str(ei.value)


# ---------------------------------------------------------------------------
# ImageTransform
# ---------------------------------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate(
        [np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
         np.full((height, width, 1), 60, np.float32)],
        axis=2,
    )
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_transform_shape_range_and_center_crop_wide():
    t = ImageTransform(64)
    out = t(_gradient(300, 200), random.Random(0))
    assert isinstance(out, TransformedImage)
    assert out.pixels.shape == (3, 64, 64)
    assert out.pixels.dtype == torch.float32
    assert out.pixels.min() >= -1.0 and out.pixels.max() <= 1.0
    assert out.original_size == (200, 300)
    # 300x200 -> 96x64, centred: left = (96 - 64) / 2
    assert out.crop_top_left == (0, 16)
    assert out.flipped is False


def test_transform_center_crop_tall_and_extremes():
    t = ImageTransform(64)
    out = t(Image.new("RGB", (100, 250), WHITE), random.Random(0))
    assert out.original_size == (250, 100)
    # 100x250 -> 64x160, centred: top = (160 - 64) / 2
    assert out.crop_top_left == (48, 0)
    assert torch.all(out.pixels == 1.0)
    black = t(Image.new("RGB", (64, 64), (0, 0, 0)), random.Random(0))
    assert torch.all(black.pixels == -1.0)
    assert black.crop_top_left == (0, 0)


def test_transform_upscales_small_images_and_converts_mode():
    out = ImageTransform(32)(Image.new("L", (10, 20), 255), random.Random(0))
    assert out.pixels.shape == (3, 32, 32)
    assert out.original_size == (20, 10)
    assert torch.allclose(out.pixels, torch.ones(3, 32, 32))


def test_transform_random_crop_matches_manual_crop():
    img = _gradient(300, 100)
    t = ImageTransform(50, center_crop=False)
    lefts = set()
    resized = np.asarray(img.resize((150, 50), Image.Resampling.BILINEAR), dtype=np.float32)
    for seed in range(8):
        out = t(img, random.Random(seed))
        top, left = out.crop_top_left
        assert top == 0 and 0 <= left <= 100
        lefts.add(left)
        expected = torch.from_numpy(resized[top : top + 50, left : left + 50]).permute(2, 0, 1)
        assert torch.allclose(out.pixels, expected / 127.5 - 1.0, atol=1e-6)
    assert len(lefts) > 1


def test_transform_deterministic_and_uses_only_given_rng():
    img = _gradient(120, 90)
    t = ImageTransform(48, center_crop=False, random_flip=True)
    py_state = random.getstate()
    torch_state = torch.get_rng_state()
    a = [t(img, random.Random(123)) for _ in range(2)]
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(a[0].pixels, a[1].pixels)
    assert a[0].crop_top_left == a[1].crop_top_left
    assert a[0].flipped == a[1].flipped

    # Same seed sequence -> same sequence of outputs, regardless of global seeding.
    def run(global_seed):
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        rng = random.Random(7)
        return [t(img, rng) for _ in range(5)]

    r1, r2 = run(1), run(2)
    for x, y in zip(r1, r2):
        assert torch.equal(x.pixels, y.pixels)
        assert (x.crop_top_left, x.flipped) == (y.crop_top_left, y.flipped)


def test_transform_flip_depends_on_seed():
    img = _gradient(64, 64)
    plain = ImageTransform(64)(img, random.Random(0))
    t = ImageTransform(64, random_flip=True)
    seen = set()
    for seed in range(20):
        out = t(img, random.Random(seed))
        seen.add(out.flipped)
        expected = plain.pixels.flip(-1) if out.flipped else plain.pixels
        assert torch.equal(out.pixels, expected)
        assert out.crop_top_left == plain.crop_top_left  # reported un-flipped
    assert seen == {True, False}
    # Without random_flip nothing is ever flipped.
    assert not any(ImageTransform(64)(img, random.Random(s)).flipped for s in range(20))


def test_transform_rejects_bad_resolution():
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError):
            ImageTransform(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# save_image_atomic
# ---------------------------------------------------------------------------


def test_save_png_and_jpeg(tmp_path):
    png = save_image_atomic(Image.new("RGB", (10, 8), RED), tmp_path / "out" / "a.png")
    assert png == tmp_path / "out" / "a.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (10, 8) and im.getpixel((0, 0)) == RED

    jpg = save_image_atomic(Image.new("RGBA", (10, 8), (0, 0, 255, 255)), tmp_path / "b.JPEG")
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert _close(im.getpixel((5, 4)), BLUE)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.JPEG", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "x.png"
    save_image_atomic(Image.new("RGB", (4, 4), RED), path)
    save_image_atomic(Image.new("RGB", (6, 6), GREEN), path)
    with Image.open(path) as im:
        assert im.size == (6, 6) and im.getpixel((0, 0)) == GREEN
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_save_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    save_image_atomic(Image.new("RGB", (4, 4), RED), path)

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(Image.new("RGB", (4, 4), GREEN), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == RED


def test_save_unsupported_suffix(tmp_path):
    path = tmp_path / "x.xyz"
    with pytest.raises(ValueError) as ei:
        save_image_atomic(Image.new("RGB", (2, 2)), path)
    assert str(path) in str(ei.value)
    assert not path.exists()


# ---------------------------------------------------------------------------
# make_image_grid
# ---------------------------------------------------------------------------


def test_grid_single_image():
    grid = make_image_grid([Image.new("RGB", (10, 7), RED)])
    assert grid.size == (10, 7) and grid.mode == "RGB"
    assert grid.getpixel((9, 6)) == RED


def test_grid_layouts():
    colors = [RED, GREEN, BLUE, (9, 9, 9), (200, 100, 50)]
    imgs = [Image.new("RGB", (10, 8), c) for c in colors]
    assert make_image_grid(imgs[:4]).size == (20, 16)  # 2x2
    grid = make_image_grid(imgs)  # 5 -> 3 cols x 2 rows
    assert grid.size == (30, 16)
    assert grid.getpixel((5, 4)) == RED
    assert grid.getpixel((25, 4)) == BLUE
    assert grid.getpixel((5, 12)) == (9, 9, 9)
    assert grid.getpixel((15, 12)) == (200, 100, 50)
    assert grid.getpixel((25, 12)) == WHITE  # empty cell
    assert make_image_grid(imgs[:3], rows=1).size == (30, 8)
    assert make_image_grid(imgs[:3], rows=3).size == (10, 24)
    assert make_image_grid(imgs[:4], rows=3).size == (20, 16)  # empty rows dropped


def test_grid_mixed_sizes_and_modes():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    grid = make_image_grid([Image.new("RGB", (10, 10), RED), transparent])
    assert grid.size == (20, 10)
    assert grid.getpixel((15, 5)) == WHITE  # transparent image composited on white


def test_grid_errors():
    with pytest.raises(ValueError):
        make_image_grid([])
    with pytest.raises(ValueError):
        make_image_grid([Image.new("RGB", (2, 2))], rows=0)
