"""Image, field and segmentation metrics: the paper's (§4, Table 1, Fig. 5) and ours.

The paper's, for a predicted image F~ = phi o M against the fixed image F:

* :func:`mse` over the whole volume and :func:`masked_mse` within a lung region: the lung mask
  dilated by 10 mm in every direction (:func:`lung_region_mask`).
* :func:`ms_ssim`, multi-scale structural similarity (Wang et al. 2003), in 3D through MONAI.
* :func:`folded_voxels`, the number of voxels where det(I + grad u) <= 0 (space folds).
* :func:`dice` and :func:`dice_per_bucket` on label maps grouped into buckets (the paper's ten come
  from the simulator's label table, ``breathcast.sim.anatomy``; they are passed in, never hard-coded here).

Ours, possible because the simulator knows the true fields: :func:`endpoint_error_mm` of a predicted
field against the true one, and :func:`target_error_mm`, the distance between the centroids
(:func:`centroid_mm`) of a predicted and a true target mask.

Conventions: images are (Z, Y, X) floats in [0, 1]; label maps (Z, Y, X) ints; masks (Z, Y, X) bool;
fields (3, Z, Y, X) in voxels, components (dz, dy, dx); a :class:`~breathcast.geometry.Grid` gives
the spacing when a metric is in mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.warp import count_folds

__all__ = [
    "WANG_MS_SSIM_WEIGHTS",
    "mse",
    "masked_mse",
    "lung_region_mask",
    "ms_ssim_scales",
    "ms_ssim",
    "folded_voxels",
    "dice",
    "dice_per_bucket",
    "endpoint_error_mm",
    "centroid_mm",
    "target_error_mm",
    "target_motion_error_mm",
]

WANG_MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of MS-SSIM, finest first (Wang, Simoncelli, Bovik 2003; MONAI's default)."""


def _same_shape(a: np.ndarray, b: np.ndarray, what: str = "arrays") -> None:
    if a.shape != b.shape:
        raise BreathcastError(f"{what} must have the same shape, got {a.shape} and {b.shape}")


