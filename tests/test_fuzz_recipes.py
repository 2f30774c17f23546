"""Fuzzing recipes through the real CLI: every broken recipe ends in success or in ONE clear error, never in a
traceback, a hang or a run folder.

Each case starts from a shipped recipe (recipes/*.yaml) and makes one mutation: a value of the wrong type, an odd or
out-of-range number, odd unicode, a very long string, a deleted key, an unknown key, deep nesting or a huge list; or
a raw text mutation of the file (truncation, byte flips, tabs, duplicated lines, YAML oddities, alias bombs).
`lens-tune validate` runs in-process on the result; a few surely invalid recipes go through `lens-tune run` too.
Counts and seeds: see tests/fuzz_support.py (LENS_TUNE_SOAK=1 runs many more cases).
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from lens_tune.data.sources import is_unicode_text
from lens_tune.errors import RecipeError
from lens_tune.recipe.load import load_recipe
from lens_tune.recipe.schema import Recipe
from tests.fuzz_support import Cases, assert_one_error, fuzz, run_cli

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
RAW = {path.name: path.read_bytes() for path in RECIPES}
SHIPPED = {name: yaml.safe_load(raw) for name, raw in RAW.items()}
CASE_FILE = "fuzz-case.yaml"

# Messages of the schema's cross-field rules: these point at the field the rule is about, which may not be the
# mutated one (deleting data.trigger breaks a prompt that uses [trigger]).
RULES = (
    "needs a class_prompt",
    "uses [trigger] but data.trigger is not set",
    "must not contain [trigger]",
    "needs dreambooth.instance_prompt",
    "is for subject datasets",
    "a dataset needs one of folder, metadata or hub",
)
# Fields whose value names a file or folder: a wrong one is found when it is read (a DatasetError), not by the schema.
PATH_FIELDS = ("folder", "source", "extends")


# --------------------------------------------------------------------------------------------------
# the workspace and running one case
# --------------------------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path
    recipes: list[str]  # the shipped recipes that validate here: the starting points of the mutations


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """ROOT/recipes/ (the shipped recipes, so `extends` works) and ROOT/examples -> the bundled images.

    Relative paths in a mutated recipe resolve inside ROOT; generated text never holds '/', so a mutated path
    cannot reach anything outside it (and `..` is ROOT, which is small).
    """
    root = tmp_path_factory.mktemp("recipe-fuzz")
    (root / "recipes").mkdir()
    for path in RECIPES:
        shutil.copy(path, root / "recipes" / path.name)
    (root / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    here = os.getcwd()
    os.chdir(root)  # model.source is relative to the working directory
    try:  # a recipe whose data is not in the repo yet cannot be a starting point
        valid = [p.name for p in RECIPES if run_cli(["validate", str(root / "recipes" / p.name)])[0] == 0]
    finally:
        os.chdir(here)
    assert {"quickstart.yaml", "dreambooth.yaml", "dreambooth-8gb.yaml", "style.yaml"} <= set(valid)
    return Workspace(root, valid)


@pytest.fixture
def at_workspace(workspace, monkeypatch) -> Workspace:
    monkeypatch.chdir(workspace.root)  # model.source is relative to the working directory: keep it inside
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return workspace


class Dumper(yaml.SafeDumper):
    """Quotes the strings a YAML 1.2 reader (lens-tune's) takes for numbers, such as 1e3 and 0o17."""


Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"), list("-+.0123456789")
)
Dumper.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(0o[0-7]+|0x[0-9a-fA-F]+)$"), ["0"])
Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(  # PyYAML writes U+0085 as a line break
    "tag:yaml.org,2002:str", value, style='"' if "\x85" in value else None))


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True)


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    path: Path
    error: RecipeError | None  # the RecipeError the CLI printed (with its `issues`), if that is what it printed


