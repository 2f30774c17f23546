"""Training-step speed and memory of the full-size Lens transformer (random weights, nothing downloaded), next to
what the memory planner predicted for the same configuration.

Per configuration (base bf16 / int8 / nf4; 512 and 1024 px; gradient checkpointing on, and off where it fits the
GPU; LoRA rank 16 on attention-mlp; AdamW8bit; batch 1 and the largest batch the plan fits in 16 GiB at 512 px;
nf4 at the largest size also with the modulation layers in host memory, model.modulation_device: cpu):
peak allocated and reserved memory, median seconds per step after warm-up, image tokens per second, and MFU from
the counted FLOPs (lens_tune.plan.flops). A naive baseline runs in the same process: PEFT LoRA with float32 AdamW
states, no checkpointing, and the text encoder not cached: GPT-OSS-20B (random bf16 weights) stays on the GPU and
encodes one caption per step, as a trainer without a feature cache does. The hot path's switches (VARIANTS: the
attention mask off the fused kernels' path, prefetched inputs with one host read per step, fused AdamW, AdamW8bit
without bitsandbytes' device sync per tensor, compiled blocks) are each timed off and on at the largest size.

    .venv/bin/python benchmarks/train_step_gpu.py                 # a CUDA GPU: ~6 min on an H100; writes the JSON
                                                                  # and the section in RESULTS.md
    .venv/bin/python benchmarks/train_step_gpu.py --device cpu --model smoke --sizes 64 128 --budget 48MiB \\
        --variants mask inputs fused sync8bit --steps 2 --warmup 1 --out /tmp/smoke.json   # a CPU smoke run
                                                                  # (no compile: inductor takes minutes on a CPU)

On a CPU, memory is the measured peak of live tensor bytes (lens_tune.plan.measure) and reserved memory is not
reported; the weights are float32 with no autocast, as the trainer runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logging.getLogger("diffusers").setLevel(logging.ERROR)  # its warning about casting a model with .to(dtype)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS_JSON = ROOT / "benchmarks" / "results" / "train_step_gpu.json"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
MARKERS = ("<!-- train_step_gpu:start -->", "<!-- train_step_gpu:end -->")
GiB = 2**30

# Peak dense bf16 tensor throughput (TFLOPS, no sparsity) by device name; --peak-tflops overrides
PEAK_BF16_TFLOPS = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0),
]
# A small transformer with the real layout (64-wide heads, widths multiple of 64 for nf4) for the CPU smoke run
SMOKE_CONFIG = {"num_layers": 2, "num_attention_heads": 3, "attention_head_dim": 64, "inner_dim": 192,
                "enc_hidden_dim": 64, "axes_dims_rope": [16, 24, 24], "in_channels": 128, "out_channels": 32,
                "selected_layer_index": [0, 1]}
# GPT-OSS-20B's architecture (Lens's text_encoder/config.json), for the naive baseline's resident encoder
OFFICIAL_GPT_OSS = {
    "vocab_size": 201088, "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "num_local_experts": 32,
    "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True, "swiglu_limit": 7.0,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
}
TEXT_OFFSET = 97


@dataclass(frozen=True)
class Config:
    name: str
    base: str  # none (bf16 on CUDA, float32 on CPU), int8, nf4
    size: int
    batch: int
    checkpointing: bool
    text_tokens: int = 128
    optimizer: str = "adamw8bit"
    naive: bool = False  # the baseline: float32 AdamW, no checkpointing, resident text encoder
    modulation_on_host: bool = False  # model.modulation_device: cpu (vectors prefetched with the micro-batch)


def peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def environment(device: torch.device, peak: float | None) -> dict:
    import bitsandbytes
    import diffusers
    import peft
    import transformers

    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(), "peak_bf16_tflops": peak}
    if device.type == "cuda":
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()
        info.update(device=torch.cuda.get_device_name(device), driver=driver[0] if driver else None,
                    cuda=torch.version.cuda, memory_gib=round(torch.cuda.get_device_properties(device).total_memory / GiB, 2))
    else:
        info.update(device=f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    return info


# ----------------------------------------------------------------------------------------------------------------
# Models and one step
# ----------------------------------------------------------------------------------------------------------------
def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, base: str,
                      modulation_on_host: bool = False):
    """The transformer with random weights, built on the device directly (no float32 detour), quantised and with
    its modulation on the host like lens_tune.train.base.load_base does; (model, HostModulation or None)."""
    from lens_tune.model.host_modulation import HostModulation
    from lens_tune.model.loading import build_on_meta
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import quantize_base

    model = build_on_meta(LensTransformer2DModel, config, "benchmark").to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.requires_grad_(False)
    if base != "none":
        quantize_base(model, base)
    host = HostModulation(model) if modulation_on_host else None  # the device copies go with the replaced layers
    return model, host


def build_text_encoder(config: dict, device: torch.device, dtype: torch.dtype):
    from transformers import GptOssConfig

    from lens_tune.model.text_encoder import LensGptOssEncoder

    gpt_config = GptOssConfig(**config)
    gpt_config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place, in its dtype: 42 GB, not 84 GB of float32 first
    try:
        with torch.device(device):
            encoder = LensGptOssEncoder(gpt_config)
    finally:
        torch.set_default_dtype(previous)
    return encoder.eval().requires_grad_(False)


class Step:
    """One training step as lens_tune.train.loop runs it (autocast, loss, backward, norm and clipping, optimizer).

    `inputs` says where the micro-batch comes from: "resident" (made once on the device, nothing read back: the
    ideal), "prefetched" (the trainer's way: loaded from the host one micro-batch ahead through pinned memory, loss
    and gradient norm read back once per step) or "pageable" (the trainer before: loaded on time with pageable
    copies, loss and norm read back one after the other). `padded` pads the last text token (the model then masks).
    """

    def __init__(self, model, params, optimizer, config: Config, arch, device, weights_dtype, autocast, encoder=None,
                 inputs: str = "resident", padded: bool = False, host_modulation=None):
        from lens_tune.train.data import Batch, Prefetcher, to_device

        grid, text_tokens = config.size // 16, config.text_tokens
        b = config.batch
        self.model, self.params, self.optimizer, self.device = model, params, optimizer, device
        self.autocast, self.encoder, self.inputs, self.host_modulation = autocast, encoder, inputs, host_modulation
        mask = torch.ones(b, text_tokens, dtype=torch.bool)
        mask[:, -1] = not padded

        def put(tensor: torch.Tensor, dtype: torch.dtype = weights_dtype) -> torch.Tensor:
            return to_device(tensor, device, dtype) if inputs == "prefetched" else tensor.to(device, dtype)

        def load(index: int) -> Batch:  # random stand-ins for the cached features (the index does not matter)
            sigma = torch.rand(b)
            modulation = None if host_modulation is None else put(host_modulation.compute(sigma, weights_dtype))
            return Batch(latents=put(torch.randn(b, grid * grid, arch.in_channels)),
                         text=[put(torch.randn(b, text_tokens, arch.text_width)) for _ in range(arch.text_layers)],
                         text_mask=put(mask, torch.bool) if padded else None, weights=put(torch.ones(b), torch.float32),
                         grid=(grid, grid), sigma=put(sigma, torch.float32),
                         noise=put(torch.randn(b, grid * grid, arch.in_channels)), modulation=modulation)

        self.resident = load(0) if inputs == "resident" else None
        self.batches, self.index = Prefetcher(load), 0
        self.ids = torch.randint(0, 1000, (b, TEXT_OFFSET + text_tokens), device=device) if encoder is not None else None

    def __call__(self) -> None:
        from lens_tune.train.objective import flow_matching_loss

        if self.encoder is not None:  # the naive trainer encodes the caption every step (all layers, as Lens's last
            with torch.no_grad():     # selected layer is the encoder's last)
                self.encoder.encode_layers(self.ids, None, [self.encoder.config.num_hidden_layers - 1])
        batch = self.resident or self.batches.get(self.index)
        if self.host_modulation is not None:
            self.host_modulation.supply(batch.modulation)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = flow_matching_loss(self.model, batch.latents, batch.text, batch.text_mask, batch.grid,
                                      batch.weights, batch.sigma, batch.noise)
            loss.backward()
        self.index += 1
        if self.inputs == "prefetched":
            self.batches.prefetch(self.index)
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if self.inputs == "prefetched":
            torch.stack([loss.detach(), norm]).tolist()
        elif self.inputs == "pageable":
            loss.item(), norm.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def median_step_seconds(step: Step, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds of `steps` steps, seconds of the `warmup` steps before them); the peak memory statistics are
    reset after the warm-up."""
    cuda = device.type == "cuda"
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm = time.perf_counter() - started
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), warm


