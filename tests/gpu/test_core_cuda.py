"""GPU checks of the Lens core (run on a CUDA machine with `make test-gpu`; `make test` does not collect them).

They repeat the golden parity on CUDA, check dtype and device moves, model CPU offload, and run the full-size
architecture once at 1024 px to record its forward/backward time and memory.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from lens_tune import LensPipeline, LensTransformer2DModel
from tests.conftest import GOLDEN, load_golden

if not torch.cuda.is_available():  # collected only by `make test-gpu`, which is for GPU machines
    pytest.exit("tests/gpu needs a CUDA GPU", returncode=1)

CUDA = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="module")
def golden():
    return load_golden("transformer", "cases")


def forward(model, golden, name, device, dtype=torch.float32):
    case = next(c for c in golden.meta["cases"] if c["name"] == name)
    to = lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() else t.dtype)
    with torch.no_grad():
        return model(
            to(golden[f"{name}/hidden_states"]),
            [to(t) for t in golden.layers(f"{name}/encoder_hidden_states")],
            to(golden.get(f"{name}/encoder_hidden_states_mask")),
            to(golden[f"{name}/timestep"]),
            case["img_shapes"],
        ).sample


@pytest.mark.parametrize("name", ["square", "nonsquare_odd", "batch2_padded", "cfg_pair", "empty_text"])
def test_transformer_goldens_on_cuda_fp32(golden, name):
    model = LensTransformer2DModel.from_pretrained(GOLDEN / "transformer", device=CUDA)
    out = forward(model, golden, name, CUDA).cpu()
    torch.testing.assert_close(out, golden[f"{name}/expected"], atol=1e-4, rtol=0)


def test_bf16_and_device_round_trip(golden):
    model = LensTransformer2DModel.from_pretrained(GOLDEN / "transformer")
    cpu_before = forward(model, golden, "batch2_padded", "cpu")
    model.to(CUDA, torch.bfloat16)
    out = forward(model, golden, "batch2_padded", CUDA, torch.bfloat16).float().cpu()
    ref = golden["batch2_padded/expected"]
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"\nbf16 on CUDA vs fp32 reference: relative error {rel:.4f}")
    assert rel < 0.1  # bf16 weights and activations; a broken position encoding gives O(1)
    model.to("cpu", torch.float32)  # bf16 rounding of the weights stays; positions must not be damaged
    back = forward(model, golden, "batch2_padded", "cpu")
    assert ((back - cpu_before).norm() / cpu_before.norm()) < 0.02


def test_pipeline_golden_call_on_cuda_and_with_cpu_offload():
    expected = load_golden("pipeline", "expected")
    call = next(c for c in expected.meta["calls"] if c["name"] == "batch2_negprompt")
    args = {k: v for k, v in call["call_args"].items() if k not in ("generator", "output_type")}
    latents = expected["call/batch2_negprompt/initial_latents"]

    pipe = LensPipeline.from_pretrained(GOLDEN / "pipeline", device=CUDA)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**args, latents=latents, output_type="latent").images.cpu()
    torch.testing.assert_close(out, expected["call/batch2_negprompt/latents"], atol=1e-3, rtol=0)

    offloaded = LensPipeline.from_pretrained(GOLDEN / "pipeline")
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device=CUDA)
    image = offloaded(**args, latents=latents, output_type="np").images
    torch.testing.assert_close(torch.from_numpy(image), expected["call/batch2_negprompt/image_np"], atol=1e-3, rtol=0)
    assert offloaded.transformer.device.type == "cpu" and offloaded.text_encoder.device.type == "cpu"


def test_full_size_architecture_at_1024px_bf16():
    """The real config with random weights: one CFG-batch forward and one checkpointed training backward."""
    with torch.device("meta"):
        model = LensTransformer2DModel()
    model.to_empty(device=CUDA).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2**30

    def inputs(batch, text_len, valid):
        mask = torch.zeros(batch, text_len, dtype=torch.bool, device=CUDA)
        mask[:, :valid] = True
        return dict(
            hidden_states=torch.randn(batch, 4096, 128, device=CUDA, dtype=torch.bfloat16),
            encoder_hidden_states=[torch.randn(batch, text_len, 2880, device=CUDA, dtype=torch.bfloat16) * 10 for _ in range(4)],
            encoder_hidden_states_mask=mask,
            timestep=torch.full((batch,), 0.7, device=CUDA),
            img_shapes=[(1, 64, 64)],
        )

    results = {"weights_gib": round(weights_gib, 2)}
    with torch.no_grad():
        x = inputs(2, 128, 100)
        model(**x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(3):
            out = model(**x).sample
        torch.cuda.synchronize()
        results["cfg_forward_s"] = round((time.perf_counter() - start) / 3, 4)
        results["cfg_forward_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    assert out.shape == (2, 4096, 128) and torch.isfinite(out).all()

    model.requires_grad_(False)
    model.proj_out.weight.requires_grad_(True)  # something to train; the backward runs through every block
    model.enable_gradient_checkpointing()
    x = inputs(1, 128, 128)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model(**{**x, "hidden_states": x["hidden_states"].requires_grad_(True)}).sample.float().square().mean().backward()
    torch.cuda.synchronize()
    results["train_step_checkpointed_s"] = round(time.perf_counter() - start, 4)
    results["train_step_checkpointed_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results["gpu"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    print("\nFULL-SIZE", json.dumps(results))
    assert torch.isfinite(model.proj_out.weight.grad).all()


def test_streamed_gpt_oss_layers_on_cuda():
    """model.text_encoder_device: offload with full-size GPT-OSS-20B decoder layers (4 of the 24, random bf16 weights in
    host memory): the same features as the layers resident on the GPU, a GPU peak within 10% of the plan's, and the
    seconds per layer for 64 captions recorded."""
    from transformers import GptOssConfig

    from lens_tune.model.text_encoder import LensGptOssEncoder
    from lens_tune.plan import components, phases

    config = {**components.OFFICIAL_TEXT_ENCODER_CONFIG, "num_hidden_layers": 4}
    config.pop("quantization_config", None)
    with torch.random.fork_rng(devices=[]):
        encoder = LensGptOssEncoder(GptOssConfig(**config)).to(torch.bfloat16).eval().requires_grad_(False)
    for p in encoder.parameters():
        p.data.normal_(0, 0.02)
    layers, tokens = [1, 3], 225  # the real chat prefix (97) + 128 caption tokens
    inputs = [(torch.randint(1000, 100_000, (1, tokens)), None) for _ in range(phases.CHUNK)]
    encoder.stream_layers_to(CUDA)
    encoder.encode_each(inputs[:1], layers)  # warm-up: kernels, the copy stream
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    streamed = encoder.encode_each(inputs, layers)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    planned = phases.streamed_encoder_peak(config, tokens, len(layers), 2)
    encoder.stream_layers_to(None)
    encoder.to(CUDA)
    resident = encoder.encode_each(inputs[:4], layers)
    for got, want in zip(streamed[:4], resident):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=0)
    print(json.dumps({"streamed_seconds_per_layer_64_captions": round(seconds / 4, 3),
                      "streamed_peak_gib": round(peak / 2**30, 2), "planned_gib": round(planned / 2**30, 2),
                      "gpu": torch.cuda.get_device_name()}))
    assert abs(peak / planned - 1) < 0.10, (peak, planned)


def test_modulation_on_the_host_on_cuda():
    """model.modulation_device: cpu with the full-size layer widths (4 blocks, bf16 on the GPU): the blocks'
    modulation weights leave the GPU (exactly their bytes), the vectors handed in with a batch give the output of
    the layers in place (bf16 rounding apart), a forward and backward with them makes no host synchronisation, and
    the host's seconds per step for all 48 blocks are recorded."""
    from lens_tune.model.host_modulation import HostModulation
    from lens_tune.plan.architecture import architecture
    from lens_tune.recipe.schema import LoraSettings
    from lens_tune.train.adapters import add_adapter

    torch.manual_seed(0)
    resident = LensTransformer2DModel(num_layers=4).to(torch.bfloat16).requires_grad_(False)
    hosted = LensTransformer2DModel(num_layers=4).to(torch.bfloat16).requires_grad_(False)
    hosted.load_state_dict(resident.state_dict())
    host = HostModulation(hosted)
    before = torch.cuda.memory_allocated()
    resident.to(CUDA)
    resident_bytes = torch.cuda.memory_allocated() - before
    hosted.to(CUDA)
    hosted_bytes = torch.cuda.memory_allocated() - before - resident_bytes
    modulation = 4 * 2 * (1536 * 9216 + 9216) * 2
    assert resident_bytes - hosted_bytes == modulation, (resident_bytes, hosted_bytes)

    g = torch.Generator().manual_seed(1)
    batch = dict(hidden_states=torch.randn(1, 1024, 128, generator=g), timestep=torch.rand(1, generator=g),
                 encoder_hidden_states=[torch.randn(1, 128, 2880, generator=g) for _ in range(4)], img_shapes=[(1, 32, 32)])
    on_gpu = {k: ([t.to(CUDA, torch.bfloat16) for t in v] if isinstance(v, list) else
                  v.to(CUDA, torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with torch.no_grad():
        want = resident(**on_gpu).sample.float()
        got = hosted(**on_gpu).sample.float()  # vectors computed from the timestep (one copy to the host)
    assert (got - want).norm() / want.norm() < 0.02

    add_adapter(hosted, LoraSettings(rank=16))
    hosted.enable_gradient_checkpointing()
    supplied = host.compute(batch["timestep"], torch.bfloat16).to(torch.bfloat16).pin_memory().to(CUDA, non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        host.supply(supplied)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hosted(**on_gpu).sample.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    full = HostModulation.__new__(HostModulation)  # the 48 blocks' weights, random, to time the host's work
    arch = architecture({})
    full.embedding, full.bias = host.embedding, torch.zeros(2 * arch.layers, 1, 6 * arch.dim)
    full.weight = torch.randn(2 * arch.layers, arch.dim, 6 * arch.dim) * 0.02
    full.compute(torch.rand(1), torch.bfloat16)
    start = time.perf_counter()
    for _ in range(3):
        full.compute(torch.rand(1), torch.bfloat16)
    print(json.dumps({"host_modulation_seconds_per_step_48_blocks": round((time.perf_counter() - start) / 3, 3),
                      "torch_threads": torch.get_num_threads()}))
