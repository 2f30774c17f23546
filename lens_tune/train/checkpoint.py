"""Training checkpoints: written atomically, verified on load, never pickled.

A checkpoint is a folder `checkpoints/step-XXXXXX/` (the step, zero padded to 6 digits):

    adapter/                 whatever `write_adapter` wrote (the LoRA adapter)
    <state>.safetensors      the tensors of one state (optimizer, lr_scheduler, ema, ...)
    <state>.json             {"format": 1, "skeleton": ...}: the rest of that state, see `flatten_state`
    checkpoint.json          {"step": n, "format": 1, "states": [...], "time": ...}
    checksums.json           {"format": 1, "files": {"<relative path>": "<sha256>", ...}}, written last

It is built under a hidden `.tmp-step-XXXXXX-<random>/` name, every file and folder fsynced, then renamed into place
and the parent fsynced: a folder named `step-XXXXXX` with a checksums.json is complete. Re-saving a step moves the
old folder aside (`.old-step-XXXXXX-<random>`) just before the new one is renamed in; a crash between the two renames
leaves the old one readable there (`list_checkpoints` offers it while `step-XXXXXX` is missing, and the next save
puts it back). Pruning renames a folder to a hidden name before deleting it, so a half-deleted checkpoint is never
visible. A crash at any point therefore leaves every earlier complete checkpoint in place; leftovers are removed by
the next save.

Loading checks every file against checksums.json, so a truncated or modified file is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from lens_tune.errors import LensTuneError
from lens_tune.faults import fault_point
from lens_tune.files import fsync_path, reporting_full_disk

logger = logging.getLogger(__name__)

FORMAT = 1
CHECKSUMS_FILE = "checksums.json"
META_FILE = "checkpoint.json"
ADAPTER_DIR = "adapter"

_STEP_RE = re.compile(r"^step-(\d{6,})$")
_ASIDE_RE = re.compile(r"^\.old-step-(\d{6,})-[0-9a-f]+$")
_STATE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_STATES = {"checkpoint", "checksums"}


class CheckpointError(LensTuneError):
    """A checkpoint is missing, incomplete or damaged."""


@dataclass
class Checkpoint:
    step: int
    adapter_dir: Path
    states: dict[str, Any]
    path: Path


# -- flat tensors + JSON skeleton -----------------------------------------------------------------------------------


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split `obj` into a flat dict of tensors and a JSON-able skeleton; `unflatten_state` is the exact inverse.

    Supported: dict (str or int keys, order kept), list, tuple, int, float (nan/inf/-0.0 bit-exact), bool, None, str
    and torch.Tensor (any dtype and shape, 0-dim included). Only these exact types: subclasses (OrderedDict,
    namedtuple, numpy scalars, enums) raise TypeError rather than come back as something else. Tensors are copied
    to the CPU, contiguous; their device is not kept (load_state_dict moves optimizer state to its parameters'
    device), requires_grad is. A tensor object that appears twice is stored once and comes back as one object.

    Skeleton: None, bool, int, str and finite floats as themselves; everything else as a one-key-tagged object:
    {"dict": [[key, value], ...]}, {"list": [...]}, {"tuple": [...]}, {"tensor": "<name>"} (plus
    "requires_grad": true when set), {"float": "nan"|"inf"|"-inf", "bits": "<16 hex digits>"}.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}

    def walk(value: Any, where: str) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is int or kind is str:
            return value
        if kind is float:
            if math.isfinite(value):
                return value
            return {"float": repr(value), "bits": struct.pack(">d", value).hex()}
        if kind is dict:
            items = []
            for key, item in value.items():
                if type(key) is not str and type(key) is not int:
                    raise TypeError(f"cannot save {where}: dict key {key!r} is a {type(key).__name__}; only str and int keys are supported")
                items.append([key, walk(item, f"{where}[{key!r}]")])
            return {"dict": items}
        if kind is list:
            return {"list": [walk(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if kind is tuple:
            return {"tuple": [walk(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, torch.Tensor):
            name = seen.get(id(value))
            if name is None:
                name = seen[id(value)] = str(len(tensors))
                # a fresh CPU copy of exactly this tensor's elements (safetensors refuses shared or strided storage)
                tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            node: dict[str, Any] = {"tensor": name}
            if value.requires_grad:
                node["requires_grad"] = True
            return node
        raise TypeError(
            f"cannot save {where}: unsupported type {kind.__module__}.{kind.__qualname__} (supported: dict, list, "
            "tuple, int, float, bool, None, str, torch.Tensor)"
        )

    skeleton = walk(obj, "state")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The object `flatten_state` split into (`tensors`, `skeleton`). Raises CheckpointError on a malformed one."""

    def walk(node: Any) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is not dict or not node:
            raise CheckpointError(f"malformed state skeleton: unexpected {type(node).__name__} {node!r:.80}")
        if "dict" in node:
            out = {}
            for pair in node["dict"]:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int):
                    raise CheckpointError(f"malformed state skeleton: bad dict item {pair!r:.80}")
                out[pair[0]] = walk(pair[1])
            return out
        if "list" in node:
            return [walk(item) for item in node["list"]]
        if "tuple" in node:
            return tuple(walk(item) for item in node["tuple"])
        if "tensor" in node:
            try:
                tensor = tensors[node["tensor"]]
            except (KeyError, TypeError):
                raise CheckpointError(f"malformed state: tensor {node['tensor']!r} is missing") from None
            if node.get("requires_grad") and not tensor.requires_grad:
                tensor.requires_grad_(True)
            return tensor
        if "float" in node:
            try:
                return struct.unpack(">d", bytes.fromhex(node["bits"]))[0]
            except (KeyError, TypeError, ValueError, struct.error):
                raise CheckpointError(f"malformed state skeleton: bad float {node!r:.80}") from None
        raise CheckpointError(f"malformed state skeleton: unknown node {node!r:.80}")

    try:
        return walk(skeleton)
    except (TypeError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"malformed state skeleton ({err})") from None


