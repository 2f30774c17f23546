"""Recipe loading: YAML with positions, extends, overrides, validation errors, paths, explain, dump.

The models here are small stand-ins for the real schema; the loader is generic over any pydantic model.
Every mistake test asserts the exact ``file:line:column``, the dotted path and what is allowed.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lens_tune.errors import LensTuneError, RecipeError
from lens_tune.recipe.load import (
    Origin,
    dump_yaml,
    explain,
    load_recipe,
    load_recipe_data,
    resolve_paths,
    validate,
)

# --------------------------------------------------------------------------------------------------
# test models
# --------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    source: str | None = Field(None, description="Hub id or local folder of the base model")
    output_dir: Path = Field(Path("out"), description="Where checkpoints go")


class FolderData(Strict):
    """Images in a folder."""

    kind: Literal["folder"] = Field(description="Selects this kind of dataset")
    path: Path = Field(description="Folder of images")
    repeats: int = Field(1, ge=1, le=100, description="Times each image is seen per epoch")
    caption: str | None = None


class HubData(Strict):
    """A dataset on the Hub."""

    kind: Literal["hub"]
    repo: str = Field(description="Hub dataset id")
    split: str = "train"


Dataset = Annotated[FolderData | HubData, Field(discriminator="kind")]


class DataSection(Strict):
    datasets: list[Dataset] = Field(description="Training datasets")
    captions: Path | None = Field(None, description="Optional captions file")
    extra_dirs: list[Path] = Field(default_factory=list, description="More image folders")
    size: int | tuple[int, int] = Field(1024, description="Square size or (width, height)")


class TrainSection(Strict):
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Learning rate")
    steps: int = Field(ge=1, description="Optimizer steps")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training precision")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


class ValidationSection(Strict):
    prompts: list[str] = Field(default_factory=list, description="Prompts rendered during training")
    every: int = Field(50, ge=1, description="Validate every N steps")


class Recipe(Strict):
    model: ModelSection = Field(default_factory=ModelSection, description="Base model")
    train: TrainSection = Field(description="Optimisation settings")
    data: DataSection = Field(description="Training data")
    validation: ValidationSection = Field(default_factory=ValidationSection)
    seed: int = 0

    @model_validator(mode="after")
    def _validation_fits(self):
        if self.validation.prompts and self.validation.every > self.train.steps:
            raise ValueError(
                f"validation.every ({self.validation.every}) is larger than train.steps "
                f"({self.train.steps}): validation would never run"
            )
        return self


GOOD = """\
model:
  source: microsoft/lens
train:
  learning_rate: 1e-4
  steps: 100
data:
  datasets:
    - kind: folder
      path: images
      repeats: 2
    - kind: hub
      repo: user/set
