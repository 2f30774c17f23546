"""load_text_encoder on a tiny checkpoint stored in the real GPT-OSS MXFP4 on-disk format.

The real Lens text encoder (GPT-OSS-20B) ships its MoE expert weights as MXFP4: for each expert
projection two uint8 tensors, ``*_blocks`` (two FP4 E2M1 codes per byte) and ``*_scales`` (one E8M0
exponent per group of 32 values), next to bf16 tensors for everything else. On a CPU,
``load_text_encoder`` asks transformers to dequantise them (``Mxfp4Config(dequantize=True)``).

On-disk layout, for hidden size H, intermediate size I and E experts (groups of 32 along the
input dimension of each projection):

    model.layers.{i}.mlp.experts.gate_up_proj_blocks  uint8 [E, 2*I, H/32, 16]
    model.layers.{i}.mlp.experts.gate_up_proj_scales  uint8 [E, 2*I, H/32]
    model.layers.{i}.mlp.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
    model.layers.{i}.mlp.experts.down_proj_scales     uint8 [E, H, I/32]

i.e. rows are the output features and the packed axis is the input features. Within a group of
32 values, byte b holds value 2*b in its low nibble and value 2*b+1 in its high nibble. A value is
``FP4[code] * 2**(scale - 127)``. The dense ``GptOssExperts`` parameters are the transposes:
``gate_up_proj`` [E, H, 2*I] and ``down_proj`` [E, I, H].

The decoder below is written from that description only; transformers' own dequantiser is used in
a separate cross-check.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Mxfp4Config

from lens_tune.model.text_encoder import LensGptOssEncoder, _mxfp4_config_for, load_text_encoder

HIDDEN = 64
INTER = 64
EXPERTS = 4
LAYERS = 2
VOCAB = 128
GROUP = 32  # MXFP4 values per scale
SEED = 1234

# FP4 E2M1: sign bit (3), 2 exponent bits, 1 mantissa bit. Codes 0..7 positive, 8..15 negative.
FP4_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]

CONFIG = {
    "architectures": ["LensGptOssEncoder"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 5,
    "pad_token_id": 6,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTER,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": 2,
    "num_local_experts": EXPERTS,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
        "rope_theta": 150000.0,
    },
    "router_aux_loss_coef": 0.9,
    "sliding_window": 16,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": VOCAB,
    # As in openai/gpt-oss-20b: Mxfp4Config reads `quant_method` and `modules_to_not_convert`.
    "quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    },
}

EXPERT_PROJ = ("gate_up_proj", "down_proj")


def _dense_shape(proj: str) -> tuple[int, int, int]:
    """GptOssExperts parameter shape: [E, in_features, out_features]."""
    return (EXPERTS, HIDDEN, 2 * INTER) if proj == "gate_up_proj" else (EXPERTS, INTER, HIDDEN)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Independent MXFP4 decoder: blocks [E, out, in/32, 16] + scales [E, out, in/32] -> dense [E, in, out] fp32.

    Element (e, k, n) of the dense weight (input k, output n) is code number k % 32 of group k // 32
    in row n: byte (k % 32) // 2 of that group, low nibble when k is even, high nibble when odd.
    """
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
    e, out_features, groups, half = blocks.shape
    assert half == GROUP // 2 and scales.shape == (e, out_features, groups)
    in_features = groups * GROUP
    k = torch.arange(in_features)
    group, byte, high = k // GROUP, (k % GROUP) // 2, (k % 2).bool()
    packed = blocks[:, :, group, byte].to(torch.int64)  # [E, out, in]: the byte holding element k
    codes = torch.where(high, packed >> 4, packed & 0xF)
    values = torch.tensor(FP4_E2M1, dtype=torch.float64)[codes]
    exponent = scales[:, :, group].to(torch.float64) - 127.0  # [E, out, in]
    dense = values * torch.pow(2.0, exponent)  # exact in float64 (and fp32/bf16: 2 significant bits)
    return dense.transpose(1, 2).contiguous().to(torch.float32)  # [E, in, out]


