"""Fuzzing the dataset loader: random bytes, damaged real images and odd-but-valid images, read the way
`lens-tune cache` and `run` read them (the folder source, `check_images`, `load_image`).

Every file either loads as an 8-bit RGB image of the size it is seen with, or is an `ImageProblem` (listed by
`check_images` in one DatasetError) whose message names the file and can be printed. Never another exception, never
a hang (each case runs under a time and memory limit). Counts and seeds: see tests/fuzz_support.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from lens_tune.data.captions import caption_variants, resolve_caption
from lens_tune.data.images import ImageProblem, check_images, load_image
from lens_tune.data.sources import IMAGE_EXTENSIONS, folder_items, is_unicode_text, metadata_items
from lens_tune.errors import DatasetError
from tests.fuzz_support import Cases, fuzz, memory_limit, time_limit

EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".PNG", ".JPG"]
CASE_SECONDS = 15
CASE_MEMORY = 3 * 2**30

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns about the corrupt EXIF we make


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "RGB" else rgb


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def frames(mode: str, size, count: int) -> list[Image.Image]:
    return [noise(mode, size, seed) for seed in range(count)]


# Real files of every kind the loader meets, to damage.
REAL = {
    "png-rgb": encode(noise("RGB", (96, 80)), "PNG"),
    "png-rgba": encode(noise("RGBA", (70, 90)), "PNG"),
    "png-palette": encode(noise("P", (64, 64)), "PNG", transparency=3),
    "png-16bit": encode(Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 13), "PNG"),
    "jpeg": encode(noise("RGB", (100, 72)), "JPEG", quality=90),
    "jpeg-progressive": encode(noise("RGB", (80, 80)), "JPEG", progressive=True),
    "jpeg-exif": encode(noise("RGB", (96, 64)), "JPEG", exif=exif(6)),
    "jpeg-cmyk": encode(noise("CMYK", (64, 64)), "JPEG"),
    "webp-lossy": encode(noise("RGB", (80, 64)), "WEBP", quality=80),
    "webp-lossless": encode(noise("RGBA", (64, 64)), "WEBP", lossless=True),
    "gif-animated": encode(frames("P", (64, 64), 3)[0], "GIF", save_all=True, append_images=frames("P", (64, 64), 3)[1:]),
    "webp-animated": encode(frames("RGB", (64, 64), 2)[0], "WEBP", save_all=True, append_images=frames("RGB", (64, 64), 2)[1:]),
    "tiff": encode(noise("RGB", (64, 64)), "TIFF", compression="tiff_deflate"),
    "tiff-float": encode(Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)), "TIFF"),
    "bmp": encode(noise("RGB", (64, 64)), "BMP"),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image-fuzz")


def printable(message: str) -> str:
    message.encode("utf-8")  # an error a UTF-8 terminal cannot print would be a traceback, not a message
    return message


def expect_loaded_or_problem(data: bytes, name: str, folder: Path, **options) -> tuple[str, Image.Image | None]:
    """Put `data` in `folder` as `name` and read it through the folder source, `load_image` and `check_images`.

    Returns ("loaded", image) or ("problem", None); anything else fails the test.
    """
    path = folder / name
    path.write_bytes(data)
    with time_limit(CASE_SECONDS, f"loading {name} ({len(data)} bytes)"), memory_limit(CASE_MEMORY):
        (item,) = folder_items(folder)
        assert item.origin == str(path.resolve())
        try:
            image = load_image(item.read_bytes(), item.origin, **options)
        except ImageProblem as problem:
            assert problem.origin == item.origin and problem.reason
            assert printable(str(problem)) == f"{item.origin}: {problem.reason}"
            verdict, image = "problem", None
        else:
            pixels = np.asarray(image)
            assert image.mode == "RGB" and pixels.dtype == np.uint8
            assert pixels.shape == (image.height, image.width, 3)
            verdict = "loaded"
        # the phase `cache` and `run` use agrees, in both modes
        checked, problems = check_images([item], on_bad_image="skip", **options)
        if verdict == "loaded":
            assert not problems and (checked[0].width, checked[0].height) == image.size
            assert check_images([item], **options)[0] == checked
        else:
            assert not checked and problems[0].origin == item.origin
            with pytest.raises(DatasetError) as error:
                check_images([item], **options)
            message = printable(str(error.value))
            assert message.startswith("1 of 1 images cannot be used:\n") and f"  {item.origin}: " in message
    path.unlink()
    return verdict, image


def fresh_folder(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


# --------------------------------------------------------------------------------------------------
# random bytes
# --------------------------------------------------------------------------------------------------

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"GIF87a",
         b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\xff\xff\xff\x7fWEBPVP8L", b"BM", b"II*\x00", b"MM\x00*", b"P6\n",
         b"P6\n64 64\n255\n", b"\x00\x00\x01\x00", b"8BPS", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
         b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


def test_random_bytes(scratch):
    cases = Cases("test_fuzz_images::random bytes")

    @fuzz()
    @given(st.sampled_from(MAGIC), st.binary(max_size=2048), st.sampled_from(EXTENSIONS))
    def case(magic, body, extension):
        verdict, _ = expect_loaded_or_problem(magic + body, "random" + extension, fresh_folder(scratch), min_size=1)
        cases.count(verdict)

    case()
    cases.record()


def test_empty_and_tiny_files(scratch):
    folder = fresh_folder(scratch)
    for data in [b"", b"\x00", b"\x89", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"GIF89a", b"RIFF"]:
        verdict, _ = expect_loaded_or_problem(data, "tiny.png", folder, min_size=1)
        assert verdict == "problem"


# --------------------------------------------------------------------------------------------------
# damaged real images: truncated, bit-flipped, overwritten, spliced
# --------------------------------------------------------------------------------------------------


@st.composite
def damaged(draw) -> tuple[str, bytes]:
    sources = {**REAL, **VALID_FILES}  # every kind of file, each of its modes
    kind = draw(st.sampled_from(sorted(sources)))
    data = bytearray(sources[kind])
    how = draw(st.sampled_from(["truncate", "flip bits", "flip header bits", "overwrite", "splice", "zero run"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        data = data[:at]
    elif how.startswith("flip"):  # headers (sizes, offsets, tag types) are where decoders are most fragile
        end = min(len(data), 400) if how == "flip header bits" else len(data)
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, end - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "overwrite":
        patch = draw(st.binary(min_size=1, max_size=32))
        data[at:at + len(patch)] = patch
    elif how == "splice":
        other = sources[draw(st.sampled_from(sorted(sources)))]
        data = data[:at] + other[draw(st.integers(0, len(other) - 1)):]
    else:
        data[at:at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return f"{kind} {how}", bytes(data)


def test_damaged_real_images(scratch):
    cases = Cases("test_fuzz_images::damaged images")

    @fuzz()
    @given(damaged(), st.sampled_from(EXTENSIONS), st.sampled_from([1, 64]))
    def case(kind_and_data, extension, min_size):
        _, data = kind_and_data
        verdict, _ = expect_loaded_or_problem(data, "damaged" + extension, fresh_folder(scratch), min_size=min_size)
        cases.count(verdict)

    case()
    cases.record()


def test_truncated_and_flipped_files_of_every_kind_are_problems(scratch):
    """Cutting a real file in half is always noticed (never decoded as if it were whole). Not for animations:
    their first frame, the one used, is still whole."""
    folder = fresh_folder(scratch)
    for kind, data in REAL.items():
        if "animated" in kind:
            continue
        verdict, _ = expect_loaded_or_problem(data[: len(data) // 2], f"{kind}.png", folder, min_size=1)
        assert verdict == "problem", kind


# --------------------------------------------------------------------------------------------------
# odd but valid images: every one loads, at the size it is seen with
# --------------------------------------------------------------------------------------------------


def sixteen_bit(size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 65536, (size[1], size[0]), dtype=np.uint16))


def int32(size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(2).integers(-70000, 70000, (size[1], size[0]), dtype=np.int32))


def float32(size) -> Image.Image:
    values = np.random.default_rng(3).normal(0.5, 2.0, (size[1], size[0])).astype(np.float32)
    values[0, 0] = np.nan
    return Image.fromarray(values)


def transparent(size) -> Image.Image:
    return Image.new("RGBA", size, (255, 0, 0, 0))


def palette_with_alpha(size) -> Image.Image:
    image = noise("P", size)
    image.info["transparency"] = bytes(range(0, 256))  # a tRNS chunk: every palette entry its own alpha
    return image


# name -> (make the image from a size, format, save options)
VALID = {
    "png 1": (lambda s: noise("1", s), "PNG", {}),
    "png L": (lambda s: noise("L", s), "PNG", {}),
    "png LA": (lambda s: noise("LA", s), "PNG", {}),
    "png P": (lambda s: noise("P", s), "PNG", {}),
    "png P transparency": (lambda s: noise("P", s), "PNG", {"transparency": 0}),
    "png P alpha palette": (palette_with_alpha, "PNG", {}),
    "png RGB transparency": (lambda s: noise("RGB", s), "PNG", {"transparency": (0, 0, 0)}),
    "png RGBA": (lambda s: noise("RGBA", s), "PNG", {}),
    "png RGBA all transparent": (transparent, "PNG", {}),
    "png I;16": (sixteen_bit, "PNG", {}),
    "png optimized": (lambda s: noise("RGB", s), "PNG", {"optimize": True}),
    "jpeg L": (lambda s: noise("L", s), "JPEG", {}),
    "jpeg RGB": (lambda s: noise("RGB", s), "JPEG", {"quality": 5}),
    "jpeg progressive": (lambda s: noise("RGB", s), "JPEG", {"progressive": True}),
    "jpeg CMYK": (lambda s: noise("CMYK", s), "JPEG", {}),
    "jpeg 4:4:4": (lambda s: noise("RGB", s), "JPEG", {"subsampling": 0}),
    "webp lossy": (lambda s: noise("RGB", s), "WEBP", {}),
    "webp lossless RGBA": (lambda s: noise("RGBA", s), "WEBP", {"lossless": True}),
    "webp animated": (lambda s: noise("RGB", s), "WEBP", {"save_all": True, "append_images": "same size"}),
    "gif": (lambda s: noise("P", s), "GIF", {}),
    "gif transparency": (lambda s: noise("P", s), "GIF", {"transparency": 0}),
    "gif animated": (lambda s: noise("P", s), "GIF", {"save_all": True, "append_images": [noise("P", (8, 8), 5)]}),
    "tiff I;16": (sixteen_bit, "TIFF", {}),
    "tiff I": (int32, "TIFF", {}),
    "tiff F": (float32, "TIFF", {}),
    "tiff CMYK": (lambda s: noise("CMYK", s), "TIFF", {}),
    "tiff LAB": (lambda s: noise("LAB", s), "TIFF", {}),
    "tiff YCbCr jpeg": (lambda s: noise("RGB", s), "TIFF", {"compression": "jpeg"}),
    "tiff RGBA lzw": (lambda s: noise("RGBA", s), "TIFF", {"compression": "tiff_lzw"}),
    "bmp 1": (lambda s: noise("1", s), "BMP", {}),
    "bmp P": (lambda s: noise("P", s), "BMP", {}),
    "bmp RGBA": (lambda s: noise("RGBA", s), "BMP", {}),
}


def save(kind: str, size: tuple[int, int], **extra) -> bytes:
    make, format, options = VALID[kind]
    options = {**options, **extra}
    if options.get("append_images") == "same size":  # WebP frames must all have the first one's size
        options["append_images"] = [noise("RGB", size, seed=9)]
    return encode(make(size), format, **options)


VALID_FILES = {kind: save(kind, (80, 64)) for kind in VALID}
SIDES = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 4000]))


@st.composite
def valid_images(draw) -> tuple[str, bytes, tuple[int, int]]:
    """(kind, file bytes, the size the image is seen with)."""
    kind = draw(st.sampled_from(sorted(VALID)))
    width, height = draw(SIDES), draw(SIDES)
    if width * height > 300_000:  # one long strip (1x4000) is the point, not a big image
        height = min(height, 4)
    extra = {}
    orientation = 1
    if VALID[kind][1] in ("JPEG", "WEBP", "PNG") and draw(st.booleans()):
        orientation = draw(st.integers(1, 8))
        extra["exif"] = exif(orientation)
    data = save(kind, (width, height), **extra)
    seen = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return f"{kind} {width}x{height} orientation {orientation}", data, seen


def test_odd_but_valid_images_load_at_the_size_they_are_seen_with(scratch):
    cases = Cases("test_fuzz_images::valid images")

    @fuzz()
    @given(valid_images(), st.sampled_from(EXTENSIONS), st.sampled_from([1, 16, 64]))
    def case(image, extension, min_size):
        kind, data, seen = image
        verdict, loaded = expect_loaded_or_problem(data, "valid" + extension, fresh_folder(scratch), min_size=min_size)
        cases.count(verdict)
        if min(seen) >= min_size:
            assert verdict == "loaded", kind
            assert loaded.size == seen, kind
        else:
            assert verdict == "problem", kind

    case()
    cases.record()


def test_every_valid_kind_loads(scratch):
    """Each kind in VALID once at 80x64 (so a kind the generator rarely draws is still covered)."""
    folder = fresh_folder(scratch)
    for kind, data in VALID_FILES.items():
        verdict, image = expect_loaded_or_problem(data, "x.png", folder)
        assert verdict == "loaded" and image.size == (80, 64), kind


# --------------------------------------------------------------------------------------------------
# decompression bombs: a huge declared size is refused from the header, before decoding
# --------------------------------------------------------------------------------------------------


def with_size(kind: str, width: int, height: int) -> bytes:
    """A small real file whose header declares width x height."""
    if kind == "png":
        data = bytearray(REAL["png-rgb"])
        ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
        data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return bytes(data)
    if kind == "gif":
        data = bytearray(REAL["gif-animated"])
        data[6:10] = struct.pack("<HH", width, height)
        return bytes(data)
    if kind == "bmp":
        data = bytearray(REAL["bmp"])
        data[18:26] = struct.pack("<ii", width, height)
        return bytes(data)
    if kind == "jpeg":
        data = bytearray(REAL["jpeg"])
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
        return bytes(data)
    data = bytearray(REAL["webp-lossless"])  # VP8L: 14-bit width-1 and height-1 after the 0x2f signature
    at = data.index(b"VP8L") + 8
    bits = struct.unpack("<I", data[at + 1:at + 5])[0] & ~((1 << 28) - 1)
    data[at + 1:at + 5] = struct.pack("<I", bits | (min(width, 16384) - 1) | (min(height, 16384) - 1) << 14)
    return bytes(data)


def test_huge_declared_sizes(scratch):
    cases = Cases("test_fuzz_images::declared sizes")
    huge = st.sampled_from([1, 64, 5000, 9000, 16384, 40000, 65500])

    @fuzz(30)
    @given(st.sampled_from(["png", "gif", "bmp", "jpeg", "webp"]), huge, huge)
    def case(kind, width, height):
        verdict, _ = expect_loaded_or_problem(with_size(kind, width, height), f"bomb.{kind}", fresh_folder(scratch),
                                              min_size=1)
        cases.count(verdict)

    case()
    cases.record()


@pytest.mark.parametrize("kind", ["png", "gif", "bmp", "jpeg", "webp"])
def test_decompression_bombs_are_named_as_such(scratch, kind):
    folder = fresh_folder(scratch)
    path = folder / f"bomb.{kind}"
    path.write_bytes(with_size(kind, 16384, 16384))
    (item,) = folder_items(folder)
    with pytest.raises(ImageProblem, match="decompression bomb") as problem:
        load_image(item.read_bytes(), item.origin)
    assert problem.value.origin == str(path.resolve())


# --------------------------------------------------------------------------------------------------
# a whole folder: odd file names, hidden files, subfolders, captions
# --------------------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=["Cs"]), min_size=1, max_size=20),
    st.sampled_from(["caf\xe9", "\u202eevil", "a b", " lead", "trail ", "日本", "🤖", "-dash", "x" * 200]),
).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
RAW_NAMES = st.sampled_from([b"latin1-caf\xe9", b"bad-\xff\xfe", b"half-\xc3", b"ok"])
CAPTIONS = st.one_of(  # text most of the time: a caption that is not UTF-8 stops the whole folder
    st.none(),
    st.text(max_size=64).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"\xef\xbb\xbfbom caption", b"a, b, c, [trigger]", b"", b"  ", b"\x00", b"tag, tag, tag"]),
    st.text(max_size=64).map(lambda t: t.encode("utf-8")) | st.binary(max_size=64),
)


class Blob(bytes):
    """File content that hypothesis reports by its size, not byte by byte."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


