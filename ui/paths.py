"""The two folders the dashboard may touch (runs, recipes), and the one check every path from the page goes through.

Anything a browser or an API client sends (a run, a checkpoint, a recipe name) is a path *relative* to one of these
folders. It is resolved (`..` and symlinks followed) and refused unless the result is still inside the folder, so
no input can read or write a file elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from lens_tune.errors import LensTuneError


class OutsideFolder(LensTuneError):
    """A path from the page points outside the folder it must stay in."""


class Folder:
    """A folder the dashboard reads (and, for recipes, writes) in."""

    def __init__(self, path: Path | str, label: str):
        self.path = Path(path).expanduser().resolve()
        self.label = label  # "runs folder" / "recipes folder", for messages

    def contains(self, path: Path) -> bool:
        """Whether `path`, with every symlink followed, is this folder or inside it."""
        resolved = Path(path).resolve()
        return resolved == self.path or self.path in resolved.parents

    def inside(self, relative: str | Path) -> Path:
        """The resolved path of `relative` (relative to this folder); OutsideFolder if it leaves the folder."""
        text = str(relative).strip()
        if not text or "\0" in text:
            raise OutsideFolder(f"empty or invalid path {text!r}: pick an entry of the {self.label}")
        if Path(text).is_absolute() or text.startswith("~"):
            raise OutsideFolder(f"{text} is not allowed: paths are relative to the {self.label}")
        return self.check(self.path / text, text)

    def check(self, path: Path, shown: str | None = None) -> Path:
        """`path` resolved, if that is inside this folder; OutsideFolder otherwise."""
        resolved = Path(path).resolve()
        if not self.contains(resolved):
            raise OutsideFolder(f"{shown or path} leads outside the {self.label} ({self.path}); refused")
        return resolved

    def relative(self, path: Path) -> str:
        """`path` (inside this folder) as the relative text the page uses."""
        return Path(path).resolve().relative_to(self.path).as_posix()
