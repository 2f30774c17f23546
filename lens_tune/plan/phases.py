"""A recipe's memory plan: the peak of every phase a run goes through, without loading any weights.

Phases, in run order: text-feature caching (GPT-OSS), class-image generation (the whole pipeline with model CPU
offload), latent caching (the VAE), a training step at the largest bucket, validation samples. Each is planned
for what the code does on the chosen device (`cuda`: the GPU's memory; `cpu`: tensors in host memory).

The model configs come from the model source's config.json files when they are on this machine; a source that is
not (a Hub repo not downloaded, a folder that does not exist) is planned with the official Lens configs, and the
plan says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lens_tune.data.text_encoding import CHUNK
from lens_tune.errors import LensTuneError
from lens_tune.plan import components
from lens_tune.plan.architecture import Architecture, adapted_layers, architecture
from lens_tune.plan.flops import StepFlops, training_step_flops
from lens_tune.plan.memory import BF16, FP32, StepMemory, StepSetup, training_step
from lens_tune.recipe.schema import Recipe

NF4_BYTES = 0.52  # 4-bit values plus their scales
DEFAULT_TEXT_TOKENS = 128  # caption feature length planned for: a prompt of ~80 words plus the chat suffix
GiB = 2**30


@dataclass(frozen=True)
class Phase:
    name: str
    peak: int  # bytes
    detail: str
    when: str  # when the phase runs
    every_run: bool  # runs on every `lens-tune run` (the others only while caches are missing)


@dataclass(frozen=True)
class EncoderWay:
    """One way to run GPT-OSS for caching, with its predicted peak and whether lens-tune has it."""

    name: str
    peak: int
    where: str  # gpu or host
    status: str  # "built: how to use it" or "not built: ..."


@dataclass
class Plan:
    device: str
    phases: list[Phase]
    step: StepMemory
    setup: StepSetup
    flops: StepFlops
    bucket: tuple[int, int]  # width, height of the largest training bucket
    text_tokens: int
    encoder_ways: list[EncoderWay] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


@dataclass(frozen=True)
class ModelConfigs:
    transformer: dict
    vae: dict
    text_encoder: dict
    text_offset: int
    note: str | None


def model_configs(recipe: Recipe) -> ModelConfigs:
    """The three configs of the recipe's model: read from its folder when present, official otherwise."""
    source = recipe.model.source
    if source == "tiny":
        from lens_tune.model import tiny

        return ModelConfigs(tiny.TINY_TRANSFORMER_CONFIG, tiny.TINY_VAE_CONFIG, tiny.TINY_TEXT_ENCODER_CONFIG,
                            tiny.TINY_TXT_OFFSET, None)
    from lens_tune.model.sources import locate_model

    official = ModelConfigs({}, components.OFFICIAL_VAE_CONFIG, components.OFFICIAL_TEXT_ENCODER_CONFIG,
                            components.OFFICIAL_TEXT_OFFSET, None)
    try:
        root = locate_model(source, recipe.model.revision, download=False)
    except LensTuneError:
        root = None
    if root is None:
        return ModelConfigs(**{**official.__dict__, "note": f"model.source '{source}' is not on this machine: planned "
                                                           "with the official Lens configs"})

    def read(sub: str, fallback: dict) -> dict:
        path = Path(root) / sub / "config.json"
        return json.loads(path.read_text()) if path.is_file() else fallback

    return ModelConfigs(read("transformer", {}), read("vae", official.vae), read("text_encoder", official.text_encoder),
                        official.text_offset, None)


