"""Full and read-only disks, on real small filesystems (tmpfs mounts made by the test; needs root, as in CI).

A filler file leaves just the space the test wants, so the write under test really meets ENOSPC. Each case checks
the error names what could not be written and the space it needed, and that the files written before are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lens_tune.files import DiskFullError
from lens_tune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from lens_tune.train.run_folder import read_status
from tests.test_reliability import NAN, runs_of
from tests.test_train import run_cli, write_recipe


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (CI runs as root)"
    probe = Path(f"/tmp/lens-tune-mount-probe-{uuid.uuid4().hex[:6]}")
    probe.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if done.returncode:
            return f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


SKIP = _can_mount()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"full-disk tests skipped: {SKIP}")


@contextmanager
def small_fs(where: Path, size: str = "4m", options: str = ""):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(fs: Path, leave: int) -> None:
    """Leave only `leave` bytes free on the filesystem of `fs`."""
    free = shutil.disk_usage(fs).free
    with open(fs / f".filler-{uuid.uuid4().hex[:6]}", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".filler")}


def test_full_disk_at_a_checkpoint_keeps_the_earlier_one_and_resumes(tmp_path):
    path = write_recipe(tmp_path, NAN.replace("checkpoint: {every: 2}", "checkpoint: {every: 2, keep_last: 1}"))
    # measure one checkpoint on a normal disk, then give the runs folder room for the first checkpoint only
    reference = run_cli(path, "output.dir=reference", "train.steps=2")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "reference").rglob("step-000002/**/*") if f.is_file())
    with small_fs(tmp_path / "small") as fs:
        fill(fs, leave=int(checkpoint_bytes * 1.6) + 64 * 1024)
        out = run_cli(path, f"output.dir={fs}/runs")
        assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert "no space left on the device to write checkpoint step-000004" in out.stderr
        assert "needed" in out.stderr and "free" in out.stderr
        (run,) = sorted((fs / "runs" / "test").iterdir())
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
        assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 2
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # nothing left behind
        assert read_status(run)["state"] == "failed" and "no space left" in read_status(run)["error"]
        assert f"--resume {run}" in out.stderr
        for filler in fs.glob(".filler-*"):  # the user frees space, then resumes
            filler.unlink()
        again = run_cli(path, "--resume", str(run))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert read_status(run)["state"] == "finished"


def test_full_disk_while_caching_keeps_the_earlier_shards(tmp_path):
    path = write_recipe(tmp_path, NAN)
    with small_fs(tmp_path / "cache-fs") as fs:
        first = run_cli(path, f"cache.dir={fs}", "train.steps=1")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        before = digests(fs)
        shutil.copy(tmp_path / "images" / "robot_01.png", tmp_path / "images" / "robot_02.png")
        from PIL import Image

        Image.open(tmp_path / "images" / "robot_02.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            tmp_path / "images" / "robot_02.png")
        (tmp_path / "images" / "robot_02.txt").write_text("a photo of [trigger] toy robot, mirrored, in a new caption")
        fill(fs, leave=2048)
        out = run_cli(path, f"cache.dir={fs}", "train.steps=1")
        assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
        assert "no space left on the device to write a cache shard" in out.stderr and "Traceback" not in out.stderr
        after = digests(fs)
        assert {k: after[k] for k in before} == before  # every earlier file is unchanged
        assert runs_of(tmp_path) and len(runs_of(tmp_path)) == 1  # the failed attempt made no run folder


def test_full_disk_while_writing_samples_and_exports(tmp_path):
    from lens_tune.data.cache import FeatureCache
    from lens_tune.data.prepare import prepare_training_data
    from lens_tune.export.export import export_adapter
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe
    from lens_tune.train.samples import ValidationSampler

    path = write_recipe(tmp_path, NAN)
    out = run_cli(path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = runs_of(tmp_path)
    with small_fs(tmp_path / "out-fs") as fs:
        # samples: the first step's images fit, the next step's do not
        recipe = load_recipe(path, Recipe, [f"cache.dir={tmp_path / 'cache'}"])
        prepared = prepare_training_data(recipe, device=torch.device("cpu"), log=lambda *_: None)
        sampler = ValidationSampler(recipe, prepared.prompt_keys, FeatureCache(prepared.cache_dir),
                                    tiny_pipeline_dir(), torch.device("cpu"))
        transformer = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
        first = sampler.render(transformer, fs / "samples" / "step-000001")
        kept = digests(fs)
        fill(fs, leave=1024)
        with pytest.raises(DiskFullError, match="no space left on the device to write a validation sample"):
            sampler.render(transformer, fs / "samples" / "step-000002")
        assert digests(fs) == kept and first
        # exports: an earlier export in the same folder stays whole
        for filler in fs.glob(".filler-*"):
            filler.unlink()
        export_adapter(run, None, fs / "export", log=lambda *_: None)
        kept = digests(fs / "export")
        fill(fs, leave=1024)
        with pytest.raises(DiskFullError, match=r"no space left on the device to write .*safetensors.*needed"):
            export_adapter(run, None, fs / "export", log=lambda *_: None)
        assert digests(fs / "export") == kept


def test_read_only_output_folder_is_refused_before_any_work(tmp_path):
    path = write_recipe(tmp_path, NAN)
    with small_fs(tmp_path / "ro", options=",ro") as fs:
        out = run_cli(path, f"output.dir={fs}/runs", "cache.dir=fresh-cache")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"output.dir {fs}/runs cannot be written (Read-only file system)" in out.stderr
        assert not (tmp_path / "fresh-cache").exists()


def test_runs_folder_on_another_filesystem(tmp_path):
    """Runs on a tmpfs, caches on the normal disk: training, interruption and resume work across them."""
    path = write_recipe(tmp_path, NAN)
    with small_fs(tmp_path / "runs-fs", size="64m") as fs:
        out = run_cli(path, f"output.dir={fs}", env_extra={"LENS_TUNE_FAULT": "sigint@micro=3"})
        assert out.returncode == 130, out.stdout[-3000:] + out.stderr[-3000:]
        (run,) = sorted((fs / "test").iterdir())
        again = run_cli(path, "--resume", str(run))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert read_status(run)["state"] == "finished" and (run / "adapter" / "adapter_model.safetensors").is_file()
