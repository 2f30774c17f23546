"""The run folder: exclusive creation, the process lock, events.jsonl, status.json, finding runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lens_tune.errors import LensTuneError
from lens_tune.train import run_folder as rf
from lens_tune.train.run_folder import (
    RunFolder, RunFolderError, find_runs, latest_run, lock_holder, read_events, read_status, trainer_pid,
)

REPO = Path(__file__).resolve().parent.parent


def strict_loads(line: str):
    """json.loads that refuses NaN/Infinity (which Python accepts but JSON does not)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


# -- creation ---------------------------------------------------------------------------------------------------------


def test_create_makes_timestamped_folder(tmp_path):
    run = RunFolder.create(tmp_path / "runs", "dog")
    assert run.path.parent == tmp_path / "runs" / "dog"
    assert rf._FOLDER_RE.match(run.path.name)
    assert run.events_path.is_file() and run.events_path.stat().st_size == 0
    assert run.name == "dog"
    assert run.status_path == run.path / "status.json"
    assert run.lock_path == run.path / "recipe.lock.yaml"
    assert run.checkpoints_dir == run.path / "checkpoints"
    assert run.adapter_dir == run.path / "adapter"
    assert run.samples_dir(12) == run.path / "samples" / "step-000012"


def test_two_creates_in_the_same_second_get_different_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(rf, "_timestamp", lambda: "20250102-030405")
    first = RunFolder.create(tmp_path, "dog")
    second = RunFolder.create(tmp_path, "dog")
    assert first.path.name == "20250102-030405"
    assert second.path.name == "20250102-030405-2"
    with ThreadPoolExecutor(8) as pool:
        more = list(pool.map(lambda _: RunFolder.create(tmp_path, "dog").path, range(16)))
    names = {first.path.name, second.path.name, *(p.name for p in more)}
    assert len(names) == 18


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_create_rejects_bad_names(tmp_path, name):
    with pytest.raises(RunFolderError):
        RunFolder.create(tmp_path, name)


def test_open_requires_a_run_folder(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        RunFolder.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="not a run folder"):
        RunFolder.open(tmp_path / "empty")
    run = RunFolder.create(tmp_path, "dog")
    assert RunFolder.open(run.path).path == run.path
    assert issubclass(RunFolderError, LensTuneError)


# -- the lock ---------------------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from lens_tune.train.run_folder import RunFolder
    RunFolder.open(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)

TRY_ACQUIRE = textwrap.dedent(
    """
    import sys
    from lens_tune.train.run_folder import RunFolder, RunFolderError
    try:
        RunFolder.open(sys.argv[1]).acquire()
    except RunFolderError as err:
        print("refused:", err)
    else:
        print("acquired")
    """
)


def _python(script: str, *args: str, **kwargs):
    return [sys.executable, "-c", script, *args]


