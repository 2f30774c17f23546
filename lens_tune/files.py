"""Writing files so that a crash never leaves a half-written one where a reader would find it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[Path], None], sync_dir: bool = False) -> None:
    """Call `write(tmp)` on a temporary name beside `target`, flush it, then rename it over `target`.

    Readers see the old file or the complete new one, never a part. `sync_dir` also flushes the rename itself.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_path(target.parent)


def atomic_write_bytes(target: Path, data: bytes, sync_dir: bool = False) -> None:
    atomic_write(target, lambda tmp: tmp.write_bytes(data), sync_dir)
