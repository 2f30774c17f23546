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
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from recording import finish

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


def benchmark_recipe(steps: int, root: Path):
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe

    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(RECIPE.replace("STEPS", str(steps)).replace("CACHE", str(root / "cache")))
    return load_recipe(root / "recipe.yaml", Recipe, [f"output.dir={root / 'runs'}"])


def trainer_step_times(recipe) -> list[float]:
    from lens_tune.train.loop import train
    from lens_tune.train.run_folder import read_events

    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar would be most of the output
        result = train(recipe, device=torch.device("cpu"), log=lambda *_: None)
    events, _ = read_events(result.run / "events.jsonl")
    return [e["step_time"] for e in events if e["event"] == "step"]


def bare_step_times(recipe) -> list[float]:
    """The same model, adapter, optimizer and micro-batches (read before timing); forward, backward, step only."""
    from lens_tune.data.cache import FeatureCache
    from lens_tune.data.prepare import prepare_training_data
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import add_adapter
    from lens_tune.train.data import MicroBatchStream, load_batch, micro_batch_seed
    from lens_tune.train.objective import flow_matching_loss

    settings = recipe.train
    prepared = prepare_training_data(recipe, device=torch.device("cpu"), log=lambda *_: None)
    cache, stream = FeatureCache(prepared.cache_dir), MicroBatchStream(prepared.examples, settings.batch_size, settings.seed)
    model = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    model.requires_grad_(False)
    params = add_adapter(model, recipe.lora)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    batches = [
        load_batch(stream[index], cache, torch.Generator().manual_seed(micro_batch_seed(settings.seed, index)),
                   torch.device("cpu"), torch.float32, (3, 32), settings)
        for index in range(settings.steps)
    ]
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = flow_matching_loss(model, batch.latents, batch.text, batch.text_mask, batch.grid, batch.weights,
                                  batch.sigma, batch.noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
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
    trainer, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):  # alternate, so neither side always runs on a warmer machine
            recipe = benchmark_recipe(args.steps, Path(tmp) / str(round_))
            bare += bare_step_times(recipe)[warmup:]
            trainer += trainer_step_times(recipe)[warmup:]
    result = {
        "steps_measured": len(bare),
        "bare_median_ms": round(statistics.median(bare) * 1000, 3),
        "trainer_median_ms": round(statistics.median(trainer) * 1000, 3),
    }
    result["ratio"] = round(result["trainer_median_ms"] / result["bare_median_ms"], 3)
    finish(result, "train_overhead", record=not args.no_record)

if __name__ == "__main__":
    main()
