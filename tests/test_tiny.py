"""The tiny random Lens (lens_tune.model.tiny): structure, determinism, tokenizer, saving and a forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lens_tune.model import tiny
from lens_tune.model.pipeline import LENS_MODEL_INDEX
from lens_tune.model.text_encoder import LensGptOssEncoder, chat_prefix_length, render_lens_chat
from lens_tune.model.transformer import LensTransformer2DModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FINAL_HEADER = "<|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def components():
    return tiny.build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: dtype of {key}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, c, 2h, 2w] -> [B, 4c, h, w] with channel c*4 + 2*dy + dx (the Lens packing)."""
    b, c, hh, ww = z.shape
    z = z.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, hh // 2, ww // 2)


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
def test_configs_satisfy_architecture_constraints():
    tr, te, vae = tiny.TINY_TRANSFORMER_CONFIG, tiny.TINY_TEXT_ENCODER_CONFIG, tiny.TINY_VAE_CONFIG
    head_dim, heads = tr["attention_head_dim"], tr["num_attention_heads"]
    # RoPE axes: even and summing to the head dim
    assert sum(tr["axes_dims_rope"]) == head_dim
    assert all(d % 2 == 0 for d in tr["axes_dims_rope"]) and len(tr["axes_dims_rope"]) == 3
    assert tr["inner_dim"] == heads * head_dim
    # packing: in = patch^2 x out; VAE latent channels x 2x2 patch = in
    assert tr["in_channels"] == tr["patch_size"] ** 2 * tr["out_channels"]
    assert vae["latent_channels"] * math.prod(vae["patch_size"]) == tr["in_channels"]
    assert vae["latent_channels"] == tr["out_channels"]
    # text features: width and layer selection (including the last layer, as the real model does)
    assert tr["enc_hidden_dim"] == te["hidden_size"]
    assert tr["multi_layer_encoder_feature"] is True
    layers = tr["selected_layer_index"]
    assert all(0 <= i < te["num_hidden_layers"] for i in layers) and len(set(layers)) == len(layers)
    assert te["num_hidden_layers"] - 1 in layers
    # VAE: 8x downsampling, x2 patch = the pipeline's hard-coded vae_scale_factor 16; group norm divides channels
    assert 2 ** (len(vae["block_out_channels"]) - 1) * vae["patch_size"][0] == 16
    assert len(vae["down_block_types"]) == len(vae["up_block_types"]) == len(vae["block_out_channels"]) == 4
    assert all(c % vae["norm_num_groups"] == 0 for c in vae["block_out_channels"])
    assert vae["mid_block_add_attention"] and vae["use_quant_conv"] and vae["use_post_quant_conv"]
    # GPT-OSS structure
    assert te["layer_types"] == ["sliding_attention", "full_attention"] * (te["num_hidden_layers"] // 2)
    assert te["num_attention_heads"] % te["num_key_value_heads"] == 0
    assert te["num_experts_per_tok"] < te["num_local_experts"]
    assert te["rope_parameters"]["rope_type"] == "yarn"
    assert te["architectures"] == ["LensGptOssEncoder"]
    assert te["vocab_size"] == tiny.TINY_VOCAB_SIZE
    assert (te["pad_token_id"], te["eos_token_id"]) == (tiny.TINY_PAD_TOKEN_ID, tiny.TINY_EOS_TOKEN_ID)
    # scheduler: the real Lens values
    sc = tiny.TINY_SCHEDULER_CONFIG
    assert sc["use_dynamic_shifting"] is True and sc["time_shift_type"] == "exponential"
    assert (sc["shift"], sc["base_shift"], sc["max_shift"]) == (3.0, 0.5, 1.15)
    assert (sc["base_image_seq_len"], sc["max_image_seq_len"], sc["num_train_timesteps"]) == (256, 4096, 1000)


def test_built_modules_match_configs(components):
    transformer, text_encoder, vae = components["transformer"], components["text_encoder"], components["vae"]
    dim = tiny.TINY_TRANSFORMER_CONFIG["num_attention_heads"] * tiny.TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    # SwiGLU hidden = int(dim * 8 / 3), as in the real model (1536 -> 4096)
    assert transformer.transformer_blocks[0].img_mlp.w1.out_features == int(dim * 8 / 3)
    assert len(transformer.txt_norm) == len(tiny.TINY_TRANSFORMER_CONFIG["selected_layer_index"])
    assert transformer.proj_out.out_features == tiny.TINY_TRANSFORMER_CONFIG["in_channels"]
    assert vae.bn.num_features == tiny.TINY_TRANSFORMER_CONFIG["in_channels"]
    assert text_encoder.config.vocab_size == len(components["tokenizer"]) == tiny.TINY_VOCAB_SIZE
    assert text_encoder.config.architectures == ["LensGptOssEncoder"]
    assert isinstance(text_encoder, LensGptOssEncoder)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        assert all(p.dtype == torch.float32 for p in module.parameters()), name
        assert not module.training, name


# ----------------------------------------------------------------------------------------------------------------
# Determinism and randomisation
# ----------------------------------------------------------------------------------------------------------------
def test_components_deterministic_per_seed(components):
    rng_before = torch.random.get_rng_state()
    again = tiny.build_tiny_components(seed=0)
    other = tiny.build_tiny_components(seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "building must not touch the global RNG"
    for name in ("transformer", "vae", "text_encoder"):
        first, second, third = _state(components[name]), _state(again[name]), _state(other[name])
        _assert_same_state(first, second, name)
        for key, value in first.items():
            if value.is_floating_point():
                assert not torch.equal(value, third[key]), f"{name}.{key} does not depend on the seed"
    assert components["scheduler"].config == again["scheduler"].config


def test_nothing_trivially_zero_or_identity(components):
    for name in ("transformer", "vae", "text_encoder"):
        for key, value in components[name].named_parameters():
            assert value.std() > 0, f"{name}.{key} is constant"
            assert not torch.all(value == 1), f"{name}.{key} is all ones"
    bn = components["vae"].bn
    assert bn.running_mean.abs().max() > 0.05
    assert bn.running_var.min() >= 0.3 and bn.running_var.max() <= 2.0
    assert bn.running_var.std() > 0.1


def test_tokenizer_training_is_deterministic():
    first = tiny._train_tokenizer_json()
    for _ in range(3):
        tiny._train_tokenizer_json.cache_clear()
        assert tiny._train_tokenizer_json() == first


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def test_tokenizer_vocabulary_and_special_tokens(components):
    tok = components["tokenizer"]
    assert 1000 <= len(tok) <= 2000 and len(tok) == tiny.TINY_VOCAB_SIZE
    ids = tok.convert_tokens_to_ids(["[UNK]", *tiny.HARMONY_SPECIAL_TOKENS])
    assert ids == list(range(7))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tiny.TINY_PAD_TOKEN_ID
    assert tok.eos_token == "<|return|>" and tok.eos_token_id == tiny.TINY_EOS_TOKEN_ID
    assert tok.unk_token_id == 0 and tok.bos_token_id is None
    # special tokens are single tokens even when glued to text
    assert tok.convert_ids_to_tokens(tok("<|start|>user<|message|>hi")["input_ids"])[:3] == [
        "<|start|>", "user", "<|message|>"
    ]


def test_tokenizer_round_trip_and_coverage(components):
    tok = components["tokenizer"]
    caption = "a photo of sks dog on a beach"
    ids = tok(caption, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == caption
    assert tok.decode(tok("A Red Cube")["input_ids"]) == "a red cube"  # lower-cases
    for prompt in (caption, "a red cube in the style of watercolor", "a cat holding a sign that says hello world"):
        pieces = tok.tokenize(prompt)
        assert "[UNK]" not in pieces, (prompt, pieces)
        assert len(pieces) == len(prompt.split()), (prompt, pieces)  # every word is one token
    assert tok.unk_token_id not in tok("a zebra made of xylophones, 3 qux")["input_ids"]  # unseen words split
    # training ran to completion: every word of the built-in corpus is a single token
    split = [w for w in tiny._corpus_words() if len(tok.tokenize(w)) != 1]
    assert not split, split[:10]


def test_lens_chat_rendering(components):
    tok = components["tokenizer"]
    rendered = render_lens_chat(tok, "a red cube")
    assert rendered.endswith(FINAL_HEADER)
    assert rendered.startswith("<|start|>system<|message|>")
    assert f"Current date: {tiny.TINY_CHAT_DATE}" in rendered
    order = [
        "<|start|>system<|message|>",
        "<|start|>developer<|message|># Instructions\n\nDescribe the image",
        "<|start|>user<|message|>a red cube<|end|>",
        "<|start|>assistant<|channel|>analysis<|message|>"
        "Need to generate one image according to the description.<|end|>",
        FINAL_HEADER,
    ]
    positions = [rendered.index(part) for part in order]
    assert positions == sorted(positions)
    # the raw template closes the last assistant message with <|return|>, and is stable (frozen date)
    full = tok.apply_chat_template(
        [
            {"role": "system", "content": "sys", "thinking": None},
            {"role": "user", "content": "hi", "thinking": None},
            {"role": "assistant", "content": "", "thinking": "think"},
        ],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert full.endswith(FINAL_HEADER + "<|return|>")
    assert "[UNK]" not in tok.convert_ids_to_tokens(tok(rendered)["input_ids"])


def test_chat_prefix_length(components):
    tok = components["tokenizer"]
    assert chat_prefix_length(tok) == tiny.TINY_TXT_OFFSET == tiny.tiny_chat_prefix_length(tok)
    tokens = tok.convert_ids_to_tokens(tok(render_lens_chat(tok, "a red cube"))["input_ids"])
    assert tokens[tiny.TINY_TXT_OFFSET - 3 : tiny.TINY_TXT_OFFSET] == ["<|start|>", "user", "<|message|>"]
    assert tokens[tiny.TINY_TXT_OFFSET : tiny.TINY_TXT_OFFSET + 3] == ["a", "red", "cube"]
    assert tiny.TINY_TXT_OFFSET != 97  # differs from the real model: code must not hard-code 97 for tiny


# ----------------------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------------------
def test_forward_pass_through_every_component(components):
    tok, text_encoder = components["tokenizer"], components["text_encoder"]
    vae, transformer = components["vae"], components["transformer"]
    layers = tiny.TINY_TRANSFORMER_CONFIG["selected_layer_index"]
    hidden = tiny.TINY_TEXT_ENCODER_CONFIG["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc = tok([render_lens_chat(tok, "a photo of sks dog on a beach")], return_tensors="pt")
        seq = enc["input_ids"].shape[1]
        out = text_encoder(enc["input_ids"], output_hidden_states=True)
        assert len(out.hidden_states) == tiny.TINY_TEXT_ENCODER_CONFIG["num_hidden_layers"] + 1
        for h in out.hidden_states:
            assert h.shape == (1, seq, hidden) and torch.isfinite(h).all()
        features = text_encoder.encode_layers(enc["input_ids"], enc["attention_mask"], layers)
        for i, f in zip(layers, features):
            assert f.shape == (1, seq, hidden) and torch.isfinite(f).all()
            if i < len(text_encoder.model.layers) - 1:  # the last one is before the final norm
                torch.testing.assert_close(f, out.hidden_states[i + 1])
        features = [f[:, tiny.TINY_TXT_OFFSET :] for f in features]
        mask = enc["attention_mask"][:, tiny.TINY_TXT_OFFSET :].bool()

        image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        posterior = vae.encode(image).latent_dist
        latent = posterior.mode()
        assert latent.shape == (1, tiny.TINY_VAE_CONFIG["latent_channels"], 8, 8)
        decoded = vae.decode(latent).sample
        assert decoded.shape == image.shape and torch.isfinite(decoded).all()

        packed = _patchify(latent)
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
        packed = (packed - vae.bn.running_mean[None, :, None, None]) / std[None, :, None, None]
        tokens = packed.flatten(2).transpose(1, 2)  # [1, 16, 32]
        assert tokens.shape == (1, 16, 32)
        velocity = transformer(
            tokens,
            encoder_hidden_states=features,
            encoder_hidden_states_mask=mask,
            timestep=torch.tensor([0.7]),
            img_shapes=[(1, 4, 4)],
        ).sample
    assert velocity.shape == (1, 16, 32) and torch.isfinite(velocity).all()
    assert velocity.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# Saving, reloading, caching
# ----------------------------------------------------------------------------------------------------------------
def test_saved_layout(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "LensPipeline"
    for name, entry in LENS_MODEL_INDEX.items():
        assert index[name] == entry
        assert (saved_pipeline / name).is_dir()
    assert index["text_encoder"] == ["transformers", "LensGptOssEncoder"]
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    files = [p for p in saved_pipeline.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    weights = sorted(str(p.relative_to(saved_pipeline)) for p in files if p.suffix == ".safetensors")
    assert weights == [
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    te_config = json.loads((saved_pipeline / "text_encoder" / "config.json").read_text())
    assert te_config["architectures"] == ["LensGptOssEncoder"] and te_config["model_type"] == "gpt_oss"
    assert te_config["vocab_size"] == tiny.TINY_VOCAB_SIZE
    assert te_config["rope_parameters"]["rope_type"] == "yarn"
    tr_config = json.loads((saved_pipeline / "transformer" / "config.json").read_text())
    assert tr_config["_class_name"] == "LensTransformer2DModel"
    for key, value in tiny.TINY_TRANSFORMER_CONFIG.items():
        assert tr_config[key] == value, key
    sc_config = json.loads((saved_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert sc_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    for key, value in tiny.TINY_SCHEDULER_CONFIG.items():
        assert sc_config[key] == value, key


def test_saved_components_reload_identically(saved_pipeline, components):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, GptOssForCausalLM

    transformer = LensTransformer2DModel.from_pretrained(saved_pipeline / "transformer")
    _assert_same_state(_state(components["transformer"]), _state(transformer), "transformer")
    vae = AutoencoderKLFlux2.from_pretrained(saved_pipeline / "vae")
    _assert_same_state(_state(components["vae"]), _state(vae), "vae")  # includes bn.running_mean / running_var
    text_encoder = LensGptOssEncoder.from_pretrained(saved_pipeline / "text_encoder")
    _assert_same_state(_state(components["text_encoder"]), _state(text_encoder), "text_encoder")
    plain = GptOssForCausalLM.from_pretrained(saved_pipeline / "text_encoder")  # plain GPT-OSS weights
    _assert_same_state(_state(components["text_encoder"]), _state(plain), "text_encoder (plain GPT-OSS)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(saved_pipeline / "scheduler")
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(scheduler.config) == public(components["scheduler"].config)

    tokenizer = AutoTokenizer.from_pretrained(saved_pipeline / "tokenizer")
    original = components["tokenizer"]
    assert len(tokenizer) == len(original)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (original.pad_token_id, original.eos_token_id)
    rendered = render_lens_chat(tokenizer, "a photo of sks dog on a beach")
    assert rendered == render_lens_chat(original, "a photo of sks dog on a beach")
    assert tokenizer(rendered)["input_ids"] == original(rendered)["input_ids"]
    assert chat_prefix_length(tokenizer) == tiny.TINY_TXT_OFFSET


def test_tiny_pipeline_dir_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_TUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_save(folder, seed=0):  # the real writer is covered above; this checks the caching logic
        calls.append(seed)
        folder = Path(folder)
        (folder / "transformer").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        return folder

    monkeypatch.setattr(tiny, "save_tiny_pipeline", fake_save)
    first = tiny.tiny_pipeline_dir(seed=3)
    assert first == tmp_path / "cache" / f"tiny-{tiny.tiny_version()}-3"
    assert (first / "model_index.json").is_file() and (first / "transformer").is_dir()
    assert tiny.tiny_pipeline_dir(seed=3) == first
    assert calls == [3]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp folders left


def test_tiny_pipeline_dir_concurrent_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_TUNE_CACHE", str(tmp_path))
    final = tmp_path / f"tiny-{tiny.tiny_version()}-0"

    def racing_save(folder, seed=0):  # another process finishes the same folder while we build ours
        final.mkdir()
        (final / "model_index.json").write_text('{"winner": true}')
        (Path(folder) / "model_index.json").write_text('{"winner": false}')
        return Path(folder)

    monkeypatch.setattr(tiny, "save_tiny_pipeline", racing_save)
    assert tiny.tiny_pipeline_dir(seed=0) == final
    assert json.loads((final / "model_index.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
