"""Adapters on the Lens transformer: which layers get one, how it is created, saved and loaded, and the
weight-only quantisation of the frozen base (QLoRA-style training).

The adapter kinds are PEFT's: LoRA, DoRA (LoRA with `use_dora`), LoKr and LoHa. Files are written the way diffusers'
`save_lora_adapter` writes them (bare PEFT keys such as `transformer_blocks.0.attn.img_qkv.lora_A.weight`, the PEFT
config as JSON under the safetensors metadata key `lora_adapter_metadata`), plus PEFT's `adapter_config.json`, so a
LoRA/DoRA folder loads with `LensPipeline.load_lora_weights`, diffusers' `load_lora_adapter` and PEFT.

Typical use (the base is quantised, if at all, before the adapter is added)::

    quantize_base(transformer, "nf4")
    params = add_adapter(transformer, recipe.lora)        # everything else frozen; params are float32
    ...train params...
    save_adapter(transformer, folder, recipe.lora)
    info = load_adapter(fresh_transformer, folder)         # any of the four kinds
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from lens_tune.checksums import TENSORS_SHA256_KEY, check_tensor_digest, tensor_digest
from lens_tune.errors import LensTuneError, ModelLoadError
from lens_tune.files import atomic_write
from lens_tune.recipe.schema import LoraSettings

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# Other weight files load_adapter accepts (diffusers' save_lora_adapter default name)
OTHER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors",)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads the LoraConfig from
SETTINGS_METADATA_KEY = "lens_tune.lora"  # our recipe's lora section, for the record

# ----------------------------------------------------------------------------------------------------------------
# Which layers
# ----------------------------------------------------------------------------------------------------------------
# The Linear layers of one LensTransformerBlock, named relative to the block.
ATTENTION_LAYERS = ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out")
MLP_LAYERS = tuple(f"{stream}_mlp.{w}" for stream in ("img", "txt") for w in ("w1", "w2", "w3"))
MODULATION_LAYERS = ("img_mod.1", "txt_mod.1")
BLOCK_LINEAR_LAYERS = ATTENTION_LAYERS + MLP_LAYERS + MODULATION_LAYERS

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_LAYERS,
    "attention-mlp": ATTENTION_LAYERS + MLP_LAYERS,
    "all": BLOCK_LINEAR_LAYERS,
}

# The model returns only the image stream: the text stream that the last block computes after its attention is
# thrown away. The last block's text output projection and text MLP therefore never reach the loss. An adapter on
# them would get no gradient: it would only cost memory, and DDP (find_unused_parameters=False) fails on parameters
# that take no part in the loss. The last block's txt_qkv and txt_mod.1 do take part (text keys/values feed the
# image tokens; txt_mod.1 modulates the text input of that attention), so they stay.
UNUSED_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp.w1", "txt_mlp.w2", "txt_mlp.w3")

# The layers quantize_base replaces: the blocks' attention and MLP layers. Not the modulation layers: they are a
# third of the weights, but quantising img_mod/txt_mod damages Lens's images (grid artefacts and broken text with a
# uint4 release, see ../shared/lens-architecture.md, "Sensitivity of the modulation layers"); nor img_in, txt_in,
# norm_out, proj_out, the time embedding or any norm (small, sensitive).
QUANTIZED_LAYERS = ATTENTION_LAYERS + MLP_LAYERS

_FULL_PATH = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def _layer_matches(name: str, layer: str) -> bool:
    """True if `name` is the block layer `layer`, a dotted suffix of it (`img_qkv`, `to_out.0`, `w1`) or a module
    that contains it (`img_mlp`, `attn`, `attn.to_out`)."""
    return layer == name or layer.endswith("." + name) or layer.startswith(name + ".")


def target_modules(
    transformer: nn.Module, targets: str | Sequence[str], blocks: Sequence[int] | None = None
) -> list[str]:
    """The full paths of the layers to adapt, in block order (e.g. `transformer_blocks.0.attn.img_qkv`).

    `targets` is a preset (attention | attention-mlp | all) or a list of layer names: a block layer name or any
    dotted suffix of one (`img_qkv`, `to_out.0`, `img_mlp.w1`, `w1` for both streams), a module holding several
    (`img_mlp`, `attn`), or a full path (`transformer_blocks.3.attn.img_qkv`). `blocks` restricts the result to
    those block indices. The last block's text-output layers are always left out (see UNUSED_IN_LAST_BLOCK).
    """
    n_blocks = len(transformer.transformer_blocks)
    valid = ", ".join(BLOCK_LINEAR_LAYERS)
    wanted: set[tuple[int | None, str]] = set()  # (block or None for every block, block layer)
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise LensTuneError(
                f"Unknown LoRA target preset '{targets}'. Use one of {', '.join(TARGET_PRESETS)}, or a list of "
                f"layer names from: {valid}."
            )
        wanted = {(None, layer) for layer in TARGET_PRESETS[targets]}
    else:
        names = list(targets)
        if not names:
            raise LensTuneError(f"lora.targets is an empty list. Name some layers from: {valid}.")
        unknown = []
        for name in names:
            block, rest = None, str(name).strip()
            full = _FULL_PATH.fullmatch(rest)
            if full:
                block, rest = int(full.group(1)), full.group(2)
                if block >= n_blocks:
                    raise LensTuneError(
                        f"LoRA target '{name}': block {block} does not exist; this transformer has {n_blocks} "
                        f"blocks (0..{n_blocks - 1})."
                    )
            hits = [layer for layer in BLOCK_LINEAR_LAYERS if _layer_matches(rest, layer)]
            if not hits:
                unknown.append(str(name))
            wanted.update((block, layer) for layer in hits)
        if unknown:
            raise LensTuneError(
                f"Unknown LoRA target(s): {', '.join(unknown)}. Valid names are the block layers {valid}, any dotted "
                "suffix of them (img_qkv, to_out.0, img_mlp.w1, ...), a module that holds them (img_mlp, attn) or "
                "a full path such as transformer_blocks.0.attn.img_qkv."
            )

    if blocks is None:
        chosen = list(range(n_blocks))
    else:
        bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n_blocks]
        if bad:
            raise LensTuneError(
                f"lora.blocks: block index {bad[0]} is out of range; this transformer has {n_blocks} blocks "
                f"(0..{n_blocks - 1})."
            )
        chosen = sorted(set(blocks))

    paths = []
    for index in chosen:
        for layer in BLOCK_LINEAR_LAYERS:
            if (None, layer) not in wanted and (index, layer) not in wanted:
                continue
            if index == n_blocks - 1 and layer in UNUSED_IN_LAST_BLOCK:
                continue  # no gradient ever reaches it (see UNUSED_IN_LAST_BLOCK)
            path = f"transformer_blocks.{index}.{layer}"
            try:
                transformer.get_submodule(path)
            except AttributeError:
                raise LensTuneError(f"The transformer has no layer {path} (is it a Lens transformer?).") from None
            paths.append(path)
    if not paths:
        raise LensTuneError(
            f"lora.targets {targets!r} with lora.blocks {list(blocks) if blocks is not None else 'all'} selects no "
            "layer (the last block's to_add_out and txt_mlp are never adapted: their output is unused)."
        )
    return paths


# ----------------------------------------------------------------------------------------------------------------
# PEFT configs
# ----------------------------------------------------------------------------------------------------------------
_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def check_adapter_settings(lora: LoraSettings, transformer_folder: Path) -> None:
    """Raise the error add_adapter would raise for these settings (targets, blocks, kind), from the transformer's
    config alone: a run checks this before caching and before it makes a run folder."""
    from lens_tune.model import loading
    from lens_tune.model.transformer import LensTransformer2DModel

    model = loading.build_on_meta(LensTransformer2DModel, loading.read_config(transformer_folder), str(transformer_folder))
    adapter_config(lora, target_modules(model, lora.targets, lora.blocks))


def _alpha(lora: LoraSettings) -> int | float:
    alpha = float(lora.rank if lora.alpha is None else lora.alpha)
    return int(alpha) if alpha.is_integer() else alpha  # 16 rather than 16.0 in the JSON


def adapter_config(lora: LoraSettings, modules: list[str]):
    """The PEFT config (LoraConfig, LoKrConfig or LoHaConfig) adapting exactly `modules` (full module paths).

    PEFT matches a list entry against a module path by equality or by a `.`-suffix; no other module's path ends
    with `.transformer_blocks.{i}...`, so exactly the listed layers are adapted.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if lora.type in ("lora", "dora"):
        if lora.init == "pissa" and lora.type == "dora":
            raise LensTuneError("lora.init: pissa works with type: lora only (not dora).")
        return LoraConfig(
            r=lora.rank,
            lora_alpha=_alpha(lora),
            lora_dropout=lora.dropout,
            use_rslora=lora.rslora,
            use_dora=lora.type == "dora",
            init_lora_weights=_LORA_INIT[lora.init],
            target_modules=list(modules),
            bias="none",
        )
    # LoKr/LoHa (LyCORIS) have no input dropout, no rank-stabilised scaling and no alternative inits in PEFT:
    # refuse rather than silently train something else than the recipe says.
    unsupported = [
        text
        for text, is_set in (
            ("dropout", lora.dropout > 0),
            ("rslora", lora.rslora),
            (f"init: {lora.init}", lora.init != "default"),
        )
        if is_set
    ]
    if unsupported:
        raise LensTuneError(f"lora.type {lora.type} does not support {', '.join(unsupported)}; use type lora/dora.")
    config_cls = {"lokr": LoKrConfig, "loha": LoHaConfig}.get(lora.type)
    if config_cls is None:
        raise LensTuneError(f"Unknown adapter type '{lora.type}' (lora, dora, lokr, loha).")
    return config_cls(r=lora.rank, alpha=_alpha(lora), target_modules=list(modules), init_weights=True)


