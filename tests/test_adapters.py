"""Adapters: target selection, the PEFT kinds trained / saved / loaded, strict loading, quantised (int8/nf4) bases.

Tolerances. Reloading an adapter rebuilds the same PEFT layers with the same weights, so the reloaded model runs the
very same float operations as the trained one: outputs are compared with torch.equal. Both models are frozen first:
PyTorch's CPU matmul can take another kernel for a weight that requires grad, even under no_grad, which changed the
last bit of outputs in a width-192 variant of these models.
The one exception is PiSSA: the trained model computes W_res·x + s·B·A·x, the reloaded one W·x + s·(B·A - B0·A0)·x
(the rank-2r LoRA that save_adapter writes). That is the same function summed in another order, so the comparison
uses atol = rtol = 1e-5 (measured: 1e-6; outputs are O(1), and a wrong conversion is off by the size of the trained
update, > 1e-2 here).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lens_tune.errors import LensTuneError, ModelLoadError
from lens_tune.model.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components, rerandomize_
from lens_tune.model.transformer import LensTransformer2DModel
from lens_tune.recipe.schema import LoraSettings
from lens_tune.train import adapters as A

# A tiny transformer with quantised layers wide enough for bitsandbytes' 64-value blocks: width 2 x 32 = 64.
QUANT_CONFIG = dict(
    TINY_TRANSFORMER_CONFIG, num_attention_heads=2, attention_head_dim=32, inner_dim=64, axes_dims_rope=[8, 12, 12]
)

KINDS = {
    "lora": dict(type="lora"),
    "dora": dict(type="dora"),
    "rslora": dict(type="lora", rslora=True),
    "pissa": dict(type="lora", init="pissa"),
    "gaussian": dict(type="lora", init="gaussian"),
    "lokr": dict(type="lokr"),
    "loha": dict(type="loha"),
}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _pristine_tiny() -> LensTransformer2DModel:
    return build_tiny_components(0)["transformer"]


def tiny() -> LensTransformer2DModel:
    """A fresh tiny transformer (a copy of build_tiny_components(0)'s, without rebuilding the other components)."""
    return copy.deepcopy(_pristine_tiny())


def quantized_tiny(mode: str) -> LensTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        model = LensTransformer2DModel(**QUANT_CONFIG)
    rerandomize_(model, torch.Generator().manual_seed(0))
    model.eval()
    if mode != "none":
        A.quantize_base(model, mode)
    return model


def batch(config: dict, seed: int = 1):
    """Model inputs (2 samples, a 4x4 token grid, 5 text tokens) and a random velocity target."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(2, 16, config["in_channels"], generator=gen),
        encoder_hidden_states=[torch.randn(2, 5, config["enc_hidden_dim"], generator=gen) for _ in config["selected_layer_index"]],
        timestep=torch.rand(2, generator=gen),
        img_shapes=[(1, 4, 4)],
    )
    target = torch.randn(2, 16, 4 * config["out_channels"], generator=gen)
    return inputs, target


def train(model, params, inputs, target, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def all_block_layers(n_blocks: int) -> list[str]:
    return [f"transformer_blocks.{i}.{layer}" for i in range(n_blocks) for layer in A.BLOCK_LINEAR_LAYERS]


# ----------------------------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------------------------
def test_presets_give_exact_paths():
    model = tiny()
    b0, b1 = "transformer_blocks.0.", "transformer_blocks.1."
    attention0 = [b0 + n for n in ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0", "attn.to_add_out")]
    attention1 = [b1 + n for n in ("attn.img_qkv", "attn.txt_qkv", "attn.to_out.0")]  # last block: no to_add_out
    mlp0 = [b0 + f"{s}_mlp.{w}" for s in ("img", "txt") for w in ("w1", "w2", "w3")]
    mlp1 = [b1 + f"img_mlp.{w}" for w in ("w1", "w2", "w3")]  # last block: no txt_mlp
    assert A.target_modules(model, "attention") == attention0 + attention1
    assert A.target_modules(model, "attention-mlp") == attention0 + mlp0 + attention1 + mlp1
    assert A.target_modules(model, "all") == (
        attention0 + mlp0 + [b0 + "img_mod.1", b0 + "txt_mod.1"] + attention1 + mlp1 + [b1 + "img_mod.1", b1 + "txt_mod.1"]
    )
    assert LoraSettings().targets == "attention-mlp"


def test_names_and_blocks():
    model = tiny()
    assert A.target_modules(model, ["img_qkv", "img_mlp.w1"], blocks=[1]) == [
        "transformer_blocks.1.attn.img_qkv", "transformer_blocks.1.img_mlp.w1"
    ]
    assert A.target_modules(model, ["w1"]) == [
        "transformer_blocks.0.img_mlp.w1", "transformer_blocks.0.txt_mlp.w1", "transformer_blocks.1.img_mlp.w1"
    ]
    assert A.target_modules(model, ["img_mlp", "attn.to_out"], blocks=[0]) == [
        "transformer_blocks.0.attn.to_out.0", *(f"transformer_blocks.0.img_mlp.{w}" for w in ("w1", "w2", "w3"))
    ]
    assert A.target_modules(model, "attention", blocks=[0]) == A.target_modules(model, "attention")[:4]
    # full paths (what load_adapter reports) select exactly themselves
    paths = A.target_modules(model, "all", blocks=[1])
    assert A.target_modules(model, paths) == paths


def test_target_errors():
    model = tiny()
    with pytest.raises(LensTuneError, match=r"Unknown LoRA target\(s\): qkv, attn\.q.*img_qkv.*img_mlp\.w1"):
        A.target_modules(model, ["img_qkv", "qkv", "attn.q"])
    with pytest.raises(LensTuneError, match="Unknown LoRA target preset 'everything'.*attention-mlp"):
        A.target_modules(model, "everything")
    for bad in (2, -1):
        with pytest.raises(LensTuneError, match=rf"block index {bad} is out of range.*2 blocks \(0\.\.1\)"):
            A.target_modules(model, "attention", blocks=[0, bad])
    with pytest.raises(LensTuneError, match="block 5 does not exist"):
        A.target_modules(model, ["transformer_blocks.5.attn.img_qkv"])
    with pytest.raises(LensTuneError, match="selects no layer"):
        A.target_modules(model, ["to_add_out", "txt_mlp"], blocks=[1])


def test_last_block_text_layers_get_no_gradient():
    # The reason they are excluded: in the plain model, backward from a loss on the output leaves exactly these
    # layers (among all block Linear layers) without a gradient.
    model = tiny().requires_grad_(True)
    inputs, target = batch(TINY_TRANSFORMER_CONFIG)
    torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
    no_grad = {p for p in all_block_layers(2) if model.get_submodule(p).weight.grad is None}
    assert no_grad == {f"transformer_blocks.1.{layer}" for layer in A.UNUSED_IN_LAST_BLOCK}
    assert set(A.target_modules(model, "all")) == set(all_block_layers(2)) - no_grad

    # and every adapter that the widest preset creates does get a gradient
    model = tiny()
    params = A.add_adapter(model, LoraSettings(rank=2, targets="all", init="gaussian"))
    torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
    assert all(p.grad is not None for p in params)
    b_grads = {n: p.grad for n, p in model.named_parameters() if ".lora_B." in n}
    assert len(b_grads) == len(A.target_modules(model, "all"))
    assert all(g.abs().sum() > 0 for g in b_grads.values())


# ----------------------------------------------------------------------------------------------------------------
# the adapter kinds: train, save, load
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_train_save_load(kind, tmp_path):
    lora = LoraSettings(rank=4, alpha=8, **KINDS[kind])
    original = tiny()
    model = tiny()
    params = A.add_adapter(model, lora)

    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if kind == "pissa":  # PiSSA moved the top singular part of each adapted weight into the adapter
        w = "transformer_blocks.0.attn.img_qkv"
        assert not torch.equal(model.get_submodule(w).base_layer.weight, original.get_submodule(w).weight)

    inputs, target = batch(TINY_TRANSFORMER_CONFIG)
    before = run(model, inputs)
    losses = train(model, params, inputs, target, steps=3)
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None and torch.equal(param, frozen[name]), name  # base unchanged, bit for bit
    model.requires_grad_(False)  # compare frozen with frozen (see the module docstring)
    trained = run(model, inputs)
    assert (trained - before).abs().max() > 1e-2  # the adapter really changed the model

    state = A.adapter_state_dict(model)
    assert all(".default" not in k for k in state)
    assert next(iter(state)).startswith("transformer_blocks.0.attn.img_qkv.")

    folder = A.save_adapter(model, tmp_path / "adapter", lora, metadata={"step": "3"})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        header = f.metadata()
    peft_config = json.loads(header["lora_adapter_metadata"])
    assert header["format"] == "pt" and header["step"] == "3"
    assert peft_config == json.loads((folder / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == {"lokr": "LOKR", "loha": "LOHA"}.get(kind, "LORA")
    assert sorted(peft_config["target_modules"]) == sorted(A.target_modules(model, lora.targets))

    fresh = tiny()
    info = A.load_adapter(fresh, folder)
    assert info.type == lora.type and info.metadata == {"step": "3"}
    assert info.targets == A.target_modules(fresh, lora.targets)
    assert not any(p.requires_grad for p in fresh.parameters())
    if kind == "pissa":
        # written as the equivalent plain LoRA of rank 2r on the untouched base
        assert info.rank == 8 and info.alpha == 16 and peft_config["init_lora_weights"] is True
        torch.testing.assert_close(run(fresh, inputs), trained, atol=1e-5, rtol=1e-5)
        # resuming: a new PiSSA adapter accepts the saved file and continues from the trained state
        resumed = tiny()
        A.add_adapter(resumed, lora)
        A.set_adapter_state_dict(resumed, load_file(str(folder / "adapter_model.safetensors")))
        torch.testing.assert_close(run(resumed, inputs), trained, atol=1e-5, rtol=1e-5)
    else:
        assert info.rank == 4 and info.alpha == 8 and info.rslora == lora.rslora
        assert torch.equal(run(fresh, inputs), trained)

    if kind in ("lora", "dora"):
        from lens_tune.model.pipeline import LensPipeline

        pipe = LensPipeline(**build_tiny_components(0))
        pipe.load_lora_weights(folder)
        assert torch.equal(run(pipe.transformer.requires_grad_(False), inputs), trained)
        other = tiny()
        other.load_lora_adapter(str(folder), weight_name="adapter_model.safetensors", prefix=None)
        assert torch.equal(run(other.requires_grad_(False), inputs), trained)
        # and the other way: a folder from diffusers' save_lora_adapter (config only in the safetensors header)
        model.save_lora_adapter(str(tmp_path / "diffusers"))
        again = tiny()
        assert A.load_adapter(again, tmp_path / "diffusers").type == lora.type
        assert torch.equal(run(again, inputs), trained)


def test_pissa_file_rebases_a_different_initialisation(tmp_path):
    # An SVD on other hardware may give other (equally valid) A0/B0. Loading a saved PiSSA adapter then re-bases
    # the residual weights onto the file's A0/B0, so the result still equals the trained model.
    lora = LoraSettings(rank=4, init="pissa")
    model = tiny()
    params = A.add_adapter(model, lora)
    inputs, target = batch(TINY_TRANSFORMER_CONFIG)
    train(model, params, inputs, target, steps=3)
    A.save_adapter(model, tmp_path, lora)

    other = tiny()
    A.add_adapter(other, lora)
    initial = other._lens_pissa_initial["default"]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # another W = W_res' + s·B0'·A0' split of the same W
        for key in [k for k in initial if ".lora_A." in k]:
            layer = other.get_submodule(key.split(".lora_A.")[0])
            b_key = key.replace(".lora_A.", ".lora_B.")
            a_new = initial[key] + 0.1 * torch.randn(initial[key].shape, generator=gen)
            b_new = initial[b_key] + 0.1 * torch.randn(initial[b_key].shape, generator=gen)
            s = layer.scaling["default"]
            layer.base_layer.weight += s * (initial[b_key] @ initial[key] - b_new @ a_new)
            initial[key], initial[b_key] = a_new, b_new
    A.set_adapter_state_dict(other, load_file(str(tmp_path / "adapter_model.safetensors")))
    torch.testing.assert_close(run(other, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)


def test_bf16_base_trains_float32_adapter():
    model = tiny().to(torch.bfloat16)
    params = A.add_adapter(model, LoraSettings(rank=4, type="dora"))
    assert model.dtype == torch.bfloat16 and {p.dtype for p in params} == {torch.float32}
    inputs, target = batch(TINY_TRANSFORMER_CONFIG)
    inputs = dict(
        inputs,
        hidden_states=inputs["hidden_states"].bfloat16(),
        encoder_hidden_states=[x.bfloat16() for x in inputs["encoder_hidden_states"]],
    )
    out = model(**inputs).sample
    assert out.dtype == torch.bfloat16
    torch.nn.functional.mse_loss(out.float(), target).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_init_from_continues_a_saved_adapter(tmp_path):
    lora = LoraSettings(rank=4, type="dora")
    model = tiny()
    train(model, A.add_adapter(model, lora), *batch(TINY_TRANSFORMER_CONFIG), steps=2)
    A.save_adapter(model, tmp_path, lora)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))

    again = tiny()
    params = A.add_adapter(again, lora.model_copy(update={"init_from": tmp_path}))
    assert all(p.requires_grad for p in params)
    assert all(torch.equal(v, saved[k]) for k, v in A.adapter_state_dict(again).items())
    with pytest.raises(ModelLoadError, match=r"wrong shapes: transformer_blocks\.0\.attn\.img_qkv\.lora_A\.weight"):
        A.add_adapter(tiny(), lora.model_copy(update={"init_from": tmp_path, "rank": 8, "alpha": 4}))
    with pytest.raises(ModelLoadError, match="lora_alpha=4 but the recipe gives lora_alpha=2"):
        A.add_adapter(tiny(), lora.model_copy(update={"init_from": tmp_path, "alpha": 2}))
    with pytest.raises(LensTuneError, match="init_from"):
        A.add_adapter(tiny(), LoraSettings(init="pissa", init_from=tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# strict loading
# ----------------------------------------------------------------------------------------------------------------
def test_strict_loading_names_the_keys(tmp_path):
    lora = LoraSettings(rank=4)
    model = tiny()
    A.add_adapter(model, lora)
    state = {k: v.clone() for k, v in A.adapter_state_dict(model).items()}
    key = "transformer_blocks.1.img_mlp.w2.lora_B.weight"

    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ModelLoadError, match=rf"missing keys: {key}"):
        A.set_adapter_state_dict(model, missing)
    wrong = dict(state, **{key: torch.zeros(state[key].shape[0], 8)})
    with pytest.raises(ModelLoadError, match=rf"wrong shapes: {key} \(file \[32, 8\], model \[32, 4\]\)"):
        A.set_adapter_state_dict(model, wrong)
    extra = dict(state, **{"transformer_blocks.0.img_mod.1.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(ModelLoadError, match=r"unexpected keys: transformer_blocks\.0\.img_mod\.1\.lora_A\.weight"):
        A.set_adapter_state_dict(model, extra)

    # the same through a folder: the error names the key, and the half-made adapter is removed again
    folder = A.save_adapter(model, tmp_path / "a", lora)
    save_file(missing, str(folder / "adapter_model.safetensors"))
    fresh = tiny()
    with pytest.raises(ModelLoadError, match=rf"adapter_model\.safetensors do not match.*missing keys: {key}"):
        A.load_adapter(fresh, folder)
    assert not getattr(fresh, "peft_config", {}) and not any(".lora_" in n for n, _ in fresh.named_parameters())

    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        A.load_adapter(tiny(), folder)


def test_lycoris_refuses_lora_only_settings():
    for settings in (dict(dropout=0.1), dict(rslora=True), dict(init="gaussian")):
        with pytest.raises(LensTuneError, match="does not support"):
            A.adapter_config(LoraSettings(type="lokr", **settings), ["transformer_blocks.0.attn.img_qkv"])
    with pytest.raises(LensTuneError, match="type: lora only"):
        A.adapter_config(LoraSettings(type="dora", init="pissa"), ["transformer_blocks.0.attn.img_qkv"])


# ----------------------------------------------------------------------------------------------------------------
# quantised bases
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base(mode, tmp_path):
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    bnb_cls = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[mode]
    peft_cls = {"int8": peft_bnb.Linear8bitLt, "nf4": peft_bnb.Linear4bit}[mode]
    inputs, target = batch(QUANT_CONFIG)
    reference = run(quantized_tiny("none"), inputs)

    model = quantized_tiny(mode)
    assert getattr(model, {"int8": "is_loaded_in_8bit", "nf4": "is_loaded_in_4bit"}[mode]) is True
    quantized = set(A.quantized_layers(2))
    for path in all_block_layers(2):
        assert isinstance(model.get_submodule(path), bnb_cls if path in quantized else torch.nn.Linear), path
    assert {p for p in all_block_layers(2) if p not in quantized} == {  # the modulation layers are sensitive
        f"transformer_blocks.{i}.{layer}" for i in range(2) for layer in A.MODULATION_LAYERS}
    for name in ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert type(model.get_submodule(name)) is torch.nn.Linear
    # The forward still works and the weights are the same up to quantisation error. (This eval-mode, no-grad run
    # before training is also the case in which bnb would repack nf4 weights for a CPU kernel without backward.)
    out = run(model, inputs)
    assert ((out - reference).norm() / reference.norm()) < {"int8": 0.05, "nf4": 0.25}[mode]

    lora = LoraSettings(rank=4)
    params = A.add_adapter(model, lora)
    for path in A.target_modules(model, lora.targets):
        assert isinstance(model.get_submodule(path), peft_cls), path  # PEFT's bnb-aware LoRA layers
    assert {p.dtype for p in params} == {torch.float32}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, params, inputs, target, steps=20)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)

    A.save_adapter(model, tmp_path, lora)
    fresh = quantized_tiny(mode)
    A.load_adapter(fresh, tmp_path)
    model.requires_grad_(False)  # compare frozen with frozen (see the module docstring)
    assert torch.equal(run(fresh, inputs), run(model, inputs))

    if mode == "int8":
        # Moving the model (transformer.to(device) swaps parameter data) must carry bnb's int8 weight and scales
        # along, which bnb's own layer does only in its .to(). A copying move stands in for a CPU -> GPU move here.
        expected = run(fresh, inputs)
        fresh._apply(lambda t: t.clone())
        layer = fresh.get_submodule("transformer_blocks.0.attn.img_qkv").base_layer
        assert layer.state.CB.data_ptr() == layer.weight.data_ptr()
        assert torch.equal(run(fresh, inputs), expected)

    with pytest.raises(LensTuneError, match="pissa rewrites the base weights.*quantised"):
        A.add_adapter(quantized_tiny(mode), LoraSettings(init="pissa"))
    with pytest.raises(LensTuneError, match="already quantised"):
        A.quantize_base(fresh, mode)


def _loss_and_lora_grads(model, params, inputs, target):
    model.zero_grad(set_to_none=True)
    out = model(**inputs).sample
    torch.nn.functional.mse_loss(out, target).backward()
    return out.detach(), [p.grad.clone() for p in params]


def test_int8_layer_computes_what_bitsandbytes_and_a_dequantised_float_model_compute(monkeypatch):
    """Our int8 layer keeps no input for backward (tests/test_plan_memory.py measures that); what it computes is
    unchanged. Against bitsandbytes' own layer, outputs and LoRA gradients are bit-identical in both of bnb's paths:
    training on a CPU (dequantise-and-matmul) and inference (int8 activations x int8 weights, the GPU training path).
    Against a float model holding the dequantised weights, the CPU training path is the same arithmetic up to the
    weight's last bit (measured 1e-6 on outputs of size 1), and the int8-activation path is off by its activation
    rounding only (measured: outputs 0.4%, LoRA gradients 1.4% relative)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_dequant

    lora = LoraSettings(rank=4)
    inputs, target = batch(QUANT_CONFIG)
    model = quantized_tiny("int8")
    reference = quantized_tiny("none")  # the float model with each int8 layer's dequantised weight
    for path in A.quantized_layers(len(model.transformer_blocks)):
        int8 = model.get_submodule(path)
        reference.get_submodule(path).weight.data = int8_vectorwise_dequant(int8.weight.data, int8.weight.SCB)
    params = A.add_adapter(model, lora)
    with torch.no_grad():  # LoRA B starts at zero; random adapters make every LoRA gradient non-zero
        gen = torch.Generator().manual_seed(2)
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    reference_params = A.add_adapter(reference, lora)
    A.set_adapter_state_dict(reference, A.adapter_state_dict(model))

    for training in (True, False):
        model.train(training), reference.train(training)
        out, grads = _loss_and_lora_grads(model, params, inputs, target)
        assert all(g.abs().sum() > 0 for g in grads)
        with monkeypatch.context() as patch:
            patch.setattr(A._int8_linear_class(), "forward", bnb.nn.Linear8bitLt.forward)
            bnb_out, bnb_grads = _loss_and_lora_grads(model, params, inputs, target)
        assert torch.equal(out, bnb_out) and all(map(torch.equal, grads, bnb_grads))
        float_out, float_grads = _loss_and_lora_grads(reference, reference_params, inputs, target)
        if training:
            torch.testing.assert_close(out, float_out, atol=1e-5, rtol=0)
            for g, f in zip(grads, float_grads):
                torch.testing.assert_close(g, f, atol=1e-7, rtol=1e-5)
        else:
            assert (out - float_out).norm() / float_out.norm() < 0.02
            for g, f in zip(grads, float_grads):
                assert (g - f).norm() / f.norm() < 0.05