CONTENTS = st.one_of(
    st.sampled_from(sorted(REAL)).map(REAL.get),
    st.sampled_from(sorted(VALID_FILES)).map(VALID_FILES.get),
    st.binary(max_size=256),
).map(Blob)


@st.composite
def folders(draw) -> list[tuple[bytes, bytes, bytes | None]]:
    """Files as (relative path in bytes, content, caption bytes or None); names may be invalid UTF-8."""
    files = []
    for _ in range(draw(st.integers(1, 6))):
        stem = draw(st.one_of(NAMES.map(os.fsencode), RAW_NAMES))
        sub = draw(st.sampled_from([b"", b"sub/", b".hidden/", b"deep/er/"]))
        extension = draw(st.sampled_from(EXTENSIONS + [".txt", ".PnG", ""])).encode()
        files.append((sub + stem + extension, draw(CONTENTS), draw(CAPTIONS)))
    return files


def test_folder_source_with_odd_names_and_captions(scratch):
    cases = Cases("test_fuzz_images::folders")

    @fuzz(100)
    @given(folders(), st.sampled_from(["error", "skip"]), st.sampled_from([None, "a photo of [trigger]"]),
           st.sampled_from([None, "sks", " "]), st.sampled_from(["replace", "prepend"]))
    def case(files, on_bad_image, instance_prompt, trigger, trigger_mode):
        root = fresh_folder(scratch)
        root_bytes = os.fsencode(root)
        for relative, content, caption in files:
            path = os.path.join(root_bytes, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
            if caption is not None:
                with open(os.path.splitext(path)[0] + b".txt", "wb") as f:
                    f.write(caption)
        with time_limit(CASE_SECONDS, "a folder"), memory_limit(CASE_MEMORY):
            try:
                items = folder_items(root)
            except DatasetError as error:  # no images at all, or a caption file that is not UTF-8
                message = printable(str(error))
                assert message.startswith("no images found in ") or "not valid UTF-8" in message, message
                cases.count("folder error")
                return
            assert len({item.id for item in items}) == len(items)
            for item in items:
                printable(item.origin)
            try:
                checked, problems = check_images(items, on_bad_image=on_bad_image, min_size=16)
            except DatasetError as error:
                assert on_bad_image == "error"
                message = printable(str(error))
                bad = [line for line in message.splitlines() if line.startswith("  ")]
                assert message.startswith(f"{len(bad)} of {len(items)} images cannot be used:\n"), message
                cases.count("bad images")
                return
            assert len(checked) + len(problems) == len(items)
            for problem in problems:
                printable(str(problem))
            for image in checked:
                try:
                    caption = resolve_caption(image.item.caption, instance_prompt=instance_prompt, trigger=trigger,
                                              trigger_mode=trigger_mode, origin=image.item.origin)
                except DatasetError as error:
                    assert image.item.origin in printable(str(error))
                    continue
                assert isinstance(caption, str) and caption.strip()
                printable(caption)
                variants = caption_variants(caption, shuffle=True, num_shuffles=4, keep_tokens=1, seed=0)
                assert variants[0] == caption and len(set(variants)) == len(variants)
            cases.count("checked")

    case()
    cases.record()


def test_the_fuzzed_extensions_are_image_extensions():
    assert {e.lower() for e in EXTENSIONS} <= set(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# metadata.jsonl: odd lines, odd names, odd captions
# --------------------------------------------------------------------------------------------------

FILE_NAMES = st.one_of(
    st.sampled_from(["good.png", "missing.png", "", " ", "sub/../good.png", "./good.png", "\ud800.png", "x" * 300,
                     "good.png\x00", "..", "/", "caf\xe9.png"]),
    st.integers(), st.none(), st.lists(st.integers(), max_size=2),
)
GOOD_NAMES = ["good.png", "sub/good 2.png", "日本.png", "caf\xe9.png"]
TEXTS = st.one_of(  # mostly text; a number or a lone surrogate makes the line bad
    st.none(), st.text(max_size=40), st.text(max_size=40), st.integers(), st.sampled_from(["\ud800", "a \ud83e\udd16", ""]),
)


@st.composite
def metadata_files(draw) -> bytes:
    """Good lines (distinct images, odd captions), and sometimes bad ones: any bad line stops the whole file."""
    lines = []
    for name in draw(st.lists(st.sampled_from(GOOD_NAMES), unique=True, max_size=4)):
        record = {"file_name": name, draw(st.sampled_from(["text", "caption"])): draw(TEXTS)}
        lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        how = draw(st.sampled_from(["record", "json", "text"]))
        if how == "record":
            record = {"file_name": draw(FILE_NAMES), draw(st.sampled_from(["text", "caption", "other"])): draw(TEXTS)}
            lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
        elif how == "json":
            lines.append(json.dumps(draw(st.one_of(st.lists(st.integers()), st.text(), st.floats()))).encode())
        else:
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b""))
    lines = draw(st.permutations(lines))
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return prefix + draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)


def test_metadata_files(scratch):
    cases = Cases("test_fuzz_images::metadata")

    @fuzz(100)
    @given(metadata_files())
    def case(text):
        root = fresh_folder(scratch)
        for name in GOOD_NAMES:
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(VALID_FILES["png RGBA"])
        (root / "metadata.jsonl").write_bytes(text)
        with time_limit(CASE_SECONDS, "a metadata file"):
            try:
                items = metadata_items(root)
            except DatasetError as error:
                message = printable(str(error))
                assert str((root / "metadata.jsonl").resolve()) in message, message
                cases.count("error")
                return
        assert items and all(item.caption is None or is_unicode_text(item.caption) for item in items)
        checked, problems = check_images(items, on_bad_image="skip")
        assert [c.item for c in checked] == items and not problems  # only the good images can be listed
        cases.count("items")

    case()
    cases.record()