def _random_non_expert_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every parameter of a plain tiny GPT-OSS except the expert matrices, random, in bf16."""
    cfg = {k: v for k, v in CONFIG.items() if k != "quantization_config"}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LensGptOssEncoder(_config(cfg)).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            continue
        t = torch.randn(shape, generator=gen)
        if "norm" in name:
            t = 1.0 + 0.1 * t
        elif name.endswith("bias") or name.endswith("sinks"):
            t = 0.1 * t
        else:
            t = 0.2 * t
        state[name] = t.to(torch.bfloat16)
    return state


def _config(cfg: dict):
    from transformers import GptOssConfig

    return GptOssConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """A tiny text-encoder folder in the real MXFP4 layout, plus the tensors it was built from."""
    folder = tmp_path_factory.mktemp("lens-text-encoder-mxfp4")
    gen = torch.Generator().manual_seed(SEED)
    tensors = _random_non_expert_state(gen)
    dense = {}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.mlp.experts"
        for proj in EXPERT_PROJ:
            _, in_features, out_features = _dense_shape(proj)
            blocks = torch.randint(0, 256, (EXPERTS, out_features, in_features // GROUP, GROUP // 2),
                                   generator=gen, dtype=torch.uint8)
            scales = torch.randint(120, 131, (EXPERTS, out_features, in_features // GROUP),
                                   generator=gen, dtype=torch.uint8)
            tensors[f"{prefix}.{proj}_blocks"] = blocks
            tensors[f"{prefix}.{proj}_scales"] = scales
            dense[f"{prefix}.{proj}"] = decode_mxfp4(blocks, scales)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**CONFIG, "dtype": "bfloat16"}, indent=2))
    return folder, tensors, dense


@pytest.fixture(scope="module")
def loaded_fp32(mxfp4_folder):
    """The fp32 load, recording the quantization_config that load_text_encoder hands to from_pretrained."""
    folder, _, _ = mxfp4_folder
    seen = []
    original = LensGptOssEncoder.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("quantization_config"))
        return original(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LensGptOssEncoder, "from_pretrained", classmethod(spy))
        model = load_text_encoder(folder, dtype=torch.float32, device="cpu")
    # transformers would also fall back to dequantising on a CPU by itself; check that it was asked to.
    assert len(seen) == 1 and isinstance(seen[0], Mxfp4Config) and seen[0].dequantize is True
    return model


def _expert_params(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def test_fixture_is_in_the_real_layout(mxfp4_folder):
    folder, tensors, _ = mxfp4_folder
    config = json.loads((folder / "config.json").read_text())
    assert _mxfp4_config_for("cpu", config).dequantize is True  # the path under test
    names = set(tensors)
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    b = tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    s = tensors["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert (b.dtype, tuple(b.shape)) == (torch.uint8, (EXPERTS, 2 * INTER, HIDDEN // 32, 16))
    assert (s.dtype, tuple(s.shape)) == (torch.uint8, (EXPERTS, 2 * INTER, HIDDEN // 32))
    b = tensors["model.layers.1.mlp.experts.down_proj_blocks"]
    s = tensors["model.layers.1.mlp.experts.down_proj_scales"]
    assert (b.dtype, tuple(b.shape)) == (torch.uint8, (EXPERTS, HIDDEN, INTER // 32, 16))
    assert (s.dtype, tuple(s.shape)) == (torch.uint8, (EXPERTS, HIDDEN, INTER // 32))
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16


def test_decoder_by_hand():
    """The decoder's nibble order, scale and transpose on hand-made bytes."""
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0] = 0x72  # low nibble 2 (+1.0) is element 0, high nibble 7 (+6.0) element 1
    blocks[0, 0, 0, 15] = 0x9F  # low nibble 15 (-6.0) is element 30, high nibble 9 (-0.5) element 31
    scales = torch.tensor([[[129]]], dtype=torch.uint8)  # x 2**2
    dense = decode_mxfp4(blocks, scales)
    assert dense.shape == (1, 32, 1)
    expected = torch.zeros(32)
    expected[0], expected[1], expected[30], expected[31] = 4.0, 24.0, -24.0, -2.0
    assert torch.equal(dense[0, :, 0], expected)


