"""Adapter export (diffusers, ComfyUI / stable-diffusion.cpp) and import (those plus kohya) without training.

The adapters get random weights (lora_B non-zero), so every layer's update reaches the output. Reloaded models run
the same function in another summation order (the scale is folded into lora_B on import), so outputs are compared
with atol = rtol = 1e-5; a wrong mapping or scale is off by the size of the update (> 1e-2 here, checked).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lens_tune.errors import LensTuneError
from lens_tune.export.formats import export_comfyui, export_diffusers, read_adapter_file
from lens_tune.model.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components
from lens_tune.recipe.schema import LoraSettings
from lens_tune.train import adapters as A

TOL = dict(atol=1e-5, rtol=1e-5)


@functools.lru_cache(maxsize=1)
def _components():
    return build_tiny_components(0)


def tiny():
    return copy.deepcopy(_components()["transformer"])


def inputs():
    config = TINY_TRANSFORMER_CONFIG
    gen = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, config["in_channels"], generator=gen),
        encoder_hidden_states=[torch.randn(2, 5, config["enc_hidden_dim"], generator=gen) for _ in config["selected_layer_index"]],
        timestep=torch.rand(2, generator=gen),
        img_shapes=[(1, 4, 4)],
    )


@torch.no_grad()
def run(model):
    return model.requires_grad_(False)(**inputs()).sample


def make_adapter(kind: str, folder, rslora: bool = False):
    """A tiny transformer with a random `kind` adapter (rank 4, alpha 8, every block layer), saved to `folder`."""
    lora = LoraSettings(type=kind, rank=4, alpha=8, rslora=rslora, targets="all")
    model = tiny()
    A.add_adapter(model, lora)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            if p.dim() == 1:  # DoRA magnitude: keep it near the row norms it starts from
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    A.save_adapter(model, folder, lora, metadata={"lens_tune.step": "7"})
    expected = run(model)
    assert (expected - run(tiny())).abs().max() > 1e-2  # the adapter really changes the output
    return model, expected


def load_imported(state, info):
    """Our importer's output loaded as a LoRA with alpha = rank into a fresh tiny transformer."""
    model = tiny()
    A.add_adapter(model, LoraSettings(rank=info["rank"], alpha=info["rank"], targets=info["targets"]))
    A.set_adapter_state_dict(model, state)
    return model


def header_of(file):
    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {})


