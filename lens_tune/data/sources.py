"""Where training images and their captions come from: a folder, a metadata.jsonl file, or a `datasets` dataset.

Every source gives a list of `ImageItem`s. Nothing is decoded here: an item only knows how to read its raw bytes,
so checking, hashing and caching can happen later, one image at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from lens_tune.errors import DatasetError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
METADATA_FILE_NAME = "metadata.jsonl"
# Files that `hub_items` hands to the matching `datasets` builder when given a single local file.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


@dataclass(frozen=True)
class ImageItem:
    """One training image before decoding.

    id: stable and unique within its dataset (a relative path, or "<split>/<index>").
    origin: what error messages show (an absolute file path, or "<dataset>:<split>[<index>]").
    read_bytes: returns the encoded image file exactly as stored, so callers can hash the content.
    caption: the raw caption, or None when the source has none for this image.
    """

    id: str
    origin: str
    read_bytes: Callable[[], bytes]
    caption: str | None


def supported_extensions_text() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def no_images_error(where: str, hint: str = "") -> DatasetError:
    message = f"no images found in {where}; supported extensions: {supported_extensions_text()}"
    return DatasetError(message + (f" ({hint})" if hint else ""))


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def shown(path: Path | str) -> str:
    """A path as messages show it. A file name that is not UTF-8 (Latin-1 "caf\\xe9.png") reaches Python with lone
    surrogates, which no UTF-8 terminal can print; its odd bytes are shown as escapes instead."""
    text = os.fspath(path)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from the file system (a JSON "\\ud800" escape)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- a folder of images with optional sidecar caption files -------------------------------------------------------


def folder_items(folder: Path, caption_extension: str = ".txt", recursive: bool = True) -> list[ImageItem]:
    """Every image file under `folder` (sorted by relative path), each with the text of `<stem><caption_extension>`.

    Hidden files and folders (name starting with ".") are skipped.
    """
    folder = Path(folder).expanduser()
    require_folder(folder)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    image_paths = find_image_files(folder, recursive)
    if not image_paths:
        hint = "" if recursive else "subfolders were not searched because recursive is off"
        raise no_images_error(shown(folder.resolve()), hint)
    captions, unreadable = {}, []
    for path in image_paths:
        try:
            captions[path] = read_sidecar_caption(path.with_suffix(caption_extension))
        except UnicodeDecodeError as error:
            caption_file = shown(path.with_suffix(caption_extension).resolve())
            unreadable.append(f"  {caption_file}: {error.reason} at byte {error.start}")
    if unreadable:
        raise DatasetError(
            f"{len(unreadable)} caption file(s) are not valid UTF-8:\n" + "\n".join(unreadable)
            + "\nRe-save them as UTF-8 text."
        )
    return [
        ImageItem(
            id=path.relative_to(folder).as_posix(),
            origin=shown(path.resolve()),
            read_bytes=partial(Path.read_bytes, path),
            caption=captions[path],
        )
        for path in image_paths
    ]


def require_folder(folder: Path) -> None:
    try:
        exists, is_dir = folder.exists(), folder.is_dir()
    except OSError as error:  # a name too long for the file system, a folder we may not look into, ...
        raise DatasetError(
            f"data folder {shown(folder)} cannot be read ({error.strerror or error}); "
            "check the dataset's `folder` in the recipe"
        ) from None
    if not exists:
        raise DatasetError(f"data folder {shown(folder)} does not exist; check the dataset's `folder` in the recipe")
    if not is_dir:
        raise DatasetError(
            f"{shown(folder)} is not a folder; point the dataset's `folder` at the folder that holds the images"
        )


def find_image_files(folder: Path, recursive: bool) -> list[Path]:
    found = []
    for current, subfolders, files in os.walk(folder):
        # pruning in place stops os.walk from entering hidden folders (.git, .cache, ...)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")] if recursive else []
        for name in files:
            path = Path(current) / name
            if not name.startswith(".") and is_image_file(path):
                found.append(path)
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def read_sidecar_caption(path: Path) -> str | None:
    """The stripped text of a caption file, or None when there is none. Raises UnicodeDecodeError for bad bytes."""
    if not path.is_file():
        return None
    # utf-8-sig also accepts the byte-order mark some Windows editors write
    return path.read_bytes().decode("utf-8-sig").strip()


# --- metadata.jsonl -----------------------------------------------------------------------------------------------


def metadata_items(path: Path) -> list[ImageItem]:
    """Images listed in a metadata.jsonl file (or a folder holding one), in file order.

    Each line is {"file_name": "relative/to/the/jsonl/folder.png", "text": "..."}; "caption" is accepted for "text".
    """
    metadata_file = find_metadata_file(Path(path).expanduser())
    try:
        lines = metadata_file.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{shown(metadata_file)} is not valid UTF-8 ({error.reason} at byte {error.start}); re-save it as UTF-8"
        ) from None
    except OSError as error:
        raise DatasetError(f"cannot read {shown(metadata_file)} ({error.strerror or error})") from None
    items, problems, first_line_of = [], [], {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = metadata_line_item(line, metadata_file.parent)
        except ValueError as error:
            problems.append(f"  line {line_number}: {error}")
            continue
        if item.id in first_line_of:
            problems.append(f"  line {line_number}: {item.id} is already listed on line {first_line_of[item.id]}")
            continue
        first_line_of[item.id] = line_number
        items.append(item)
    if problems:
        raise DatasetError(
            f"{shown(metadata_file)} has {len(problems)} bad line(s):\n" + "\n".join(problems)
            + '\nEach line must be a JSON object like {"file_name": "images/cat.png", "text": "a cat"}, '
            "with file_name relative to the folder of the metadata file."
        )
    if not items:
        raise no_images_error(shown(metadata_file), "the metadata file lists no images")
    return items


def find_metadata_file(path: Path) -> Path:
    try:
        if path.is_dir():
            path = path / METADATA_FILE_NAME
        found = path.is_file()
    except OSError as error:  # a name too long for the file system, ...
        raise DatasetError(
            f"metadata file {shown(path)} cannot be read ({error.strerror or error}); "
            "check the dataset's `metadata` in the recipe"
        ) from None
    if not found:
        raise DatasetError(
            f"metadata file {shown(path)} does not exist; create it or point the dataset's `metadata` at the right file"
        )
    return path.resolve()


def is_unicode_text(text: str) -> bool:
    """False for text with lone surrogates (JSON allows "\\ud800"): no tokenizer or UTF-8 file can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def metadata_line_item(line: str, base_folder: Path) -> ImageItem:
    """One line of metadata.jsonl as an item; a ValueError says what is wrong with the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    file_name = record.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError('no "file_name" (it must be a non-empty string)')
    image_path = base_folder / file_name
    try:
        found = image_path.is_file()
    except OSError as error:  # e.g. a name too long for the file system
        raise ValueError(f"cannot look for file {shown(file_name)} ({error.strerror or error})") from None
    if not found:
        raise ValueError(f"file {shown(file_name)} does not exist (looked for {shown(image_path)})")
    caption = record.get("text", record.get("caption"))
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f'the caption ("text" or "caption") must be a string, not {type(caption).__name__}')
    if caption is not None and not is_unicode_text(caption):
        raise ValueError("the caption is not valid Unicode text (it holds a lone surrogate escape such as \\ud800)")
    return ImageItem(
        id=Path(file_name).as_posix(),
        origin=shown(image_path.resolve()),
        read_bytes=partial(Path.read_bytes, image_path),
        caption=caption,
    )


# --- a `datasets` dataset: a Hub id, a local dataset folder or a data file ----------------------------------------


def hub_items(
    path_or_id: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = "text",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[ImageItem]:
    """Rows of a `datasets` dataset: a Hub id, a local dataset folder (imagefolder, parquet files, or a folder
    written by `save_to_disk`), or a single .parquet/.csv/.json/.jsonl/.arrow file.

    Images are read undecoded (`datasets.Image(decode=False)`), so `read_bytes` returns the stored file bytes.
    `caption_column=None` means the rows have no captions (an instance prompt is used instead).
    """
    dataset = load_split(path_or_id, split, revision, cache_dir)
    require_columns(dataset, path_or_id, image_column, caption_column)
    images = image_column_undecoded(dataset, path_or_id, image_column)
    captions = caption_values(dataset, path_or_id, caption_column)
    if len(images) == 0:
        raise no_images_error(f"{path_or_id} (split {split!r})", "the dataset has no rows")
    local = Path(path_or_id).expanduser()
    base_folder = (local if local.is_dir() else local.parent).resolve() if local.exists() else None
    return [
        ImageItem(
            id=f"{split}/{index}",
            origin=f"{path_or_id}:{split}[{index}]",
            read_bytes=partial(read_dataset_image, images, image_column, index, base_folder),
            caption=captions[index],
        )
        for index in range(len(images))
    ]


def load_split(path_or_id: str, split: str, revision: str | None, cache_dir):
    """The requested split as a `datasets.Dataset`, with loading failures turned into DatasetError."""
    import datasets  # imported here: it is slow to import and only this source needs it

    local = Path(path_or_id).expanduser()
    try:
        if local.is_dir() and is_saved_to_disk(local):
            return pick_split(datasets.load_from_disk(str(local)), split, path_or_id)
        if local.is_file():
            builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DatasetError(
                    f"{local} is not a dataset file; use a folder, or a file ending in {', '.join(DATA_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(str(path_or_id), split=split, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as error:  # ConnectionError and FileNotFoundError are OSErrors
        raise DatasetError(
            f"cannot load dataset {path_or_id} (split {split!r}): {error}\n"
            "Check the path or Hub id, the split name, and (for a Hub id) the network or the local Hub cache."
        ) from error


def is_saved_to_disk(folder: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (load_dataset refuses them)."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def pick_split(loaded, split: str, path_or_id: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"dataset {path_or_id} has no split {split!r}; its splits are: {', '.join(loaded)}")
        return loaded[split]
    return loaded  # a single saved Dataset has no splits: it is used whatever split was asked for


def require_columns(dataset, path_or_id: str, image_column: str, caption_column: str | None) -> None:
    available = ", ".join(dataset.column_names)
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column is not None and column not in dataset.column_names:
            hint = " (or set it to null to use the instance prompt)" if role == "caption" else ""
            raise DatasetError(
                f"dataset {path_or_id} has no {role} column {column!r}; its columns are: {available}. "
                f"Set the dataset's {role}_column to one of them{hint}."
            )


def image_column_undecoded(dataset, path_or_id: str, image_column: str):
    """Only the image column, cast so that rows hold {"bytes", "path"} instead of decoded images."""
    import datasets

    images = dataset.select_columns([image_column])
    try:
        return images.cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError, NotImplementedError) as error:  # pyarrow's cast errors derive from these
        feature = dataset.features[image_column]
        raise DatasetError(
            f"column {image_column!r} of dataset {path_or_id} holds {feature}, not images; "
            "set the dataset's image_column to the column with the images"
        ) from error


def caption_values(dataset, path_or_id: str, caption_column: str | None) -> list[str | None]:
    if caption_column is None:
        return [None] * len(dataset)
    values = list(dataset[caption_column])
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DatasetError(
                f"caption column {caption_column!r} of dataset {path_or_id} holds {type(value).__name__} values "
                f"(row {index}), not text; set the dataset's caption_column to a text column"
            )
    return values


def read_dataset_image(images, image_column: str, index: int, base_folder: Path | None) -> bytes:
    """The stored bytes of one row's image, or the file its path points at when the row keeps no bytes."""
    value = images[index][image_column]
    if value is None:
        raise FileNotFoundError("this row has no image")
    if value.get("bytes") is not None:
        return value["bytes"]
    if not value.get("path"):
        raise FileNotFoundError("this row has neither image bytes nor a path")
    path = Path(value["path"])
    # a relative path in a local dataset is relative to the dataset, not to the working directory
    if not path.is_absolute() and base_folder is not None and not path.exists():
        path = base_folder / path
    return path.read_bytes()