def test_decoder_matches_transformers(mxfp4_folder):
    """Cross-check: transformers' own dequantiser agrees bit for bit with the independent decoder."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, tensors, dense = mxfp4_folder
    for name, expected in dense.items():
        ours = convert_moe_packed_tensors(tensors[f"{name}_blocks"], tensors[f"{name}_scales"], dtype=torch.float32)
        assert ours.shape == expected.shape
        assert torch.equal(ours, expected), name


def test_loads_dequantised_fp32(mxfp4_folder, loaded_fp32):
    _, tensors, dense = mxfp4_folder
    model = loaded_fp32
    assert type(model) is LensGptOssEncoder
    # Dequantised for good: plain GptOssExperts, and the model no longer claims to be MXFP4.
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    assert all(type(layer.mlp.experts) is GptOssExperts for layer in model.model.layers)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    # Experts: fp32 holds every MXFP4 value exactly (2 significant bits, exponent -8..+5), so exact.
    experts = _expert_params(model)
    assert set(experts) == set(dense)
    for name, expected in dense.items():
        assert experts[name].dtype == torch.float32 and experts[name].shape == expected.shape
        assert torch.equal(experts[name], expected), name
    # Everything else: the saved bf16 tensors, widened to fp32 (exact).
    expected_names = {n for n in tensors if not n.endswith(("_blocks", "_scales"))}
    assert set(state) == expected_names | set(dense)
    for name in expected_names:
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], tensors[name].float()), name


def test_encode_layers_matches_dense_model(mxfp4_folder, loaded_fp32):
    _, tensors, dense = mxfp4_folder
    cfg = {k: v for k, v in CONFIG.items() if k != "quantization_config"}
    plain = LensGptOssEncoder(_config(cfg)).eval()
    plain.config._attn_implementation = loaded_fp32.config._attn_implementation
    state = {n: t.float() for n, t in tensors.items() if not n.endswith(("_blocks", "_scales"))}
    state.update(dense)
    plain.load_state_dict(state, strict=True)

    gen = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=gen)  # longer than the sliding window
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0  # right padding on the second row
    with torch.no_grad():
        got = loaded_fp32.encode_layers(input_ids, attention_mask, [0, 1])
        want = plain.encode_layers(input_ids, attention_mask, [0, 1])
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g.shape == (2, 24, HIDDEN) and g.dtype == torch.float32
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    # The experts actually matter: zeroing them changes the features.
    for p in _expert_params(plain).values():
        p.data.zero_()
    with torch.no_grad():
        zeroed = plain.encode_layers(input_ids, attention_mask, [1])[0]
    assert not torch.allclose(zeroed, got[1], atol=1e-3)


def test_loads_dequantised_bf16(mxfp4_folder):
    folder, tensors, dense = mxfp4_folder
    model = load_text_encoder(folder, dtype=torch.bfloat16, device="cpu")
    experts = _expert_params(model)
    assert set(experts) == set(dense)
    for name, expected in dense.items():
        assert experts[name].dtype == torch.bfloat16, name
        # bf16 also holds every MXFP4 value exactly (2 significant bits, exponent -8..+5).
        assert torch.equal(experts[name].float(), expected), name
    state = model.state_dict()
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(state["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        out = model.encode_layers(ids, None, [1])[0]
    assert out.shape == (1, 10, HIDDEN) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_malformed_mxfp4_checkpoint_is_a_clear_error(mxfp4_folder, tmp_path):
    import shutil

    from lens_tune.errors import ModelLoadError

    folder, tensors, _ = mxfp4_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    key = "model.layers.0.mlp.experts.down_proj_blocks"
    damaged = dict(tensors, **{key: tensors[key][:, :, :1].contiguous()})  # blocks cut short
    save_file(damaged, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="Could not load the text encoder weights"):
        load_text_encoder(broken, dtype=torch.float32, device="cpu")