def test_lock_blocks_other_processes_and_dies_with_its_holder(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    holder = subprocess.Popen(_python(HOLDER, str(run.path)), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.run_lock_path.read_text().strip() == str(holder.pid)

        # this process
        with pytest.raises(RunFolderError, match=f"in use by pid {holder.pid}") as info:
            run.acquire()
        assert "resume" in str(info.value) and str(run.path) in str(info.value)
        assert not run.locked

        # a third process
        other = subprocess.run(_python(TRY_ACQUIRE, str(run.path)), capture_output=True, text=True, cwd=REPO, timeout=60)
        assert other.stdout.startswith("refused:") and f"pid {holder.pid}" in other.stdout, other.stderr
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(timeout=30)
    assert holder.returncode == -9

    run.acquire()  # the kernel dropped the flock with the process
    try:
        assert run.locked
        assert run.run_lock_path.read_text().strip() == str(os.getpid())
    finally:
        run.release()
    other = subprocess.run(_python(TRY_ACQUIRE, str(run.path)), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert other.stdout.strip() == "acquired", other.stderr


def test_lock_holder_and_trainer_pid(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    assert lock_holder(run.path) is None and trainer_pid(run.path) is None  # never trained
    holder = subprocess.Popen(_python(HOLDER, str(run.path)), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(run.path) == holder.pid and trainer_pid(run.path) == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lock_holder(run.path) == holder.pid  # the pid stays written; the lock went with the process
    assert trainer_pid(run.path) is None
    with run:
        assert trainer_pid(run.path) == os.getpid()  # another handle in this very process counts too
    run.run_lock_path.write_text("garbage")
    assert lock_holder(run.path) is None and lock_holder(tmp_path / "nowhere") is None


def test_lock_in_process(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    with run:
        run.acquire()  # again: no-op
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            RunFolder.open(run.path).acquire()  # another handle on the same folder
    assert not run.locked
    with RunFolder.open(run.path) as again:
        assert again.locked


# -- events -----------------------------------------------------------------------------------------------------------


def test_log_event_appends_visible_lines(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    run.log_event("phase", name="training")
    run.log_event("step", step=1, loss=float("nan"), lr=float("inf"), grad=[1.5, float("-inf")], caption="chien été")
    run.log_event("step", step=2, loss=0.25, time=123.5)
    # readable before any close or sync: each line is written through at once
    raw = run.events_path.read_bytes()
    lines = raw.decode("utf-8").splitlines()
    assert raw.endswith(b"\n") and len(lines) == 3
    events = [strict_loads(line) for line in lines]
    assert events[0]["event"] == "phase" and events[0]["name"] == "training" and isinstance(events[0]["time"], float)
    assert events[1] == {"event": "step", "time": events[1]["time"], "step": 1, "loss": None, "lr": None, "grad": [1.5, None], "caption": "chien été"}
    assert "chien été" in raw.decode("utf-8")  # ensure_ascii=False
    assert events[2]["time"] == 123.5
    assert list(json.loads(lines[1])) [:2] == ["event", "time"]
    run.sync()
    run.close()
    run.log_event("step", step=3, loss=0.2)  # reopens
    assert len(run.events_path.read_text().splitlines()) == 4
    with pytest.raises(ValueError):
        run.log_event("step", event="x")


def test_read_events_incrementally_with_a_partial_line(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    assert read_events(run.path) == ([], 0)
    run.log_event("step", step=1, loss=0.5)
    run.log_event("step", step=2, loss=0.4)
    events, offset = read_events(run.events_path)
    assert [e["step"] for e in events] == [1, 2] and offset == run.events_path.stat().st_size

    with open(run.events_path, "ab") as handle:  # a corrupt line, then a line being written
        handle.write(b"not json\n[1, 2]\n")
        handle.write(b'{"event": "step", "time": 1.0, "st')
    events, offset2 = read_events(run.events_path, offset)
    assert events == [] and offset2 > offset
    assert read_events(run.events_path, offset2) == ([], offset2)  # the partial line is left for later
    with open(run.events_path, "ab") as handle:
        handle.write(b'ep": 3, "loss": 0.3}\n')
    events, offset3 = read_events(run.events_path, offset2)
    assert events == [{"event": "step", "time": 1.0, "step": 3, "loss": 0.3}]
    assert offset3 == run.events_path.stat().st_size
    # the whole file from the start: corrupt lines skipped
    assert [e["step"] for e in read_events(run.events_path)[0]] == [1, 2, 3]


def test_writer_after_a_crash_starts_a_new_line(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    run.log_event("step", step=1, loss=0.5)
    run.close()
    with open(run.events_path, "ab") as handle:
        handle.write(b'{"event": "step", "step": 2, "lo')  # the crashed process's last, unfinished line
    resumed = RunFolder.open(run.path)
    resumed.log_event("resume", step=1)
    events, _ = read_events(run.path)
    assert [e["event"] for e in events] == ["step", "resume"]


def test_read_events_restarts_when_the_file_was_rewritten(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    for step in range(1, 6):
        run.log_event("step", step=step, loss=1.0 / step)
    _, offset = read_events(run.path)
    run.truncate_events_after(2)
    assert read_events(run.path, offset) == ([], 0)  # shorter than the offset: the sign to start over
    assert [e["step"] for e in read_events(run.path, 0)[0]] == [1, 2]
    for step in range(3, 12):
        run.log_event("step", step=step, loss=1.0 / step)
    assert run.events_path.stat().st_size > offset
    assert read_events(run.path, 7) == ([], 0)  # an offset inside a line: the file is not the one read before


def test_truncate_events_after(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    run.log_event("phase", name="training")
    for step in range(1, 9):
        run.log_event("step", step=step, loss=0.1 * step)
        if step % 3 == 0:
            run.log_event("checkpoint", step=step)
            run.log_event("sample", step=step, paths=["a.png"])
    run.log_event("error", message="boom")
    with open(run.events_path, "ab") as handle:
        handle.write(b'{"event": "step", "ste')  # cut short by the crash
    before = run.events_path.read_text(errors="replace").splitlines()

    dropped = run.truncate_events_after(6)
    assert dropped == 3  # steps 7 and 8 and the fragment
    events, _ = read_events(run.path)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    non_step = [e for e in events if e["event"] != "step"]
    assert [e["event"] for e in non_step] == ["phase", "checkpoint", "sample", "checkpoint", "sample", "error"]
    # kept lines are byte-identical, in their original order
    kept = run.events_path.read_text().splitlines()
    assert kept == [line for line in before[:-1] if json.loads(line)["event"] != "step" or json.loads(line)["step"] <= 6]
    assert sorted(p.name for p in run.path.iterdir()) == ["events.jsonl"]  # no temporary file left

    run.log_event("resume", step=6)  # appends to the new file
    events, _ = read_events(run.path)
    assert events[-1]["event"] == "resume"


# -- status -----------------------------------------------------------------------------------------------------------


def test_set_status_is_atomic_and_complete(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    assert read_status(run.path) == {}
    run.set_status("running", step=10, total_steps=100, loss=float("nan"))
    status = read_status(run.path)
    assert status["state"] == "running" and status["step"] == 10 and status["total_steps"] == 100
    assert status["loss"] is None and status["pid"] == os.getpid() and isinstance(status["updated"], float)
    strict_loads(run.status_path.read_text())
    run.set_status("finished", step=100, total_steps=100)
    assert run.read_status()["state"] == "finished" and "loss" not in run.read_status()
    assert read_status(run.status_path)["step"] == 100
    assert sorted(p.name for p in run.path.iterdir()) == ["events.jsonl", "status.json"]
    with pytest.raises(ValueError):
        run.set_status("paused")
    run.status_path.write_text("{broken")
    with pytest.raises(RunFolderError):
        read_status(run.path)


# -- finding runs -----------------------------------------------------------------------------------------------------


def test_find_runs_newest_first(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    made = []
    for stamp, name in [("20250101-000000", "dog"), ("20250301-000000", "cat"), ("20250201-000000", "dog")]:
        monkeypatch.setattr(rf, "_timestamp", lambda stamp=stamp: stamp)
        made.append(RunFolder.create(runs, name).path)
    monkeypatch.setattr(rf, "_timestamp", lambda: "20250201-000000")
    same_second = [RunFolder.create(runs, "dog").path for _ in range(10)]  # -2 ... -11
    (runs / "dog" / "20250401-000000").mkdir()  # not a run folder: no marker files
    (runs / "dog" / "notes").mkdir()

    dogs = find_runs(runs, "dog")
    assert dogs[0] == same_second[-1] and dogs[0].name == "20250201-000000-11"
    assert dogs == [*reversed(same_second), made[2], made[0]]
    assert find_runs(runs)[0] == made[1]
    assert latest_run(runs, "dog") == same_second[-1]
    assert latest_run(runs, "cat") == made[1]
    assert latest_run(runs, "bird") is None and find_runs(tmp_path / "none") == []