def check_header(header, tmp_path, extra: dict[str, str]):
    assert all(isinstance(v, str) for v in header.values())
    for key, value in extra.items():
        assert header[key] == value
    assert not any(str(tmp_path) in v for v in header.values())  # export adds no path


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_diffusers_export(kind, tmp_path):
    from lens_tune.model.pipeline import LensPipeline

    _, expected = make_adapter(kind, tmp_path / "run" / "adapter")
    file = export_diffusers(tmp_path / "run" / "adapter", tmp_path / "out", {"lens_tune.base": "microsoft/Lens"})
    assert file.name == "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(file)))
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".lora_B.weight") for k in keys)
    assert any(k.endswith(".lora_magnitude_vector") for k in keys) == (kind == "dora")
    header = header_of(file)
    config = {k.removeprefix("transformer."): v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] == (kind == "dora")
    check_header(header, tmp_path, {"lens_tune.base": "microsoft/Lens", "format": "pt"})

    other = tiny()
    other.load_lora_adapter(str(tmp_path / "out"), weight_name=file.name, prefix="transformer")
    torch.testing.assert_close(run(other), expected, **TOL)
    pipe = LensPipeline(**copy.deepcopy(_components()))
    pipe.load_lora_weights(tmp_path / "out")
    torch.testing.assert_close(run(pipe.transformer), expected, **TOL)
    if kind == "lora":
        state, info = read_adapter_file(file)
        assert info["format"] == "diffusers" and info["rank"] == 4
        torch.testing.assert_close(run(load_imported(state, info)), expected, **TOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_comfyui_export_and_import(rslora, tmp_path):
    _, expected = make_adapter("lora", tmp_path / "adapter", rslora=rslora)
    file = export_comfyui(tmp_path / "adapter", tmp_path / "lens_lora.safetensors", {"lens_tune.step": "7"})
    state = load_file(str(file))
    base = dict(tiny().named_parameters())
    modules = {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    assert len(state) == 3 * len(modules)
    assert "diffusion_model.transformer_blocks.0.attn.img_qkv" in modules  # fused qkv kept fused
    for module in modules:
        assert module.startswith("diffusion_model.")
        weight = base[module[len("diffusion_model."):] + ".weight"]
        a, b, alpha = (state[f"{module}.{s}"] for s in ("lora_A.weight", "lora_B.weight", "alpha"))
        assert a.shape[0] == 4 and (b @ a).shape == weight.shape and alpha.dim() == 0
        assert alpha.item() == pytest.approx(8 / 4**0.5 * 4 if rslora else 8)  # rsLoRA: scale alpha/sqrt(r) -> alpha = scale * r
    check_header(header_of(file), tmp_path, {"lens_tune.step": "7"})

    imported, info = read_adapter_file(file)
    assert info["format"] == "comfyui" and info["rank"] == 4 and info["alpha"] == 4
    torch.testing.assert_close(run(load_imported(imported, info)), expected, **TOL)
    # our own folder reads the same way
    ours, info = read_adapter_file(tmp_path / "adapter")
    assert info["format"] == "peft"
    torch.testing.assert_close(run(load_imported(ours, info)), expected, **TOL)


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_unet__"])
def test_kohya_import(prefix, tmp_path):
    model, expected = make_adapter("lora", tmp_path / "adapter")
    peft_state = A.adapter_state_dict(model)
    kohya = {}
    alpha = 2.0  # != rank: the file's scale is alpha/rank = 0.5, ours is 8/4 = 2 -> lora_up carries the factor 4
    for key, value in peft_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = value.clone()
        kohya[f"{name}.lora_up.weight"] = peft_state[f"{module}.lora_B.weight"] * 4
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    assert "lora_unet_transformer_blocks_0_img_mod_1.alpha".replace("lora_unet_", prefix) in kohya
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    state, info = read_adapter_file(tmp_path / "kohya.safetensors")
    assert info["format"] == "kohya" and info["rank"] == 4
    assert set(info["targets"]) == {k[: -len(".lora_A.weight")] for k in peft_state if k.endswith(".lora_A.weight")}
    torch.testing.assert_close(run(load_imported(state, info)), expected, **TOL)


def _comfy_delta(state, module, kind):
    """The weight update as ComfyUI's LoHa / LoKr weight adapters compute it (LyCORIS conventions)."""
    g = lambda n: state.get(f"diffusion_model.{module}.{n}")  # noqa: E731
    if kind == "loha":
        scale = g("alpha").item() / g("hada_w1_b").shape[0]
        return (g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b")) * scale
    w1 = g("lokr_w1") if g("lokr_w1") is not None else g("lokr_w1_a") @ g("lokr_w1_b")
    w2 = g("lokr_w2") if g("lokr_w2") is not None else g("lokr_w2_a") @ g("lokr_w2_b")
    dim = g("lokr_w2_b").shape[0] if g("lokr_w2_b") is not None else (g("lokr_w1_b").shape[0] if g("lokr_w1_b") is not None else None)
    scale = g("alpha").item() / dim if (g("alpha") is not None and dim is not None) else 1.0
    return torch.kron(w1, w2) * scale


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_comfyui_export_and_import(kind, tmp_path):
    from lens_tune.model.pipeline import LensPipeline

    model, expected = make_adapter(kind, tmp_path / "adapter")
    file = export_comfyui(tmp_path / "adapter", tmp_path / "x.safetensors", {})
    state = load_file(str(file))
    modules = {k[len("diffusion_model."):].rsplit(".", 1)[0] for k in state}
    assert modules == set(A._adapted_modules(model, "default"))
    base = dict(tiny().named_parameters())
    for module in modules:
        layer = model.get_submodule(module)
        delta = layer.get_delta_weight("default")
        assert delta.abs().max() > 1e-3 and delta.shape == base[f"{module}.weight"].shape
        torch.testing.assert_close(_comfy_delta(state, module, kind), delta, **TOL)
    if kind == "lokr":  # rank 4 on the tiny widths: some modules split w2 (lokr_w2_a/b), others keep it full
        assert any(k.endswith(".lokr_w2_a") for k in state) and any(k.endswith(".lokr_w2") for k in state)
    with pytest.raises(LensTuneError, match="diffusers"):
        export_diffusers(tmp_path / "adapter", tmp_path / "d", {})

    # back through our importer (the ComfyUI file and our own folder), our pipeline and a continued training
    for source in (file, tmp_path / "adapter"):
        imported, info = read_adapter_file(source)
        assert info["type"] == kind and info["format"] == ("comfyui" if source == file else "peft")
        assert set(info["targets"]) == modules
        other = tiny()
        A.load_adapter_state(other, info["config"], imported, "default", source=str(source))
        torch.testing.assert_close(run(other), expected, **TOL)
    pipe = LensPipeline(**copy.deepcopy(_components()))
    pipe.load_lora_weights(file, adapter_name="x", scale=0.5)
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.img_qkv")
    half = layer.get_delta_weight("x")
    pipe.set_adapters("x", 1.0)
    torch.testing.assert_close(run(pipe.transformer), expected, **TOL)
    torch.testing.assert_close(half * 2, layer.get_delta_weight("x"), **TOL)  # the scale reaches LoHa/LoKr layers
    continued = tiny()
    A.add_adapter(continued, LoraSettings(type=kind, rank=4, alpha=1, targets="all", init_from=file))
    torch.testing.assert_close(run(continued), expected, **TOL)


def test_lycoris_files_of_other_trainers(tmp_path):
    """kohya/LyCORIS-style files (`lora_unet_` names, an alpha, decomposed factors) load with ComfyUI's scale."""
    model, _ = make_adapter("lokr", tmp_path / "adapter")
    from peft.tuners.lokr.layer import factorization

    module = "transformer_blocks.0.attn.img_qkv"
    weight = dict(model.named_parameters())[f"{module}.base_layer.weight"]
    (l, k), (m, n) = factorization(weight.shape[0]), factorization(weight.shape[1])
    assert 2 < max(k, n) / 2  # PEFT splits w2 at rank 2
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(l, m, generator=gen)
    w2_a, w2_b = torch.randn(k, 2, generator=gen), torch.randn(2, n, generator=gen)
    name = "lora_unet_" + module.replace(".", "_")
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b,
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "lokr.safetensors"))
    state, info = read_adapter_file(tmp_path / "lokr.safetensors")
    assert info["type"] == "lokr" and info["format"] == "kohya" and info["ranks"] == {module: 2}
    other = tiny()
    A.load_adapter_state(other, info["config"], state, "default", source="lokr")
    layer = other.get_submodule(module)
    expected = torch.kron(w1, w2_a @ w2_b) * (1.0 / 2)  # ComfyUI: alpha / rank of the decomposed factor
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, **TOL)
    assert expected.shape == weight.shape

    # a factor split PEFT would never make (w2 decomposed at a rank where PEFT keeps it full) is refused
    w2_a, w2_b = torch.randn(k, max(k, n), generator=gen), torch.randn(max(k, n), n, generator=gen)
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(LensTuneError, match="factor layout PEFT does not create"):
        read_adapter_file(tmp_path / "odd.safetensors")
    save_file({f"{name}.hada_w1_a": torch.zeros(l * k, 2), f"{name}.hada_w1_b": torch.zeros(2, m * n)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(LensTuneError, match="LoHa module .* lacks hada_w2_a, hada_w2_b"):
        read_adapter_file(tmp_path / "loha.safetensors")


def test_refusals(tmp_path):
    make_adapter("dora", tmp_path / "dora")
    with pytest.raises(LensTuneError, match="DoRA adapters can be exported as: diffusers"):
        export_comfyui(tmp_path / "dora", tmp_path / "x.safetensors", {})
    with pytest.raises(LensTuneError, match="DoRA"):
        read_adapter_file(tmp_path / "dora")
    save_file({"model.layers.0.q.weight": torch.zeros(2, 2), "foo.bar": torch.zeros(1)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(LensTuneError, match="unknown adapter key layout.*foo.bar.*Supported"):
        read_adapter_file(tmp_path / "u.safetensors")
    save_file({"lora_unet_transformer_blocks_0_attn_nope.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_transformer_blocks_0_attn_nope.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(LensTuneError, match="no transformer module matches"):
        read_adapter_file(tmp_path / "k.safetensors")
    make_adapter("lora", tmp_path / "lora")
    with pytest.raises(TypeError):
        export_comfyui(tmp_path / "lora", tmp_path / "y.safetensors", {"step": 3})
