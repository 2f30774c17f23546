"""Shared test helpers: the golden vectors (copied from the reference run, see tests/golden/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden" / "lens-tiny"

torch.set_num_threads(2)  # the goldens were generated with 2 threads


class Golden:
    """One golden file pair: `tensors` (name -> tensor) and `meta` (the JSON next to it)."""

    def __init__(self, tensors_file: Path, meta_file: Path):
        # clone: tensors straight from a memory-mapped file can take other BLAS paths (README, tolerances)
        self.tensors = {k: v.clone() for k, v in load_file(tensors_file).items()}
        self.meta = json.loads(meta_file.read_text())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str):
        return self.tensors.get(key)

    def model_inputs(self, prefix: str, img_shapes) -> dict:
        """Keyword arguments of a transformer forward stored under `prefix/` (the mask may be absent: None)."""
        return dict(
            hidden_states=self[f"{prefix}/hidden_states"],
            encoder_hidden_states=self.layers(f"{prefix}/encoder_hidden_states"),
            encoder_hidden_states_mask=self.get(f"{prefix}/encoder_hidden_states_mask"),
            timestep=self[f"{prefix}/timestep"],
            img_shapes=img_shapes,
        )

    def layers(self, prefix: str) -> list[torch.Tensor]:
        """The list stored as prefix.0, prefix.1, ..."""
        out, i = [], 0
        while f"{prefix}.{i}" in self.tensors:
            out.append(self.tensors[f"{prefix}.{i}"])
            i += 1
        return out


def load_golden(part: str, stem: str) -> Golden:
    return Golden(GOLDEN / part / f"{stem}.safetensors", GOLDEN / part / f"{stem}.json")


@pytest.fixture(scope="session")
def golden_transformer() -> Golden:
    return load_golden("transformer", "cases")


@pytest.fixture(scope="session")
def golden_pipeline() -> Golden:
    return load_golden("pipeline", "expected")


@pytest.fixture(scope="session")
def golden_training() -> Golden:
    return load_golden("training", "training")


@pytest.fixture(scope="session")
def golden_lora() -> Golden:
    return load_golden("lora", "expected")


@pytest.fixture
def golden_model():
    from lens_tune.model.transformer import LensTransformer2DModel

    return LensTransformer2DModel.from_pretrained(GOLDEN / "transformer")


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """The built-in tiny model is built into a cache folder; tests use a fresh one, never the user's."""
    import os

    previous = os.environ.get("LENS_TUNE_CACHE")
    os.environ["LENS_TUNE_CACHE"] = str(tmp_path_factory.mktemp("lens-tune-cache"))
    yield
    if previous is None:
        os.environ.pop("LENS_TUNE_CACHE", None)
    else:
        os.environ["LENS_TUNE_CACHE"] = previous
