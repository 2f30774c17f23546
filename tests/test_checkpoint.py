"""Checkpoints: exact pickle-free state round trips, atomic saves, pruning, damage detection and crash safety."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lens_tune.errors import LensTuneError
from lens_tune.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
    verify_checkpoint,
)


def assert_identical(a, b, where="state"):
    """Same types all the way down, same values, tensors bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.requires_grad == b.requires_grad, where
        assert a.detach().reshape(-1).view(torch.uint8).tolist() == b.detach().reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert type(key) is type(next(k for k in b if k == key)), f"{where}: key {key!r}"
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, where


def round_trip(obj):
    tensors, skeleton = flatten_state(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # strictly JSON-able
    return unflatten_state(tensors, skeleton)


def trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=20)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def every_type():
    shared = torch.arange(6, dtype=torch.float32)
    return {
        "str": "chien été",
        0: None,
        -3: [True, False, 0, 1, -(2**70), 2**64],
        "floats": (0.1, -0.0, 1e-310, 1.0, float("nan"), float("inf"), float("-inf"), -float("nan")),
        "nested": [{"a": ({}, [], ())}, ((1, "1"), [1.0, "1.0"])],
        "tensors": {
            "bf16_scalar": torch.tensor(3.140625, dtype=torch.bfloat16),
            "uint8": torch.arange(250, 256, dtype=torch.uint8).reshape(2, 3),
            "f16": torch.tensor([float("nan"), 65504.0, -0.0], dtype=torch.float16),
            "i64": torch.tensor(-(2**62)),
            "bool": torch.tensor([[True], [False]]),
            "empty": torch.zeros(0, 5),
            "strided": torch.arange(12.0).reshape(3, 4).t()[1:],
            "grad": torch.ones(2, requires_grad=True),
        },
        "alias": [shared, shared],
    }


# -- flatten / unflatten ----------------------------------------------------------------------------------------------


def test_adamw_state_round_trip_is_exact():
    model, optimizer, scheduler = trained_optimizer()
    state = optimizer.state_dict()
    assert any(type(k) is int for k in state["state"])  # int keys, as torch writes them
    restored = round_trip(state)
    assert_identical(state, restored)
    assert_identical(scheduler.state_dict(), round_trip(scheduler.state_dict()))

    # the restored state drives a fresh optimizer exactly like the original
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    twin_optimizer.load_state_dict(restored)
    x = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        m(x).pow(2).mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_every_supported_type_round_trips_exactly():
    obj = every_type()
    tensors, _ = flatten_state(obj)
    assert len(tensors) == 9  # the aliased tensor is stored once
    restored = round_trip(obj)
    assert_identical(obj, restored)
    assert math.copysign(1.0, restored["floats"][1]) == -1.0
    assert restored["alias"][0] is restored["alias"][1]
    assert round_trip(torch.tensor(7, dtype=torch.uint8)).dtype == torch.uint8
    for scalar in (None, True, 3, 2.5, "x", float("nan")):
        assert_identical(scalar, round_trip(scalar))


@pytest.mark.parametrize(
    "bad",
    [OrderedDict(a=1), {1.5: 2}, {True: 1}, {"a": {1, 2}}, [b"bytes"], {"x": torch.float32}],
)
def test_unsupported_types_are_refused(bad):
    with pytest.raises(TypeError, match="cannot save"):
        flatten_state(bad)


def test_malformed_skeleton_is_a_checkpoint_error():
    with pytest.raises(CheckpointError):
        unflatten_state({}, {"tensor": "0"})
    with pytest.raises(CheckpointError):
        unflatten_state({}, {"what": 1})
    with pytest.raises(CheckpointError):
        unflatten_state({}, {"dict": [[1]]})


# -- save / load ------------------------------------------------------------------------------------------------------


def adapter_writer(value: float = 1.0):
    def write(folder: Path):
        folder.mkdir()
        save_file({"lora_A": torch.full((2, 3), value)}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"r": 2}))

    return write


def save(checkpoints: Path, step: int, value: float = 1.0, keep_last: int = 10, protect=(), **states):
    states = states or {"ema": {"decay": 0.99, "shadow": [torch.full((3,), value)]}}
    return save_checkpoint(checkpoints, step, write_adapter=adapter_writer(value), states=states, keep_last=keep_last, protect=protect)


def names(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir())


def test_save_load_round_trip(tmp_path):
    _, optimizer, scheduler = trained_optimizer()
    states = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "ema": every_type()}
    path = save_checkpoint(tmp_path / "checkpoints", 40, write_adapter=adapter_writer(), states=states, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step-000040"
    assert names(path.parent) == ["step-000040"]  # nothing temporary left
    assert json.loads((path / "checkpoint.json").read_text())["step"] == 40
    listed = json.loads((path / "checksums.json").read_text())["files"]
    assert set(listed) == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint.json",
        "optimizer.safetensors", "optimizer.json", "lr_scheduler.safetensors", "lr_scheduler.json",
        "ema.safetensors", "ema.json",
    }

    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.step == 40 and checkpoint.path == path
    assert checkpoint.adapter_dir == path / "adapter" and (checkpoint.adapter_dir / "adapter_config.json").is_file()
    assert list(checkpoint.states) == ["optimizer", "lr_scheduler", "ema"]
    for name, state in states.items():
        assert_identical(state, checkpoint.states[name], name)
    assert verify_checkpoint(path) == 40
    assert list_checkpoints(path.parent) == [path] and latest_checkpoint(path.parent) == path