# -- file helpers -----------------------------------------------------------------------------------------------------


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_RE.match(path.name) or _ASIDE_RE.match(path.name)
    return int(match.group(1)) if match else None


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_tree(path: Path) -> None:
    """Delete a folder so that it vanishes at once (renamed to a hidden name first), then its contents."""
    if not path.name.startswith("."):
        hidden = path.with_name(f".tmp-del-{path.name}-{secrets.token_hex(4)}")
        os.rename(path, hidden)
        path = hidden
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover(checkpoints_dir: Path) -> None:
    """Put back a checkpoint moved aside by a save that crashed; delete what interrupted saves and prunes left."""
    for entry in sorted(checkpoints_dir.iterdir()):
        match = _ASIDE_RE.match(entry.name)
        if match:
            final = checkpoints_dir / _step_name(int(match.group(1)))
            if not os.path.lexists(final) and (entry / CHECKSUMS_FILE).is_file():
                os.rename(entry, final)
                logger.warning("restored checkpoint %s, moved aside by a save that did not finish", final)
            else:
                _remove_tree(entry)
        elif entry.name.startswith(".tmp-"):
            _remove_tree(entry)


# -- save -----------------------------------------------------------------------------------------------------------


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    write_adapter: Callable[[Path], None],
    states: dict[str, Any],
    keep_last: int,
    protect: Iterable[int] = (),
) -> Path:
    """Write checkpoint `step` atomically and prune old ones; returns `checkpoints_dir/step-XXXXXX`.

    `write_adapter(folder)` must create `folder` (e.g. peft's save_pretrained). `states` maps a name (file-name
    safe, not "checkpoint" or "checksums") to any object `flatten_state` supports. An existing checkpoint of the
    same step is replaced. Afterwards only the newest `keep_last` complete checkpoints (by step), this one and those
    whose step is in `protect` are kept. Only the process training in the run (holding its lock) may call this.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, not {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, not {keep_last!r}")
    for name in states:
        if not isinstance(name, str) or not _STATE_NAME_RE.match(name) or name in _RESERVED_STATES:
            raise ValueError(f"invalid checkpoint state name {name!r}: use letters, digits, '_', '-', '.'")
    flat = {name: flatten_state(obj) for name, obj in states.items()}  # fails before anything is written

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _recover(checkpoints_dir)
    final = checkpoints_dir / _step_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
    size = sum(t.numel() * t.element_size() for tensors, _ in flat.values() for t in tensors.values())
    tmp.mkdir()
    try:
        with reporting_full_disk(f"checkpoint {final.name}", checkpoints_dir, size):
            _write_checkpoint_files(tmp, write_adapter, flat, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    aside = None
    if os.path.lexists(final):
        aside = checkpoints_dir / f".old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(checkpoints_dir)
    if aside is not None:
        _remove_tree(aside)

    keep = {_step_of(p) for p in list_checkpoints(checkpoints_dir)[-keep_last:]} | {int(s) for s in protect} | {step}
    for path in list_checkpoints(checkpoints_dir):
        if _step_of(path) not in keep:
            _remove_tree(path)
    fsync_path(checkpoints_dir)
    return final


def _write_checkpoint_files(tmp: Path, write_adapter: Callable[[Path], None], flat: dict, step: int) -> None:
    """Every file of a checkpoint into the folder `tmp`, fsynced, checksums.json last."""
    adapter = tmp / ADAPTER_DIR
    write_adapter(adapter)
    if not adapter.is_dir():
        raise RuntimeError(f"write_adapter did not create the adapter folder {adapter}")
    fault_point("checkpoint-write")
    for name, (tensors, skeleton) in flat.items():
        path = tmp / f"{name}.safetensors"
        save_file(tensors, str(path))
        _write_bytes(tmp / f"{name}.json", json.dumps({"format": FORMAT, "skeleton": skeleton}, allow_nan=False).encode())
    meta = {"step": step, "format": FORMAT, "states": list(flat), "time": time.time()}
    _write_bytes(tmp / META_FILE, json.dumps(meta, indent=1).encode())

    checksums = {}
    for root, dirs, files in os.walk(tmp, topdown=False):
        for file in files:
            path = Path(root) / file
            checksums[path.relative_to(tmp).as_posix()] = _sha256_file(path)
            fsync_path(path)
        for folder in dirs:
            fsync_path(Path(root) / folder)
    files = dict(sorted(checksums.items()))
    _write_bytes(tmp / CHECKSUMS_FILE, json.dumps({"format": FORMAT, "files": files}, indent=1).encode())
    fsync_path(tmp)


# -- load -----------------------------------------------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints (`step-XXXXXX` with a checksums.json), oldest step first; not verified.

    A checkpoint moved aside by a re-save that crashed is listed in its step's place while that step is missing.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    asides: dict[int, Path] = {}
    for entry in sorted(checkpoints_dir.iterdir()):
        if not (entry / CHECKSUMS_FILE).is_file():
            continue
        if match := _STEP_RE.match(entry.name):
            found[int(match.group(1))] = entry
        elif match := _ASIDE_RE.match(entry.name):
            asides.setdefault(int(match.group(1)), entry)
    for step, entry in asides.items():
        if not os.path.lexists(checkpoints_dir / _step_name(step)):
            found[step] = entry
    return [found[step] for step in sorted(found)]


def _damaged(path: Path, detail: str) -> CheckpointError:
    step = _step_of(path)
    earlier = [p for p in list_checkpoints(path.parent) if step is None or (_step_of(p) or 0) < step]
    label = _step_name(step) if step is not None else path.name
    if earlier:
        hint = f"resume from an earlier one: {earlier[-1]}"
    else:
        hint = f"no earlier checkpoint is left in {path.parent}; start the run again"
    return CheckpointError(f"checkpoint {label} is damaged: {detail}; {hint} (damaged: {path})")


def _verify(path: Path, read: Callable[[str], bool] = lambda rel: False) -> tuple[dict, dict[str, bytes]]:
    """Check every file of the checkpoint at `path`; returns checkpoint.json and the bytes of the files `read` wants."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        listing = json.loads((path / CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint (it has no {CHECKSUMS_FILE}: it was never completed)") from None
    except (OSError, ValueError):
        raise _damaged(path, f"{CHECKSUMS_FILE} is unreadable") from None
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(files, dict) or META_FILE not in files:
        raise _damaged(path, f"{CHECKSUMS_FILE} is malformed")

    contents: dict[str, bytes] = {}
    for rel, expected in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or not isinstance(expected, str):
            raise _damaged(path, f"{CHECKSUMS_FILE} lists an invalid entry {rel!r}")
        file = path.joinpath(*parts)
        try:
            if read(rel) or rel == META_FILE:
                data = file.read_bytes()
                actual = hashlib.sha256(data).hexdigest()
                contents[rel] = data
            else:
                actual = _sha256_file(file)
        except FileNotFoundError:
            raise _damaged(path, f"{rel} is missing") from None
        except OSError as err:
            raise _damaged(path, f"{rel} cannot be read ({err.strerror})") from None
        if actual != expected:
            raise _damaged(path, f"{rel} does not match its checksum (truncated or modified)")

    try:
        meta = json.loads(contents[META_FILE])
        step, states = meta["step"], meta["states"]
        if meta.get("format") != FORMAT or type(step) is not int or not isinstance(states, list):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise _damaged(path, f"{META_FILE} is malformed or of an unknown format") from None
    folder_step = _step_of(path)
    if folder_step is not None and folder_step != step:
        raise _damaged(path, f"{META_FILE} says step {step} but the folder is {_step_name(folder_step)}")
    for name in states:
        for rel in (f"{name}.safetensors", f"{name}.json"):
            if rel not in files:
                raise _damaged(path, f"{rel} is not listed in {CHECKSUMS_FILE}")
    if not (path / ADAPTER_DIR).is_dir():
        raise _damaged(path, f"the {ADAPTER_DIR}/ folder is missing")
    return meta, contents


