"""Does a plan fit a memory budget, and which recipe changes, cheapest first, make it fit.

Fitting leaves room for what the plan does not count as tensors: the CUDA context and the kernels' workspaces
(CUDA_CONTEXT) and the caching allocator's rounding and fragmentation (ALLOCATOR_FACTOR). Both are first guesses to
be checked against benchmarks/train_step_gpu.py, which records peak allocated and peak reserved memory.

The changes are tried in the order of what they cost: checkpointing (time only), an 8-bit optimizer, a quantised
base (a little quality), a smaller rank, a smaller micro-batch with accumulation, a smaller resolution, smaller
validation samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from lens_tune.plan.phases import GiB, Plan, make_plan
from lens_tune.recipe.schema import Recipe

CUDA_CONTEXT = GiB // 2
ALLOCATOR_FACTOR = 1.05


def fits(peak: int, budget: int) -> bool:
    return peak * ALLOCATOR_FACTOR + CUDA_CONTEXT <= budget


def detect_gpu_memory() -> tuple[int, str] | None:
    """(total bytes, name) of the first CUDA GPU, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.total_memory, props.name


@dataclass(frozen=True)
class Change:
    overrides: tuple[str, ...]  # KEY=VALUE, as the command line takes them
    peaks: dict[str, int]  # the phases that did not fit: their peak after the change


def _changed(recipe: Recipe, key: str, value) -> Recipe:
    copy = recipe.model_copy(deep=True)
    *path, last = key.split(".")
    node = copy
    for part in path:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    setattr(node, last, value)
    return copy


Setting = tuple[str, object]  # a recipe key and its new value


def _candidates(recipe: Recipe) -> list[tuple[Setting, ...]]:
    """Changes worth trying, cheapest first; each is one or more settings that go together."""
    train, lora = recipe.train, recipe.lora
    out: list[tuple[Setting, ...]] = []
    if not train.gradient_checkpointing:
        out.append((("train.gradient_checkpointing", True),))
    if train.optimizer in ("adamw", "prodigy"):
        out.append((("train.optimizer", "adamw8bit"),))
    if recipe.model.modulation_device == "gpu" and not lora.adapts_modulation:
        out.append((("model.modulation_device", "cpu"),))  # exact, unlike quantisation; costs host time per step
    if recipe.model.quantization == "none":
        out.append((("model.quantization", "int8"),))
    if recipe.model.quantization != "nf4":
        out.append((("model.quantization", "nf4"),))
    if lora.rank > 4:
        out.append((("lora.rank", lora.rank // 2),))
    if train.batch_size > 1:  # the same images per optimizer step, one at a time
        out.append((("train.batch_size", 1), ("train.gradient_accumulation", train.gradient_accumulation * train.batch_size)))
    for i, dataset in enumerate(recipe.data.datasets):
        smaller = sorted({r - 256 for r in dataset.resolution if r - 256 >= 256})
        if smaller:
            out.append(((f"data.datasets.{i}.resolution", smaller),))
    size = min(recipe.validation.width or 10**6, recipe.validation.height or 10**6, recipe.data.datasets[0].resolution[0])
    if recipe.validation.prompts and size > 512:
        out.append((("validation.width", 512), ("validation.height", 512)))
    return out


def _apply(recipe: Recipe, settings: tuple[Setting, ...]) -> Recipe:
    for key, value in settings:
        recipe = _changed(recipe, key, value)
    return recipe


def _override(key: str, value) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")
    return f"{key}={text}"


def changes_to_fit(recipe: Recipe, plan: Plan, budget: int) -> list[Change]:
    """For the phases that run every time (training step, validation) and do not fit: up to three single changes
    that make them fit, or else the shortest run of cumulative changes that does. Empty if all fits, or if nothing
    tried helps enough."""
    failing = [p.name for p in plan.phases if p.every_run and not fits(p.peak, budget)]
    if not failing:
        return []

    def peaks(candidate: Recipe) -> dict[str, int]:
        new = make_plan(candidate, plan.device, plan.text_tokens)
        return {name: new.phase(name).peak for name in failing}

    def change(settings: tuple[Setting, ...], after: dict[str, int]) -> Change:
        final = dict(settings)  # a later setting of the same key (nf4 after int8) replaces the earlier one
        return Change(tuple(_override(key, value) for key, value in final.items()), after)

    candidates = _candidates(recipe)
    singles = []
    for settings in candidates:
        after = peaks(_apply(recipe, settings))
        if all(fits(peak, budget) for peak in after.values()):
            singles.append(change(settings, after))
    if singles:
        return singles[:3]
    applied: tuple[Setting, ...] = ()
    for settings in candidates:
        applied += settings
        after = peaks(_apply(recipe, applied))
        if all(fits(peak, budget) for peak in after.values()):
            return [change(applied, after)]
    return []