def validate_text(workspace: Workspace, text: str | bytes, *overrides: str, seconds: float = 30) -> Outcome:
    """Write the recipe and run `lens-tune validate` on it: status 0, or 2 with one error message."""
    path = workspace.root / "recipes" / CASE_FILE
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    raised: list[RecipeError] = []

    def load_and_keep_the_error(*args, **kwargs):  # only watches: the CLI runs as it does for a user
        try:
            return load_recipe(*args, **kwargs)
        except RecipeError as error:
            raised.append(error)
            raise

    with mock.patch("lens_tune.recipe.load.load_recipe", load_and_keep_the_error):
        code, out, err = run_cli(["validate", str(path), *overrides], seconds=seconds)
    assert_one_error(code, out, err, "validate")
    if code == 0:
        assert f"OK: {path}" in out
    else:
        assert not raised or f"lens-tune validate: error: {raised[0]}\n" in err
    return Outcome(code, out, err, path, raised[0] if raised else None)


def printable(text: str) -> str:
    """Errors show characters a terminal would not (control, format, lone surrogates) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def dotted(path: tuple) -> str:
    text = ""
    for key in path:
        if isinstance(key, int) and not isinstance(key, bool):
            text += f"[{key}]"
        else:
            text += f".{printable(str(key))}" if text else printable(str(key))
    return text or "(top level)"


def related(issue_path: str, mutated: tuple) -> bool:
    """An issue is about the mutation when it is at the mutated path, above it or below it."""
    target = dotted(mutated)
    if issue_path == "(top level)":
        return len(mutated) <= 1
    return any(
        a == b or a.startswith(b + ".") or a.startswith(b + "[") for a, b in ((issue_path, target), (target, issue_path))
    )


def check_issues(error: RecipeError, err: str, path: Path) -> list:
    """Every issue is printed, and each names the file with a line:column (or the command-line override)."""
    issues = getattr(error, "issues", None)
    if issues is None:  # a YAML or file problem: one message that starts with the file (and a position when known)
        assert str(path) in str(error) or "command-line override" in str(error), str(error)
        return []
    assert issues, str(error)
    lines = path.read_bytes().count(b"\n") + 1
    for issue in issues:
        assert str(issue) in err
        if issue.origin.is_override:
            assert issue.origin.file.startswith("command-line override `")
        else:
            assert issue.origin.file == str(path) or issue.origin.file.endswith(".yaml"), issue
            assert 1 <= issue.origin.line <= lines and issue.origin.column >= 1, issue
    return issues


# --------------------------------------------------------------------------------------------------
# navigating recipe data and the schema
# --------------------------------------------------------------------------------------------------


def paths_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    """The path of every value below `node` (mapping values and list items)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append(prefix + (key,))
        found += paths_in(value, prefix + (key,))
    return found


def mappings_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if isinstance(node, dict) else []
    for path in paths_in(node, prefix):
        if isinstance(get_at(node, path[len(prefix):]), dict):
            found.append(path)
    return found


