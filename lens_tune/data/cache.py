"""A content-addressed store of tensors (text features, latents) in safetensors shards.

Each entry is found by a key, the hash of everything that determines it (the inputs and the identity and settings
of the encoder), so unchanged items are reused by any run and anything that changes gets a new key.

On disk, DIR holds pairs `shard-<n>.safetensors` + `shard-<n>.json`. The JSON lists the shard's entries with a
SHA-256 of each entry's bytes. Both are written under temporary names, flushed and renamed, the JSON last: a shard
without its JSON was interrupted and is ignored. Reading an entry checks its hash, so truncated or bit-flipped data
is detected, dropped and re-encoded by the caller. Later shards win when a key appears twice (a rebuilt entry).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lens_tune.checksums import tensor_digest
from lens_tune.faults import fault_point
from lens_tune.files import atomic_write

logger = logging.getLogger(__name__)

SHARD_BYTES = 64 * 2**20  # a shard is written once this much is buffered: the writer's memory bound


def content_key(**fields) -> str:
    """A stable key for the given JSON-able fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    shard: Path
    names: tuple[str, ...]  # tensor names inside the shard, `<key>/<name>`
    sha256: str
    meta: dict


class CorruptEntry(Exception):
    """An entry's bytes do not match the hash recorded when it was written."""


class FeatureCache:
    """The store under one folder. `get` verifies; `writer()` appends new shards."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, Entry] = {}
        for sidecar in sorted(self.root.glob("shard-*.json")):
            shard = sidecar.with_suffix(".safetensors")
            try:
                entries = json.loads(sidecar.read_text())["entries"]
            except (OSError, ValueError, KeyError) as err:
                logger.warning("ignoring unreadable cache index %s (%s)", sidecar, err)
                continue
            for key, info in entries.items():
                self._index[key] = Entry(shard, tuple(info["names"]), info["sha256"], info.get("meta", {}))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def meta(self, key: str) -> dict:
        return self._index[key].meta

    def get(self, key: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of an entry, by their short names. Raises KeyError or CorruptEntry.

        verify=False skips the hash (training reads entries the data phases verified moments before).
        """
        entry = self._index[key]
        try:
            with safe_open(str(entry.shard), framework="pt", device="cpu") as handle:
                # copies: a memory-mapped tensor would crash the process (SIGBUS) if its file were truncated later
                tensors = {name.split("/", 1)[1]: handle.get_tensor(name).clone() for name in entry.names}
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptEntry(f"{entry.shard.name}: {err}") from err
        if verify and tensor_digest(tensors) != entry.sha256:
            raise CorruptEntry(f"{entry.shard.name}: entry {key[:12]} does not match its recorded SHA-256")
        return tensors

    def drop_corrupt(self, keys: Iterable[str]) -> list[str]:
        """Check the given present keys fully; forget the corrupt ones (so they get re-encoded). Returns those."""
        corrupt = []
        for key in keys:
            if key not in self._index:
                continue
            try:
                self.get(key)
            except CorruptEntry as err:
                logger.warning("cache entry rebuilt: %s", err)
                corrupt.append(key)
                del self._index[key]
        return corrupt

    def writer(self, shard_bytes: int = SHARD_BYTES) -> "ShardWriter":
        return ShardWriter(self, shard_bytes)

    def _add_shard(self, entries: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> None:
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        shard, sidecar = self.root / f"{name}.safetensors", self.root / f"{name}.json"
        flat = {f"{key}/{n}": t.detach().contiguous().cpu() for key, (tensors, _) in entries.items() for n, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in flat.values())

        def write(tmp: Path) -> None:
            save_file(flat, str(tmp))
            fault_point("shard-write")

        atomic_write(shard, write, what=f"a cache shard ({len(entries)} entries)", needed_bytes=size)
        index = {
            key: {"names": [f"{key}/{n}" for n in sorted(tensors)], "sha256": tensor_digest(tensors), "meta": meta}
            for key, (tensors, meta) in entries.items()
        }
        atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps({"entries": index})), what="a cache shard index")
        for key, info in index.items():
            self._index[key] = Entry(shard, tuple(info["names"]), info["sha256"], info["meta"])


class ShardWriter:
    """Buffers new entries and writes a shard whenever `shard_bytes` are buffered, and on close."""

    def __init__(self, cache: FeatureCache, shard_bytes: int):
        self.cache, self.shard_bytes = cache, shard_bytes
        self._pending: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
        self._bytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        self._pending[key] = ({n: t.detach().cpu() for n, t in tensors.items()}, meta or {})
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.cache._add_shard(self._pending)
        self._pending, self._bytes = {}, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # what was encoded before an error or Ctrl-C is kept


def folder_fingerprint(folder: Path, sample_bytes: int = 2**20) -> str:
    """An identity for a model component folder, cheap even for multi-GB weights.

    Hashes every small file (configs, tokenizer files) in full; for large files the size, the safetensors header and
    samples at the start, middle and end of the data. Any re-saved or different checkpoint gets a new fingerprint.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size};".encode())
        with open(path, "rb") as handle:
            if size <= 4 * sample_bytes:
                digest.update(handle.read())
                continue
            for offset in (0, size // 2, size - sample_bytes):
                handle.seek(offset)
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()
