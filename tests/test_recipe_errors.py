"""What a user sees for a broken recipe, through the real CLI (`lens-tune validate` / `lens-tune cache`).

The promise: a broken recipe fails (status 2, never a traceback) with an error that names the file, the line and
column, the dotted field path and what is allowed; an unknown key gets a "did you mean"; contradictory options are
explained. Every case below starts from one valid recipe (the quickstart, shrunk) and makes ONE mistake.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lens_tune.cli import main
from lens_tune.recipe.schema import Recipe

REPO = Path(__file__).resolve().parent.parent
SUBJECT = REPO / "examples" / "subject"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

# A valid recipe. `data` comes first so that "(top level)" (line 1) and the `model:` key (line 9) differ.
BASE = f"""\
data:
  trigger: sks
  min_image_size: 64
  datasets:
    - kind: subject
      folder: {json.dumps(str(SUBJECT))}
      resolution: [128]
      caption_dropout: 0.1
model:
  source: tiny
dreambooth:
  instance_prompt: "a photo of [trigger] toy robot"
  class_prompt: "a photo of a toy robot"
  prior_preservation: true
lora:
  rank: 8
train:
  steps: 10
  learning_rate: 1.0e-3
  optimizer: adamw
validation:
  prompts: ["a photo of [trigger] toy robot on a beach"]
  every: 5
checkpoint:
  every: 5
