"""lens-toy: a tiny Lens trained for real on a procedural world of shapes, and an evaluator that judges its pictures.

`world` draws captioned 64x64 pictures with exact labels; `build` trains the toy VAE, transformer and evaluator from a
seed (`python -m lens_tune.toy.build`); `subjects` holds the DreamBooth subjects the base never saw. The shipped
weights are in `weights/`: `toy_pipeline_dir()` is a Lens pipeline folder (model source "toy"), `evaluator_dir()`
the evaluator's.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def toy_pipeline_dir() -> Path:
    """The shipped lens-toy pipeline folder (what model source "toy" resolves to)."""
    return WEIGHTS / "lens-toy"


def evaluator_dir() -> Path:
    return WEIGHTS / "evaluator"
