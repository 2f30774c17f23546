"""Turn a recipe YAML file (plus command-line overrides) into a validated pydantic model.

The machinery here is generic over any pydantic ``BaseModel`` class; the recipe schema itself lives
elsewhere. Every mistake a user can make ends as one :class:`~lens_tune.errors.RecipeError` whose
message is complete on its own (the CLI prints ``str(error)``, never a traceback): each problem is
reported as ``file:line:column: dotted.path: what is wrong (got VALUE)``.

Steps (``load_recipe`` runs all of them):

1. :func:`load_recipe_data` reads the YAML with the position of every key and value, follows
   ``extends:`` (deep merge, the extending file wins) and applies ``key.path=value`` overrides.
2. :func:`validate` runs pydantic and rewrites all of its errors into one readable ``RecipeError``.
3. :func:`resolve_paths` makes relative ``Path`` values absolute, relative to the file that set them.

YAML is read with the YAML 1.2 core schema rather than PyYAML's YAML 1.1 default: ``1e-4`` is a
float (in YAML 1.1 it is a string), ``yes``/``no``/``on``/``off`` stay strings (pydantic still
accepts them for ``bool`` fields), ``16:9`` is a string (not the base-60 integer 969) and dates stay
strings. Duplicate keys are an error.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lens_tune.errors import RecipeError

__all__ = [
    "Issue",
    "Origin",
    "Positions",
    "dump_yaml",
    "explain",
    "load_recipe",
    "load_recipe_data",
    "resolve_paths",
    "validate",
]

M = TypeVar("M", bound=BaseModel)
KeyPath = tuple  # a path of mapping keys (str) and list indices (int)

EXPLAIN_HINT = "run `lens-tune validate --explain {recipe}` to see every field"


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------


class Origin(NamedTuple):
    """Where something was written: a file position (1-based), or a command-line override.

    For an override, ``file`` is the text "command-line override `key=value`" and line/column are None.
    """

    file: str
    line: int | None = None
    column: int | None = None

    @property
    def is_override(self) -> bool:
        return self.line is None

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


def _printable(text: str) -> str:
    """`text` with characters a terminal would not show (control, format, lone surrogates) as escapes (\\x00)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _override_origin(text: str) -> Origin:
    return Origin(f"command-line override `{_printable(text)}`")


class Positions(Mapping):
    """Where every value of a recipe was last set: key path tuple -> :class:`Origin`.

    ``positions[("data", "datasets", 0, "repeats")]`` is the position of that value (the start of the
    scalar, or of the mapping/list). ``positions[()]`` is the top-level mapping.
    :meth:`key_origin` gives the position of the *key* instead (where ``repeats:`` is written), which
    is what errors about a whole key or section point at. ``source`` is the recipe file the user named.
    """

    def __init__(self, source: str | None = None):
        self.source = source
        self._values: dict[KeyPath, Origin] = {}
        self._keys: dict[KeyPath, Origin] = {}

    # Mapping interface ------------------------------------------------------------------------------
    def __getitem__(self, path: KeyPath) -> Origin:
        return self._values[tuple(path)]

    def __iter__(self) -> Iterator[KeyPath]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {str(v)!r}" for k, v in self._values.items())
        return f"Positions({{{body}}})"

    # lookups ---------------------------------------------------------------------------------------
    def key_origin(self, path: KeyPath) -> Origin | None:
        """Where the key of ``path`` was written (list items and the top level: where the value starts)."""
        path = tuple(path)
        return self._keys.get(path) or self._values.get(path)

    def nearest(self, path: KeyPath) -> Origin:
        """The position of ``path``, or of its closest ancestor that has one."""
        path = tuple(path)
        for n in range(len(path), -1, -1):
            origin = self._values.get(path[:n])
            if origin is not None:
                return origin
        return Origin(self.source or "<recipe>")

    # building --------------------------------------------------------------------------------------
    def set(self, path: KeyPath, value: Origin, key: Origin | None = None) -> None:
        path = tuple(path)
        self._values[path] = value
        if key is not None:
            self._keys[path] = key
        else:
            self._keys.pop(path, None)

    def drop(self, path: KeyPath) -> None:
        """Forget ``path`` and everything below it."""
        path = tuple(path)
        n = len(path)
        for table in (self._values, self._keys):
            for p in [p for p in table if p[:n] == path]:
                del table[p]

    def graft(self, other: Positions, path: KeyPath) -> None:
        """Copy ``path`` and everything below it from ``other``."""
        path = tuple(path)
        n = len(path)
        for mine, theirs in ((self._values, other._values), (self._keys, other._keys)):
            for p, origin in theirs.items():
                if p[:n] == path:
                    mine[p] = origin


# --------------------------------------------------------------------------------------------------
# YAML reading (YAML 1.2 core schema, positions, duplicate keys)
# --------------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_CORE_RESOLVERS = [
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT_RE, list("-+.0123456789")),
    ("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"]),
]