def _config_dict(config) -> dict[str, Any]:
    """The PEFT config as plain JSON data (sets become sorted lists), as diffusers' save_lora_adapter stores it."""
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.loads(json.dumps(data, default=str))  # enums -> their string values


def _settings_kind(config) -> str:
    kind = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if kind == "LORA":
        return "dora" if config.use_dora else "lora"
    if kind in ("LOKR", "LOHA"):
        return kind.lower()
    raise ModelLoadError(f"Unsupported adapter type {kind}: lens-tune reads LoRA, DoRA, LoKr and LoHa adapters.")


# ----------------------------------------------------------------------------------------------------------------
# Creating adapters
# ----------------------------------------------------------------------------------------------------------------
def is_quantized(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "is_loaded_in_8bit", False) or getattr(transformer, "is_loaded_in_4bit", False))


def _adapter_names(transformer: nn.Module) -> set[str]:
    return set(getattr(transformer, "peft_config", None) or {})


def _inject(transformer: nn.Module, config, adapter_name: str) -> list[nn.Parameter]:
    """Inject the adapter, keep its weights in float32 and return its parameters (in module order)."""
    from diffusers.loaders import PeftAdapterMixin
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    if adapter_name in _adapter_names(transformer):
        raise LensTuneError(f"The transformer already has an adapter named '{adapter_name}'.")
    before = {id(p) for p in transformer.parameters()}
    if isinstance(transformer, PeftAdapterMixin):
        # diffusers' add_adapter takes any PeftConfig (LoKr/LoHa too) and calls inject_adapter_in_model; going
        # through it also does diffusers' bookkeeping, so set_adapters/delete_adapters/load_lora_adapter keep working.
        transformer.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    # PEFT creates adapter weights in the base layer's dtype; only PeftModel upcasts them (autocast_adapter_dtype),
    # inject_adapter_in_model does not. Train them in float32 even on a bf16 base: tiny low-rank updates vanish in
    # bf16 rounding. The LoRA layers cast their input to the adapter dtype and the result back, so this just works.
    cast_adapter_dtype(transformer, adapter_name=adapter_name, autocast_adapter_dtype=True)
    # The injected parameters are exactly the ones that did not exist before (the base layers keep theirs).
    return [p for p in transformer.parameters() if id(p) not in before]