def run_config(config: Config, model_config: dict, device: torch.device, steps: int, warmup: int, peak: float | None,
               encoder_config: dict) -> dict:
    from lens_tune.plan.architecture import adapted_layers, architecture
    from lens_tune.plan.flops import training_step_flops
    from lens_tune.plan.measure import StepShape, measure_training_step
    from lens_tune.plan.memory import StepSetup, training_step
    from lens_tune.recipe.schema import LoraSettings, TrainSettings
    from lens_tune.train.adapters import add_adapter
    from lens_tune.train.optim import build_optimizer

    cuda = device.type == "cuda"
    weights_dtype = torch.bfloat16 if cuda else torch.float32
    lora = LoraSettings(rank=16, targets="attention-mlp")
    optimizer_name = "adamw" if config.naive else config.optimizer
    arch = architecture(model_config)
    grid, text_tokens = config.size // 16, config.text_tokens
    setup = StepSetup(arch, adapted_layers(model_config, lora), "lora", 16, config.batch, grid * grid, text_tokens,
                      2 if cuda else 4, autocast=cuda, device=device.type, quantization=config.base,
                      checkpointing=config.checkpointing, optimizer=optimizer_name,
                      modulation_on_host=config.modulation_on_host)
    predicted = training_step(setup).peak
    flops = training_step_flops(arch, setup.adapted, config.batch, grid * grid, text_tokens, config.checkpointing)

    model, host = build_transformer(model_config, device, weights_dtype, config.base, config.modulation_on_host)
    params = add_adapter(model, lora)
    if config.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = build_optimizer(params, TrainSettings(optimizer=optimizer_name))
    encoder = build_text_encoder(encoder_config, device, weights_dtype) if config.naive else None
    # host modulation: the trainer's prefetch, so the host's work on the next step's vectors is in the timing
    step = Step(model, params, optimizer, config, arch, device, weights_dtype, cuda, encoder,
                inputs="prefetched" if host is not None else "resident", host_modulation=host)
    median, _ = median_step_seconds(step, device, steps, warmup)
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:  # the live-tensor measurement, on the same model, adapter and a fresh optimizer
        shape = StepShape(config.batch, (grid, grid), text_tokens, arch.in_channels, arch.text_layers, arch.text_width)
        allocated = measure_training_step(model, params, build_optimizer(params, TrainSettings(optimizer=optimizer_name)),
                                          shape, weights_dtype, None).peak_bytes
        if encoder is not None:  # it is resident in the naive trainer
            allocated += sum(p.numel() * p.element_size() for p in encoder.parameters())
        reserved = None
    record = {
        "name": config.name, "base": config.base, "size": config.size, "batch": config.batch,
        "checkpointing": config.checkpointing, "optimizer": optimizer_name, "adapter": "LoRA rank 16, attention-mlp (PEFT)",
        "modulation": "host" if config.modulation_on_host else "device",
        "text_encoder": "resident GPT-OSS, one caption per step" if config.naive else "cached features",
        "predicted_peak_gib": round(predicted / GiB, 4), "peak_allocated_gib": round(allocated / GiB, 4),
        "peak_reserved_gib": None if reserved is None else round(reserved / GiB, 4),
        "prediction_error": round(predicted / allocated - 1, 4) if not config.naive else None,
        "median_step_s": round(median, 4), "image_tokens_per_s": round(config.batch * grid * grid / median, 1),
        "tflop_per_step": float(f"{flops.model / 1e12:.4g}"), "tflop_executed_per_step": float(f"{flops.executed / 1e12:.4g}"),
        "mfu": None if peak is None else round(flops.model / median / (peak * 1e12), 4),
        "hfu": None if peak is None else round(flops.executed / median / (peak * 1e12), 4),
        "steps_measured": steps,
    }
    del step, model, params, optimizer, encoder
    if cuda:
        torch.cuda.empty_cache()
    return record


