"""`lens-tune export` end to end on a trained tiny run: files, metadata, card, re-import and a Hub push."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from lens_tune.cli import main
from tests.hub_server import FakeHub
from tests.test_export_hub import hub_env  # noqa: F401  (autouse: the Hub client only ever sees 127.0.0.1)
from tests.test_train import BASE, train_in_process, write_recipe


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-run")
    body = BASE + "lora: {rank: 4}\ntrain: {steps: 3, optimizer: adamw, learning_rate: 1.0e-2}\ncheckpoint: {every: 2}\n"
    _, result = train_in_process(write_recipe(folder, body), "validation.before_training=false")
    return result.run


def outputs(pipe_or_model):
    torch.manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 16, 32), encoder_hidden_states=[torch.randn(1, 5, 32) for _ in range(3)],
                  timestep=torch.tensor([0.4]), img_shapes=[(1, 4, 4)])
    with torch.no_grad():
        return pipe_or_model(**kwargs).sample


def test_export_writes_loadable_files_with_clean_metadata(trained_run, tmp_path, capsys):
    from lens_tune import LensPipeline, LensTransformer2DModel
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.train.adapters import load_adapter

    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    assert {"pytorch_lora_weights.safetensors", "lens_comfyui.safetensors", "README.md", "samples.png"} <= {
        p.name for p in out.iterdir()}

    reference = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    load_adapter(reference, trained_run / "adapter")
    expected = outputs(reference)
    for name in ("pytorch_lora_weights.safetensors", "lens_comfyui.safetensors"):
        pipe = LensPipeline.from_pretrained(tiny_pipeline_dir(), text_encoder=None, tokenizer=None)
        pipe.load_lora_weights(out / name)
        torch.testing.assert_close(outputs(pipe.transformer), expected, atol=1e-5, rtol=1e-5)
        with safe_open(str(out / name), "pt") as handle:
            header = handle.metadata()
        assert header["lens_tune.steps"] == "3" and header["lens_tune.rank"] == "4" and header["lens_tune.trigger"] == "sks"
        assert header["lens_tune.base_model"] == "tiny" and len(header["lens_tune.base_sha256"]) == 64
        recipe = json.loads(header["lens_tune.recipe"])
        assert recipe["lora"]["rank"] == 4
        text = json.dumps(header)
        assert str(trained_run.parent) not in text and "/tmp" not in text and os.path.expanduser("~") not in text


def test_export_of_a_checkpoint_and_bad_input(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "step-000002"
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "c"), "--format", "comfyui"]) == 0
    with safe_open(str(tmp_path / "c" / "lens_comfyui.safetensors"), "pt") as handle:
        assert handle.metadata()["lens_tune.steps"] == "2"
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "d")]) == 2
    assert "unknown export format(s) onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere")]) == 2


def test_export_and_push(trained_run, tmp_path, monkeypatch):
    token = "hf_test_export_token_1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        out = tmp_path / "pushed"
        assert main(["export", str(trained_run), "--out", str(out), "--push-to-hub", "me/robot-lora", "--private"]) == 0
        received = hub.files
        assert [c["repo"] for c in hub.commits] == ["me/robot-lora"]  # one commit
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert received == local
    assert all(token.encode() not in data for data in local.values())


@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "lens_comfyui.safetensors"])
def test_training_continues_from_an_exported_file(trained_run, tmp_path, name):
    from lens_tune import LensTransformer2DModel
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.recipe.schema import LoraSettings
    from lens_tune.train.adapters import add_adapter, load_adapter

    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    reference = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    load_adapter(reference, trained_run / "adapter")
    continued = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    add_adapter(continued, LoraSettings(rank=4, alpha=2.0, init_from=out / name))  # another alpha: rescaled
    torch.testing.assert_close(outputs(continued), outputs(reference), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="set lora.rank: 4"):
        add_adapter(LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer"),
                    LoraSettings(rank=8, init_from=out / name))


def test_lokr_run_exports_the_formats_that_carry_it(tmp_path, capsys):
    """A LoKr run: the default export writes the ComfyUI file only and says why; asking for diffusers is refused
    with the formats that work; the ComfyUI file loads back (pipeline) with the run's own outputs."""
    from lens_tune.model.pipeline import LensPipeline
    from lens_tune.model.tiny import tiny_pipeline_dir
    from lens_tune.train.adapters import load_adapter

    body = BASE + "lora: {type: lokr, rank: 4, alpha: 2}\ntrain: {steps: 2, optimizer: adamw, learning_rate: 1.0e-2}\n"
    _, result = train_in_process(write_recipe(tmp_path, body), "validation.before_training=false")
    out = tmp_path / "export"
    assert main(["export", str(result.run), "--out", str(out)]) == 0
    assert "lokr adapter: writing comfyui only (diffusers cannot carry it)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lens_comfyui.safetensors"]
    assert main(["export", str(result.run), "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 2
    assert "LOKR adapters can be exported as: comfyui" in capsys.readouterr().err
    assert not list((tmp_path / "d").glob("*.safetensors"))

    pipe = LensPipeline.from_pretrained(tiny_pipeline_dir())
    base = outputs(pipe.transformer)
    pipe.load_lora_weights(out / "lens_comfyui.safetensors")
    reference = LensPipeline.from_pretrained(tiny_pipeline_dir()).transformer
    load_adapter(reference, result.run / "adapter")
    expected = outputs(reference)
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(outputs(pipe.transformer), expected, atol=1e-5, rtol=1e-5)
