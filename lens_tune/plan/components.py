"""Memory of the other components: the GPT-OSS text encoder, the FLUX.2 VAE, and the denoiser when it samples.

- Text encoder: weights per storage format (MXFP4 experts: 4 bits and an 8-bit scale per 32 values, everything
  else bf16; or all values dequantised to bf16 / float32), plus one caption's forward (eager attention scores
  for every head, as transformers runs GPT-OSS; the mixture of experts runs one expert at a time).
- VAE (always float32): the largest set of feature maps alive at once, per pixel, read off diffusers' encoder and
  decoder code: the encoder's full-resolution stage holds the stem output, a ResNet block's input and three of
  its intermediates; the decoder's holds its input and the first ResNet's normalised input and activation, or its
  input and a later ResNet's four maps. Checked against measurement in tests/test_plan_memory.py.
- Denoiser sampling (no gradients): the busiest moment of a block's forward (its attention).
"""

from __future__ import annotations

import functools
import json

from lens_tune.plan.architecture import Architecture

BF16, FP32 = 2, 4
MXFP4_BYTES = 4.25 / 8  # 4-bit values and one 8-bit scale per 32

# The published FLUX.2 VAE config that Lens ships (vae/config.json)
OFFICIAL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}
# The published GPT-OSS-20B config of Lens's text_encoder/config.json (the keys the estimate needs)
OFFICIAL_TEXT_ENCODER_CONFIG = {
    "vocab_size": 201088, "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "num_local_experts": 32,
    "attention_bias": True, "tie_word_embeddings": False, "quantization_config": {"quant_method": "mxfp4"},
}
OFFICIAL_TEXT_OFFSET = 97  # chat-template tokens before the prompt (cut from the features, but encoded)


# ----------------------------------------------------------------------------------------------------------------
# GPT-OSS
# ----------------------------------------------------------------------------------------------------------------
def _text_encoder_layer_params(config: dict) -> tuple[int, int]:
    """One decoder layer's (expert weights, everything else)."""
    h, experts = config["hidden_size"], config["num_local_experts"]
    heads, kv, hd, inter = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
                            config["intermediate_size"])
    bias = bool(config.get("attention_bias", True))
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + heads  # q, k, v, o and the sinks
    attention += (heads * hd + 2 * kv * hd + h) * bias
    router = experts * h + experts
    expert_weights = experts * (h * 2 * inter + inter * h)
    expert_biases = experts * (2 * inter + h)
    return expert_weights, attention + router + expert_biases + 2 * h  # and two RMSNorms


def text_encoder_params(config: dict) -> tuple[int, int]:
    """(expert weights, everything else): the experts' weights are what MXFP4 stores in 4 bits."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    expert_weights, per_layer_other = _text_encoder_layer_params(config)
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)  # embed_tokens, lm_head
    return layers * expert_weights, layers * per_layer_other + embeddings + h


def text_encoder_layer_bytes(config: dict, dtype_bytes: int) -> int:
    """One decoder layer's weights, dequantised (what streaming copies to the GPU)."""
    return sum(_text_encoder_layer_params(config)) * dtype_bytes


def text_encoder_chunk_bytes(config: dict, captions: int, tokens: int, features: int, dtype_bytes: int) -> int:
    """What a chunk of captions keeps on the device while it goes through the layers together: per caption, the
    hidden state and the `features` selected layers' outputs [tokens, hidden], and eager attention's two additive
    masks (full and sliding) [tokens, tokens]."""
    h = config["hidden_size"]
    return captions * dtype_bytes * (tokens * h * (1 + features) + 2 * tokens * tokens)


def text_encoder_weight_bytes(config: dict, storage: str) -> int:
    """`storage`: mxfp4 (experts 4-bit, rest bf16), bf16 or fp32 (everything dequantised)."""
    experts, other = text_encoder_params(config)
    if storage == "mxfp4":
        return int(experts * MXFP4_BYTES) + other * BF16
    return (experts + other) * (BF16 if storage == "bf16" else FP32)


def text_encoder_forward_bytes(config: dict, tokens: int, dtype_bytes: int) -> int:
    """One caption through the encoder without gradients: eager attention scores (logits, with the sinks column,
    softmax and the cast: four [heads, S, S] tensors), a handful of hidden-state and q/k/v-sized tensors, the
    selected layers' outputs."""
    h, heads, hd = config["hidden_size"], config["num_attention_heads"], config["head_dim"]
    return dtype_bytes * (4 * heads * tokens * tokens + tokens * (8 * h + 4 * heads * hd) + 4 * tokens * h)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _vae_params(config_json: str) -> int:
    import torch
    from diffusers import AutoencoderKLFlux2

    config = json.loads(config_json)
    allowed = set(AutoencoderKLFlux2.__init__.__code__.co_varnames)
    with torch.device("meta"):
        vae = AutoencoderKLFlux2(**{k: v for k, v in config.items() if k in allowed})
    return sum(p.numel() for p in vae.parameters()) + sum(b.numel() for b in vae.buffers() if b.is_floating_point())


def vae_weight_bytes(config: dict) -> int:
    return FP32 * _vae_params(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True))


def vae_encode_bytes(config: dict, pixels: int, batch: int = 1) -> int:
    """Peak activations of encoding `pixels` (H*W) per image, float32."""
    c0 = config["block_out_channels"][0]
    return FP32 * batch * pixels * ((3 + min(config["layers_per_block"], 2)) * c0 + 3)


def vae_decode_bytes(config: dict, pixels: int, batch: int = 1) -> int:
    """Peak activations of decoding to `pixels` (H*W) per image, float32."""
    c0, c1 = config["block_out_channels"][:2]
    return FP32 * batch * pixels * (max(3 * c1, c1 + 4 * c0) + 1)


# ----------------------------------------------------------------------------------------------------------------
# The denoiser sampling
# ----------------------------------------------------------------------------------------------------------------
def sampling_forward_bytes(arch: Architecture, batch: int, image_tokens: int, text_tokens: int, weight_bytes: int,
                           adapter: bool) -> int:
    """Activations at the busiest moment of one denoiser forward without gradients (`batch` includes guidance's
    doubling). That moment is a block's attention: the residual stream, the modulated input, the qkv output, the
    rotated q and k, the joint q, k, v and the attention output are alive together, 14 hidden widths per token.
    A float32 adapter adds its float32 copy of the input, its output and the sum: 4 more float32 widths on a bf16
    base, 1 on a float32 base (the input needs no copy there). Measured in tests/test_plan_memory.py."""
    d, w = arch.dim, weight_bytes
    per_token = 14 * d * w + (FP32 * d * (4 if w == BF16 else 1) if adapter else 0)
    rope = (image_tokens + text_tokens) * (arch.head_dim // 2) * FP32
    return batch * (image_tokens + text_tokens) * per_token + rope
