"""Checkpoint layouts that must load to identical outputs, and wrong checkpoints that must fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lens_tune import LensTransformer2DModel
from lens_tune.errors import ModelLoadError
from lens_tune.model.transformer import SINGLE_FILE_PREFIXES
from tests.conftest import GOLDEN

SOURCE = GOLDEN / "transformer"
CONFIG = json.loads((SOURCE / "config.json").read_text())


def output(model, golden):
    with torch.no_grad():
        return model(
            golden["batch2_padded/hidden_states"],
            golden.layers("batch2_padded/encoder_hidden_states"),
            golden["batch2_padded/encoder_hidden_states_mask"],
            golden["batch2_padded/timestep"],
            [(1, 4, 2)],
        ).sample


@pytest.fixture
def reference(golden_model, golden_transformer):
    return output(golden_model, golden_transformer)


def write_single_file(model, path, prefix="", extra=None):
    tensors = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def test_sharded_checkpoint_loads_identically(tmp_path, golden_model, golden_transformer, reference):
    golden_model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = LensTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(output(loaded, golden_transformer), reference)


@pytest.mark.parametrize("prefix", ["", *SINGLE_FILE_PREFIXES])
def test_single_file_under_each_prefix_loads_identically(tmp_path, golden_model, golden_transformer, reference, prefix):
    # other components' keys in the same file (as in all-in-one checkpoints) are ignored
    extra = {"vae.decoder.conv_in.weight": torch.zeros(2)} if prefix else {}
    path = write_single_file(golden_model, tmp_path / "lens.safetensors", prefix, extra)
    loaded = LensTransformer2DModel.from_single_file(path, config=SOURCE / "config.json")
    assert torch.equal(output(loaded, golden_transformer), reference)


def test_pipeline_folder_and_dtype(golden_transformer, reference):
    loaded = LensTransformer2DModel.from_pretrained(GOLDEN / "pipeline", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert all(not p.is_meta for p in loaded.parameters())


def test_single_file_infers_the_official_architecture(tmp_path):
    # official head size and four text layers, but tiny widths: shapes say everything except rope axes / layers
    config = dict(num_layers=2, attention_head_dim=64, num_attention_heads=1, inner_dim=64, enc_hidden_dim=8, in_channels=16, out_channels=4)
    model = LensTransformer2DModel(**config)
    path = write_single_file(model, tmp_path / "lens.safetensors", "model.diffusion_model.")
    loaded = LensTransformer2DModel.from_single_file(path)
    for key, value in config.items():
        assert loaded.config[key] == value, key
    assert list(loaded.config.axes_dims_rope) == [8, 28, 28] and list(loaded.config.selected_layer_index) == [5, 11, 17, 23]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_missing_keys_are_named(tmp_path, golden_model):
    state = golden_model.state_dict()
    state.pop("transformer_blocks.1.attn.img_qkv.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\), first: transformer_blocks.1.attn.img_qkv.weight \[96, 32\]"):
        LensTransformer2DModel.from_single_file(tmp_path / "x.safetensors", config=CONFIG)


def test_unexpected_keys_are_named(tmp_path, golden_model):
    write_single_file(golden_model, tmp_path / "x.safetensors", extra={"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)})
    with pytest.raises(ModelLoadError, match=r"1 unexpected key\(s\), first: transformer_blocks.0.attn.to_q.weight \[32, 32\]"):
        LensTransformer2DModel.from_single_file(tmp_path / "x.safetensors", config=CONFIG)


def test_wrong_shapes_are_named(tmp_path, golden_model):
    state = {k: v.contiguous() for k, v in golden_model.state_dict().items()}
    state["img_in.weight"] = torch.zeros(32, 16)
    save_file(state, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match=r"img_in.weight is \[32, 16\] in the file, expected \[32, 32\]"):
        LensTransformer2DModel.from_single_file(tmp_path / "x.safetensors", config=CONFIG)


def test_config_that_does_not_match_the_weights(tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(SOURCE, folder, ignore=shutil.ignore_patterns("cases.*"))
    config = dict(CONFIG, num_layers=1)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\), first: transformer_blocks.1.* Is config.json from the same model"):
        LensTransformer2DModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(CONFIG, inner_dim=64)))
    with pytest.raises(ModelLoadError, match="invalid config .*inner_dim=64"):
        LensTransformer2DModel.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        LensTransformer2DModel.from_pretrained(folder)


def test_pickles_are_never_loaded(tmp_path, monkeypatch, golden_model):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(SOURCE / "config.json", folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="only pickle checkpoints .*safetensors only"):
        LensTransformer2DModel.from_pretrained(folder)
    (tmp_path / "lens.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="is a pickle checkpoint"):
        LensTransformer2DModel.from_single_file(tmp_path / "lens.ckpt", config=CONFIG)


def test_corrupt_and_foreign_files(tmp_path, golden_model):
    path = write_single_file(golden_model, tmp_path / "x.safetensors")
    path.write_bytes(path.read_bytes()[:5000])  # truncated download
    with pytest.raises(ModelLoadError, match="could not be read as safetensors.*truncated"):
        LensTransformer2DModel.from_single_file(path, config=CONFIG)
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(ModelLoadError, match="does not look like a Lens transformer"):
        LensTransformer2DModel.from_single_file(tmp_path / "bert.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        LensTransformer2DModel.from_single_file(tmp_path / "absent.safetensors", config=CONFIG)


def test_missing_shard_and_missing_weights(tmp_path, golden_model):
    golden_model.save_pretrained(tmp_path, max_shard_size="50KB")
    next(tmp_path.glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="lists shards that are not in"):
        LensTransformer2DModel.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(SOURCE / "config.json", empty)
    with pytest.raises(ModelLoadError, match="No diffusion_pytorch_model.safetensors"):
        LensTransformer2DModel.from_pretrained(empty)


def copy_without(source, target, file_name, drop_key):
    """Copy a component folder, removing one tensor from one of its safetensors files."""
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    tensors = load_file(str(source / file_name))
    tensors.pop(drop_key)
    save_file(tensors, str(target / file_name))
    return target


def test_vae_and_text_encoder_are_loaded_strictly_too(tmp_path):
    from lens_tune.model.latents import load_vae
    from lens_tune.model.text_encoder import load_text_encoder

    pipeline = GOLDEN / "pipeline"
    vae = copy_without(pipeline / "vae", tmp_path / "vae", "diffusion_pytorch_model.safetensors", "decoder.conv_out.weight")
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\), first: decoder.conv_out.weight \[3, 16, 3, 3\]"):
        load_vae(vae)
    text = copy_without(pipeline / "text_encoder", tmp_path / "te", "model.safetensors", "model.layers.3.mlp.router.weight")
    with pytest.raises(ModelLoadError, match="do not match its config.json: 1 missing keys, first: model.layers.3.mlp.router.weight"):
        load_text_encoder(text, dtype=torch.float32)
    pickled = tmp_path / "te_pickle"
    pickled.mkdir()
    shutil.copy(pipeline / "text_encoder" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match="Could not load the text encoder weights"):
        load_text_encoder(pickled, dtype=torch.float32)


def test_hub_repo_ids_are_fetched_through_the_hub_cache(monkeypatch):
    import huggingface_hub

    from lens_tune import LensPipeline

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(GOLDEN / "pipeline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = LensPipeline.from_pretrained("some-mirror/Lens", revision="v1", text_encoder=None, tokenizer=None)
    assert isinstance(pipe.transformer, LensTransformer2DModel)
    assert calls == [("some-mirror/Lens", "v1", None)]
    LensTransformer2DModel.from_pretrained("some-mirror/Lens", subfolder="transformer", revision="main")
    assert calls[-1] == ("some-mirror/Lens", "main", ["transformer/*", "model_index.json"])

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="Could not fetch 'some-mirror/Lens' from the Hugging Face Hub"):
        LensPipeline.from_pretrained("some-mirror/Lens")
