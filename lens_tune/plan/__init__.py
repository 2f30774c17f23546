"""The memory planner: predicts each phase's peak memory from a recipe without loading weights.

- architecture.py: sizes and adapted layers, read off the real transformer class built on the meta device
- memory.py: a training step's peak (weights, adapter, optimizer state, activations, work buffers)
- components.py: the text encoder, the VAE and the denoiser when sampling
- phases.py: a recipe's phases and their peaks (`make_plan`)
- advice.py: budgets, and the recipe changes that make a plan fit
- report.py: the table
- flops.py: the work of a step, for MFU
- measure.py: live-tensor measurement, what the tests hold the model to
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|G|M)?\s*$", re.IGNORECASE)
UNITS = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}


def parse_size(text: str) -> int:
    """'16GiB', '16 GB', '12000MiB' or a plain number of GiB -> bytes."""
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a memory size; write e.g. 16GiB, 16GB or 12000MiB")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "GiB").lower()])


@dataclass(frozen=True)
class PlanResult:
    text: str
    fits: bool | None  # every phase that runs on every `run` fits the budget; None without a budget


def plan_recipe(recipe, name: str, device: str = "cuda", vram: int | None = None, text_tokens: int | None = None) -> PlanResult:
    """Plan `recipe` for `device`, against `vram` bytes or the detected GPU's memory (on `cuda`)."""
    from lens_tune.plan.advice import changes_to_fit, detect_gpu_memory, fits
    from lens_tune.plan.phases import DEFAULT_TEXT_TOKENS, make_plan
    from lens_tune.plan.report import format_plan

    plan = make_plan(recipe, device, text_tokens or DEFAULT_TEXT_TOKENS)
    budget = None
    if vram is not None:
        budget = (vram, "--vram")
    elif device == "cuda":
        detected = detect_gpu_memory()
        budget = (detected[0], f"detected: {detected[1]}") if detected else None
    changes = changes_to_fit(recipe, plan, budget[0]) if budget else []
    ok = None if budget is None else all(fits(p.peak, budget[0]) for p in plan.phases if p.every_run)
    return PlanResult(format_plan(plan, name, budget, changes), ok)
