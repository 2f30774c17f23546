"""Decoding every kind of image to 8-bit RGB, and finding every unusable one (all inputs built here with Pillow)."""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lens_tune.data.images import CheckedImage, ImageProblem, check_images, load_image
from lens_tune.data.sources import ImageItem, folder_items
from lens_tune.errors import DatasetError


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def load(data: bytes, **options) -> Image.Image:
    return load_image(data, "/data/test.png", **options)


def problem_of(data: bytes, **options) -> ImageProblem:
    with pytest.raises(ImageProblem) as error:
        load(data, **options)
    assert error.value.origin == "/data/test.png"
    return error.value


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=None)  # the same few files serve several tests
def huge_black_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size in a few KB, written row block by row block so the test needs little memory."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then all-black pixels
    compressor, compressed = zlib.compressobj(9), []
    rows_per_block = 1000
    for start in range(0, height, rows_per_block):
        compressed.append(compressor.compress(row * min(rows_per_block, height - start)))
    compressed.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(compressed))
        + png_chunk(b"IEND", b"")
    )


def noise(size=(128, 128), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --- colour modes -------------------------------------------------------------------------------------------------


def test_rgb_is_returned_fully_loaded():
    image = load(encode(Image.new("RGB", (80, 64), (1, 2, 3))))
    assert image.mode == "RGB" and image.size == (80, 64) and image.getpixel((5, 5)) == (1, 2, 3)


def test_rgba_is_composited_on_the_background():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 0, 128), (0, 0, 32, 64))
    image = load(encode(rgba))
    assert image.mode == "RGB"
    assert image.getpixel((40, 5)) == (255, 255, 255)  # fully transparent: the background
    assert all(abs(value - 127) <= 1 for value in image.getpixel((5, 5)))  # half black over white
    assert load(encode(rgba), background=(0, 0, 255)).getpixel((40, 5)) == (0, 0, 255)
    assert load(encode(rgba), background="#00ff00").getpixel((40, 5)) == (0, 255, 0)  # as a recipe writes it
    assert load(encode(rgba), background="black").getpixel((40, 5)) == (0, 0, 0)


def test_la_is_composited_on_the_background():
    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((100, 255), (0, 0, 32, 64))
    image = load(encode(la))
    assert image.getpixel((5, 5)) == (100, 100, 100)
    assert image.getpixel((40, 5)) == (255, 255, 255)


def test_palette_with_transparency_is_composited():
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    image = load(encode(palette, transparency=0), background=(0, 255, 0))
    assert image.getpixel((5, 5)) == (200, 100, 50)
    assert image.getpixel((40, 5)) == (0, 255, 0)
    opaque = load(encode(palette))  # no transparency: the palette colour itself
    assert opaque.getpixel((40, 5)) == (10, 20, 30)


def test_grayscale_and_bilevel_become_rgb():
    assert load(encode(Image.new("L", (64, 64), 77))).getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (64, 64), 0)
    bilevel.paste(1, (0, 0, 32, 64))
    image = load(encode(bilevel))
    assert image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((40, 5)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red in ink
    red = load(encode(cmyk, "JPEG", quality=95)).getpixel((10, 10))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65280, 65535]], dtype=np.uint16).repeat(64, axis=0).repeat(16, axis=1)
    sixteen_bit = Image.fromarray(values)
    data = encode(sixteen_bit)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = load(data)
    row = np.asarray(image)[0, ::16, 0]
    assert row.tolist() == [0, 1, 4, 128, 254, 255]
    assert np.asarray(image)[..., 0].tolist() == np.asarray(image)[..., 2].tolist()  # grey stays grey


def test_sixteen_bit_gradient_is_monotonic_and_full_range():
    gradient = np.linspace(0, 65535, 256).astype(np.uint16)[None, :].repeat(64, axis=0)
    row = np.asarray(load(encode(Image.fromarray(gradient))))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 200


