"""lens-toy's components before training: configs, the word-level tokenizer and the frozen random text encoder.

Same classes and config keys as the real Lens (`LensTransformer2DModel`, `AutoencoderKLFlux2` with its BatchNorm
over the 2x2-patchified latent, `LensGptOssEncoder`, a fast tokenizer with the Harmony-style chat template, the real
scheduler config), sized for 64x64 images: 16 latent channels at 8x8, so 4x4 = 16 image tokens of 64 channels.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lens_tune.model.tiny import (
    EOS_TOKEN,
    HARMONY_SPECIAL_TOKENS,
    PAD_TOKEN,
    TINY_CHAT_TEMPLATE,
    TINY_SCHEDULER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_VAE_CONFIG,
    UNK_TOKEN,
    rerandomize_,
)
from lens_tune.toy import world

# The tiny test model's VAE and GPT-OSS (same classes and structure as the real ones), resized for the toy world.
VAE_CONFIG: dict[str, Any] = TINY_VAE_CONFIG | {
    "block_out_channels": [8, 16, 32, 64],  # narrow at full resolution, where convolutions cost most on a CPU
    "latent_channels": 16,  # the detail (a star's points, an object's texture) has to survive 8x downsampling
    "norm_num_groups": 4,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    k: v for k, v in TINY_TEXT_ENCODER_CONFIG.items() if k not in ("vocab_size", "eos_token_id", "pad_token_id")
} | {
    "hidden_size": 64,
    "intermediate_size": 64,
    "max_position_embeddings": 4096,
    "rope_parameters": TINY_TEXT_ENCODER_CONFIG["rope_parameters"] | {"factor": 2.0, "original_max_position_embeddings": 2048},
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,  # 16 latent channels x 2x2 patch
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "inner_dim": 96,
    "enc_hidden_dim": 64,
    "axes_dims_rope": [8, 12, 12],
    "gate_mlp": True,
    "rms_norm": True,
    "multi_layer_encoder_feature": True,
    "selected_layer_index": [1, 3],  # a middle layer and the last, as the real [5, 11, 17, 23] includes the last
}

SCHEDULER_CONFIG = TINY_SCHEDULER_CONFIG  # the real Lens scheduler config


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def _word_level(vocab: dict[str, int]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK_TOKEN, *HARMONY_SPECIAL_TOKENS)]
    )
    return tokenizer


def _fast(backend):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
        model_max_length=4096, padding_side="right",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tokenizer():
    """A word-level tokenizer: every word of the chat template and of the world is one token.

    The chat words are read off a rendered chat (so they follow the template), the world's words from
    `world.VOCABULARY`; ids are fixed by that order, so the tokenizer is the same on every machine.
    """
    from lens_tune.model.text_encoder import render_lens_chat

    specials = [UNK_TOKEN, *HARMONY_SPECIAL_TOKENS]
    bootstrap = _fast(_word_level({t: i for i, t in enumerate(specials)}))
    chat = render_lens_chat(bootstrap, "")
    for token in HARMONY_SPECIAL_TOKENS:
        chat = chat.replace(token, " ")
    words = [w for w, _ in bootstrap.backend_tokenizer.pre_tokenizer.pre_tokenize_str(chat.lower())]
    vocab = {t: i for i, t in enumerate(specials)}
    for word in [*words, ",", *world.VOCABULARY]:
        vocab.setdefault(word, len(vocab))
    return _fast(_word_level(vocab))


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------
def build_text_encoder(tokenizer, seed: int):
    """GPT-OSS in miniature with random weights (drawn from `seed`); lens-toy keeps it frozen and random."""
    from transformers import GptOssConfig

    from lens_tune.model.text_encoder import LensGptOssEncoder

    kwargs = copy.deepcopy(TEXT_ENCODER_CONFIG)
    kwargs.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = GptOssConfig(**kwargs)
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):  # the constructor's default init uses the global RNG
        encoder = LensGptOssEncoder(config)
    rerandomize_(encoder, torch.Generator().manual_seed(seed))
    encoder.set_selected_layers(TRANSFORMER_CONFIG["selected_layer_index"])
    return encoder.eval().requires_grad_(False)


def build_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(**copy.deepcopy(VAE_CONFIG))


def build_transformer():
    from lens_tune.model.transformer import LensTransformer2DModel

    return LensTransformer2DModel(**copy.deepcopy(TRANSFORMER_CONFIG))


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**copy.deepcopy(SCHEDULER_CONFIG))