def largest_bucket(recipe: Recipe) -> tuple[int, int]:
    """(width, height) of the training bucket with the most tokens (the aspect tables' worst case)."""
    from lens_tune.data.buckets import bucket_table
    from lens_tune.data.class_images import class_image_settings

    sizes = []
    for dataset in recipe.data.datasets:
        for resolution in dataset.resolution:
            table = bucket_table(resolution) if dataset.bucketing else []
            sizes += [(b.width, b.height) for b in table] or [(resolution, resolution)]
    if recipe.dreambooth.prior_preservation:
        size = class_image_settings(recipe)["size"]
        sizes.append((size, size))
    return max(sizes, key=lambda wh: (wh[0] // 16) * (wh[1] // 16))


def _precision(recipe: Recipe, device: str) -> tuple[int, bool]:
    """(frozen weights' bytes, bf16 autocast) as lens_tune.train.loop.resolve_dtypes decides them."""
    on_gpu = device == "cuda"
    weights = BF16 if recipe.model.dtype == "bf16" or (recipe.model.dtype == "auto" and on_gpu) else FP32
    autocast = recipe.train.mixed_precision == "bf16" or (recipe.train.mixed_precision == "auto" and on_gpu)
    return weights, autocast


def step_setup(recipe: Recipe, arch: Architecture, device: str, bucket: tuple[int, int], text_tokens: int) -> StepSetup:
    weights, autocast = _precision(recipe, device)
    return StepSetup(
        arch=arch, adapted=adapted_layers(arch.config, recipe.lora), adapter_type=recipe.lora.type,
        rank=recipe.lora.rank, batch=recipe.train.batch_size, image_tokens=(bucket[0] // 16) * (bucket[1] // 16),
        text_tokens=text_tokens, weight_bytes=weights, autocast=autocast, device=device,
        quantization=recipe.model.quantization, checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer, ema=recipe.train.ema,
        modulation_on_host=recipe.model.modulation_device == "cpu",
    )


def _mxfp4_on_this_gpu(text_config: dict) -> bool:
    """Whether the loader keeps the encoder MXFP4 on this machine's GPU (Hopper or newer with the kernels)."""
    import torch

    from lens_tune.model.text_encoder import _mxfp4_config_for

    return torch.cuda.is_available() and _mxfp4_config_for("cuda", text_config) is None


def _is_mxfp4(text_config: dict) -> bool:
    return (text_config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def make_plan(recipe: Recipe, device: str = "cuda", text_tokens: int = DEFAULT_TEXT_TOKENS) -> Plan:
    configs = model_configs(recipe)
    arch = architecture(configs.transformer)
    bucket = largest_bucket(recipe)
    setup = step_setup(recipe, arch, device, bucket, text_tokens)
    step = training_step(setup)
    notes = [configs.note] if configs.note else []
    weights, _ = _precision(recipe, device)
    gpu = device == "cuda"
    vae_weights = components.vae_weight_bytes(configs.vae)

    def mb(n: int) -> str:
        return f"{n / GiB:.2f} GiB"

    phases = []
    # -- text features: GPT-OSS where model.text_encoder_device puts it (cpu: off the GPU; offload: streamed) ---------
    te, caption = configs.text_encoder, configs.text_offset + text_tokens
    on_cpu = gpu and recipe.model.text_encoder_device == "cpu"
    streamed = gpu and recipe.model.text_encoder_device == "offload"
    mxfp4 = (gpu and not on_cpu and not streamed and _is_mxfp4(te) and _mxfp4_on_this_gpu(te)
             and recipe.model.text_encoder_quantization != "none")
    storage = "mxfp4" if mxfp4 else ("bf16" if weights == BF16 else "fp32")
    te_weights = components.text_encoder_weight_bytes(te, storage)
    kind = {"mxfp4": "MXFP4", "bf16": "bf16", "fp32": "float32"}[storage]
    dequantised = " (MXFP4 dequantised)" if _is_mxfp4(te) and not mxfp4 else ""
    if on_cpu:
        te_peak, what = 0, f"{mb(te_weights)} + one caption, on the CPU ({mb(te_weights)} of host memory)"
    elif streamed:
        te_peak = streamed_encoder_peak(te, caption, arch.text_layers, weights)
        what = (f"streamed: two decoder layers and {CHUNK} captions on the GPU, "
                f"{mb(te_weights)} of host memory")
    else:
        te_peak = te_weights + components.text_encoder_forward_bytes(te, caption, weights)
        what = f"{mb(te_weights)} + one caption"
    phases.append(Phase("text features", te_peak, f"GPT-OSS {kind}{dequantised} {what}",
                        "while captions are not cached", False))
    # -- class images: the run's base with the VAE, or components taking turns on the GPU (model CPU offload) --------
    if recipe.dreambooth.prior_preservation:
        from lens_tune.data.class_images import class_image_settings, drawn_by_the_run_s_reduced_base

        size = class_image_settings(recipe)["size"]
        tokens = (size // 16) ** 2
        sampling = components.sampling_forward_bytes(arch, 2, tokens, text_tokens, weights, False)
        decode = vae_weights + components.vae_decode_bytes(configs.vae, size * size)
        parts = {
            "text encoder": te_peak,  # the class prompt, encoded once with GPT-OSS placed as for the captions
            "transformer": arch.params * weights + sampling,
            "VAE": decode,
        }
        if gpu and drawn_by_the_run_s_reduced_base(recipe):
            # the run's quantised / host-modulation base stays on the GPU with the VAE
            resident = step.weights + vae_weights
            peak = max(te_peak, resident + max(sampling, decode - vae_weights))
            base = recipe.model.quantization if recipe.model.quantization != "none" else "modulation on the host"
            detail = f"the run's base ({base}) and the VAE on the GPU, {size}x{size}"
        elif gpu:
            part = max(parts, key=parts.get)
            peak, detail = parts[part], f"{part} on the GPU (model CPU offload), {size}x{size}"
        else:
            peak, detail = sum(parts.values()), f"whole pipeline in memory, {size}x{size}"
        phases.append(Phase("class images", peak, detail, "while class images are missing", False))
    # -- latents: the VAE encodes every image variant at its bucket ------------------------------------------------
    pixels = bucket[0] * bucket[1]
    phases.append(Phase("latents", vae_weights + components.vae_encode_bytes(configs.vae, pixels),
                        f"VAE float32 {mb(vae_weights)}, {bucket[0]}x{bucket[1]}", "while latents are not cached", False))
    # -- a training step ------------------------------------------------------------------------------------------
    samples = bool(recipe.validation.prompts)
    resident_vae = vae_weights if samples else 0  # the validation sampler keeps its VAE on the device afterwards
    detail = (f"{bucket[0]}x{bucket[1]}, batch {setup.batch}, {setup.image_tokens} image + {text_tokens} text tokens; "
              f"peak at {step.moment}")
    if setup.modulation_on_host:
        detail += f"; modulation in host memory ({mb(arch.modulation_params * 4)}, float32)"
    phases.append(Phase("training step", step.peak + resident_vae, detail, "every step", True))
    # -- validation samples: the training transformer (adapter on), guidance batch of 2, then the VAE decode ----------
    if samples:
        width = recipe.validation.width or recipe.data.datasets[0].resolution[0]
        height = recipe.validation.height or recipe.data.datasets[0].resolution[0]
        tokens = (width // 16) * (height // 16)
        denoise = components.sampling_forward_bytes(arch, 2, tokens, text_tokens, weights, True)
        decode = components.vae_decode_bytes(configs.vae, width * height)
        resident = step.weights + step.trainer_state + vae_weights
        phases.append(Phase("validation", resident + max(denoise, decode),
                            f"{width}x{height}, {'denoising' if denoise >= decode else 'VAE decode'} at the peak",
                            "every validation.every steps", True))
    if recipe.lora.type == "dora":
        notes.append("DoRA: this estimate ran about 11% below measurement on a small model (LoRA, LoKr and LoHa "
                     "within 6%); leave that much room")
    if samples:
        notes.append(f"the validation sampler keeps its VAE ({mb(vae_weights)}) on the device after the first samples; "
                     "the training step includes it")
    flops = training_step_flops(arch, setup.adapted, setup.batch, setup.image_tokens, text_tokens,
                                setup.checkpointing)
    ways = _encoder_ways(te, caption, arch.text_layers) if _is_mxfp4(te) else []
    return Plan(device, phases, step, setup, flops, bucket, text_tokens, ways, notes)


def streamed_encoder_peak(te: dict, caption: int, features: int, dtype_bytes: int) -> int:
    """GPU peak of model.text_encoder_device: offload: two decoder layers' copies, a chunk of captions' states
    (`lens_tune.data.text_encoding.CHUNK`) and one caption's forward."""
    return (2 * components.text_encoder_layer_bytes(te, dtype_bytes)
            + components.text_encoder_chunk_bytes(te, CHUNK, caption, features, dtype_bytes)
            + components.text_encoder_forward_bytes(te, caption, dtype_bytes))


def _encoder_ways(te: dict, caption: int, features: int) -> list[EncoderWay]:
    """The ways GPT-OSS could run for caching, with predicted peaks; which lens-tune has."""
    act = components.text_encoder_forward_bytes(te, caption, BF16)
    experts, other = components.text_encoder_params(te)
    embeddings = te["vocab_size"] * te["hidden_size"]
    return [
        EncoderWay("MXFP4 on the GPU", components.text_encoder_weight_bytes(te, "mxfp4") + act, "gpu",
                   "built: automatic on Hopper or newer GPUs with transformers' MXFP4 kernels (`kernels`, `triton`)"),
        EncoderWay("bf16 on the GPU", components.text_encoder_weight_bytes(te, "bf16") + act, "gpu",
                   "built: what other GPUs get (MXFP4 dequantised)"),
        EncoderWay("on the CPU, bf16", components.text_encoder_weight_bytes(te, "bf16") + act, "host",
                   "built: `model.text_encoder_device: cpu` (slowest; the rest of the run stays on the GPU)"),
        EncoderWay("layers streamed through the GPU",
                   streamed_encoder_peak(te, caption, features, BF16),
                   "gpu", "built: `model.text_encoder_device: offload` (bf16 weights in host memory)"),
        EncoderWay("nf4 (bitsandbytes)", (experts + embeddings) * BF16 + int((other - embeddings) * NF4_BYTES) + act,
                   "gpu", "not built, and no help alone: bitsandbytes quantises nn.Linear layers, while 91% of GPT-OSS "
                   "is its experts' fused 3-D tensors, which would stay bf16"),
    ]