# The hot path's switches, each measured off (first) and on: what each state does
VARIANTS = {
    "mask": ("a padded text token, masked in every block (SDPA with a mask)", "no padding: no mask (fused SDPA)"),
    "inputs": ("micro-batch copied on time from pageable memory, loss and norm read back one by one",
               "micro-batch prefetched through pinned memory, one read back per step (the trainer)"),
    "fused": ("torch AdamW, foreach", "torch AdamW, fused"),
    "sync8bit": ("bitsandbytes' AdamW8bit (a device sync after every tensor's update)", "lens-tune's AdamW8bit (none)"),
    "compile": ("eager blocks", "compiled blocks (train.compile_blocks; the warm-up includes the compile)"),
}


def run_variants(names: list[str], model_config: dict, device: torch.device, size: int, text_tokens: int, steps: int,
                 warmup: int, deadline: float) -> tuple[list[dict], list[str]]:
    """Each switch in `names` off and on, at one configuration (unquantised base, `size` px, checkpointing, batch 1,
    AdamW8bit unless the switch is the optimizer), all on one model: a switch is undone before the next,
    and compile (which cannot be undone) goes last. Returns the records and the switches skipped for time."""
    if not names:
        return [], []
    from lens_tune.plan.architecture import architecture
    from lens_tune.recipe.schema import LoraSettings, TrainSettings
    from lens_tune.train.adapters import add_adapter
    from lens_tune.train.optim import build_optimizer

    cuda = device.type == "cuda"
    weights_dtype = torch.bfloat16 if cuda else torch.float32
    arch, config = architecture(model_config), Config("variants", "none", size, 1, True, text_tokens)
    model, _ = build_transformer(model_config, device, weights_dtype, "none")
    params = add_adapter(model, LoraSettings(rank=16, targets="attention-mlp"))
    model.enable_gradient_checkpointing()
    model.train()
    records, skipped = [], []
    for name in sorted(names, key=lambda n: n == "compile"):
        if time.monotonic() > deadline:
            skipped.append(f"variant {name}")
            continue
        record = {"variant": name, "size": size, "off": VARIANTS[name][0], "on": VARIANTS[name][1]}
        for on in (False, True):
            if name == "fused":
                optimizer = torch.optim.AdamW(params, lr=1e-4, fused=on, foreach=not on)
            elif name == "sync8bit" and not on:
                import bitsandbytes.optim

                optimizer = bitsandbytes.optim.AdamW8bit(params, lr=1e-4)
            else:
                optimizer = build_optimizer(params, TrainSettings())
            model.register_to_config(mask_text_in_all_blocks=name == "mask" and not on)
            if name == "compile" and on:
                model.compile_repeated_blocks()
            inputs = ("prefetched" if on else "pageable") if name == "inputs" else "resident"
            step = Step(model, params, optimizer, config, arch, device, weights_dtype, cuda, inputs=inputs,
                        padded=name == "mask" and not on)
            median, warm = median_step_seconds(step, device, steps, warmup)
            record[f"{'on' if on else 'off'}_step_s"] = round(median, 4)
            record[f"{'on' if on else 'off'}_warmup_s"] = round(warm, 2)
        record["speedup"] = round(record["off_step_s"] / record["on_step_s"], 3)
        records.append(record)
        print(json.dumps(record), flush=True)
    del model, params, optimizer, step
    if cuda:
        torch.cuda.empty_cache()
    return records, skipped