def test_32_bit_integer_and_float_tiffs():
    integer = np.array([[0, 32768, 65535, 1000]], dtype=np.int32).repeat(64, axis=0).repeat(16, axis=1)
    image = load(encode(Image.fromarray(integer), "TIFF"))
    assert np.asarray(image)[0, ::16, 0].tolist() == [0, 128, 255, 4]
    unit_floats = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32).repeat(64, axis=0).repeat(16, axis=1)
    image = load(encode(Image.fromarray(unit_floats), "TIFF"))
    assert np.asarray(image)[0, ::16, 0].tolist() == [0, 128, 255, 64]


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (100, 64), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load(encode(stored, "JPEG", exif=exif, quality=95))
    assert image.size == (64, 100)
    assert image.getpixel((64 - 10, 10))[0] > 200  # the marker is now top-right
    assert image.getpixel((10, 10))[0] < 50


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (64, 64), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert load(data).getpixel((10, 10)) == (255, 0, 0)


# --- unusable images ----------------------------------------------------------------------------------------------


def test_truncated_png_and_jpeg():
    png = encode(noise())
    assert "truncated file" in problem_of(png[: len(png) // 2]).reason
    jpeg = encode(noise(), "JPEG")
    assert "truncated file" in problem_of(jpeg[: len(jpeg) // 2]).reason
    assert "truncated file" in problem_of(jpeg[:-2]).reason  # only the end-of-image marker missing


def test_not_an_image():
    random_bytes = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert problem_of(random_bytes).reason == "not an image (cannot identify image file)"
    assert problem_of("a caption, not a picture\n".encode()).reason == "not an image (cannot identify image file)"
    assert problem_of(b"").reason == "empty file (0 bytes)"


def test_decompression_bombs():
    # Pillow's own limit: an error past twice MAX_IMAGE_PIXELS, a warning past it; both refused before decoding
    huge = huge_black_png(20_000, 20_000)
    assert len(huge) < 100_000
    assert problem_of(huge, max_pixels=None).reason.startswith("decompression bomb")
    large = huge_black_png(10_000, 10_000)
    assert problem_of(large, max_pixels=None).reason.startswith("decompression bomb")
    # our limit, checked from the header
    reason = problem_of(huge_black_png(400, 300), max_pixels=100_000).reason
    assert reason == "decompression bomb: 400x300 = 120,000 pixels is more than the limit of 100,000 pixels"
    assert load(huge_black_png(400, 300)).size == (400, 300)


def test_too_small():
    reason = problem_of(encode(Image.new("RGB", (50, 80)))).reason
    assert reason == "too small: 50x80, the shorter side must be at least 64 px (data.min_image_size)"
    assert load(encode(Image.new("RGB", (50, 80))), min_size=32).size == (50, 80)


# --- check_images -------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path):
    """Four good images (one EXIF-rotated) and five bad ones."""
    exif = Image.Exif()
    exif[0x0112] = 6
    good = {
        "good-rgb.png": encode(Image.new("RGB", (96, 64))),
        "good-rgba.png": encode(Image.new("RGBA", (64, 64))),
        "good-gray16.png": encode(Image.fromarray(np.full((70, 80), 40000, dtype=np.uint16))),
        "good-rotated.jpg": encode(Image.new("RGB", (128, 64)), "JPEG", exif=exif),
    }
    jpeg = encode(noise(), "JPEG")
    bad = {
        "bad-truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad-text.png": b"hello",
        "bad-empty.png": b"",
        "bad-small.png": encode(Image.new("RGB", (32, 32))),
        "bad-bomb.png": huge_black_png(20_000, 20_000),
    }
    for name, data in {**good, **bad}.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, good, bad


def test_check_images_lists_every_bad_file(mixed_folder):
    folder, good, bad = mixed_folder
    with pytest.raises(DatasetError) as error:
        check_images(folder_items(folder))
    message = str(error.value)
    assert message.startswith("5 of 9 images cannot be used:\n")
    for name in bad:
        assert f"  {(folder / name).resolve()}: " in message
    assert "truncated file" in message and "not an image" in message and "empty file" in message
    assert "too small: 32x32" in message and "decompression bomb" in message
    assert message.endswith("Fix or remove them, or set data.on_bad_image: skip.")
    assert not any(str((folder / name).resolve()) in message for name in good)


def test_check_images_skip_returns_sizes_hashes_and_problems(mixed_folder):
    folder, good, bad = mixed_folder
    checked, problems = check_images(folder_items(folder), on_bad_image="skip")
    assert sorted(problem.origin for problem in problems) == sorted(str((folder / name).resolve()) for name in bad)
    assert all(isinstance(entry, CheckedImage) for entry in checked)
    by_id = {entry.item.id: entry for entry in checked}
    assert set(by_id) == set(good)
    assert (by_id["good-rgb.png"].width, by_id["good-rgb.png"].height) == (96, 64)
    assert (by_id["good-rotated.jpg"].width, by_id["good-rotated.jpg"].height) == (64, 128)  # after EXIF
    for name, data in good.items():
        assert by_id[name].content_hash == hashlib.sha256(data).hexdigest()


def test_check_images_reads_each_item_once_and_reports_unreadable_files(tmp_path):
    reads = []

    def reader(data):
        def read():
            reads.append(data)
            return data
        return read

    items = [
        ImageItem(id=str(i), origin=f"/x/{i}.png", read_bytes=reader(encode(Image.new("RGB", (64, 64)))), caption=None)
        for i in range(3)
    ]
    missing = tmp_path / "gone.png"
    items.append(ImageItem(id="gone", origin=str(missing), read_bytes=missing.read_bytes, caption=None))
    checked, problems = check_images(items, on_bad_image="skip", min_size=16)
    assert len(reads) == 3 and len(checked) == 3
    (problem,) = problems
    assert problem.origin == str(tmp_path / "gone.png") and problem.reason.startswith("cannot read the file")


def test_check_images_passes_load_options_and_validates_mode(tmp_path):
    item = ImageItem(id="a", origin="/a.png", read_bytes=lambda: encode(Image.new("RGB", (40, 40))), caption=None)
    assert check_images([item], min_size=32)[0][0].width == 40
    with pytest.raises(DatasetError, match="1 of 1 images"):
        check_images([item])
    with pytest.raises(ValueError, match="on_bad_image"):
        check_images([item], on_bad_image="ignore")


def test_only_the_supported_formats_are_opened(monkeypatch):
    # found while fuzzing: Pillow opens dozens of formats whatever the file is called, and renders EPS by running
    # Ghostscript on it (a PostScript `{} loop` never ends). Only PNG, JPEG, WebP, GIF, BMP and TIFF are opened.
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was started"))
    endless = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n{} loop\n"
    assert problem_of(endless).reason == (
        "an image in EPS format, which lens-tune does not read; convert it to PNG, JPEG, WebP, GIF, BMP or TIFF"
    )
    assert problem_of(encode(noise(), "PPM")).reason.startswith("an image in PPM format, which lens-tune does not read")
    assert problem_of(encode(noise(), "TGA")).reason.startswith("an image in TGA format")
    for format in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"):
        assert load(encode(noise(), format)).size == (128, 128), format


def test_damaged_tiff_tags_are_a_problem_not_a_crash():
    # found by tests/test_fuzz_images.py (soak): a flipped bit made a TIFF's StripOffsets a fraction, and Pillow's
    # TypeError escaped the loader
    data = bytearray(encode(noise(), "TIFF"))
    (ifd,) = struct.unpack("<I", data[4:8])
    (entries,) = struct.unpack("<H", data[ifd:ifd + 2])
    strip_offsets = next(ifd + 2 + 12 * i for i in range(entries)
                         if struct.unpack("<H", data[ifd + 2 + 12 * i:ifd + 4 + 12 * i])[0] == 273)
    data[strip_offsets + 2:strip_offsets + 4] = struct.pack("<H", 5)  # LONG -> RATIONAL
    reason = problem_of(bytes(data)).reason
    assert reason == "corrupt image data (TypeError: 'IFDRational' object cannot be interpreted as an integer)"
