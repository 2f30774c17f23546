"""The plan as text: the phase table, whether each phase fits the budget, the changes that make it fit."""

from __future__ import annotations

from lens_tune.plan.advice import ALLOCATOR_FACTOR, CUDA_CONTEXT, Change, fits
from lens_tune.plan.phases import GiB, Plan


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_plan(plan: Plan, recipe_name: str, budget: tuple[int, str] | None, changes: list[Change]) -> str:
    """`budget`: (bytes, where it came from) or None (no GPU detected and no --vram)."""
    s = plan.setup
    gpu = plan.device == "cuda"
    precision = f"{'bf16' if s.weight_bytes == 2 else 'float32'} weights, {'bf16 autocast' if s.autocast else 'no autocast'}"
    base = s.quantization if s.quantization != "none" else "not quantised"
    lines = [
        f"Memory plan for {recipe_name}: {'GPU memory' if gpu else 'host memory (training on the CPU)'}; {precision}",
        f"  training: {plan.bucket[0]}x{plan.bucket[1]} (largest bucket), batch {s.batch}, {plan.text_tokens} text "
        f"tokens; {s.adapter_type} rank {s.rank} on {len(s.adapted)} layers ({sum(a.params for a in s.adapted) / 1e6:.1f}M "
        f"parameters); base {base}; {s.optimizer}; checkpointing {'on' if s.checkpointing else 'off'}",
    ]
    if budget is None:
        lines.append("  budget: no GPU detected (give one with --vram 16GiB)" if gpu else "  budget: none (CPU)")
    else:
        usable = (budget[0] - CUDA_CONTEXT) / ALLOCATOR_FACTOR
        lines.append(f"  budget: {gib(budget[0])} ({budget[1]}); a phase fits if its peak is under {gib(usable)} "
                     f"(room left for the CUDA context and the allocator)")
    lines.append("")
    lines.append(f"  {'phase':<15} {'peak':>10}  {'fits':<5} {'runs':<33} what")
    for phase in plan.phases:
        verdict = "-" if budget is None else ("yes" if fits(phase.peak, budget[0]) else "NO")
        lines.append(f"  {phase.name:<15} {gib(phase.peak):>10}  {verdict:<5} {phase.when:<33} {phase.detail}")
    m = plan.step
    lines += [
        "",
        f"  training step at its peak: weights {gib(m.weights)}, adapter + optimizer state {gib(m.trainer_state)}, "
        f"gradients {gib(m.gradients)}, autocast copies {gib(m.autocast_copies)}, activations {gib(m.activations)}, "
        f"work buffers {gib(m.work_buffers)}, batch {gib(m.inputs)}",
        f"  work per step: {plan.flops.executed / 1e12:.1f} TFLOP ({plan.flops.model / 1e12:.1f} without the "
        f"checkpointing recomputation; forward {plan.flops.forward / 1e12:.1f})",
    ]
    failing = [p for p in plan.phases if budget is not None and not fits(p.peak, budget[0])]
    if any(p.name == "text features" for p in failing) and plan.encoder_ways:
        lines += ["", "  Text features do not fit. Ways to run GPT-OSS for the captions and the class prompt:"]
        for way in plan.encoder_ways:
            fit = "" if way.where == "host" else ("  fits" if fits(way.peak, budget[0]) else "  too big")
            lines.append(f"    {way.name:<32} {gib(way.peak):>10} {'host memory' if way.where == 'host' else 'GPU':<11}"
                         f"{fit}\n      {way.status}")
        lines.append("    Or cache the features on a larger GPU and copy the cache folder (cache.dir).")
    if any(p.name == "class images" for p in failing):
        lines += ["", f"  Class images do not fit ({plan.phase('class images').detail}). Put existing class images in "
                      "dreambooth.class_images_folder, or generate them on a larger GPU (`lens-tune cache` there; the "
                      "class-image cache is shared through cache.dir)."]
    if changes:
        lines += ["", "  Changes that make every training phase fit (cheapest first):"]
        for change in changes:
            after = ", ".join(f"{name} {gib(peak)}" for name, peak in change.peaks.items())
            lines.append(f"    {' '.join(change.overrides):<60} -> {after}")
    elif any(p.every_run for p in failing):
        lines += ["", "  No single recipe change found that makes training fit this budget."]
    for note in plan.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
