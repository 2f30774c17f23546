"""Reading run folders for the dashboard, incrementally: a refresh parses only the bytes appended since the last one.

Each run keeps the byte offset of the next unread line of its events.jsonl and the arrays parsed so far (step,
loss, smoothed loss, learning rate, ...). A refresh costs the new lines, not the run's length, so a run of 100,000
steps refreshes as fast as one of 1,000 (benchmarks/dashboard_refresh.py). When the file was replaced (resume
rewrites it) or truncated, the run is read again from the start. Plots get at most MAX_POINTS points per curve.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import threading
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from PIL import Image

from lens_tune.errors import LensTuneError
from lens_tune.recipe.load import load_recipe_data
from lens_tune.train.run_folder import (
    EVENTS_FILE, RECIPE_LOCK_FILE, RunFolderError, find_runs, lock_holder, read_events, read_status,
)

from .paths import Folder

SMOOTHING = 0.9  # weight of the exponential moving average of the loss (debiased, as TensorBoard's)
MAX_POINTS = 1000  # per curve: a 100,000-step run is drawn from every 100th step
ETA_WINDOW = 50  # ETA from the wall time of the last this-many steps (samples and checkpoints included)
LOG_LINES = 200  # the events log shows the newest this-many events besides steps
ERROR_EVENTS = ("error", "nonfinite")


class RunNotFound(LensTuneError):
    """The page asked for a run that is not a run folder under the runs folder."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunEvents:
    """One events.jsonl, parsed incrementally into arrays."""

    def __init__(self, path: Path):
        self.path = path
        self._reset(None)

    def _reset(self, file_id) -> None:
        self.file_id = file_id  # (device, inode): a new one means the file was replaced
        self.offset = 0
        self.step: list[int] = []
        self.loss: list[float | None] = []
        self.smoothed: list[float | None] = []
        self.lr: list[float | None] = []
        self.grad_norm: list[float | None] = []
        self.step_time: list[float | None] = []
        self.peak_memory: list[float | None] = []
        self.time: list[float] = []
        self.samples: dict[int, list[str]] = {}  # step -> image paths relative to the run folder
        self.log: list[dict] = []  # every event but steps
        self._ema, self._finite = 0.0, 0

    def update(self) -> int:
        """Parse the lines appended since the last call; returns how many events were new."""
        try:
            stat = os.stat(self.path)
            file_id = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            file_id = None
        if file_id != self.file_id:
            self._reset(file_id)
        events, offset = read_events(self.path, self.offset)
        if offset == 0 and self.offset > 0:  # read_events' sign that the file was rewritten in place
            self._reset(file_id)
            events, offset = read_events(self.path, 0)
        self.offset = offset
        for event in events:
            self._add(event)
        return len(events)

    def _add(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "step" and isinstance(event.get("step"), int):
            loss = _number(event.get("loss"))
            if loss is not None:
                self._finite += 1
                self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * loss
            self.step.append(event["step"])
            self.loss.append(loss)
            self.smoothed.append(self._ema / (1 - SMOOTHING**self._finite) if loss is not None else None)
            self.lr.append(_number(event.get("lr")))
            self.grad_norm.append(_number(event.get("grad_norm")))
            self.step_time.append(_number(event.get("step_time")))
            self.peak_memory.append(_number(event.get("peak_memory_gib")))
            self.time.append(_number(event.get("time")) or 0.0)
            return
        if kind == "sample" and isinstance(event.get("step"), int):
            self.samples[event["step"]] = [str(p) for p in event.get("images") or []]
        self.log.append(event)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Run:
    """One run folder as the dashboard shows it."""

    def __init__(self, path: Path, run_id: str):
        self.path = path
        self.id = run_id  # the path relative to the runs folder: what the page shows and sends back
        self.events = RunEvents(path / EVENTS_FILE)
        self.status: dict = {}
        self._recipe: dict | None = None
        self._captions: dict[str, str] = {}

    def update(self) -> None:
        self.events.update()
        try:
            self.status = read_status(self.path)
        except RunFolderError as err:
            self.status = {"state": "failed", "error": str(err)}

    # -- what the table shows -----------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """running, finished, failed or interrupted; a run whose trainer died without saying (SIGKILL, power
        loss) is interrupted: it can be resumed from its last checkpoint."""
        state = self.status.get("state")
        pid = lock_holder(self.path)
        alive = pid is not None and process_alive(pid)
        if state == "running" or state is None:
            return "running" if alive else ("interrupted" if state else "failed")
        return state

    @property
    def step(self) -> int:
        return max(self.events.step[-1] if self.events.step else 0, int(self.status.get("step") or 0))

    @property
    def total_steps(self) -> int | None:
        total = self.status.get("total_steps")
        if total is None:
            total = (self.recipe.get("train") or {}).get("steps")
        return int(total) if isinstance(total, (int, float)) else None

    def eta_seconds(self) -> float | None:
        """Seconds left, from the pace of the last ETA_WINDOW steps; None unless running."""
        events, total = self.events, self.total_steps
        if self.state != "running" or total is None or not events.step:
            return None
        first = max(0, len(events.step) - ETA_WINDOW)
        done = events.step[-1] - events.step[first]
        if done > 0:
            per_step = (events.time[-1] - events.time[first]) / done
        else:
            per_step = events.step_time[-1] or 0.0
        return max(0, total - events.step[-1]) * per_step

    @property
    def recipe(self) -> dict:
        """recipe.lock.yaml as data ({} until the trainer wrote it or when it cannot be read)."""
        if self._recipe is None:
            if not (self.path / RECIPE_LOCK_FILE).is_file():
                return {}
            try:
                self._recipe, _ = load_recipe_data(self.path / RECIPE_LOCK_FILE)
            except LensTuneError:
                self._recipe = {}
        return self._recipe

    @property
    def recipe_text(self) -> str:
        try:
            return (self.path / RECIPE_LOCK_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return "# recipe.lock.yaml is written when the run starts training"

    def describe(self) -> str:
        """The run's name and the recipe essentials: 'quickstart: tiny, lora r8'."""
        recipe = self.recipe
        lora = recipe.get("lora") or {}
        source = (recipe.get("model") or {}).get("source", "?")
        kind, rank = lora.get("type", "lora"), lora.get("rank", "?")
        return f"{self.path.parent.name}: {Path(str(source)).name or source}, {kind} r{rank}"

    def started(self) -> str:
        stamp = self.path.name.split("-")
        try:
            when = datetime.strptime(f"{stamp[0]}-{stamp[1]}", "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
        except (ValueError, IndexError):
            return ""
        return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")

    def last_loss(self) -> float | None:
        return next((loss for loss in reversed(self.events.loss) if loss is not None), None)

    def row(self) -> list:
        total = self.total_steps
        loss = self.last_loss()
        return [
            self.id, self.describe(), self.state, f"{self.step} / {total if total is not None else '?'}",
            format_duration(self.eta_seconds()), f"{loss:.4f}" if loss is not None else "", self.started(),
        ]

    # -- detail ---------------------------------------------------------------------------------------------------

    def stats(self) -> str:
        events = self.events
        recent = [t for t in events.step_time[-100:] if t is not None]
        memory = [m for m in events.peak_memory if m is not None]
        parts = [f"**{self.state}**", f"step {self.step} / {self.total_steps or '?'}"]
        if recent:
            parts.append(f"step time {statistics.median(recent):.3f} s (median of the last {len(recent)})")
        parts.append(f"peak memory {max(memory):.2f} GiB" if memory else "peak memory: not measured (CPU)")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if self.status.get("error"):
            parts.append(f"error: {self.status['error']}")
        return " · ".join(parts)

    def log_html(self) -> str:
        """The newest LOG_LINES events besides steps; errors and non-finite losses in red."""
        lines = []
        for event in self.events.log[-LOG_LINES:]:
            when = datetime.fromtimestamp(_number(event.get("time")) or 0).strftime("%H:%M:%S")
            fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
            kind = str(event.get("event"))
            css = "lt-error" if kind in ERROR_EVENTS else "lt-event"
            lines.append(f'<div class="{css}"><code>{when} {html.escape(kind)}</code> {html.escape(fields)}</div>')
        return "".join(lines) or "<div>no events yet</div>"

    def sample_steps(self) -> list[int]:
        return sorted(self.events.samples)

    def samples_at(self, step: int) -> list[tuple[str, str]]:
        """(image path, caption) of the samples of `step` (the nearest step that has samples)."""
        steps = self.sample_steps()
        if not steps:
            return []
        nearest = min(steps, key=lambda s: (abs(s - step), s))
        return [(str(self.path / rel), self.caption(rel)) for rel in self.events.samples[nearest]
                if (self.path / rel).is_file()]

    def caption(self, rel: str) -> str:
        """The prompt and seed a sample PNG carries in its metadata (read once per file)."""
        if rel not in self._captions:
            try:
                with Image.open(self.path / rel) as image:
                    settings = json.loads(image.text.get("lens-tune", "{}"))
                self._captions[rel] = f"{settings.get('prompt', '')} (seed {settings.get('seed', '?')})"
            except (OSError, ValueError):
                self._captions[rel] = Path(rel).name
        return self._captions[rel]

    def prompt_of(self, rel: str) -> str:
        return self.caption(rel).rsplit(" (seed ", 1)[0]

    def adapters(self) -> list[str]:
        """What the preview and export can load, relative to the run: final adapter, checkpoints, exported files."""
        found = ["adapter"] if (self.path / "adapter" / "adapter_config.json").is_file() else []
        checkpoints = sorted(self.path.glob("checkpoints/step-*/adapter/adapter_config.json"), reverse=True)
        found += [p.parent.parent.relative_to(self.path).as_posix() for p in checkpoints]
        exported = sorted(self.path.glob("export/*/*.safetensors"), reverse=True)
        found += [p.relative_to(self.path).as_posix() for p in exported]
        return found

    def adapter_path(self, choice: str) -> Path:
        """What to load for `choice` (one of `adapters()`): an adapter folder or an exported file."""
        if choice not in self.adapters():
            raise RunNotFound(f"{choice!r} is not an adapter, checkpoint or exported file of {self.id}")
        return self.path / choice / "adapter" if choice.startswith("checkpoints/") else self.path / choice


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else (f"{minutes}m {secs:02d}s" if minutes else f"{secs}s")


class RunsIndex:
    """Every run under the runs folder, each kept between refreshes so that only new bytes are parsed.

    Gradio calls handlers from several threads; one lock keeps a run from being parsed twice at once.
    """

    COLUMNS = ["run", "recipe", "status", "step", "ETA", "last loss", "started"]

    def __init__(self, folder: Folder):
        self.folder = folder
        self._runs: dict[Path, Run] = {}
        self._lock = threading.Lock()

    def refresh(self) -> list[Run]:
        """Every run, newest first, brought up to date."""
        with self._lock:
            paths = [p for p in find_runs(self.folder.path) if self.folder.contains(p)]
            self._runs = {p: self._runs.get(p) or Run(p, self.folder.relative(p)) for p in paths}
            for run in self._runs.values():
                run.update()
            return list(self._runs.values())

    def get(self, run_id: str) -> Run:
        """The run `run_id` (relative to the runs folder), up to date. OutsideFolder / RunNotFound otherwise."""
        path = self.folder.inside(run_id)
        if path.parent.parent != self.folder.path or path not in find_runs(self.folder.path, path.parent.name):
            raise RunNotFound(f"{run_id} is not a run folder under the runs folder")
        with self._lock:
            run = self._runs.get(path)
            if run is None:
                run = self._runs[path] = Run(path, self.folder.relative(path))
            run.update()
            return run

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([run.row() for run in self.refresh()], columns=self.COLUMNS)


# -- plots --------------------------------------------------------------------------------------------------------


def _picks(count: int) -> list[int]:
    """At most MAX_POINTS indices spread over `count` points, the last one always included."""
    if count <= MAX_POINTS:
        return list(range(count))
    stride = math.ceil(count / MAX_POINTS)
    picks = list(range(0, count, stride))
    return picks if picks[-1] == count - 1 else [*picks, count - 1]


def curve_frame(run: Run, series: dict[str, list], label: str | None = None) -> pd.DataFrame:
    """A long-form frame (step, value, series) of the named arrays, downsampled, without missing values."""
    steps = run.events.step
    picks = _picks(len(steps))
    rows = [(steps[i], values[i], label or name) for name, values in series.items() for i in picks
            if values[i] is not None]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def loss_frame(run: Run) -> pd.DataFrame:
    return curve_frame(run, {"loss": run.events.loss, "smoothed": run.events.smoothed})


def metric_frame(run: Run, name: str) -> pd.DataFrame:
    return curve_frame(run, {name: getattr(run.events, name)})


def compare_frame(runs: list[Run]) -> pd.DataFrame:
    """The smoothed loss of several runs, one series per run."""
    frames = [curve_frame(run, {"smoothed": run.events.smoothed}, label=run.id) for run in runs]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "value", "series"])