# A recipe is a few hundred values. These limits turn a file that is nested without end, or whose aliases
# (`*name`) repeat each other into billions of values ("billion laughs"), into an error instead of a hang.
MAX_DEPTH = 32  # nested lists and mappings
MAX_VALUES = 20_000  # values after expanding aliases (a recipe has hundreds)
MAX_TEXT = 10_000_000  # characters of text after expanding aliases
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the module docstring)."""

    yaml_implicit_resolvers: dict = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Resolve `<<` merge keys as PyYAML does (the mapping's own keys win, then the earlier merged mapping),
        keeping each merged key once: PyYAML keeps every repeat, so mappings that merge each other several times
        grow exponentially."""
        merged: list[list[yaml.Node]] = []
        own = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                if key_node.tag == "tag:yaml.org,2002:value":
                    key_node.tag = "tag:yaml.org,2002:str"
                own.append((key_node, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or a list of mappings for merging (`<<`), but found {source.id}",
                        source.start_mark,
                    )
            merged.append(sources)
        if not merged:
            return
        node.value = own  # merge keys are gone before recursing: a mapping may merge itself
        entries = []
        for sources in merged:  # later `<<` keys win; within one list, earlier mappings win
            for source in reversed(sources):
                self.flatten_mapping(source)
                entries.extend(source.value)

        def identity(key_node: yaml.Node) -> Any:
            return (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else id(key_node)

        own_keys = {identity(key_node) for key_node, _ in own}  # these win anyway (and a self-merge adds nothing)
        last = {identity(key_node): index for index, (key_node, _) in enumerate(entries)}
        keep = sorted(index for key, index in last.items() if key not in own_keys)
        node.value = [entries[i] for i in keep] + own


for _tag, _regexp, _first in _CORE_RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _regexp, _first)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).strip()
    try:
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits[:2] in ("0o", "0O"):
            return sign * int(digits[2:], 8)
        if digits[:2] in ("0x", "0X"):
            return sign * int(digits[2:], 16)
        return sign * int(digits, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {text!r} as an integer", node.start_mark
        ) from None


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).strip()
    low = text.lower()
    if low in (".inf", "+.inf"):
        return float("inf")
    if low == "-.inf":
        return float("-inf")
    if low == ".nan":
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {text!r} as a number", node.start_mark
        ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings a YAML 1.2 reader would take for numbers (``'1e-4'``).

    It keeps PyYAML's YAML 1.1 resolvers too, so ``'yes'``, ``'on'`` and ``'16:9'`` stay quoted and
    the output reads the same in either YAML version.
    """


for _tag, _regexp, _first in _CORE_RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _regexp, _first)


def _represent_str(dumper: _Dumper, value: str) -> yaml.ScalarNode:
    # PyYAML writes U+0085 (NEL) unescaped, and reads it back as a line break: double quotes escape it
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\x85" in value else None)


_Dumper.add_representer(str, _represent_str)



def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parser error in plain words (without the position, which the caller adds)."""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if "'\\t'" in problem:
        text = "a tab character here; YAML indentation must use spaces, not tabs"
        context = None
    elif problem.startswith("mapping values are not allowed"):
        text = (
            "unexpected ':' here; check the indentation of this line and of the line above, "
            "or put a value that contains ': ' in quotes"
        )
    elif problem.startswith("expected <block end>"):
        text = "bad indentation: this line does not line up with the lines above it"
    elif problem.startswith("could not find expected ':'"):
        text = "expected 'key: value' (could not find the ':')"
    elif problem.startswith("but found another document"):
        text = "the file holds more than one YAML document ('---'); a recipe is a single document"
        context = None
    elif problem.startswith("could not determine a constructor for the tag"):
        text = problem.replace("could not determine a constructor for the tag", "unsupported YAML tag")
        text += " (a recipe holds plain values only)"
    elif problem == "found unexpected end of stream" and context and "quoted scalar" in context:
        text = "a quoted value is never closed"
    else:
        text = problem
    if context:
        where = ""
        if context_mark is not None:
            where = f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
        context = context.replace("while ", "", 1)
        text += f" (while {context}{where})"
    return text


def _mark_origin(file: str, mark: Any) -> Origin:
    return Origin(file, mark.line + 1, mark.column + 1)


class _Builder:
    """Builds plain Python data from a composed YAML node, recording positions."""

    def __init__(self, loader: _Loader, positions: Positions, origin_of):
        self.loader = loader
        self.positions = positions
        self.origin_of = origin_of  # mark -> Origin
        self._stack: set[int] = set()
        self._values = 0
        self._text = 0

    def build(self, node: yaml.Node, path: KeyPath, key_origin: Origin | None = None) -> Any:
        self.positions.set(path, self.origin_of(node.start_mark), key_origin)
        self._values += 1
        if self._values > MAX_VALUES or self._text > MAX_TEXT:
            what = f"{MAX_VALUES:,} values" if self._values > MAX_VALUES else f"{MAX_TEXT:,} characters of text"
            raise RecipeError(
                f"{self.origin_of(node.start_mark)}: the recipe is too large: it holds more than {what} "
                "(YAML aliases `*name` that repeat each other?)"
            )
        if len(path) > MAX_DEPTH:
            raise RecipeError(
                f"{self.origin_of(node.start_mark)}: lists and mappings are nested too deeply here "
                f"(more than {MAX_DEPTH} levels)"
            )
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if node.tag not in ("tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"):
            raise RecipeError(
                f"{self.origin_of(node.start_mark)}: YAML syntax error: unsupported YAML tag {node.tag!r} "
                "(a recipe holds plain values only)"
            )
        if id(node) in self._stack:
            raise RecipeError(f"{self.origin_of(node.start_mark)}: a YAML alias refers to itself")
        self._stack.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            raise RecipeError(f"{self.origin_of(node.start_mark)}: unsupported YAML node")  # pragma: no cover
        finally:
            self._stack.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str):
            self._text += len(value)
            try:  # escaped surrogate pairs ("\\ud83e\\udd16") become the character; a lone one is not text
                value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
            except UnicodeDecodeError:
                raise RecipeError(
                    f"{self.origin_of(node.start_mark)}: {_show(value)} is not valid Unicode text "
                    "(it holds a lone surrogate escape such as \\ud800); remove it"
                ) from None
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict:
        explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        result: dict = {}
        written: dict[Any, Any] = {}  # key -> mark of its explicit occurrence
        for key_node, value_node in node.value:
            key_origin = self.origin_of(key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"{key_origin}: a mapping key must be a plain name, not a list or mapping")
            key = self._scalar(key_node)
            is_explicit = id(key_node) in explicit
            if is_explicit and key in written:
                first = written[key]
                raise RecipeError(
                    f"{key_origin}: duplicate key {_render(key)} (first set at line {first.line + 1}, "
                    f"column {first.column + 1}); a key may appear only once in a mapping"
                )
            if is_explicit:
                written[key] = key_node.start_mark
            if key in result:
                self.positions.drop(path + (key,))
            result[key] = self.build(value_node, path + (key,), key_origin)
        return result


