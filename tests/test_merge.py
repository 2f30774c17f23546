"""Merging an adapter into the base weights reproduces the adapter-at-scale outputs, and loads as a plain model."""

from __future__ import annotations

import pytest
import torch

from lens_tune.export.merge import merge_adapter
from lens_tune.model.tiny import tiny_pipeline_dir
from lens_tune.model.transformer import LensTransformer2DModel
from lens_tune.recipe.schema import LoraSettings
from lens_tune.train.adapters import add_adapter, save_adapter


def inputs():
    torch.manual_seed(0)
    return dict(hidden_states=torch.randn(2, 16, 32), encoder_hidden_states=[torch.randn(2, 6, 32) for _ in range(3)],
                timestep=torch.tensor([0.3, 0.8]), img_shapes=[(1, 4, 4)])


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_model_matches_adapter_at_scale(tmp_path, kind, scale):
    model = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    lora = LoraSettings(type=kind, rank=4)
    params = add_adapter(model, lora)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter", lora)
    with torch.no_grad():
        expected = model(**inputs(), attention_kwargs={"scale": scale}).sample

    out = merge_adapter(tmp_path / "adapter", tiny_pipeline_dir(), tmp_path / "merged", scale, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded, with an index
    merged = LensTransformer2DModel.from_pretrained(out)
    assert not any("lora" in k or "hada" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs()).sample, expected, atol=1e-5, rtol=1e-5)


def test_merge_command_from_a_run_folder(tmp_path, capsys):
    from lens_tune.cli import main

    model = LensTransformer2DModel.from_pretrained(tiny_pipeline_dir() / "transformer")
    lora = LoraSettings(rank=4)
    for p in add_adapter(model, lora):
        torch.nn.init.normal_(p, 0, 0.2)
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", lora)
    assert main(["merge", str(run), "--model", "tiny", "--out", str(tmp_path / "merged")]) == 0
    assert "Merged" in capsys.readouterr().out
    merged = LensTransformer2DModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs()).sample, model(**inputs()).sample, atol=1e-5, rtol=1e-5)
    assert main(["merge", str(tmp_path / "nothing"), "--model", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "not a run folder, a checkpoint or an adapter folder" in capsys.readouterr().err
