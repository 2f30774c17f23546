"""The run folder: the contract between the trainer (the only writer), the exporter and the dashboard (readers).

Layout of one run, `runs/<name>/<timestamp>/`:

    recipe.lock.yaml        the resolved recipe (written by the trainer)
    events.jsonl            one JSON object per line, see below
    status.json             {"state": ..., "step": n, "total_steps": N, "pid": ..., "updated": ..., ...}
    samples/step-XXXXXX/    sample images of one step
    checkpoints/step-XXXXXX/  see lens_tune.train.checkpoint
    adapter/                the final adapter
    run.lock                the advisory lock of the process training in this folder (holds its pid)

The timestamp is the UTC start time, `YYYYMMDD-HHMMSS`; a second run started in the same second gets
`YYYYMMDD-HHMMSS-2`, then `-3` and so on (folders are created exclusively, so two runs never share one).

events.jsonl: every line is one complete JSON object with "event" (str) and "time" (unix seconds, float), e.g.
`{"event": "step", "time": 1718000000.5, "step": 12, "loss": 0.31, "lr": 0.0001}`. Lines are UTF-8 with non-ASCII
characters written as they are. Non-finite floats (nan, inf, -inf) are written as JSON null, so every line is
strict JSON that any reader (browsers included) can parse. Each line is written with one write(2) call (unbuffered,
so it is visible to readers at once; no fsync per line, `sync()` does that at checkpoints). A line cut short by a
crash is never counted as an event: readers skip a trailing line without its newline and any line that is not a
JSON object, and the writer starts a new line after such a fragment.

This module does not import torch: the dashboard imports it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lens_tune.errors import LensTuneError
from lens_tune.files import atomic_write_bytes

EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"
RECIPE_LOCK_FILE = "recipe.lock.yaml"
RUN_LOCK_FILE = "run.lock"
STATES = ("running", "finished", "failed", "interrupted")

_RUN_MARKERS = (EVENTS_FILE, STATUS_FILE, RECIPE_LOCK_FILE)
_FOLDER_RE = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


class RunFolderError(LensTuneError):
    """A run folder is missing, invalid or in use by another process."""


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None, tuples as lists, keys as str, Paths and unknown objects as str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # numpy and torch scalars, 1-element tensors
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _dumps(obj: dict) -> bytes:
    return (json.dumps(_json_safe(obj), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _parse_line(line: bytes) -> dict | None:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _RUN_MARKERS)


def check_writable(folder: Path, what: str = "output.dir") -> None:
    """Create `folder` if needed and prove a file can be written in it, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunFolderError(f"{what} {folder} cannot be written ({reason}); choose another {what}") from None