def _volume(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise BreathcastError(f"{name} must be a (Z, Y, X) volume, got shape {a.shape}")
    return a


def _mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise BreathcastError(f"{name} must have shape {tuple(shape)}, got {mask.shape}")
    return mask.astype(bool, copy=False)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference over every voxel (float64 accumulation).

    Args:
        a: (Z, Y, X) image, e.g. the prediction in [0, 1].
        b: (Z, Y, X) image, e.g. the fixed image in [0, 1].

    Returns:
        mean((a - b)^2), in squared image units.

    Example:
        >>> mse(np.zeros((1, 2, 2)), np.array([[[0.0, 1.0], [0.0, 1.0]]]))
        0.5
    """
    a, b = np.asarray(a), np.asarray(b)
    _same_shape(a, b, "images")
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def masked_mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared difference over the voxels where ``mask`` is true (the paper's "Masked MSE").

    Args:
        a: (Z, Y, X) image.
        b: (Z, Y, X) image.
        mask: (Z, Y, X) bool, e.g. from :func:`lung_region_mask`; must select at least one voxel.

    Returns:
        mean((a - b)^2 over the mask), in squared image units.
    """
    a, b = np.asarray(a), np.asarray(b)
    _same_shape(a, b, "images")
    mask = _mask(mask, a.shape)
    if not mask.any():
        raise BreathcastError("mask selects no voxels; masked MSE needs at least one")
    diff = a[mask].astype(np.float64) - b[mask].astype(np.float64)
    return float(np.mean(diff**2))


def lung_region_mask(lung_mask: np.ndarray, grid: Grid, margin_mm: float = 10.0) -> np.ndarray:
    """The lung mask dilated by ``margin_mm`` in every direction, as the paper's masked MSE (§4).

    A voxel belongs to the region when the Euclidean distance in mm (anisotropic spacing honoured
    exactly, ``scipy.ndimage.distance_transform_edt`` with ``sampling = grid.spacing_zyx``) from its
    centre to the nearest lung voxel centre is at most ``margin_mm``.

    Args:
        lung_mask: (Z, Y, X) bool (or 0/1) lung segmentation.
        grid: the grid of the mask (for the spacing).
        margin_mm: dilation radius, mm (>= 0).

    Returns:
        (Z, Y, X) bool region; all false when the lung mask is empty.

    Example:
        >>> m = np.zeros((1, 1, 7), bool); m[0, 0, 3] = True
        >>> lung_region_mask(m, Grid((1, 1, 7), spacing=(1.0, 1.0, 1.0)), margin_mm=2.0).astype(int).tolist()
        [[[0, 1, 1, 1, 1, 1, 0]]]
    """
    lung = _mask(lung_mask, grid.shape, "lung mask")
    margin = float(margin_mm)
    if not np.isfinite(margin) or margin < 0:
        raise BreathcastError(f"margin_mm must be a finite number >= 0, got {margin_mm}")
    if not lung.any():
        return np.zeros(grid.shape, dtype=bool)
    distance_mm = ndimage.distance_transform_edt(~lung, sampling=grid.spacing_zyx)
    # A relative epsilon keeps voxels at exactly margin_mm (e.g. 2 slices of 5 mm from 10 mm) inside.
    return distance_mm <= margin * (1.0 + 1e-9)


def ms_ssim_scales(shape: Sequence[int], kernel_size: int = 7, max_scales: int = 5) -> int:
    """Number of MS-SSIM scales that fit a volume of ``shape``.

    The rule: the largest n <= ``max_scales`` such that

    * the coarsest scale, ``floor(size / 2^(n - 1))`` voxels along every axis, holds one kernel, and
    * MONAI's own check passes (``size // max(1, n - 1)^2 > kernel_size - 1``; it is stricter at n = 4).

    64^3 with kernel 7 gives 4 scales (11 gives 3); 32^3 with 7 gives 3; 16^3 with 7 gives 2.

    Args:
        shape: (Z, Y, X) volume size.
        kernel_size: Gaussian window, voxels (odd, >= 3).
        max_scales: at most this many (Wang et al. use 5).

    Returns:
        n >= 1; raises :class:`BreathcastError` when even one scale does not fit.

    Example:
        >>> ms_ssim_scales((64, 64, 64)), ms_ssim_scales((64, 64, 64), kernel_size=11)
        (4, 3)
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise BreathcastError(f"MS-SSIM kernel_size must be odd and >= 3, got {kernel_size}")
    if not 1 <= max_scales <= len(WANG_MS_SSIM_WEIGHTS):
        raise BreathcastError(f"max_scales must be in 1..{len(WANG_MS_SSIM_WEIGHTS)}, got {max_scales}")
    smallest = min(int(s) for s in shape)
    for n in range(max_scales, 0, -1):
        if smallest // 2 ** (n - 1) >= kernel_size and smallest // max(1, n - 1) ** 2 > kernel_size - 1:
            return n
    raise BreathcastError(
        f"volume {tuple(shape)} is too small for MS-SSIM with kernel_size {kernel_size}; "
        f"every axis needs at least {kernel_size} voxels"
    )


def ms_ssim(
    a: np.ndarray,
    b: np.ndarray,
    kernel_size: int = 7,
    kernel_sigma: float = 1.5,
    scales: int | None = None,
    data_range: float = 1.0,
) -> float:
    """3D multi-scale SSIM (Wang et al. 2003) through MONAI's ``compute_ms_ssim``.

    The standard 5 scales with an 11-voxel window need 176 voxels per axis; model grids are 64^3. So
    the number of scales n comes from :func:`ms_ssim_scales` (4 at 64^3 with the default 7-voxel
    Gaussian window, sigma 1.5 voxels) and the exponents are the first n of Wang's weights,
    renormalised to sum 1 (so a single scale is plain SSIM). Scores are comparable only between runs
    with the same shape, kernel and scales: report them with the score.

    Args:
        a: (Z, Y, X) image, e.g. the prediction in [0, 1].
        b: (Z, Y, X) reference image of the same shape, in [0, 1].
        kernel_size: Gaussian window, voxels (odd).
        kernel_sigma: its standard deviation, voxels.
        scales: number of scales; None picks the largest that fits (:func:`ms_ssim_scales`).
        data_range: image value range (1 for [0, 1] images).

    Returns:
        MS-SSIM in [0, 1]; 1 for identical images.
    """
    # torch and MONAI are imported here so that importing the metrics stays light.
    import torch
    from monai.metrics.regression import compute_ms_ssim

    a, b = _volume(a, "image a"), _volume(b, "image b")
    _same_shape(a, b, "images")
    fitting = ms_ssim_scales(a.shape, kernel_size)
    if scales is None:
        scales = fitting
    elif not 1 <= scales <= fitting:
        raise BreathcastError(
            f"{a.shape} with kernel_size {kernel_size} fits 1..{fitting} MS-SSIM scales, got scales={scales}"
        )
    weights = np.asarray(WANG_MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    weights = tuple(float(w) for w in weights / weights.sum())
    ta = torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    tb = torch.as_tensor(np.ascontiguousarray(b, dtype=np.float32))[None, None]
    with torch.no_grad():
        value = compute_ms_ssim(
            ta,
            tb,
            spatial_dims=3,
            data_range=data_range,
            kernel_size=kernel_size,
            kernel_sigma=kernel_sigma,
            weights=weights,
        )
    return float(value.reshape(-1)[0])


def folded_voxels(u: np.ndarray) -> int:
    """Number of voxels where the displacement folds space: det(I + grad u) <= 0 (Table 1's |J| < 0).

    Args:
        u: (3, Z, Y, X) displacement, voxels, components (dz, dy, dx).

    Returns:
        The count (0 for a diffeomorphic field).
    """
    u = np.asarray(u)
    if u.ndim != 4 or u.shape[0] != 3:
        raise BreathcastError(f"displacement must have shape (3, Z, Y, X), got {u.shape}")
    return int(count_folds(u))


def dice(a_mask: np.ndarray, b_mask: np.ndarray) -> float:
    """Dice overlap 2 |A n B| / (|A| + |B|) of two masks of the same shape.

    Args:
        a_mask: bool (or 0/1) mask, any shape.
        b_mask: bool mask of the same shape.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty (nothing to compare).

    Example:
        >>> dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool))
        0.5
    """
    a, b = np.asarray(a_mask).astype(bool), np.asarray(b_mask).astype(bool)
    _same_shape(a, b, "masks")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice_per_bucket(
    labels_a: np.ndarray, labels_b: np.ndarray, buckets: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """Dice per group of labels, as the paper's Fig. 5 (its ten buckets: ``breathcast.sim.anatomy``).

    Args:
        labels_a: (Z, Y, X) int label map, e.g. the labels warped with the predicted field.
        labels_b: (Z, Y, X) int label map, e.g. the true labels of the fixed scan.
        buckets: bucket name -> the label ids it joins.

    Returns:
        bucket name -> Dice of the union of its labels, NaN where the bucket is empty in both maps.

    Example:
        >>> a = np.array([[[1, 1, 2, 0]]]); b = np.array([[[1, 2, 2, 0]]])
        >>> dice_per_bucket(a, b, {"one": [1], "one-or-two": [1, 2], "none": [7]})
        {'one': 0.6666666666666666, 'one-or-two': 1.0, 'none': nan}
    """
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    _same_shape(a, b, "label maps")
    result: dict[str, float] = {}
    for name, ids in buckets.items():
        ids = np.asarray(list(ids), dtype=a.dtype if np.issubdtype(a.dtype, np.integer) else np.int64)
        result[name] = dice(np.isin(a, ids), np.isin(b, ids))
    return result


def endpoint_error_mm(
    u_pred: np.ndarray, u_true: np.ndarray, grid: Grid, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Length of the difference between two displacement fields, mm, summarised over voxels.

    Each voxel-unit component (dz, dy, dx) is scaled by the spacing of its axis (``grid.spacing_zyx``)
    before the Euclidean norm; the direction cosines do not change a length.

    Args:
        u_pred: (3, Z, Y, X) predicted displacement, voxels, (dz, dy, dx).
        u_true: (3, Z, Y, X) true displacement, same units.
        grid: the grid both fields live on.
        mask: optional (Z, Y, X) bool; only its voxels count (at least one).

    Returns:
        {"mean", "median", "p95", "max"} of |u_pred - u_true| in mm.
    """
    u_pred, u_true = np.asarray(u_pred), np.asarray(u_true)
    expected = (3, *grid.shape)
    for name, u in (("u_pred", u_pred), ("u_true", u_true)):
        if u.shape != expected:
            raise BreathcastError(f"{name} must have shape {expected}, got {u.shape}")
    spacing = np.asarray(grid.spacing_zyx, dtype=np.float64)[:, None, None, None]
    diff_mm = (u_pred.astype(np.float64) - u_true.astype(np.float64)) * spacing
    error = np.sqrt(np.sum(diff_mm**2, axis=0))
    if mask is not None:
        mask = _mask(mask, grid.shape)
        if not mask.any():
            raise BreathcastError("mask selects no voxels; endpoint error needs at least one")
        error = error[mask]
    error = error.ravel()
    return {
        "mean": float(np.mean(error)),
        "median": float(np.median(error)),
        "p95": float(np.percentile(error, 95)),
        "max": float(np.max(error)),
    }


