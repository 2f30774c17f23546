"""`lens-tune sample` end to end on the built-in tiny model, and what bad arguments get."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_tune.cli import main
from tests.conftest import GOLDEN

EXAMPLES = Path(__file__).parents[1] / "examples" / "subject"


def sample(tmp_path, *extra, out="out"):
    argv = ["sample", "--model", "tiny", "--prompt", "a red cube on a wooden table", "--steps", "3", "--width", "32", "--height", "48"]
    return main([*argv, *extra, "--out", str(tmp_path / out)])


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "sample" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--prompt", "--negative", "--adapter", "--adapter-scale", "--seed", "--steps", "--guidance", "--width", "--height", "--num-images", "--out"):
        assert option in text


def test_sample_writes_pngs_with_settings(tmp_path, capsys):
    assert sample(tmp_path, "--num-images", "2", "--seed", "7") == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["seed7-00.png", "seed7-01.png"]
    image = Image.open(files[0])
    assert image.size == (32, 48)
    settings = json.loads(image.text["lens-tune"])
    assert settings["prompt"] == "a red cube on a wooden table" and settings["seed"] == 7 and settings["steps"] == 3
    assert settings["width"] == 32 and settings["height"] == 48 and settings["index"] == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))  # two draws, not one image twice


def test_same_seed_same_images_and_adapter_changes_them(tmp_path):
    sample(tmp_path, out="a")
    sample(tmp_path, out="b")
    assert np.array_equal(pixels(tmp_path / "a" / "seed0-00.png"), pixels(tmp_path / "b" / "seed0-00.png"))
    # the golden LoRA was made for a transformer of the tiny model's shape
    sample(tmp_path, "--adapter", str(GOLDEN / "lora"), out="lora")
    sample(tmp_path, "--adapter", str(GOLDEN / "lora"), "--adapter-scale", "0", out="lora0")
    base = pixels(tmp_path / "a" / "seed0-00.png")
    assert np.abs(pixels(tmp_path / "lora" / "seed0-00.png") - base).mean() > 1
    assert np.abs(pixels(tmp_path / "lora0" / "seed0-00.png") - base).max() <= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "50"], "not a positive multiple of 16"),
        (["--steps", "0"], "outside 1..1000"),
        (["--num-images", "1000"], "outside 1..64"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sample(tmp_path, *extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_files_give_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["sample", "--model", str(tmp_path / "missing" / "model"), "--prompt", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "neither an existing local path nor a Hub repo id" in err and "Traceback" not in err
    assert sample(tmp_path, "--adapter", str(tmp_path / "nope.safetensors")) == 2
    assert "nope.safetensors does not exist" in capsys.readouterr().err


def run_tiny(tmp_path, capsys, data: str, extra: str = "") -> tuple[int, str]:
    """`lens-tune run` of a tiny-model recipe with this data section; its exit code and stderr."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: tiny}}\ndata: {data}\n{extra}\n"
                      f"output: {{dir: {tmp_path / 'runs'}}}\ncache: {{dir: {tmp_path / 'cache'}}}\n")
    code = main(["run", str(recipe), "--device", "cpu"])
    return code, capsys.readouterr().err


def test_run_with_bad_input_says_what_to_fix_and_no_run_again_hint(tmp_path, capsys):
    code, err = run_tiny(tmp_path, capsys, f"{{datasets: [{{kind: subject, folder: {tmp_path / 'no-such-folder'}}}]}}")
    assert code == 2 and "no-such-folder" in err and "Traceback" not in err, err
    assert "run again" not in err and "--resume" not in err, err  # the message says what to fix; nothing to continue
    assert not list((tmp_path / "runs").glob("*/*"))  # no run folder was made


@pytest.mark.parametrize("setting, message", [
    ("lora: {blocks: [99]}", "99"),
    ("lora: {targets: [no_such_layer]}", "no_such_layer"),
])
def test_run_with_bad_adapter_settings_stops_before_caching_and_makes_no_run_folder(tmp_path, capsys, setting, message):
    code, err = run_tiny(tmp_path, capsys, f"{{trigger: sks, datasets: [{{kind: subject, folder: {EXAMPLES}}}]}}", setting)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not list((tmp_path / "runs").glob("*/*")) and not (tmp_path / "cache").exists()
