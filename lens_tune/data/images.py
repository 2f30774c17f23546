"""Decoding training images into plain 8-bit RGB, and checking a whole dataset before anything expensive runs.

Every way an image can be unusable (not an image, truncated, a decompression bomb, too small) becomes an
`ImageProblem` naming the file, so one run can report all bad files at once instead of failing on the first.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from lens_tune.data.sources import ImageItem
from lens_tune.errors import DatasetError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIZE = 64
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MODES_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
ON_BAD_IMAGE_CHOICES = ("error", "skip")
# The formats of the supported extensions (JPEG includes MPO, a JPEG holding several pictures; DIB is a BMP variant).
# Pillow reads many more, some by running other programs (EPS runs Ghostscript on the file): never for training.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF")
FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class ImageProblem(DatasetError):
    """One image that cannot be used: where it is (`origin`) and why (`reason`)."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin = origin
        self.reason = reason


@dataclass(frozen=True)
class CheckedImage:
    """An image that decoded cleanly: its size after EXIF rotation (for bucketing) and a sha256 of its bytes
    (for caching)."""

    item: ImageItem
    width: int
    height: int
    content_hash: str


def load_image(
    data: bytes,
    origin: str,
    *,
    background: tuple[int, int, int] | str = (255, 255, 255),
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `data` fully into an upright 8-bit RGB image; transparency is composited onto `background`
    (an RGB tuple, or a colour as a recipe writes it: "white", "#808080").

    Animated images give their first frame. Raises ImageProblem for anything that cannot be used; `max_pixels`
    (None: only Pillow's own limit) is checked from the header, before any pixel is decoded.
    """
    if isinstance(background, str):
        background = ImageColor.getrgb(background)[:3]  # resolved first: a bad colour is not the image's fault
    image = open_header(data, origin, max_pixels)
    shorter_side = min(image.size)
    if shorter_side < min_size:
        width, height = image.size
        raise ImageProblem(
            origin, f"too small: {width}x{height}, the shorter side must be at least {min_size} px (data.min_image_size)"
        )
    decode_fully(image, origin)
    image = upright(image)
    try:
        return to_rgb(image, background)
    except ValueError as error:  # Pillow cannot convert some exotic modes
        raise ImageProblem(origin, f"unsupported colour mode {image.mode} ({error})") from None


def open_header(data: bytes, origin: str, max_pixels: int | None) -> Image.Image:
    """Image.open reads only the header; Pillow's decompression-bomb warning is treated as an error too."""
    if not data:
        raise ImageProblem(origin, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageProblem(origin, f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        other = other_format(data)
        if other:
            raise ImageProblem(
                origin, f"an image in {other} format, which lens-tune does not read; convert it to {FORMATS_TEXT}"
            ) from None
        raise ImageProblem(origin, "not an image (cannot identify image file)") from None
    except MemoryError:
        raise
    except Exception as error:  # a header Pillow recognises but cannot parse (damaged files raise many kinds)
        raise ImageProblem(origin, f"corrupt image header ({describe(error)})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageProblem(
            origin,
            f"decompression bomb: {width}x{height} = {width * height:,} pixels is more than the limit of "
            f"{max_pixels:,} pixels",
        )
    return image


def other_format(data: bytes) -> str | None:
    """The format Pillow finds in `data` among all it knows (header only, nothing decoded), for the message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:  # only the wording of an error depends on it
        return None


def decode_fully(image: Image.Image, origin: str) -> None:
    """Decode every pixel now: a truncated or corrupt file must fail here, not halfway through training."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # damaged files make Pillow raise OSError, ValueError, TypeError, struct.error, ...
        # Pillow reports missing data as "image file is truncated"; everything else is corrupt data
        kind = "truncated file" if "truncated" in str(error) else "corrupt image data"
        raise ImageProblem(origin, f"{kind} ({describe(error)})") from None


def describe(error: Exception) -> str:
    """Pillow's message, with the kind of error when the message alone says little (a TypeError from a damaged
    TIFF tag reads "'IFDRational' object cannot be interpreted as an integer")."""
    if isinstance(error, (OSError, SyntaxError, ValueError, EOFError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so width and height are those the image is seen with."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the pixels when nothing changes
    except MemoryError:
        raise
    except Exception:  # damaged EXIF raises many kinds of error (struct.error, IndexError, ...)
        pass  # broken EXIF is not a reason to reject the pixels: use the image as stored
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = sixteen_bit_to_gray(image)
    elif image.mode == "F":
        image = float_to_gray(image)
    if image.mode in MODES_WITH_ALPHA or "transparency" in image.info:
        return composite_on(image.convert("RGBA"), background)
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    """16-bit grey to 8 bits by scaling (65535 -> 255), not by clipping at 255 as Image.convert does."""
    values = np.asarray(image).astype(np.float64)
    return gray_image(np.clip(values, 0, 65535) / 257.0)


def float_to_gray(image: Image.Image) -> Image.Image:
    """Float grey to 8 bits; the range is read from the largest value: [0, 1], 8-bit, or 16-bit."""
    with np.errstate(invalid="ignore"):  # signalling NaNs (damaged files) warn when cast; nan_to_num zeroes them
        values = np.nan_to_num(np.asarray(image).astype(np.float64))
    largest = values.max(initial=0.0)
    if largest <= 1.0:
        values = values * 255.0
    elif largest > 255.0:
        values = values / 257.0
    return gray_image(values)


def gray_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8), mode="L")


def composite_on(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def check_images(
    items: Iterable[ImageItem], *, on_bad_image: str = "error", **load_kwargs
) -> tuple[list[CheckedImage], list[ImageProblem]]:
    """Decode every item once (one at a time, nothing kept) and sort the good from the bad.

    on_bad_image="error": one DatasetError lists every bad file. "skip": the bad ones are returned as problems
    for the caller to report. `load_kwargs` go to `load_image` (background, min_size, max_pixels).
    """
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE_CHOICES}, not {on_bad_image!r}")
    items = list(items)
    checked, problems = [], []
    for item in items:
        try:
            checked.append(check_image(item, **load_kwargs))
        except ImageProblem as problem:
            problems.append(problem)
    if problems and on_bad_image == "error":
        raise DatasetError(bad_images_message(problems, len(items)))
    return checked, problems


def check_image(item: ImageItem, **load_kwargs) -> CheckedImage:
    try:
        data = item.read_bytes()
    except OSError as error:
        raise ImageProblem(item.origin, f"cannot read the file ({error.strerror or error})") from None
    image = load_image(data, item.origin, **load_kwargs)
    width, height = image.size
    image.close()
    return CheckedImage(item=item, width=width, height=height, content_hash=hashlib.sha256(data).hexdigest())


def bad_images_message(problems: list[ImageProblem], total: int) -> str:
    lines = [f"  {problem.origin}: {problem.reason}" for problem in problems]
    return (
        f"{len(problems)} of {total} images cannot be used:\n" + "\n".join(lines)
        + "\nFix or remove them, or set data.on_bad_image: skip."
    )
