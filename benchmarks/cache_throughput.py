"""Caching throughput and memory: a synthetic dataset of N small captioned images, cached with the tiny model.

Each size runs in a fresh process, so peak RSS belongs to that size alone. The promise: peak RSS does not grow with
the dataset (2,000 images within 10% of 200), because images are checked one at a time and caches are written in
shards of bounded size (`cache.shard_mib`, scaled down here to the tiny model's entry sizes).

    .venv/bin/python benchmarks/cache_throughput.py                 # 200 and 2000 images, writes results
    .venv/bin/python benchmarks/cache_throughput.py --sizes 20 40 --no-record   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS_JSON = Path(__file__).parent / "results" / "cache_throughput.json"
WORDS = "red blue green small large round square robot cat house tree boat star striped dotted shiny".split()


def make_dataset(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((96, 64), Image.NEAREST).save(folder / f"{i:05d}.png")
        caption = " ".join(rng.choice(WORDS, size=5))
        (folder / f"{i:05d}.txt").write_text(f"a photo of {caption} number {i}")


def run_one(count: int) -> dict:
    """In this process: make the data, cache it, report."""
    import torch

    from lens_tune.data.prepare import prepare_training_data
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.recipe.load import load_recipe
    from lens_tune.recipe.schema import Recipe

    import lens_tune.model.pipeline  # noqa: F401  imports (seconds) stay outside the timing

    tiny_pipeline_dir()  # built outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "images", count)
        (root / "recipe.yaml").write_text(
            "model: {source: tiny}\n"
            "data: {min_image_size: 32, datasets: [{kind: style, folder: images, resolution: [64]}]}\n"
            # 1 MiB shards: the tiny model's entries are ~1000x smaller than the real model's, whose 64 MiB shards
            # then hold a similar number of entries
            "cache: {dir: cache, shard_mib: 1}\n"
        )
        recipe = load_recipe(root / "recipe.yaml", Recipe)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        prepared = prepare_training_data(recipe, device=torch.device("cpu"), log=lambda _: None)
        seconds = time.perf_counter() - start
        items = prepared.encoded["text"] + prepared.encoded["latents"]
        return {
            "images": count,
            "items_encoded": items,
            "seconds": round(seconds, 2),
            "items_per_s": round(items / seconds, 1),
            "images_per_s": round(count / seconds, 1),
            "peak_rss_mib_before_caching": round(rss_before / 1024, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--no-record", action="store_true", help="print only; do not write results/")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS {rows[-1]['images']} / {rows[0]['images']} images: {ratio:.3f}")
    if not args.no_record:
        RESULTS_JSON.parent.mkdir(exist_ok=True)
        RESULTS_JSON.write_text(json.dumps({
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "runs": rows,
            "peak_rss_ratio": round(ratio, 3),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
