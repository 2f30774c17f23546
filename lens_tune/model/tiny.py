"""Tiny random Lens: every component of the real architecture, small enough for CPU tests.

This module is the one place that builds the toy model used by the test-suite and by ``--model tiny``:

- the same classes and config keys as the real checkpoint (``LensTransformer2DModel``, ``LensGptOssEncoder``,
  ``AutoencoderKLFlux2``, ``FlowMatchEulerDiscreteScheduler``, a fast tokenizer with a Harmony-style chat template);
- the same structure (8x VAE downsampling plus a 2x2 patch, BatchNorm over the patchified latent, alternating
  sliding/full GPT-OSS layers with YaRN RoPE and a mixture of experts, multi-layer text features that include the
  last decoder layer), only narrower and shallower;
- deterministic, seeded random weights in which nothing is trivially zero or an identity.

A 64x64 image runs through every component in a fraction of a second on a CPU. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Bump when the way components are built or randomised changes; it names the cache folder, together with a hash of
# the configs, so a stale cached tiny pipeline is never reused.
TINY_FORMAT_VERSION = 1

# Harmony special tokens, in id order after [UNK] (id 0): <|start|>=1 ... <|endoftext|>=6.
UNK_TOKEN = "[UNK]"
HARMONY_SPECIAL_TOKENS = ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|endoftext|>")
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|return|>"
TINY_PAD_TOKEN_ID = 6
TINY_EOS_TOKEN_ID = 5
# Size of the trained vocabulary (special tokens included): training runs until every corpus word is one token.
TINY_VOCAB_SIZE = 1397

# The date is frozen so that the rendered prompt, and therefore every text feature, does not change from day to day.
TINY_CHAT_DATE = "2026-05-23"

# Number of tokens of the tiny chat prefix (everything up to and including ``<|start|>user<|message|>``). The real
# Lens tokenizer gives 97; the pipeline must drop this many tokens when it runs the tiny model.
# Checked against a fresh computation in tests/test_tiny.py.
TINY_TXT_OFFSET = 89

# Harmony-style chat template. Same block structure as the GPT-OSS template (system block with a frozen date,
# developer block with the instructions, user block, assistant analysis block for `thinking`, assistant final block
# ending with <|return|> when it is the last message), written for this toy tokenizer.
TINY_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_written=false) -%}"
    "{%- for message in messages -%}"
    "{%- if not ns.system_written -%}"
    "{{- '<|start|>system<|message|>You are Lens Tiny, a small random language model used only for tests.\\n"
    "Knowledge cutoff: 2024-06\\nCurrent date: " + TINY_CHAT_DATE + "\\n\\nReasoning: medium\\n\\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' -}}"
    "{%- set ns.system_written = true -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' or message['role'] == 'developer' -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '\\n\\n<|end|>' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|start|>user<|message|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message.get('thinking') -%}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message['thinking'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + (message['content'] or '') -}}"
    "{%- if loop.last -%}{{- '<|return|>' -}}{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)

# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
# Same keys as the real transformer/config.json. 32 = 8 VAE latent channels x 2x2 patch; width 2 x 16 = 32.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 32,
    "out_channels": 8,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "inner_dim": 32,
    "enc_hidden_dim": 32,
    "axes_dims_rope": [4, 6, 6],
    "gate_mlp": True,
    "rms_norm": True,
    "multi_layer_encoder_feature": True,
    "selected_layer_index": [0, 2, 3],  # includes the last decoder layer, as the real [5, 11, 17, 23] does
}

# GPT-OSS, shaped like gpt-oss-20b in miniature: alternating sliding/full attention starting with sliding, grouped
# query attention, attention sinks and biases, a top-k mixture of experts with the clamped SwiGLU, YaRN RoPE.
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["LensGptOssEncoder"],
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 24,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    "attention_bias": True,
    "attention_dropout": 0.0,
    "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": None,
    "eos_token_id": TINY_EOS_TOKEN_ID,
    "pad_token_id": TINY_PAD_TOKEN_ID,
}

# FLUX.2 VAE in miniature: four blocks (8x downsampling), mid-block attention, quant convs, BatchNorm over the
# 2x2-patchified latent (8 x 4 = 32 channels = the transformer's in_channels).
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "decoder_block_out_channels": None,
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": 64,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}

# The real Lens scheduler config, unchanged.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

# model_index.json of the real Lens repository (component -> [library, class]).

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
# Plain English about pictures. Words listed earlier are repeated more often in the training corpus, so the most
# useful ones become single tokens first.
_IMAGE_WORDS = """
a an the of in on at by with and or to from for into onto over under above below behind beside near next between
inside outside around through across along against among without this that these those its his her their is are
photo photograph picture image painting drawing sketch render illustration portrait landscape scene view shot
closeup close up macro wide angle top side front back left right center middle corner background foreground edge
sks dog cat bird horse cow sheep pig fox wolf bear lion tiger zebra giraffe elephant monkey rabbit mouse squirrel
deer duck chicken owl eagle parrot penguin fish shark whale dolphin turtle frog snake butterfly bee spider puppy
kitten person man woman boy girl child baby people face hands eyes hair smile
red orange yellow green blue purple pink brown black white gray grey gold silver beige teal cyan magenta violet
colorful bright dark light pale pastel vivid neon muted warm cool monochrome shadow shadows glow shiny glossy matte
cube sphere circle square triangle rectangle cylinder cone pyramid star heart ring line lines dot dots stripe
stripes pattern shape shapes round flat curved straight pointed spiral grid
small big large tiny huge giant little tall short long wide narrow thin thick tall heavy full empty half
one two three four five six seven eight nine ten many few several some pair group single double
house home building tower bridge castle church temple city town village street road path car bus truck train
bike bicycle boat ship plane airplane rocket robot computer phone lamp chair table desk bed sofa window door wall
floor roof stairs garden park farm field forest tree trees flower flowers grass leaf leaves plant rose sunflower
mountain mountains hill valley river lake sea ocean beach sand desert island cave waterfall sky cloud clouds sun
moon stars rain snow fog storm sunset sunrise night day morning evening winter summer spring autumn
cup mug glass bottle plate bowl spoon fork knife bread cake pizza burger apple banana orange coffee tea food fruit
book books paper sign letter letters word words text logo poster map clock watch hat shoe shoes shirt dress coat
bag box ball toy guitar piano drum camera mirror vase candle umbrella key
wooden wood metal stone glass plastic paper fabric leather brick concrete marble steel iron gold ceramic velvet
silk cotton wool fur feather water fire ice smoke smooth rough soft hard wet dry old new ancient modern rusty
style styles art artistic watercolor oil acrylic pencil ink charcoal pastel digital anime cartoon comic pixel
realistic photorealistic abstract surreal minimalist impressionist cubist vintage retro cinematic studio
lighting lit dramatic soft sharp blurry blur focus detailed detail high quality resolution texture textures 4k
holding sitting standing walking running flying swimming jumping sleeping eating drinking reading playing
looking smiling wearing riding says say said made covered filled painted carved floating hanging lying
happy sad cute beautiful ugly funny scary calm peaceful busy quiet famous simple
very quite really just only also not no yes it he she they we you i my your our
hello world cat mat
"""

# Every word the chat template and the Lens prompt strings produce, so that the chat prefix tokenizes into words.
_CHAT_WORDS = """
you are lens tiny a small random language model used only for tests
knowledge cutoff current date reasoning medium valid channels analysis commentary final channel must be included
for every message instructions system developer user assistant
describe the image by detailing color shape size texture quantity text spatial relationships of objects and
background need to generate one according description
2024 06 2026 05 23 0 1 2 3 4 5 6 7 8 9 10 100
"""

# Repeat counts: chat words and the first image words most often.
_CHAT_REPEAT = 8


def _corpus_words() -> list[str]:
    """The unique words of the built-in corpus, in a fixed order."""
    seen: dict[str, None] = {}
    for word in (_CHAT_WORDS + _IMAGE_WORDS).split():
        seen.setdefault(word.lower(), None)
    return list(seen)


def _corpus_lines() -> list[str]:
    """Training text: the chat words repeated, then the image words with a frequency that decreases down the list."""
    lines = [_CHAT_WORDS.strip()] * _CHAT_REPEAT
    image_words = [w for w in dict.fromkeys(_IMAGE_WORDS.split())]
    n = len(image_words)
    for i, word in enumerate(image_words):
        # 1..4 repetitions: earlier (more common) words merge first.
        lines.append(" ".join([word] * (1 + (3 * (n - i)) // n)))
    # Punctuation and symbols that prompts and the chat template use, in both word-initial and continuation contexts.
    lines.append(". , : ; ! ? ' \" ( ) [ ] - _ / # & + = * % $ @ < > | ... -- ## x2 a1 b2")
    lines.append(" ".join("abcdefghijklmnopqrstuvwxyz0123456789"))
    lines.append(" ".join("q" + c + "z" for c in "abcdefghijklmnopqrstuvwxyz0123456789"))
    return lines


def _new_wordpiece(vocab: dict[str, int] | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.WordPiece(
        vocab=vocab, unk_token=UNK_TOKEN, continuing_subword_prefix="##", max_input_chars_per_word=100
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


@functools.lru_cache(maxsize=1)
def _train_tokenizer_json() -> str:
    """Train the WordPiece vocabulary (once per process); returns the `tokenizers` JSON.

    The `tokenizers` trainer numbers the continuation pieces (``##e``) in hash-map order, which differs between
    processes, and breaks ties between equally frequent merges by those numbers. Registering every continuation
    piece up front (as temporary special tokens) fixes their ids and makes the training fully deterministic. The
    trained vocabulary is then moved into a fresh tokenizer in which only the real special tokens are special.
    """
    from tokenizers import AddedToken, trainers

    lines = _corpus_lines()
    chars = sorted({c for line in lines for word in line.lower().split() for c in word})
    pinned = [UNK_TOKEN, *HARMONY_SPECIAL_TOKENS, *("##" + c for c in chars)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=4096,  # an upper bound only: training ends earlier, when every corpus word is one token
        min_frequency=1,
        special_tokens=pinned,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    scratch = _new_wordpiece()
    scratch.train_from_iterator(lines, trainer=trainer)
    vocab = scratch.get_vocab(with_added_tokens=True)

    tok = _new_wordpiece(vocab)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for t in (UNK_TOKEN, *HARMONY_SPECIAL_TOKENS)]
    )
    return tok.to_str()


def build_tiny_tokenizer():
    """A fresh tiny WordPiece tokenizer (`transformers.PreTrainedTokenizerFast`) with the Harmony-style template.

    Deterministic and offline. Lower-cases its input; `<|endoftext|>` pads, `<|return|>` is eos; there is no bos.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_tokenizer_json())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=131072,
        padding_side="right",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    for token, expected in ((PAD_TOKEN, TINY_PAD_TOKEN_ID), (EOS_TOKEN, TINY_EOS_TOKEN_ID)):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:  # would mean the tokenizers library changed how trainers place special tokens
            raise RuntimeError(f"tiny tokenizer: {token} has id {actual}, expected {expected}")
    return tokenizer


