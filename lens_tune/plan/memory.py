"""Predicted peak memory of a training step, from shapes and dtypes alone.

The model follows what the trainer's code does (lens_tune.train.loop, adapters, optim; the transformer's forward):

- Frozen base in the weights dtype (bf16 on GPUs, fp32 on CPUs), or int8 / nf4 (bitsandbytes) for the layers
  `quantize_base` replaces (attention and MLP); the rest, modulation included, stays in that dtype, unless the
  modulation layers live in host memory (model.modulation_device: cpu; the batch then brings their outputs).
- Adapter weights and their gradients in float32; optimizer state per optimizer (8-bit AdamW: two uint8 states
  and a float32 scale per 256 values; tensors under 4,096 values keep 32-bit state); the optional EMA copy.
- Under bf16 autocast, autocast caches a bf16 copy of every adapter weight for the whole step.
- Activations: what each operation of a block keeps for the backward pass (`_block`). A frozen Linear keeps
  nothing (its weight gets no gradient), nor does a quantised one (it keeps its weight only; bitsandbytes' own int8
  layer kept its input, out of checkpointing's reach, lens-tune's does not); a LoRA layer keeps its own copy of its
  input (PEFT casts the input to the adapter's float32, autocast casts that copy back to bf16); RMSNorm keeps a
  float32 copy of its input; the fused attention kernels keep q, k, v, the output and a float32 log-sum-exp per head
  and token, never an S x S matrix.
- With gradient checkpointing a block keeps only its inputs, and the backward pass recomputes one block at a time.
- The peak is the largest of the moments where memory is highest: the forward pass at the last block's MLP, and the
  backward pass of each block (its recomputation, with the gradients of the blocks after it already stored), and
  the optimizer step.

CPU and CUDA differ in two places, both modelled: CUDA autocast runs the final LayerNorm in float32 (a float32
copy of the last hidden state is kept), CPU autocast does not; and bitsandbytes' work buffers. Both use fused
attention (flash or memory-efficient on CUDA, flash on CPU), which `lens_tune.plan.measure` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lens_tune.plan.architecture import AdaptedLayer, Architecture

BF16, FP32 = 2, 4
BNB_BLOCK = 256  # bitsandbytes 8-bit optimizer state: one float32 absmax per block of 256 values
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit optimizer state
NF4_BLOCK = 64  # nf4 weights: 64 values share one 8-bit absmax; 256 absmaxes share one float32


@dataclass(frozen=True)
class StepSetup:
    """One training step: the model, the adapter, the micro-batch and the precisions."""

    arch: Architecture
    adapted: tuple[AdaptedLayer, ...]
    adapter_type: str  # lora, dora, lokr, loha
    rank: int
    batch: int
    image_tokens: int
    text_tokens: int
    weight_bytes: int  # the frozen base: 2 (bf16) or 4 (fp32)
    autocast: bool  # bf16 autocast around forward and backward
    device: str = "cuda"  # cuda or cpu
    quantization: str = "none"  # none, int8, nf4
    checkpointing: bool = True
    optimizer: str = "adamw8bit"
    ema: bool = False
    modulation_on_host: bool = False  # model.modulation_device: cpu


@dataclass(frozen=True)
class StepMemory:
    """Bytes alive at the step's peak, by kind."""

    weights: int
    trainer_state: int  # adapter weights, optimizer state, EMA
    gradients: int
    autocast_copies: int
    activations: int  # what blocks keep for backward (or checkpoints + the block being recomputed)
    work_buffers: int  # temporaries of the operation running at the peak, and gradients in flight
    inputs: int  # the micro-batch and what the loss derives from it
    moment: str  # where the peak is

    @property
    def peak(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "moment")


