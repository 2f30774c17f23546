"""Lens text conditioning against the reference goldens in tests/golden/lens-tiny/pipeline."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer, Mxfp4Config

from lens_tune.errors import ModelLoadError
from lens_tune.model.text_encoder import (
    DEFAULT_TXT_OFFSET,
    LENS_ASSISTANT_THINKING,
    LENS_SYSTEM_PROMPT,
    LensGptOssEncoder,
    _mxfp4_config_for,
    chat_prefix_length,
    encode_prompt_pair,
    encode_text,
    load_text_encoder,
    load_tokenizer,
    render_lens_chat,
    tokenize_prompts,
)

PIPE = Path(__file__).parent / "golden" / "lens-tiny" / "pipeline"
EXPECTED = json.loads((PIPE / "expected.json").read_text())
CASES = EXPECTED["encode_prompt"]
CASE_IDS = [c["name"] for c in CASES]
ATOL = 1e-3  # golden README: text features atol 1e-3 for an fp32 re-implementation


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(PIPE / "expected.safetensors"))


@pytest.fixture(scope="module")
def layers():
    return json.loads((PIPE / "transformer" / "config.json").read_text())["selected_layer_index"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(PIPE / "tokenizer"))


@pytest.fixture(scope="module")
def encoder():
    model = LensGptOssEncoder.from_pretrained(str(PIPE / "text_encoder"), dtype=torch.float32)
    return model.eval()


def _get(tensors, case, key):
    return tensors[f"encode/{case['name']}/{key}"]


def _as_list(p):
    return [p] if isinstance(p, str) else list(p)


class _CallCounter:
    """Counts encode_layers calls on one encoder instance (restored by monkeypatch)."""

    def __init__(self, monkeypatch, encoder):
        self.calls = 0
        original = encoder.encode_layers

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(encoder, "encode_layers", counting)


# ------------------------------------------------------------------------------------------
# Golden parity
# ------------------------------------------------------------------------------------------


def test_constants():
    assert DEFAULT_TXT_OFFSET == 97 == EXPECTED["txt_offset"] == EXPECTED["chat_prefix_tokens"]
    assert LENS_SYSTEM_PROMPT in CASES[0]["rendered_text"][0]
    assert LENS_ASSISTANT_THINKING in CASES[0]["rendered_text"][0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rendered_text_matches_golden(tokenizer, case):
    assert [render_lens_chat(tokenizer, p) for p in _as_list(case["prompt"])] == case["rendered_text"]
    if "negative_rendered_text" in case:
        negs = _as_list(case["negative_prompt"])
        assert [render_lens_chat(tokenizer, p) for p in negs] == case["negative_rendered_text"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tokenization_matches_golden(tokenizer, tensors, case):
    msl = case["max_sequence_length"]
    ids, mask = tokenize_prompts(tokenizer, _as_list(case["prompt"]), msl)
    assert torch.equal(ids, _get(tensors, case, "input_ids"))
    assert torch.equal(mask, _get(tensors, case, "attention_mask"))
    assert ids.shape[1] == case["input_ids_len"]
    assert mask.sum(1).tolist() == case["valid_tokens"]
    if not case["negative_is_zeros"]:
        nids, nmask = tokenize_prompts(tokenizer, _as_list(case["negative_prompt"]), msl)
        assert torch.equal(nids, _get(tensors, case, "negative_input_ids"))
        assert torch.equal(nmask, _get(tensors, case, "negative_attention_mask"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_layers_matches_golden(encoder, tensors, layers, case):
    ids = _get(tensors, case, "input_ids")
    mask = _get(tensors, case, "attention_mask")
    outs = encoder.encode_layers(ids, mask, layers)
    assert len(outs) == len(layers)
    valid = mask.bool()
    for i, out in enumerate(outs):
        expected = _get(tensors, case, f"text_encoder_layer_out.{i}")
        assert out.shape == expected.shape
        torch.testing.assert_close(out[valid], expected[valid], atol=ATOL, rtol=0)
        # Padded positions also hold reference GPT-OSS outputs (the DiT sees them in blocks 1..N-1).
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_encode_prompt_pair_matches_golden(tokenizer, encoder, tensors, layers, case):
    pe, pm, ne, nm = encode_prompt_pair(
        tokenizer,
        encoder,
        case["prompt"],
        case["negative_prompt"],
        layers=layers,
        num_images_per_prompt=case["num_images_per_prompt"],
        max_sequence_length=case["max_sequence_length"],
    )
    for name, feats, mask in (("prompt", pe, pm), ("negative_prompt", ne, nm)):
        exp_mask = _get(tensors, case, f"{name}_mask")
        assert mask.dtype == torch.bool
        assert torch.equal(mask, exp_mask)
        assert len(feats) == len(layers)
        for i, f in enumerate(feats):
            expected = _get(tensors, case, f"{name}_embeds.{i}")
            assert f.shape == expected.shape
            torch.testing.assert_close(f[exp_mask], expected[exp_mask], atol=ATOL, rtol=0)
    assert pe[0].shape[1] == case["prompt_embeds_len"]
    assert ne[0].shape[1] == case["negative_prompt_embeds_len"]
    if case["negative_is_zeros"]:
        assert all(torch.count_nonzero(f) == 0 for f in ne) and not nm.any()


def test_chat_prefix_length_golden(tokenizer):
    assert chat_prefix_length(tokenizer) == 97


# ------------------------------------------------------------------------------------------
# Encoder API
# ------------------------------------------------------------------------------------------


def test_transformers_registration():
    assert importlib.import_module("transformers").LensGptOssEncoder is LensGptOssEncoder


def test_forward_after_set_selected_layers(tokenizer, encoder, layers):
    ids, mask = tokenize_prompts(tokenizer, ["a cat on the mat", "hello world"])
    encoder.set_selected_layers(layers)
    try:
        outs = encoder(ids, attention_mask=mask)
        assert isinstance(outs, list)
        for a, b in zip(outs, encoder.encode_layers(ids, mask, layers)):
            assert torch.equal(a, b)
        # Other calls keep the causal-LM behaviour.
        lm = encoder(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=False)
        assert lm.logits.shape == (2, 8, encoder.config.vocab_size)
    finally:
        del encoder._lens_selected_layers
    assert encoder.selected_layers is None


def test_layer_order_and_early_exit(tokenizer, encoder):
    ids, mask = tokenize_prompts(tokenizer, ["a cat"])
    ran = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(encoder.model.layers)
    ]
    try:
        a, b = encoder.encode_layers(ids, mask, [1, 0])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]  # layers 2 and 3 never run
    c, d = encoder.encode_layers(ids, mask, [0, 1])
    assert torch.equal(a, d) and torch.equal(b, c)


@pytest.mark.parametrize("bad", [[], [0, 0], [4], [-1]])
def test_encode_layers_rejects_bad_layers(encoder, bad):
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="layers"):
        encoder.encode_layers(ids, torch.ones_like(ids), bad)
    with pytest.raises(ValueError, match="layers"):
        encoder.set_selected_layers(bad)


def test_pad_defaults_to_eos():
    tok = AutoTokenizer.from_pretrained(str(PIPE / "tokenizer"))
    tok.pad_token = None
    ids, mask = tokenize_prompts(tok, ["a", "a painting of a squirrel"])
    assert tok.pad_token_id == tok.eos_token_id
    assert ids[0][mask[0] == 0].eq(tok.eos_token_id).all()
    assert mask[0, -1] == 0  # right padding


# ------------------------------------------------------------------------------------------
# encode_text / encode_prompt_pair semantics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative", ["", "   \n", ["", " "], None])
def test_empty_negative_is_zeros_and_skips_encoder(monkeypatch, tokenizer, encoder, layers, negative):
    counter = _CallCounter(monkeypatch, encoder)
    pe, pm, ne, nm = encode_prompt_pair(tokenizer, encoder, ["a cat", "a red bird"], negative, layers=layers)
    assert counter.calls == 1  # the positive only
    assert [f.shape for f in ne] == [f.shape for f in pe]
    assert all(torch.count_nonzero(f) == 0 for f in ne)
    assert nm.shape == pm.shape and nm.dtype == torch.bool and not nm.any()


def test_nonempty_negative_is_encoded_like_positive(monkeypatch, tokenizer, encoder, layers):
    counter = _CallCounter(monkeypatch, encoder)
    _, _, ne, nm = encode_prompt_pair(tokenizer, encoder, ["a cat", "a dog"], ["", "blurry image"], layers=layers)
    assert counter.calls == 2
    ref, ref_mask = encode_text(tokenizer, encoder, ["", "blurry image"], layers)
    assert torch.equal(nm, ref_mask)
    for a, b in zip(ne, ref):
        assert torch.equal(a, b)


def test_negative_lengths_are_not_aligned(tokenizer, encoder, layers):
    pe, pm, ne, nm = encode_prompt_pair(
        tokenizer, encoder, "a painting of a squirrel eating a burger on a wooden table", "blurry", layers=layers
    )
    assert pe[0].shape[1] > ne[0].shape[1]  # the pipeline pads them to a common length later
    assert pm.shape[1] == pe[0].shape[1] and nm.shape[1] == ne[0].shape[1]


def test_num_images_per_prompt_uses_repeat_interleave(tokenizer, encoder, layers):
    prompts = ["a cat on the mat", "hello world"]
    pe1, pm1, ne1, nm1 = encode_prompt_pair(tokenizer, encoder, prompts, "blurry image", layers=layers)
    pe2, pm2, ne2, nm2 = encode_prompt_pair(
        tokenizer, encoder, prompts, "blurry image", layers=layers, num_images_per_prompt=2
    )
    assert torch.equal(pm2, pm1.repeat_interleave(2, dim=0))
    assert torch.equal(nm2, nm1.repeat_interleave(2, dim=0))
    for a, b in zip(pe2, pe1):
        assert a.shape[0] == 4
        torch.testing.assert_close(a, b.repeat_interleave(2, dim=0), atol=1e-5, rtol=0)
    for a, b in zip(ne2, ne1):
        torch.testing.assert_close(a, b.repeat_interleave(2, dim=0), atol=1e-5, rtol=0)
    # Rows 0,1 are prompt 0 and rows 2,3 prompt 1 (not 0,1,0,1).
    assert not torch.equal(pm2[1], pm2[2])
    _, _, ne0, nm0 = encode_prompt_pair(tokenizer, encoder, prompts, "", layers=layers, num_images_per_prompt=2)
    assert ne0[0].shape == pe2[0].shape and nm0.shape == pm2.shape and not nm0.any()


def test_negative_list_length(tokenizer, encoder, layers):
    with pytest.raises(ValueError, match="negative_prompt"):
        encode_prompt_pair(tokenizer, encoder, ["a", "b", "c"], ["x", "y"], layers=layers)
    # A list of one is broadcast.
    _, _, ne, nm = encode_prompt_pair(tokenizer, encoder, ["a cat", "a dog"], ["blurry image"], layers=layers)
    assert ne[0].shape[0] == 2 and torch.equal(nm[0], nm[1])
    torch.testing.assert_close(ne[0][0], ne[0][1], atol=1e-5, rtol=0)  # batched BLAS is not bit-exact per row


def test_precomputed_embeds_pass_through(monkeypatch, tokenizer, encoder, layers):
    feats = [torch.randn(2, 5, 32) for _ in layers]
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    counter = _CallCounter(monkeypatch, encoder)
    pe, pm, ne, nm = encode_prompt_pair(tokenizer, encoder, None, "", prompt_embeds=feats, prompt_mask=mask)
    assert counter.calls == 0
    assert all(a is b for a, b in zip(pe, feats)) and pm is mask
    assert [f.shape for f in ne] == [f.shape for f in feats] and not nm.any()

    neg = [torch.randn(2, 4, 32) for _ in layers]
    neg_mask = torch.ones(2, 4, dtype=torch.bool)
    _, _, ne, nm = encode_prompt_pair(
        tokenizer, encoder, None, "ignored", prompt_embeds=feats, prompt_mask=mask,
        negative_prompt_embeds=neg, negative_prompt_mask=neg_mask,
    )
    assert counter.calls == 0
    assert all(a is b for a, b in zip(ne, neg)) and nm is neg_mask

    with pytest.raises(ValueError, match="prompt_mask"):
        encode_prompt_pair(tokenizer, encoder, None, prompt_embeds=feats)
    with pytest.raises(ValueError, match="negative_prompt_mask"):
        encode_prompt_pair(tokenizer, encoder, None, prompt_embeds=feats, prompt_mask=mask, negative_prompt_embeds=neg)
    with pytest.raises(ValueError, match="prompt"):
        encode_prompt_pair(tokenizer, encoder, None, layers=layers)


def test_short_sequence_gives_empty_features(monkeypatch, tokenizer, encoder, layers):
    counter = _CallCounter(monkeypatch, encoder)
    feats, mask = encode_text(tokenizer, encoder, ["a cat", "a dog"], layers, txt_offset=1000)
    assert counter.calls == 0
    assert [tuple(f.shape) for f in feats] == [(2, 0, 32)] * len(layers)
    assert all(f.dtype == torch.float32 for f in feats)
    assert mask.shape == (2, 0) and mask.dtype == torch.bool
    # Same through encode_prompt_pair, with an empty negative mirroring the positive.
    pe, pm, ne, nm = encode_prompt_pair(tokenizer, encoder, "a cat", "", layers=layers, txt_offset=1000)
    assert pe[0].shape == ne[0].shape == (1, 0, 32) and pm.shape == nm.shape == (1, 0)


def test_encode_text_uses_selected_layers_when_none_given(tokenizer, encoder, layers):
    encoder.__dict__.pop("_lens_selected_layers", None)
    with pytest.raises(ValueError, match="layers"):
        encode_text(tokenizer, encoder, ["a cat"], None)
    encoder.set_selected_layers(layers)
    try:
        a, _ = encode_text(tokenizer, encoder, ["a cat"], None)
    finally:
        del encoder._lens_selected_layers
    b, _ = encode_text(tokenizer, encoder, ["a cat"], layers)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

MXFP4_CONFIG = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}


@pytest.mark.parametrize(
    "device,capability,kernels",
    [("cpu", None, True), ("cuda", (8, 6), True), ("cuda:0", (8, 0), False), ("cuda", (9, 0), False)],
)
def test_mxfp4_dequantizes_where_unsupported(device, capability, kernels):
    q = _mxfp4_config_for(device, MXFP4_CONFIG, cuda_capability=capability, kernels_available=kernels)
    assert isinstance(q, Mxfp4Config) and q.dequantize is True


def test_mxfp4_reads_real_config_objects():
    config = transformers.GptOssConfig(quantization_config={"quant_method": "mxfp4"})
    assert _mxfp4_config_for("cpu", config).dequantize is True
    config.quantization_config = Mxfp4Config()
    assert _mxfp4_config_for("cuda", config, cuda_capability=(7, 5), kernels_available=True).dequantize is True
    assert _mxfp4_config_for("cuda", config, cuda_capability=(9, 0), kernels_available=True) is None


def test_mxfp4_kept_on_hopper_with_kernels():
    assert _mxfp4_config_for("cuda", MXFP4_CONFIG, cuda_capability=(9, 0), kernels_available=True) is None
    assert _mxfp4_config_for(torch.device("cuda", 1), MXFP4_CONFIG, cuda_capability=(10, 0), kernels_available=True) is None


def test_mxfp4_not_applied_to_unquantized(encoder):
    assert _mxfp4_config_for("cpu", encoder.config) is None
    assert _mxfp4_config_for("cpu", {"model_type": "gpt_oss"}) is None


def test_load_text_encoder_from_folder(layers):
    model = load_text_encoder(PIPE / "text_encoder", dtype=torch.float32)
    assert isinstance(model, LensGptOssEncoder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    model2 = load_text_encoder(PIPE, subfolder="text_encoder", dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)


def test_load_tokenizer_from_folder():
    tok = load_tokenizer(PIPE, subfolder="tokenizer")
    assert chat_prefix_length(tok) == 97


def test_load_errors(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        load_text_encoder(missing)
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_text_encoder(tmp_path, subfolder="text_encoder")
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        load_tokenizer(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_text_encoder(empty)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="gpt_oss"):
        load_text_encoder(other)


def test_streamed_layers_give_the_same_features_copying_each_layer_once(monkeypatch, encoder, tensors, layers):
    """stream_layers_to + encode_each: each input's features equal, bit for bit, encode_layers on the model in place;
    each decoder layer's weights are copied once for all inputs, and at most two layers' copies are alive."""
    import weakref

    from lens_tune.model import text_encoder as module

    inputs = [(_get(tensors, c, "input_ids"), _get(tensors, c, "attention_mask")) for c in CASES[:3]]
    expected = [encoder.encode_layers(ids, mask, layers) for ids, mask in inputs]
    alive, most = [], []
    copy = module._LayerStream._copy

    def watched(self, i):
        copies, done = copy(self, i)
        alive.append(weakref.ref(next(iter(copies.values()))))
        most.append(sum(ref() is not None for ref in alive))
        return copies, done

    monkeypatch.setattr(module._LayerStream, "_copy", watched)
    encoder.stream_layers_to("cpu")
    try:
        streamed = encoder.encode_each(inputs, layers)
    finally:
        encoder.stream_layers_to(None)
    for got, want in zip(streamed, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(most) == max(layers) + 1 >= 3  # every layer up to the deepest selected one, copied once
    assert max(most) == 2


def test_encode_text_each_is_encode_text_per_prompt(tokenizer, encoder, layers):
    """What caching stores (each caption alone, layer by layer over a list) is what the pipeline computes."""
    from lens_tune.model.text_encoder import encode_text_each

    prompts = ["a cat", "a photo of a red robot on a table, studio light", "x"]
    offset = chat_prefix_length(tokenizer)
    for prompt, (features, mask) in zip(prompts, encode_text_each(tokenizer, encoder, prompts, layers, 512, offset)):
        want_features, want_mask = encode_text(tokenizer, encoder, [prompt], layers, 512, offset)
        assert torch.equal(mask, want_mask) and all(torch.equal(a, b) for a, b in zip(features, want_features))
