"""Recipes (list, edit, validate, save) and the training processes the dashboard starts, stops and resumes.

A training started here is `lens-tune run` in a process of its own session: closing the page, or stopping the
dashboard (Ctrl-C included), does not stop it. Its output goes to a log under the runs folder. Stopping sends
SIGINT to the trainer, which finishes the step, writes a checkpoint and records the run as interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lens_tune.errors import LensTuneError
from lens_tune.files import atomic_write_bytes
from lens_tune.train.run_folder import RECIPE_LOCK_FILE, trainer_pid

from .paths import Folder, OutsideFolder
from .runs import Run

SUFFIXES = (".yaml", ".yml")
LOG_FOLDER = ".dashboard"  # inside the runs folder: the output of the processes started here
TAIL_LINES = 15  # what the page's output box shows
TAIL_BYTES = 64 * 1024  # read no more of a log than this


class TrainError(LensTuneError):
    """A start, stop or resume the dashboard cannot do, with the reason."""


@dataclass
class Check:
    ok: bool
    message: str  # what `lens-tune validate` says: the errors (file:line:col: ...) or the datasets found


class Recipes:
    """The recipe files directly in the recipes folder."""

    def __init__(self, folder: Folder):
        self.folder = folder

    def names(self) -> list[str]:
        if not self.folder.path.is_dir():
            return []
        return sorted(p.name for p in self.folder.path.iterdir() if p.suffix in SUFFIXES
                      and not p.name.startswith(".") and p.is_file() and self.folder.contains(p))

    def path_of(self, name: str) -> Path:
        """The file of recipe `name`: a plain .yaml/.yml file name, inside the recipes folder once resolved."""
        name = str(name).strip()
        if Path(name).name != name or name.startswith(".") or Path(name).suffix not in SUFFIXES:
            raise OutsideFolder(f"{name!r} is not a recipe name: use a file name ending in .yaml, without folders")
        return self.folder.inside(name)

    def read(self, name: str) -> str:
        try:
            return self.path_of(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TrainError(f"no recipe {name} in the recipes folder") from None

    def save(self, name: str, text: str) -> Path:
        path = self.path_of(name)
        self.folder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (text.rstrip("\n") + "\n").encode("utf-8"))  # the editor drops the last newline
        return path

    def unchanged(self, name: str, text: str) -> bool:
        """Whether recipe `name` is saved with exactly this text (the editor strips surrounding whitespace)."""
        path = self.path_of(name)
        return path.is_file() and path.read_text(encoding="utf-8").strip() == text.strip()

    def check(self, name: str, text: str) -> Check:
        """Validate `text` as recipe `name` would be, without saving it: the messages `lens-tune validate` gives."""
        from lens_tune.data.prepare import dataset_items
        from lens_tune.recipe.load import load_recipe
        from lens_tune.recipe.schema import Recipe

        target = self.path_of(name)
        try:
            self._check_extends(text, target.parent, set())
        except OutsideFolder as err:
            return Check(False, str(err))
        # a hidden file beside the target, so that relative paths and `extends` resolve as they will once saved
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".check.yaml")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            recipe = load_recipe(Path(temporary), Recipe)
            counts = [len(dataset_items(dataset)) for dataset in recipe.data.datasets]
        except LensTuneError as err:
            return Check(False, str(err).replace(temporary, name))
        finally:
            os.unlink(temporary)
        lines = [f"OK: {name}"]
        lines += [f"  {d.kind} dataset {d.folder or d.metadata or d.hub}: {n} image(s)"
                  for d, n in zip(recipe.data.datasets, counts)]
        return Check(True, "\n".join(lines))

    def _check_extends(self, text: str, base: Path, seen: set[Path]) -> None:
        """A recipe may only extend recipes in the recipes folder: the page must not read files elsewhere."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return  # the loader reports the syntax error with its position
        targets = data.get("extends") if isinstance(data, dict) else None
        for target in [targets] if isinstance(targets, str) else (targets if isinstance(targets, list) else []):
            path = (base / os.path.expanduser(str(target))).resolve()
            if not self.folder.contains(path):
                raise OutsideFolder(f"extends: {target} is outside the recipes folder ({self.folder.path}); the "
                                    "dashboard only reads recipes there")
            if path not in seen and path.is_file():
                seen.add(path)
                self._check_extends(path.read_text(encoding="utf-8", errors="replace"), path.parent, seen)


@dataclass
class Started:
    what: str
    process: subprocess.Popen
    log: Path


class Trainers:
    """The `lens-tune run` processes started from the page."""

    def __init__(self, runs: Folder, recipes: Recipes):
        self.runs, self.recipes = runs, recipes
        self.started: list[Started] = []

    def _spawn(self, what: str, arguments: list[str], cwd: Path) -> Started:
        logs = self.runs.path / LOG_FOLDER
        logs.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        log = logs / f"{stamp}-{what.replace('/', '_')}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "lens_tune", "run", *arguments], cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,  # survives the page and the app
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        threading.Thread(target=process.wait, daemon=True).start()  # reap it when it ends: no zombie pid
        started = Started(what, process, log)
        self.started.append(started)
        return started

    def start(self, name: str) -> Started:
        """Train recipe `name` into the runs folder (whatever its output.dir says)."""
        path = self.recipes.path_of(name)
        if not path.is_file():
            raise TrainError(f"no recipe {name} in the recipes folder; save it first")
        output_dir = f"output.dir={json.dumps(str(self.runs.path))}"  # a YAML string, whatever the path holds
        return self._spawn(path.stem, [str(path), output_dir], path.parent)

    def resume(self, run: Run) -> Started:
        if trainer_pid(run.path) is not None:
            raise TrainError(f"{run.id} is training now; stop it before resuming")
        if run.state == "finished":
            raise TrainError(f"{run.id} finished; there is nothing to resume")
        if not any(run.path.glob("checkpoints/step-*/checksums.json")):
            raise TrainError(f"{run.id} has no complete checkpoint yet, so it cannot be resumed; start its recipe "
                             "again")
        return self._spawn(run.id, [str(run.path / RECIPE_LOCK_FILE), "--resume", str(run.path)], run.path)

    def stop(self, run: Run) -> int:
        """SIGINT to the run's trainer (it checkpoints and stops); returns its pid."""
        pid = trainer_pid(run.path)
        if pid is None:
            raise TrainError(f"{run.id} is not training (no process holds its run.lock)")
        os.kill(pid, signal.SIGINT)
        return pid

    def output(self) -> str:
        """The last lines of the newest process started here, and how it ended."""
        if not self.started:
            return ""
        newest = self.started[-1]
        try:
            with open(newest.log, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]  # a progress bar: what a terminal shows
        code = newest.process.poll()
        state = f"running (pid {newest.process.pid})" if code is None else f"ended with exit status {code}"
        return "\n".join([f"{newest.what}: {state}; log {newest.log}", *lines[-TAIL_LINES:]])
