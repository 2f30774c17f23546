"""The dashboard's parts without a server: path checks, incremental reading, run states, preview limits, recipes,
who may reach the server, and the `lens-tune ui` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lens_tune.recipe.load import load_recipe
from lens_tune.recipe.schema import Recipe
from lens_tune.train.run_folder import RunFolder
from lens_tune_ui.launch import ExposureError, check_exposure, is_loopback, parse_auth
from lens_tune_ui.paths import Folder, OutsideFolder
from lens_tune_ui.preview import PreviewError, PreviewModel, PreviewRequest
from lens_tune_ui.runs import MAX_POINTS, Run, RunEvents, RunNotFound, RunsIndex, _picks, format_duration, loss_frame
from lens_tune_ui.train import Recipes
from tests.ui_support import REPO, quickstart_text

# -- paths --------------------------------------------------------------------------------------------------------


def test_folder_keeps_every_path_inside(tmp_path):
    root = tmp_path / "runs"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "file").write_text("secret")
    (root / "out-dir").symlink_to(tmp_path / "outside")
    (root / "out-file").symlink_to(tmp_path / "outside" / "file")
    (root / "in-link").symlink_to(root / "a")
    folder = Folder(root, "runs folder")

    assert folder.inside("a/b") == (root / "a" / "b").resolve()
    assert folder.inside("a/../a/b") == (root / "a" / "b").resolve()
    assert folder.inside("in-link/b") == (root / "a" / "b").resolve()  # a symlink that stays inside is fine
    assert folder.relative(root / "a" / "b") == "a/b"
    for bad in ["..", "../outside", "a/../../outside/file", "out-dir", "out-dir/file", "out-file", "a/b/../../../x"]:
        with pytest.raises(OutsideFolder, match="leads outside the runs folder"):
            folder.inside(bad)
    for bad in ["/etc/passwd", str(root / "a"), "~/x", "", "a\0b"]:
        with pytest.raises(OutsideFolder):
            folder.inside(bad)
    assert not folder.contains(root / "out-dir") and folder.contains(root / "in-link")


# -- incremental reading ------------------------------------------------------------------------------------------


def log_steps(run: RunFolder, first: int, last: int, start_time: float = 1000.0, seconds: float = 2.0) -> None:
    for step in range(first, last + 1):
        run.log_event("step", step=step, loss=1.0 / step, lr=1e-4 * step, grad_norm=0.1, step_time=0.5,
                      peak_memory_gib=None, time=start_time + seconds * step)


def test_events_are_parsed_once_and_only_the_appended_bytes(tmp_path, monkeypatch):
    from lens_tune_ui import runs as runs_module

    run = RunFolder.create(tmp_path, "dog")
    log_steps(run, 1, 50)
    offsets = []
    real = runs_module.read_events
    monkeypatch.setattr(runs_module, "read_events", lambda path, offset=0: offsets.append(offset) or real(path, offset))
    events = RunEvents(run.events_path)
    assert events.update() == 50 and events.step == list(range(1, 51))
    size = run.events_path.stat().st_size
    assert events.offset == size and offsets == [0]

    assert events.update() == 0 and offsets == [0, size]  # nothing new: nothing parsed
    run.log_event("sample", step=50, images=["samples/step-000050/p00-seed0.png"])
    log_steps(run, 51, 53)
    with open(run.events_path, "ab") as handle:
        handle.write(b'{"event": "step", "step": 54, "lo')  # a line being written
    assert events.update() == 4 and offsets[-1] == size  # read from where the last refresh stopped
    assert events.step[-1] == 53 and events.samples == {50: ["samples/step-000050/p00-seed0.png"]}
    with open(run.events_path, "ab") as handle:
        handle.write(b'ss": 0.5, "time": 2000}\n')
    assert events.update() == 1 and events.step[-1] == 54 and events.loss[-1] == 0.5


def test_a_replaced_or_truncated_file_is_read_again(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    log_steps(run, 1, 20)
    events = RunEvents(run.events_path)
    events.update()
    run.truncate_events_after(10)  # resume: a new file with the steps up to the checkpoint
    run.log_event("resume", step=10)
    log_steps(run, 11, 12)
    assert events.update() == 13 and events.step == list(range(1, 13))
    assert [e["event"] for e in events.log] == ["resume"]

    with open(run.events_path, "r+b") as handle:  # truncated in place (by hand): shorter than the offset
        handle.truncate(0)
    run.close()
    log_steps(run, 1, 3)
    assert events.update() == 3 and events.step == [1, 2, 3]
    os.unlink(run.events_path)  # rotated away
    assert events.update() == 0 and events.step == []


def test_smoothing_downsampling_and_eta(tmp_path):
    run = RunFolder.create(tmp_path, "dog")
    run.set_status("running", step=0, total_steps=100)
    log_steps(run, 1, 40)  # a step every 2 s
    run.log_event("step", step=41, loss=None, lr=1e-4, time=1082.0)  # a non-finite loss is written as null
    run.acquire()  # this process trains it
    try:
        view = Run(run.path, "dog/x")
        view.update()
        assert view.state == "running" and view.step == 41 and view.total_steps == 100
        assert view.eta_seconds() == pytest.approx(59 * 2.0)
        assert format_duration(view.eta_seconds()) == "1m 58s"
        assert view.last_loss() == pytest.approx(1 / 40)
        frame = loss_frame(view)
        assert len(frame[frame.series == "loss"]) == 40 and len(frame[frame.series == "smoothed"]) == 40
        smoothed = frame[frame.series == "smoothed"]["value"].tolist()
        ema = 0.0
        for n in range(1, 41):
            ema = 0.9 * ema + 0.1 * (1.0 / n)
        assert smoothed[-1] == pytest.approx(ema / (1 - 0.9**40))
    finally:
        run.release()

    assert _picks(10) == list(range(10))
    picks = _picks(100_000)
    assert len(picks) <= MAX_POINTS + 1 and picks[0] == 0 and picks[-1] == 99_999
    assert format_duration(7300) == "2h 01m" and format_duration(None) == ""


def test_run_states(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def state(status: str | None, pid: int | None) -> str:
        run = RunFolder.create(tmp_path, "dog")
        if status:
            run.set_status(status, step=1, total_steps=2)
        if pid is not None:
            run.run_lock_path.write_text(f"{pid}\n")
        view = Run(run.path, "dog/x")
        view.update()
        return view.state

    assert state("running", os.getpid()) == "running"
    assert state("running", dead_pid) == "interrupted"  # killed without a word: resumable from its checkpoint
    assert state(None, os.getpid()) == "running"  # before its first status (loading the model)
    assert state(None, dead_pid) == "failed"
    for final in ("finished", "failed", "interrupted"):
        assert state(final, dead_pid) == final


def test_runs_index_lists_runs_and_refuses_others(tmp_path):
    runs = tmp_path / "runs"
    first = RunFolder.create(runs, "dog")
    (runs / "dog" / "notes").mkdir()
    (tmp_path / "elsewhere" / "20200101-000000").mkdir(parents=True)
    (tmp_path / "elsewhere" / "20200101-000000" / "events.jsonl").write_text("")
    (runs / "cat").symlink_to(tmp_path / "elsewhere")
    index = RunsIndex(Folder(runs, "runs folder"))
    assert [run.id for run in index.refresh()] == [f"dog/{first.path.name}"]
    assert index.table()["run"].tolist() == [f"dog/{first.path.name}"]
    assert index.get(f"dog/{first.path.name}").path == first.path.resolve()
    for not_a_run in ("dog/notes", "dog", "."):
        with pytest.raises(RunNotFound, match="not a run folder"):
            index.get(not_a_run)
    with pytest.raises(OutsideFolder):
        index.get("cat/20200101-000000")


# -- preview ------------------------------------------------------------------------------------------------------


def test_preview_request_limits():
    PreviewRequest("a cat", width=1024, height=64, steps=200, seeds=8, guidance=0, scale=-1).check()
    with pytest.raises(PreviewError) as info:
        PreviewRequest(" ", width=1000, height=0, steps=0, seeds=9, guidance=-1, scale=9).check()
    message = str(info.value)
    for part in ("type a prompt", "width 1000 must be a multiple of 16", "height 0 must be", "steps 0 must be",
                 "number of seeds 9 must be", "guidance -1 must be", "adapter scale 9 must be"):
        assert part in message
    with pytest.raises(PreviewError, match="steps 10000"):
        PreviewRequest("a cat", steps=10_000).check()
    with pytest.raises(PreviewError, match="steps 2.5"):
        PreviewRequest("a cat", steps=2.5).check()


def test_preview_model_is_released_when_memory_is_short(monkeypatch):
    from lens_tune_ui import preview as preview_module

    model = PreviewModel()
    model.pipe = SimpleNamespace(transformer=SimpleNamespace(device=torch.device("cpu")))
    monkeypatch.setattr(preview_module, "free_memory", lambda device: (50, 100))
    assert not model.release_if_memory_short() and model.pipe is not None
    monkeypatch.setattr(preview_module, "free_memory", lambda device: (5, 100))
    assert model.release_if_memory_short() and model.pipe is None


def test_preview_refuses_to_load_without_memory(monkeypatch, tmp_path):
    from lens_tune_ui import preview as preview_module

    model_dir = tmp_path / "Lens"
    (model_dir / "transformer").mkdir(parents=True)
    (model_dir / "model_index.json").write_text("{}")
    with open(model_dir / "transformer" / "weights.safetensors", "wb") as weights:
        weights.truncate(2**30)  # 1 GiB on paper (sparse)
    monkeypatch.setattr(preview_module, "free_memory", lambda device: (2**29, 2**34))
    model = PreviewModel()
    with pytest.raises(PreviewError, match=r"not enough memory to load .*Lens: it needs about 1.2 GiB, 0.5 GiB are"):
        model.render(preview_module.BaseModel(str(model_dir)), tmp_path, PreviewRequest("a cat"))
    assert model.pipe is None
    with pytest.raises(PreviewError, match="not on this machine"):
        model.render(preview_module.BaseModel("nobody/no-such-lens"), tmp_path, PreviewRequest("a cat"))


# -- recipes ------------------------------------------------------------------------------------------------------


def test_recipes_list_read_save_check(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "a.yaml").write_text(quickstart_text())
    (folder / "b.yml").write_text("x: 1\n")
    (folder / ".hidden.yaml").write_text("x: 1\n")
    (folder / "notes.txt").write_text("x")
    (folder / "base.yaml").write_text("model: {source: tiny}\n")
    recipes = Recipes(Folder(folder, "recipes folder"))
    assert recipes.names() == ["a.yaml", "b.yml", "base.yaml"]
    assert recipes.read("a.yaml") == quickstart_text()
    check = recipes.check("a.yaml", quickstart_text())
    dataset = load_recipe(folder / "a.yaml", Recipe).data.datasets[0].folder
    count = len([p for p in dataset.iterdir() if p.suffix in (".png", ".jpg", ".jpeg", ".webp")])
    assert check.ok and check.message.splitlines() == ["OK: a.yaml", f"  subject dataset {dataset}: {count} image(s)"]
    # `extends` resolves next to the recipe, as it will once the recipe is saved
    assert recipes.check("child.yaml", "extends: a.yaml\nlora: {rank: 4}\n").ok
    assert sorted(p.name for p in folder.iterdir()) == [".hidden.yaml", "a.yaml", "b.yml", "base.yaml", "notes.txt"]
    broken = recipes.check("new.yaml", "model: {source: tiny}\ntrain: {steps: -1}\n")
    assert not broken.ok and "new.yaml:2:16: train.steps" in broken.message and str(folder) not in broken.message
    assert not recipes.check("c.yaml", "extends: ../outside.yaml\n").ok
    recipes.save("new.yaml", "model: {source: tiny}\n")
    assert (folder / "new.yaml").read_text() == "model: {source: tiny}\n"
    for bad in ["../x.yaml", "sub/x.yaml", "x.txt", ".x.yaml", "/tmp/x.yaml"]:
        with pytest.raises(OutsideFolder):
            recipes.save(bad, "")


# -- serving ------------------------------------------------------------------------------------------------------


def test_who_may_reach_the_server():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_exposure("127.0.0.1", False, None)
    check_exposure("0.0.0.0", True, ("u", "p"))
    with pytest.raises(ExposureError, match="--share makes the dashboard reachable from the internet"):
        check_exposure("127.0.0.1", True, None)
    with pytest.raises(ExposureError, match="--host 0.0.0.0 makes the dashboard reachable from other machines"):
        check_exposure("0.0.0.0", False, None)
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss") and parse_auth(None) is None
    for bad in ("ann", ":x", "ann:"):
        with pytest.raises(ExposureError, match="USER:PASS"):
            parse_auth(bad)


def test_the_ui_command(capsys, tmp_path):
    from lens_tune.cli import main

    assert main(["ui", "--share", "--runs", str(tmp_path)]) == 2
    assert "add --auth USER:PASS" in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0", "--runs", str(tmp_path)]) == 2
    assert "reachable from other machines" in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert "USER:PASS" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "lens_tune", "ui", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "--runs" in out.stdout and "--auth USER:PASS" in out.stdout
    # other commands never import gradio
    probe = "import sys; from lens_tune.cli import build_parser; build_parser(); print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120).stdout.strip() == "False"


def test_installed_as_lens_tune_ui_from_any_folder(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import lens_tune_ui; print(lens_tune_ui.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "ui" / "__init__.py"
