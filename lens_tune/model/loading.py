"""Finding and reading model checkpoints: local folders, Hub repos, sharded and single-file safetensors.

Everything here is strict on purpose. A checkpoint that does not match the model fails with the first offending
keys named; nothing loads silently with random weights, and nothing is ever unpickled.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from lens_tune.errors import ModelLoadError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SHOWN_KEYS = 5  # how many offending keys an error message lists


def resolve_folder(source: str | Path, subfolder: str | None = None, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id fetched into the Hugging Face cache (only `subfolder` when given)."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a folder (looked for the model under '{source}').")
        return folder
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise ModelLoadError(
            f"Model source '{source}' is neither an existing local path nor a Hub repo id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{subfolder}/*", "model_index.json"] if subfolder else None
    try:
        root = Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise ModelLoadError(
            f"Could not fetch '{source}' from the Hugging Face Hub ({type(err).__name__}: {err}). Check the repo id "
            "and your network, or point the model source at a local folder or single file."
        ) from err
    return root / subfolder if subfolder else root


def safetensors_files(folder: Path, weights_name: str = WEIGHTS_NAME) -> list[Path]:
    """The weight files of a diffusers-layout folder: one file, or the shards listed in its index."""
    single, index = folder / weights_name, folder / (weights_name + ".index.json")
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{index} is not a valid shard index ({err}).") from err
        shards = sorted({folder / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are not in {folder}: {', '.join(missing[:SHOWN_KEYS])}.")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}). lens-tune loads safetensors only, "
            "because unpickling a file can run arbitrary code. Convert it to .safetensors first."
        )
    raise ModelLoadError(f"No {weights_name} (or {weights_name}.index.json) in {folder}.")


def read_safetensors(files: Iterable[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files; a corrupt or non-safetensors file is named in the error."""
    tensors: dict[str, torch.Tensor] = {}
    device = torch.device(device)
    device = "cpu" if device.type == "cpu" else str(device)  # safetensors refuses "cpu:0"
    for file in files:
        file = Path(file)
        if file.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"{file} is a pickle checkpoint. lens-tune loads safetensors only, because unpickling a file can "
                "run arbitrary code. Convert it to .safetensors first."
            )
        if not file.is_file():
            raise ModelLoadError(f"Checkpoint file {file} does not exist.")
        try:
            with safe_open(str(file), framework="pt", device=device) as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(
                f"{file} could not be read as safetensors ({err}). The file may be truncated or not a "
                "safetensors checkpoint; download it again."
            ) from err
    return tensors


def strip_known_prefix(
    state_dict: Mapping[str, torch.Tensor], anchor: str, prefixes: Iterable[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Keep the keys under the first prefix whose `prefix + anchor` exists, with the prefix removed.

    Single-file checkpoints name the denoiser's weights under various prefixes (Comfy-Org files use none,
    others `model.diffusion_model.`, `transformer.`, ...). Keys of other components under other prefixes are left
    out. With no prefix found the keys are returned as they are.
    """
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix + anchor in state_dict:
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix
    return dict(state_dict), ""


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str, hint: str = ""
) -> None:
    """Raise ModelLoadError naming missing keys, unexpected keys and shape mismatches, the first few of each."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and _shape(found[k]) != _shape(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        shown = ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:SHOWN_KEYS])
        problems.append(f"{len(missing)} missing key(s), first: {shown}")
    if unexpected:
        shown = ", ".join(f"{k} {_shape(found[k])}" for k in unexpected[:SHOWN_KEYS])
        problems.append(f"{len(unexpected)} unexpected key(s), first: {shown}")
    if mismatched:
        shown = ", ".join(
            f"{k} is {_shape(found[k])} in the file, expected {_shape(expected[k])}" for k in mismatched[:SHOWN_KEYS]
        )
        problems.append(f"{len(mismatched)} shape mismatch(es): {shown}")
    raise ModelLoadError(f"{source} does not match the model: " + "; ".join(problems) + "." + (f" {hint}" if hint else ""))


def read_config(folder: Path, config_name: str = "config.json") -> dict:
    path = folder / config_name
    if not path.is_file():
        raise ModelLoadError(f"No {config_name} in {folder}: a diffusers-layout model folder needs one.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from err


def build_on_meta(model_cls, config: Mapping, source: str):
    """Instantiate `model_cls(**config)` without allocating weights; config errors name the source."""
    init_keys = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    ignored = sorted(set(kwargs) - init_keys)
    if ignored:
        logger.info("%s: ignoring config keys the class does not take: %s", source, ", ".join(ignored))
    try:
        with torch.device("meta"):
            return model_cls(**{k: v for k, v in kwargs.items() if k in init_keys})
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{source}: invalid config for {model_cls.__name__}: {err}") from err


def load_weights_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, hint: str = ""):
    """Check then assign the weights to a meta-built model, strictly."""
    check_state_dict(model.state_dict(), state_dict, source, hint)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