def add_adapter(transformer: nn.Module, lora: LoraSettings, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a trainable adapter as `lora` describes; freeze everything else; return the adapter's parameters.

    The parameters are float32 whatever the base dtype. The new adapter becomes the only active one (diffusers'
    add_adapter semantics). With `lora.init_from` set, the weights of that saved adapter are loaded (strictly) after
    injection, to continue training it. PiSSA rewrites the adapted base weights (into the residual of their top
    singular directions) and is refused on a quantised base.
    """
    if lora.init == "pissa":
        if is_quantized(transformer):
            raise LensTuneError(
                "lora.init: pissa rewrites the base weights (W = residual + top singular part), which a quantised "
                "(int8/nf4) base cannot hold. Use init: default or gaussian, or model.quantization: none."
            )
        if lora.init_from is not None:
            raise LensTuneError(
                "lora.init_from continues a saved adapter, whose weights replace the initialisation; PiSSA "
                "initialises from the base weights. Use init: default together with init_from."
            )
    modules = target_modules(transformer, lora.targets, lora.blocks)
    config = adapter_config(lora, modules)
    params = _inject(transformer, config, adapter_name)
    for p in transformer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    if lora.init == "pissa":
        # Keep PiSSA's initial A0/B0: the model is now W_res + s·B·A with W_res = W - s·B0·A0, so the update to the
        # original weights is s·(B·A - B0·A0). save_adapter writes that as a plain LoRA of rank 2r (as PEFT's
        # path_initial_model_for_weight_conversion does), which loads onto the untouched base anywhere.
        initial = {k: v.detach().clone() for k, v in adapter_state_dict(transformer, adapter_name).items()}
        _pissa_initial(transformer)[adapter_name] = initial

    if lora.init_from is not None:
        try:
            source = Path(lora.init_from)
            if (source / "adapter_config.json").is_file():
                saved_config, state, _, source = _read_adapter_folder(source)
                _check_same_kind(saved_config, config, source)
            else:
                state = _exported_state(transformer, source, lora)
            set_adapter_state_dict(transformer, state, adapter_name, source=str(source))
        except BaseException:
            _remove_adapter(transformer, adapter_name)  # leave the model as it was
            raise
    return params


def _exported_state(transformer: nn.Module, path: Path, lora: LoraSettings) -> dict[str, torch.Tensor]:
    """An adapter file in another layout (diffusers, ComfyUI, kohya; LoRA, LoHa or LoKr) as this recipe's adapter
    state: the importer folds the file's scale into the first factor, so divide it by the recipe's scale to keep the
    same outputs."""
    from lens_tune.export.formats import read_adapter_file

    state, info = read_adapter_file(path, [name for name, _ in transformer.named_modules()])
    if info["type"] != lora.type:
        raise LensTuneError(
            f"lora.init_from {path} is a {info['type']} adapter; set lora.type: {info['type']} to continue it "
            f"(a {lora.type} adapter cannot continue from it)."
        )
    if lora.type != "lokr" and info["rank"] != lora.rank:
        raise LensTuneError(f"lora.init_from {path} has rank {info['rank']}; set lora.rank: {info['rank']} to continue it.")
    alpha = lora.alpha if lora.alpha is not None else lora.rank
    scale = alpha / math.sqrt(lora.rank) if lora.rslora else alpha / lora.rank
    first = (".lora_B.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")  # a LoKr module has lokr_w1 or lokr_w1_a
    return {k: v / scale if k.endswith(first) else v for k, v in state.items()}


def load_adapter_state(
    transformer: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor], adapter_name: str, *, source: str
) -> None:
    """Create the adapter that the PEFT config dict describes and load `state` into it strictly; on failure the
    half-made adapter is removed again. Used for files that carry no config of ours (ComfyUI, kohya)."""
    from peft import PeftConfig

    _inject_and_load(transformer, PeftConfig.from_peft_type(**config), state, adapter_name, source)


def _inject_and_load(transformer: nn.Module, config, state: dict[str, torch.Tensor], adapter_name: str, source: str):
    _inject(transformer, config, adapter_name)
    try:
        set_adapter_state_dict(transformer, state, adapter_name, source=source)
    except BaseException:
        _remove_adapter(transformer, adapter_name)  # leave the model as it was
        raise


def _pissa_initial(transformer: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    # A plain attribute (not buffers): it must not enter the model's state dict, nor be moved or cast with it.
    if "_lens_pissa_initial" not in transformer.__dict__:
        transformer.__dict__["_lens_pissa_initial"] = {}
    return transformer.__dict__["_lens_pissa_initial"]


def _check_same_kind(saved, config, source: str) -> None:
    """Settings that change what the loaded weights mean must agree (shapes and key names are checked later)."""
    fields = ("peft_type", "use_dora", "use_rslora", "lora_alpha", "alpha")
    for name in fields:
        a, b = getattr(saved, name, None), getattr(config, name, None)
        if a is not None and b is not None and a != b:
            raise ModelLoadError(
                f"lora.init_from {source}: the saved adapter has {name}={a!r} but the recipe gives {name}={b!r}. "
                "Set the lora section to the saved adapter's settings."
            )


# ----------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------
def adapter_state_dict(transformer: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's keys without the adapter name
    (`transformer_blocks.0.attn.img_qkv.lora_A.weight`). The tensors share memory with the live parameters: clone
    them to keep a snapshot."""
    from peft.functional import get_peft_model_state_dict

    if adapter_name not in _adapter_names(transformer):
        raise LensTuneError(f"The transformer has no adapter named '{adapter_name}'.")
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def set_adapter_state_dict(
    transformer: nn.Module,
    state: dict[str, torch.Tensor],
    adapter_name: str = "default",
    *,
    source: str = "the adapter weights",
) -> None:
    """Load adapter weights (keys as adapter_state_dict gives them) strictly: every key present, no extra key, every
    shape equal; otherwise ModelLoadError naming the first offending keys. Nothing is changed when it fails.

    For a PiSSA adapter it also accepts what save_adapter wrote (the rank-2r LoRA relative to the original base).
    """
    from peft.functional import set_peft_model_state_dict

    current = adapter_state_dict(transformer, adapter_name)
    pissa = _pissa_initial(transformer).get(adapter_name)
    if pissa is not None:
        state = _pissa_from_saved(transformer, state, current, adapter_name, pissa)

    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(current[k].shape)})"
        for k in current
        if k in state and tuple(state[k].shape) != tuple(current[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_first(wrong)}")
    if problems:
        raise ModelLoadError(
            f"{source} do not match the '{adapter_name}' adapter in the model ({len(current)} tensors): "
            + "; ".join(problems)
            + ". Were they saved from an adapter with the same type, rank and targets?"
        )
    result = set_peft_model_state_dict(transformer, dict(state), adapter_name=adapter_name)
    # Belt and braces: PEFT renames keys per adapter type; check that every tensor really landed.
    loaded = adapter_state_dict(transformer, adapter_name)
    stray = [k for k in getattr(result, "unexpected_keys", []) or [] if adapter_name in k.split(".")]
    not_set = [k for k, v in state.items() if not torch.equal(loaded[k], v.to(loaded[k].device, loaded[k].dtype))]
    if stray or not_set:
        raise ModelLoadError(f"{source}: PEFT did not load {_first(stray + not_set)} into the '{adapter_name}' adapter.")


def _pissa_as_lora(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config
) -> tuple[dict[str, torch.Tensor], Any]:
    """PiSSA adapter -> plain LoRA on the original weights: dW = s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0]."""
    out = {}
    for key, value in state.items():
        init = initial[key].to(value.device, value.dtype)
        if ".lora_A." in key:
            out[key] = torch.cat([value, init], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -init], dim=1)
        else:
            raise ModelLoadError(f"Unexpected tensor {key} in a PiSSA adapter.")
    config = copy.deepcopy(config)
    config.r *= 2
    # keep the scaling: alpha/r, or alpha/sqrt(r) with rsLoRA
    config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    config.init_lora_weights = True  # a loader must not run PiSSA (and rewrite its base) again
    return out, config