def get_at(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def set_at(data: Any, path: tuple, value: Any) -> None:
    get_at(data, path[:-1])[path[-1]] = value


def delete_at(data: Any, path: tuple) -> None:
    del get_at(data, path[:-1])[path[-1]]


def _unwrap(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def fields_at(path: tuple) -> set[str]:
    """The field names of the schema model that validates the mapping at `path` (an `extends` recipe: the top)."""
    annotation: Any = Recipe
    for key in path:
        annotation = _unwrap(annotation)
        annotation = typing.get_args(annotation)[0] if isinstance(key, int) else annotation.model_fields[key].annotation
    return set(_unwrap(annotation).model_fields)


def names_a_path(path: tuple, value: Any = None) -> bool:
    """Whether the mutated field, or a mapping put there, holds a file or folder path."""
    if any(key in PATH_FIELDS for key in path if isinstance(key, str)):
        return True
    if isinstance(value, dict):
        return any(key in PATH_FIELDS or names_a_path((), v) for key, v in value.items())
    return isinstance(value, list) and any(names_a_path((), v) for v in value)


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------

ODD_STRINGS = [
    "", " ", "\u202eevil\u202c", "a\u200bb", "\u200d", "\ufeffbom", "🤖🚀🎨", "👩🏽‍🔬", "e\u0301\u0301\u0301",
    "ﷺ", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "日本語", "\x00", "nul\x00inside", "\x07bell", "\x1b[31mred",
    "\ud800", "lone \udcff surrogate", "\ufffe", "line\u2028sep", "tab\tinside", "new\nline", "\r\n", "yes", "no",
    "on", "null", "~", "1e3", "0x1F", ".inf", ".nan", "- item", "[", "{a: 1}", "*ref", "&anchor", "!!python/object",
    "%YAML", "'", '"', "#comment", "key: value", "<<", "=", "?", "|", ">", "..", ".", "-", "0", "-0", "1_000",
    "tiny ", " tiny", "TINY", "adamw\u200b", "ｓｋｓ",
]
STRINGS = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=30),
    st.builds(lambda s, n: s * n, st.sampled_from(["x", "🤖", "\u202e", "ab "]), st.integers(300, 20_000)),
).filter(lambda s: "/" not in s and not s.startswith("~"))  # stay inside the workspace (see `workspace`)
NUMBERS = st.one_of(
    st.sampled_from([
        -1, 0, 1, 2, 15, 16, 17, 0.5, -0.0, 1e-320, 1e308, -1e308, math.nan, math.inf, -math.inf,
        2**31, 2**63 - 1, 2**63, -(2**63), 2**64, -(2**64) - 1, 10**100, -(10**100),
    ]),
    st.integers(),
    st.floats(),
)
SCALARS = st.one_of(NUMBERS, STRINGS, st.booleans(), st.none())
WRONG_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(STRINGS, SCALARS, max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["kind", "folder", "x"]), SCALARS, max_size=2), max_size=2),
)


def typos(word: str) -> list[str]:
    """Words one edit away: a letter dropped, doubled or swapped with the next."""
    out = {word[:i] + word[i + 1:] for i in range(len(word))}
    out |= {word[:i] + word[i] + word[i:] for i in range(len(word))}
    out |= {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)}
    return sorted(w for w in out if w and w != word)


# --------------------------------------------------------------------------------------------------
# 1. values: wrong types, odd numbers, odd unicode, long strings
# --------------------------------------------------------------------------------------------------


@dataclass
class Mutation:
    recipe: str
    data: Any
    kind: str
    path: tuple
    value: Any = None


@st.composite
def value_mutations(draw, names: list[str]) -> Mutation:
    name = draw(st.sampled_from(names))
    data = copy.deepcopy(SHIPPED[name])
    path = draw(st.sampled_from(paths_in(data)))
    value = draw(WRONG_VALUES)
    set_at(data, path, value)
    return Mutation(name, data, "replace", path, value)


def check_mutation(workspace: Workspace, mutation: Mutation, cases: Cases) -> None:
    """Validate the mutated recipe; an error must be about the mutated field (or a rule that involves it)."""
    result = validate_text(workspace, dump(mutation.data))
    if result.code == 0:
        cases.count("valid")
        return
    if result.error is None:  # the recipe is valid; its data or model is not (a DatasetError, ...)
        cases.count("data error")
        assert names_a_path(mutation.path, mutation.value) or mutation.kind == "delete", (mutation.path, result.err)
        return
    cases.count("recipe error")
    issues = check_issues(result.error, result.err, result.path)
    if not issues:
        return
    about_it = [i for i in issues if related(i.path, mutation.path)]
    rules = [i for i in issues if any(rule in i.message for rule in RULES)]
    assert about_it or rules, f"mutated {dotted(mutation.path)}; the error is about {[i.path for i in issues]}"


