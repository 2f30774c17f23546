"""Images to packed latent tokens and the flow-matching training target, against the reference's golden values."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLFlux2
from PIL import Image

from lens_tune import LensTransformer2DModel
from lens_tune.model.flow_matching import compute_empirical_mu, noisy_latents, velocity_target
from lens_tune.model.latents import (
    decode_tokens,
    encode_pixels,
    pack_latents,
    patchify,
    pixels_from_image,
    unpack_latents,
    unpatchify,
)
from tests.conftest import GOLDEN

ATOL = 1e-4


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKLFlux2.from_pretrained(GOLDEN / "pipeline" / "vae", use_safetensors=True).eval()


def test_image_to_tokens_matches_reference(vae, golden_training):
    pixels = pixels_from_image(Image.open(GOLDEN / "training" / "image.png"))
    assert torch.equal(pixels, golden_training["image"])
    with torch.no_grad():
        x0 = encode_pixels(vae, pixels)
    torch.testing.assert_close(x0, golden_training["x0"], atol=ATOL, rtol=0)


def test_sampled_posterior_packs_like_reference(vae, golden_training):
    mean, logvar = golden_training["vae_posterior_mean"], golden_training["vae_posterior_logvar"]
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * golden_training["vae_sample_eps"]
    torch.testing.assert_close(pack_latents(z, vae), golden_training["x0_sampled"], atol=ATOL, rtol=0)


def test_tokens_decode_like_reference(vae, golden_training):
    with torch.no_grad():
        decoded = decode_tokens(vae, golden_training["x0"], (4, 4))
    torch.testing.assert_close(decoded, golden_training["decoded_from_x0"], atol=ATOL, rtol=0)


def test_training_target_and_loss_match_reference(golden_training):
    g = golden_training
    x0, noise, sigmas = g["x0"], g["noise"], g["sigmas"]
    assert torch.equal(noisy_latents(x0, noise, sigmas), g["noisy_input"])
    assert torch.equal(velocity_target(x0, noise), g["velocity_target"])
    model = LensTransformer2DModel.from_pretrained(GOLDEN / "transformer")
    with torch.no_grad():
        pred = model(g["noisy_input"], [g[f"text_embeds_{i}"] for i in range(3)], g["text_mask"], sigmas, [(1, 4, 4)]).sample
    torch.testing.assert_close(pred, g["model_pred"], atol=ATOL, rtol=0)
    per_sample = (pred - g["velocity_target"]).square().mean(dim=(1, 2))
    torch.testing.assert_close(per_sample, g["loss_per_sample"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("size", [(16, 16), (48, 80), (80, 32)])
def test_pack_unpack_round_trip_any_size(vae, size):
    h, w = size
    z = torch.randn(2, 8, h // 8, w // 8)
    assert torch.equal(unpatchify(patchify(z)), z)
    tokens = pack_latents(z, vae)
    assert tokens.shape == (2, (h // 16) * (w // 16), 32)
    torch.testing.assert_close(unpack_latents(tokens, (h // 16, w // 16), vae), z, atol=1e-5, rtol=1e-5)


def test_patch_channel_order():
    z = torch.randn(1, 8, 4, 6)
    # channel c*4 + 2*dy + dx of patch (row, col) is latent pixel (2*row + dy, 2*col + dx)
    assert patchify(z)[0, 3 * 4 + 2 * 1 + 0, 0, 1] == z[0, 3, 1, 2]


def test_sizes_not_divisible_by_16_are_refused(vae):
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_pixels(vae, torch.zeros(1, 3, 40, 64))


def test_empirical_mu_matches_reference_values(golden_pipeline):
    for call in golden_pipeline.meta["calls"]:
        mu = compute_empirical_mu(call["image_seq_len"], call["call_args"]["num_inference_steps"])
        assert mu == pytest.approx(call["mu"], abs=1e-12)
    assert compute_empirical_mu(4096, 20) == pytest.approx(2.198, abs=1e-3)  # fact sheet §6 table
    assert compute_empirical_mu(90 * 90, 20) == pytest.approx(1.828, abs=1e-3)