def _parse_yaml(text: str, file: str, origin_of) -> tuple[Any, Positions, bool]:
    """Parse one YAML document. Returns (data, positions, empty)."""
    positions = Positions()
    loader = None
    try:
        loader = _Loader(text)  # this already checks that every character may appear in YAML
        node = loader.get_single_node()
        if node is None:
            return None, positions, True
        data = _Builder(loader, positions, origin_of).build(node, ())
        return data, positions, False
    except yaml.reader.ReaderError as err:  # a control character, or a lone surrogate from a command-line argument
        code = ord(err.character) if isinstance(err.character, str) else err.character
        mark = _index_mark(text, err.position)
        if 0xD800 <= code <= 0xDFFF:
            problem = f"U+{code:04X} is not valid Unicode text (a lone surrogate); remove it"
        else:
            kind = "control character" if code < 0x20 or 0x7F <= code < 0xA0 else "character"
            problem = (
                f"{kind} U+{code:04X} is not allowed in YAML; remove it, or write it as an escape "
                "(such as \\x07) inside double quotes"
            )
        raise RecipeError(f"{origin_of(mark)}: YAML syntax error: {problem}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = str(origin_of(mark)) if mark is not None else file
        raise RecipeError(f"{where}: YAML syntax error: {_yaml_problem(err)}") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        where = origin_of(loader.get_mark()) if loader is not None else file
        raise RecipeError(f"{where}: YAML syntax error: lists and mappings are nested too deeply") from None
    except yaml.YAMLError as err:  # pragma: no cover - PyYAML raises marked errors for bad input
        raise RecipeError(f"{file}: YAML error: {err}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _index_mark(text: str, index: int) -> yaml.Mark:
    """The mark (0-based line and column) of character `index` of `text`."""
    line = text.count("\n", 0, index)
    column = index - (text.rfind("\n", 0, index) + 1)
    return yaml.Mark("<recipe>", index, line, column, None, None)


def _read_file(path: Path, display: str) -> tuple[dict, Positions]:
    """Read one recipe file (no `extends` handling) into (mapping, positions)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {display}") from None
    except IsADirectoryError:
        raise RecipeError(f"{display}: is a folder, not a recipe file") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{display}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{display}: cannot read the recipe file ({err.strerror or err})") from None
    data, positions, empty = _parse_yaml(text, display, lambda mark: _mark_origin(display, mark))
    if empty:
        raise RecipeError(f"{display}: the recipe file is empty (expected a mapping of `key: value` lines)")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{positions[()]}: the top level of a recipe must be a mapping of `key: value` lines, "
            f"not {_kind(data)} ({_show(data)})"
        )
    return data, positions


# --------------------------------------------------------------------------------------------------
# extends + deep merge
# --------------------------------------------------------------------------------------------------


def _deep_merge(base: dict, base_pos: Positions, top: dict, top_pos: Positions, prefix: KeyPath = ()) -> dict:
    """Merge ``top`` into ``base`` (in place): mappings merge recursively, ``top`` wins; lists and
    scalars are replaced. ``base_pos`` is updated to match."""
    for key, value in top.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base_pos.set(path, top_pos[path], top_pos.key_origin(path))
            _deep_merge(base[key], base_pos, value, top_pos, path)
        else:
            base[key] = value
            base_pos.drop(path)
            base_pos.graft(top_pos, path)
    return base


def _chain_text(chain: Sequence[str]) -> str:
    return " -> ".join(chain)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:  # pragma: no cover - e.g. a symlink loop
        return path.absolute()


def _load_tree(path: Path, display: str, chain: tuple[tuple[Path, str], ...]) -> tuple[dict, Positions]:
    """Read ``path`` and everything it ``extends``, merged. ``chain`` holds the files that led here."""
    here = chain + ((_resolved(path), display),)
    data, positions = _read_file(path, display)
    if "extends" not in data:
        return data, positions

    ext = data.pop("extends")
    ext_origin = positions[("extends",)]
    if ext is None:
        targets: list[tuple[str, Origin]] = []
    elif isinstance(ext, str):
        targets = [(ext, ext_origin)]
    elif isinstance(ext, list) and all(isinstance(x, str) for x in ext):
        targets = [(x, positions[("extends", i)]) for i, x in enumerate(ext)]
    else:
        raise RecipeError(
            f"{ext_origin}: extends: expected a file path or a list of file paths, got {_got(ext)}"
        )
    positions.drop(("extends",))

    merged: dict = {}
    merged_pos = Positions()
    for target, origin in targets:
        if not target.strip():
            raise RecipeError(f"{origin}: extends: empty file path")
        target_path = Path(os.path.expanduser(target))
        if not target_path.is_absolute():
            target_path = path.parent / target_path
        target_display = os.path.normpath(str(target_path))
        target_resolved = _resolved(target_path)
        names = [d for _, d in here]
        if any(r == target_resolved for r, _ in here):
            raise RecipeError(
                f"{origin}: extends: cycle: {_chain_text(names + [target_display])} "
                "(a recipe cannot extend itself, directly or through other recipes)"
            )
        via = f" (extends chain: {_chain_text(names)})" if len(names) > 1 else ""
        if not target_path.exists():
            raise RecipeError(
                f"{origin}: extends: file not found: {target_display} "
                f"(paths in `extends` are relative to the file that names them){via}"
            )
        if target_path.is_dir():
            raise RecipeError(f"{origin}: extends: {target_display} is a folder, not a recipe file{via}")
        base, base_pos = _load_tree(target_path, target_display, here)
        _deep_merge(merged, merged_pos, base, base_pos)
    _deep_merge(merged, merged_pos, data, positions)
    merged_pos.set((), positions[()])
    return merged, merged_pos


# --------------------------------------------------------------------------------------------------
# command-line overrides
# --------------------------------------------------------------------------------------------------

_INDEX_RE = re.compile(r"^[0-9]+$")


def _apply_override(data: dict, positions: Positions, text: str) -> None:
    origin = _override_origin(text)
    if "=" not in text:
        raise RecipeError(f"{origin}: expected KEY=VALUE, e.g. `train.steps=500` (there is no '=')")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"{origin}: the key before '=' is empty (expected KEY=VALUE, e.g. `train.steps=500`)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"{origin}: the key `{key}` has an empty part (write names joined by single dots)")
    if parts[0] == "extends":
        raise RecipeError(f"{origin}: `extends` can only be set inside a recipe file")

    value, value_pos, empty = _parse_yaml(value_text, origin.file, lambda mark: origin)
    if empty:
        value = None

    node: Any = data
    path: KeyPath = ()
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if isinstance(node, list):
            if not _INDEX_RE.match(part):
                raise RecipeError(
                    f"{origin}: `{where}` is a list; pick an item by its number (e.g. `{where}.0`), not '{part}'"
                )
            k: Any = int(part)
            if k >= len(node):
                last = f"0 to {len(node) - 1}" if node else "none: it is empty"
                raise RecipeError(
                    f"{origin}: index {k} is out of range: `{where}` has {len(node)} "
                    f"item{'s' if len(node) != 1 else ''} (valid indices: {last})"
                )
        elif isinstance(node, dict):
            k = part
            if k not in node and _INDEX_RE.match(part) and int(part) in node:
                k = int(part)
        else:
            raise RecipeError(
                f"{origin}: cannot set `{key}`: `{where}` is {_kind(node)} ({_show(node)}), "
                "not a mapping or a list"
            )
        path += (k,)
        if i == len(parts) - 1:
            node[k] = value
            positions.drop(path)
            positions.set(path, origin, origin)
            for sub in value_pos:
                if sub:
                    positions.set(path + sub, origin, origin)
            return
        child = node.get(k) if isinstance(node, dict) else node[k]
        if child is None:  # a new key, or a null section: create the mapping
            child = {}
            node[k] = child
            positions.drop(path)
            positions.set(path, origin, origin)
        node = child


def load_recipe_data(path: Path | str, overrides: Sequence[str] = ()) -> tuple[dict, Positions]:
    """Read a recipe file into plain data, following ``extends:`` and applying ``overrides``.

    Returns ``(data, positions)``: ``data`` is the merged mapping (without ``extends``), and
    ``positions`` says where every key and list item was last set (see :class:`Positions`).
    Overrides are ``key.path=value`` strings; the value is read as YAML (``train.lr=1e-4``,
    ``validation.prompts=["a","b"]``, ``model.source=null``); list items are picked by number
    (``data.datasets.0.repeats=3``). An override replaces the value (a mapping is not merged).
    Raises :class:`RecipeError` for every problem.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    display = str(path)
    data, positions = _load_tree(Path(path), display, ())
    positions.source = display
    for text in overrides:
        _apply_override(data, positions, text)
    return data, positions


# --------------------------------------------------------------------------------------------------
# rendering values
# --------------------------------------------------------------------------------------------------


def _render(value: Any) -> str:
    """A value as the user would write it in YAML (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, enum.Enum):
        return _render(value.value)
    if isinstance(value, PurePath):
        return repr(str(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _show(value: Any, limit: int = 60) -> str:
    text = _render(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _got(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return f"{_kind(value)} {_show(value)}"
    return _show(value)


# --------------------------------------------------------------------------------------------------
# walking a model class along an error loc
# --------------------------------------------------------------------------------------------------

_NONE = type(None)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _is_union(ann: Any) -> bool:
    origin = get_origin(ann)
    return origin is Union or origin is types.UnionType


def _strip(ann: Any) -> Any:
    """Drop ``Annotated[...]`` and ``Optional[...]`` wrappers."""
    while True:
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
            continue
        if _is_union(ann):
            args = [a for a in get_args(ann) if a is not _NONE]
            if len(args) == 1:
                ann = args[0]
                continue
        return ann


def _union_members(ann: Any) -> list | None:
    if _is_union(ann):
        return [a for a in get_args(ann) if a is not _NONE]
    return None


def _literal_values(ann: Any) -> list | None:
    ann = _strip(ann)
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [m.value for m in ann]
    return None


def _lookup_field(model: type[BaseModel], key: Any) -> tuple[str, FieldInfo] | None:
    for name, field in model.model_fields.items():
        if key == name or key == field.alias or (isinstance(field.validation_alias, str) and key == field.validation_alias):
            return name, field
    return None


def _field_keys(model: type[BaseModel]) -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        for k in (field.alias, field.validation_alias if isinstance(field.validation_alias, str) else None, name):
            if k and k not in keys:
                keys.append(k)
    return keys


def _pick_member(members: list, tag: Any) -> tuple[Any, bool]:
    """The union member a pydantic loc tag names, and whether the union is discriminated."""
    stripped = [_strip(m) for m in members]
    for m in stripped:
        if _is_model(m) and m.__name__ == tag:
            return m, False
    for m in stripped:
        if _is_model(m):
            for field in m.model_fields.values():
                values = _literal_values(field.annotation)
                if values and any(v == tag or str(v) == str(tag) for v in values):
                    return m, True
    for m in stripped:
        origin = get_origin(m)
        name = getattr(m, "__name__", None)
        if isinstance(tag, str) and (
            tag == name
            or (origin is Literal and tag.startswith("literal["))
            or (origin is not None and tag.startswith(f"{getattr(origin, '__name__', '?')}["))
        ):
            return m, False
    return None, False


class _Walk(NamedTuple):
    path: KeyPath  # the data path (no union tags)
    owner: type[BaseModel] | None  # the model holding the last path element (a field, or an unknown key)
    field: FieldInfo | None  # the field of the last path element
    ann: Any  # the annotation of the value at path (None: unknown)
    union: tuple[KeyPath, Any] | None  # (path, tag) of the first non-discriminated union on the way


def _walk(model_cls: type[BaseModel], loc: Sequence) -> _Walk:
    ann: Any = model_cls
    path: list = []
    owner = field = None
    union = None
    items = list(loc)
    i = 0
    while i < len(items):
        elem = items[i]
        i += 1
        stripped = _strip(ann)
        members = _union_members(stripped)
        if members is not None:
            ann, discriminated = _pick_member(members, elem)
            if union is None and not discriminated:
                union = (tuple(path), elem)
            continue
        path.append(elem)
        if _is_model(stripped):
            found = _lookup_field(stripped, elem)
            owner, field = stripped, (found[1] if found else None)
            ann = field.annotation if field else None
            continue
        owner = field = None
        origin, args = get_origin(stripped), get_args(stripped)
        if origin in (list, set, frozenset) or getattr(origin, "__name__", "") in ("Sequence", "MutableSequence"):
            ann = args[0] if args else None
        elif origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                ann = args[0]
            else:
                ann = args[elem] if isinstance(elem, int) and elem < len(args) else None
        elif origin is dict or getattr(origin, "__name__", "") in ("Mapping", "MutableMapping"):
            ann = args[1] if len(args) == 2 else None
        else:
            ann = None
    return _Walk(tuple(path), owner, field, ann, union)


# --------------------------------------------------------------------------------------------------
# validation errors -> one RecipeError
# --------------------------------------------------------------------------------------------------


class Issue(NamedTuple):
    """One problem in a recipe: where, which field, what is wrong."""

    origin: Origin
    path: str  # dotted path with list indices, e.g. data.datasets[0].kind; "(top level)" for the root
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.path}: {self.message}"


_MISSING = object()


def _data_at(data: Any, path: KeyPath) -> Any:
    for k in path:
        if isinstance(data, dict) and k in data:
            data = data[k]
        elif isinstance(data, list) and isinstance(k, int) and 0 <= k < len(data):
            data = data[k]
        else:
            return _MISSING
    return data


def _dotted(path: KeyPath) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{_printable(str(k))}" if out else _printable(str(k)))
    return out or "(top level)"


def _rel_dotted(path: KeyPath) -> str:
    out = _dotted(path)
    return "" if out == "(top level)" else out


def _container_origin(positions: Positions, path: KeyPath) -> Origin:
    return positions.key_origin(path) or positions.nearest(path)


def _value_origin(positions: Positions, path: KeyPath) -> Origin:
    return positions.get(tuple(path)) or positions.nearest(path)


def _suggest(word: Any, candidates: Sequence[Any]) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _allowed(values: Sequence[Any]) -> str:
    return ", ".join(_render(v) for v in values)


def _one_of(values: Sequence[Any]) -> str:
    return _render(values[0]) if len(values) == 1 else "one of " + _allowed(values)


class _Entry(NamedTuple):
    origin: Origin
    path: KeyPath
    text: str  # the message without the "(got ...)" part
    got: str | None  # the value given, rendered
    note: str  # said after "(got ...)"

    def message(self) -> str:
        got = f" (got {self.got})" if self.got is not None else ""
        return f"{self.text}{got}{self.note}"


def _entry(err: dict, walk: _Walk, data: Any, positions: Positions) -> _Entry:
    kind = err["type"]
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    path = walk.path

    if kind == "missing":
        parent, name = path[:-1], path[-1] if path else "?"
        described = walk.field.description if walk.field is not None else None
        what = f" ({described})" if described else ""
        return _Entry(_container_origin(positions, parent), parent, f"missing required field '{name}'{what}", None, "")

    if kind == "extra_forbidden":
        name = path[-1] if path else "?"
        origin = positions.key_origin(path) or positions.nearest(path)
        text = f"unknown field '{_printable(str(name))}'"
        if walk.owner is not None:
            keys = _field_keys(walk.owner)
            hint = _suggest(name, keys)
            text += hint or ("; allowed fields: " + ", ".join(keys) if keys else "; no fields are allowed here")
        return _Entry(origin, path, text, None, "")

    if kind in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "")).strip("'\"")
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        if not tags:
            members = _union_members(_strip(walk.ann)) or []
            for m in map(_strip, members):
                field = _lookup_field(m, disc) if _is_model(m) and disc else None
                tags += [str(v) for v in (_literal_values(field[1].annotation) or [])] if field else []
        allowed = ", ".join(repr(t) for t in tags)
        if kind == "union_tag_not_found" or not disc:
            text = f"missing required field '{disc}'" if disc else msg
            if allowed:
                text += f" (it selects the kind of entry: one of {allowed})"
            return _Entry(_container_origin(positions, path), path, text, None, "")
        tag = ctx.get("tag")
        tag_path = path + (disc,)
        origin = _value_origin(positions, tag_path)
        return _Entry(origin, tag_path, f"Input should be one of {allowed}", _show(tag), _suggest(tag, tags))

    if kind in ("value_error", "assertion_error"):
        text = re.sub(r"^(Value error|Assertion failed), ", "", msg)
        if ctx.get("at"):  # a cross-field rule that names the field it is about (lens_tune.recipe.schema.rule_error)
            path = path + tuple(ctx["at"])
        at = _data_at(data, path)
        origin = _container_origin(positions, path) if isinstance(at, (dict, list)) or at is _MISSING else _value_origin(positions, path)
        return _Entry(origin, path, text, None, "")

    origin = _value_origin(positions, path)
    got: str | None = _got(value)
    note = ""
    text = msg
    if kind in ("literal_error", "enum"):
        values = _literal_values(walk.ann)
        if values:
            text = f"Input should be {_one_of(values)}"
        else:
            text = f"Input should be one of {ctx.get('expected', '')}"
        note = _suggest(value, values or re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        text = "Input should be a mapping of `key: value` fields"
    elif kind == "path_type":
        text = "Input should be a file path (text)"
    elif kind in ("bool_parsing", "bool_type"):
        text = "Input should be a boolean (true or false)"
    elif kind == "string_type" and isinstance(value, (int, float, bool)):
        note = "; put the value in quotes to make it text"
    elif kind in ("too_short", "too_long"):
        at = _data_at(data, path)
        if isinstance(at, (dict, list)):
            origin = _container_origin(positions, path)
            got = None
    if value is None and kind.endswith("_type"):
        note += "; this field cannot be null (a key with nothing after the ':' is null)"
    return _Entry(origin, path, text, got, note)


def _rule_out(upath: KeyPath, members: list[tuple[Any, _Entry, str]]) -> list[tuple[Any, _Entry, str]]:
    """Drop the union members whose own Literal field (e.g. ``kind``) did not match the input: the
    user clearly meant another member. Keeps everything when that would leave nothing."""
    ruled_out = {tag for tag, e, kind in members if kind == "literal_error" and len(e.path) == len(upath) + 1}
    kept = [m for m in members if m[0] not in ruled_out]
    return kept or members


def _sort_key(issue: Issue, source: str | None) -> tuple:
    o = issue.origin
    return (o.is_override, o.file != source, o.file, o.line or 0, o.column or 0)


MAX_LISTED = 50  # problems printed in full; `RecipeError.issues` has them all
MAX_PER_FORM = 3  # problems shown for each form of a value that may take several (`targets`: a name or a list)


def _issues(model_cls: type[BaseModel], data: Any, positions: Positions, errors: list[dict]) -> list[Issue]:
    # entries reached through a non-discriminated union are grouped per union: pydantic reports one
    # error per member, which only makes sense together ("should be an integer or a string")
    order: list[Any] = []
    groups: dict[KeyPath, list[tuple[Any, _Entry, str]]] = {}
    for err in errors:
        walk = _walk(model_cls, err["loc"])
        entry = _entry(err, walk, data, positions)
        if walk.union is None:
            order.append(entry)
            continue
        upath, tag = walk.union
        if upath not in groups:
            groups[upath] = []
            order.append(upath)
        groups[upath].append((tag, entry, err["type"]))

    issues: list[Issue] = []
    for item in order:
        if isinstance(item, _Entry):
            issues.append(Issue(item.origin, _dotted(item.path), item.message()))
            continue
        members = _rule_out(item, groups[item])
        if len(members) == 1:
            entry = members[0][1]
            issues.append(Issue(entry.origin, _dotted(entry.path), entry.message()))
            continue
        value = _data_at(data, item)
        if all(e.path == item for _, e, _ in members):
            alternatives: list[str] = []
            for _, e, _ in members:
                alt = re.sub(r"^Input should be ", "", e.text)
                alt = alt if alt.startswith("one of ") else alt.split(",")[0]
                if alt not in alternatives:
                    alternatives.append(alt)
            text = "Input should be " + " or ".join(alternatives)
            got = f" (got {_got(value)})" if value is not _MISSING else ""
            note = next((e.note for _, e, _ in members if e.note), "")
            issues.append(Issue(_value_origin(positions, item), _dotted(item), text + got + note))
            continue
        parts = []
        per_form: dict[Any, int] = {}
        for tag, e, _ in members:
            per_form[tag] = per_form.get(tag, 0) + 1
            if per_form[tag] <= MAX_PER_FORM:  # a list of 1,000 wrong items: the first few say what is wrong
                rel = _rel_dotted(e.path[len(item):])
                parts.append(f"as {tag}: {rel + ': ' if rel else ''}{e.message()}")
        parts += [f"as {tag}: {n - MAX_PER_FORM} more problems" for tag, n in per_form.items() if n > MAX_PER_FORM]
        origin = _container_origin(positions, item) if isinstance(value, (dict, list)) else _value_origin(positions, item)
        issues.append(Issue(origin, _dotted(item), "matches none of the allowed forms: " + "; ".join(parts)))
    return issues


def _recipe_error(issues: list[Issue], source: str | None) -> RecipeError:
    n = len(issues)
    head = f"invalid recipe {source}" if source else "invalid recipe"
    lines = [f"{head}: {n} problem{'s' if n != 1 else ''}:"]
    lines += [f"  {issue}" for issue in issues[:MAX_LISTED]]
    if n > MAX_LISTED:  # e.g. a list of thousands of wrong items: the first ones show what is wrong
        lines.append(f"  ... and {n - MAX_LISTED} more problems")
    lines.append("hint: " + EXPLAIN_HINT.format(recipe=source or "RECIPE"))
    error = RecipeError("\n".join(lines))
    error.issues = issues  # type: ignore[attr-defined]  # for programs (the UI) that show them one by one
    return error


def validate(model_cls: type[M], data: Any, positions: Positions) -> M:
    """Validate ``data`` as ``model_cls``; on failure raise ONE :class:`RecipeError` listing every problem.

    Each problem reads ``file:line:column: dotted.path: message``; the error's ``issues`` attribute
    holds them as :class:`Issue` tuples.
    """
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        issues = _issues(model_cls, data, positions, exc.errors(include_url=False))
        issues.sort(key=lambda issue: _sort_key(issue, positions.source))  # stable: schema order within a spot
        raise _recipe_error(issues, positions.source) from exc


# --------------------------------------------------------------------------------------------------
# relative paths
# --------------------------------------------------------------------------------------------------


def _directory_of(origin: Origin | None, base_dir: Path, cwd: Path) -> Path:
    if origin is None:
        return base_dir
    if origin.is_override:
        return cwd
    return Path(origin.file).parent


def _resolve_value(value: Any, path: KeyPath, positions: Positions, base_dir: Path, cwd: Path) -> Any:
    if isinstance(value, BaseModel):
        return _resolve_model(value, path, positions, base_dir, cwd)
    if isinstance(value, PurePath):
        text = os.path.expanduser(str(value))
        if not os.path.isabs(text):
            directory = _directory_of(positions.get(path), base_dir, cwd)
            text = os.path.abspath(os.path.join(cwd, directory, text))
        return value if text == str(value) else type(value)(text)
    if isinstance(value, (list, tuple)):
        new = [_resolve_value(v, path + (i,), positions, base_dir, cwd) for i, v in enumerate(value)]
        if all(a is b for a, b in zip(new, value)):
            return value
        return new if isinstance(value, list) else type(value)(new)
    if isinstance(value, dict):
        new_d = {k: _resolve_value(v, path + (k,), positions, base_dir, cwd) for k, v in value.items()}
        return value if all(new_d[k] is value[k] for k in value) else new_d
    return value


def _resolve_model(model: BaseModel, path: KeyPath, positions: Positions, base_dir: Path, cwd: Path) -> BaseModel:
    update = {}
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        if path + (key,) not in positions and path + (name,) in positions:
            key = name
        value = getattr(model, name)
        new = _resolve_value(value, path + (key,), positions, base_dir, cwd)
        if new is not value:
            update[name] = new
    return model.model_copy(update=update) if update else model


def resolve_paths(model: M, positions: Positions, base_dir: Path | str) -> M:
    """Make every relative path in ``model`` absolute; returns a NEW model (``model`` is not changed).

    Every ``pathlib`` value found in the model (fields typed ``Path``, ``Path | None``,
    ``list[Path]``, also inside nested models, lists and dicts) is resolved against the directory of
    the file that set it (from ``positions``); values from a command-line override against the
    current working directory; values nobody set (schema defaults) against ``base_dir``. ``~`` is
    expanded. Unchanged sub-models are shared with ``model``; changed ones are copies made with
    ``model_copy(update=...)`` (no re-validation).
    """
    cwd = Path.cwd()
    return _resolve_model(model, (), positions, Path(os.path.abspath(base_dir)), cwd)  # type: ignore[return-value]


def load_recipe(path: Path | str, model_cls: type[M], overrides: Sequence[str] = ()) -> M:
    """Read, validate and resolve a recipe: :func:`load_recipe_data`, :func:`validate`, :func:`resolve_paths`."""
    data, positions = load_recipe_data(path, overrides)
    model = validate(model_cls, data, positions)
    return resolve_paths(model, positions, Path(path).parent)


# --------------------------------------------------------------------------------------------------
# explain + dump
# --------------------------------------------------------------------------------------------------

_BOUNDS = [
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("multiple_of", "multiple of"),
    ("min_length", "min length"),
    ("max_length", "max length"),
]


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Annotated:
        return _type_name(get_args(ann)[0])
    if ann is None or ann is _NONE:
        return "null"
    if ann is Any:
        return "any"
    if _is_union(ann):
        args = get_args(ann)
        names = [_type_name(a) for a in args if a is not _NONE]
        text = " or ".join(names)
        return text + (" or null" if _NONE in args else "")
    values = _literal_values(ann)
    if values is not None:
        return _one_of(values)
    if _is_model(ann):
        return ann.__name__
    if isinstance(ann, type) and issubclass(ann, PurePath):
        return "path"
    origin, args = get_origin(ann), get_args(ann)
    if origin in (list, set, frozenset, Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list (" + ", ".join(_type_name(a) for a in args) + ")"
    if origin in (dict, Mapping):
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if ann in (str, int, float, bool):
        return ann.__name__
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, word in _BOUNDS:
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{word} {bound}")
    return "".join(f", {p}" for p in parts)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        if getattr(field, "default_factory_takes_data", False):
            return "default computed"
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except Exception:  # pragma: no cover - a factory that needs context
            return "default computed"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "optional section"
    try:
        from pydantic_core import to_jsonable_python

        value = to_jsonable_python(value)
    except Exception:  # pragma: no cover
        pass
    return f"default {_show(value, 40)}"


def _describe(text: str | None) -> str:
    return " ".join((text or "").split())


def _form_label(model: type[BaseModel]) -> str:
    for name, field in model.model_fields.items():
        values = _literal_values(field.annotation)
        if values is not None and len(values) == 1:
            return f"when {field.alias or name}: {_render(values[0])}"
    return model.__name__


def _explain_nested(ann: Any, name: str, rows: list, stack: tuple) -> None:
    ann = _strip(ann)
    members = _union_members(ann)
    if members is not None:
        models = [m for m in map(_strip, members) if _is_model(m)]
        if len(models) == 1:
            _explain_nested(models[0], name, rows, stack)
            return
        for m in models:
            if m in stack:
                continue
            rows.append((name, f"{m.__name__}, {_form_label(m)}", _describe(m.__doc__).split(". ")[0]))
            _explain_fields(m, name + ".", rows, stack + (m,))
        return
    if _is_model(ann):
        if ann in stack:
            rows.append((name + ".*", f"{ann.__name__}, as above", ""))
        else:
            _explain_fields(ann, name + ".", rows, stack + (ann,))
        return
    origin, args = get_origin(ann), get_args(ann)
    if origin in (list, set, frozenset, Sequence) and args:
        _explain_nested(args[0], name + "[]", rows, stack)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        _explain_nested(args[0], name + "[]", rows, stack)
    elif origin in (dict, Mapping) and len(args) == 2:
        _explain_nested(args[1], name + ".<name>", rows, stack)


def _explain_fields(model: type[BaseModel], prefix: str, rows: list, stack: tuple) -> None:
    for name, field in model.model_fields.items():
        full = prefix + (field.alias or name)
        info = f"{_type_name(field.annotation)}{_bounds(field)}, {_default_text(field)}"
        rows.append((full, info, _describe(field.description)))
        _explain_nested(field.annotation, full, rows, stack)


def explain(model_cls: type[BaseModel]) -> str:
    """Every field of ``model_cls``, nested, one per line: ``section.field  (type, default X)  description``.

    List items are shown as ``name[]``, mapping values as ``name.<name>``; for a list of several kinds
    of entry, each kind's fields follow a line saying when it applies (e.g. ``when kind: 'folder'``).
    """
    rows: list[tuple[str, str, str]] = []
    _explain_fields(model_cls, "", rows, (model_cls,))
    width = min(max((len(r[0]) for r in rows), default=0), 40)
    lines = [f"{model_cls.__name__} fields: name  (type, default)  description", ""]
    lines += [f"{name.ljust(width)}  ({info})  {desc}".rstrip() for name, info, desc in rows]
    return "\n".join(lines) + "\n"


def dump_yaml(model: BaseModel) -> str:
    """``model`` as YAML: ``model_dump(mode="json", by_alias=True)``, keys in schema order, plain tags.

    Strings that would read back as another type (``'1e-4'``, ``'yes'``, ``'16:9'``) are quoted, so
    :func:`load_recipe` of the output gives back an equal model.
    """
    data = model.model_dump(mode="json", by_alias=True)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