def test_values_of_the_wrong_type_odd_numbers_and_odd_unicode(at_workspace):
    cases = Cases("test_fuzz_recipes::values")

    @fuzz()
    @given(value_mutations(at_workspace.recipes))
    def case(mutation):
        check_mutation(at_workspace, mutation, cases)

    case()
    cases.record()
    assert cases.outcomes["recipe error"] > 0 and cases.outcomes["valid"] > 0


# --------------------------------------------------------------------------------------------------
# 2. keys: deleted, unknown, misspelt, odd names
# --------------------------------------------------------------------------------------------------


@st.composite
def key_mutations(draw, names: list[str]) -> Mutation:
    name = draw(st.sampled_from(names))
    data = copy.deepcopy(SHIPPED[name])
    if draw(st.booleans()):
        path = draw(st.sampled_from(paths_in(data)))
        delete_at(data, path)
        return Mutation(name, data, "delete", path)
    parent = draw(st.sampled_from(mappings_in(data)))
    known = fields_at(parent) | {"extends"}
    key = draw(st.one_of(
        st.sampled_from(sorted(known)).flatmap(lambda field: st.sampled_from(typos(field))),
        STRINGS,
        st.sampled_from([1, 0, -1, 2.5, True, None]),
    ))
    assume(key not in known and key not in get_at(data, parent))
    value = draw(SCALARS)
    get_at(data, parent)[key] = value
    return Mutation(name, data, "add", parent + (key,), value)


def test_deleted_unknown_and_misspelt_keys(at_workspace):
    cases = Cases("test_fuzz_recipes::keys")

    @fuzz()
    @given(key_mutations(at_workspace.recipes))
    def case(mutation):
        if mutation.kind == "delete":
            check_mutation(at_workspace, mutation, cases)
            return
        # an unknown key is always an error, at the key, with a "did you mean" for a near miss
        result = validate_text(at_workspace, dump(mutation.data))
        cases.count("unknown key")
        assert result.code == 2 and result.error is not None, result.err
        issues = check_issues(result.error, result.err, result.path)
        key = mutation.path[-1]
        if any(isinstance(text, str) and not is_unicode_text(text) for text in (key, mutation.value)):
            # refused while reading, at its line and column (before the schema sees the key)
            assert "is not valid Unicode text" in result.err, result.err
            return
        if not isinstance(key, str):
            assert any("Keys should be strings" in issue.message for issue in issues), result.err
            return
        (issue,) = [i for i in issues if i.path == dotted(mutation.path)]
        assert issue.message.startswith(f"unknown field '{printable(key)}'"), issue
        near = [f for f in fields_at(mutation.path[:-1]) if len(f) >= 5 and key in typos(f)]
        if near:
            assert "did you mean" in issue.message, issue

    case()
    cases.record()


# --------------------------------------------------------------------------------------------------
# 3. sizes: deep nesting and huge lists
# --------------------------------------------------------------------------------------------------

PLACEHOLDER = "__fuzz_value__"


@st.composite
def size_mutations(draw, names: list[str]) -> tuple[Mutation, str]:
    """A value replaced by lists or mappings nested `depth` deep, or by a list of `length` items (YAML flow text)."""
    name = draw(st.sampled_from(names))
    data = copy.deepcopy(SHIPPED[name])
    path = draw(st.sampled_from(paths_in(data)))
    set_at(data, path, PLACEHOLDER)
    if draw(st.booleans()):
        depth = draw(st.sampled_from([2, 20, 32, 33, 100, 300, 1000]))
        opening, closing = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("[{x: ", "}]")]))
        value, what = opening * depth + "1" + closing * depth, f"nested {depth}"
    else:
        length = draw(st.sampled_from([1_000, 5_000, 21_000]))
        item = draw(st.sampled_from(["1", "a photo", "null", "[1]", "1024", "0.5", "{a: 1}"]))
        value, what = "[" + ", ".join([item] * length) + "]", f"list of {length}"
    return Mutation(name, data, what, path), dump(data).replace(PLACEHOLDER, value, 1)


