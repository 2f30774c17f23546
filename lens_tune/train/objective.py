"""The training objective: rectified flow with Lens's conventions (golden `training/` pins them).

x_sigma = (1 - sigma) x0 + sigma noise, the model gets timestep input sigma and predicts the velocity noise - x0.

How sigma is drawn matters more than anything else here. Lens samples at inference with a shift that grows with the
image size (the scheduler's `compute_empirical_mu`), which spends most steps at high noise for large images. Training
should see the noise levels sampling will visit, so the default is a logit-normal sigma (most mass in the middle,
where learning is most effective) shifted by a factor that also grows with the number of image tokens: exp(mu) with
mu linear from 0.5 at 256 tokens to 1.15 at 4096 (FLUX's dynamic shift; 1.65x at 256 px, 3.16x at 1024 px).
`compute_empirical_mu` itself must not be used for training: it is a fit for 10-200 sampling steps, and asked for a
1000-step schedule it extrapolates to mu = -3.5 at 1024 px, a schedule that almost never shows the model high noise.
"""

from __future__ import annotations

import math

import torch

from lens_tune.model.flow_matching import noisy_latents, velocity_target

SHIFT_MU = ((256, 0.5), (4096, 1.15))  # (image tokens, mu): FLUX's base and max shift


def dynamic_shift(image_tokens: int) -> float:
    """exp(mu), mu linear in the token count through SHIFT_MU (extrapolated outside it)."""
    (n0, mu0), (n1, mu1) = SHIFT_MU
    return math.exp(mu0 + (mu1 - mu0) * (image_tokens - n0) / (n1 - n0))


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The exponential time shift the Lens scheduler uses, with shift = exp(mu): larger shift, more noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(settings, batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample sigmas in (0, 1) for `TrainSettings` (timestep_sampling, logit_mean, logit_std, shift)."""
    if settings.timestep_sampling == "logit-normal":
        sigma = torch.sigmoid(settings.logit_mean + settings.logit_std * torch.randn(batch, generator=generator))
    else:
        sigma = torch.rand(batch, generator=generator)
    if settings.timestep_sampling == "uniform":
        return sigma
    shift = dynamic_shift(image_tokens) if settings.shift == "auto" else float(settings.shift)
    return shift_sigmas(sigma, shift)


def flow_matching_loss(
    model, latents: torch.Tensor, text: list[torch.Tensor], text_mask: torch.Tensor | None, grid: tuple[int, int],
    weights: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
) -> torch.Tensor:
    """Weighted mean over the batch of each sample's mean squared velocity error."""
    target = velocity_target(latents, noise)
    model_input = noisy_latents(latents, noise, sigma)
    prediction = model(
        hidden_states=model_input.to(latents.dtype),
        encoder_hidden_states=text,
        encoder_hidden_states_mask=text_mask,
        timestep=sigma.to(latents.dtype),
        img_shapes=[(1, *grid)],
    ).sample
    per_sample = (prediction.float() - target.float()).square().mean(dim=(1, 2))
    return (per_sample * weights).mean()