def test_keep_last_prunes_but_keeps_protected(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40, 50):
        save(checkpoints, step, keep_last=2, protect={10})
    assert names(checkpoints) == ["step-000010", "step-000040", "step-000050"]
    save(checkpoints, 60, keep_last=1)
    assert names(checkpoints) == ["step-000060"]
    with pytest.raises(ValueError):
        save(checkpoints, 70, keep_last=0)


def test_leftover_tmp_folder_is_ignored_then_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    good = save(checkpoints, 10)
    leftover = checkpoints / ".tmp-step-000020-deadbeef"  # a save killed half way, even after its checksums
    leftover.mkdir()
    (leftover / "ema.safetensors").write_bytes(b"half")
    (leftover / "checksums.json").write_text("{}")
    (checkpoints / ".tmp-del-step-000005-cafe").mkdir()  # a prune killed half way
    assert list_checkpoints(checkpoints) == [good]
    assert latest_checkpoint(checkpoints) == good
    save(checkpoints, 30)
    assert names(checkpoints) == ["step-000010", "step-000030"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("victim", ["optimizer.safetensors", "adapter/adapter_model.safetensors", "checkpoint.json"])
def test_damaged_file_is_named_and_skipped(tmp_path, caplog, damage, victim):
    checkpoints = tmp_path / "checkpoints"
    state = {"optimizer": {"step": torch.tensor(3.0), "m": torch.randn(64)}}
    earlier = save(checkpoints, 30, **state)
    latest = save(checkpoints, 40, **state)
    file = latest / victim
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        file.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    else:
        file.unlink()

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(latest)
    message = str(info.value)
    assert message.startswith(f"checkpoint step-000040 is damaged: {victim}")
    assert ("does not match its checksum (truncated or modified)" if damage != "delete" else "is missing") in message
    assert f"resume from an earlier one: {earlier}" in message
    assert isinstance(info.value, LensTuneError)

    with caplog.at_level(logging.WARNING, logger="lens_tune.train.checkpoint"):
        assert latest_checkpoint(checkpoints) == earlier
    assert "step-000040 is damaged" in caplog.text
    assert latest_checkpoint(checkpoints, verify=False) == latest
    assert load_checkpoint(earlier).step == 30


def test_missing_checksums_is_not_a_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    only = save(checkpoints, 10)
    (only / "ema.json").write_text("{}")
    with pytest.raises(CheckpointError, match="ema.json does not match.*no earlier checkpoint is left"):
        load_checkpoint(only)
    (only / "checksums.json").unlink()
    assert list_checkpoints(checkpoints) == [] and latest_checkpoint(checkpoints) is None
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(only)


def test_folder_step_must_match_checkpoint_json(tmp_path):
    path = save(tmp_path / "checkpoints", 10)
    moved = path.rename(path.with_name("step-000011"))
    with pytest.raises(CheckpointError, match="says step 10 but the folder is step-000011"):
        load_checkpoint(moved)


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_during_save_leaves_earlier_checkpoints_intact(tmp_path, interrupt):
    checkpoints = tmp_path / "checkpoints"
    first = save(checkpoints, 10, value=1.0)
    second = save(checkpoints, 20, value=2.0)
    before = {p: (p / "checksums.json").read_text() for p in (first, second)}

    def crash(folder: Path):
        adapter_writer(3.0)(folder)  # half written, then the failure
        raise interrupt

    for step in (30, 20):  # a new step, and a re-save of an existing one
        with pytest.raises(type(interrupt)):
            save_checkpoint(checkpoints, step, write_adapter=crash, states={"ema": {"x": 1}}, keep_last=1)
        assert names(checkpoints) == ["step-000010", "step-000020"]
        assert {p: (p / "checksums.json").read_text() for p in (first, second)} == before
    assert load_checkpoint(second).states["ema"]["shadow"][0].tolist() == [2.0, 2.0, 2.0]
    assert latest_checkpoint(checkpoints) == second


def test_resaving_a_step_replaces_it(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save(checkpoints, 10, value=1.0)
    save(checkpoints, 20, value=2.0)
    again = save(checkpoints, 20, value=5.0)
    assert names(checkpoints) == ["step-000010", "step-000020"]
    assert load_checkpoint(again).states["ema"]["shadow"][0].tolist() == [5.0, 5.0, 5.0]


def test_crash_between_the_two_renames_of_a_resave(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save(checkpoints, 10, value=1.0)
    old = save(checkpoints, 20, value=2.0)
    aside = old.rename(checkpoints / ".old-step-000020-0badf00d")  # the old one moved aside, the new one not yet in
    assert list_checkpoints(checkpoints)[-1] == aside
    assert latest_checkpoint(checkpoints) == aside
    assert load_checkpoint(aside).step == 20
    save(checkpoints, 30, value=3.0)  # the next save puts it back
    assert names(checkpoints) == ["step-000010", "step-000020", "step-000030"]
    assert load_checkpoint(checkpoints / "step-000020").states["ema"]["shadow"][0].tolist() == [2.0, 2.0, 2.0]


def test_invalid_arguments(tmp_path):
    for states in ({"checksums": {}}, {"a/b": {}}, {"": {}}):
        with pytest.raises(ValueError):
            save_checkpoint(tmp_path, 1, write_adapter=adapter_writer(), states=states, keep_last=1)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, write_adapter=adapter_writer(), states={"x": {1, 2}}, keep_last=1)
    with pytest.raises(RuntimeError, match="did not create"):
        save_checkpoint(tmp_path / "c", 1, write_adapter=lambda folder: None, states={}, keep_last=1)
    assert not os.listdir(tmp_path / "c")
