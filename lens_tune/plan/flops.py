"""The work of a training step, counted from the architecture: matrix-multiply FLOPs (2 per multiply-add).

Element-wise operations (norms, RoPE, activations, the loss) are left out: they are well under 1% of the total.

- Forward: every Linear (2 * tokens * in * out) and the joint attention (q k^T and p v: 4 * S^2 * width per
  sample, S = image + text tokens).
- Backward of a LoRA step: the frozen base needs only the gradient of its input (as much work as its forward);
  the attention backward of the flash kernels recomputes q k^T, so it costs 2.5 forwards (5 S^2 products against
  2); the adapter needs the gradients of its input and of its weights (twice its forward).
- Gradient checkpointing runs every block's forward once more in the backward pass.

`model` FLOPs leave the recomputation out (they are what MFU is usually quoted on); `executed` FLOPs include it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lens_tune.plan.architecture import AdaptedLayer, Architecture

ATTENTION_BACKWARD_FACTOR = 2.5  # flash attention backward: 5 S^2-sized products against the forward's 2


@dataclass(frozen=True)
class StepFlops:
    forward_linear: float
    forward_attention: float
    forward_adapter: float
    backward: float
    recompute: float  # the extra forward of the blocks under gradient checkpointing

    @property
    def forward(self) -> float:
        return self.forward_linear + self.forward_attention + self.forward_adapter

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def executed(self) -> float:
        return self.model + self.recompute


def _block_linear(arch: Architecture, tokens: int) -> float:
    """One stream of one block: qkv, output projection and the MLP's three (two when not gated) projections."""
    d, f = arch.dim, arch.mlp_hidden
    mlp = (3 if arch.gate_mlp else 2) * d * f
    return 2.0 * tokens * (3 * d * d + d * d + mlp)


def training_step_flops(
    arch: Architecture, adapted: tuple[AdaptedLayer, ...], batch: int, image_tokens: int, text_tokens: int,
    checkpointing: bool,
) -> StepFlops:
    b, n, m, d = batch, image_tokens, text_tokens, arch.dim
    s = n + m
    per_block_linear = _block_linear(arch, n) + _block_linear(arch, m) + 2 * 2.0 * 6 * d * d  # + modulation
    blocks_linear = b * arch.layers * per_block_linear
    outer = b * 2.0 * (n * arch.in_channels * d + m * arch.text_layers * arch.text_width * d + n * d * arch.in_channels)
    attention = b * arch.layers * 4.0 * s * s * d
    adapter = b * sum(2.0 * (n if layer.stream == "img" else m) * layer.params for layer in adapted)
    backward = blocks_linear + b * 2.0 * n * d * arch.in_channels + ATTENTION_BACKWARD_FACTOR * attention + 2 * adapter
    recompute = blocks_linear + attention + adapter if checkpointing else 0.0
    return StepFlops(blocks_linear + outer, attention, adapter, backward, recompute)

