"""Lens text conditioning: the GPT-OSS feature encoder, prompt rendering and prompt encoding.

Lens conditions its DiT on the raw hidden states of a few GPT-OSS decoder layers (no final norm),
computed on a Harmony chat rendering of the prompt. The first ``txt_offset`` tokens (the chat
prefix up to and including the user header) are dropped, so what remains is the prompt tokens,
the assistant suffix and any padding.

Everything here follows the reference (diffusers PR #13837) behaviour pinned by
``tests/golden/lens-tiny/pipeline``; see ``tests/golden/README.md``.
"""

from __future__ import annotations

import os
import sys

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, GptOssForCausalLM, Mxfp4Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lens_tune.errors import ModelLoadError
from lens_tune.model.loading import resolve_folder

LENS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background."
)
LENS_ASSISTANT_THINKING = "Need to generate one image according to the description."
# Tokens of the real model's chat prefix (system + developer blocks + user header).
DEFAULT_TXT_OFFSET = 97
DEFAULT_MAX_SEQUENCE_LENGTH = 512

# Harmony marks the end of the last assistant message with <|return|>; the reference cuts there so
# that the sequence ends on the open `<|start|>assistant<|channel|>final<|message|>` header.
_RETURN_TOKEN = "<|return|>"
# Any text that tokenizes to at least one token and cannot appear in a chat template.
_PREFIX_SENTINEL = "lens tune prefix sentinel"


