"""Adapter files for other tools, and an importer for the LoRA files other Lens trainers write.

Exports (from a folder that `save_adapter` wrote):

* `export_diffusers`: `pytorch_lora_weights.safetensors` with `transformer.<module>.lora_A.weight` /
  `.lora_B.weight` (DoRA: also `.lora_magnitude_vector`) and the PEFT LoraConfig as JSON under the header key
  `lora_adapter_metadata`, as diffusers' `save_lora_adapter` writes it. Loads with
  `load_lora_adapter(..., prefix="transformer")` and `LensPipeline.load_lora_weights`.
* `export_comfyui`: one file with `diffusion_model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and
  `.alpha` (0-dim) per module, fused img_qkv/txt_qkv kept fused: ComfyUI's generic LoRA format, which
  stable-diffusion.cpp also reads. LoHa is written with `hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b` + `.alpha`, LoKr
  with `lokr_w1[_a/_b]/lokr_w2[_a/_b]` (the scale folded into the first factor, no alpha), the LyCORIS names
  ComfyUI's weight adapters read. DoRA is refused (see `_DORA_REFUSAL`).

`read_adapter_file` reads our PEFT folder/file, the two exports above and kohya-style files
(`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, also `lora_unet__`), LoHa and LoKr
included, and returns a PEFT state dict whose scale is folded into the first factor plus the PEFT config to load it
with (scale 1: alpha = rank).

No path is written into any header: only the adapter config (with `base_model_name_or_path` cleared), our lora
settings (with `init_from` cleared) and the caller's metadata strings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from lens_tune.checksums import TENSORS_SHA256_KEY, check_tensor_digest, tensor_digest
from lens_tune.errors import LensTuneError
from lens_tune.files import atomic_write
from lens_tune.train.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LORA_ADAPTER_METADATA_KEY,
    OTHER_WEIGHT_NAMES,
    SETTINGS_METADATA_KEY,
)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMATS = ("peft", "diffusers", "comfyui", "kohya")
_SUPPORTED = (
    "our PEFT folder/file (`transformer_blocks.0.attn.img_qkv.lora_A.weight`), diffusers "
    "(`transformer.<module>.lora_A.weight`), ComfyUI / stable-diffusion.cpp (`diffusion_model.<module>.lora_A.weight` "
    "+ `.alpha`), kohya (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, also `lora_unet__`); "
    "LoHa (`.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b` + `.alpha`) and LoKr (`.lokr_w1[_a/_b]/.lokr_w2[_a/_b]`) "
    "under any of those prefixes (also `lycoris_`)"
)
_DORA_REFUSAL = (
    "DoRA adapters can be exported as: diffusers (PEFT). The ComfyUI / stable-diffusion.cpp export refuses DoRA: "
    "their `dora_scale` handling is not verified to match PEFT's magnitude vector, and a wrong norm axis would "
    "silently change the output. Use export_diffusers, or train type: lora for ComfyUI."
)


# ----------------------------------------------------------------------------------------------------------------
# reading our folder
# ----------------------------------------------------------------------------------------------------------------
def _weights_file(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LensTuneError(f"{path}: adapters are read from .safetensors files only (pickle files can run code).")
        return path
    if path.is_dir():
        for name in (ADAPTER_WEIGHTS_NAME, *OTHER_WEIGHT_NAMES):
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise LensTuneError(f"No {ADAPTER_WEIGHTS_NAME} (or a single .safetensors file) in {path}.")
    raise LensTuneError(f"Adapter {path} does not exist.")


def _load(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            header = dict(f.metadata() or {})
        state = load_file(str(file))
    except Exception as exc:
        raise LensTuneError(f"{file} is not a readable safetensors file: {exc}") from exc
    check_tensor_digest(state, header, file)
    return state, header


def _read_ours(adapter_dir) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(state with bare PEFT keys, PEFT config dict, header) of a folder (or file) save_adapter wrote."""
    file = _weights_file(Path(adapter_dir))
    state, header = _load(file)
    config_file = file.parent / ADAPTER_CONFIG_NAME
    if LORA_ADAPTER_METADATA_KEY in header:
        config = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    elif config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    else:
        raise LensTuneError(f"{file}: no '{LORA_ADAPTER_METADATA_KEY}' in the header and no {ADAPTER_CONFIG_NAME} next to it.")
    if state and all(k.startswith("transformer.") for k in state):
        state = {k[len("transformer."):]: v for k, v in state.items()}
    bad = [k for k in state if k.startswith(("transformer.", "diffusion_model.", "lora_unet_", "base_model."))]
    if bad:
        raise LensTuneError(f"{file} is not a lens-tune adapter folder (keys such as {bad[0]}); use read_adapter_file.")
    if config and all(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items()}
    config.setdefault("peft_type", "LORA")
    return state, config, header