def target_motion_error_mm(u_pred: np.ndarray, u_true: np.ndarray, target: np.ndarray, grid: Grid) -> float:
    """Error of the predicted target position, from the fields: |mean over the target of (u_pred - u_true)|, mm.

    With pull-back fields on the fixed grid, the mean displacement over the target mask (in the fixed frame)
    is where the target's centroid comes from in the moving frame, so this is the distance between the
    predicted and the true target centroid. Unlike :func:`target_error_mm` on warped label maps, it has no
    label quantization: on a 64³ grid a 15-voxel tumour's label centroid jitters by millimetres between scans.

    Args:
        u_pred, u_true: (3, Z, Y, X) displacement, voxels, (dz, dy, dx).
        target: (Z, Y, X) bool target mask in the fixed frame, at least one voxel.
        grid: the grid of the fields.

    Example:
        >>> g = Grid((2, 2, 2), spacing=(1.0, 1.0, 2.5)); t = np.ones((2, 2, 2), bool)
        >>> u = np.zeros((3, 2, 2, 2)); u[0] = 2.0  # two slices off along z
        >>> target_motion_error_mm(u, np.zeros_like(u), t, g)
        5.0
    """
    target = _mask(target, grid.shape, "target")
    if not target.any():
        raise BreathcastError("target mask selects no voxels")
    spacing = np.asarray(grid.spacing_zyx, dtype=np.float64)
    mean_difference = (np.asarray(u_pred, np.float64)[:, target] - np.asarray(u_true, np.float64)[:, target]).mean(axis=1)
    return float(np.linalg.norm(mean_difference * spacing))


