"""LensTransformer2DModel against the reference's golden outputs, plus its structural promises."""

from __future__ import annotations

import pytest
import torch

from lens_tune import LensTransformer2DModel
from lens_tune.model.transformer import apply_rope, rope_angles

CASES = ["square", "nonsquare_odd", "batch2_padded", "cfg_pair", "empty_text"]
ATOL = 1e-4  # golden README: fp32 re-implementation tolerance


def run_case(model, golden, name, **kwargs):
    case = next(c for c in golden.meta["cases"] if c["name"] == name)
    with torch.no_grad():
        return model(**golden.model_inputs(name, case["img_shapes"]), **kwargs).sample


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_reference(golden_model, golden_transformer, name):
    out = run_case(golden_model, golden_transformer, name)
    torch.testing.assert_close(out, golden_transformer[f"{name}/expected"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_mask_in_all_blocks_option_matches_alternative_vectors(golden_model, golden_transformer, name):
    golden_model.register_to_config(mask_text_in_all_blocks=True)
    out = run_case(golden_model, golden_transformer, name)
    torch.testing.assert_close(out, golden_transformer[f"{name}/expected_alt_mask_all_blocks"], atol=ATOL, rtol=0)


def test_mask_options_differ_where_text_is_padded(golden_model, golden_transformer):
    # batch2_padded differs by 0.222 between the two behaviours in the reference run: the option must matter
    ref = run_case(golden_model, golden_transformer, "batch2_padded")
    golden_model.register_to_config(mask_text_in_all_blocks=True)
    alt = run_case(golden_model, golden_transformer, "batch2_padded")
    assert (ref - alt).abs().max() > 0.1


@pytest.mark.parametrize("name", ["square", "nonsquare_odd"])
def test_rope_angles_match_reference_rotations(golden_transformer, name):
    case = next(c for c in golden_transformer.meta["cases"] if c["name"] == name)
    _, h, w = case["img_shapes"][0]
    img, txt = rope_angles((h, w), case["text_seq_len"], (4, 6, 6), torch.device("cpu"))
    for angles, stream in ((img, "img"), (txt, "txt")):
        torch.testing.assert_close(angles.cos(), golden_transformer[f"{name}/intermediate/rope_{stream}_cos"], atol=1e-5, rtol=0)
        torch.testing.assert_close(angles.sin(), golden_transformer[f"{name}/intermediate/rope_{stream}_sin"], atol=1e-5, rtol=0)


def test_full_official_config_has_official_size_and_names():
    with torch.device("meta"):
        model = LensTransformer2DModel()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 4_104_225_152
    assert len(state) == 1264
    expected_shapes = {
        "transformer_blocks.0.attn.img_qkv.weight": [4608, 1536],
        "transformer_blocks.47.attn.txt_qkv.bias": [4608],
        "transformer_blocks.0.attn.norm_added_k.weight": [64],
        "transformer_blocks.0.attn.to_out.0.weight": [1536, 1536],
        "transformer_blocks.0.attn.to_add_out.weight": [1536, 1536],
        "transformer_blocks.0.img_mod.1.weight": [9216, 1536],
        "transformer_blocks.0.txt_mod.1.bias": [9216],
        "transformer_blocks.0.img_norm1.weight": [1536],
        "transformer_blocks.0.img_mlp.w1.weight": [4096, 1536],
        "transformer_blocks.0.txt_mlp.w2.weight": [1536, 4096],
        "time_text_embed.timestep_embedder.linear_1.weight": [1536, 256],
        "txt_norm.3.weight": [2880],
        "txt_in.weight": [1536, 11520],
        "img_in.weight": [1536, 128],
        "norm_out.linear.weight": [3072, 1536],
        "proj_out.weight": [128, 1536],
    }
    assert {k: list(state[k].shape) for k in expected_shapes} == expected_shapes
    assert not any(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight")) or "pos_embed" in k for k in state)


def test_bf16_cast_keeps_rope_and_tracks_fp32(golden_model, golden_transformer):
    reference = golden_transformer["square/expected"]
    model = golden_model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    case = golden_transformer
    with torch.no_grad():
        out = model(
            case["square/hidden_states"].bfloat16(),
            encoder_hidden_states=[t.bfloat16() for t in case.layers("square/encoder_hidden_states")],
            encoder_hidden_states_mask=case["square/encoder_hidden_states_mask"],
            timestep=case["square/timestep"].bfloat16(),
            img_shapes=[(1, 4, 4)],
        ).sample
    assert out.dtype == torch.bfloat16
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05, rel  # bf16 rounding of weights and activations through 2 blocks
    # Nothing dtype-castable holds position information: angles are made per call, in float32.
    assert not list(model.buffers())
    img_angles, _ = rope_angles((4, 4), 0, (4, 6, 6), torch.device("cpu"))
    assert img_angles.dtype == torch.float32
    x = torch.randn(1, 16, 2, 16)
    torch.testing.assert_close(apply_rope(x.bfloat16(), img_angles).float(), apply_rope(x, img_angles), atol=0.05, rtol=0.01)


def test_all_true_mask_equals_no_mask(golden_model, golden_transformer):
    name = "square"  # every text token valid
    with_mask = run_case(golden_model, golden_transformer, name)
    case = golden_transformer
    with torch.no_grad():
        without = golden_model(
            case[f"{name}/hidden_states"], case.layers(f"{name}/encoder_hidden_states"), None, case[f"{name}/timestep"], [(1, 4, 4)]
        ).sample
    torch.testing.assert_close(with_mask, without, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_identical_gradients(golden_model, golden_transformer):
    case = golden_transformer

    def grads():
        golden_model.zero_grad()
        out = golden_model(
            case["batch2_padded/hidden_states"],
            case.layers("batch2_padded/encoder_hidden_states"),
            case["batch2_padded/encoder_hidden_states_mask"],
            case["batch2_padded/timestep"],
            [(1, 4, 2)],
        ).sample
        out.square().mean().backward()
        # the last block's text MLP feeds nothing (the text stream's output is discarded): no gradient
        return {n: p.grad.clone() for n, p in golden_model.named_parameters() if p.grad is not None}

    plain = grads()
    golden_model.enable_gradient_checkpointing()
    assert golden_model.gradient_checkpointing
    checkpointed = grads()
    assert checkpointed.keys() == plain.keys() and len(plain) > 40
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_bad_inputs_are_explained(golden_model, golden_transformer):
    case = golden_transformer
    args = (case["square/hidden_states"], case.layers("square/encoder_hidden_states"), None, case["square/timestep"])
    with pytest.raises(ValueError, match="does not describe 16 image tokens"):
        golden_model(*args, img_shapes=[(1, 4, 3)])
    with pytest.raises(ValueError, match="list of 3 text-feature tensors"):
        golden_model(args[0], args[1][:2], None, args[3], [(1, 4, 4)])
    with pytest.raises(ValueError, match="img_shapes"):
        golden_model(*args)


def test_lora_scales_match_reference(golden_model, golden_lora):
    from tests.conftest import GOLDEN

    golden_model.load_lora_adapter(str(GOLDEN / "lora"), weight_name="adapter_model.safetensors", prefix=None)
    inputs = golden_lora.model_inputs("inputs", golden_lora.meta["img_shapes"])
    with torch.no_grad():
        for scale in (1.0, 0.5):
            out = golden_model(**inputs, attention_kwargs={"scale": scale}).sample
            torch.testing.assert_close(out, golden_lora[f"scale_{scale}/expected"], atol=ATOL, rtol=0)
        golden_model.disable_lora()
        torch.testing.assert_close(golden_model(**inputs).sample, golden_lora["expected_no_lora"], atol=ATOL, rtol=0)


def test_inconsistent_config_is_refused():
    with pytest.raises(ValueError, match="inner_dim"):
        LensTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, inner_dim=48, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        LensTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, inner_dim=32, axes_dims_rope=(4, 6, 8))