def test_deep_nesting_and_huge_lists(at_workspace):
    cases = Cases("test_fuzz_recipes::sizes")

    @fuzz(12)
    @given(size_mutations(at_workspace.recipes))
    def case(mutation_and_text):
        mutation, text = mutation_and_text
        result = validate_text(at_workspace, text, seconds=90)  # PyYAML needs seconds for 20,000 items
        cases.count("valid" if result.code == 0 else "error")
        if result.code == 2:
            assert str(result.path) in result.err or names_a_path(mutation.path), result.err[:2000]
            assert len(result.err) < 50_000, "the error message should not grow with the recipe"

    case()
    cases.record()


# --------------------------------------------------------------------------------------------------
# 4. raw text: truncation, byte flips, tabs, duplicated and moved lines, YAML oddities
# --------------------------------------------------------------------------------------------------

SNIPPETS = [
    "\t", "\tsteps: 5", "steps: 5", "steps: 5\nsteps: 6", "---", "--- \nmodel: {source: tiny}", "...", "%YAML 1.1",
    "%TAG ! tag:example.com,2000:", "&a", "*a", "x: *undefined", "x: &a [*a]", "<<: *a", "<<: 1", "<<: [1, 2]",
    "? [1, 2]\n: x", "? {a: 1}", "!!binary aGVsbG8=", "!!python/object/apply:os.system ['true']", "x: !!float nan",
    "x: !custom 1", "'unclosed", '"unclosed', "[unclosed", "{unclosed", "key: value: other", "- item", "key:\tvalue",
    "x: |\n  block", "x: >-", "#", "# \u202e comment", "\ufeffx: 1", "x: \u2028", "x: \"\\x00\\ud800\\U0010FFFF\"",
    "x: '\x85'", "x: 0o778", "x: 0x", "x: 1_0", "x: 1e400", "x: -.inf", "x: .NaN", "x: 99999999999999999999999",
    "extends: ''", "extends: [1]", "extends: fuzz-case.yaml", "extends: quickstart.yaml", "extends: ..",
]


@st.composite
def text_mutations(draw, names: list[str]) -> bytes:
    data = bytearray(RAW[draw(st.sampled_from(names))])
    lines = data.split(b"\n")
    op = draw(st.sampled_from(["truncate", "flip", "insert bytes", "snippet", "tab", "duplicate", "delete",
                               "swap", "indent"]))
    at = draw(st.integers(0, len(data)))
    line = draw(st.integers(0, len(lines) - 1))
    if op == "truncate":
        return bytes(data[:at])
    if op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    if op == "insert bytes":
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:])
    if op == "snippet":
        indent = b" " * draw(st.sampled_from([0, 1, 2, 4, 6]))
        lines.insert(line, indent + draw(st.sampled_from(SNIPPETS)).encode("utf-8"))
    elif op == "tab":
        lines[line] = b"\t" + lines[line].lstrip(b" ")
    elif op == "duplicate":
        lines.insert(line, lines[line])
    elif op == "delete":
        del lines[line]
    elif op == "swap":
        other = draw(st.integers(0, len(lines) - 1))
        lines[line], lines[other] = lines[other], lines[line]
    elif op == "indent":
        shift = draw(st.sampled_from([-4, -2, -1, 1, 2, 3]))
        lines[line] = b" " * max(0, shift) + lines[line][max(0, -shift):]
    return b"\n".join(lines)


def test_raw_text_mutations(at_workspace):
    cases = Cases("test_fuzz_recipes::text")

    @fuzz()
    @given(text_mutations(at_workspace.recipes))
    def case(text):
        result = validate_text(at_workspace, text)
        cases.count("valid" if result.code == 0 else "error")
        if result.error is None:
            return  # valid, or a flipped byte in a folder name: that data error names the folder
        check_issues(result.error, result.err, result.path)
        if "YAML syntax error" in result.err:
            assert re.search(re.escape(str(result.path)) + r":\d+:\d+: YAML syntax error: ", result.err), result.err

    case()
    cases.record()