# ----------------------------------------------------------------------------------------------------------------
# What lives between steps
# ----------------------------------------------------------------------------------------------------------------
def weight_bytes(arch: Architecture, dtype_bytes: int, quantization: str, modulation_on_host: bool = False) -> int:
    """The frozen base on the device (without the modulation layers when they live in host memory)."""
    on_device = arch.params - (arch.modulation_params if modulation_on_host else 0)
    if quantization == "none":
        return on_device * dtype_bytes
    other = (on_device - arch.quantizable_params) * dtype_bytes  # the quantised layers' biases included
    if quantization == "int8":
        return other + arch.quantizable_params + arch.quantizable_rows * FP32  # int8 values, a float32 scale per row
    blocks = arch.quantizable_params // NF4_BLOCK  # nf4: two values per byte, an 8-bit absmax per 64 values
    return other + arch.quantizable_params // 2 + blocks + (blocks // 256) * FP32


def _adapter_tensor_sizes(setup: StepSetup) -> list[int]:
    """Element counts of the adapter's tensors (LoRA: A [r, in] and B [out, r] per layer)."""
    sizes = []
    for layer in setup.adapted:
        if setup.adapter_type in ("lora", "dora"):
            sizes += [setup.rank * layer.in_features, layer.out_features * setup.rank]
            sizes += [layer.out_features] if setup.adapter_type == "dora" else []  # DoRA's magnitude
        else:
            sizes.append(layer.params)  # LoKr/LoHa: several small tensors, counted as one
    return sizes


