"""The cVAE loss (paper §2): ||F - φ∘M||² + KL, with an optional smoothness term on the velocity.

Image terms are means over voxels (images in [0, 1]); KL is summed over latent dimensions and averaged over
the batch. ``multiscale`` adds the same squared error on 2x and 4x average-pooled images (equal weights), which
widens the capture range of the image gradient beyond a voxel; with ``multiscale=False`` the loss is exactly
the paper's. An image weight (the field-of-view margin, an adapted patient's lungs) makes every scale a
weighted mean. On simulated patients ``field`` > 0 adds the mean squared end-point error of the predicted
displacement against the true one (:func:`field_loss`): the image term barely constrains motion inside the
low-texture lungs (their front-back motion least), the simulator's truth does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossWeights", "LossTerms", "image_loss", "kl_divergence", "smoothness", "field_loss", "cvae_loss"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Args:
        kl: weight of the KL divergence of q(z | M, F) from N(0, I).
        smooth: weight of the mean squared spatial gradient of the velocity (voxels per voxel).
        multiscale: add 2x and 4x pooled image errors to the full-resolution one.
        fov_margin_mm: fixed-image slices within this of where the scans' field of view ends along z get no
            image loss (0: every slice counts). Tissue that moved in from beyond a cut is not in the moving
            scan, so matching images there would teach the network to stop the motion at the cut; 25 mm is
            more than the largest motion at the diaphragm (21 mm).
        field: weight of :func:`field_loss` against the simulator's true pair field (0: none, the paper's loss;
            training then needs every patient's true fields).
    """

    kl: float = 1e-4
    smooth: float = 0.01
    multiscale: bool = True
    fov_margin_mm: float = 25.0
    field: float = 0.0


@dataclass
class LossTerms:
    total: torch.Tensor
    image: torch.Tensor
    kl: torch.Tensor
    smooth: torch.Tensor
    field: torch.Tensor


def image_loss(warped: torch.Tensor, fixed: torch.Tensor, multiscale: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the warped moving image and the fixed image, (N, 1, D, D, D) each;
    with ``weight`` (broadcastable to them) the weighted mean at every scale."""
    factors = (1, 2, 4) if multiscale else (1,)
    if weight is None:
        loss = F.mse_loss(warped, fixed)
        for factor in factors[1:]:
            loss = loss + F.mse_loss(F.avg_pool3d(warped, factor), F.avg_pool3d(fixed, factor))
        return loss
    weight = weight.expand_as(fixed)
    loss = torch.zeros((), dtype=warped.dtype, device=warped.device)
    for factor in factors:
        w, a, b = (F.avg_pool3d(t, factor) if factor > 1 else t for t in (weight, warped, fixed))
        loss = loss + (w * (a - b) ** 2).sum() / w.sum().clamp_min(1e-12)
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


def field_loss(displacement: torch.Tensor, true_field: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of the squared end-point error |u - u_true|², both (N, 3, D, D, D) model-grid voxels."""
    return (displacement - true_field).pow(2).sum(dim=1).mean()


def cvae_loss(
    output, fixed: torch.Tensor, weights: LossWeights, slice_weight: torch.Tensor | None = None,
    true_field: torch.Tensor | None = None,
) -> LossTerms:
    """All terms for a :class:`~breathcast.training.cvae.CVAEOutput` against the fixed image; ``slice_weight``
    (N, D) weighs the image terms per slice (the field-of-view margin, :func:`~breathcast.training.data.field_of_view_weight`);
    ``true_field`` (N, 3, D, D, D) voxels is the pairs' true field, needed when ``weights.field`` > 0."""
    weight = None if slice_weight is None else slice_weight[:, None, :, None, None]
    image = image_loss(output.warped, fixed, weights.multiscale, weight)
    kl = kl_divergence(output.mu, output.logvar)
    smooth = smoothness(output.velocity)
    total = image + weights.kl * kl + weights.smooth * smooth
    field = torch.zeros((), dtype=image.dtype, device=image.device)
    if weights.field > 0:
        if true_field is None:
            raise ValueError("the field loss needs the pairs' true fields")
        field = field_loss(output.displacement, true_field)
        total = total + weights.field * field
    return LossTerms(total, image, kl, smooth, field)
