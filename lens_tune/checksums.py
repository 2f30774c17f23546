"""SHA-256 digests of tensors, recorded when a file is written and checked when it is read, so a bit flip or a
truncated copy is reported by name instead of silently changing the numbers."""

from __future__ import annotations

import hashlib

import torch

from lens_tune.errors import ModelLoadError

# safetensors header key of our adapter files (training output and exports): the digest of all their tensors
TENSORS_SHA256_KEY = "lens_tune.tensors_sha256"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes; independent of the order of the dict."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim tensors too
    return digest.hexdigest()


def check_tensor_digest(tensors: dict[str, torch.Tensor], header: dict[str, str], file) -> None:
    """Raise ModelLoadError when the file records a digest and its tensors do not match it."""
    expected = header.get(TENSORS_SHA256_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise ModelLoadError(
            f"{file} is damaged: its tensors do not match the SHA-256 recorded when it was written (a bit flip or a "
            "modified copy). Use another copy, a checkpoint's adapter/ folder, or export the run again."
        )
