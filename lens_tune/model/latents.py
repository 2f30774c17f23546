"""Images <-> the packed, BatchNorm-normalised latent tokens the Lens transformer works on.

The FLUX.2 VAE (diffusers' `AutoencoderKLFlux2`) encodes RGB in [-1, 1] to c channels at 1/8 size. Lens then
patchifies 2x2 (channel index c*4 + 2*dy + dx), normalises with the VAE's BatchNorm running statistics, and lays
the grid out as tokens (token index row*w + col). One image pixel grid of H x W gives (H/16) * (W/16) tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lens_tune.model import loading

VAE_SCALE_FACTOR = 16  # pixels per token side: 8 (VAE) x 2 (patch)


def load_vae(source: str | Path, subfolder: str | None = None, revision: str | None = None, device="cpu"):
    """The FLUX.2 VAE from a diffusers-layout folder or Hub repo, checked strictly (see lens_tune.model.loading).

    Always float32: the VAE is small and its config asks for upcasting.
    """
    from diffusers import AutoencoderKLFlux2

    folder = loading.resolve_folder(source, subfolder, revision)
    model = loading.build_on_meta(AutoencoderKLFlux2, loading.read_config(folder), str(folder))
    state_dict = loading.read_safetensors(loading.safetensors_files(folder), device)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return loading.load_weights_into(model, state_dict, str(folder), "Is config.json from the same VAE as the weights?")


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, c, 2h, 2w) -> (B, 4c, h, w), channel c*4 + 2*dy + dx."""
    b, c, hh, ww = z.shape
    return z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, hh // 2, ww // 2)


def unpatchify(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c4, h, w = p.shape
    return p.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def bn_statistics(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [4c] of the VAE's BatchNorm over patchified latents: std = sqrt(running_var + eps)."""
    mean = vae.bn.running_mean
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    return mean, std


def pack_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents (B, c, 2h, 2w) -> normalised tokens (B, h*w, 4c)."""
    mean, std = bn_statistics(vae)
    p = patchify(z)
    p = (p - mean.to(p)[None, :, None, None]) / std.to(p)[None, :, None, None]
    return p.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, grid_hw: tuple[int, int], vae) -> torch.Tensor:
    """Normalised tokens (B, h*w, 4c) -> VAE latents (B, c, 2h, 2w)."""
    h, w = grid_hw
    mean, std = bn_statistics(vae)
    p = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    p = p * std.to(p)[None, :, None, None] + mean.to(p)[None, :, None, None]
    return unpatchify(p)


def check_image_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % VAE_SCALE_FACTOR or width % VAE_SCALE_FACTOR:
        raise ValueError(
            f"Image size {width}x{height} (width x height) must be positive multiples of {VAE_SCALE_FACTOR}, "
            f"e.g. {max(VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR * VAE_SCALE_FACTOR)}x"
            f"{max(VAE_SCALE_FACTOR, height // VAE_SCALE_FACTOR * VAE_SCALE_FACTOR)}."
        )


def pixels_from_image(image: Image.Image) -> torch.Tensor:
    """A PIL image -> float32 (1, 3, H, W) in [-1, 1]."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255 * 2 - 1


def encode_pixels(vae, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False):
    """Pixels (B, 3, H, W) in [-1, 1] -> tokens (B, H/16 * W/16, 4c).

    `sample=False` takes the posterior mean (deterministic: what a latent cache stores); `sample=True` draws
    from the posterior with `generator`.
    """
    check_image_size(pixels.shape[-2], pixels.shape[-1])
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = posterior.sample(generator) if sample else posterior.mode()
    return pack_latents(z, vae)


def decode_tokens(vae, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, h*w, 4c) -> the VAE decoder's raw output (B, 3, 16h, 16w), not clamped."""
    z = unpack_latents(tokens.to(vae.dtype), grid_hw, vae)
    return vae.decode(z).sample


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoder output (B, 3, H, W) -> PIL images (clamped to [-1, 1], rounded down to uint8 as the reference)."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()
    return [Image.fromarray(a) for a in array]
