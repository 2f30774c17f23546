"""GPT-OSS for caching captions and the class prompt, placed where the recipe's model section asks.

`model.text_encoder_device`:
- auto / gpu: the whole encoder on the run's GPU (MXFP4 13.8 GB on Hopper GPUs with the kernels, 42 GB bf16 elsewhere);
- offload: the weights in host memory, each decoder layer copied to the GPU for its turn (two layers on the GPU
  at a time, about 3.2 GB; the copies cost PCIe time);
- cpu: all of it on the CPU (slowest; no GPU memory).
Every placement gives the same features for the same dtype, so the cache keys do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lens_tune.errors import LensTuneError
from lens_tune.recipe.schema import Recipe

# Captions encoded together, layer by layer: a streamed layer's copy serves this many. Their hidden states and
# features stay on the device until the chunk is done: about 64 x 5 x 150 tokens x 5.6 KiB = 270 MiB for GPT-OSS-20B.
CHUNK = 64


def text_encoder_placement(recipe: Recipe, device: torch.device) -> tuple[torch.device, torch.device | None]:
    """(where the weights are loaded, where the layers run when streamed: None when they run where they are)."""
    wanted = recipe.model.text_encoder_device
    if wanted == "gpu" and device.type != "cuda":
        raise LensTuneError("model.text_encoder_device is gpu but this run has no GPU; use auto, offload or cpu.")
    if device.type != "cuda" or wanted == "cpu":
        return torch.device("cpu"), None  # offload without a GPU: there is nowhere to stream to
    if wanted == "offload":
        return torch.device("cpu"), device
    return device, None


def text_encoder_keeps_mxfp4(recipe: Recipe) -> bool:
    """model.text_encoder_quantization: auto keeps MXFP4 where it runs natively, none always dequantises."""
    if recipe.model.text_encoder_quantization == "nf4":
        raise LensTuneError(
            "model.text_encoder_quantization: nf4 is not available: bitsandbytes cannot quantise GPT-OSS's fused "
            "expert tensors (91% of its weights). Use text_encoder_device: offload (or cpu) to cache text features "
            "on a small GPU."
        )
    return recipe.model.text_encoder_quantization != "none"


def encode_captions(model_root: Path, recipe: Recipe, device: torch.device, dtype: torch.dtype,
                    captions: Sequence[str], max_sequence_length: int) -> Iterator[tuple[str, list[torch.Tensor], torch.Tensor]]:
    """(caption, features, mask) for each caption, encoded on its own as the pipeline's encode_prompt does, with the
    encoder placed as the recipe asks. Captions go through in chunks, layer by layer (a streamed layer is copied
    once per chunk); the encoder is loaded before the first and dropped after the last."""
    from lens_tune.model.text_encoder import chat_prefix_length, encode_text_each, load_text_encoder, load_tokenizer
    from lens_tune.model.transformer import LensTransformer2DModel

    layers = LensTransformer2DModel.load_config(model_root / "transformer")["selected_layer_index"]
    tokenizer = load_tokenizer(model_root / "tokenizer")
    offset = chat_prefix_length(tokenizer)
    load_on, stream_to = text_encoder_placement(recipe, device)
    encoder = load_text_encoder(model_root / "text_encoder", dtype=dtype, device=load_on,
                                keep_mxfp4=text_encoder_keeps_mxfp4(recipe))
    encoder.stream_layers_to(stream_to)
    for start in range(0, len(captions), CHUNK):
        chunk = captions[start:start + CHUNK]
        encoded = encode_text_each(tokenizer, encoder, chunk, layers, max_sequence_length, offset, stream_to or load_on)
        for caption, (features, mask) in zip(chunk, encoded):
            yield caption, features, mask
