"""benchmarks/train_step_gpu.py runs on a CPU at reduced size, records sane numbers, and puts the plan's prediction
next to every measured peak (the GPU run itself is documented in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "train_step_gpu.py"


def test_train_step_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "train_step.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "smoke", "--sizes", "128", "--text-tokens", "16",
         "--bases", "nf4", "--optimizer", "adamw", "--budget", "40MiB", "--steps", "1", "--warmup", "0",
         "--variants", "mask", "inputs", "fused", "sync8bit", "--out", str(out)],  # inductor: minutes on a CPU
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    configs = {r["name"]: r for r in result["configs"]}
    assert set(configs) == {"nf4 128px ckpt-on b1", "nf4 128px ckpt-off b1", "nf4 128px ckpt-on b1 modulation-on-host",
                            "naive 128px (fp32 AdamW, no ckpt, resident text encoder)"} | {
                            n for n in configs if "largest in 40 MiB" in n}
    hosted, resident = configs["nf4 128px ckpt-on b1 modulation-on-host"], configs["nf4 128px ckpt-on b1"]
    assert hosted["modulation"] == "host" and hosted["peak_allocated_gib"] < resident["peak_allocated_gib"]
    largest = next(r for r in result["configs"] if "largest" in r["name"])
    assert largest["batch"] > 1 and largest["predicted_peak_gib"] <= 40 / 1024
    for record in result["configs"]:
        assert 0 < record["peak_allocated_gib"] < 1 and 0 < record["predicted_peak_gib"] < 1, record
        assert record["median_step_s"] > 0 and record["image_tokens_per_s"] > 0 and record["tflop_per_step"] > 0
        if not record["name"].startswith("naive"):
            assert abs(record["prediction_error"]) < 0.10, record  # the plan, next to the measured peak
    naive = configs["naive 128px (fp32 AdamW, no ckpt, resident text encoder)"]
    assert naive["optimizer"] == "adamw" and naive["text_encoder"].startswith("resident")
    ratios = result["naive_vs_lens_tune"]
    assert ratios["against"] == "nf4 128px ckpt-on b1" and ratios["peak_ratio"] > 1
    assert "| nf4 128px ckpt-on b1 |" in run.stdout  # the markdown section it would put in RESULTS.md on a GPU
    assert [v["variant"] for v in result["variants"]] == ["mask", "inputs", "fused", "sync8bit"]
    assert all(v["off_step_s"] > 0 and v["on_step_s"] > 0 and v["speedup"] > 0 for v in result["variants"])
    assert "| inputs |" in run.stdout
