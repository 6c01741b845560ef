"""The cVAE loss (paper §2): ||F - φ∘M||² + KL, with an optional smoothness term on the velocity.

Image terms are means over voxels (images in [0, 1]); KL is summed over latent dimensions and averaged over
the batch. ``multiscale`` adds the same squared error on 2x and 4x average-pooled images (equal weights), which
widens the capture range of the image gradient beyond a voxel; with ``multiscale=False`` the loss is exactly
the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossWeights", "LossTerms", "image_loss", "kl_divergence", "smoothness", "cvae_loss"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Args:
        kl: weight of the KL divergence of q(z | M, F) from N(0, I).
        smooth: weight of the mean squared spatial gradient of the velocity (voxels per voxel).
        multiscale: add 2x and 4x pooled image errors to the full-resolution one.
    """

    kl: float = 1e-4
    smooth: float = 0.01
    multiscale: bool = True


@dataclass
class LossTerms:
    total: torch.Tensor
    image: torch.Tensor
    kl: torch.Tensor
    smooth: torch.Tensor


def image_loss(warped: torch.Tensor, fixed: torch.Tensor, multiscale: bool = True) -> torch.Tensor:
    """Mean squared error between the warped moving image and the fixed image, (N, 1, D, D, D) each."""
    loss = F.mse_loss(warped, fixed)
    if multiscale:
        for factor in (2, 4):
            loss = loss + F.mse_loss(F.avg_pool3d(warped, factor), F.avg_pool3d(fixed, factor))
    return loss


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, mean over the batch."""
    return (-0.5 * torch.sum(1.0 + logvar - mu**2 - logvar.exp(), dim=1)).mean()


def smoothness(velocity: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of the velocity (N, 3, Z, Y, X) along each spatial axis."""
    dz = velocity[:, :, 1:] - velocity[:, :, :-1]
    dy = velocity[:, :, :, 1:] - velocity[:, :, :, :-1]
    dx = velocity[..., 1:] - velocity[..., :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def cvae_loss(output, fixed: torch.Tensor, weights: LossWeights) -> LossTerms:
    """All terms for a :class:`~breathcast.training.cvae.CVAEOutput` against the fixed image."""
    image = image_loss(output.warped, fixed, weights.multiscale)
    kl = kl_divergence(output.mu, output.logvar)
    smooth = smoothness(output.velocity)
    return LossTerms(image + weights.kl * kl + weights.smooth * smooth, image, kl, smooth)