# --------------------------------------------------------------------------------------------------
# 5. alias bombs: billion laughs, merge-key bombs, self-reference
# --------------------------------------------------------------------------------------------------


def laughs(depth: int, width: int, kind: str) -> str:
    """Aliases repeated inside each other: the expanded recipe has width**depth values."""
    lines = []
    if kind == "list":
        lines.append(f"lol0: &a0 [{', '.join(['lol'] * width)}]")
        for level in range(1, depth + 1):
            lines.append(f"lol{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    elif kind == "mapping":
        lines.append("lol0: &a0 {" + ", ".join(f"k{i}: lol" for i in range(width)) + "}")
        for level in range(1, depth + 1):
            lines.append(f"lol{level}: &a{level} {{" + ", ".join(f"k{i}: *a{level - 1}" for i in range(width)) + "}")
    else:  # merge keys: every level merges the level below `width` times
        lines.append("lol0: &a0 {" + ", ".join(f"k{i}: lol" for i in range(width)) + "}")
        for level in range(1, depth + 1):
            lines.append(f"lol{level}: &a{level} {{<<: [{', '.join([f'*a{level - 1}'] * width)}], own{level}: 1}}")
    return "\n".join(lines) + "\n"


def test_alias_bombs_end_quickly_in_a_clear_error(at_workspace):
    cases = Cases("test_fuzz_recipes::alias bombs")

    @fuzz(15)
    @given(st.integers(1, 12), st.integers(2, 12), st.sampled_from(["list", "mapping", "merge"]),
           st.sampled_from(["top", "prompts"]))
    def case(depth, width, kind, where):
        bomb = laughs(depth, width, kind)
        text = RAW["quickstart.yaml"].decode()
        if where == "prompts":  # the expansion lands in a real field
            text = text.replace('  prompts: ["a photo of [trigger] toy robot on a beach", "a photo of a toy robot"]',
                                f"  prompts: *a{depth}")
            bomb = "x-bombs:\n" + "".join(f"  {line}\n" for line in bomb.splitlines())
            text = bomb + text
        else:
            text += bomb
        result = validate_text(at_workspace, text)
        cases.count("error" if result.code else "valid")
        assert result.error is not None and str(result.path) in result.err, result.err[-2000:]
        assert len(result.err) < 20_000

    case()
    cases.record()


# --------------------------------------------------------------------------------------------------
# 6. command-line overrides
# --------------------------------------------------------------------------------------------------

OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["", "null", "[", "]", "{", "&a [*a]", "*a", "!!binary x", "5\x00", "\udcff", "- 1", "a: b: c",
                     "[1, 2", "1e999", "-.inf", "0x", "'", "\t1", "---", "[" * 2000 + "]" * 2000]),
    st.text(max_size=20).filter(lambda s: "/" not in s and not s.startswith("~")),
    SCALARS.map(lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n").strip()),
)


@st.composite
def overrides(draw) -> str:
    """`key.path=value`: a real path with its own value (valid), or a mangled path, or an odd value."""
    data = SHIPPED["quickstart.yaml"]
    path = draw(st.sampled_from(paths_in(data) + [("train", "steps"), ("nope",), ("train", "nope", "x")]))
    key = ".".join(str(k) for k in path)
    if draw(st.booleans()) and path in paths_in(data):  # the value it has (as flow YAML): the override is valid
        own = yaml.dump(get_at(data, path), Dumper=Dumper, default_flow_style=True, allow_unicode=True, width=10**6)
        return f"{key}={own.removesuffix(chr(10) + '...' + chr(10)).strip()}"
    key = draw(st.sampled_from([key, key + ".x", key + ".0", "." + key, key + "..y", key.upper(), "", "extends"]))
    return f"{key}={draw(OVERRIDE_VALUES)}" if draw(st.integers(0, 9)) else key


