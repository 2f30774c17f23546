"""The truth the planner is checked against: live tensor bytes, measured while a training step runs.

`LiveTensorBytes` is a TorchDispatchMode that sees every tensor an operation returns, counts each storage once when
it first appears and subtracts it when the storage is freed (a weakref finalizer on the storage). Its peak is the
largest total of live storage bytes at any moment: what a caching allocator would report as peak allocated, less its
rounding and workspaces. It works on real tensors and on FakeTensorMode tensors, so the full-size model can be
measured on a CPU without allocating its weights (`fake_adapted_transformer`).

`measure_training_step` runs one step the way `lens_tune.train.loop.train` does (autocast, flow-matching loss,
backward, the next micro-batch loaded, gradient norm and clipping, optimizer step, zero_grad, EMA), after a first
optimizer step has created the optimizer state, so the peak is that of a steady-state step. (The loop's step is not a function of its own, so
this mirrors it; keep the two in step.)
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now (`current`) and at most so far (`peak`), per storage, views counted once."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.ops: Counter[str] = Counter()
        self._sizes = WeakIdKeyDictionary()  # storage -> bytes, so a storage is counted once

    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor made outside the mode (weights, inputs) from now on."""
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, size)

    def _freed(self, size: int) -> None:
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


@dataclass(frozen=True)
class StepShape:
    """The tensors of one micro-batch: batch size, latent token grid, text tokens, packed channels, text features."""

    batch: int
    grid: tuple[int, int]
    text_tokens: int
    in_channels: int
    text_layers: int
    text_width: int


@dataclass(frozen=True)
class StepMeasurement:
    peak_bytes: int  # the most alive at once during the step (weights and optimizer state included)
    attention_ops: tuple[str, ...]  # which scaled-dot-product kernels ran (fused or the math path)


def measure_training_step(
    transformer: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    shape: StepShape,
    weights_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None = 1.0,
    ema=None,
    text_mask: bool = True,
) -> StepMeasurement:
    """Peak live bytes of one steady-state training step of `transformer` (with the adapter `params` trained by
    `optimizer`); everything the step uses is built inside the measurement. `text_mask=False` passes no text mask
    (FakeTensorMode cannot evaluate the model's `mask.all()` test; an all-valid mask is dropped anyway)."""
    from lens_tune.train.objective import flow_matching_loss

    device = params[0].device
    live = LiveTensorBytes()
    for tensor in [*transformer.parameters(), *transformer.buffers(), *(ema.shadow if ema is not None else [])]:
        live.track(tensor)
    with live:
        # a first optimizer step creates the optimizer state, as the first real step does
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        live.reset_peak()

        b, (h, w), n_text = shape.batch, shape.grid, shape.text_tokens
        latents = torch.randn(b, h * w, shape.in_channels, device=device).to(weights_dtype)
        noise = torch.randn(b, h * w, shape.in_channels, device=device).to(weights_dtype)
        text = [torch.randn(b, n_text, shape.text_width, device=device).to(weights_dtype) for _ in range(shape.text_layers)]
        mask = torch.ones(b, n_text, dtype=torch.bool, device=device) if text_mask else None
        sigma = torch.rand(b, device=device)
        weights = torch.ones(b, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = flow_matching_loss(transformer, latents, text, mask, (h, w), weights, sigma, noise)
            loss.backward()
        upcoming = [torch.empty_like(t) for t in (latents, noise, *text)]  # the loop loads the next micro-batch here
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)  # the loop always takes the norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        del latents, noise, text, mask, sigma, weights, loss, upcoming
    attention = tuple(sorted(op for op in live.ops if "scaled_dot_product" in op and "backward" not in op))
    return StepMeasurement(peak_bytes=live.peak, attention_ops=attention)


def fake_adapted_transformer(config: dict, dtype: torch.dtype, lora, checkpointing: bool, fake_mode) -> tuple[nn.Module, list[nn.Parameter]]:
    """The Lens transformer with `config` and the trainer's adapter, whose tensors are FakeTensorMode tensors on the
    CPU: it trains (shapes, dtypes and kernels as on a CPU) but holds no memory. It is built on the meta device and
    converted there, because FakeTensorMode cannot cast or move a module itself."""
    from lens_tune.model.loading import build_on_meta
    from lens_tune.model.transformer import LensTransformer2DModel
    from lens_tune.train.adapters import add_adapter

    model = build_on_meta(LensTransformer2DModel, config, "transformer config").to(dtype)
    model.requires_grad_(False)
    add_adapter(model, lora)
    if checkpointing:
        model.enable_gradient_checkpointing()
    make_fake(model, fake_mode)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def make_fake(module: nn.Module, fake_mode) -> None:
    """Replace every meta parameter and buffer of `module` by a fake CPU tensor, in place."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(FakeTensor(fake_mode, param.data, cpu), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = FakeTensor(fake_mode, buffer, cpu)
