"""model.modulation_device: cpu (lens_tune.model.host_modulation): the blocks' img_mod/txt_mod computed in host
memory give the same forward pass and the same adapter gradients as the layers themselves, and take their weights
off the model. (A recipe that would adapt them is refused: tests/test_recipe_errors.py.)"""

from __future__ import annotations

import copy

import torch

from lens_tune.model.host_modulation import HostModulation
from lens_tune.model.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_components
from lens_tune.recipe.schema import LoraSettings
from lens_tune.train.adapters import add_adapter


def inputs(seed: int = 0, batch: int = 2):
    config = TINY_TRANSFORMER_CONFIG
    g = torch.Generator().manual_seed(seed)
    layers = len(config["selected_layer_index"])
    return dict(
        hidden_states=torch.randn(batch, 16, config["in_channels"], generator=g),
        encoder_hidden_states=[torch.randn(batch, 5, config["enc_hidden_dim"], generator=g) for _ in range(layers)],
        encoder_hidden_states_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:batch],
        timestep=torch.rand(batch, generator=g),
        img_shapes=[(1, 4, 4)],
    )


def pair():
    """The tiny transformer, and a copy whose modulation lives on the host."""
    resident = build_tiny_components(seed=0)["transformer"]
    hosted = copy.deepcopy(resident)
    return resident, hosted, HostModulation(hosted)


def test_same_forward_pass_and_no_modulation_weights_left_on_the_model():
    resident, hosted, host = pair()
    modulation = sum(p.numel() for b in resident.transformer_blocks for p in [*b.img_mod.parameters(), *b.txt_mod.parameters()])
    assert modulation > 0
    assert sum(p.numel() for p in hosted.parameters()) == sum(p.numel() for p in resident.parameters()) - modulation
    assert not any("_mod" in name for name in hosted.state_dict())
    batch = inputs()
    with torch.no_grad():
        expected = resident(**batch).sample
        got = hosted(**batch).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # vectors handed in (the trainer's way) are used instead of a computation from the timestep
    host.supply(host.compute(batch["timestep"], torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(hosted(**batch).sample, expected, rtol=1e-5, atol=1e-5)
    assert host.supplied is None  # used once: the next call computes its own again
    host.supply(host.compute(torch.ones(2), torch.float32))  # other sigmas: another output
    with torch.no_grad():
        assert not torch.allclose(hosted(**batch).sample, expected, atol=1e-3)


def test_same_adapter_gradients_with_gradient_checkpointing():
    resident, hosted, host = pair()
    grads = []
    for model in (resident, hosted):
        model.requires_grad_(False)
        torch.manual_seed(0)
        params = add_adapter(model, LoraSettings(rank=4, targets="attention-mlp", init="gaussian"))
        model.enable_gradient_checkpointing()
        model.train()
        batch = inputs(seed=1)
        if model is hosted:
            host.supply(host.compute(batch["timestep"], torch.float32))
        model(**batch).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)