def optimizer_state_bytes(optimizer: str, sizes: list[int]) -> int:
    total = 0
    for n in sizes:
        if optimizer in ("adamw8bit", "lion8bit"):
            states = 2 if optimizer == "adamw8bit" else 1
            eight_bit = n >= BNB_MIN_8BIT
            total += states * (n + -(-n // BNB_BLOCK) * FP32 if eight_bit else n * FP32)
        elif optimizer == "adamw":
            total += 2 * n * FP32
        elif optimizer == "prodigy":
            total += 4 * n * FP32  # exp_avg, exp_avg_sq, s and the initial value p0
        elif optimizer == "adafactor":
            total += 0  # a factored second moment (a row and a column vector per matrix): negligible
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return total


# ----------------------------------------------------------------------------------------------------------------
# Activations of one block
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dtypes:
    """Bytes per value of the tensors a block makes, for one precision setting."""

    linear: int  # outputs of linear layers, the residual stream, gradients
    attention: int  # q, k, v and output of the attention kernel
    adapter: int  # the adapter's copy of its input and its rank-r intermediate
    adapter_out: int  # the adapter's output before it is added to the base output
    modulated: int  # a norm's output after the adaLN modulation (the norm weight's dtype wins)

    @classmethod
    def of(cls, setup: StepSetup) -> "_Dtypes":
        w = setup.weight_bytes
        if setup.autocast:
            return cls(linear=BF16, attention=BF16, adapter=BF16, adapter_out=BF16, modulated=max(w, BF16))
        return cls(linear=w, attention=w, adapter=FP32, adapter_out=FP32, modulated=w)


@dataclass(frozen=True)
class _Block:
    """Bytes of one block, per image token, per text token and per block (not per token):
    `saved` is kept for backward at the end of the forward pass (the block's output, i.e. the next block's input,
    included), `output` is that output's share of it, `freed_early` what the backward frees before its busiest
    moment, `work_forward` / `work_backward` the temporaries of the busiest forward / backward operation."""

    saved_image: int
    saved_text: int
    saved_fixed: int
    output_image: int
    output_text: int
    freed_early: int  # per image token
    work_forward: int  # per image token
    work_backward: int  # per image token
    work_fixed: int


def _block(setup: StepSetup, block: int, grad_in: bool, last: bool) -> _Block:
    """What block `block` costs. `grad_in`: its inputs need a gradient (an adapted layer comes before it).
    `last`: its text output is thrown away (the model returns the image stream)."""
    arch, t = setup.arch, _Dtypes.of(setup)
    d, f, r = arch.dim, arch.mlp_hidden, setup.rank
    fp32_copy = 0 if t.linear == FP32 else FP32  # RMSNorm's float32 copy of its input (none if already float32)
    lora = setup.adapter_type in ("lora", "dora")
    # Without autocast a float32 input is kept as it is (no copy): several consumers then share it.
    aliases = not setup.autocast and t.linear == FP32
    # bf16 autocast over a float32 base: a frozen Linear whose input needs a gradient keeps autocast's bf16 copy of
    # its weight (only trainable weights are cached)
    weight_copy = BF16 if setup.autocast and setup.weight_bytes == FP32 and setup.quantization == "none" else 0

    def adapter_input(width: int, count: int) -> int:
        """Bytes per token the adapters on `count` layers sharing one input keep of it."""
        if count == 0:
            return 0
        return t.adapter * width * (1 if aliases else count) + (t.adapter * r * count if lora else 0)

    saved, output, fixed = {}, {}, 0
    w2_input = 0
    for stream in ("img", "txt"):
        mine = [layer for layer in setup.adapted if layer.block == block and layer.stream == stream]
        roles = [layer.role for layer in mine]
        kept = 0
        if setup.adapter_type == "dora":  # DoRA's magnitude keeps the base and the LoRA output of each layer
            kept += 2 * t.linear * sum(layer.out_features for layer in mine)
        if grad_in:
            kept += fp32_copy * d + FP32  # norm1: float32 copy and 1/rms (the input itself is the previous output)
        kept += adapter_input(d, roles.count("qkv"))
        if grad_in or "qkv" in roles:
            kept += 3 * t.linear * d  # qkv output: the QK norms keep views of q and k
            kept += 2 * fp32_copy * d + 2 * arch.heads * FP32  # the QK norms' float32 copies and 1/rms
            kept += 4 * (arch.head_dim // 2) * FP32  # cos and sin of the RoPE angles, for q and for k
            fixed += weight_copy * 3 * d * d * grad_in
        if "out" in roles:  # its input is the attention output, which the attention kernel keeps anyway
            kept += (t.adapter * r if lora else 0) + (0 if aliases else t.adapter * d)
        if last and stream == "txt":  # the text stream after attention is never used: freed after the forward
            saved[stream], output[stream] = kept, 0
            continue
        kept += t.linear * d + fp32_copy * d + FP32  # residual after attention (kept by norm2), copy, 1/rms
        kept += adapter_input(d, roles.count("mlp_in"))
        kept += 3 * t.linear * f  # SwiGLU: w1 output, its SiLU, w3 output
        kept += adapter_input(f, roles.count("mlp_out"))
        if stream == "img":
            w2_input = adapter_input(f, roles.count("mlp_out"))
        # the block output; after the last block the final LayerNorm keeps it (CUDA autocast: as float32)
        out = (FP32 if setup.autocast and setup.device == "cuda" else t.linear) * d if last else t.linear * d
        saved[stream], output[stream] = kept + out, out
        fixed += weight_copy * (d * d + 3 * d * f)
    if setup.adapter_type in ("lokr", "loha"):  # they build the full weight change and keep it for backward
        fixed += sum(t.adapter * layer.in_features * layer.out_features for layer in setup.adapted if layer.block == block)
    joint = 4 * t.attention * d + arch.heads * FP32  # q, k, v, output of the attention; its log-sum-exp

    # The busiest forward moment is the image MLP's down projection: its input, the adapter's float32 cast of it
    # (autocast then keeps a bf16 copy), and four hidden-sized outputs (base, adapter, scaled adapter, residual).
    w2_adapted = bool(w2_input)
    work_forward = (0 if w2_adapted and aliases else t.linear * f) + (FP32 * f if w2_adapted and setup.autocast else 0)
    work_forward += (t.linear + 2 * t.adapter_out + t.linear) * d
    # The busiest backward moment is the start of the image MLP's backward: three gradients of its hidden width and
    # the one of the block output, once the down projection's kept input is freed.
    work_backward = 3 * t.linear * f + t.linear * d
    # bitsandbytes dequantises the largest quantised weight for its matmuls (and, on CPU, int8 in forward too)
    work_fixed = t.linear * max(3 * d * d, d * f) if setup.quantization != "none" else 0
    return _Block(saved["img"] + joint, saved["txt"] + joint, fixed, output["img"], output["txt"], w2_input,
                  work_forward, work_backward, work_fixed)


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------
def training_step(setup: StepSetup) -> StepMemory:
    """The peak of one steady-state training step (optimizer state already created)."""
    arch, t = setup.arch, _Dtypes.of(setup)
    b, n, m = setup.batch, setup.image_tokens, setup.text_tokens
    layers = arch.layers
    first = min(layer.block for layer in setup.adapted)
    p = sum(layer.params for layer in setup.adapted)

    weights = weight_bytes(arch, setup.weight_bytes, setup.quantization, setup.modulation_on_host)
    ema = FP32 * p if setup.ema else 0
    trainer = FP32 * p + optimizer_state_bytes(setup.optimizer, _adapter_tensor_sizes(setup)) + ema
    casts = BF16 * p if setup.autocast else 0
    # latents and noise, the text features; during the forward also the noisy input and the target
    inputs = b * (2 * n * arch.in_channels + arch.text_layers * m * arch.text_width) * setup.weight_bytes
    if setup.modulation_on_host:  # the blocks' modulation vectors come with the batch: 2 x 6 x dim per block
        inputs += b * layers * 2 * 6 * arch.dim * setup.weight_bytes
    forward_inputs = 2 * b * n * arch.in_channels * setup.weight_bytes
    rope = (n + m) * (arch.head_dim // 2) * FP32  # RoPE angles: the forward's; checkpoints keep them

    blocks = [_block(setup, i, grad_in=i > first, last=i == layers - 1) if i >= first else None for i in range(layers)]

    def kept(c: _Block) -> int:
        return b * (c.saved_image * n + c.saved_text * m) + c.saved_fixed

    def out(c: _Block) -> int:
        return b * (c.output_image * n + c.output_text * m)

    checkpoint = b * (n + m) * arch.dim * t.linear  # a checkpointed block keeps its inputs (both streams)

    def moment(name: str, activations: int, work: int, gradients: int = 0, extra_inputs: int = 0) -> StepMemory:
        return StepMemory(weights, trainer, gradients, casts, activations, work, inputs + extra_inputs, name)

    busiest = b * max(n, m)  # the work buffers belong to one stream's MLP: the longer stream's
    moments = []
    if not setup.checkpointing:
        last = blocks[-1]
        before = sum(kept(c) for c in blocks[:-1] if c)
        moments.append(moment("forward, last block's MLP", before + kept(last) - out(last),
                              busiest * last.work_forward + last.work_fixed, extra_inputs=forward_inputs + rope))
    grads_after, flow = 0, b * (n + m) * arch.dim * t.linear  # gradients: later blocks' adapter, block outputs
    for i in range(layers - 1, first - 1, -1):
        c = blocks[i]
        current = kept(c) - out(c)  # the block's output was the next block's input, freed with its backward
        if setup.checkpointing:
            held = (i + 1 - first) * checkpoint + rope
            moments.append(moment(f"backward, recomputing block {i}", held + current,
                                  flow + busiest * c.work_forward + c.work_fixed, grads_after))
        else:
            held = sum(kept(blocks[j]) for j in range(first, i))
        moments.append(moment(f"backward of block {i}", held + current - b * n * c.freed_early,
                              flow + busiest * c.work_backward + c.work_fixed, grads_after))
        grads_after += FP32 * sum(layer.params for layer in setup.adapted if layer.block == i)
    # the optimizer step: all gradients; torch's (foreach) AdamW makes one float32 temporary the size of the
    # parameters (the denominator); the 8-bit optimizers update in place, Prodigy goes one tensor at a time. The
    # next micro-batch is already loaded (the loop loads it once the backward pass is under way).
    optimizer_work = FP32 * p if setup.optimizer == "adamw" else 0
    moments.append(StepMemory(weights, trainer, FP32 * p, 0, 0, optimizer_work, 2 * inputs, "optimizer step"))
    return max(moments, key=lambda mem: mem.peak)
