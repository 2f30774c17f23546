"""The trainer's overhead: its step time against a bare PyTorch loop doing the same work, side by side in one run.

Both train the same tiny-model LoRA with the same optimizer on batches of the same shape. The bare loop holds its
batches in memory and does nothing but forward, backward and the optimizer step; the trainer also reads the caches,
draws noise and sigmas, logs each step and updates its progress bar. The promise: the trainer's median step time is
at most 1.10x the bare loop's.

    .venv/bin/python benchmarks/train_overhead.py            # records results/train_overhead.json
    .venv/bin/python benchmarks/train_overhead.py --steps 20 --no-record
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS_JSON = Path(__file__).parent / "results" / "train_overhead.json"
EXAMPLES = Path(__file__).parents[1] / "examples" / "subject"

RECIPE = f"""
model: {{source: tiny}}
data:
  trigger: sks
  min_image_size: 64
  datasets: [{{kind: subject, folder: {json.dumps(str(EXAMPLES))}, resolution: [128], bucketing: false, caption_dropout: 0}}]
lora: {{rank: 16}}
train: {{steps: STEPS, optimizer: adamw, learning_rate: 1.0e-4, gradient_checkpointing: false}}
validation: {{before_training: false, every: 100000}}
checkpoint: {{every: 100000}}
cache: {{dir: CACHE}}
"""


def trainer_step_times(steps: int, root: Path) -> list[float]:
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe
    from lens_tune.train.loop import train
    from lens_tune.train.run_folder import read_events

    (root / "recipe.yaml").write_text(RECIPE.replace("STEPS", str(steps)).replace("CACHE", str(root / "cache")))
    recipe = load_recipe(root / "recipe.yaml", Recipe, [f"output.dir={root / 'runs'}"])
    result = train(recipe, device=torch.device("cpu"), log=lambda *_: None)
    events, _ = read_events(result.run / "events.jsonl")
    return [e["step_time"] for e in events if e["event"] == "step"]


def bare_step_times(steps: int) -> list[float]:
    """The same model, adapter and optimizer, batches prepared in advance, nothing else."""
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.recipe.schema import LoraSettings
    from lens_tune.train.adapters import add_adapter

    model = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    model.requires_grad_(False)
    params = add_adapter(model, LoraSettings(rank=16))
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    torch.manual_seed(0)
    text_len, hidden = 12, model.config.enc_hidden_dim
    batches = [
        (torch.randn(1, 64, 32), [torch.randn(1, text_len, hidden) for _ in range(3)], torch.rand(1), torch.randn(1, 64, 32))
        for _ in range(steps)
    ]
    times = []
    for x, text, sigma, target in batches:
        start = time.perf_counter()
        prediction = model(x, text, None, sigma, [(1, 8, 8)]).sample
        loss = (prediction - target).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    warmup = max(3, args.steps // 10)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_step_times(args.steps, Path(tmp))[warmup:]
    bare = bare_step_times(args.steps)[warmup:]
    result = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "steps_measured": len(bare),
        "bare_median_ms": round(statistics.median(bare) * 1000, 3),
        "trainer_median_ms": round(statistics.median(trainer) * 1000, 3),
    }
    result["ratio"] = round(result["trainer_median_ms"] / result["bare_median_ms"], 3)
    print(json.dumps(result))
    if not args.no_record:
        RESULTS_JSON.parent.mkdir(exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