"""


def edit(text: str, *changes: tuple[str, str]) -> str:
    """Apply (old, new) replacements; each `old` must occur exactly once, so a case cannot silently do nothing."""
    for old, new in changes:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the recipe"
        text = text.replace(old, new)
    return text


def where(text: str, marked: str) -> str:
    """`line:col` (1-based) of the character after '^' in `marked`, found (once) in `text`.

    where(text, "learning_rate: ^-1") is the position of the value -1.
    """
    needle = marked.replace("^", "")
    assert text.count(needle) == 1, f"{needle!r} occurs {text.count(needle)} times in the recipe"
    offset = text.index(needle) + marked.index("^")
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"{line}:{column}"


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (status, stdout, stderr); an argparse exit counts as its status. Never a traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out and "Traceback" not in err, err
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# one mistake per case
# --------------------------------------------------------------------------------------------------
# id: (changes, overrides, location, expected fragments)
#   location: a '^'-marked snippet of the broken recipe, or a literal "line:col"; None for override-only mistakes
#   fragments: the first one is "<dotted.path>: <start of the message>"; every fragment must be in stderr

CASES = {
    # unknown keys -------------------------------------------------------------------------------
    "unknown top-level key (typo)": (
        [("train:", "trian:")], [], "^trian:",
        ["trian: unknown field 'trian'", "did you mean 'train'?"],
    ),
    "unknown nested key (typo)": (
        [("learning_rate:", "learning_rat:")], [], "^learning_rat:",
        ["train.learning_rat: unknown field 'learning_rat'", "did you mean 'learning_rate'?"],
    ),
    "unknown key inside a dataset (typo)": (
        [("caption_dropout:", "caption_dropuot:")], [], "^caption_dropuot:",
        ["data.datasets[0].caption_dropuot: unknown field 'caption_dropuot'", "did you mean 'caption_dropout'?"],
    ),
    "unknown key with nothing close lists the allowed fields": (
        [("  rank: 8\n", "  rank: 8\n  colour: red\n")], [], "^colour: red",
        ["lora.colour: unknown field 'colour'; allowed fields: type, rank, alpha, dropout"],
    ),
    # numbers out of range / wrong type ----------------------------------------------------------------
    "negative learning rate": (
        [("learning_rate: 1.0e-3", "learning_rate: -1")], [], "learning_rate: ^-1",
        ["train.learning_rate: Input should be greater than 0 (got -1)"],
    ),
    "learning rate as a word": (
        [("learning_rate: 1.0e-3", "learning_rate: fast")], [], "learning_rate: ^fast",
        ["train.learning_rate: Input should be a valid number", "(got 'fast')"],
    ),
    "steps not a number": (
        [("steps: 10", "steps: 1e9x")], [], "steps: ^1e9x",
        ["train.steps: Input should be a valid integer", "(got '1e9x')"],
    ),
    "lora rank 0": (
        [("rank: 8", "rank: 0")], [], "rank: ^0",
        ["lora.rank: Input should be greater than or equal to 1 (got 0)"],
    ),
    "caption dropout above 1": (
        [("caption_dropout: 0.1", "caption_dropout: 1.5")], [], "caption_dropout: ^1.5",
        ["data.datasets[0].caption_dropout: Input should be less than or equal to 1 (got 1.5)"],
    ),
    "checkpoint every 0": (
        [("checkpoint:\n  every: 5", "checkpoint:\n  every: 0")], [], "checkpoint:\n  every: ^0",
        ["checkpoint.every: Input should be greater than or equal to 1 (got 0)"],
    ),
    "null for a field that cannot be null": (
        [("steps: 10", "steps:")], [], "  steps:^\n",
        ["train.steps: Input should be a valid integer", "(got null)", "this field cannot be null"],
    ),
    "number where text is expected": (
        [("trigger: sks", "trigger: 123")], [], "trigger: ^123",
        ["data.trigger: Input should be a valid string (got 123)", "put the value in quotes"],
    ),
    "boolean that is not a boolean": (
        [("prior_preservation: true", "prior_preservation: maybe")], [], "prior_preservation: ^maybe",
        ["dreambooth.prior_preservation: Input should be a boolean (true or false) (got 'maybe')"],
    ),
    "section given as a scalar": (
        [("lora:\n  rank: 8\n", "lora: 8\n")], [], "lora: ^8",
        ["lora: Input should be a mapping of `key: value` fields (got 8)"],
    ),
    # choices ----------------------------------------------------------------------------------------
    "optimizer not in the list": (
        [("optimizer: adamw", "optimizer: adam")], [], "optimizer: ^adam",
        [
            "train.optimizer: Input should be one of 'adamw8bit', 'adamw', 'lion8bit', 'adafactor', 'prodigy' "
            "(got 'adam'); did you mean 'adamw'?"
        ],
    ),
    # NOTE: today's message lists only 'attention' of the three names (see the report on load.py's union text).
    "lora targets neither a name nor a list": (
        [("  rank: 8\n", "  rank: 8\n  targets: everything\n")], [], "targets: ^everything",
        ["lora.targets: Input should be one of 'attention'", "a valid list", "(got 'everything')"],
    ),
    "dataset kind not allowed": (
        [("kind: subject", "kind: person")], [], "kind: ^person",
        ["data.datasets[0].kind: Input should be one of 'subject', 'style' (got 'person')"],
    ),
    "dataset kind typo": (
        [("kind: subject", "kind: subjct")], [], "kind: ^subjct",
        ["data.datasets[0].kind: Input should be one of 'subject', 'style' (got 'subjct'); did you mean 'subject'?"],
    ),
    "background not a colour": (
        [("  min_image_size: 64\n", "  min_image_size: 64\n  background: notacolour\n")], [], "background: ^notacolour",
        ["data.background: 'notacolour' is not a colour; use a name such as white or a hex value such as #808080"],
    ),
    # datasets ---------------------------------------------------------------------------------------
    "no datasets": (
        [(BASE[BASE.index("  datasets:"):BASE.index("model:")], "  datasets: []\n")], [], "^datasets: []",
        ["data.datasets: List should have at least 1 item"],
    ),
    "dataset with two sources": (
        [("      resolution: [128]\n", "      hub: someone/photos\n      resolution: [128]\n")], [], "hub: ^someone/photos",
        ["data.datasets[0].hub: a dataset takes exactly one of folder, metadata or hub (it has folder, hub)"],
    ),
    "dataset with no source": (
        [("      folder:", "      #folder:")], [], "- ^kind: subject",
        ["data.datasets[0]: a dataset needs one of folder, metadata or hub"],
    ),
    "dataset without a kind": (
        [("    - kind: subject\n      folder:", "    - folder:")], [], "- ^folder:",
        ["data.datasets[0]: missing required field 'kind'"],
    ),
    "resolution not a multiple of 16": (
        [("resolution: [128]", "resolution: [1000]")], [], "resolution: [^1000]",
        ["data.datasets[0].resolution[0]: a resolution must be a positive multiple of 16 (Lens works on 16-pixel tokens), got 1000"],
    ),
    "second resolution not a multiple of 16": (
        [("resolution: [128]", "resolution: [128, 100]")], [], "resolution: [128, ^100]",
        ["data.datasets[0].resolution[1]: a resolution must be a positive multiple of 16", "got 100"],
    ),
    "resolution as a scalar instead of a list": (
        [("resolution: [128]", "resolution: 1024")], [], "resolution: ^1024",
        ["data.datasets[0].resolution: Input should be a valid list (got 1024)"],
    ),
    "validation width not a multiple of 16": (
        [("validation:\n", "validation:\n  width: 100\n")], [], "width: ^100",
        ["validation.width: width must be a positive multiple of 16 (Lens works on 16-pixel tokens), got 100"],
    ),
    # missing required parts ---------------------------------------------------------------------------
    "missing model section": (
        [("model:\n  source: tiny\n", "")], [], "1:1",
        ["(top level): missing required field 'model'"],
    ),
    "missing model.source": (
        [("  source: tiny\n", "  variant: lens\n")], [], "^model:",
        ["model: missing required field 'source' (the base model: 'tiny'"],
    ),
    # contradictory options (cross-field checks) --------------------------------------------------------
    "prior preservation without a class prompt": (
        [('  class_prompt: "a photo of a toy robot"\n', "")], [], "prior_preservation: ^true",
        ["dreambooth.prior_preservation: prior_preservation needs a class_prompt (e.g. 'a photo of a dog')"],
    ),
    # Checks on the whole recipe point at the field they are about.
    "class prompt containing [trigger]": (
        [('class_prompt: "a photo of a toy robot"', 'class_prompt: "a photo of [trigger] robot"')], [], 'class_prompt: ^"a photo of [trigger] robot"',
        ["dreambooth.class_prompt: dreambooth.class_prompt must not contain [trigger]: it describes the class, not the subject"],
    ),
    "[trigger] in a validation prompt without data.trigger": (
        [("  trigger: sks\n", ""), ('instance_prompt: "a photo of [trigger] toy robot"', 'instance_prompt: "a photo of zwx toy robot"')],
        [], 'prompts: [^"a photo of [trigger] toy robot on a beach"]',
        ["validation.prompts[0]: 'a photo of [trigger] toy robot on a beach' uses [trigger] but data.trigger is not set"],
    ),
    "prior preservation with only a style dataset": (
        [("kind: subject", "kind: style")], [], "prior_preservation: ^true",
        ["dreambooth.prior_preservation: dreambooth.prior_preservation is for subject datasets, and this recipe has none"],
    ),
    "subject without captions and without an instance prompt": (
        [('  instance_prompt: "a photo of [trigger] toy robot"\n', ""),
         ("      caption_dropout: 0.1\n", "      caption_dropout: 0.1\n      use_captions: false\n")],
        [], "use_captions: ^false",
        ["data.datasets[0].use_captions: a subject dataset with use_captions: false needs dreambooth.instance_prompt"],
    ),
    "an adapter on the modulation layers kept on the host": (
        [("  source: tiny\n", "  source: tiny\n  modulation_device: cpu\n"), ("  rank: 8\n", "  rank: 8\n  targets: all\n")],
        [], "targets: ^all",
        ["lora.targets: model.modulation_device: cpu keeps img_mod/txt_mod frozen off the GPU, so lora.targets cannot "
         "adapt them"],
    ),
    # YAML and files ---------------------------------------------------------------------------------
    "tab indentation": (
        [("  steps: 10", "\tsteps: 10")], [], "^\tsteps",
        ["YAML syntax error: a tab character here; YAML indentation must use spaces, not tabs"],
    ),
    "unquoted value with a colon": (
        [('instance_prompt: "a photo of [trigger] toy robot"', "instance_prompt: photo: [trigger] toy robot")],
        [], "instance_prompt: photo^: [trigger]",
        ["YAML syntax error: unexpected ':' here", "put a value that contains ': ' in quotes"],
    ),
    "duplicate key": (
        [("  steps: 10\n", "  steps: 10\n  steps: 20\n")], [], "  ^steps: 20",
        ["duplicate key 'steps' (first set at line 18, column 3); a key may appear only once in a mapping"],
    ),
    "extends a missing file": (
        [("data:\n  trigger", "extends: base-missing.yaml\ndata:\n  trigger")], [], "extends: ^base-missing.yaml",
        ["extends: file not found: {dir}/base-missing.yaml", "relative to the file that names them"],
    ),
    # command-line overrides -------------------------------------------------------------------------
    "override without '='": (
        [], ["train.steps"], None,
        ["command-line override `train.steps`: expected KEY=VALUE", "(there is no '=')"],
    ),
    "override with an unknown key": (
        [], ["train.lr=1e-4"], None,
        ["command-line override `train.lr=1e-4`: train.lr: unknown field 'lr'; allowed fields: steps", "learning_rate"],
    ),
    "override with a bad value": (
        [], ["train.batch_size=0"], None,
        ["command-line override `train.batch_size=0`: train.batch_size: Input should be greater than or equal to 1 (got 0)"],
    ),
    "override of a list item that does not exist": (
        [], ["data.datasets.3.repeats=2"], None,
        ["command-line override `data.datasets.3.repeats=2`: index 3 is out of range: `data.datasets` has 1 item (valid indices: 0 to 0)"],
    ),
}


def test_the_base_recipe_is_valid(tmp_path, capsys):
    path = write(tmp_path, BASE)
    code, out, err = run(capsys, ["validate", str(path)])
    assert code == 0, err
    assert f"OK: {path}" in out and "subject dataset" in out and "6 image(s)" in out


def test_there_are_enough_distinct_mistakes():
    assert len(CASES) >= 24
    assert len({(tuple(c), tuple(o)) for c, o, _, _ in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_one_mistake(tmp_path, capsys, case):
    changes, overrides, location, fragments = CASES[case]
    text = edit(BASE, *changes)
    path = write(tmp_path, text)
    code, out, err = run(capsys, ["validate", str(path), *overrides])
    assert code == 2, err
    assert err.startswith("lens-tune validate: error: "), err
    assert "OK:" not in out  # nothing printed as if it had worked
    if location is not None:
        spot = location if location[0].isdigit() else where(text, location)
        # the position opens the problem's line, followed by the first fragment (the dotted path and message)
        assert f"{path}:{spot}: {fragments[0].format(dir=tmp_path)}" in err, err
    else:
        assert fragments[0] in err, err
    for fragment in fragments[1:]:
        assert fragment.format(dir=tmp_path) in err, err


def test_several_mistakes_are_listed_together_in_file_order(tmp_path, capsys):
    text = edit(BASE, ("train:", "trian:"), ("kind: subject", "kind: person"), ("checkpoint:\n  every: 5", "checkpoint:\n  every: 0"))
    path = write(tmp_path, text)
    code, _, err = run(capsys, ["validate", str(path)])
    assert code == 2
    assert f"invalid recipe {path}: 3 problems:" in err
    problems = [line.strip() for line in err.splitlines() if line.startswith(f"  {path}:")]
    kind_at, typo_at, every_at = where(text, "kind: ^person"), where(text, "^trian:"), where(text, "checkpoint:\n  every: ^0")
    assert problems == [
        f"{path}:{kind_at}: data.datasets[0].kind: Input should be one of 'subject', 'style' (got 'person')",
        f"{path}:{typo_at}: trian: unknown field 'trian'; did you mean 'train'?",
        f"{path}:{every_at}: checkpoint.every: Input should be greater than or equal to 1 (got 0)",
    ]
    assert f"hint: run `lens-tune validate --explain {path}` to see every field" in err


def test_mistakes_in_the_file_and_in_an_override_are_reported_together(tmp_path, capsys):
    text = edit(BASE, ("rank: 8", "rank: 0"))
    path = write(tmp_path, text)
    code, _, err = run(capsys, ["validate", str(path), "train.optimizer=sgd"])
    assert code == 2 and "2 problems" in err
    assert f"{path}:{where(text, 'rank: ^0')}: lora.rank: Input should be greater than or equal to 1 (got 0)" in err
    assert "command-line override `train.optimizer=sgd`: train.optimizer: Input should be one of 'adamw8bit'" in err
    assert err.index("lora.rank") < err.index("train.optimizer")  # the file's problems first


def test_recipe_file_not_found(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = run(capsys, ["validate", str(missing)])
    assert code == 2 and f"recipe file not found: {missing}" in err


def test_argparse_level_mistake_exits_2(capsys):
    code, _, err = run(capsys, ["cache"])
    assert code == 2 and "the following arguments are required: recipe" in err


def test_cache_reports_the_same_error_and_does_no_work(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LENS_TUNE_CACHE", str(cache))
    text = edit(BASE, ("learning_rate:", "learning_rat:"))
    path = write(tmp_path, text)
    code, _, validate_err = run(capsys, ["validate", str(path)])
    assert code == 2
    code, out, cache_err = run(capsys, ["cache", str(path)])
    assert code == 2
    expected = f"{path}:{where(text, '^learning_rat:')}: train.learning_rat: unknown field 'learning_rat'; did you mean 'learning_rate'?"
    assert expected in cache_err
    assert cache_err.replace("lens-tune cache:", "lens-tune validate:") == validate_err
    assert out == "" and not cache.exists()  # not even the tiny model was built


# --------------------------------------------------------------------------------------------------
# shipped recipes, --explain, usage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(capsys, monkeypatch, recipe):
    monkeypatch.chdir(REPO)
    name = f"recipes/{recipe.name}"
    code, out, err = run(capsys, ["validate", name])
    assert code == 0, err
    assert f"OK: {name}" in out


def test_there_are_shipped_recipes():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "dreambooth.yaml", "dreambooth-8gb.yaml", "style.yaml"}


def test_explain_prints_every_section(capsys):
    code, out, err = run(capsys, ["validate", "--explain"])
    assert code == 0, err
    starts = {line.split()[0] for line in out.splitlines() if line.strip()}
    for section in Recipe.model_fields:
        assert section in starts, section
    for nested in ("model.source", "data.datasets[].resolution", "train.learning_rate", "dreambooth.class_prompt"):
        assert nested in starts, nested


def test_validate_without_a_recipe_is_a_usage_error(capsys):
    code, out, err = run(capsys, ["validate"])
    assert code == 2 and out == ""
    assert "lens-tune validate: error: validate needs a RECIPE (or --explain alone to list the fields)." in err


# --------------------------------------------------------------------------------------------------
# a model whose weights are not there
# --------------------------------------------------------------------------------------------------

DOWNLOAD_HINT = "hf download SceneWorks/Lens --local-dir models/Lens"


def _no_local_weights():
    assert not (REPO / "models" / "Lens").exists(), "these tests expect ./models/Lens to be absent from the repo root"


def test_validate_a_recipe_whose_weights_are_absent(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    _no_local_weights()
    code, out, err = run(capsys, ["validate", "recipes/dreambooth.yaml"])
    assert code == 0, err
    assert "OK: recipes/dreambooth.yaml" in out
    model_line = next(line for line in out.splitlines() if line.strip().startswith("model ./models/Lens:"))
    assert "NOT AVAILABLE" in model_line and "'./models/Lens' does not exist" in model_line
    assert DOWNLOAD_HINT in model_line


def test_cache_stops_at_once_when_the_weights_are_absent(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    _no_local_weights()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LENS_TUNE_CACHE", str(cache))
    repo_entries = sorted(os.listdir(REPO))
    start = time.perf_counter()
    code, out, err = run(capsys, ["cache", "recipes/dreambooth.yaml"])
    elapsed = time.perf_counter() - start
    assert code == 2
    assert err.startswith("lens-tune cache: error: model.source './models/Lens' does not exist."), err
    assert DOWNLOAD_HINT in err and "set model.source to the Hub repo id" in err
    assert "== checking images" not in out  # no phase started
    assert elapsed < 5, elapsed
    assert not cache.exists() or not any(cache.iterdir())
    assert sorted(os.listdir(REPO)) == repo_entries  # no runs/, models/ or cache folder appeared


# --------------------------------------------------------------------------------------------------
# found by tests/test_fuzz_recipes.py: values that `validate` accepted and `run` then failed on
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "fragment"), [
    # NaN and infinity are no setting's meaning; a NaN would only show up as a NaN loss
    ("train.logit_mean=.nan", "train.logit_mean: Input should be a finite number (got nan)"),
    ("dreambooth.prior_loss_weight=.inf", "dreambooth.prior_loss_weight: Input should be a finite number (got inf)"),
    # torch takes 64-bit seeds: 2**64 was "Overflow when unpacking long long" in a half-made run folder
    ("train.seed=18446744073709551616", "train.seed: Input should be less than or equal to 9223372036854775807"),
    ("validation.seeds=[0, 18446744073709551616]", "validation.seeds[1]: Input should be less than or equal to"),
    ("dreambooth.class_image_seed=-1", "dreambooth.class_image_seed: Input should be greater than or equal to 0"),
    # a sample 2**20 pixels wide would try to allocate terabytes
    ("validation.width=1048576", "validation.width: width must be at most 8192 pixels, got 1048576"),
    ("data.datasets.0.resolution=[128, 16384]", "data.datasets[0].resolution[1]: a resolution must be at most 8192"),
    # a shift of 0 or less turns every sigma into 0 or a negative number
    ("train.shift=-1", "train.shift: Input should be greater than 0 or 'auto' (got -1)"),
    ("lora.blocks=[0, -1]", "lora.blocks[1]: Input should be greater than or equal to 0 (got -1)"),
])
def test_values_a_run_cannot_use_are_refused_by_validate(tmp_path, capsys, override, fragment):
    path = write(tmp_path, BASE)
    code, out, err = run(capsys, ["validate", str(path), override])
    assert code == 2, out
    assert f"command-line override `{override}`: {fragment}" in err, err


def test_the_largest_seeds_and_sizes_are_accepted(tmp_path, capsys):
    path = write(tmp_path, BASE)
    overrides = ["train.seed=9223372036854775807", "validation.seeds=[0, 9223372036854775807]",
                 "validation.width=8192", "train.shift=0.5"]
    code, _, err = run(capsys, ["validate", str(path), *overrides])
    assert code == 0, err


def test_text_that_is_not_unicode_is_refused_with_its_position(tmp_path, capsys):
    text = edit(BASE, ('class_prompt: "a photo of a toy robot"', 'class_prompt: "a photo of a \\ud800 robot"'))
    path = write(tmp_path, text)
    code, _, err = run(capsys, ["validate", str(path)])
    spot = where(text, 'class_prompt: ^"a photo')
    assert code == 2 and f"{path}:{spot}: 'a photo of a \\ud800 robot' is not valid Unicode text" in err, err
