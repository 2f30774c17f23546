"""Image sources: folders with sidecar captions, metadata.jsonl, and `datasets` datasets (all local, offline)."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
from PIL import Image

from lens_tune.data.sources import ImageItem, folder_items, hub_items, metadata_items
from lens_tune.errors import DatasetError


def png_bytes(color=(200, 10, 10), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network for `datasets`, and its cache in tmp_path, never the user's."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()
    return tmp_path / "hf-cache"


# --- folder_items -------------------------------------------------------------------------------------------------


def test_folder_items_finds_images_and_sidecars_sorted(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a.JPG")
    write_image(tmp_path / "sub" / "c.webp")
    write_image(tmp_path / "d.TIFF")
    (tmp_path / "b.txt").write_text("  a red square\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    items = folder_items(tmp_path)
    assert [item.id for item in items] == ["a.JPG", "b.png", "d.TIFF", "sub/c.webp"]
    by_id = {item.id: item for item in items}
    assert by_id["b.png"].caption == "a red square"
    assert by_id["a.JPG"].caption is None
    assert by_id["sub/c.webp"].origin == str((tmp_path / "sub" / "c.webp").resolve())
    assert by_id["b.png"].read_bytes() == (tmp_path / "b.png").read_bytes()


def test_folder_items_skips_hidden_and_respects_recursive(tmp_path):
    write_image(tmp_path / "top.png")
    write_image(tmp_path / ".hidden.png")
    write_image(tmp_path / ".cache" / "x.png")
    write_image(tmp_path / "sub" / "deep.png")
    assert [item.id for item in folder_items(tmp_path)] == ["sub/deep.png", "top.png"]
    assert [item.id for item in folder_items(tmp_path, recursive=False)] == ["top.png"]


def test_folder_items_caption_extension_and_unicode(tmp_path):
    write_image(tmp_path / "cat.png")
    (tmp_path / "cat.caption").write_bytes("\ufeffune chatte noire, 猫, ü".encode("utf-8"))
    (tmp_path / "cat.txt").write_text("ignored", encoding="utf-8")
    (item,) = folder_items(tmp_path, caption_extension="caption")
    assert item.caption == "une chatte noire, 猫, ü"  # byte-order mark dropped


def test_folder_items_items_are_picklable(tmp_path):
    # DataLoader workers started with spawn receive items by pickling
    write_image(tmp_path / "a.png")
    (item,) = pickle.loads(pickle.dumps(folder_items(tmp_path)))
    assert item.read_bytes() == (tmp_path / "a.png").read_bytes()


def test_folder_items_bad_utf8_sidecars_are_all_named(tmp_path):
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(b"caf\xe9 latte")
    with pytest.raises(DatasetError) as error:
        folder_items(tmp_path)
    message = str(error.value)
    assert "2 caption file(s) are not valid UTF-8" in message
    assert str((tmp_path / "a.txt").resolve()) in message and str((tmp_path / "b.txt").resolve()) in message
    assert "UTF-8" in message


def test_folder_items_empty_and_missing(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images found in .*; supported extensions: .*\.png"):
        folder_items(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        folder_items(tmp_path / "nope")
    with pytest.raises(DatasetError, match="not a folder"):
        folder_items(tmp_path / "readme.txt")


def test_file_names_that_are_not_utf8_are_shown_with_escapes(tmp_path):
    # found by tests/test_fuzz_images.py: a Latin-1 name reached messages as a lone surrogate, and printing the
    # message to a UTF-8 terminal was a traceback
    folder = os.fsencode(tmp_path)
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes())
    with open(os.path.join(folder, b"caf\xe9.txt"), "wb") as f:
        f.write(b"caf\xe9 latte")  # not UTF-8 either
    with pytest.raises(DatasetError) as error:
        folder_items(tmp_path)
    assert f"{tmp_path.resolve()}/caf\\xe9.txt: invalid continuation byte" in str(error.value)
    str(error.value).encode("utf-8")
    os.remove(os.path.join(folder, b"caf\xe9.txt"))
    (item,) = folder_items(tmp_path)
    assert item.origin == f"{tmp_path.resolve()}/caf\\xe9.png"
    assert item.read_bytes() == png_bytes()  # the real file is still read


def test_folder_names_the_file_system_refuses_are_dataset_errors(tmp_path):
    # found by tests/test_fuzz_recipes.py: a 300-character folder name was a bare "[Errno 36] File name too long"
    with pytest.raises(DatasetError, match=r"data folder .* cannot be read \(File name too long\); check the dataset's"):
        folder_items(tmp_path / ("x" * 300))


# --- metadata_items -----------------------------------------------------------------------------------------------


def write_metadata(folder, records_or_lines):
    lines = [line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in records_or_lines]
    path = folder / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_metadata_items_reads_text_and_caption_keys(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "c.png")
    write_metadata(tmp_path, [
        {"file_name": "images/a.png", "text": "a, tagged"},
        "",
        {"file_name": "b.png", "caption": "ein Bild ✓"},
        {"file_name": "c.png"},
    ])
    for source in (tmp_path, tmp_path / "metadata.jsonl"):
        items = metadata_items(source)
        assert [(item.id, item.caption) for item in items] == [
            ("images/a.png", "a, tagged"), ("b.png", "ein Bild ✓"), ("c.png", None),
        ]
    assert items[0].origin == str((tmp_path / "images" / "a.png").resolve())
    assert items[1].read_bytes() == (tmp_path / "b.png").read_bytes()


def test_metadata_items_lists_every_bad_line(tmp_path):
    write_image(tmp_path / "ok.png")
    write_metadata(tmp_path, [
        {"file_name": "ok.png", "text": "fine"},
        "{not json",
        {"text": "no file"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "ok.png", "text": "twice"},
        [1, 2],
        {"file_name": "ok.png", "text": 5},
    ])
    with pytest.raises(DatasetError) as error:
        metadata_items(tmp_path)
    message = str(error.value)
    assert "has 6 bad line(s)" in message
    assert "line 2: invalid JSON" in message
    assert 'line 3: no "file_name"' in message
    assert "line 4: file missing.png does not exist" in message
    assert "line 5: ok.png is already listed on line 1" in message
    assert "line 6: not a JSON object" in message
    assert "line 7: the caption" in message
    assert "line 1:" not in message


def test_metadata_items_refuse_text_that_is_not_unicode_and_names_too_long(tmp_path):
    write_image(tmp_path / "ok.png")
    write_metadata(tmp_path, [
        '{"file_name": "ok.png", "text": "a \\ud800 dog"}',  # JSON allows a lone surrogate escape
        '{"file_name": "\\ud800.png"}',
        {"file_name": "x" * 300 + ".png"},
    ])
    with pytest.raises(DatasetError) as error:
        metadata_items(tmp_path)
    message = str(error.value)
    message.encode("utf-8")  # printable
    assert "line 1: the caption is not valid Unicode text" in message
    assert "line 2: file \\ud800.png does not exist" in message
    assert "line 3: cannot look for file xxx" in message and "(File name too long)" in message


def test_metadata_items_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="metadata file .* does not exist"):
        metadata_items(tmp_path)
    write_metadata(tmp_path, [""])
    with pytest.raises(DatasetError, match="no images found"):
        metadata_items(tmp_path)


# --- hub_items (offline, local datasets) --------------------------------------------------------------------------


def make_imagefolder(root):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for index, color in enumerate(colors):
        write_image(root / "train" / f"{index}.png", color)
    write_metadata(root / "train", [{"file_name": f"{index}.png", "text": f"colour {index}"} for index in range(3)])
    return root


def decoded_color(data: bytes):
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))


def test_hub_items_local_imagefolder(tmp_path, offline):
    root = make_imagefolder(tmp_path / "folder")
    items = hub_items(str(root), cache_dir=offline)
    assert [item.id for item in items] == ["train/0", "train/1", "train/2"]
    assert [item.caption for item in items] == ["colour 0", "colour 1", "colour 2"]
    assert items[1].origin == f"{root}:train[1]"
    # the original file bytes, not a re-encoding
    assert items[2].read_bytes() == (root / "train" / "2.png").read_bytes()
    no_captions = hub_items(str(root), caption_column=None, cache_dir=offline)
    assert [item.caption for item in no_captions] == [None, None, None]


def test_hub_items_saved_to_disk_and_parquet(tmp_path, offline):
    import datasets

    table = {"picture": [png_bytes((9, 9, 9)), png_bytes((7, 7, 7))], "prompt": ["dark", None]}
    dataset = datasets.Dataset.from_dict(table).cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "saved-dict"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))

    sources = [(tmp_path / "saved", "train"), (tmp_path / "saved-dict", "train"), (tmp_path / "data.parquet", "train")]
    for source, split in sources:
        items = hub_items(str(source), split=split, image_column="picture", caption_column="prompt", cache_dir=offline)
        assert [item.caption for item in items] == ["dark", None]
        assert decoded_color(items[0].read_bytes()) == (9, 9, 9)
        assert items[1].read_bytes() == table["picture"][1]
    (test_item,) = hub_items(str(tmp_path / "saved-dict"), split="test", image_column="picture", caption_column=None)
    assert test_item.id == "test/0" and decoded_color(test_item.read_bytes()) == (7, 7, 7)


def test_hub_items_path_column_relative_to_the_dataset(tmp_path, offline):
    import datasets

    write_image(tmp_path / "data" / "pics" / "x.png", (1, 2, 3))
    table = datasets.Dataset.from_dict({"image": ["pics/x.png"], "text": ["x"]})
    table.to_parquet(str(tmp_path / "data" / "d.parquet"))
    (item,) = hub_items(str(tmp_path / "data" / "d.parquet"), cache_dir=offline)
    assert decoded_color(item.read_bytes()) == (1, 2, 3)


def test_hub_items_unknown_column_names_the_columns(tmp_path, offline):
    root = make_imagefolder(tmp_path / "folder")
    with pytest.raises(DatasetError, match=r"no image column 'photo'; its columns are: image, text"):
        hub_items(str(root), image_column="photo", cache_dir=offline)
    with pytest.raises(DatasetError, match=r"no caption column 'prompt'; its columns are: image, text"):
        hub_items(str(root), caption_column="prompt", cache_dir=offline)


def test_hub_items_non_image_column(tmp_path, offline):
    import datasets

    datasets.Dataset.from_dict({"image": [png_bytes()], "score": [3], "text": ["x"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DatasetError, match="column 'score' of dataset .* holds .*int64.*not images"):
        hub_items(str(tmp_path / "d"), image_column="score", cache_dir=offline)
    with pytest.raises(DatasetError, match="caption column 'score' .* holds int values"):
        hub_items(str(tmp_path / "d"), caption_column="score", cache_dir=offline)


def test_hub_items_load_failures_are_dataset_errors(tmp_path, offline):
    root = make_imagefolder(tmp_path / "folder")
    with pytest.raises(DatasetError, match="cannot load dataset .*validation"):
        hub_items(str(root), split="validation", cache_dir=offline)
    with pytest.raises(DatasetError, match="cannot load dataset someone/not-a-dataset"):
        hub_items("someone/not-a-dataset", cache_dir=offline)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a dataset file"):
        hub_items(str(tmp_path / "notes.txt"), cache_dir=offline)


def test_hub_items_empty_dataset(monkeypatch):
    import datasets

    from lens_tune.data import sources

    # datasets itself cannot save or load an empty split, so the loading step is replaced
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=features)
    monkeypatch.setattr(sources, "load_split", lambda *args: empty)
    with pytest.raises(DatasetError, match=r"no images found in owner/name \(split 'train'\)"):
        hub_items("owner/name")


def test_item_is_a_plain_record():
    item = ImageItem(id="x", origin="/x.png", read_bytes=lambda: b"", caption=None)
    assert item.id == "x" and item.caption is None