"""
# line numbers in GOOD: 3 train:, 4 learning_rate, 5 steps, 6 data:, 7 datasets:, 8-10 folder, 11-12 hub

HINT = "hint: run `lens-tune validate --explain r.yaml` to see every field"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # messages then show short relative names like r.yaml


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def fail(text: str | None, overrides=(), name: str = "r.yaml") -> str:
    """Load a recipe that must fail; returns the message (only RecipeError may come out)."""
    if text is not None:
        write(name, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(name, Recipe, overrides)
    assert isinstance(info.value, LensTuneError)
    return str(info.value)


def one_problem(message: str) -> str:
    """The single problem line of a validation error (and checks the header and the hint)."""
    lines = message.splitlines()
    assert lines[0] == "invalid recipe r.yaml: 1 problem:", message
    assert lines[-1] == HINT
    assert len(lines) == 3, message
    return lines[1].strip()


# --------------------------------------------------------------------------------------------------
# positive: a good recipe, positions, YAML 1.2 scalars
# --------------------------------------------------------------------------------------------------


def test_good_recipe_loads():
    write("r.yaml", GOOD)
    recipe = load_recipe("r.yaml", Recipe)
    assert recipe.train.learning_rate == 1e-4  # a float (PyYAML's YAML 1.1 would give the string '1e-4')
    assert isinstance(recipe.train.learning_rate, float)
    assert recipe.data.datasets[0].repeats == 2
    assert isinstance(recipe.data.datasets[1], HubData)


def test_positions_of_keys_and_list_items():
    write("r.yaml", GOOD)
    data, pos = load_recipe_data("r.yaml")
    assert pos[("train", "steps")] == Origin("r.yaml", 5, 10)
    assert pos.key_origin(("train", "steps")) == Origin("r.yaml", 5, 3)
    assert pos[("data", "datasets", 0, "repeats")] == Origin("r.yaml", 10, 16)
    assert pos[("data", "datasets", 1)] == Origin("r.yaml", 11, 7)
    assert pos[()] == Origin("r.yaml", 1, 1)
    assert str(pos[("train",)]) == "r.yaml:4:3"
    assert pos.source == "r.yaml"


def test_yaml_1_2_scalars():
    class Scalars(Strict):
        ratio: str
        lr: float
        octal: int
        flag: str
        date: str

    write("s.yaml", "ratio: 16:9\nlr: 1e-4\noctal: 0o17\nflag: no\ndate: 2024-01-01\n")
    s = load_recipe("s.yaml", Scalars)
    assert (s.ratio, s.lr, s.octal, s.flag, s.date) == ("16:9", 1e-4, 15, "no", "2024-01-01")


def test_bool_fields_accept_what_pydantic_accepts():
    # YAML reads yes/no as strings (YAML 1.2); pydantic's lax bool turns "yes"/"on"/"true" into True
    write("r.yaml", GOOD.replace("  steps: 100\n", "  steps: 100\n  gradient_checkpointing: yes\n"))
    assert load_recipe("r.yaml", Recipe).train.gradient_checkpointing is True
    write("r.yaml", GOOD.replace("  steps: 100\n", "  steps: 100\n  gradient_checkpointing: 'on'\n"))
    assert load_recipe("r.yaml", Recipe).train.gradient_checkpointing is True


def test_yaml_anchors_and_merge_keys():
    write(
        "r.yaml",
        GOOD
        + "validation:\n  prompts: &p [a dog, a cat]\n  every: 10\n"
        + "x: &common {every: 10}\n",
    )
    # `x` is not a field: the anchors work, the schema still rejects unknown keys
    assert "r.yaml:16:1: x: unknown field 'x'" in fail(None)
    write("r.yaml", GOOD + "validation:\n  <<: {every: 7, prompts: [a]}\n  every: 9\n")
    recipe = load_recipe("r.yaml", Recipe)
    assert (recipe.validation.every, recipe.validation.prompts) == (9, ["a"])


# --------------------------------------------------------------------------------------------------
# mistakes: validation
# --------------------------------------------------------------------------------------------------


def test_unknown_top_level_key_did_you_mean():
    msg = fail(GOOD + "seeed: 3\n")
    assert one_problem(msg) == "r.yaml:13:1: seeed: unknown field 'seeed'; did you mean 'seed'?"


def test_unknown_nested_key_did_you_mean():
    msg = fail(GOOD.replace("learning_rate:", "lerning_rate:"))
    assert one_problem(msg) == (
        "r.yaml:4:3: train.lerning_rate: unknown field 'lerning_rate'; did you mean 'learning_rate'?"
    )


def test_unknown_key_with_nothing_close_lists_allowed_fields():
    msg = fail(GOOD.replace("  source: microsoft/lens\n", "  source: microsoft/lens\n  zzz: 1\n"))
    assert one_problem(msg) == "r.yaml:3:3: model.zzz: unknown field 'zzz'; allowed fields: source, output_dir"


def test_unknown_key_inside_list_item():
    msg = fail(GOOD.replace("      repo: user/set\n", "      repo: user/set\n      spilt: test\n"))
    assert one_problem(msg) == (
        "r.yaml:13:7: data.datasets[1].spilt: unknown field 'spilt'; did you mean 'split'?"
    )


def test_wrong_type_string_for_int():
    msg = fail(GOOD.replace("steps: 100", "steps: many"))
    assert one_problem(msg) == (
        "r.yaml:5:10: train.steps: Input should be a valid integer, unable to parse string as an integer "
        "(got 'many')"
    )


def test_out_of_range_number():
    msg = fail(GOOD.replace("learning_rate: 1e-4", "learning_rate: -1"))
    assert one_problem(msg) == "r.yaml:4:18: train.learning_rate: Input should be greater than 0 (got -1)"


def test_out_of_range_upper_bound_deep_in_list():
    msg = fail(GOOD.replace("repeats: 2", "repeats: 500"))
    assert one_problem(msg) == (
        "r.yaml:10:16: data.datasets[0].repeats: Input should be less than or equal to 100 (got 500)"
    )


def test_bad_literal_lists_allowed_values():
    msg = fail(GOOD.replace("  steps: 100\n", "  steps: 100\n  precision: fp32x\n"))
    assert one_problem(msg) == (
        "r.yaml:6:14: train.precision: Input should be one of 'bf16', 'fp16', 'fp32' (got 'fp32x'); "
        "did you mean 'fp32'?"
    )


def test_bad_discriminator_tag_in_second_list_item():
    msg = fail(GOOD.replace("kind: hub", "kind: hubb"))
    assert one_problem(msg) == (
        "r.yaml:11:13: data.datasets[1].kind: Input should be one of 'folder', 'hub' (got 'hubb'); "
        "did you mean 'hub'?"
    )


def test_missing_discriminator_names_the_kinds():
    msg = fail(GOOD.replace("    - kind: hub\n      repo: user/set\n", "    - repo: user/set\n"))
    assert one_problem(msg) == (
        "r.yaml:11:7: data.datasets[1]: missing required field 'kind' "
        "(it selects the kind of entry: one of 'folder', 'hub')"
    )


def test_bad_item_deep_inside_second_dataset():
    msg = fail(GOOD.replace("      repo: user/set\n", "      repo: [user, set]\n"))
    assert one_problem(msg) == (
        "r.yaml:12:13: data.datasets[1].repo: Input should be a valid string (got a list ['user', 'set'])"
    )


def test_missing_required_field_points_at_parent():
    msg = fail(GOOD.replace("  steps: 100\n", ""))
    assert one_problem(msg) == "r.yaml:3:1: train: missing required field 'steps' (Optimizer steps)"


def test_missing_required_section_points_at_top_level():
    msg = fail(GOOD.split("data:")[0])
    assert one_problem(msg) == "r.yaml:1:1: (top level): missing required field 'data' (Training data)"


def test_missing_required_field_in_list_item():
    msg = fail(GOOD.replace("      path: images\n", ""))
    assert one_problem(msg) == "r.yaml:8:7: data.datasets[0]: missing required field 'path' (Folder of images)"


def test_scalar_instead_of_list():
    msg = fail(GOOD.replace("  datasets:\n", "  extra_dirs: more/images\n  datasets:\n"))
    assert one_problem(msg) == "r.yaml:7:15: data.extra_dirs: Input should be a valid list (got 'more/images')"


def test_scalar_instead_of_section():
    msg = fail(GOOD.replace("model:\n  source: microsoft/lens\n", "model: microsoft/lens\n"))
    assert one_problem(msg) == (
        "r.yaml:1:8: model: Input should be a mapping of `key: value` fields (got 'microsoft/lens')"
    )


def test_wrong_type_for_path():
    msg = fail(GOOD.replace("path: images", "path: 5"))
    assert one_problem(msg) == "r.yaml:9:13: data.datasets[0].path: Input should be a file path (text) (got 5)"


def test_number_for_string_says_to_quote():
    msg = fail(GOOD.replace("repo: user/set", "repo: 12345"))
    assert one_problem(msg) == (
        "r.yaml:12:13: data.datasets[1].repo: Input should be a valid string (got 12345); "
        "put the value in quotes to make it text"
    )


def test_null_for_non_optional_field():
    msg = fail(GOOD.replace("steps: 100", "steps:"))
    assert one_problem(msg) == (
        "r.yaml:5:9: train.steps: Input should be a valid integer (got null); "
        "this field cannot be null (a key with nothing after the ':' is null)"
    )


def test_null_is_fine_for_optional_field():
    write("r.yaml", GOOD.replace("source: microsoft/lens", "source: null"))
    assert load_recipe("r.yaml", Recipe).model.source is None


def test_bool_that_pydantic_cannot_read():
    msg = fail(GOOD.replace("  steps: 100\n", "  steps: 100\n  gradient_checkpointing: maybe\n"))
    assert one_problem(msg) == (
        "r.yaml:6:27: train.gradient_checkpointing: Input should be a boolean (true or false) (got 'maybe')"
    )


def test_union_of_scalars_reported_once():
    msg = fail(GOOD + "  size: big\n")
    assert one_problem(msg) == "r.yaml:13:9: data.size: Input should be a valid integer or a valid tuple (got 'big')"


def test_cross_field_validator_on_section():
    msg = fail(GOOD.replace("  steps: 100\n", "  steps: 100\n  warmup_steps: 500\n"))
    assert one_problem(msg) == "r.yaml:3:1: train: warmup_steps (500) must not exceed steps (100)"


def test_cross_field_validator_on_top_level():
    msg = fail("# comment\n" + GOOD + "validation:\n  prompts: [a dog]\n  every: 1000\n")
    assert one_problem(msg) == (
        "r.yaml:2:1: (top level): validation.every (1000) is larger than train.steps (100): "
        "validation would never run"
    )


def test_long_values_are_truncated():
    msg = fail(GOOD.replace("steps: 100", "steps: " + "x" * 200))
    line = one_problem(msg)
    assert line.startswith("r.yaml:5:10: train.steps: Input should be a valid integer")
    assert line.endswith("(got '" + "x" * 56 + "...)")  # 60 characters at most


def test_multiple_errors_reported_together():
    text = GOOD.replace("learning_rate: 1e-4", "learning_rate: 0").replace("repeats: 2", "repeats: 0")
    msg = fail(text + "seeed: 1\n", overrides=["train.steps=-5"])
    assert msg.splitlines() == [
        "invalid recipe r.yaml: 4 problems:",
        "  r.yaml:4:18: train.learning_rate: Input should be greater than 0 (got 0)",
        "  r.yaml:10:16: data.datasets[0].repeats: Input should be greater than or equal to 1 (got 0)",
        "  r.yaml:13:1: seeed: unknown field 'seeed'; did you mean 'seed'?",
        "  command-line override `train.steps=-5`: train.steps: Input should be greater than or equal to 1 (got -5)",
        HINT,
    ]
    assert len(msg.splitlines()) == 6


def test_error_in_extended_file_points_into_it():
    write("base/common.yaml", GOOD.replace("repeats: 2", "repeats: -2"))
    write("r.yaml", "extends: base/common.yaml\nseed: 3\n")
    msg = fail(None)
    assert one_problem(msg) == (
        "base/common.yaml:10:16: data.datasets[0].repeats: Input should be greater than or equal to 1 (got -2)"
    )


def test_validate_alone_uses_positions():
    write("r.yaml", GOOD.replace("steps: 100", "steps: 0"))
    data, pos = load_recipe_data("r.yaml")
    with pytest.raises(RecipeError) as info:
        validate(Recipe, data, pos)
    assert [str(i) for i in info.value.issues] == [
        "r.yaml:5:10: train.steps: Input should be greater than or equal to 1 (got 0)"
    ]


# --------------------------------------------------------------------------------------------------
# mistakes: files and YAML
# --------------------------------------------------------------------------------------------------


def test_duplicate_key():
    msg = fail(GOOD.replace("  steps: 100\n", "  steps: 100\n  steps: 200\n"))
    assert msg == (
        "r.yaml:6:3: duplicate key 'steps' (first set at line 5, column 3); a key may appear only once in a mapping"
    )


def test_tab_indentation():
    msg = fail("train:\n\tsteps: 1\n")
    assert msg == (
        "r.yaml:2:1: YAML syntax error: a tab character here; YAML indentation must use spaces, not tabs"
    )


def test_bad_indentation():
    msg = fail("train:\n    steps: 1\n  warmup_steps: 2\n")
    assert msg.startswith("r.yaml:3:3: YAML syntax error: bad indentation: this line does not line up")


def test_colon_in_unquoted_value():
    msg = fail("validation:\n  prompts:\n    - a photo: of a dog: sitting\n")
    assert msg.startswith("r.yaml:3:24: YAML syntax error: unexpected ':' here")
    assert "put a value that contains ': ' in quotes" in msg


def test_two_documents():
    msg = fail(GOOD + "---\nseed: 1\n")
    assert msg.startswith("r.yaml:13:1: YAML syntax error: the file holds more than one YAML document")


def test_python_tags_are_refused():
    msg = fail("seed: !!python/object/apply:os.system ['true']\n")
    assert msg.startswith("r.yaml:1:7: YAML syntax error: unsupported YAML tag")
    msg = fail("seed: !!python/name:os.system x\n")
    assert msg.startswith("r.yaml:1:7: YAML syntax error: unsupported YAML tag")


def test_empty_file():
    assert fail("") == "r.yaml: the recipe file is empty (expected a mapping of `key: value` lines)"
    assert fail("# only a comment\n").startswith("r.yaml: the recipe file is empty")


def test_top_level_not_a_mapping():
    msg = fail("- train\n- data\n")
    assert msg == (
        "r.yaml:1:1: the top level of a recipe must be a mapping of `key: value` lines, "
        "not a list (['train', 'data'])"
    )
    assert fail("just words\n").startswith("r.yaml:1:1: the top level of a recipe must be a mapping")


def test_missing_file():
    assert fail(None, name="nope.yaml") == "recipe file not found: nope.yaml"


def test_not_utf8():
    Path("r.yaml").write_bytes(b"seed: \xff\xfe\n")
    assert fail(None).startswith("r.yaml: not a UTF-8 text file")


# Found by tests/test_fuzz_recipes.py: each of these was a traceback, a hang or an unprintable message.


def test_control_characters_are_a_syntax_error_with_a_position():
    Path("r.yaml").write_bytes(b"train:\n  steps: 1\x00\n")
    assert fail(None).startswith("r.yaml:2:11: YAML syntax error: control character U+0000 is not allowed in YAML")
    write("r.yaml", GOOD)
    msg = fail(None, ["train.steps=5\x01"])
    assert msg.startswith("command-line override `train.steps=5\\x01`: YAML syntax error: control character U+0001")


def test_lone_surrogates_are_refused_and_pairs_are_joined():
    # an argument that is not UTF-8 reaches Python with lone surrogates; the message must stay printable
    write("r.yaml", GOOD)
    msg = fail(None, ["model.source=caf\udce9"])
    assert msg.startswith("command-line override `model.source=caf\\udce9`: YAML syntax error: U+DCFF") is False
    assert "U+DCE9 is not valid Unicode text" in msg
    msg.encode("utf-8")
    msg = fail(GOOD + 'validation:\n  prompts: ["a \\ud800 dog"]\n')
    assert msg.startswith("r.yaml:14:13: 'a \\ud800 dog' is not valid Unicode text")
    msg = fail(GOOD + '"key \\udcff": 1\n')
    assert msg.startswith("r.yaml:13:1: 'key \\udcff' is not valid Unicode text")
    write("r.yaml", GOOD + 'validation:\n  prompts: ["\\ud83e\\udd16"]\n')  # an escaped pair: one emoji
    assert load_recipe("r.yaml", Recipe).validation.prompts == ["\U0001f916"]


def test_odd_characters_in_keys_are_shown_escaped():
    msg = fail(GOOD + '"\\e[31mred\\u202e": 1\n')
    assert "r.yaml:13:1: \\x1b[31mred\\u202e: unknown field '\\x1b[31mred\\u202e'" in msg


def test_deep_nesting_is_an_error_not_a_recursion_error():
    msg = fail("seed: " + "[" * 40 + "]" * 40 + "\n")
    assert msg == "r.yaml:1:39: lists and mappings are nested too deeply here (more than 32 levels)"
    msg = fail("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    assert msg.startswith("r.yaml:1:") and "YAML syntax error: lists and mappings are nested too deeply" in msg


def test_alias_bombs_are_an_error_not_a_hang():
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 values
    started = time.monotonic()
    msg = fail("\n".join(lines) + "\n")
    assert "the recipe is too large: it holds more than 20,000 values (YAML aliases `*name`" in msg
    assert time.monotonic() - started < 10
    text = "s: &s '" + "y" * 100_000 + "'\nl: [" + ", ".join(["*s"] * 200) + "]\n"  # 20 MB of text from 100 kB
    assert "more than 10,000,000 characters of text" in fail(text)
    assert "a YAML alias refers to itself" in fail("x: &a [[*a]]\n")


def test_merge_keys_merge_each_key_once_with_pyyaml_precedence():
    # own keys win; in a list of merged mappings the earlier one wins; repeated merges do not multiply
    write("r.yaml", "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], y: 3}\nself: &s {<<: *s, k: 1}\n")
    data, _ = load_recipe_data("r.yaml")
    assert data["c"] == {"x": 1, "y": 3, "z": 2} and data["self"] == {"k": 1}
    lines = ["m0: &m0 {k0: 0, k1: 1, k2: 2}"]  # each level merges the one below 10 times: PyYAML keeps 10**40 keys
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}], own{i}: {i}}}" for i in range(1, 41)]
    write("r.yaml", "\n".join(lines) + "\n")
    started = time.monotonic()
    data, _ = load_recipe_data("r.yaml")
    assert time.monotonic() - started < 10
    assert data["m40"] == {"k0": 0, "k1": 1, "k2": 2, **{f"own{i}": i for i in range(1, 41)}}
    assert "expected a mapping or a list of mappings for merging" in fail("x: {<<: [1]}\n")


def test_a_long_list_of_problems_is_cut_short():
    write("r.yaml", GOOD + "validation:\n  prompts: [" + ", ".join(["[1]"] * 60) + "]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe("r.yaml", Recipe)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid recipe r.yaml: 60 problems:" and len(info.value.issues) == 60
    assert lines[50].startswith("  r.yaml:14:") and lines[51] == "  ... and 10 more problems" and lines[52] == HINT


def test_extends_missing_file():
    write("recipes/r.yaml", "extends: ../base/nope.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/r.yaml", Recipe)
    assert str(info.value) == (
        "recipes/r.yaml:1:10: extends: file not found: base/nope.yaml "
        "(paths in `extends` are relative to the file that names them)"
    )


def test_extends_missing_file_deeper_names_the_chain():
    write("a.yaml", "extends: [b.yaml]\n")
    write("b.yaml", "seed: 1\nextends: sub/c.yaml\n")
    msg = fail(None, name="a.yaml")
    assert msg == (
        "b.yaml:2:10: extends: file not found: sub/c.yaml "
        "(paths in `extends` are relative to the file that names them) (extends chain: a.yaml -> b.yaml)"
    )


def test_extends_cycle():
    write("a.yaml", "extends: b.yaml\n")
    write("b.yaml", "seed: 1\nextends: a.yaml\n")
    msg = fail(None, name="a.yaml")
    assert msg == (
        "b.yaml:2:10: extends: cycle: a.yaml -> b.yaml -> a.yaml "
        "(a recipe cannot extend itself, directly or through other recipes)"
    )


def test_extends_itself():
    assert fail("extends: r.yaml\n").startswith("r.yaml:1:10: extends: cycle: r.yaml -> r.yaml")


def test_extends_wrong_type():
    assert fail("extends: {a: 1}\n") == (
        "r.yaml:1:10: extends: expected a file path or a list of file paths, got a mapping {a: 1}"
    )


# --------------------------------------------------------------------------------------------------
# mistakes: overrides
# --------------------------------------------------------------------------------------------------


def test_override_without_equals():
    write("r.yaml", GOOD)
    assert fail(None, ["train.steps"]) == (
        "command-line override `train.steps`: expected KEY=VALUE, e.g. `train.steps=500` (there is no '=')"
    )


def test_override_empty_key_or_part():
    write("r.yaml", GOOD)
    assert fail(None, ["=3"]).startswith("command-line override `=3`: the key before '=' is empty")
    assert fail(None, ["train..steps=3"]) == (
        "command-line override `train..steps=3`: the key `train..steps` has an empty part "
        "(write names joined by single dots)"
    )


def test_override_into_a_scalar():
    write("r.yaml", GOOD)
    assert fail(None, ["train.steps.max=3"]) == (
        "command-line override `train.steps.max=3`: cannot set `train.steps.max`: `train.steps` is a number (100), "
        "not a mapping or a list"
    )


def test_override_list_index_out_of_range():
    write("r.yaml", GOOD)
    assert fail(None, ["data.datasets.5.repeats=3"]) == (
        "command-line override `data.datasets.5.repeats=3`: index 5 is out of range: `data.datasets` has 2 items "
        "(valid indices: 0 to 1)"
    )


def test_override_list_needs_a_number():
    write("r.yaml", GOOD)
    assert fail(None, ["data.datasets.first.repeats=3"]) == (
        "command-line override `data.datasets.first.repeats=3`: `data.datasets` is a list; pick an item by its "
        "number (e.g. `data.datasets.0`), not 'first'"
    )


def test_override_unknown_key_reported_with_its_origin():
    write("r.yaml", GOOD)
    msg = fail(None, ["train.lerning_rate=0.1"])
    assert one_problem(msg) == (
        "command-line override `train.lerning_rate=0.1`: train.lerning_rate: unknown field 'lerning_rate'; "
        "did you mean 'learning_rate'?"
    )


def test_override_value_with_bad_yaml():
    write("r.yaml", GOOD)
    msg = fail(None, ["validation.prompts=[a, b"])
    assert msg.startswith("command-line override `validation.prompts=[a, b`: YAML syntax error:")


def test_override_of_extends_is_refused():
    write("r.yaml", GOOD)
    assert fail(None, ["extends=x.yaml"]) == (
        "command-line override `extends=x.yaml`: `extends` can only be set inside a recipe file"
    )


# --------------------------------------------------------------------------------------------------
# positive: extends, overrides
# --------------------------------------------------------------------------------------------------


def test_extends_deep_merge_and_list_replacement():
    write("base/common.yaml", GOOD + "validation:\n  prompts: [a dog, a cat]\n  every: 10\n")
    write(
        "recipes/r.yaml",
        """\
        # my run
        extends: ../base/common.yaml
        train:
          steps: 500
        data:
          datasets:
            - kind: hub
              repo: me/other
        validation:
          prompts: [a bird]
        """,
    )
    data, pos = load_recipe_data("recipes/r.yaml")
    assert "extends" not in data
    assert data["train"] == {"learning_rate": 1e-4, "steps": 500}  # merged: learning_rate from base
    assert data["model"] == {"source": "microsoft/lens"}  # only in base
    assert data["data"]["datasets"] == [{"kind": "hub", "repo": "me/other"}]  # list replaced
    assert data["validation"] == {"prompts": ["a bird"], "every": 10}
    assert pos[("train", "learning_rate")] == Origin("base/common.yaml", 4, 18)
    assert pos[("train", "steps")] == Origin("recipes/r.yaml", 4, 10)
    assert pos[("data", "datasets", 0, "repo")] == Origin("recipes/r.yaml", 8, 13)
    assert ("data", "datasets", 1) not in pos  # the base's second item is gone with its list
    assert ("data", "datasets", 0, "path") not in pos
    assert pos[()].file == "recipes/r.yaml"
    recipe = load_recipe("recipes/r.yaml", Recipe)
    assert recipe.train.steps == 500 and recipe.validation.prompts == ["a bird"]


def test_extends_list_later_base_wins():
    write("one.yaml", "seed: 1\ntrain: {steps: 10, warmup_steps: 1}\n")
    write("two.yaml", "seed: 2\ntrain: {steps: 20}\n")
    write("r.yaml", "extends: [one.yaml, two.yaml]\ndata: {datasets: []}\n")
    recipe = load_recipe("r.yaml", Recipe)
    assert (recipe.seed, recipe.train.steps, recipe.train.warmup_steps) == (2, 20, 1)


def test_extends_replace_mapping_with_scalar_and_back():
    write("base.yaml", GOOD)
    write("r.yaml", "extends: base.yaml\nmodel: null\n")
    data, pos = load_recipe_data("r.yaml")
    assert data["model"] is None and ("model", "source") not in pos


def test_overrides_parse_values_as_yaml():
    write("r.yaml", GOOD)
    recipe = load_recipe(
        "r.yaml",
        Recipe,
        [
            "train.learning_rate=3e-5",
            "data.datasets.0.repeats=3",
            'validation.prompts=["a dog", "a cat"]',
            "model.source=null",
            "validation.every=5",  # validation is not in the file: created
            "train.precision=fp16",
        ],
    )
    assert recipe.train.learning_rate == 3e-5
    assert recipe.data.datasets[0].repeats == 3
    assert recipe.validation.prompts == ["a dog", "a cat"]
    assert recipe.model.source is None
    assert recipe.validation.every == 5
    assert recipe.train.precision == "fp16"


def test_override_precedence_and_origin():
    write("base.yaml", GOOD)
    write("r.yaml", "extends: base.yaml\ntrain:\n  steps: 200\n")
    data, pos = load_recipe_data("r.yaml", ["train.steps=7", "train.steps=8"])
    assert data["train"]["steps"] == 8  # the last override wins over the file and the earlier override
    assert str(pos[("train", "steps")]) == "command-line override `train.steps=8`"
    assert pos[("train", "steps")].is_override
    data, pos = load_recipe_data("r.yaml", ['validation={prompts: [x], every: 3}'])
    assert data["validation"] == {"prompts": ["x"], "every": 3}
    assert pos[("validation", "prompts", 0)].is_override


def test_override_replaces_a_list_item():
    write("r.yaml", GOOD)
    recipe = load_recipe("r.yaml", Recipe, ["data.datasets.1={kind: folder, path: more}"])
    assert isinstance(recipe.data.datasets[1], FolderData)
    assert recipe.data.datasets[1].path == Path.cwd() / "more"


# --------------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------------


def test_relative_paths_resolved_against_declaring_file(tmp_path):
    write(
        "base/common.yaml",
        GOOD + "  extra_dirs: [more, /abs/elsewhere]\n",
    )
    write("recipes/r.yaml", "extends: ../base/common.yaml\ndata:\n  captions: caps.txt\n")
    recipe = load_recipe("recipes/r.yaml", Recipe, ["model.output_dir=runs/one"])
    assert recipe.data.datasets[0].path == tmp_path / "base" / "images"  # set in base/
    assert recipe.data.captions == tmp_path / "recipes" / "caps.txt"  # set in recipes/
    assert recipe.data.extra_dirs == [tmp_path / "base" / "more", Path("/abs/elsewhere")]
    assert recipe.model.output_dir == tmp_path / "runs" / "one"  # override: the working directory
    recipe = load_recipe("recipes/r.yaml", Recipe)
    assert recipe.model.output_dir == tmp_path / "recipes" / "out"  # schema default: the recipe's folder


def test_resolve_paths_returns_a_new_model_and_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write("r.yaml", GOOD.replace("path: images", "path: ~/pics"))
    data, pos = load_recipe_data("r.yaml")
    plain = validate(Recipe, data, pos)
    resolved = resolve_paths(plain, pos, base_dir=tmp_path)
    assert resolved is not plain
    assert plain.data.datasets[0].path == Path("~/pics")  # unchanged
    assert resolved.data.datasets[0].path == tmp_path / "home" / "pics"
    assert resolved.data.datasets[1] is plain.data.datasets[1]  # untouched parts are shared


# --------------------------------------------------------------------------------------------------
# explain, dump
# --------------------------------------------------------------------------------------------------


def test_explain_lists_nested_fields():
    text = explain(Recipe)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "train.learning_rate (float, > 0, <= 1, default 0.0001) Learning rate" in lines
    assert "train.steps (int, >= 1, required) Optimizer steps" in lines
    assert "train.precision (one of 'bf16', 'fp16', 'fp32', default 'bf16') Training precision" in lines
    assert "data.datasets (list of FolderData or HubData, required) Training datasets" in lines
    assert "data.datasets[] (FolderData, when kind: 'folder') Images in a folder." in lines
    assert "data.datasets[].repeats (int, >= 1, <= 100, default 1) Times each image is seen per epoch" in lines
    assert "data.datasets[].repo (str, required) Hub dataset id" in lines
    assert "data.captions (path or null, default null) Optional captions file" in lines
    assert "data.extra_dirs (list of path, default []) More image folders" in lines
    assert "model (ModelSection, optional section) Base model" in lines
    assert "model.output_dir (path, default 'out') Where checkpoints go" in lines
    assert "seed (int, default 0)" in lines


def test_dump_yaml_round_trips():
    write(
        "r.yaml",
        GOOD + "validation:\n  prompts: ['yes', '1e-4', '16:9', 'null', 'a: b', \"it's\", \"a\\Nb\"]\n  every: 5\n",
    )  # "\N" is U+0085 (NEL), which PyYAML wrote in a way it read back as a space (found by the fuzz tests)
    recipe = load_recipe("r.yaml", Recipe)
    text = dump_yaml(recipe)
    assert "!!" not in text
    top_keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top_keys == ["model", "train", "data", "validation", "seed"]  # schema order
    write("dumped/lock.yaml", text)
    assert load_recipe("dumped/lock.yaml", Recipe) == recipe