def tiny_chat_prefix_length(tokenizer=None) -> int:
    """Tokens up to and including `<|start|>user<|message|>` in a rendered Lens chat (the tiny `txt_offset`)."""
    from lens_tune.model.text_encoder import chat_prefix_length

    return chat_prefix_length(tokenizer if tokenizer is not None else build_tiny_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------
EXPERT_GATE_UP_GAIN = 3.0  # large enough that the GPT-OSS SwiGLU clamp at +-7 is reached now and then


def _normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def rerandomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Give every parameter of ``model`` a random value drawn from ``gen`` (in a fixed module order).

    Linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), norm weights ~ 1 + N(0, 0.1²), embeddings and
    attention sinks ~ N(0, 1); GPT-OSS experts and router are treated as stacked linears (expert gate/up weights
    get a gain of 3). Raises on a parameter it does not know, so nothing is silently left at its default.
    """
    with torch.no_grad():
        for module_name, module in model.named_modules():
            kind = type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                shape = param.shape
                if name == "bias" or name.endswith("_bias"):
                    value = _normal(shape, 0.1, gen)
                elif _is_norm(module) and name == "weight":
                    value = 1.0 + _normal(shape, 0.1, gen)
                elif isinstance(module, nn.Embedding):
                    value = _normal(shape, 1.0, gen)
                elif name == "sinks":
                    value = _normal(shape, 1.0, gen)
                elif kind == "GptOssExperts" and name == "gate_up_proj":  # [experts, hidden, 2 * intermediate]
                    value = _normal(shape, EXPERT_GATE_UP_GAIN / math.sqrt(shape[1]), gen)
                elif kind == "GptOssExperts" and name == "down_proj":  # [experts, intermediate, hidden]
                    value = _normal(shape, 1.0 / math.sqrt(shape[1]), gen)
                elif name == "weight" and param.dim() >= 2:  # Linear [out, in], Conv [out, in, kh, kw], router
                    value = _normal(shape, 1.0 / math.sqrt(shape[1:].numel()), gen)
                else:
                    raise TypeError(f"rerandomize_: no rule for parameter {module_name}.{name} of {kind}")
                param.copy_(value.to(param.dtype))


def _randomize_vae_batch_norm_(vae: nn.Module, gen: torch.Generator) -> None:
    bn = vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(_normal(bn.running_mean.shape, 0.3, gen))
        bn.running_var.copy_(0.3 + 1.7 * torch.rand(bn.running_var.shape, generator=gen, dtype=torch.float32))


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random Lens components: ``{"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}``.

    float32, eval mode, deterministic for ``seed``. The global torch RNG state is left untouched.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import GptOssConfig

    from lens_tune.model.text_encoder import LensGptOssEncoder
    from lens_tune.model.transformer import LensTransformer2DModel

    tokenizer = build_tiny_tokenizer()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # The constructors draw their default init from the global RNG; fork it so callers' RNG state is unchanged.
    with torch.random.fork_rng(devices=[]):
        transformer = LensTransformer2DModel(**copy.deepcopy(TINY_TRANSFORMER_CONFIG))
        vae = AutoencoderKLFlux2(**copy.deepcopy(TINY_VAE_CONFIG))
        te_kwargs = copy.deepcopy(TINY_TEXT_ENCODER_CONFIG)
        # Always the tokenizer's real size (== TINY_VOCAB_SIZE; tests/test_tiny.py checks the constant).
        te_kwargs["vocab_size"] = len(tokenizer)
        te_config = GptOssConfig(**te_kwargs)
        te_config.dtype = torch.float32
        text_encoder = LensGptOssEncoder(te_config)

    # One generator, fixed order: transformer, VAE (+ BN statistics), text encoder.
    rerandomize_(transformer, gen)
    rerandomize_(vae, gen)
    _randomize_vae_batch_norm_(vae, gen)
    rerandomize_(text_encoder, gen)

    components = {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**copy.deepcopy(TINY_SCHEDULER_CONFIG)),
    }
    return components


# ----------------------------------------------------------------------------------------------------------------
# Saving and caching
# ----------------------------------------------------------------------------------------------------------------
def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Lens pipeline in the real Lens folder layout (safetensors only); returns the folder.

    Layout: ``model_index.json`` plus ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``, each written by the component's own ``save_pretrained``.
    """
    from lens_tune.model.pipeline import LensPipeline

    folder = Path(folder)
    LensPipeline(**build_tiny_components(seed)).save_pretrained(folder)
    return folder