def _kind(config: dict[str, Any]) -> str:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    if peft_type in ("LOKR", "LOHA"):
        return peft_type.lower()
    raise LensTuneError(f"Unsupported adapter type {peft_type}.")


def _check_metadata(metadata: dict[str, str] | None, reserved: Iterable[str]) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"export metadata must map str to str, got {key!r}: {value!r}")
        if key in reserved:
            raise ValueError(f"export metadata key '{key}' is reserved")
        out[key] = value
    return out


def _clean_settings(header: dict[str, str]) -> dict[str, str]:
    """Our lora settings from the source header, with init_from (a path) cleared."""
    if SETTINGS_METADATA_KEY not in header:
        return {}
    settings = json.loads(header[SETTINGS_METADATA_KEY])
    settings["init_from"] = None
    return {SETTINGS_METADATA_KEY: json.dumps(settings, sort_keys=True)}


def _save(state: dict[str, torch.Tensor], file: Path, header: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    header = {**header, TENSORS_SHA256_KEY: tensor_digest(state)}
    size = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write(file, lambda tmp: save_file(state, str(tmp), metadata=header), needed_bytes=size)
    return file


def _module_scales(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """module path -> (rank, PEFT scale) of a LoRA/DoRA state dict."""
    out = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            r = int(value.shape[0])
            rank_pattern = config.get("rank_pattern") or {}
            alpha_pattern = config.get("alpha_pattern") or {}
            if rank_pattern or alpha_pattern:
                raise LensTuneError("Adapters with rank_pattern/alpha_pattern are not supported by the exporter.")
            alpha = float(config.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            out[module] = (r, scale)
    return out


# ----------------------------------------------------------------------------------------------------------------
# exports
# ----------------------------------------------------------------------------------------------------------------
def export_diffusers(adapter_dir, out_dir, metadata: dict[str, str] | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (keys `transformer.<PEFT key>`); returns the file."""
    state, config, header = _read_ours(Path(adapter_dir))
    kind = _kind(config)
    if kind not in ("lora", "dora"):
        raise LensTuneError(
            f"{kind.upper()} adapters can be exported as: comfyui (LyCORIS names, read by ComfyUI and by "
            "LensPipeline.load_lora_weights). The diffusers format refuses them: diffusers' load_lora_adapter reads "
            "LoRA and DoRA only. The run's adapter/ folder (PEFT) also loads as it is."
        )
    config = dict(config)
    config["base_model_name_or_path"] = None
    # as diffusers' pipeline-level save_lora_weights writes it: config keys prefixed like the tensors, which is what
    # load_lora_adapter(prefix="transformer") filters the metadata by
    config = {f"transformer.{k}": v for k, v in config.items()}
    out_header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    out_header.update(_clean_settings(header))
    out_header.update(_check_metadata(metadata, out_header))
    out = {f"transformer.{k}": v for k, v in state.items()}
    return _save(out, Path(out_dir) / DIFFUSERS_WEIGHT_NAME, out_header)


def export_comfyui(adapter_dir, out_file, metadata: dict[str, str] | None = None) -> Path:
    """Write one ComfyUI / stable-diffusion.cpp file (`diffusion_model.<module>.*`); returns it."""
    state, config, header = _read_ours(Path(adapter_dir))
    kind = _kind(config)
    out: dict[str, torch.Tensor] = {}
    if kind == "dora":
        raise LensTuneError(_DORA_REFUSAL)
    if kind == "lora":
        for module, (r, scale) in _module_scales(state, config).items():
            out[f"diffusion_model.{module}.lora_A.weight"] = state[f"{module}.lora_A.weight"]
            out[f"diffusion_model.{module}.lora_B.weight"] = state[f"{module}.lora_B.weight"]
            # ComfyUI / sd.cpp scale = alpha / rank; rsLoRA folds in by alpha = scale * rank
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(scale * r))
        if len(state) * 3 != 2 * len(out) or not out:
            extra = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
            raise LensTuneError(f"Unexpected tensors in the LoRA adapter: {', '.join(extra[:3])}.")
    elif kind == "loha":
        out = _loha_to_lycoris(state, config)
    else:
        out = _lokr_to_lycoris(state, config)
    out_header = {"format": "pt"}
    out_header.update(_clean_settings(header))
    out_header["lens_tune.adapter_type"] = kind
    out_header.update(_check_metadata(metadata, out_header))
    return _save(out, Path(out_file), out_header)


def _loha_to_lycoris(state, config) -> dict[str, torch.Tensor]:
    # PEFT LoHa (Linear): dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r; w*_a [out, r], w*_b [r, in].
    # ComfyUI (LyCORIS): the same product, scale alpha / w1_b.shape[0].
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LensTuneError("LoHa adapters with rank_pattern/alpha_pattern are not supported by the exporter.")
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    out = {}
    for module in modules:
        missing = [n for n in names if f"{module}.{n}" not in state]
        extra = [k for k in state if k.startswith(module + ".") and k.rsplit(".", 1)[1] not in names]
        if missing or extra:
            raise LensTuneError(f"LoHa module {module}: unsupported tensors ({', '.join(missing + extra)}); only Linear LoHa exports.")
        for n in names:
            out[f"diffusion_model.{module}.{n}"] = state[f"{module}.{n}"]
        r = state[f"{module}.hada_w1_b"].shape[0]
        alpha = float(config.get("alpha", r))
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha if r == config.get("r", r) else alpha * r / config["r"])
    return out


def _lokr_to_lycoris(state, config) -> dict[str, torch.Tensor]:
    # PEFT LoKr (Linear): dW = kron(w1, w2) * alpha / r, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (same for w2).
    # ComfyUI reads the same names; it applies alpha / rank only when a factor is decomposed, else 1.0. We fold the
    # PEFT scale into the first factor and write no alpha, so the scale is 1.0 in ComfyUI whatever the layout.
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LensTuneError("LoKr adapters with rank_pattern/alpha_pattern are not supported by the exporter.")
    allowed = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    r = int(config.get("r", 1))
    scale = float(config.get("alpha", r)) / r
    if config.get("rank_dropout_scale"):
        raise LensTuneError("LoKr adapters with rank_dropout_scale are not supported by the exporter.")
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    out = {}
    for module in modules:
        parts = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == module}
        bad = [n for n in parts if n not in allowed]
        ok1 = ("lokr_w1" in parts) != ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
        ok2 = ("lokr_w2" in parts) != ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
        if bad or not ok1 or not ok2 or any(v.dim() != 2 for v in parts.values()):
            raise LensTuneError(f"LoKr module {module}: unsupported tensors ({', '.join(sorted(parts))}); only Linear LoKr exports.")
        first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
        for n, v in parts.items():
            out[f"diffusion_model.{module}.{n}"] = v * scale if n == first else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------------------------
_TEMPLATE: list[str] = []


def lens_module_names() -> list[str]:
    """Names of the Lens transformer's modules with a 2-D weight, with block names as `transformer_blocks.{i}.*`
    templates taken from block 0 (built once on the meta device from the tiny config)."""
    if not _TEMPLATE:
        from lens_tune.model.tiny import TINY_TRANSFORMER_CONFIG
        from lens_tune.model.transformer import LensTransformer2DModel

        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            model = LensTransformer2DModel(**dict(TINY_TRANSFORMER_CONFIG))
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            if name.startswith("transformer_blocks."):
                index, rest = name[len("transformer_blocks."):].split(".", 1)
                if index == "0":
                    _TEMPLATE.append("transformer_blocks.{i}." + rest)
            else:
                _TEMPLATE.append(name)
    return list(_TEMPLATE)


def _kohya_resolver(module_names: Iterable[str] | None):
    """A function mapping `transformer_blocks_3_attn_img_qkv` to `transformer_blocks.3.attn.img_qkv` (or None)."""
    names = list(module_names) if module_names is not None else lens_module_names()
    block_map: dict[str, str | None] = {}
    flat_map: dict[str, str | None] = {}
    for name in names:
        m = re.fullmatch(r"transformer_blocks\.(\d+|\{i\})\.(.+)", name)
        target, key, real = (block_map, m.group(2), m.group(2)) if m else (flat_map, name, name)
        u = key.replace(".", "_")
        target[u] = real if target.get(u, real) == real else None  # None: ambiguous
    def resolve(u: str) -> str | None:
        m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", u)
        if m:
            rest = block_map.get(m.group(2))
            return f"transformer_blocks.{m.group(1)}.{rest}" if rest else None
        return flat_map.get(u)
    return resolve


# The tensors of one adapted module, by key suffix: LoRA (PEFT and kohya names) and the LyCORIS names ComfyUI reads.
_LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B"}
_LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_SUFFIXES = {**_LORA_PARTS, ".alpha": "alpha", **{f".{n}": n for n in _LOHA_PARTS + _LOKR_PARTS}}
_UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")  # kohya / LyCORIS trainers: module path with `_` for `.`


def _split(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _unknown(file, keys: list[str], why: str = "") -> LensTuneError:
    shown = ", ".join(keys[:5]) or "(no tensors)"
    return LensTuneError(
        f"{file}: unknown adapter key layout{(' (' + why + ')') if why else ''}; first keys: {shown}. "
        f"Supported: {_SUPPORTED}."
    )


def _by_module(file, state, keys, module_names) -> tuple[str, dict[tuple[str, str], torch.Tensor]]:
    """(format, {(module path, part): tensor}) of a file in any supported key layout."""
    renamed = {}
    underscore = next((p for p in _UNDERSCORE_PREFIXES if all(k.startswith(p) for k in keys)), None)
    if underscore:
        resolve = _kohya_resolver(module_names)
        for k in keys:
            split = _split(k)
            if split is None:
                raise _unknown(file, keys, f"unexpected kohya tensor {k}")
            module = resolve(split[0][len(underscore):].lstrip("_"))
            if module is None:
                raise _unknown(file, keys, f"no transformer module matches {split[0]}")
            renamed[(module, split[1])] = state[k]
        return "kohya", renamed
    fmt, prefix = None, ""
    if all(k.startswith("diffusion_model.") for k in keys):
        fmt, prefix = "comfyui", "diffusion_model."
    elif all(k.startswith("transformer.") for k in keys):
        fmt, prefix = "diffusers", "transformer."
    elif all(k.split(".", 1)[0] in {n.split(".")[0] for n in lens_module_names()} for k in keys):
        fmt = "peft"
    if fmt is None:
        raise _unknown(file, keys)
    for k in keys:
        split = _split(k[len(prefix):])
        if split is None:
            raise _unknown(file, keys, f"unexpected tensor {k}")
        renamed[split] = state[k]
    return fmt, renamed


def _saved_config(file: Path, header: dict[str, str]) -> dict[str, Any]:
    """The PEFT config a peft/diffusers file carries in its header or beside it ({} when none)."""
    config: dict[str, Any] = {}
    if LORA_ADAPTER_METADATA_KEY in header:
        config = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    elif (file.parent / ADAPTER_CONFIG_NAME).is_file():
        config = json.loads((file.parent / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    if config and all(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LensTuneError(f"{file}: rank_pattern/alpha_pattern are not supported by read_adapter_file.")
    return config


def _uniform_config(peft_type: str, ranks: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """A PEFT config (as a dict) for `ranks` (module -> rank) whose scale is 1 everywhere: alpha = rank, the most
    common rank as `r` and the other modules in rank_pattern/alpha_pattern (full module paths)."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda v: (counts[v], v))
    pattern = {m: v for m, v in ranks.items() if v != r}
    alpha_key = "lora_alpha" if peft_type == "LORA" else "alpha"
    return {
        "peft_type": peft_type, "r": r, alpha_key: r, "target_modules": sorted(ranks),
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), **extra,
    }


def read_adapter_file(path, module_names: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter file in any supported layout; return (PEFT state dict, info).

    LoRA: the state dict has `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r] with the file's
    scale (alpha / rank, or PEFT's rsLoRA alpha / sqrt(rank)) folded into lora_B. LoHa / LoKr (the LyCORIS names
    ComfyUI reads, or our PEFT folder): PEFT's `hada_*` / `lokr_*` tensors with the scale folded into the first factor
    (hada_w1_a, lokr_w1 or lokr_w1_a). Either way load it with `info["config"]`, whose scale is 1 (alpha = rank).
    info: type (lora | loha | lokr), config (PEFT config dict), format (peft | diffusers | comfyui | kohya), rank
    (int when every module has the same rank, else None), ranks (module -> rank), alpha (= rank after folding when
    uniform), source_alpha (the file's alphas, module -> alpha; None where the file had none), targets (module
    paths). `module_names` are the transformer's module names (default: the Lens transformer's), used to map
    kohya's underscore names back to module paths.
    """
    file = _weights_file(Path(path))
    state, header = _load(file)
    keys = sorted(state)
    if not keys:
        raise _unknown(file, keys)
    if any(k.endswith(("lora_magnitude_vector", ".dora_scale")) or ".lora_magnitude_vector" in k for k in keys):
        raise LensTuneError(
            f"{file} is a DoRA adapter: it is not a plain LoRA and cannot be folded into one. "
            "Load it with lens_tune's load_adapter, diffusers' load_lora_adapter or LensPipeline.load_lora_weights."
        )
    fmt, renamed = _by_module(file, state, keys, module_names)
    config = _saved_config(file, header) if fmt in ("peft", "diffusers") else {}
    parts = {part for _, part in renamed}
    kind = "loha" if parts & set(_LOHA_PARTS) else "lokr" if parts & set(_LOKR_PARTS) else "lora"
    if config:
        saved = _kind({"peft_type": config.get("peft_type", "LORA"), "use_dora": config.get("use_dora")})
        if saved != kind:
            raise LensTuneError(f"{file}: its config says {saved.upper()} but its tensors are {kind.upper()} tensors.")
    read = {"lora": _read_lora, "loha": _read_loha, "lokr": _read_lokr}[kind]
    out, ranks, source_alpha, extra = read(file, keys, renamed, config)
    uniform = len(set(ranks.values())) == 1
    rank = next(iter(ranks.values())) if uniform else None
    info = {
        "type": kind,
        "config": _uniform_config(kind.upper(), ranks, extra),
        "format": fmt,
        "rank": rank,
        "alpha": float(rank) if uniform else None,
        "ranks": ranks,
        "source_alpha": source_alpha,
        "targets": sorted(ranks),
        "file": file.name,
    }
    return out, info


def _modules(renamed) -> list[str]:
    return sorted({m for m, _ in renamed})


def _file_alpha(renamed, module) -> float | None:
    alpha = renamed.get((module, "alpha"))
    return None if alpha is None else float(alpha.float().reshape(-1)[0])


def _read_lora(file, keys, renamed, config):
    out, ranks, source_alpha = {}, {}, {}
    for module in _modules(renamed):
        a, b = renamed.get((module, "A")), renamed.get((module, "B"))
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise _unknown(file, keys, f"module {module} lacks a matching down/up (A/B) pair")
        if len([p for m, p in renamed if m == module]) > (3 if (module, "alpha") in renamed else 2):
            raise _unknown(file, keys, f"module {module} mixes LoRA and LyCORIS tensors")
        r = int(a.shape[0])
        if config:  # PEFT: alpha / rank (rsLoRA: alpha / sqrt(rank))
            alpha = float(config.get("lora_alpha", r))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        else:  # kohya / ComfyUI: alpha / rank, 1.0 without alpha
            alpha = _file_alpha(renamed, module)
            scale = 1.0 if alpha is None else alpha / r
        out[f"{module}.lora_A.weight"] = a.contiguous()
        out[f"{module}.lora_B.weight"] = (b * scale).to(b.dtype).contiguous()
        ranks[module], source_alpha[module] = r, (alpha if config or alpha is not None else None)
    return out, ranks, source_alpha, {}


def _lycoris_parts(file, keys, renamed, module, names) -> dict[str, torch.Tensor]:
    parts = {p: v for (m, p), v in renamed.items() if m == module and p != "alpha"}
    bad = [p for p in parts if p not in names] + [p for p, v in parts.items() if v.dim() != 2]
    if bad:
        raise _unknown(file, keys, f"module {module} has tensors {', '.join(sorted(parts))}; only Linear LoHa/LoKr reads")
    return parts


def _read_loha(file, keys, renamed, config):
    # PEFT and ComfyUI agree: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, rank = w1_b.shape[0].
    out, ranks, source_alpha = {}, {}, {}
    for module in _modules(renamed):
        parts = _lycoris_parts(file, keys, renamed, module, _LOHA_PARTS)
        if set(parts) != set(_LOHA_PARTS):
            raise _unknown(file, keys, f"LoHa module {module} lacks {', '.join(sorted(set(_LOHA_PARTS) - set(parts)))}")
        r = int(parts["hada_w1_b"].shape[0])
        alpha = float(config.get("alpha", r)) if config else _file_alpha(renamed, module)
        scale = 1.0 if alpha is None else alpha / r
        for name, value in parts.items():
            out[f"{module}.{name}"] = (value * scale if name == "hada_w1_a" else value).contiguous()
        ranks[module], source_alpha[module] = r, alpha
    return out, ranks, source_alpha, {}


def _read_lokr(file, keys, renamed, config):
    # dW = kron(w1, w2) * scale, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (same for w2). PEFT's scale is alpha / r;
    # ComfyUI's is alpha / rank of the decomposed factor, or 1.0 when no factor is decomposed or there is no alpha.
    # PEFT derives the factor shapes from (r, decompose_both, decompose_factor), so those are inferred per module
    # and the adapter is recreated with them; a layout PEFT cannot make is refused.
    from peft.tuners.lokr.layer import factorization

    out, ranks, source_alpha = {}, {}, {}
    shapes = {}
    for module in _modules(renamed):
        parts = _lycoris_parts(file, keys, renamed, module, _LOKR_PARTS)
        one = ("lokr_w1" in parts) != ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
        two = ("lokr_w2" in parts) != ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
        if not (one and two) or len(parts) not in (2, 3, 4):
            raise _unknown(file, keys, f"LoKr module {module} has tensors {', '.join(sorted(parts))}")
        w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
        w2 = parts["lokr_w2"].shape if "lokr_w2" in parts else (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
        decomposed = [parts[n].shape[0] for n in ("lokr_w1_b", "lokr_w2_b") if n in parts]
        if len(set(decomposed)) > 1:
            raise _unknown(file, keys, f"LoKr module {module} has two factors of different ranks")
        shapes[module] = (tuple(w1), tuple(w2), "lokr_w1_a" in parts, "lokr_w2_a" in parts, decomposed[0] if decomposed else None)
        if config:
            r_saved = int(config.get("r", 1))
            alpha = float(config.get("alpha", r_saved))
            scale = alpha / r_saved
        else:
            alpha = _file_alpha(renamed, module)
            scale = alpha / decomposed[0] if (alpha is not None and decomposed) else 1.0
        first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
        for name, value in parts.items():
            out[f"{module}.{name}"] = (value * scale if name == first else value).contiguous()
        source_alpha[module] = alpha

    decompose_both = any(split1 for _, _, split1, _, _ in shapes.values())
    for factor in [-1] + sorted({w1[1] for w1, *_ in shapes.values()}):
        if all(
            (w1[0], w2[0]) == factorization(w1[0] * w2[0], factor) and (w1[1], w2[1]) == factorization(w1[1] * w2[1], factor)
            for w1, w2, *_ in shapes.values()
        ):
            break
    else:
        raise LensTuneError(
            f"{file}: its LoKr factor shapes do not come from one factorisation PEFT can recreate "
            f"(decompose_factor); lens-tune cannot load it."
        )
    for module, (w1, w2, split1, split2, rank) in shapes.items():
        # PEFT splits w1 only if decompose_both and r < max(w1 dims)/2, and w2 only if r < max(w2 dims)/2; with both
        # factors full any r >= half of every dim recreates the layout.
        r = max(*w1, *w2) if rank is None else rank
        if split1 != (decompose_both and r < max(w1) / 2) or split2 != (r < max(w2) / 2):
            raise LensTuneError(
                f"{file}: LoKr module {module} has a factor layout PEFT does not create for rank {r}; lens-tune "
                "cannot load it."
            )
        ranks[module] = r
    return out, ranks, source_alpha, {"decompose_both": decompose_both, "decompose_factor": factor}