def _pissa_from_saved(
    transformer: nn.Module,
    state: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    adapter_name: str,
    initial: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Accept a save_adapter file for a PiSSA adapter: split [A ; A0] / [B | -B0] back into the trained A, B and the
    initial A0, B0. If the file's A0/B0 differ from this model's (an SVD on other hardware can differ), re-base the
    adapted weights onto the file's: W_res = (W_res_now + s·B0_now·A0_now) - s·B0·A0."""
    def is_doubled(key: str, value: torch.Tensor) -> bool:
        if key not in state or state[key].dim() != 2:
            return False
        axis = 0 if ".lora_A." in key else 1
        return state[key].shape[axis] == 2 * value.shape[axis]

    doubled = all(is_doubled(k, v) for k, v in current.items())
    if not doubled:
        return state  # the adapter's own state (e.g. from adapter_state_dict); checked as usual
    trained, init = {}, {}
    for key, value in current.items():
        r = value.shape[0] if ".lora_A." in key else value.shape[1]
        saved = state[key]
        if ".lora_A." in key:
            trained[key], init[key] = saved[:r], saved[r:]
        else:
            trained[key], init[key] = saved[:, :r], -saved[:, r:]
    extra = [k for k in state if k not in current]
    trained.update({k: state[k] for k in extra})  # reported as unexpected by the caller
    if not extra and any(not torch.equal(init[k].to(initial[k]), initial[k]) for k in initial):
        with torch.no_grad():
            for module_path in {k.split(".lora_")[0] for k in current}:
                layer = transformer.get_submodule(module_path)
                weight = layer.get_base_layer().weight
                a_key, b_key = f"{module_path}.lora_A.weight", f"{module_path}.lora_B.weight"
                s = layer.scaling[adapter_name]
                old = initial[b_key].float() @ initial[a_key].float()
                new = init[b_key].float().to(weight.device) @ init[a_key].float().to(weight.device)
                weight.copy_((weight.float() + s * (old.to(weight.device) - new)).to(weight.dtype))
        for k in initial:
            initial[k] = init[k].detach().clone().to(initial[k])
    return trained


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading folders
# ----------------------------------------------------------------------------------------------------------------
def save_adapter(
    transformer: nn.Module,
    folder: str | os.PathLike,
    lora: LoraSettings,
    metadata: dict[str, str] | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `folder` (each atomically); returns the folder.

    The safetensors header holds `format=pt`, `lora_adapter_metadata` (the PEFT config as JSON, as diffusers'
    save_lora_adapter writes it), `lens_tune.lora` (the recipe's lora section) and the `metadata` strings. Weights are
    saved in their training dtype (float32). A PiSSA adapter is written as the equivalent rank-2r LoRA on the
    original base weights, so it loads like any LoRA.
    """
    if adapter_name not in _adapter_names(transformer):
        raise LensTuneError(f"The transformer has no adapter named '{adapter_name}' to save.")
    config = transformer.peft_config[adapter_name]
    kind = _settings_kind(config)
    if kind != lora.type:
        raise LensTuneError(f"save_adapter: the model's '{adapter_name}' adapter is {kind}, the settings say {lora.type}.")
    state = adapter_state_dict(transformer, adapter_name)
    initial = _pissa_initial(transformer).get(adapter_name)
    if initial is not None:
        state, config = _pissa_as_lora(state, initial, config)
    elif lora.init == "pissa":
        raise LensTuneError("save_adapter: this PiSSA adapter was not created by add_adapter (its initial weights are unknown).")
    # safetensors wants contiguous CPU tensors that share no memory
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    config_data = _config_dict(config)
    config_data["base_model_name_or_path"] = None
    header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(config_data, indent=2, sort_keys=True),
        SETTINGS_METADATA_KEY: lora.model_dump_json(),
        TENSORS_SHA256_KEY: tensor_digest(state),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"save_adapter metadata must map str to str, got {key!r}: {value!r}")
        if key in header:
            raise ValueError(f"save_adapter metadata key '{key}' is reserved")
        header[key] = value

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write(folder / ADAPTER_WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=header), needed_bytes=size)
    config_json = json.dumps(config_data, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / ADAPTER_CONFIG_NAME, lambda tmp: tmp.write_text(config_json, encoding="utf-8"))
    return folder


@dataclass
class AdapterInfo:
    """What load_adapter found: the fields of LoraSettings plus the adapted module paths and the file's metadata."""

    type: str
    rank: int
    alpha: float
    dropout: float
    rslora: bool
    init: str
    targets: list[str]  # full module paths of the adapted layers
    adapter_name: str = "default"
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header strings save_adapter was given
    config: Any = None  # the PEFT config

    def as_settings(self) -> LoraSettings:
        """A LoraSettings that recreates this adapter (e.g. to keep training it with init_from)."""
        return LoraSettings(
            type=self.type, rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
            init=self.init, targets=list(self.targets),
        )


_FOREIGN_PREFIXES = ("base_model.model.", "transformer.")  # PeftModel.save_pretrained; diffusers pipeline files
_REBASING_INITS = ("pissa", "olora", "corda", "loftq")  # inits that rewrite the base weights


def _read_adapter_folder(path: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, str], str]:
    """(PEFT config, state dict with bare keys, safetensors header, file name) of a saved adapter folder or file."""
    from peft import PeftConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_file():
        folder, weights = path.parent, path
        if weights.suffix != ".safetensors":
            raise ModelLoadError(f"{weights}: adapters are read from .safetensors files only (pickle files can run code).")
    elif path.is_dir():
        folder = path
        found = [path / n for n in (ADAPTER_WEIGHTS_NAME, *OTHER_WEIGHT_NAMES) if (path / n).is_file()]
        if not found:
            pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" It has {', '.join(pickled)}: only safetensors files are read (pickle files can run code)." if pickled else ""
            raise ModelLoadError(f"No {ADAPTER_WEIGHTS_NAME} in {path}.{hint}")
        weights = found[0]
    else:
        raise ModelLoadError(f"Adapter folder {path} does not exist.")

    try:
        with safe_open(str(weights), framework="pt") as f:
            header = dict(f.metadata() or {})
        state = load_file(str(weights))
    except Exception as exc:  # a truncated or non-safetensors file
        raise ModelLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc
    check_tensor_digest(state, header, weights)

    config_file = folder / ADAPTER_CONFIG_NAME
    if config_file.is_file():
        try:
            config_data = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    elif LORA_ADAPTER_METADATA_KEY in header:  # a diffusers save_lora_adapter file carries its config inside
        config_data = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    else:
        raise ModelLoadError(f"No {ADAPTER_CONFIG_NAME} next to {weights}, and the file has no '{LORA_ADAPTER_METADATA_KEY}'.")
    config_data.setdefault("peft_type", "LORA")
    try:
        config = PeftConfig.from_peft_type(**config_data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the adapter config of {weights}: {exc}") from exc
    _settings_kind(config)  # refuses adapter kinds we do not handle
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REBASING_INITS):
        raise ModelLoadError(
            f"{weights} is a {init} adapter saved without conversion: it only works on the base weights its "
            "initialisation rewrote. Convert it to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)."
        )

    for prefix in _FOREIGN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return config, state, header, str(weights)


def _adapted_modules(transformer: nn.Module, adapter_name: str) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, BaseTunerLayer)
        and any(adapter_name in getattr(module, attr, {}) for attr in module.adapter_layer_names)
    ]


