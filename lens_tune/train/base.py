"""The frozen base a run trains on, loaded the way the recipe's `model` section says: from the source folder or a
single-file checkpoint, in the weights dtype, quantised (int8 / nf4), with the modulation layers in host memory when
asked. The trainer uses it, and so does class-image generation, so both fit the same GPU."""

from __future__ import annotations

from pathlib import Path

import torch

from lens_tune.model.host_modulation import HostModulation
from lens_tune.recipe.schema import Recipe
from lens_tune.train.adapters import quantize_base


def load_base(recipe: Recipe, model_root: Path, device: torch.device, dtype: torch.dtype):
    """(the frozen transformer on `device`, its HostModulation when model.modulation_device is cpu, else None)."""
    from lens_tune.model.transformer import LensTransformer2DModel

    if recipe.model.transformer_file:
        transformer = LensTransformer2DModel.from_single_file(
            recipe.model.transformer_file, config=model_root / "transformer", torch_dtype=dtype
        )
    else:
        transformer = LensTransformer2DModel.from_pretrained(model_root / "transformer", torch_dtype=dtype)
    transformer.requires_grad_(False)
    if recipe.model.quantization != "none":
        quantize_base(transformer, recipe.model.quantization)
    host_modulation = HostModulation(transformer) if recipe.model.modulation_device == "cpu" else None
    transformer.to(device)
    return transformer, host_modulation