def tiny_version() -> str:
    """Identifies the tiny model's contents: format version plus a hash of every config and the chat template."""
    payload = json.dumps(
        [
            TINY_FORMAT_VERSION,
            TINY_TRANSFORMER_CONFIG,
            TINY_TEXT_ENCODER_CONFIG,
            TINY_VAE_CONFIG,
            TINY_SCHEDULER_CONFIG,
            TINY_CHAT_TEMPLATE,
            _IMAGE_WORDS,
            _CHAT_WORDS,
        ],
        sort_keys=True,
    )
    return f"v{TINY_FORMAT_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def cache_root() -> Path:
    """``$LENS_TUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/lens-tune`` or ``~/.cache/lens-tune``."""
    env = os.environ.get("LENS_TUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lens-tune"


def tiny_pipeline_dir(seed: int = 0) -> Path:
    """The cached tiny pipeline folder for ``seed``, built on first use (what ``--model tiny`` resolves to).

    Built in a temporary folder next to the final one and renamed into place, so a half-written folder is never
    visible and concurrent first uses are safe (the loser of the race discards its copy).
    """
    root = cache_root()
    final = root / f"tiny-{tiny_version()}-{int(seed)}"
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        save_tiny_pipeline(tmp, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target exists and is not empty); use its copy.
            if not (final / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