def load_adapter(transformer: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> AdapterInfo:
    """Load a saved adapter (any of the four kinds; safetensors only) into `transformer`, strictly, for inference.

    Reads adapter_config.json (or, failing that, the config in the safetensors header), injects the same adapter
    type on the same modules, loads every tensor and freezes the whole model. The adapter becomes the active one.
    On failure the half-made adapter is removed again.
    """
    config, state, header, source = _read_adapter_folder(Path(folder))
    config = copy.deepcopy(config)
    # the weights come from the file: skip random initialisations (the gaussian one is slow on large layers)
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    _inject_and_load(transformer, config, state, adapter_name, source)
    transformer.requires_grad_(False)

    saved_settings = json.loads(header[SETTINGS_METADATA_KEY]) if SETTINGS_METADATA_KEY in header else {}
    kind = _settings_kind(config)
    alpha = config.lora_alpha if hasattr(config, "lora_alpha") else config.alpha
    init = saved_settings.get("init", "default")
    return AdapterInfo(
        type=kind,
        rank=int(config.r),
        alpha=float(alpha),
        dropout=float(getattr(config, "lora_dropout", 0.0)),
        rslora=bool(getattr(config, "use_rslora", False)),
        init="default" if init == "pissa" else init,  # a saved PiSSA adapter is a plain LoRA
        targets=_adapted_modules(transformer, adapter_name),
        adapter_name=adapter_name,
        metadata={k: v for k, v in header.items()
                  if k not in ("format", LORA_ADAPTER_METADATA_KEY, SETTINGS_METADATA_KEY, TENSORS_SHA256_KEY)},
        config=config,
    )


def _remove_adapter(transformer: nn.Module, adapter_name: str) -> None:
    from diffusers.loaders import PeftAdapterMixin
    from peft.functional import delete_adapter

    if adapter_name not in _adapter_names(transformer):
        return
    if isinstance(transformer, PeftAdapterMixin):
        transformer.delete_adapters(adapter_name)
    else:
        config = transformer.peft_config.pop(adapter_name)
        prefix = {"lora": "lora_", "dora": "lora_", "lokr": "lokr_", "loha": "hada_"}[_settings_kind(config)]
        delete_adapter(transformer, adapter_name=adapter_name, prefix=prefix)


# ----------------------------------------------------------------------------------------------------------------
# Quantised base
# ----------------------------------------------------------------------------------------------------------------
_INT8_CLASS: list[type] = []


def _dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight of bitsandbytes' row-wise int8 format (W = CB * SCB / 127), in `dtype`, rounded as bnb rounds it."""
    return CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))


