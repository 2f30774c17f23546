"""The model card (README.md) of an export folder: Hub front matter, usage and the training settings.

Only file names and settings go in: never a token, never an absolute local path.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePath

import yaml

__all__ = ["write_model_card", "SAMPLES_NAME", "DIFFUSERS_FILE", "COMFYUI_FILE"]

SAMPLES_NAME = "samples.png"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "lens_comfyui.safetensors"
TAGS = ["lora", "text-to-image", "lens", "lens-tune", "diffusers"]


def _fill(text: str | None, trigger: str | None) -> str | None:
    if text is None:
        return None
    return text.replace("[trigger]", trigger) if trigger else text


def _safe_model(base_model: str) -> str:
    """A Hub id stays; a local folder becomes its name (no absolute path in the card)."""
    p = PurePath(base_model)
    if p.is_absolute() or base_model.startswith(("~", ".")) or "\\" in base_model:
        return p.name or base_model
    return base_model


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_model_card(
    export_dir: Path | str,
    recipe,
    *,
    repo_id: str | None,
    trigger: str | None,
    steps: int,
    sample_grid: Path | None,
    base_model: str,
) -> Path:
    """Write `export_dir/README.md` (and copy `sample_grid` to `export_dir/samples.png`); return the README path."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    model = _safe_model(base_model)
    trigger = trigger or getattr(recipe.data, "trigger", None)
    instance_prompt = _fill(recipe.dreambooth.instance_prompt, trigger) or trigger
    prompts = [_fill(p, trigger) for p in recipe.validation.prompts]

    grid = None
    if sample_grid is not None and Path(sample_grid).is_file():
        shutil.copyfile(sample_grid, export_dir / SAMPLES_NAME)
        grid = SAMPLES_NAME

    front: dict = {"base_model": model, "library_name": "diffusers", "license": "mit", "tags": list(TAGS)}
    if instance_prompt:
        front["instance_prompt"] = instance_prompt
    if prompts:
        front["widget"] = [{"text": p, **({"output": {"url": grid}} if grid else {})} for p in prompts]

    name = repo_id.split("/")[-1] if repo_id else export_dir.name
    adapter_ref = repo_id or "path/to/this/folder"
    files = sorted(p.name for p in export_dir.glob("*.safetensors"))
    lora = recipe.lora
    train = recipe.train
    resolutions = sorted({r for d in recipe.data.datasets for r in d.resolution})
    kinds = sorted({d.kind for d in recipe.data.datasets})

    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {name}", ""]
    what = f"A {lora.type.upper() if lora.type != 'lora' else 'LoRA'} adapter for [{model}]"
    what += f"(https://huggingface.co/{model})" if "/" in model else f"({model})"
    what += f", trained with [lens-tune](https://pypi.org/project/lens-tune/) on {' and '.join(kinds)} data."
    lines += [what, ""]
    if trigger:
        lines += [f"**Trigger word:** `{trigger}`. Put it in your prompt to get the trained "
                  f"{'subject' if 'subject' in kinds else 'style'}.", ""]
    if instance_prompt and instance_prompt != trigger:
        lines += [f"**Instance prompt:** `{instance_prompt}`", ""]
    if grid:
        lines += ["## Samples", "", f"![validation samples after {steps} steps]({grid})", ""]
        if prompts:
            lines += ["Prompts, one per row:", ""] + [f"- `{p}`" for p in prompts] + [""]
    example = prompts[0] if prompts else (instance_prompt or "a photo")
    lines += ["## Usage", "", "### lens-tune", "", "```bash",
              f'lens-tune sample --model {model} --adapter {adapter_ref} --prompt "{example}"', "```", ""]
    lines += ["### diffusers", "", "```python", "import torch", "from lens_tune import LensPipeline", "",
              f'pipe = LensPipeline.from_pretrained("{model}", torch_dtype=torch.bfloat16).to("cuda")',
              f'pipe.load_lora_weights("{adapter_ref}", weight_name="{DIFFUSERS_FILE}")',
              f'image = pipe("{example}").images[0]', 'image.save("out.png")', "```", ""]
    lines += ["### ComfyUI", "",
              f"Download `{COMFYUI_FILE}` into `ComfyUI/models/loras/` and load it with a *LoraLoaderModelOnly* node "
              "between the Lens model loader and the sampler.", ""]
    if files:
        lines += ["### Files", ""] + [f"- `{f}`" for f in files] + [""]
    alpha = lora.alpha if lora.alpha is not None else lora.rank
    targets = lora.targets if isinstance(lora.targets, str) else ", ".join(lora.targets)
    rows = [
        ("adapter type", lora.type), ("rank", lora.rank), ("alpha", alpha), ("targets", targets),
        ("steps", steps), ("learning rate", train.learning_rate), ("optimizer", train.optimizer),
        ("lr schedule", train.lr_scheduler), ("resolution(s)", ", ".join(str(r) for r in resolutions)),
        ("batch size", train.batch_size), ("gradient accumulation", train.gradient_accumulation),
    ]
    if recipe.dreambooth.prior_preservation:
        rows.append(("prior preservation", f"yes ({_fill(recipe.dreambooth.class_prompt, trigger)})"))
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    readme = export_dir / "README.md"
    readme.write_text("\n".join(lines), encoding="utf-8")
    return readme
