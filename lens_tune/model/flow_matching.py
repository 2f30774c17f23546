"""Rectified-flow pieces shared by sampling and training.

A clean latent x0 and noise e are joined as x_sigma = (1 - sigma) x0 + sigma e; the model predicts the velocity
v = e - x0 with timestep input sigma; sampling integrates x <- x + (sigma_next - sigma) v from sigma=1 to 0.
"""

from __future__ import annotations

import numpy as np
import torch

# compute_empirical_mu's two fitted lines (FLUX.2 Klein's constants): mu at 10 and at 200 sampling steps
_MU_10 = (8.73809524e-05, 1.89833333)
_MU_200 = (1.6927e-04, 0.45666666)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The reference sampler's time shift, fitted for 10..200 steps; linear in the step count between the fits.

    Do not call it with num_steps=1000 to shape a training distribution: that extrapolates far outside the fit.
    """
    a200, b200 = _MU_200
    if image_seq_len > 4300:
        return float(a200 * image_seq_len + b200)
    a10, b10 = _MU_10
    m200, m10 = a200 * image_seq_len + b200, a10 * image_seq_len + b10
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + (m200 - 200.0 * slope))


def inference_sigmas(num_steps: int) -> np.ndarray:
    """Unshifted sigmas 1 .. 1/N; the scheduler shifts them with mu and appends 0."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma broadcast per sample."""
    sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict: noise - x0."""
    return noise - x0


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, then rescale each token back to the conditional prediction's L2 norm."""
    combined = uncond + guidance_scale * (cond - uncond)
    cond_norm = cond.norm(dim=-1, keepdim=True)
    combined_norm = combined.norm(dim=-1, keepdim=True)
    scale = torch.where(combined_norm > 0, cond_norm / combined_norm.clamp_min(1e-12), torch.ones_like(combined_norm))
    return combined * scale