def centroid_mm(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Centre of mass of a mask in patient space.

    Args:
        mask: (Z, Y, X) bool, at least one voxel set.
        grid: the mask's grid (spacing, origin, direction).

    Returns:
        (3,) float64 LPS (x, y, z) position, mm.

    Example:
        >>> m = np.zeros((3, 3, 3), bool); m[1:, 1, 1] = True
        >>> centroid_mm(m, Grid((3, 3, 3), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 10.0))).tolist()
        [1.0, 1.0, 13.0]
    """
    mask = _mask(mask, grid.shape)
    if not mask.any():
        raise BreathcastError("mask selects no voxels; a centroid needs at least one")
    index_zyx = np.argwhere(mask).mean(axis=0)
    return grid.index_to_lps(index_zyx)


def target_error_mm(mask_pred: np.ndarray, mask_true: np.ndarray, grid: Grid) -> float:
    """Distance between the centroids of a predicted and a true target mask, mm.

    Args:
        mask_pred: (Z, Y, X) bool predicted target (e.g. the planning target warped by the prediction).
        mask_true: (Z, Y, X) bool true target, same grid.
        grid: the grid of both masks.

    Returns:
        |centroid_mm(mask_pred) - centroid_mm(mask_true)|, mm.
    """
    return float(np.linalg.norm(centroid_mm(mask_pred, grid) - centroid_mm(mask_true, grid)))