class _FrozenInt8Linear(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen int8 weight (CB, SCB), keeping only the weight for backward.

    bitsandbytes' own autograd functions keep the input x as a plain attribute of their context, for a weight
    gradient that a frozen base never needs. Saved-tensor hooks do not see such attributes, so gradient checkpointing
    cannot drop them: every int8 layer's input stayed alive until backward (3.3 GiB at 1024 px). Here backward
    computes grad_x = grad_y·W from the int8 weight alone.

    The forward computes what bitsandbytes computes on that device (`int8_kernels` says which): int8 activations
    times the int8 weight (its MatMul8bitLt without outlier columns: our layers use threshold 0) on GPUs and in
    inference, or dequantise-and-matmul (its MatMul8bitFp) when training on a CPU. The backward is bnb's grad_x.
    """

    @staticmethod
    def forward(ctx, x, CB, SCB, bias, int8_kernels: bool):
        ctx.save_for_backward(CB, SCB)
        ctx.x_dtype = x.dtype
        if not int8_kernels:
            return nn.functional.linear(x, _dequantize_int8(CB, SCB, x.dtype), bias)
        import bitsandbytes.functional as bnb_functional

        rows = x.reshape(-1, x.shape[-1])
        CA, SCA, _ = bnb_functional.int8_vectorwise_quant(rows.to(torch.float16))
        y = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=x.dtype)
        return y.reshape(*x.shape[:-1], CB.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        CB, SCB = ctx.saved_tensors
        grad_x = torch.matmul(grad_y.to(ctx.x_dtype), _dequantize_int8(CB, SCB, ctx.x_dtype))
        return grad_x, None, None, None, None


def _int8_linear_class() -> type:
    """bnb's Linear8bitLt for a frozen base (built on first use: importing bnb is slow), with two changes.

    - Its forward goes through `_FrozenInt8Linear`, which keeps no input for backward (see there).
    - It is safe to move with the model. bnb keeps the int8 scales (SCB) beside the weight, as attributes of the
      parameter and of `layer.state`, and moves them only in the layer's own `.to()`. `transformer.to("cuda")` does
      not call that: torch swaps each parameter's data, so the scales stayed on the CPU and the first GPU forward
      failed ("Expected a cuda device, but got: cpu").

    It stays a subclass of bnb's layer, so PEFT wraps it with its bnb-aware LoRA layers (merging dequantises it).
    """
    if not _INT8_CLASS:
        import bitsandbytes as bnb

        class Linear8bitLt(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.weight.CB is not None:
                    self.init_8bit_state()  # bnb hands the int8 weight and scales to the layer's state on first use
                bias = None if self.bias is None else self.bias.to(x.dtype)
                # bnb's choice of kernels: dequantise-and-matmul only when training on a CPU/XPU (no fast int8 there)
                int8_kernels = not (self.training and x.device.type in ("cpu", "xpu"))
                return _FrozenInt8Linear.apply(x, self.state.CB, self.state.SCB, bias, int8_kernels)

            def _apply(self, fn, recurse=True):
                super()._apply(fn, recurse)
                weight, state = self.weight, self.state
                if getattr(weight, "CB", None) is not None:
                    weight.CB = weight.data  # CB is the int8 weight itself
                if getattr(weight, "SCB", None) is not None:
                    weight.SCB = weight.SCB.to(weight.device)
                if state.CB is not None:
                    state.CB = weight.data
                if state.SCB is not None:
                    state.SCB = state.SCB.to(weight.device)
                return self

        _INT8_CLASS.append(Linear8bitLt)
    return _INT8_CLASS[0]


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    # bnb quantises a CPU tensor when the parameter is moved (to any device, the CPU included)
    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    if mode == "int8":
        # has_fp16_weights=False: int8 weights only (no float copy kept), the frozen-base setting
        layer = _int8_linear_class()(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer)
        # On CPUs with AVX512-BF16, bnb repacks 4-bit weights for a faster kernel the first time the layer runs in
        # eval mode without grad (a validation sample). That repacking is sticky and its kernel has no backward:
        # the next training step would fail. Keep the standard layout.
        layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)
    quantized = layer.weight.dtype == torch.int8 if mode == "int8" else getattr(layer.weight, "bnb_quantized", False)
    if not quantized:
        raise RuntimeError(f"bitsandbytes did not quantise a {linear.in_features}x{linear.out_features} layer to {mode}")
    layer.train(linear.training)
    return layer


def quantized_layers(n_blocks: int) -> list[str]:
    """The full paths of the layers quantize_base replaces in a transformer of `n_blocks` blocks."""
    return [f"transformer_blocks.{index}.{layer}" for index in range(n_blocks) for layer in QUANTIZED_LAYERS]


def quantize_base(transformer: nn.Module, mode: Literal["int8", "nf4"]) -> None:
    """Replace the blocks' Linear layers listed by `quantized_layers` by bitsandbytes int8 (`Linear8bitLt`) or nf4
    (`Linear4bit`, computing in the model dtype) layers holding the same weights. Call it before add_adapter.

    Sets `is_loaded_in_8bit` / `is_loaded_in_4bit`: PEFT only wraps bnb layers with its bnb-aware LoRA layers when
    the model carries that flag (without it training runs, but merging is wrong).
    """
    if mode not in ("int8", "nf4"):
        raise LensTuneError(f"Unknown quantisation '{mode}': use int8 or nf4.")
    if is_quantized(transformer):
        raise LensTuneError("The transformer is already quantised.")
    if _adapter_names(transformer):
        raise LensTuneError("Quantise the base before adding adapters (quantize_base, then add_adapter).")
    compute_dtype = transformer.dtype
    # Check every layer first, so that a refusal leaves the model untouched.
    layers = []  # (parent module, attribute, Linear)
    for path in quantized_layers(len(transformer.transformer_blocks)):
        parent_name, _, child = path.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            raise LensTuneError(f"{path} is a {type(linear).__name__}, not a plain Linear layer.")
        layers.append((parent, child, linear))
    for parent, child, linear in layers:
        setattr(parent, child, _quantized_linear(linear, mode, compute_dtype))  # ModuleList "0" included
    if mode == "int8":
        transformer.is_loaded_in_8bit = True
    else:
        transformer.is_loaded_in_4bit = True
