"""What the planner knows about a Lens transformer: its sizes, and the layers quantisation and an adapter touch.

Everything is read off the real `LensTransformer2DModel` built on the meta device (no memory, under a second): the
adapted layers come from the trainer's own `target_modules`, and each layer's adapter size from PEFT's own layer
built on meta with the trainer's adapter config, so counts are exact for any config, target list, block list and
adapter kind.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import torch

from lens_tune.recipe.schema import LoraSettings


@dataclass(frozen=True)
class AdaptedLayer:
    block: int
    in_features: int
    out_features: int
    params: int  # the adapter's trainable parameters on this layer
    stream: str  # "img" or "txt": whose tokens flow through it
    role: str  # qkv, out, mlp_in (w1/w3), mlp_out (w2), mod


@dataclass(frozen=True)
class Architecture:
    config: dict
    layers: int
    dim: int
    heads: int
    head_dim: int
    mlp_hidden: int
    in_channels: int
    text_width: int
    text_layers: int
    params: int
    quantizable_params: int  # weights of the layers quantize_base replaces
    quantizable_rows: int  # their output features (one int8 scale each)
    modulation_params: int  # the blocks' img_mod/txt_mod weights and biases (model.modulation_device: cpu)

    @property
    def gate_mlp(self) -> bool:
        return bool(self.config.get("gate_mlp", True))


def _quiet_diffusers() -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _config_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _architecture(key: str) -> Architecture:
    from lens_tune.model.loading import build_on_meta
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import quantized_layers

    _quiet_diffusers()
    config = json.loads(key)
    model = build_on_meta(LensTransformer2DModel, config, "transformer config")
    quantized = [model.get_submodule(path) for path in quantized_layers(len(model.transformer_blocks))]
    resolved = dict(model.config)
    heads, head_dim = resolved["num_attention_heads"], resolved["attention_head_dim"]
    first_block = model.transformer_blocks[0]
    mlp_hidden = first_block.img_mlp.w1.out_features if resolved["gate_mlp"] else first_block.img_mlp.net[2].in_features
    return Architecture(
        config=resolved,
        layers=resolved["num_layers"],
        dim=heads * head_dim,
        heads=heads,
        head_dim=head_dim,
        mlp_hidden=mlp_hidden,
        in_channels=resolved["in_channels"],
        text_width=resolved["enc_hidden_dim"],
        text_layers=len(resolved["selected_layer_index"]) if resolved["multi_layer_encoder_feature"] else 1,
        params=sum(p.numel() for p in model.parameters()),
        quantizable_params=sum(layer.weight.numel() for layer in quantized),
        quantizable_rows=sum(layer.out_features for layer in quantized),
        modulation_params=sum(p.numel() for block in model.transformer_blocks
                              for p in (*block.img_mod.parameters(), *block.txt_mod.parameters())),
    )


def architecture(config: dict) -> Architecture:
    return _architecture(_config_key(config))


# block layer -> (stream whose tokens it sees, role); the roles decide what an adapter on it keeps for backward
_ROLES = {
    "attn.img_qkv": ("img", "qkv"), "attn.txt_qkv": ("txt", "qkv"),
    "attn.to_out.0": ("img", "out"), "attn.to_add_out": ("txt", "out"),
    **{f"{s}_mlp.{w}": (s, "mlp_in") for s in ("img", "txt") for w in ("w1", "w3")},
    **{f"{s}_mlp.w2": (s, "mlp_out") for s in ("img", "txt")},
    "img_mod.1": ("img", "mod"), "txt_mod.1": ("txt", "mod"),
}


@functools.lru_cache(maxsize=64)
def _adapter_params(lora_json: str, in_features: int, out_features: int) -> int:
    """Trainable parameters the adapter puts on one in x out Linear: PEFT's own layer, built on meta and counted."""
    from peft import inject_adapter_in_model

    from lens_tune.train.adapters import adapter_config

    lora = LoraSettings.model_validate_json(lora_json)
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.layer = torch.nn.Linear(in_features, out_features)
    holder.requires_grad_(False)
    inject_adapter_in_model(adapter_config(lora, ["layer"]), holder)
    return sum(p.numel() for name, p in holder.named_parameters() if "layer.base_layer" not in name)


@functools.lru_cache(maxsize=32)
def _adapted(key: str, lora_json: str) -> tuple[AdaptedLayer, ...]:
    from lens_tune.model.loading import build_on_meta
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import target_modules

    _quiet_diffusers()
    lora = LoraSettings.model_validate_json(lora_json)
    # the initialisation does not change the adapter's size (and PiSSA's SVD cannot run on meta)
    sized = lora.model_copy(update={"init": "default", "init_from": None}).model_dump_json()
    model = build_on_meta(LensTransformer2DModel, json.loads(key), "transformer config")
    layers = []
    for path in target_modules(model, lora.targets, lora.blocks):
        _, block, name = path.split(".", 2)
        base = model.get_submodule(path)
        params = _adapter_params(sized, base.in_features, base.out_features)
        layers.append(AdaptedLayer(int(block), base.in_features, base.out_features, params, *_ROLES[name]))
    return tuple(layers)


def adapted_layers(config: dict, lora: LoraSettings) -> tuple[AdaptedLayer, ...]:
    """The layers `lora` adapts in a transformer with `config`, in block order (raises LensTuneError like the
    trainer does for targets or blocks that do not exist)."""
    return _adapted(_config_key(config), lora.model_dump_json())

