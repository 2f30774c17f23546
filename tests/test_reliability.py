"""Fault injection on real processes with the tiny model: kills, signals, NaNs, corrupt files, two processes.

Nothing here is mocked: runs are real `lens-tune run` processes, signals are real signals (sent from this test or,
for exact moments such as the middle of a checkpoint write, by the process to itself through LENS_TUNE_FAULT, see
lens_tune/faults.py), files are real files. Full disks are in test_reliability_disk.py.

LENS_TUNE_SOAK=1 raises the number of random kills from 12 to 100, and sends both signals in every phase.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lens_tune.data.cache import FeatureCache
from lens_tune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from lens_tune.train.run_folder import read_events, read_status
from tests.test_train import BASE, adapter_tensors, run_cli, step_losses, write_recipe

SOAK = bool(os.environ.get("LENS_TUNE_SOAK"))
KILLS = 100 if SOAK else 12


def signal_cases(phases: dict[str, str]) -> list:
    """(phase, signal) cases, named by `phases` (name -> fault point): every phase with SIGINT or SIGTERM in turn, so
    each phase and each signal is sent (both go through one handler, lens_tune.train.loop.StopRequest); every pair
    under LENS_TUNE_SOAK=1."""
    pairs = [(n, s) for n in phases for s in ("sigint", "sigterm")] if SOAK else [
        (n, ("sigint", "sigterm")[i % 2]) for i, n in enumerate(phases)]
    return [pytest.param(phases[n], s, id=f"{n}-{s}") for n, s in pairs]


ARTIFACTS = Path(__file__).parent / "artifacts"

LONG = BASE + """
lora: {rank: 4}
train: {steps: 60, gradient_accumulation: 2, optimizer: adamw8bit, learning_rate: 1.0e-3}
checkpoint: {every: 2, keep_last: 2}
"""


def runs_of(folder: Path) -> list[Path]:
    parent = folder / "runs" / "test"
    return sorted(parent.iterdir()) if parent.exists() else []


def record(name: str, **numbers) -> None:
    """Numbers for docs/RELIABILITY.md, written as test artifacts."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "reliability.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = numbers
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def wait_for(predicate, timeout: float = 300, every: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def assert_nothing_half_written(folder: Path) -> None:
    """What readers can find is complete: every listed checkpoint verifies, the newest loads, every cache entry
    matches its hash."""
    for run in runs_of(folder):
        for checkpoint in list_checkpoints(run / "checkpoints"):
            verify_checkpoint(checkpoint)
        newest = latest_checkpoint(run / "checkpoints")
        if newest is not None:
            load_checkpoint(newest)
    for index in {p.parent for p in (folder / "cache").rglob("shard-*.json")}:
        cache = FeatureCache(index)
        assert cache.drop_corrupt(cache.keys()) == []


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted-long")
    out = run_cli(write_recipe(folder, LONG))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = runs_of(folder)
    return step_losses(run), adapter_tensors(run)


def test_random_sigkills_lose_nothing(tmp_path, uninterrupted_long):
    """KILLS SIGKILLs at random moments (caching, loading, training, checkpoint and shard writes included); after
    each, everything a reader can find is complete; resuming each time ends with the uninterrupted run's adapter."""
    path = write_recipe(tmp_path, LONG)
    rng = random.Random(1234)
    kills, moments = 0, {}
    finished = None
    while finished is None:
        resumable = any(latest_checkpoint(r / "checkpoints") for r in runs_of(tmp_path))
        args = ("--resume",) if resumable else ()
        # the first kills hit the caching (its points only fire while there is something to cache), then at random
        first = ["shard-write", "caching"]
        if kills < len(first) and not runs_of(tmp_path):
            moment = first[kills]
        else:
            moment = rng.choice(["delay", "delay", "training", "checkpoint-write"]) if kills < KILLS else "none"
        env = {}
        if moment in ("checkpoint-write", "shard-write", "caching"):
            env["LENS_TUNE_FAULT"] = f"sigkill@{moment}={rng.randint(1, 3) if moment == 'checkpoint-write' else 1}"
        process = run_cli(path, *args, env_extra=env, wait=False)
        if moment == "delay":
            time.sleep(rng.uniform(0.2, 4.0))
        elif moment == "training":  # a little after the run made progress
            before = max((max(step_losses(r), default=0) for r in runs_of(tmp_path)), default=0)
            wait_for(lambda: process.poll() is not None or any(max(step_losses(r), default=0) > before for r in runs_of(tmp_path)))
            time.sleep(rng.uniform(0.0, 0.3))
        if moment in ("delay", "training") and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
        if process.returncode == 0:
            finished = output
        else:
            assert process.returncode == -signal.SIGKILL, output[-3000:]
            kills += 1
            moments[moment] = moments.get(moment, 0) + 1
            assert_nothing_half_written(tmp_path)

    assert kills >= KILLS
    finished_runs = [r for r in runs_of(tmp_path) if read_status(r).get("state") == "finished"]
    assert len(finished_runs) == 1
    losses, adapter = uninterrupted_long
    assert step_losses(finished_runs[0]) == losses
    resumed = adapter_tensors(finished_runs[0])
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    record("sigkill", kills=kills, moments=moments, runs_started=len(runs_of(tmp_path)), lost_steps=0)


# ---------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM in every phase
# ---------------------------------------------------------------------------------------------------------------
SIGNALS = BASE.replace(
    'class_prompt: "a photo of a toy robot"}',
    'class_prompt: "a photo of a toy robot", prior_preservation: true, num_class_images: 3, class_image_steps: 2}',
).replace(
    'validation: {prompts: ["a photo of [trigger] toy robot"], before_training: false, every: 100000, steps: 4}',
    'validation: {prompts: ["a photo of [trigger] toy robot", "a toy robot"], before_training: false, every: 2, steps: 2}',
) + """
lora: {rank: 4}
train: {steps: 6, optimizer: adamw}
checkpoint: {every: 100}
"""
assert "prior_preservation: true" in SIGNALS and "every: 2, steps: 2" in SIGNALS


@pytest.mark.parametrize("phase, sig", signal_cases({"caching": "caching", "class-images": "class-images"}))
def test_signal_while_preparing_data_keeps_what_was_done(tmp_path, phase, sig):
    path = write_recipe(tmp_path, SIGNALS)
    out = run_cli(path, env_extra={"LENS_TUNE_FAULT": f"{sig}@{phase}=2"})
    assert out.returncode == 130, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"run again to continue:\n  lens-tune run {path}" in out.stderr
    assert runs_of(tmp_path) == []  # no run folder before the data is ready
    if phase == "class-images":
        kept = sorted((tmp_path / "cache" / "class_images").rglob("*.png"))
        assert len(kept) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    else:
        (index,) = {p.parent for p in (tmp_path / "cache").rglob("shard-*.json")}
        assert len(FeatureCache(index)) >= 2
    again = run_cli(path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    if phase == "caching":
        assert "reused" in again.stdout


@pytest.mark.parametrize("phase, sig", signal_cases({"training": "micro=3", "sampling": "sampling=1"}))
def test_signal_while_training_or_sampling_checkpoints_and_resumes(tmp_path, phase, sig):
    path = write_recipe(tmp_path, SIGNALS)
    out = run_cli(path, env_extra={"LENS_TUNE_FAULT": f"{sig}@{phase}"})
    assert out.returncode == 130, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = runs_of(tmp_path)
    status = read_status(run)
    assert status["state"] == "interrupted" and f"--resume {run}" in out.stdout
    step = status["step"]
    assert step == (3 if phase.startswith("micro") else 2)
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == step
    if phase.startswith("sampling"):  # the samples of that step were finished first
        assert len(list(run.glob(f"samples/step-{step:06d}/p*.png"))) == 2
        assert (run / f"samples/step-{step:06d}/grid.png").is_file()
    again = run_cli(path, "--resume", str(run))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(step_losses(run)) == list(range(1, 7))


# ---------------------------------------------------------------------------------------------------------------
# Numerical faults
# ---------------------------------------------------------------------------------------------------------------
NAN = BASE + """
lora: {rank: 4}
train: {steps: 6, optimizer: adamw, max_nonfinite_steps: 3}
checkpoint: {every: 2}
"""


def test_nan_loss_and_gradients_are_skipped(tmp_path):
    path = write_recipe(tmp_path, NAN)
    out = run_cli(path, env_extra={"LENS_TUNE_FAULT": "nan@loss=2,nan@grad=4"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = runs_of(tmp_path)
    events, _ = read_events(run / "events.jsonl")
    skipped = [(e["what"], e["step"]) for e in events if e["event"] == "nonfinite"]
    assert skipped == [("loss", 1), ("gradients", 2)]  # attempts 2 and 4 were steps 1 and 2 (one skipped before)
    assert sorted(step_losses(run)) == list(range(1, 7))
    assert all(torch.isfinite(t).all() for t in adapter_tensors(run).values())


def test_consecutive_nan_gradients_stop_the_run_keeping_its_checkpoints(tmp_path):
    path = write_recipe(tmp_path, NAN)
    out = run_cli(path, env_extra={"LENS_TUNE_FAULT": "nan@grad=3,nan@grad=4,nan@grad=5"})
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 consecutive steps had a non-finite loss or gradients" in out.stderr and "Traceback" not in out.stderr
    (run,) = runs_of(tmp_path)
    assert read_status(run)["state"] == "failed"
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 2
    assert f"--resume {run}" in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------------------------------------------
def flip_byte(path: Path, from_end: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    path = write_recipe(folder, NAN)
    out = run_cli(path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = runs_of(folder)
    return path, run


def test_damaged_newest_checkpoint_is_skipped_and_resume_is_still_exact(tmp_path, finished_run):
    import shutil

    _, reference = finished_run
    path = write_recipe(tmp_path, NAN)
    out = run_cli(path, env_extra={"LENS_TUNE_FAULT": "sigint@micro=5"})
    assert out.returncode == 130
    (run,) = runs_of(tmp_path)
    newest = latest_checkpoint(run / "checkpoints")
    assert newest.name == "step-000005"
    flip_byte(newest / "optimizer.safetensors")
    with pytest.raises(Exception, match="step-000005 is damaged: optimizer.safetensors does not match its checksum"):
        load_checkpoint(newest)
    out = run_cli(path, "--resume", str(run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "skipping checkpoint: checkpoint step-000005 is damaged" in out.stderr
    assert "resumed from" in out.stdout and "step-000004" in out.stdout
    ours, theirs = adapter_tensors(run), adapter_tensors(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    shutil.rmtree(run)


@pytest.mark.parametrize("damage", ["bit-flip", "truncated"])
def test_damaged_adapter_files_are_refused_by_name(tmp_path, finished_run, damage):
    import shutil

    from lens_tune.cli import main
    from lens_tune.model.pipeline import LensPipeline
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.train.adapters import load_adapter

    _, run = finished_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    files = [adapter / "adapter_model.safetensors", export / "pytorch_lora_weights.safetensors",
             export / "lens_comfyui.safetensors"]
    for file in files:
        if damage == "bit-flip":
            flip_byte(file)
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expected = "is damaged: its tensors do not match" if damage == "bit-flip" else "not a readable safetensors|could not be read"
    pipe = LensPipeline.from_pretrained(tiny_pipeline_dir())
    with pytest.raises(Exception, match=expected):
        load_adapter(pipe.transformer, adapter)
    for file in files[1:]:
        with pytest.raises(Exception, match=expected):
            pipe.load_lora_weights(file)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing half-loaded


# ---------------------------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------------------------
def test_two_runs_with_one_output_folder_get_separate_folders(tmp_path):
    path = write_recipe(tmp_path, NAN)
    first, second = run_cli(path, wait=False), run_cli(path, wait=False)
    for process in (first, second):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    runs = runs_of(tmp_path)
    assert len(runs) == 2
    for run in runs:  # each folder has exactly one run's events, in order
        events, _ = read_events(run / "events.jsonl")
        assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 7))
        assert sum(e["event"] == "phase" and e["name"] == "training" for e in events) == 1
    assert read_status(runs[0])["pid"] != read_status(runs[1])["pid"]


def test_resuming_a_run_that_is_still_training_is_refused(tmp_path):
    body = NAN.replace("steps: 6", "steps: 400")
    path = write_recipe(tmp_path, body)
    first = run_cli(path, env_extra={"LENS_TUNE_FAULT": "sigint@micro=3"})
    assert first.returncode == 130
    (run,) = runs_of(tmp_path)
    training = run_cli(path, "--resume", str(run), wait=False)
    assert wait_for(lambda: max(step_losses(run), default=0) > 4)
    second = run_cli(path, "--resume", str(run))
    training.send_signal(signal.SIGINT)
    training.communicate(timeout=600)
    assert second.returncode == 2
    assert f"run folder {run} is in use by pid {training.pid}" in second.stderr


def test_missing_output_folder_is_created_and_read_only_one_is_refused_before_caching(tmp_path):
    path = write_recipe(tmp_path, NAN)
    out = run_cli(path, "output.dir=deep/er/runs", "train.steps=1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(list((tmp_path / "deep/er/runs/test").iterdir())) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = run_cli(path, f"output.dir={blocker}/runs", "cache.dir=fresh-cache")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"output.dir {blocker}/runs cannot be written" in out.stderr
    assert not (tmp_path / "fresh-cache").exists()  # refused before any work


# ---------------------------------------------------------------------------------------------------------------
# Two processes: a worker dies
# ---------------------------------------------------------------------------------------------------------------
def worker_pids(recipe: Path) -> dict[int, int]:
    """rank -> pid of the training processes of `recipe` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if str(recipe).encode() in cmdline and b"RANK" in environ and b"lens_tune" in b" ".join(cmdline):
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def test_a_killed_worker_stops_the_run_and_two_processes_resume_it(tmp_path):
    body = NAN.replace("steps: 6", "steps: 300")
    path = write_recipe(tmp_path, body)
    process = run_cli(path, "--num-processes", "2", wait=False)
    assert wait_for(lambda: bool(runs_of(tmp_path)) and latest_checkpoint(runs_of(tmp_path)[0] / "checkpoints") is not None,
                    timeout=400)
    (run,) = runs_of(tmp_path)
    assert wait_for(lambda: len(worker_pids(path)) == 2, timeout=60)
    events, _ = read_events(run / "events.jsonl")
    saved_before = max(e["step"] for e in events if e["event"] == "checkpoint")
    os.kill(worker_pids(path)[1], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)  # no hang: the survivor stops too
    assert process.returncode != 0
    assert read_status(run)["state"] in ("failed", "interrupted")
    newest = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert newest.step >= saved_before
    assert f"--resume {run}" in output
    assert "another training process of this run stopped" in output, output[-5000:]

    out = run_cli(path, "--num-processes", "2", "--resume", str(run), "train.steps=" + str(newest.step + 4))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(step_losses(run)) == list(range(1, newest.step + 5))
    record("distributed", killed_rank=1, checkpoint_step=newest.step, saved_before_kill=saved_before)
