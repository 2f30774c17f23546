"""`lens-tune export`: a run's adapter as files other tools load, a model card, and optionally a Hub push.

It reads the run folder only (recipe.lock.yaml, the adapter, the sample grids) and writes an export folder. The
metadata in every file describes the training; it never holds a token or a local path outside the run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lens_tune.errors import LensTuneError

FORMATS = ("diffusers", "comfyui")
# diffusers' LoRA loader reads LoRA and DoRA; ComfyUI's DoRA handling is unverified (see formats._DORA_REFUSAL)
CARRIED_BY = {"lora": FORMATS, "dora": ("diffusers",), "lokr": ("comfyui",), "loha": ("comfyui",)}
COMFYUI_FILE = "lens_comfyui.safetensors"


def run_of(adapter_dir: Path) -> Path:
    """The run folder an adapter belongs to (final adapter or a checkpoint's)."""
    for folder in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        if (folder / "recipe.lock.yaml").is_file():
            return folder
    raise LensTuneError(f"{adapter_dir} is not inside a run folder (no recipe.lock.yaml next to it or above it).")


def scrubbed(value: Any) -> Any:
    """The recipe without local paths: absolute paths become their last component."""
    if isinstance(value, dict):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] == ":\\")):
        return Path(value).name
    return value


def weights_sha256(model_root: Path | None) -> str | None:
    """SHA-256 over the base transformer's weight files (sorted by name), when they are on this machine."""
    if model_root is None:
        return None
    files = sorted((model_root / "transformer").glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(2**24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def export_metadata(recipe, adapter: dict[str, str], steps: int, base_sha256: str | None) -> dict[str, str]:
    from lens_tune import __version__

    source = recipe.model.source
    base = Path(source).name if Path(source).expanduser().exists() else source
    resolution = sorted({r for d in recipe.data.datasets for r in d.resolution})
    metadata = {
        "lens_tune.version": __version__,
        "lens_tune.base_model": base,
        "lens_tune.base_revision": recipe.model.revision or "",
        "lens_tune.adapter": adapter["type"],
        "lens_tune.rank": adapter["rank"],
        "lens_tune.alpha": adapter["alpha"],
        "lens_tune.targets": json.dumps(recipe.lora.targets),
        "lens_tune.trigger": recipe.data.trigger or "",
        "lens_tune.steps": str(steps),
        "lens_tune.resolution": json.dumps(resolution),
        "lens_tune.recipe": json.dumps(scrubbed(recipe.model_dump(mode="json", exclude={"lock"}))),
    }
    if base_sha256:
        metadata["lens_tune.base_sha256"] = base_sha256
    return metadata


def export_adapter(
    path: Path, formats: list[str] | None, out_dir: Path | None = None, push_to: str | None = None, private: bool = True,
    revision: str | None = None, log=print,
) -> Path:
    """Export the adapter meant by `path` (run folder or checkpoint) and return the export folder. `formats`
    None: every format that can carry the adapter's kind (see CARRIED_BY)."""
    from lens_tune.export.card import write_model_card
    from lens_tune.export.formats import export_comfyui, export_diffusers
    from lens_tune.model.sources import locate_model
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe
    from lens_tune.train.run_folder import adapter_dir_of

    unknown = sorted(set(formats or ()) - set(FORMATS))
    if unknown:
        raise LensTuneError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    adapter_dir = adapter_dir_of(path)
    facts = adapter_facts(adapter_dir)
    carried = CARRIED_BY[facts["type"]]
    if formats is None:  # every format that can carry this kind of adapter
        skipped = [f for f in FORMATS if f not in carried]
        if skipped:
            log(f"{facts['type']} adapter: writing {', '.join(carried)} only ({', '.join(skipped)} cannot carry it)")
        formats = list(carried)
    run = run_of(adapter_dir)
    recipe = load_recipe(run / "recipe.lock.yaml", Recipe)
    try:
        model_root = locate_model(recipe.model.source, recipe.model.revision, download=False)
    except LensTuneError:
        model_root = None  # the base is not here: export without its hash
    steps = int(adapter_dir.parent.name.removeprefix("step-")) if adapter_dir.parent.name.startswith("step-") \
        else recipe.train.steps
    metadata = export_metadata(recipe, facts, steps, weights_sha256(model_root))

    out_dir = out_dir or run / "export" / f"step-{steps:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if "diffusers" in formats:  # refuses kinds it cannot carry before anything is written
        log(f"diffusers/PEFT: {export_diffusers(adapter_dir, out_dir, metadata)}")
    if "comfyui" in formats:
        log(f"ComfyUI / stable-diffusion.cpp: {export_comfyui(adapter_dir, out_dir / COMFYUI_FILE, metadata)}")
    grids = sorted(run.glob("samples/step-*/grid.png"))
    write_model_card(out_dir, recipe, repo_id=push_to, trigger=recipe.data.trigger, steps=steps,
                     sample_grid=grids[-1] if grids else None, base_model=metadata["lens_tune.base_model"])
    if push_to:
        from lens_tune.export.hub import push_to_hub

        url = push_to_hub(out_dir, push_to, private=private, revision=revision)
        log(f"pushed to {push_to}: {url}")
    return out_dir


def adapter_facts(adapter_dir: Path) -> dict[str, str]:
    """Kind, rank and alpha of a saved adapter, from its adapter_config.json."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    kind = {"LORA": "dora" if config.get("use_dora") else "lora", "LOKR": "lokr", "LOHA": "loha"}.get(
        str(config.get("peft_type", "LORA")).upper(), str(config.get("peft_type")).lower()
    )
    alpha = config.get("lora_alpha", config.get("alpha", config.get("r")))
    return {"type": kind, "rank": str(config.get("r")), "alpha": str(alpha)}