def _validate_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Check a selected-layer list against the model depth; returns it as a list of ints."""
    if layers is None:
        raise ValueError("layers must be a non-empty sequence of decoder layer indices; got None")
    out = [int(i) for i in layers]
    if not out:
        raise ValueError("layers must be a non-empty sequence of decoder layer indices")
    if len(set(out)) != len(out):
        raise ValueError(f"layers must be unique; got {out}")
    bad = [i for i in out if i < 0 or i >= num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the text encoder has {num_layers} decoder layers (0..{num_layers - 1})")
    return out


class LensGptOssEncoder(GptOssForCausalLM):
    """``GptOssForCausalLM`` that returns the raw outputs of selected decoder layers.

    Same weights and config as GPT-OSS; the only addition is :meth:`encode_layers`, which stops
    after the deepest selected layer (Lens never needs the final norm or the LM head).
    """

    def stream_layers_to(self, device: torch.device | str | None) -> None:
        """Run on `device` while the weights stay where they are (host memory): each decoder layer's weights are
        copied to `device` for its turn and dropped after it, the next layer's copy already under way. A GPU then
        holds two layers (about 1.6 GB each for GPT-OSS-20B in bf16) instead of the whole 42 GB model. None stops it.
        """
        self._lens_stream_device = None if device is None else torch.device(device)

    def set_selected_layers(self, layers: Sequence[int]) -> None:
        """Fix the layers that a plain ``forward(input_ids, attention_mask)`` returns (reference API)."""
        self._lens_selected_layers = _validate_layers(layers, len(self.model.layers))

    @property
    def selected_layers(self) -> list[int] | None:
        return getattr(self, "_lens_selected_layers", None)

    def encode_layers(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        layers: Sequence[int],
    ) -> list[torch.Tensor]:
        """Hidden states after each decoder layer in ``layers`` (order kept), each [B, S, hidden].

        ``attention_mask`` is the 2D padding mask (1 = real token); None means no padding.
        """
        return self.encode_each([(input_ids, attention_mask)], layers)[0]

    def encode_each(
        self,
        inputs: Sequence[tuple[torch.LongTensor, torch.Tensor | None]],
        layers: Sequence[int],
    ) -> list[list[torch.Tensor]]:
        """`encode_layers` for each (input_ids, attention_mask) of `inputs`, run layer by layer over all of them,
        so that when streaming (`stream_layers_to`) each decoder layer's weights are copied once, not once per input.
        """
        layers = _validate_layers(layers, len(self.model.layers))
        last = max(layers)
        stream_device = getattr(self, "_lens_stream_device", None)
        states = [self._layer_inputs(ids, mask, last, stream_device) for ids, mask in inputs]
        wanted = set(layers)
        captured: list[dict[int, torch.Tensor]] = [{} for _ in inputs]
        stream = _LayerStream(self.model.layers[: last + 1], stream_device) if stream_device is not None else None
        try:
            for i in range(last + 1):  # early exit after the deepest selected layer
                layer = stream.layer(i) if stream else self.model.layers[i]
                for state, out in zip(states, captured):
                    state["hidden"] = layer(
                        state["hidden"],
                        attention_mask=state["masks"][self.model.config.layer_types[i]],
                        position_ids=state["position_ids"],
                        position_embeddings=state["position_embeddings"],
                        cache=None,
                        use_cache=False,
                    )
                    if i in wanted:
                        out[i] = state["hidden"]
        finally:
            if stream:
                stream.close()
        return [[out[i] for i in layers] for out in captured]

    def _layer_inputs(self, input_ids, attention_mask, last: int, stream_device) -> dict[str, Any]:
        """Embeddings, positions, rotary embeddings and attention masks for the decoder layers up to `last`."""
        model = self.model
        weights_device = model.embed_tokens.weight.device
        device = stream_device or weights_device
        if attention_mask is None:
            # Always pass a 2D mask: with none, transformers may try to detect packed sequences.
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        # The embedding table (1.2 GB in GPT-OSS-20B) is only indexed: it stays with the weights when streaming.
        hidden = model.embed_tokens(input_ids.to(weights_device)).to(device)
        batch, seq = input_ids.shape
        # Every row gets positions 0..S-1, padded rows included (right padding keeps them aligned).
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)

        layer_types = model.config.layer_types[: last + 1]
        mask_kwargs = dict(
            config=model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        # Causal + padding masks in whatever form the configured attention implementation wants;
        # only build the kinds the layers we run actually use.
        masks = {}
        if "full_attention" in layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return dict(hidden=hidden, masks=masks, position_ids=position_ids,
                    position_embeddings=model.rotary_emb(hidden, position_ids))

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        # After set_selected_layers, `encoder(ids, attention_mask=mask)` returns the layer features,
        # as the reference does. Any other call (generate, labels, ...) stays a normal causal LM.
        if self.selected_layers is not None and input_ids is not None and not args and not kwargs:
            return self.encode_layers(input_ids, attention_mask, self.selected_layers)
        return super().forward(input_ids, attention_mask, *args, **kwargs)


class _LayerStream:
    """Decoder layers run on `device` from weights kept elsewhere. `layer(i)` drops layer i-1's copy, waits for
    layer i's, starts copying layer i+1's in a background thread (on a side CUDA stream, so the host-to-device copy
    overlaps layer i's compute) and returns layer i as a callable on its copy: two layers' copies alive at most.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.layers, self.device = layers, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-layer-copy")
        self.current: dict[str, torch.Tensor] | None = None
        self.next = self.copier.submit(self._copy, 0)

    def _copy(self, i: int):
        layer = self.layers[i]
        tensors = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        if self.copy_stream is None:
            # copy=True: a real copy even where the weights already are (the CPU tests measure the same path)
            return {name: t.to(self.device, copy=True) for name, t in tensors.items()}, None
        with torch.cuda.stream(self.copy_stream):
            copies = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return copies, done

    def layer(self, i: int):
        self.current = None  # free layer i-1's copy before layer i+1's is allocated
        copies, done = self.next.result()
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in copies.values():  # made on the copy stream, used on the compute stream
                t.record_stream(compute)
        self.current = copies
        self.next = self.copier.submit(self._copy, i + 1) if i + 1 < len(self.layers) else None
        module = self.layers[i]
        # reads self.current when called, so a caller holding this callable does not keep the copy alive
        return lambda *args, **kwargs: torch.func.functional_call(module, self.current, args, kwargs, strict=True)

    def close(self) -> None:
        self.copier.shutdown(wait=True)
        self.current = self.next = None


# The real Lens model_index.json names ["transformers", "LensGptOssEncoder"]; make that resolvable.
# Loaders resolve it with importlib, i.e. through sys.modules (transformers' lazy module object can differ
# from an earlier `import transformers`).
if not hasattr(sys.modules["transformers"], "LensGptOssEncoder"):
    sys.modules["transformers"].LensGptOssEncoder = LensGptOssEncoder


# ----------------------------------------------------------------------------------------------
# Prompt rendering and tokenization
# ----------------------------------------------------------------------------------------------


def render_lens_chat(tokenizer, prompt: str) -> str:
    """The chat-template text Lens encodes for ``prompt`` (cut before the first ``<|return|>``)."""
    conversation = [
        {"role": "system", "content": LENS_SYSTEM_PROMPT, "thinking": None},
        {"role": "user", "content": prompt, "thinking": None},
        {"role": "assistant", "content": "", "thinking": LENS_ASSISTANT_THINKING},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    return text.split(_RETURN_TOKEN, 1)[0]


def _ensure_pad_token(tokenizer) -> None:
    # GPT-OSS-style tokenizers may ship without a pad token; the reference pads with eos then.
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and tokenize prompts: right padding to the longest, truncation counting the prefix.

    Returns ``(input_ids, attention_mask)``, both int64 [B, S], before the offset is dropped.
    """
    _ensure_pad_token(tokenizer)
    rendered = [render_lens_chat(tokenizer, p) for p in prompts]
    enc = tokenizer(
        rendered,
        padding=True,
        padding_side="right",  # features are read left to right after the prefix cut
        truncation=True,
        max_length=max_sequence_length,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def chat_prefix_length(tokenizer) -> int:
    """Number of tokens before the user prompt (up to and including the user header).

    Renders the chat with a sentinel prompt and counts the leading tokens that end before the
    sentinel's first character. 97 for the real Lens tokenizer (and the golden tiny one).
    """
    text = render_lens_chat(tokenizer, _PREFIX_SENTINEL)
    start = text.find(_PREFIX_SENTINEL)
    if start < 0:
        raise ValueError("The tokenizer's chat template does not include the user message text")
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as exc:
        raise ValueError(
            "chat_prefix_length needs a fast tokenizer (offset mapping); pass txt_offset explicitly instead"
        ) from exc
    count = 0
    for _, end in enc["offset_mapping"]:
        if end > start:
            break
        count += 1
    # A token that straddles the prompt boundary would make the cut ambiguous; refuse it.
    first_start = enc["offset_mapping"][count][0] if count < len(enc["offset_mapping"]) else None
    if first_start is not None and first_start < start:
        raise ValueError("A token spans the end of the chat prefix and the prompt; the prefix length is ambiguous")
    return count


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def _resolve_layers(text_encoder, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        layers = getattr(text_encoder, "selected_layers", None)
        if layers is None:
            raise ValueError("layers not given and the text encoder has no selected layers (call set_selected_layers)")
    return list(layers)


def encode_text(
    tokenizer,
    text_encoder: LensGptOssEncoder,
    prompts: Sequence[str],
    layers: Sequence[int] | None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    txt_offset: int = DEFAULT_TXT_OFFSET,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode prompts into Lens text features.

    Returns ``(features, mask)``: one [B, S - txt_offset, hidden] tensor per entry of ``layers``
    (same order) and a bool [B, S - txt_offset] mask (True = real token). If the padded length
    S is not longer than ``txt_offset``, features are [B, 0, hidden] and the mask is [B, 0].
    Positions where the mask is False still hold GPT-OSS outputs (the reference keeps them).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if txt_offset < 0:
        raise ValueError(f"txt_offset must be >= 0; got {txt_offset}")
    layers = _validate_layers(_resolve_layers(text_encoder, layers), text_encoder.config.num_hidden_layers)
    if device is None:
        device = text_encoder.model.embed_tokens.weight.device
    device = torch.device(device)

    input_ids, attention_mask = tokenize_prompts(tokenizer, prompts, max_sequence_length)
    batch, seq = input_ids.shape
    if seq <= txt_offset:
        # Nothing survives the cut, so running the encoder would be wasted work.
        dtype = text_encoder.model.embed_tokens.weight.dtype
        hidden = text_encoder.config.hidden_size
        features = [torch.zeros(batch, 0, hidden, dtype=dtype, device=device) for _ in layers]
        return features, torch.zeros(batch, 0, dtype=torch.bool, device=device)

    # Through forward() rather than encode_layers(), so model-offload hooks (which wrap forward) run.
    # no_grad, not inference_mode: the features are later used next to trainable tensors.
    text_encoder.set_selected_layers(layers)
    with torch.no_grad():
        outs = text_encoder(input_ids.to(device), attention_mask=attention_mask.to(device))
    return _cut_prefix(outs, attention_mask, txt_offset, device)


def _cut_prefix(outs: list[torch.Tensor], attention_mask: torch.Tensor, txt_offset: int, device: torch.device):
    features = [o[:, txt_offset:, :].to(device).contiguous() for o in outs]
    return features, attention_mask[:, txt_offset:].to(device=device, dtype=torch.bool)


def encode_text_each(
    tokenizer,
    text_encoder: LensGptOssEncoder,
    prompts: Sequence[str],
    layers: Sequence[int],
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    txt_offset: int = DEFAULT_TXT_OFFSET,
    device: torch.device | str | None = None,
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """`encode_text([prompt])` for each prompt (unpadded, the same numbers), run layer by layer over all of them
    (`LensGptOssEncoder.encode_each`): a streamed encoder copies each layer's weights once for the whole list."""
    layers = _validate_layers(layers, text_encoder.config.num_hidden_layers)
    device = torch.device(device) if device is not None else text_encoder.model.embed_tokens.weight.device
    tokenized = [tokenize_prompts(tokenizer, [p], max_sequence_length) for p in prompts]
    if any(ids.shape[1] <= txt_offset for ids, _ in tokenized):
        # Nothing of such a prompt survives the cut (never a real caption): encode_text's empty features.
        return [encode_text(tokenizer, text_encoder, [p], layers, max_sequence_length, txt_offset, device)
                for p in prompts]
    with torch.no_grad():
        outs = text_encoder.encode_each(tokenized, layers)
    return [_cut_prefix(o, mask, txt_offset, device) for o, (_, mask) in zip(outs, tokenized)]


def _repeat(features: list[torch.Tensor], mask: torch.Tensor, n: int):
    if n == 1:
        return features, mask
    return [f.repeat_interleave(n, dim=0) for f in features], mask.repeat_interleave(n, dim=0)


def _is_blank(text: Any) -> bool:
    return text is None or (isinstance(text, str) and not text.strip())


def encode_prompt_pair(
    tokenizer,
    text_encoder: LensGptOssEncoder | None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = "",
    *,
    layers: Sequence[int] | None = None,
    num_images_per_prompt: int = 1,
    prompt_embeds: list[torch.Tensor] | None = None,
    prompt_mask: torch.Tensor | None = None,
    negative_prompt_embeds: list[torch.Tensor] | None = None,
    negative_prompt_mask: torch.Tensor | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    txt_offset: int = DEFAULT_TXT_OFFSET,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Positive and negative Lens features with the reference ``encode_prompt`` semantics.

    Returns ``(prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask)``.

    - A str negative is used for every prompt; a list of length 1 is broadcast; any other
      length that differs from the number of prompts is an error.
    - If every negative is empty or whitespace (None counts as empty), the negative features are
      zeros shaped like the positive ones and the mask is all False; the encoder is not run.
    - ``num_images_per_prompt`` repeats each prompt's rows in place (repeat_interleave).
    - Precomputed ``prompt_embeds`` / ``negative_prompt_embeds`` are passed through unchanged
      (taken as already per image) and need their masks.
    - Positive and negative are NOT padded to a common length here (the pipeline aligns them).
    """
    n = int(num_images_per_prompt)
    if n < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1; got {num_images_per_prompt}")

    prompts = None
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must not be an empty list")

    if prompt_embeds is None:
        if prompts is None:
            raise ValueError("Either `prompt` or `prompt_embeds` must be given")
        prompt_embeds, prompt_mask = encode_text(
            tokenizer, text_encoder, prompts, layers, max_sequence_length, txt_offset, device
        )
        prompt_embeds, prompt_mask = _repeat(prompt_embeds, prompt_mask, n)
        num_negatives, neg_repeat = len(prompts), n
    else:
        if prompt_mask is None:
            raise ValueError("`prompt_mask` must be provided when passing `prompt_embeds`")
        prompt_embeds = list(prompt_embeds)
        if prompts is not None:
            num_negatives, neg_repeat = len(prompts), n
        else:
            # Embeds are already per image: one negative per row, no further repeat.
            num_negatives, neg_repeat = prompt_embeds[0].shape[0], 1

    if negative_prompt_embeds is not None:
        if negative_prompt_mask is None:
            raise ValueError("`negative_prompt_mask` must be provided when passing `negative_prompt_embeds`")
        return prompt_embeds, prompt_mask, list(negative_prompt_embeds), negative_prompt_mask

    if negative_prompt is None or isinstance(negative_prompt, str):
        negatives = [negative_prompt] * num_negatives
    else:
        negatives = list(negative_prompt)
        if len(negatives) == 1:
            negatives = negatives * num_negatives
        if len(negatives) != num_negatives:
            raise ValueError(
                f"negative_prompt must be a string or a list with 1 or {num_negatives} entries "
                f"(one per prompt); got a list of {len(negatives)}"
            )

    if all(_is_blank(neg) for neg in negatives):
        # The unconditional branch of Lens is "no text": zeros with nothing valid.
        negative_prompt_embeds = [torch.zeros_like(f) for f in prompt_embeds]
        negative_prompt_mask = torch.zeros_like(prompt_mask, dtype=torch.bool)
        return prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask

    negatives = ["" if neg is None else neg for neg in negatives]
    negative_prompt_embeds, negative_prompt_mask = encode_text(
        tokenizer, text_encoder, negatives, layers, max_sequence_length, txt_offset, device
    )
    negative_prompt_embeds, negative_prompt_mask = _repeat(negative_prompt_embeds, negative_prompt_mask, neg_repeat)
    return prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _mxfp4_kernels_available() -> bool:
    """Whether transformers can run MXFP4 natively (it needs the `kernels` and `triton` packages)."""
    from transformers.utils import is_kernels_available, is_triton_available

    return bool(is_kernels_available() and is_triton_available("3.4.0"))


def _quant_method(config) -> str | None:
    quant = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method)).lower()


def _mxfp4_config_for(
    device: torch.device | str,
    config,
    *,
    cuda_capability: tuple[int, int] | None = None,
    kernels_available: bool | None = None,
) -> Mxfp4Config | None:
    """The ``quantization_config`` override to load ``config``'s checkpoint with on ``device``.

    None means "load as stored": the checkpoint is not MXFP4, or the device can run MXFP4
    natively (CUDA compute capability >= 9.0 with transformers' MXFP4 kernels importable). Otherwise
    returns ``Mxfp4Config(dequantize=True)`` so the experts are expanded to the load dtype.
    ``cuda_capability`` and ``kernels_available`` override the hardware probes (for tests).
    """
    if _quant_method(config) != "mxfp4":
        return None
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_capability is None:
            cuda_capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)
        if kernels_available is None:
            kernels_available = _mxfp4_kernels_available()
        # Hopper+ is where the MXFP4 kernels pay off; older GPUs are slower than dequantised bf16.
        if tuple(cuda_capability) >= (9, 0) and kernels_available:
            return None
    return Mxfp4Config(dequantize=True)


def _read_config(folder):
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"Text encoder folder has no config.json: {folder}")
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read the text encoder config in {folder}: {exc}") from exc


def load_text_encoder(
    path_or_repo: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    keep_mxfp4: bool = True,
) -> LensGptOssEncoder:
    """Load the GPT-OSS text encoder (local folder or Hub repo id), frozen and in eval mode.

    MXFP4 checkpoints stay MXFP4 only where that is fast (see ``_mxfp4_config_for``) and `keep_mxfp4`
    allows it; elsewhere they are dequantised to ``dtype``. Weights are read from safetensors only.
    """
    folder = resolve_folder(path_or_repo, subfolder, revision)
    config = _read_config(folder)
    if getattr(config, "model_type", None) != "gpt_oss":
        raise ModelLoadError(
            f"{folder} is not a GPT-OSS text encoder (model_type {getattr(config, 'model_type', None)!r}, expected 'gpt_oss')"
        )

    kwargs: dict[str, Any] = {}
    quant = _mxfp4_config_for(device, config)
    if quant is None and not keep_mxfp4 and _quant_method(config) == "mxfp4":
        quant = Mxfp4Config(dequantize=True)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model, info = LensGptOssEncoder.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            device_map=str(torch.device(device)),
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a malformed MXFP4 checkpoint
        raise ModelLoadError(f"Could not load the text encoder weights from {folder}: {exc}") from exc
    # transformers only warns about these and fills the gaps with random weights; a text encoder must be complete.
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        detail = "; ".join(
            f"{len(keys)} {kind.replace('_', ' ')}, first: {', '.join(map(str, keys[:5]))}" for kind, keys in problems.items() if keys
        )
        raise ModelLoadError(f"Text encoder weights in {folder} do not match its config.json: {detail}.")
    model.eval()
    model.requires_grad_(False)  # Lens never trains the text encoder
    return model


def load_tokenizer(
    path_or_repo: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
):
    """Load the Lens tokenizer (local folder or Hub repo id); sets pad = eos if it has no pad token."""
    folder = resolve_folder(path_or_repo, subfolder, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer from {folder}: {exc}") from exc
    _ensure_pad_token(tokenizer)
    return tokenizer