class RunFolder:
    """One run's folder. The trainer creates or opens it, `acquire()`s it for the whole training and writes to it."""

    def __init__(self, path: Path):
        self._path = Path(path)
        self._lock_fd: int | None = None
        self._events_fd: int | None = None

    # -- creation ---------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: Path, name: str) -> "RunFolder":
        """A new, empty run folder `runs_dir/name/<UTC YYYYMMDD-HHMMSS>[-n]`, created exclusively."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise RunFolderError(f"invalid run name {name!r}: use a plain folder name (no slashes)")
        parent = Path(runs_dir) / name
        parent.mkdir(parents=True, exist_ok=True)
        stamp = _timestamp()
        for n in range(1, 10_000):
            path = parent / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()  # exclusive: fails if another run took this name first
            except FileExistsError:
                continue
            folder = cls(path)
            folder.events_path.touch()  # marks it as a run folder from the start
            return folder
        raise RunFolderError(f"could not create a run folder in {parent}: too many runs started in the same second")

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        """An existing run folder (to resume a run). Raises RunFolderError if `path` is not one."""
        path = Path(path)
        if not path.is_dir():
            raise RunFolderError(f"run folder {path} does not exist; pass a folder under runs/<name>/ (see `lens-tune runs`)")
        if not _is_run_folder(path):
            raise RunFolderError(
                f"{path} is not a run folder (it has none of {', '.join(_RUN_MARKERS)}); "
                "pass a folder runs/<name>/<timestamp>/ made by `lens-tune train`"
            )
        return cls(path)

    # -- paths ------------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        """The run name (the parent folder's name)."""
        return self._path.parent.name

    @property
    def events_path(self) -> Path:
        return self._path / EVENTS_FILE

    @property
    def status_path(self) -> Path:
        return self._path / STATUS_FILE

    @property
    def lock_path(self) -> Path:
        """The resolved recipe, `recipe.lock.yaml` (not the process lock: that is `run_lock_path`)."""
        return self._path / RECIPE_LOCK_FILE

    @property
    def run_lock_path(self) -> Path:
        return self._path / RUN_LOCK_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self._path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self._path / "adapter"

    def samples_dir(self, step: int) -> Path:
        """`samples/step-XXXXXX` (not created here)."""
        return self._path / "samples" / f"step-{int(step):06d}"

    def __repr__(self) -> str:
        return f"RunFolder({str(self._path)!r})"

    # -- the process lock -------------------------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Take the folder's exclusive lock (non-blocking), or raise RunFolderError naming the holder's pid.

        The lock is an flock(2) on run.lock: the kernel drops it when the holding process ends, however it ends
        (SIGKILL and power loss included), so a crashed run can always be resumed. Calling it again while holding
        the lock does nothing.
        """
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.run_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise RunFolderError(f"run folder {self._path} does not exist (was it moved or deleted?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise RunFolderError(f"could not lock run folder {self._path}: {err}") from err
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise RunFolderError(
                f"run folder {self._path} is in use by {who} (a training is running in it); wait for it to finish "
                f"or stop that process, then resume; or start a new run instead"
            ) from None
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock (and close the events file). The lock file stays: removing it would race other lockers."""
        self.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunFolder":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- events -----------------------------------------------------------------------------------------------

    def _events_handle(self) -> int:
        if self._events_fd is None:
            fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and _last_byte(self.events_path, size) != b"\n":
                    _write_all(fd, b"\n")  # end a line cut short by a crash: it stays a skipped fragment
            except OSError:
                os.close(fd)
                raise
            self._events_fd = fd
        return self._events_fd

    def log_event(self, event: str, /, **fields: Any) -> None:
        """Append `{"event": event, "time": <now>, **fields}` as one line, visible to readers at once.

        `time` may be given to override the current time. Non-finite floats become null; tuples become lists;
        numpy/torch scalars become numbers; other objects are written as their str().
        """
        if "event" in fields:
            raise ValueError("log_event: 'event' is the first argument, not a field")
        record = {"event": event, "time": fields.pop("time") if "time" in fields else time.time(), **fields}
        _write_all(self._events_handle(), _dumps(record))

    def sync(self) -> None:
        """fsync events.jsonl (called at checkpoints; lines are not fsynced one by one)."""
        if self._events_fd is not None:
            os.fsync(self._events_fd)

    def close(self) -> None:
        """Close the events file (it reopens on the next log_event)."""
        if self._events_fd is not None:
            fd, self._events_fd = self._events_fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read_events(self, from_offset: int = 0) -> tuple[list[dict], int]:
        return read_events(self.events_path, from_offset)

    def truncate_events_after(self, step: int) -> int:
        """Rewrite events.jsonl without the `step` events whose step is > `step` (they will be redone on resume).

        Every other event is kept byte for byte; fragments and corrupt lines are dropped. The rewrite is atomic
        (temporary file, fsync, rename). Returns the number of lines dropped.
        """
        self.close()  # the open descriptor would keep writing to the replaced file
        try:
            data = self.events_path.read_bytes()
        except FileNotFoundError:
            return 0
        kept, dropped = [], 0
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if i == len(lines) - 1:  # after the last newline: empty, or a fragment cut short by a crash
                dropped += bool(line.strip())
                break
            if not line.strip():
                continue
            obj = _parse_line(line)
            if obj is None:
                dropped += 1
                continue
            if obj.get("event") == "step" and isinstance(obj.get("step"), (int, float)) and obj["step"] > step:
                dropped += 1
                continue
            kept.append(line + b"\n")
        atomic_write_bytes(self.events_path, b"".join(kept), sync_dir=True)
        return dropped

    # -- status -----------------------------------------------------------------------------------------------

    def set_status(self, state: str, **fields: Any) -> None:
        """Atomically replace status.json with `{"state": state, **fields, "pid": <this pid>, "updated": <now>}`.

        The file is replaced as a whole: pass every field each time (step, total_steps, ...); nothing is merged
        from the previous status.
        """
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; one of {', '.join(STATES)}")
        status = {"state": state, **fields, "pid": os.getpid(), "updated": time.time()}
        data = (json.dumps(_json_safe(status), ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode("utf-8")
        atomic_write_bytes(self.status_path, data, sync_dir=state != "running")

    def read_status(self) -> dict:
        return read_status(self._path)


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)


def read_events(path: Path, from_offset: int = 0) -> tuple[list[dict], int]:
    """The events of the complete lines after byte `from_offset` of events.jsonl, and the offset to pass next time.

    `path` is the events file or its run folder. A trailing line without its newline (being written, or cut short
    by a crash) is left for the next call; lines that are not JSON objects are skipped. A missing file reads as no
    events.

    If the file was rewritten since `from_offset` was returned (it is now shorter, or `from_offset` is not at the
    start of a line: `truncate_events_after` on resume does that), the answer is `([], 0)`: the caller drops the
    events it has and reads again from 0. (A rewrite that happens to leave a line start at `from_offset` cannot be
    told apart; the dashboard then shows the redone steps twice until it reloads.)
    """
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS_FILE
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return [], 0
    with handle:
        size = os.fstat(handle.fileno()).st_size
        start = max(0, int(from_offset))
        if start > size:
            return [], 0
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                return [], 0
        handle.seek(start)
        data = handle.read(size - start)
    end = data.rfind(b"\n")
    if end < 0:
        return [], start
    events = [obj for line in data[: end + 1].split(b"\n") if line.strip() and (obj := _parse_line(line)) is not None]
    return events, start + end + 1


def read_status(path: Path) -> dict:
    """status.json of a run folder (`path` is the folder or the file); {} if the run has not written one yet."""
    path = Path(path)
    if path.is_dir():
        path = path / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        status = json.loads(text)
    except ValueError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}); it is written atomically, so it was edited by hand") from err
    if not isinstance(status, dict):
        raise RunFolderError(f"{path} does not hold a JSON object")
    return status


