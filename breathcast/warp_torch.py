"""Differentiable warp kernels (torch), for training: the twin of :mod:`breathcast.warp`.

Same conventions as the numba kernels, batched: images ``(N, C, Z, Y, X)``, fields ``(N, 3, Z, Y, X)`` with
components (dz, dy, dx) in voxels, pull-back ``warped(x) = image(x + u(x))``, border clamping. Sampling is
``torch.nn.functional.grid_sample(align_corners=True, padding_mode="border")``, which wants normalised
coordinates in (x, y, z) order; :func:`_sampling_grid` is the one place that converts.

The tests hold these functions equal to the numba ones (warp, nearest warp, scaling and squaring,
composition, Jacobian determinant) and gradcheck them in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from breathcast.errors import BreathcastError
from breathcast.warp import WarpMode

__all__ = ["WarpMode", "warp", "integrate_velocity", "compose", "jacobian_determinant"]

# The one translation from our modes to grid_sample's (trilinear is "bilinear" there).
_GRID_SAMPLE_MODE = {WarpMode.BILINEAR: "bilinear", WarpMode.NEAREST: "nearest"}


def _check_field(u: torch.Tensor, name: str) -> None:
    if u.ndim != 5 or u.shape[1] != 3:
        raise BreathcastError(
            f"{name} must have shape (N, 3, Z, Y, X) (components dz, dy, dx in voxels), got {tuple(u.shape)}"
        )
    if not u.is_floating_point():
        raise BreathcastError(f"{name} must be a floating-point tensor, got dtype {u.dtype}")


def _sampling_grid(u: torch.Tensor) -> torch.Tensor:
    """Voxel displacement (N, 3, Z, Y, X), (dz, dy, dx) -> grid_sample grid (N, Z, Y, X, 3), normalised (x, y, z).

    With ``align_corners=True`` index ``i`` of an axis of ``n`` voxels is ``2 i / (n - 1) - 1``; an axis of one
    voxel maps every position to -1 (grid_sample then reads its only voxel).
    """
    sizes = u.shape[2:]
    axes = [torch.arange(n, dtype=u.dtype, device=u.device) for n in sizes]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, Z, Y, X), (z, y, x)
    position = identity.unsqueeze(0) + u
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in sizes], dtype=u.dtype, device=u.device)
    normalised = position * scale.view(1, 3, 1, 1, 1) - 1.0
    return normalised.flip(1).permute(0, 2, 3, 4, 1)  # (z, y, x) components -> last axis (x, y, z)


def warp(image: torch.Tensor, u: torch.Tensor, mode: WarpMode | str = WarpMode.BILINEAR) -> torch.Tensor:
    """Pull-back warp ``warped(x) = image(x + u(x))``, border-clamped, differentiable in image and u.

    Args:
        image: (N, C, Z, Y, X), floating point (label maps as float, with mode "nearest").
        u: (N, 3, Z, Y, X) displacement, voxels, components (dz, dy, dx); same spatial size as ``image``.
        mode: :class:`~breathcast.warp.WarpMode` or its value: "bilinear" (trilinear) or "nearest".

    Returns:
        (N, C, Z, Y, X), dtype of ``image``.

    Example:
        >>> image = torch.arange(4.0).view(1, 1, 1, 1, 4)
        >>> u = torch.zeros(1, 3, 1, 1, 4); u[:, 2] = 0.5
        >>> [round(value, 4) for value in warp(image, u).flatten().tolist()]
        [0.5, 1.5, 2.5, 3.0]
    """
    _check_field(u, "displacement u")
    if image.ndim != 5 or image.shape[0] != u.shape[0] or image.shape[2:] != u.shape[2:]:
        raise BreathcastError(
            f"image must have shape (N, C, Z, Y, X) = ({u.shape[0]}, C, {', '.join(map(str, u.shape[2:]))}) "
            f"to match the displacement, got {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise BreathcastError(
            f"image must be floating-point, got {image.dtype}; warp label maps as .float() with mode='nearest'"
        )
    try:
        sample_mode = _GRID_SAMPLE_MODE[WarpMode(mode)]
    except ValueError:
        raise BreathcastError(f"unknown warp mode {mode!r}; use one of {[m.value for m in WarpMode]}") from None
    grid = _sampling_grid(u.to(image.dtype))
    return F.grid_sample(image, grid, mode=sample_mode, padding_mode="border", align_corners=True)


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring (paper §2): ``u = v / 2**steps``, then ``steps`` times ``u = u + u ∘ (id + u)``.

    Args:
        v: (N, 3, Z, Y, X) stationary velocity, voxels, (dz, dy, dx).
        steps: number of squarings (>= 0); 0 returns ``v``.

    Returns:
        (N, 3, Z, Y, X) displacement, voxels.
    """
    _check_field(v, "velocity v")
    if int(steps) != steps or steps < 0:
        raise BreathcastError(f"steps must be a non-negative integer, got {steps!r}")
    u = v / 2**steps
    for _ in range(int(steps)):
        u = u + warp(u, u)
    return u


def compose(u_first: torch.Tensor, u_second: torch.Tensor) -> torch.Tensor:
    """Displacement of warping by ``u_first`` then ``u_second``: ``u_second + u_first ∘ (id + u_second)``.

    Args:
        u_first: (N, 3, Z, Y, X) displacement applied first, voxels.
        u_second: (N, 3, Z, Y, X) displacement applied second, voxels.

    Returns:
        (N, 3, Z, Y, X) displacement, voxels.
    """
    _check_field(u_first, "u_first")
    _check_field(u_second, "u_second")
    return u_second + warp(u_first, u_second)


def _gradient(f: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy.gradient (edge_order=1, unit spacing) along ``dim``; zero along an axis of size 1."""
    if f.shape[dim] < 2:
        return torch.zeros_like(f)
    return torch.gradient(f, dim=dim, edge_order=1)[0]


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) of φ(x) = x + u(x), same finite differences as :func:`breathcast.warp.jacobian_determinant`.

    Args:
        u: (N, 3, Z, Y, X) displacement, voxels, (dz, dy, dx).

    Returns:
        (N, Z, Y, X); <= 0 where the mapping folds.
    """
    _check_field(u, "displacement u")
    # J[..., i, j] = delta_ij + d u_i / d x_j, rows and columns in (z, y, x) order
    grads = torch.stack([_gradient(u, dim) for dim in (2, 3, 4)], dim=-1)  # (N, 3, Z, Y, X, 3)
    jac = grads.permute(0, 2, 3, 4, 1, 5) + torch.eye(3, dtype=u.dtype, device=u.device)
    return torch.linalg.det(jac)
