"""`lens-tune merge`: bake an adapter into the transformer weights and save a plain diffusers-layout transformer.

The result loads with `LensTransformer2DModel.from_pretrained` anywhere, no adapter code needed; `scale` is the
adapter strength baked in (the same as `attention_kwargs={"scale": s}` or `--adapter-scale`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lens_tune.errors import LensTuneError


def merge_into(transformer: nn.Module, scale: float = 1.0) -> nn.Module:
    """Fold every PEFT adapter layer of `transformer` into its base weight at `scale`, in place; returns it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if scale != 1.0:
            module.scale_layer(scale)
        module.merge(safe_merge=True)  # raises on non-finite merged weights instead of saving them
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child, module.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(transformer, attribute):
            delattr(transformer, attribute)
    return transformer


def merge_adapter(
    adapter_dir: Path, model_root: Path, out_dir: Path, scale: float = 1.0, max_shard_size: str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Load the base transformer from `model_root`, merge the adapter at `scale`, save sharded safetensors."""
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import load_adapter

    if not (adapter_dir / "adapter_config.json").is_file():
        raise LensTuneError(f"{adapter_dir} is not an adapter folder written by lens-tune (no adapter_config.json).")
    transformer = LensTransformer2DModel.from_pretrained(model_root / "transformer", torch_dtype=dtype)
    load_adapter(transformer, adapter_dir)
    with torch.no_grad():
        merge_into(transformer, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    return out_dir