def lock_holder(path: Path) -> int | None:
    """The pid in a run folder's run.lock: the process training in it now, or the last one that did (None if no
    training ever started there). Reading it takes no lock, so it never gets in a trainer's way; whether that
    process still runs is for the caller to check."""
    try:
        text = (Path(path) / RUN_LOCK_FILE).read_text(encoding="ascii", errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def trainer_pid(path: Path) -> int | None:
    """The pid of the process training in the run folder `path` right now, or None when none is.

    It asks the lock itself: a non-blocking shared flock on run.lock fails exactly while a trainer holds its
    exclusive one, so the pid of a killed trainer (or a pid since reused by another program) never counts. The flock
    is held for an instant; call this for a user's action (stopping a run), and `lock_holder` for polling.
    """
    try:
        fd = os.open(Path(path) / RUN_LOCK_FILE, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _sort_key(path: Path) -> tuple[str, int, str]:
    match = _FOLDER_RE.match(path.name)
    assert match is not None
    return match.group(1), int(match.group(2) or 1), path.parent.name


def find_runs(runs_dir: Path, name: str | None = None) -> list[Path]:
    """The run folders under `runs_dir` (of run `name`, or of every name), newest first by start time."""
    runs_dir = Path(runs_dir)
    parents = [runs_dir / name] if name is not None else ([p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else [])
    found = []
    for parent in parents:
        if not parent.is_dir():
            continue
        found.extend(p for p in parent.iterdir() if _FOLDER_RE.match(p.name) and _is_run_folder(p))
    return sorted(found, key=_sort_key, reverse=True)


def latest_run(runs_dir: Path, name: str | None = None) -> Path | None:
    """The newest run folder of run `name` (or of any name), or None."""
    runs = find_runs(runs_dir, name)
    return runs[0] if runs else None


def adapter_dir_of(path: Path) -> Path:
    """The adapter folder meant by `path`: a run folder (its final adapter), one of its checkpoints, or an
    adapter folder itself."""
    path = Path(path).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if (path / "checkpoints").is_dir():
        raise RunFolderError(
            f"{path} has no final adapter yet (the run did not finish); pass one of its checkpoints, "
            f"e.g. {path / 'checkpoints' / 'step-000250'}."
        )
    raise RunFolderError(f"{path} is not a run folder, a checkpoint or an adapter folder (no adapter_config.json).")
