"""Statistics of exhale -> inhale lung motion, the same for real landmarks and simulated fields.

What simulated motion must match on real lungs (issue 13, part 2): the mean displacement magnitude against the
normalised superior-inferior position in the lungs (0 = lung base, 1 = apex) and against the normalised
anterior-posterior position (0 = anterior, 1 = posterior: real lungs move most at the back), the direction ratios
mean |LR| : |AP| : |SI| and the signed means, the lungs' expansion (how the LR and AP components change across the
lungs: a slope that the landmarks' zero-mean localisation error does not bias, as it biases the mean |component|
shares), the lungs' front-to-back shift with height and distance from the midline (:func:`lung_shift`), how much
more the back of the lungs moves than their front at the same height (:func:`si_ap_gradient`, the height's share
fitted out), the fraction of points moving more than a threshold, and, over a population, each patient's mean
magnitude and its spread between patients.

Every sample is a set of points in the lungs with their end-exhale position q (x, y, z) mm, x left, y posterior,
z superior, and their exhale -> inhale displacement d (mm, same frame). The normalised position of a point is
``(q_z - z_lo) / (z_hi - z_lo)`` clipped to [0, 1], with z_lo, z_hi the 1st and 99th percentiles of the sample's own
exhale z (and the same for y): landmarks without images and simulated lungs are normalised the same way, by where
their points are.
:func:`landmark_statistics` takes :class:`~breathcast.io.landmarks.LandmarkPairs`; :func:`field_statistics` takes a
pull-back field on the exhale anatomy's grid and samples it in the lungs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.io.landmarks import LandmarkPairs

__all__ = [
    "N_BINS",
    "THRESHOLD_MM",
    "MotionStatistics",
    "PopulationStatistics",
    "motion_statistics",
    "landmark_statistics",
    "field_statistics",
    "population_statistics",
    "lung_shift",
    "lung_shift_design",
    "si_ap_gradient",
    "point_extent_mm",
]

N_BINS = 5
"""Bins of the normalised superior-inferior position, base (0) to apex (1)."""

THRESHOLD_MM = 10.0
"""Displacements above this count in :attr:`MotionStatistics.fraction_above`."""

_EXTENT_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class MotionStatistics:
    """One patient's (or one landmark set's) exhale -> inhale motion in the lungs.

    Args:
        name: the sample's name.
        n_points: points the statistics were computed on.
        mean_magnitude_mm: mean |d|.
        median_magnitude_mm: median |d|.
        p95_magnitude_mm: 95th percentile of |d|.
        threshold_mm: the threshold of ``fraction_above``.
        fraction_above: fraction of points with |d| > ``threshold_mm``.
        mean_abs_mm: (3,) mean |d_x|, |d_y|, |d_z| (LR, AP, SI), mm.
        component_ratio: (3,) ``mean_abs_mm / mean_abs_mm.sum()``: the LR : AP : SI shares, summing to 1.
        signed_mean_mm: (3,) mean d (x left, y posterior, z superior), mm; real inhale moves the lungs inferior
            (z < 0).
        z_extent_mm: (2,) the exhale z (mm) that maps to position 0 (base) and 1 (apex).
        bin_edges: (N_BINS + 1,) normalised positions bounding the bins, 0 (base) to 1 (apex).
        bin_counts: (N_BINS,) points per bin.
        bin_mean_magnitude_mm: (N_BINS,) mean |d| per bin, NaN in an empty bin.
        ap_bin_mean_magnitude_mm: (N_BINS,) mean |d| per bin of the normalised anterior-posterior position,
            anterior (0) to posterior (1), NaN in an empty bin.
        expansion: (2,) least-squares slope of d_x against the normalised left-right position and of d_y against
            the normalised anterior-posterior position (each 0 to 1 by its own 1st-99th percentiles), divided by
            the mean |d_z|: how far the lungs widen and deepen on inhale per unit SI motion (0: they translate).
        lung_shift: (3,) c, a, b of :func:`lung_shift`: posterior motion per mm of local SI motion, constant, per
            unit of normalised height and per unit of distance from the midline.
        si_ap_gradient: :func:`si_ap_gradient`: the SI motion's growth from the front of the lungs to their back at
            equal height, per mean |d_z|.
    """

    name: str
    n_points: int
    mean_magnitude_mm: float
    median_magnitude_mm: float
    p95_magnitude_mm: float
    threshold_mm: float
    fraction_above: float
    mean_abs_mm: np.ndarray
    component_ratio: np.ndarray
    signed_mean_mm: np.ndarray
    z_extent_mm: np.ndarray
    bin_edges: np.ndarray
    bin_counts: np.ndarray
    bin_mean_magnitude_mm: np.ndarray
    ap_bin_mean_magnitude_mm: np.ndarray
    expansion: np.ndarray
    lung_shift: np.ndarray
    si_ap_gradient: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: floats rounded to 0.01 mm (0.0001 for shares), arrays as lists, NaN as None."""
        out: dict[str, object] = {}
        for key, value in self.__dict__.items():
            digits = 4 if key in ("component_ratio", "fraction_above", "bin_edges") else 3
            if isinstance(value, np.ndarray):
                out[key] = [None if not np.isfinite(v) else round(float(v), digits) for v in value]
            elif isinstance(value, float):
                out[key] = round(value, digits)
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class PopulationStatistics:
    """What a population of samples shares and how much it varies.

    Args:
        names: the samples, in order.
        per_patient_mean_mm: (P,) each sample's mean |d|.
        mean_of_means_mm: mean of ``per_patient_mean_mm``.
        std_of_means_mm: standard deviation of ``per_patient_mean_mm`` between samples (ddof 0).
        range_of_means_mm: (2,) min and max of ``per_patient_mean_mm``.
        component_ratio: (3,) mean of the samples' LR : AP : SI shares.
        component_ratio_range: (2, 3) min and max of each share over the samples.
        bin_profile: (N_BINS,) mean over samples of each sample's bin magnitude divided by its own mean |d|
            (shape of the magnitude along base -> apex, amplitude removed); NaN in a bin empty in every sample.
        bin_profile_range: (2, N_BINS) min and max of that ratio over samples.
        bin_profile_sd: (N_BINS,) its standard deviation (ddof 0) over samples.
        ap_profile: (N_BINS,) the same along anterior (0) -> posterior (1).
        ap_profile_range: (2, N_BINS) its min and max over samples.
        expansion: (2,) mean over samples of the LR and AP expansion slopes (:class:`MotionStatistics`).
        expansion_range: (2, 2) their min and max over samples.
        lung_shift: (3,) mean over samples of :attr:`MotionStatistics.lung_shift` (c, a, b).
        lung_shift_range: (2, 3) its min and max over samples.
        fraction_above: mean over samples of the fraction above the threshold.
        fraction_above_range: (2,) its min and max.
        signed_ap_mm: (2,) mean and standard deviation (ddof 0) over samples of the signed mean AP motion
            (``signed_mean_mm[1]``; + = posterior on inhale), mm.
        si_ap_gradient: (2,) mean and standard deviation (ddof 0) over samples of
            :attr:`MotionStatistics.si_ap_gradient`.
    """

    names: tuple[str, ...]
    per_patient_mean_mm: np.ndarray
    mean_of_means_mm: float
    std_of_means_mm: float
    range_of_means_mm: np.ndarray
    component_ratio: np.ndarray
    component_ratio_range: np.ndarray
    bin_profile: np.ndarray
    bin_profile_range: np.ndarray
    bin_profile_sd: np.ndarray
    ap_profile: np.ndarray
    ap_profile_range: np.ndarray
    expansion: np.ndarray
    expansion_range: np.ndarray
    lung_shift: np.ndarray
    lung_shift_range: np.ndarray
    fraction_above: float
    fraction_above_range: np.ndarray
    signed_ap_mm: np.ndarray
    si_ap_gradient: np.ndarray

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, rounded to 0.001 (mm or share)."""
        out: dict[str, object] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, np.ndarray):
                out[key] = np.round(np.where(np.isfinite(value), value, np.nan), 3).tolist()
            elif isinstance(value, float):
                out[key] = round(value, 3)
            else:
                out[key] = list(value)
        return out


def motion_statistics(
    name: str,
    exhale_mm: np.ndarray,
    displacement_mm: np.ndarray,
    n_bins: int = N_BINS,
    threshold_mm: float = THRESHOLD_MM,
) -> MotionStatistics:
    """Statistics of exhale -> inhale displacements of points in the lungs.

    Args:
        name: the sample's name.
        exhale_mm: (N, 3) end-exhale positions (x, y, z) mm, y posterior, z superior (y and z are used: the
            normalised positions).
        displacement_mm: (N, 3) exhale -> inhale displacement of each point, (x, y, z) mm, same frame.
        n_bins: bins of the normalised position, base (0) to apex (1).
        threshold_mm: the threshold of ``fraction_above``.

    Returns:
        :class:`MotionStatistics`.

    Example:
        >>> q = np.array([[0.0, 0.0, z] for z in np.linspace(0.0, 100.0, 11)])
        >>> d = np.zeros_like(q); d[:, 2] = -np.linspace(20.0, 0.0, 11)  # base moves most, inferior
        >>> s = motion_statistics("toy", q, d, n_bins=2)
        >>> s.component_ratio.tolist(), float(s.signed_mean_mm[2]), s.bin_mean_magnitude_mm.round(1).tolist()
        ([0.0, 0.0, 1.0], -10.0, [16.0, 5.0])
    """
    q = np.asarray(exhale_mm, dtype=np.float64)
    d = np.asarray(displacement_mm, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 3 or q.shape != d.shape or len(q) < 2:
        raise BreathcastError(f"{name}: need two equal (N >= 2, 3) arrays of points, got {q.shape} and {d.shape}")
    if n_bins < 1:
        raise BreathcastError(f"{name}: need at least one position bin, got {n_bins}")
    magnitude = np.linalg.norm(d, axis=1)
    z_lo, z_hi = np.percentile(q[:, 2], _EXTENT_PERCENTILES)
    if z_hi <= z_lo:
        raise BreathcastError(f"{name}: the points have no superior-inferior extent (all at z = {z_lo:.1f} mm)")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts, per_bin = _binned_means((q[:, 2] - z_lo) / (z_hi - z_lo), magnitude, n_bins)
    position = _normalised_position(q)
    _, per_ap_bin = _binned_means(position[:, 1], magnitude, n_bins)
    mean_abs = np.abs(d).mean(axis=0)
    expansion = np.array([_slope(position[:, a], d[:, a]) for a in (0, 1)]) / max(mean_abs[2], 1e-9)
    total = mean_abs.sum()
    ratio = mean_abs / total if total > 0 else np.full(3, np.nan)
    return MotionStatistics(
        name=name,
        n_points=int(len(q)),
        mean_magnitude_mm=float(magnitude.mean()),
        median_magnitude_mm=float(np.median(magnitude)),
        p95_magnitude_mm=float(np.percentile(magnitude, 95)),
        threshold_mm=float(threshold_mm),
        fraction_above=float((magnitude > threshold_mm).mean()),
        mean_abs_mm=mean_abs,
        component_ratio=ratio,
        signed_mean_mm=d.mean(axis=0),
        z_extent_mm=np.array([z_lo, z_hi]),
        bin_edges=edges,
        bin_counts=counts,
        bin_mean_magnitude_mm=per_bin,
        ap_bin_mean_magnitude_mm=per_ap_bin,
        expansion=expansion,
        lung_shift=lung_shift(q, d),
        si_ap_gradient=si_ap_gradient(q, d),
    )


def lung_shift(exhale_mm: np.ndarray, displacement_mm: np.ndarray) -> np.ndarray:
    """(3,) c, a, b: the least-squares fit of d_y = |d_z| (c + a h + b l) over points in the lungs.

    ``h`` is the normalised height (-1 at the 1st percentile of the points' exhale z, +1 at the 99th, clipped) and
    ``l`` the normalised distance from the midline (|x - middle| over half the 1st-99th percentile width, clipped to
    [0, 1]); d_y is the posterior motion on inhale. a and b are how the lungs' front-back motion per mm of SI motion
    grows with height and with distance from the midline: the simulator's
    :func:`~breathcast.sim.motion.lung_posterior_shift`. The constant c absorbs where the zero of h and l sits (a
    sample's own 1st-99th percentiles are not the simulator's lung base and apex), so a and b compare between
    landmarks and simulated fields.

    Args:
        exhale_mm: (N, 3) end-exhale positions (x, y, z) mm, x left, y posterior, z superior.
        displacement_mm: (N, 3) exhale -> inhale displacements, same frame.

    Example:
        >>> q = np.array([[x, 0.0, z] for x in (-100.0, -50.0, 50.0, 100.0) for z in np.linspace(0.0, 200.0, 9)])
        >>> h, l = (q[:, 2] - 100.0) / 100.0, np.abs(q[:, 0]) / 100.0
        >>> d = np.stack([np.zeros(36), 10.0 * (0.1 + 0.3 * h + 0.2 * l), np.full(36, -10.0)], axis=1)
        >>> lung_shift(q, d).round(3).tolist()
        [0.1, 0.3, 0.2]
    """
    d = np.asarray(displacement_mm, dtype=np.float64)
    return np.linalg.lstsq(lung_shift_design(exhale_mm, d), d[:, 1], rcond=None)[0]


def si_ap_gradient(exhale_mm: np.ndarray, displacement_mm: np.ndarray) -> float:
    """g of the least-squares fit of |d_z| / mean |d_z| = c + a p_z + g p_y over points in the lungs.

    p_z and p_y are the normalised height and front-back position (0 at the 1st percentile of the points' exhale z
    or y, 1 at the 99th, clipped; y grows towards the back): g is how much more the back of the lungs moves
    superior-inferior than their front at the same height, in units of the sample's mean |d_z|. DIR-Lab's 10 cases
    read 1.53 on average (SD 0.58).

    Args:
        exhale_mm: (N, 3) end-exhale positions (x, y, z) mm, x left, y posterior, z superior.
        displacement_mm: (N, 3) exhale -> inhale displacements, same frame.

    Example:
        >>> q = np.array([[0.0, y, z] for y in np.linspace(0.0, 100.0, 5) for z in np.linspace(0.0, 200.0, 9)])
        >>> d = np.zeros_like(q); d[:, 2] = -(10.0 - 0.04 * q[:, 2] + 0.05 * q[:, 1])  # the back moves 5 mm more
        >>> round(si_ap_gradient(q, d), 3)  # 5 mm over a mean |d_z| of 8.5 mm
        0.588
    """
    si = np.abs(np.asarray(displacement_mm, dtype=np.float64)[:, 2])
    position = np.clip(_normalised_position(np.asarray(exhale_mm, dtype=np.float64)), 0.0, 1.0)
    design = np.stack([np.ones(len(si)), position[:, 2], position[:, 1]], axis=1)
    return float(np.linalg.lstsq(design, si / max(float(si.mean()), 1e-9), rcond=None)[0][2])


def lung_shift_design(exhale_mm: np.ndarray, displacement_mm: np.ndarray) -> np.ndarray:
    """(N, 3) ``|d_z| (1, h, l)`` of :func:`lung_shift`: d_y = design @ (c, a, b)."""
    q = np.asarray(exhale_mm, dtype=np.float64)
    low, high = point_extent_mm(q)
    half = np.maximum(0.5 * (high - low), 1e-9)
    height = np.clip((q[:, 2] - 0.5 * (low[2] + high[2])) / half[2], -1.0, 1.0)
    lateral = np.clip(np.abs(q[:, 0] - 0.5 * (low[0] + high[0])) / half[0], 0.0, 1.0)
    si = np.abs(np.asarray(displacement_mm, dtype=np.float64)[:, 2])
    return si[:, None] * np.stack([np.ones_like(height), height, lateral], axis=1)


def point_extent_mm(points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (3,) mm: the 1st and 99th percentiles of the points (N, 3) along each axis, where a sample's
    lungs are taken to end (landmarks without images and simulated lungs alike)."""
    low, high = np.percentile(np.asarray(points_mm, dtype=np.float64), _EXTENT_PERCENTILES, axis=0)
    return low, high


def _normalised_position(q: np.ndarray) -> np.ndarray:
    """(N, 3) each coordinate of the points ``q`` (N, 3) mm, 0 at its 1st percentile and 1 at its 99th (unclipped)."""
    low, high = point_extent_mm(q)
    return (q - low) / np.maximum(high - low, 1e-9)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against x; 0 when x does not vary."""
    dx = x - x.mean()
    spread = float(dx @ dx)
    return float(dx @ (y - y.mean())) / spread if spread > 0 else 0.0


def _binned_means(position: np.ndarray, values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, mean of ``values``) in ``n_bins`` equal bins of ``position`` clipped to [0, 1]; NaN where empty."""
    which = np.minimum((np.clip(position, 0.0, 1.0) * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    sums = np.bincount(which, weights=values, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def landmark_statistics(
    pairs: LandmarkPairs, n_bins: int = N_BINS, threshold_mm: float = THRESHOLD_MM
) -> MotionStatistics:
    """:func:`motion_statistics` of real landmark pairs (exhale positions, exhale -> inhale displacements)."""
    return motion_statistics(pairs.name, pairs.exhale_mm, pairs.displacement_mm, n_bins, threshold_mm)


def field_statistics(
    field_lps_mm: np.ndarray,
    lung_mask: np.ndarray,
    grid: Grid,
    n_points: int = 5000,
    seed: int = 0,
    name: str = "field",
    n_bins: int = N_BINS,
    threshold_mm: float = THRESHOLD_MM,
) -> MotionStatistics:
    """:func:`motion_statistics` of a simulated pull-back field, sampled at points in the lungs.

    The field is the pull-back displacement of end-inhale (amplitude 1) from the end-exhale (amplitude 0) anatomy,
    on the exhale anatomy's grid: the tissue seen at x at inhale was at q = x + u(x) at exhale. So the exhale ->
    inhale motion of the tissue whose exhale position is q = x + u(x) is d = -u(x), with no inversion needed. The
    points are drawn among the voxel centres x whose exhale position q falls in the exhale lung mask (nearest
    voxel): they are the lungs as seen at inhale, each with its exact exhale position q and displacement -u(x).
    Drawing uniformly over inhale voxels weights points by the inhale volume they fill; the lungs' local volume
    change (~10-30 %) shifts the statistics much less than the differences they are meant to show. Only the sign
    convention matters here: a field whose inhale tissue came from further superior (u_z > 0) moves the lungs
    inferior on inhale (d_z < 0), as real lungs do.

    Args:
        field_lps_mm: (3, Z, Y, X) pull-back displacement at amplitude 1, components (x, y, z) mm along patient LPS
            (convert the code's voxel fields with :func:`breathcast.geometry.field_to_lps_mm`).
        lung_mask: (Z, Y, X) bool, the lungs of the exhale (amplitude 0) anatomy.
        grid: the grid both live on (any direction; positions are patient LPS).
        n_points: points to draw (all of them when the lungs hold fewer).
        seed: seed of the draw.
        name: the sample's name.
        n_bins: bins of the normalised position.
        threshold_mm: the threshold of ``fraction_above``.

    Returns:
        :class:`MotionStatistics` of the drawn points.

    Raises:
        BreathcastError: shapes disagree with ``grid``, or no inhale voxel maps into the lungs.
    """
    u = np.asarray(field_lps_mm)
    mask = np.asarray(lung_mask, dtype=bool)
    if u.shape != (3, *grid.shape) or mask.shape != grid.shape:
        raise BreathcastError(
            f"{name}: field must be (3, {', '.join(map(str, grid.shape))}) and mask {grid.shape}, "
            f"got {u.shape} and {mask.shape}"
        )
    index = np.indices(grid.shape).reshape(3, -1).T  # (V, 3) voxel centres x, (z, y, x) order
    u_points = u.reshape(3, -1).T.astype(np.float64)  # (V, 3) u(x), (x, y, z) mm
    exhale = grid.index_to_lps(index) + u_points  # q = x + u(x), LPS mm
    source = np.rint(grid.lps_to_index(exhale)).astype(np.int64)  # nearest exhale voxel of q
    inside = np.all((source >= 0) & (source < np.asarray(grid.shape)), axis=1)
    in_lungs = np.zeros(len(index), dtype=bool)
    in_lungs[inside] = mask[tuple(source[inside].T)]
    candidates = np.flatnonzero(in_lungs)
    if len(candidates) < 2:
        raise BreathcastError(f"{name}: fewer than 2 inhale voxels map into the exhale lung mask")
    rng = np.random.default_rng(seed)
    if len(candidates) > n_points:
        candidates = rng.choice(candidates, size=n_points, replace=False)
    return motion_statistics(name, exhale[candidates], -u_points[candidates], n_bins, threshold_mm)


def population_statistics(samples: list[MotionStatistics]) -> PopulationStatistics:
    """Means, ranges and the spread between patients of a list of samples (e.g. the 10 DIR-Lab cases).

    Raises:
        BreathcastError: an empty list.
    """
    if not samples:
        raise BreathcastError("population statistics need at least one sample")
    means = np.array([s.mean_magnitude_mm for s in samples])
    ratios = np.stack([s.component_ratio for s in samples])
    profiles = np.stack([s.bin_mean_magnitude_mm / s.mean_magnitude_mm for s in samples])
    ap_profiles = np.stack([s.ap_bin_mean_magnitude_mm / s.mean_magnitude_mm for s in samples])
    fractions = np.array([s.fraction_above for s in samples])
    expansions = np.stack([s.expansion for s in samples])
    shifts = np.stack([s.lung_shift for s in samples])
    signed_ap = np.array([s.signed_mean_mm[1] for s in samples])
    gradients = np.array([s.si_ap_gradient for s in samples])
    with warnings.catch_warnings():  # a bin empty in every sample is NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        profile = np.nanmean(profiles, axis=0)
        profile_range = np.stack([np.nanmin(profiles, axis=0), np.nanmax(profiles, axis=0)])
        profile_sd = np.nanstd(profiles, axis=0)
        ap_profile = np.nanmean(ap_profiles, axis=0)
        ap_profile_range = np.stack([np.nanmin(ap_profiles, axis=0), np.nanmax(ap_profiles, axis=0)])
    return PopulationStatistics(
        names=tuple(s.name for s in samples),
        per_patient_mean_mm=means,
        mean_of_means_mm=float(means.mean()),
        std_of_means_mm=float(means.std()),
        range_of_means_mm=np.array([means.min(), means.max()]),
        component_ratio=ratios.mean(axis=0),
        component_ratio_range=np.stack([ratios.min(axis=0), ratios.max(axis=0)]),
        bin_profile=profile,
        bin_profile_range=profile_range,
        bin_profile_sd=profile_sd,
        ap_profile=ap_profile,
        ap_profile_range=ap_profile_range,
        expansion=expansions.mean(axis=0),
        expansion_range=np.stack([expansions.min(axis=0), expansions.max(axis=0)]),
        lung_shift=shifts.mean(axis=0),
        lung_shift_range=np.stack([shifts.min(axis=0), shifts.max(axis=0)]),
        fraction_above=float(fractions.mean()),
        fraction_above_range=np.array([fractions.min(), fractions.max()]),
        signed_ap_mm=np.array([signed_ap.mean(), signed_ap.std()]),
        si_ap_gradient=np.array([gradients.mean(), gradients.std()]),
    )
