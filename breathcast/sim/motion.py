"""The simulator's breathing motion: a smooth, invertible displacement as a function of (amplitude, rate).

The field is a pull-back displacement from the rest anatomy (amplitude 0): a scan at breathing state
(A, Ȧ) shows ``rest(x + u(x; A, Ȧ))``. It is built from two spatial basis fields with nonlinear
coefficients, so that it is deliberately *not* the linear 5D model of Low et al. (u = α·A + β·Ȧ):

* superior-inferior ``si``: largest on the diaphragm under each point, decaying to a fraction of it at the apex
  (:func:`si_height_profile`), larger at the back than at the front (:func:`posterior_profile`), inside the rib cage
  only.
  Its sharp (4 mm) edge at the inner chest wall is a shear: the lungs slide along the pleura, the chest
  wall and spine do not follow. Coefficient ``c_si(A) = A·(1 + κ) / (1 + κ·|A|)``: nonlinear in amplitude, saturating in deep
  breaths as the diaphragm's excursion does.
  With it the lungs move front to back by a fraction of their local superior-inferior motion that grows with height
  and with distance from the midline (:func:`lung_posterior_shift`, calibrated on DIR-Lab): on inhale the upper and
  lateral lungs move posterior, the lower medial lungs anterior.
* chest wall ``chest_wall``: anterior and lateral expansion, larger in the lower thorax; inside the rib cage the
  front-back part is centred on the cavity, so the lungs expand front to back without moving anterior as a whole
  (DIR-Lab's lungs move 0.4 mm posterior on inhale on average). Coefficient
  ``c_cw(A, Ȧ) = A + τ·Ȧ``: the chest wall leads the diaphragm, which gives hysteresis loops.

Shears and gentle gradients keep det(I + ∇u) well above 0 for amplitudes in the physiological range.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from breathcast.sim.anatomy import AnatomyParams, diaphragm_z
from breathcast.geometry import Grid, field_from_lps_mm
from breathcast.warp import smooth_folds

__all__ = [
    "MotionParams",
    "MotionField",
    "sample_motion",
    "build_motion_field",
    "posterior_profile",
    "smooth_step",
    "LUNG_SHIFT_RANGES",
    "lung_posterior_shift",
    "SHIFT_TAPER_MM",
    "APEX_TAPER_MM",
    "ABDOMEN_DECAY_MM",
    "APEX_FRACTION",
    "si_height_profile",
    "FOLD_FREE_AMPLITUDES",
    "without_folds",
]


@dataclass(frozen=True)
class MotionParams:
    """One patient's breathing motion.

    Args:
        si_amplitude_mm: superior-inferior motion of the diaphragm at amplitude 1 (5-25 mm).
        chest_wall_mm: anterior motion of the anterior chest wall at amplitude 1.
        lateral_mm: lateral motion of the lower lateral chest wall at amplitude 1.
        si_nonlinearity: κ of ``c_si``; 0 would make the SI motion linear in amplitude.
        hysteresis_s: τ of ``c_cw``, seconds the chest wall leads by.
        right_to_left: ratio of right to left hemithorax SI motion.
        apex_exponent: shape of the SI decay from the diaphragm (1) to the apex (0).
        sliding_width_mm: width of the shear layer at the inner chest wall.
        posterior_gain: k of the superior-inferior motion's anterior-posterior profile (:func:`posterior_profile`);
            0 is uniform. Every DIR-Lab case moves most at the back of the lungs.
        shift_height: posterior motion of the lungs on inhale per mm of their local superior-inferior motion, per unit
            of normalised height (-1 at the lung base, +1 at the apex): :func:`lung_posterior_shift`.
        shift_lateral: the same per unit of normalised distance from the midline (0 medial, 1 at the lungs' lateral
            extreme).
        apex_fraction: superior-inferior motion left at the lung apex, as a fraction of the diaphragm's
            (:func:`si_height_profile`); 0 before 2026-12-06's profile calibration.
    """

    si_amplitude_mm: float
    chest_wall_mm: float
    lateral_mm: float
    si_nonlinearity: float
    hysteresis_s: float
    right_to_left: float
    apex_exponent: float
    sliding_width_mm: float = 4.0
    posterior_gain: float = 0.0
    shift_height: float = 0.0
    shift_lateral: float = 0.0
    apex_fraction: float = 0.0


APEX_TAPER_MM = 30.0
"""Above the lung apex the superior-inferior motion fades to 0 over this."""

ABDOMEN_DECAY_MM = 150.0
"""Below the diaphragm the superior-inferior motion falls to half over this."""


def si_height_profile(z: np.ndarray, dome: np.ndarray, apex: float, motion: MotionParams, min_span_mm: float = 1.0) -> np.ndarray:
    """The superior-inferior motion's share by height: 1 on the diaphragm, ``apex_fraction`` at the apex,
    ``apex_fraction + (1 - apex_fraction) r ** apex_exponent`` between (r = (apex - z) / (apex - dome): 1 on the
    diaphragm, 0 at the apex), fading to 0 within :data:`APEX_TAPER_MM` above the apex; below the diaphragm falling
    to half over :data:`ABDOMEN_DECAY_MM` (the abdomen moves with it).

    Args:
        z, dome: mm, broadcastable: the heights and the diaphragm's height under them (``apex - dome`` is taken as
            at least ``min_span_mm``).
        apex: mm, the lungs' apex.
        motion: gives ``apex_exponent`` and ``apex_fraction``.
    """
    r = np.clip((apex - z) / np.maximum(apex - dome, min_span_mm), 0.0, 1.0)
    fade = np.clip(1.0 + (apex - z) / APEX_TAPER_MM, 0.0, 1.0)
    above = (motion.apex_fraction + (1.0 - motion.apex_fraction) * r**motion.apex_exponent) * fade
    below = 1.0 - 0.5 * np.clip((dome - z) / ABDOMEN_DECAY_MM, 0.0, 1.0)
    return np.where(z > dome, above, below)


LUNG_SHIFT_RANGES: dict[str, tuple[float, float]] = {
    "shift_height": (0.2, 0.62),
    "shift_lateral": (0.1, 0.72),
}
"""Uniform ranges of :attr:`MotionParams.shift_height` and ``shift_lateral``, both kinds. Fitted per DIR-Lab case
(:func:`breathcast.sim.motion_statistics.lung_shift` of its 300 landmark pairs) the height coefficient is 0.21-0.55
(one case -0.13; mean 0.30), the midline one -0.11-0.69 (mean 0.29); POPI's are 0.22 and 0.41. The ranges' middles
(0.41) are DIR-Lab's means divided by the ~0.7 that the same statistic reads back from a simulated field (the shift
tapers to 0 at the pleura, which landmarks do not reach), so that the simulated patients' statistic matches DIR-Lab's
(``benchmarks/bench_motion_realism.py``; it also shows that each DIR-Lab case's front-back landmark motion is
predicted better by the other nine's median than by none, on average)."""


CARTOON_POSTERIOR_GAIN = (0.5, 1.3)
"""Uniform range of the cartoon's :attr:`MotionParams.posterior_gain`, set so that its lungs' back moves more than
their front at the same height as much as DIR-Lab's do (``si_ap_gradient`` in
:mod:`breathcast.sim.motion_statistics`: 1.53 real; 1.24 with the range (0.4, 1.0) it had before 2026-12-06)."""


APEX_FRACTION = (0.0, 0.2)
"""Uniform range of :attr:`MotionParams.apex_fraction`, both kinds. With it (and the cartoon's decay measured from the
diaphragm under each column, not its dome's top) the simulated motion's decay from base to apex lies within two
standard errors of DIR-Lab's mean in every fifth of the lungs' height (``profile_level`` in
``benchmarks/bench_motion_realism.py``); before 2026-12-06's calibration the motion reached 0 at the apex and the
top fifth moved 0.19 (cartoon) and 0.28 (real anatomy) of the mean, DIR-Lab's 0.37 ± 0.04."""


def sample_motion(rng: np.random.Generator) -> MotionParams:
    """Draw one patient's motion: 5-25 mm superior-inferior at the diaphragm, and the rest around it."""
    si = rng.uniform(5.0, 25.0)
    return MotionParams(
        si_amplitude_mm=si,
        chest_wall_mm=si * rng.uniform(0.08, 0.2),
        lateral_mm=si * rng.uniform(0.05, 0.14),
        si_nonlinearity=rng.uniform(0.15, 0.45),
        hysteresis_s=rng.uniform(0.08, 0.25),
        right_to_left=rng.uniform(0.85, 1.15),
        apex_exponent=rng.uniform(1.2, 1.8),
        posterior_gain=rng.uniform(*CARTOON_POSTERIOR_GAIN),
        **{name: rng.uniform(low, high) for name, (low, high) in LUNG_SHIFT_RANGES.items()},
        apex_fraction=rng.uniform(*APEX_FRACTION),
    )


@dataclass(frozen=True)
class MotionField:
    """The displacement model of one patient on one grid.

    Args:
        si: (3, Z, Y, X) float32 voxels (dz, dy, dx): the superior-inferior basis at c_si = 1.
        chest_wall: (3, Z, Y, X) float32 voxels: the chest-wall basis at c_cw = 1.
        params: the motion parameters the bases were built with.
    """

    si: np.ndarray
    chest_wall: np.ndarray
    params: MotionParams

    def coefficients(self, amplitude: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(c_si, c_cw) for amplitude (dimensionless) and rate (1/s), arrays of any matching shape."""
        a = np.asarray(amplitude, dtype=np.float64)
        kappa = self.params.si_nonlinearity
        c_si = a * (1.0 + kappa) / (1.0 + kappa * np.abs(a))
        c_cw = a + self.params.hysteresis_s * np.asarray(rate, dtype=np.float64)
        return c_si, c_cw

    def displacement(self, amplitude: float | np.ndarray, rate: float | np.ndarray) -> np.ndarray:
        """Pull-back displacement (3, Z, Y, X) float32 voxels at a breathing state.

        Args:
            amplitude: a scalar (every slice in one state) or (Z,) per slice (a helical scan).
            rate: 1/s, same shape as ``amplitude``.
        """
        nz = self.si.shape[1]
        a = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (nz,))
        r = np.broadcast_to(np.asarray(rate, dtype=np.float64), (nz,))
        c_si, c_cw = self.coefficients(a, r)
        out = self.si * c_si.astype(np.float32)[None, :, None, None]
        out += self.chest_wall * c_cw.astype(np.float32)[None, :, None, None]
        return out


def posterior_profile(t: np.ndarray, gain: float) -> np.ndarray:
    """``exp(k t) k / sinh(k)`` with k = ``gain``, t = -1 at the lungs' anterior and +1 at their posterior extreme
    (clipped to [-1, 1]): the superior-inferior motion's gain from front to back, mean 1 over t (1 everywhere for k = 0)."""
    t = np.clip(t, -1.0, 1.0)
    return np.exp(gain * t) * (gain / np.sinh(gain) if gain else 1.0)


SHIFT_TAPER_MM = 3.0
""":func:`lung_posterior_shift` rises from ~0 at the cavity's edge to half at twice this depth and full at four times."""


def lung_posterior_shift(
    height: np.ndarray, lateral: np.ndarray, depth_mm: np.ndarray, motion: MotionParams
) -> np.ndarray:
    """The lungs' posterior motion on inhale per mm of their local superior-inferior motion (dimensionless).

    ``shift_height · height + shift_lateral · lateral``, with ``height`` the normalised height in the lungs (clipped
    to [-1, 1]: base to apex) and ``lateral`` the normalised distance from the midline (clipped to [0, 1]), tapered to
    ~0 at the edge of the moving cavity (``depth_mm`` inside it; :data:`SHIFT_TAPER_MM`). The lungs slide along the
    pleura but do not leave it: a front-back motion as sharp at the edge as the sliding layer would compress the
    layer into folds.
    """
    shift = motion.shift_height * np.clip(height, -1.0, 1.0) + motion.shift_lateral * np.clip(lateral, 0.0, 1.0)
    return shift * smooth_step(np.asarray(depth_mm) - 2.0 * SHIFT_TAPER_MM, SHIFT_TAPER_MM)


def smooth_step(distance_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """0 -> 1 across 0 mm: ``0.5 * (1 + tanh(distance / width))``, elementwise."""
    return 0.5 * (1.0 + np.tanh(distance_mm / width_mm))


FOLD_FREE_AMPLITUDES = (-0.5, 1.0, 1.7)
"""Breathing amplitudes at which the superior-inferior basis is made fold-free (:func:`without_folds`)."""


def without_folds(field: MotionField) -> MotionField:
    """``field`` with its superior-inferior basis smoothed where it folds at an amplitude of
    :data:`FOLD_FREE_AMPLITUDES` (:func:`~breathcast.warp.smooth_folds`); unchanged where it folds nowhere."""
    c_si, _ = field.coefficients(np.array(FOLD_FREE_AMPLITUDES), np.zeros(len(FOLD_FREE_AMPLITUDES)))
    si_basis, _ = smooth_folds(field.si, scales=tuple(float(c) for c in c_si))
    return replace(field, si=si_basis)


def build_motion_field(anatomy: AnatomyParams, motion: MotionParams, grid: Grid) -> MotionField:
    """Build the patient's two motion bases on ``grid`` (axis-aligned, patient LPS)."""
    nz, ny, nx = grid.shape
    ox, oy, oz = grid.origin
    sx, sy, sz = grid.spacing
    x = (ox + sx * np.arange(nx))[None, None, :]
    y = (oy + sy * np.arange(ny))[None, :, None]
    z = (oz + sz * np.arange(nz))[:, None, None]

    # Superior-inferior: largest on the diaphragm under each column, decaying to the apex above it and slowly into
    # the abdomen below.
    right = smooth_step(-x, 20.0)
    dome = anatomy.dome_z[0] * right + anatomy.dome_z[1] * (1.0 - right)
    floor = diaphragm_z(anatomy, x, y, -1) * right + diaphragm_z(anatomy, x, y, 1) * (1.0 - right)
    profile = si_height_profile(z, floor, anatomy.apex_z, motion)
    cax, cay = anatomy.cavity_half_axes
    depth = (1.0 - np.sqrt((x / cax) ** 2 + (y / cay) ** 2)) * min(cax, cay)  # ~mm inside the rib cage
    inside = smooth_step(depth, motion.sliding_width_mm)
    spine = smooth_step(30.0 - np.abs(x), 4.0) * smooth_step(y - (anatomy.spine_y - 25.0), 4.0)
    hc, hr = np.asarray(anatomy.heart_center), np.asarray(anatomy.heart_radii)
    heart = np.sqrt(((x - hc[0]) / hr[0]) ** 2 + ((y - hc[1]) / hr[1]) ** 2 + ((z - hc[2]) / hr[2]) ** 2)
    heart_damping = 1.0 - 0.35 * smooth_step(1.0 - heart, 0.6)  # the heart follows the diaphragm in part
    side = motion.right_to_left * right + (1.0 - right)
    back = posterior_profile(y / cay, motion.posterior_gain)
    u_si = motion.si_amplitude_mm * profile * inside * (1.0 - spine) * heart_damping * side * back
    base = anatomy.lung_base_z
    height = (z - 0.5 * (anatomy.apex_z + base)) / (0.5 * (anatomy.apex_z - base))
    lateral = np.abs(x) / (anatomy.lung_center_x(1) + anatomy.lung_half_width)  # 1 at the lungs' lateral extreme
    u_shift = -u_si * lung_posterior_shift(height, lateral, depth, motion)  # pull-back: came from further anterior

    # Chest wall: anterior and lateral expansion growing towards the lower thorax.
    lower = 0.5 + 0.5 * np.clip((anatomy.apex_z - z) / (anatomy.apex_z - dome), 0.0, 1.0)
    anterior = np.clip((anatomy.spine_y - y) / (anatomy.spine_y + anatomy.body_half_depth), 0.0, 1.2)
    centre = anatomy.spine_y / (anatomy.spine_y + anatomy.body_half_depth)  # ``anterior`` at the cavity's centre
    u_ap = motion.chest_wall_mm * (anterior - centre * inside) * lower  # pull-back: the wall came from further posterior
    u_lr = -motion.lateral_mm * (x / anatomy.body_half_width) * lower

    shape = (3, nz, ny, nx)
    si_lps = np.zeros(shape, dtype=np.float32)
    si_lps[2] = u_si  # pull-back at inhale: the tissue seen at x came from further superior
    si_lps[1] = u_shift
    cw_lps = np.zeros(shape, dtype=np.float32)
    cw_lps[0] = np.broadcast_to(u_lr, shape[1:])
    cw_lps[1] = np.broadcast_to(u_ap, shape[1:])
    # The front-back shift, tapered at the rib cage, can still compress the lungs' lateral edge into a fold.
    return without_folds(MotionField(
        si=field_from_lps_mm(si_lps, grid),
        chest_wall=field_from_lps_mm(cw_lps, grid),
        params=motion,
    ))