# ----------------------------------------------------------------------------------------------------------------
# Which configurations
# ----------------------------------------------------------------------------------------------------------------
def largest_batch(model_config: dict, size: int, text_tokens: int, base: str, optimizer: str, budget: int,
                  device: str) -> int:
    """The largest batch whose planned step fits `budget` (checkpointing on), at least 1."""
    from lens_tune.plan.advice import fits
    from lens_tune.plan.architecture import adapted_layers, architecture
    from lens_tune.plan.memory import StepSetup, training_step
    from lens_tune.recipe.schema import LoraSettings

    arch = architecture(model_config)
    adapted = adapted_layers(model_config, LoraSettings(rank=16))
    tokens = (size // 16) ** 2
    batch = 1
    while batch < 64:
        setup = StepSetup(arch, adapted, "lora", 16, batch + 1, tokens, text_tokens, 2 if device == "cuda" else 4,
                          autocast=device == "cuda", device=device, quantization=base, optimizer=optimizer)
        peak = training_step(setup).peak
        if not (fits(peak, budget) if device == "cuda" else peak <= budget):  # no CUDA context on a CPU
            break
        batch += 1
    return batch


def configurations(model_config: dict, encoder_config: dict, sizes: list[int], text_tokens: int, bases: list[str],
                   optimizer: str, device: torch.device, budget: int, batch_size_px: int) -> list[Config]:
    from lens_tune.plan.advice import fits
    from lens_tune.plan.components import text_encoder_weight_bytes
    from lens_tune.plan.architecture import adapted_layers, architecture
    from lens_tune.plan.memory import StepSetup, training_step
    from lens_tune.recipe.schema import LoraSettings

    arch = architecture(model_config)
    adapted = adapted_layers(model_config, LoraSettings(rank=16))
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    configs = []
    for base in bases:
        label = {"none": "bf16" if device.type == "cuda" else "fp32"}.get(base, base)
        for size in sizes:
            for checkpointing in (True, False):
                setup = StepSetup(arch, adapted, "lora", 16, 1, (size // 16) ** 2, text_tokens,
                                  2 if device.type == "cuda" else 4, autocast=device.type == "cuda",
                                  device=device.type, quantization=base, checkpointing=checkpointing)
                if capacity is not None and not checkpointing and not fits(training_step(setup).peak, capacity):
                    continue  # checkpointing off only where it fits this GPU
                configs.append(Config(f"{label} {size}px ckpt-{'on' if checkpointing else 'off'} b1", base, size, 1,
                                      checkpointing, text_tokens, optimizer))
        if base == "nf4":  # the 8 GB-card setting: the modulation layers' 2.7 GB off the GPU too, at the largest size
            configs.append(Config(f"{label} {sizes[-1]}px ckpt-on b1 modulation-on-host", base, sizes[-1], 1, True,
                                  text_tokens, optimizer, modulation_on_host=True))
        batch = largest_batch(model_config, batch_size_px, text_tokens, base, optimizer, budget, device.type)
        if batch > 1:
            configs.append(Config(f"{label} {batch_size_px}px ckpt-on b{batch} (largest in {budget / 2**20:g} MiB)",
                                  base, batch_size_px, batch, True, text_tokens, optimizer))
    naive = Config(f"naive {batch_size_px}px (fp32 AdamW, no ckpt, resident text encoder)", "none", batch_size_px, 1,
                   False, text_tokens, naive=True)
    setup = StepSetup(arch, adapted, "lora", 16, 1, (batch_size_px // 16) ** 2, text_tokens, 2 if device.type == "cuda" else 4,
                      autocast=device.type == "cuda", device=device.type, checkpointing=False, optimizer="adamw")
    encoder = text_encoder_weight_bytes(encoder_config, "bf16" if device.type == "cuda" else "fp32")
    if capacity is None or fits(training_step(setup).peak + encoder, capacity):  # GPT-OSS alone is 42 GB
        configs.append(naive)
    return configs


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        MARKERS[0],
        "## Training step on a GPU (`benchmarks/train_step_gpu.py`)",
        "",
        f"{env['date']}, {env['device']}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
        f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, diffusers {env['diffusers']}; peak bf16 "
        f"{env['peak_bf16_tflops']} TFLOPS for MFU. {result['model']} architecture, random weights, {result['text_tokens']} text tokens, "
        f"LoRA rank 16 on attention-mlp, median of {result['steps']} steps after {result['warmup']} warm-up steps.",
        "",
        "| configuration | planned GiB | peak allocated GiB | reserved GiB | plan error | s/step | image tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["configs"]:
        error = "-" if r["prediction_error"] is None else f"{r['prediction_error'] * 100:+.1f}%"
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        lines.append(f"| {r['name']} | {r['predicted_peak_gib']:.2f} | {r['peak_allocated_gib']:.2f} | "
                     f"{r['peak_reserved_gib'] if r['peak_reserved_gib'] is not None else '-'} | {error} | "
                     f"{r['median_step_s']:.3f} | {r['image_tokens_per_s']:.0f} | {mfu} |")
    if result.get("variants"):
        lines += ["", f"Hot-path switches, each off and on, at {result['variants'][0]['size']} px (base in the weights "
                      "dtype, checkpointing, batch 1, AdamW8bit unless the switch is the optimizer); median s/step:", "",
                  "| switch | off | s/step | on | s/step | speed-up |", "|---|---|---|---|---|---|"]
        for v in result["variants"]:
            lines.append(f"| {v['variant']} | {v['off']} | {v['off_step_s']:.3f} | {v['on']} | {v['on_step_s']:.3f} | "
                         f"x{v['speedup']} |")
    if result.get("naive_vs_lens_tune"):
        n = result["naive_vs_lens_tune"]
        lines += ["", f"Naive baseline against lens-tune at the same size ({n['against']}): peak memory x"
                      f"{n['peak_ratio']}, step time x{n['step_time_ratio']}."]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def update_results_md(section: str) -> None:
    text = RESULTS_MD.read_text()
    if MARKERS[0] in text:
        text = re.sub(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["official", "smoke"], default="official")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--bases", nargs="+", choices=["none", "int8", "nf4"], default=["none", "int8", "nf4"],
                        help="frozen bases: none (bf16 on a GPU, float32 on a CPU), int8, nf4")
    parser.add_argument("--budget", default="16GiB", help="memory the largest batch must fit (planned)")
    parser.add_argument("--optimizer", default="adamw8bit", help="lens-tune's optimizer (the CPU smoke run uses adamw: "
                        "bitsandbytes' 8-bit step is slow on a CPU)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOPS (default: from its name)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="hot-path switches to measure off and on at the largest size (none: --variants alone)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds; later configurations are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS_JSON)
    parser.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()

    from lens_tune.model.tiny import TINY_TEXT_ENCODER_CONFIG
    from lens_tune.plan import parse_size

    device = torch.device(args.device)
    model_config = {} if args.model == "official" else SMOKE_CONFIG
    encoder_config = OFFICIAL_GPT_OSS if args.model == "official" else TINY_TEXT_ENCODER_CONFIG
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    batch_px = min(512, max(args.sizes)) if args.model == "official" else min(args.sizes)
    started, records, skipped = time.monotonic(), [], []
    deadline = started + args.time_limit
    # the cheap switches first; compile (its first steps wait for the compiler) after the configurations
    variants, skipped = run_variants([n for n in args.variants if n != "compile"], model_config, device,
                                     max(args.sizes), args.text_tokens, args.steps, args.warmup, deadline)
    for config in configurations(model_config, encoder_config, args.sizes, args.text_tokens, args.bases, args.optimizer,
                                 device, parse_size(args.budget), batch_px):
        if time.monotonic() > deadline:
            skipped.append(config.name)
            continue
        record = run_config(config, model_config, device, args.steps, args.warmup, peak, encoder_config)
        records.append(record)
        print(json.dumps(record), flush=True)
    compiled, skipped_compile = run_variants([n for n in args.variants if n == "compile"], model_config, device,
                                             max(args.sizes), args.text_tokens, args.steps, args.warmup, deadline)
    variants += compiled
    skipped += skipped_compile
    result = {"environment": environment(device, peak), "model": args.model, "text_tokens": args.text_tokens,
              "steps": args.steps, "warmup": args.warmup, "configs": records, "variants": variants,
              "skipped_for_time": skipped}
    naive = next((r for r in records if r["name"].startswith("naive")), None)
    same_size = [r for r in records if not r["name"].startswith("naive") and r["size"] == batch_px
                 and r["batch"] == 1 and r["checkpointing"]]
    ours = min(same_size, key=lambda r: r["base"] != "none", default=None)  # the bf16 base when it ran
    if naive and ours:
        result["naive_vs_lens_tune"] = {
            "against": ours["name"],
            "peak_ratio": round(naive["peak_allocated_gib"] / ours["peak_allocated_gib"], 2),
            "step_time_ratio": round(naive["median_step_s"] / ours["median_step_s"], 2),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if not args.no_markdown and device.type == "cuda":
        update_results_md(section)


if __name__ == "__main__":
    main()