def verify_checkpoint(path: Path) -> int:
    """Check every file of a checkpoint against its checksums; returns its step or raises CheckpointError."""
    meta, _ = _verify(path)
    return meta["step"]


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and load a checkpoint. States come back on the CPU; the adapter is left on disk (`adapter_dir`)."""
    path = Path(path)
    meta, contents = _verify(path, read=lambda rel: not rel.startswith(f"{ADAPTER_DIR}/"))
    states = {}
    for name in meta["states"]:
        try:
            tensors = load_safetensors_bytes(contents[f"{name}.safetensors"])
            skeleton = json.loads(contents[f"{name}.json"])["skeleton"]
            states[name] = unflatten_state(tensors, skeleton)
        except CheckpointError as err:
            raise _damaged(path, f"state {name!r}: {err}") from None
        except Exception as err:  # noqa: BLE001 - checksums matched, so the writer produced something unreadable
            raise _damaged(path, f"state {name!r} cannot be read ({err})") from None
    return Checkpoint(step=meta["step"], adapter_dir=path / ADAPTER_DIR, states=states, path=path)


def latest_checkpoint(checkpoints_dir: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint, or None. With `verify`, damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        if not verify:
            return path
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            logger.warning("skipping checkpoint: %s", err)
            continue
        return path
    return None