def test_command_line_overrides(at_workspace):
    cases = Cases("test_fuzz_recipes::overrides")

    @fuzz()
    @given(st.lists(overrides(), min_size=1, max_size=2))
    def case(texts):
        texts = [t for t in texts if not t.startswith("-")]  # an option, not an override
        result = validate_text(at_workspace, RAW["quickstart.yaml"], *texts)
        cases.count("valid" if result.code == 0 else "error")
        if result.error is not None:
            check_issues(result.error, result.err, result.path)

    case()
    cases.record()


# --------------------------------------------------------------------------------------------------
# 7. `lens-tune run` on invalid recipes: status 2 at once, and no run folder
# --------------------------------------------------------------------------------------------------

SURELY_INVALID = [
    ("train", "learning_rate", -1), ("lora", "rank", 0), ("train", "optimizer", "sgd"), ("checkpoint", "every", 0),
    ("train", "steps", "many"), ("data", "datasets", []), ("model", "source", None), ("train", "seed", 2**64),
    ("validation", "seeds", [2**64]), ("validation", "width", 2**20), ("train", "logit_std", math.nan),
]


@st.composite
def invalid_recipes(draw) -> Mutation:
    name = draw(st.sampled_from(["quickstart.yaml", "style.yaml"]))
    data = copy.deepcopy(SHIPPED[name])
    if draw(st.booleans()):
        parent = draw(st.sampled_from(mappings_in(data)))
        key = draw(STRINGS.filter(lambda k: k not in fields_at(parent) and k not in ("extends", "")))
        get_at(data, parent)[key] = draw(SCALARS)
        return Mutation(name, data, "add", parent + (key,))
    *section, field, value = draw(st.sampled_from(SURELY_INVALID))
    data.setdefault(section[0], {})[field] = value
    return Mutation(name, data, "replace", (*section, field))


def test_run_stops_at_once_and_leaves_no_run_folder(at_workspace):
    cases = Cases("test_fuzz_recipes::run")
    runs = at_workspace.root / "runs-out"

    @fuzz(25)
    @given(invalid_recipes())
    def case(mutation):
        path = at_workspace.root / "recipes" / CASE_FILE
        path.write_text(dump(mutation.data), encoding="utf-8")
        code, out, err = run_cli(["run", str(path), f"output.dir={runs}"], seconds=20)
        cases.count("error")
        assert_one_error(code, out, err, "run")
        assert code == 2 and str(path) in err, err
        assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))

    case()
    cases.record()


def test_run_with_bad_data_or_no_model_leaves_no_run_folder(at_workspace):
    """Recipes that validate but cannot run: missing weights, a missing folder, only unusable images."""
    runs = at_workspace.root / "runs-out-data"
    junk = at_workspace.root / "junk-images"
    junk.mkdir(exist_ok=True)
    (junk / "noise.png").write_bytes(bytes(range(256)) * 4)
    (junk / "empty.jpg").write_bytes(b"")
    quickstart = RAW["quickstart.yaml"].decode()
    broken = {
        "no model": RAW["dreambooth.yaml"].decode(),
        "missing folder": re.sub(r"folder: \S+", "folder: ../no-such-folder", quickstart, count=1),
        "unusable images": re.sub(r"folder: \S+", "folder: ../junk-images", quickstart, count=1),
    }
    for what, text in broken.items():
        path = at_workspace.root / "recipes" / CASE_FILE
        path.write_text(text, encoding="utf-8")
        code, out, err = run_cli(["run", str(path), f"output.dir={runs}"], seconds=120)
        assert_one_error(code, out, err, "run")
        assert code == 2, (what, err)
        assert not runs.exists() or not any(runs.iterdir()), (what, list(runs.rglob("*")))
