"""Writing files so that a crash never leaves a half-written one where a reader would find it, and a full disk
gives one clear error instead of a stack trace."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from lens_tune.errors import LensTuneError


class DiskFullError(LensTuneError):
    """A write failed because its filesystem is full (or over quota). Files written before are unchanged."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library (safetensors) reports it as its own error type."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@contextmanager
def reporting_full_disk(what: str, where: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full-disk error inside the block into DiskFullError naming `what`, `where` and the space needed."""
    try:
        yield
    except Exception as error:  # an inner DiskFullError too: the outermost caller knows best what was being written
        if not (isinstance(error, DiskFullError) or is_disk_full(error)):
            raise
        need = f"about {human_bytes(needed_bytes)} needed, " if needed_bytes else ""
        raise DiskFullError(
            f"no space left on the device to write {what} ({where}): {need}{human_bytes(free_bytes(where))} free. "
            "Free some space (or point the output or cache folder at another disk) and run again; files written "
            "before are unchanged."
        ) from None


def atomic_write(target: Path, write: Callable[[Path], None], sync_dir: bool = False, *,
                 what: str | None = None, needed_bytes: int | None = None) -> None:
    """Call `write(tmp)` on a temporary name beside `target`, flush it, then rename it over `target`.

    Readers see the old file or the complete new one, never a part. `sync_dir` also flushes the rename itself.
    A full disk raises DiskFullError naming `what` (default: the file) and `needed_bytes` when given.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with reporting_full_disk(what or target.name, target, needed_bytes):
            write(tmp)
            fsync_path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_path(target.parent)


def atomic_write_bytes(target: Path, data: bytes, sync_dir: bool = False, *, what: str | None = None) -> None:
    atomic_write(target, lambda tmp: tmp.write_bytes(data), sync_dir, what=what, needed_bytes=len(data))
