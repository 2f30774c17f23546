"""The blocks' adaLN modulation computed in host memory, so that its weights take no GPU memory.

Each block's `img_mod` and `txt_mod` (SiLU, Linear dim -> 6 dim) turn the timestep embedding into the shift, scale
and gate vectors of both streams. In Lens they hold 1.36B of the 4.10B parameters (2.7 GB in bf16), yet they see
only the timestep, never an image or text token, and LoRA training leaves them frozen. Quantising them damages
Lens's pictures (lens_tune.train.adapters, `quantized_layers`), so `model.modulation_device: cpu` keeps them in
host memory instead, in float32, and computes all blocks' vectors there with one batched matmul per forward pass:
a few kB per sample go to the GPU instead of 2.7 GB of weights living there.

In training the vectors of the next micro-batch are computed while the GPU runs the current backward pass (the
trainer's prefetch calls `compute` with the host-side sigma and hands the result in with `supply`), so the step
does not wait for the host. Anywhere else (validation samples, a pipeline) the forward pass computes them from its
`timestep` argument, which costs one copy of the timestep to the host per call.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class HostModulation:
    """Takes over the modulation layers of a `LensTransformer2DModel` (call before moving it to the GPU)."""

    def __init__(self, transformer: nn.Module):
        blocks = transformer.transformer_blocks
        layers = [mod[1] for block in blocks for mod in (block.img_mod, block.txt_mod)]
        if any(not isinstance(layer, nn.Linear) for layer in layers):
            raise ValueError("model.modulation_device: cpu needs plain Linear modulation layers (no adapter or "
                             "quantisation on img_mod/txt_mod)")
        self.embedding = copy.deepcopy(transformer.time_text_embed).float().cpu()
        # [2 * blocks, dim, 6 dim]: img_mod of block 0, txt_mod of block 0, img_mod of block 1, ... (filled layer by
        # layer: a stack of float32 copies would need twice the 5.4 GB for a moment)
        out_features, in_features = layers[0].weight.shape
        self.weight = torch.empty(len(layers), in_features, out_features)
        self.bias = torch.empty(len(layers), 1, out_features)
        with torch.no_grad():
            for index, layer in enumerate(layers):
                self.weight[index].copy_(layer.weight.t())
                self.bias[index, 0].copy_(layer.bias)
        self.current: torch.Tensor | None = None  # [2 * blocks, B, 6 dim] on the model's device, for this forward
        self.supplied: torch.Tensor | None = None
        for index, block in enumerate(blocks):
            block.img_mod, block.txt_mod = _Modulation(self, 2 * index), _Modulation(self, 2 * index + 1)
        transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    @torch.no_grad()
    def compute(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """All blocks' modulation vectors [2 * blocks, B, 6 dim] (float32, host) for sigmas [B] given to a model
        running in `dtype` (sigma is rounded to it first, as the forward pass does)."""
        temb = self.embedding(sigma.detach().to("cpu").to(dtype).float(), torch.float32)
        activated = nn.functional.silu(temb).expand(self.weight.shape[0], -1, -1)
        return torch.baddbmm(self.bias, activated, self.weight)

    def supply(self, modulation: torch.Tensor) -> None:
        """Vectors made by `compute` (already on the model's device) for the next forward pass."""
        self.supplied = modulation

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        modulation, self.supplied = self.supplied, None
        if modulation is None:
            timestep = kwargs.get("timestep")
            if timestep is None:
                raise ValueError("timestep (sigma in [0, 1], one per sample) is required.")
            modulation = self.compute(timestep, hidden.dtype)
        # kept until the next forward: gradient checkpointing reads it again in the backward pass
        self.current = modulation.to(hidden.device, hidden.dtype, non_blocking=True)


class _Modulation(nn.Module):
    """Stands in for a block's `img_mod` / `txt_mod`: returns that block's precomputed vectors."""

    def __init__(self, owner: HostModulation, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.owner.current[self.index].to(temb.dtype)
