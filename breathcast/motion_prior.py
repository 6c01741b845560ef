"""The anatomical motion prior: how a typical patient with this anatomy breathes, from the CT alone.

The real-anatomy simulator (:mod:`breathcast.sim.realct`) builds each training patient's motion on a
segmentation of its CT, with magnitudes drawn per patient. The prior is the same construction on the plan's
own segmentation with the middle of every drawn range (:func:`~breathcast.sim.realct.population_motion`): the
pull-back from end-exhale to end-inhale (amplitude 1, rate 0) that the anatomy suggests. It is what makes a
network see anatomy rather than the frame: the cVAE takes it as input channels (``CVAEConfig.prior_channels``)
and learns what the prior misses, instead of learning where lungs sit in the box. It is computed the same
way in training (each moving scan) and in the engine (the plan), on the model grid. Beside it, from the same
segmentation, the sliding mask a model trained with ``CVAEConfig.sliding_mask`` is trained through
(:func:`sliding_mask`).

The prior is a model input: a model is served the prior it was trained with. Its definition has a version
(:data:`PRIOR_VERSION`, recorded as ``prior_version`` in a model's config and its package's manifest; a model saved
before versions existed is version 1), and :func:`motion_prior` makes any version.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Volume
from breathcast.model_box import TYPICAL_LUNG_HEIGHT_MM, field_of_view_along_z
from breathcast.segmentation import SLIDING_Z_SIGMA_MM, ThoraxSegmentation, extrapolated_dome_mm, segment_thorax, sliding_weight
from breathcast.sim.realct import RealMotionParams, build_real_motion_field, population_motion

__all__ = ["PRIOR_CHANNELS", "PRIOR_VERSION", "motion_prior", "prior_motion_params", "sliding_mask", "prior_and_sliding_mask", "uncut_lungs"]

PRIOR_CHANNELS = 3  # the prior's (dz, dy, dx)

PRIOR_VERSION = 4
"""The prior models are trained with now. 1: the population motion without the lungs' front-back shift
(:func:`~breathcast.sim.motion.lung_posterior_shift`, added to the simulator on 2026-12-06); 2: with it; 3: with the
steeper front-back gain of the superior-inferior motion (``posterior_gain`` 1.1, the middle of its range since
2026-12-06; 0.8 in versions 1 and 2); 4: with the decay from base to apex calibrated to DIR-Lab's
(``apex_exponent`` 1.5 and ``apex_fraction`` 0.1, the middles of their ranges; 1.3 and 0 in versions 1-3)."""

_POSTERIOR_GAIN_BEFORE_VERSION_3 = 0.8
_APEX_EXPONENT_BEFORE_VERSION_4 = 1.3


def prior_motion_params(version: int = PRIOR_VERSION) -> RealMotionParams:
    """The motion the prior of ``version`` is built with: :func:`~breathcast.sim.realct.population_motion` (versions 1-3
    with the decay to the apex of before version 4, versions 1 and 2 with the front-back gain of before version 3,
    version 1 also without the lung shift).

    Raises:
        BreathcastError: an unknown version.
    """
    if not 1 <= version <= PRIOR_VERSION:
        raise BreathcastError(f"unknown motion prior version {version} (this breathcast makes 1..{PRIOR_VERSION})")
    motion = population_motion()
    if version < 4:
        base = dataclasses.replace(motion.base, apex_exponent=_APEX_EXPONENT_BEFORE_VERSION_4, apex_fraction=0.0)
        motion = dataclasses.replace(motion, base=base)
    if version < 3:
        base = dataclasses.replace(motion.base, posterior_gain=_POSTERIOR_GAIN_BEFORE_VERSION_3)
        motion = dataclasses.replace(motion, base=base)
    if version == 1:
        return dataclasses.replace(motion, base=dataclasses.replace(motion.base, shift_height=0.0, shift_lateral=0.0))
    return motion

APEX_TO_DOME_MM = 170.0
"""Lung apex to the mean lung base (the dome over the lungs' columns): 170.3 mm on POPI, 170.8 on 4D-Lung 0103."""

CUT_MARGIN_MM = 15.0
"""Lungs within this of where the field of view ends are cut there (the segmentation keeps lungs 2-3 voxels of a
64³ grid off a cut)."""

CUT_SLICES = 2
""":func:`sliding_mask` continues the cavity past a field-of-view cut from this many slices inside it."""


def uncut_lungs(seg: ThoraxSegmentation) -> ThoraxSegmentation:
    """``seg`` with the lung base and apex estimated where the CT's field of view cuts them along z.

    The field of view ends where the body does short of the grid's ends
    (:func:`~breathcast.model_box.field_of_view_along_z`). A column whose lungs reach a cut at the bottom has its base
    somewhere between the cut and the typical lowest lung point (:data:`TYPICAL_LUNG_HEIGHT_MM` below the
    apex): the middle is taken. A cut apex is taken :data:`APEX_TO_DOME_MM` above the mean base. What is not
    cut is left as it is.
    """
    grid = seg.grid
    lungs = seg.lungs
    lung_slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    first, last = field_of_view_along_z(seg.body.any(axis=(1, 2)))
    if len(lung_slices) == 0 or (first is None and last is None):
        return seg
    margin = int(np.ceil(CUT_MARGIN_MM / grid.spacing[2]))
    has = lungs.any(axis=0)
    lowest = np.argmax(lungs, axis=0).astype(np.float64)
    base_cut = has & (lowest <= first + margin) if first is not None else np.zeros_like(has)
    apex_cut = last is not None and lung_slices[-1] >= last - margin
    dome, apex = seg.dome_z_mm, seg.apex_z_mm
    if base_cut.any() and not apex_cut:
        deepest = (apex - TYPICAL_LUNG_HEIGHT_MM - grid.origin[2]) / grid.spacing[2]  # fractional slice index
        lowest = np.where(base_cut, first - 0.5 * max(first - deepest, 0.0), lowest)
        dome = extrapolated_dome_mm(lowest, has, grid).astype(np.float32)
    if apex_cut:
        apex = max(apex, float(np.mean(dome[has])) + APEX_TO_DOME_MM)
    inside = (None if first is None else first + margin, None if last is None else last - margin)
    return dataclasses.replace(
        seg, dome_z_mm=dome, apex_z_mm=float(apex), labels=_continued_past(seg.labels, *inside),
        cavity=_continued_past(seg.cavity, *inside), spine=_continued_past(seg.spine, *inside),
    )


def _continued_past(volume: np.ndarray, first: int | None, last: int | None) -> np.ndarray:
    """(Z, Y, X) ``volume`` with the slices before ``first`` and after ``last`` (where not None) copies of those."""
    out = volume.copy()
    if first is not None:
        out[:first] = volume[first]
    if last is not None:
        out[last + 1 :] = volume[last]
    return out


def motion_prior(volume: Volume, seg: ThoraxSegmentation | None = None, version: int = PRIOR_VERSION) -> np.ndarray:
    """The prior at half the model grid's resolution, where the cVAE predicts its velocity.

    Args:
        volume: the CT (HU) on the model grid, canonical frame, each edge even (64³: 6.25 mm voxels).
        seg: its :func:`~breathcast.segmentation.segment_thorax`, when already made.
        version: the prior's definition (:data:`PRIOR_VERSION`): the model's ``prior_version``.

    Returns:
        (3, Z/2, Y/2, X/2) float32, components (dz, dy, dx) in voxels of the *model* grid: the pull-back
        displacement at amplitude 1 (2x2x2 block means), built on the segmentation with the lungs the field of
        view cuts completed (:func:`uncut_lungs`).

    Raises:
        BreathcastError: when the CT has no lungs to build the prior on (:func:`segment_thorax`), or an unknown
            version.
    """
    motion = prior_motion_params(version)
    half = volume.grid.with_shape(tuple(n // 2 for n in volume.shape))
    seg = segment_thorax(volume) if seg is None else seg
    u_half = build_real_motion_field(uncut_lungs(seg), motion, half).displacement(1.0, 0.0)
    return (2.0 * u_half).astype(np.float32)  # half-grid voxels -> model-grid voxels


def sliding_mask(volume: Volume, seg: ThoraxSegmentation | None = None) -> np.ndarray:
    """(Z, Y, X) float32 in [0, 1] on ``volume``'s grid: the weight a lung-centred model's displacement is multiplied
    by where it is served (the engine's sliding mask; a model trained with ``CVAEConfig.sliding_mask`` is trained
    through it): :func:`~breathcast.segmentation.sliding_weight` of the cavity, smoothed along z by
    :data:`~breathcast.segmentation.SLIDING_Z_SIGMA_MM`, with the cavity continued past where the field of view
    ends along z (the slice :data:`CUT_SLICES` inside the cut, repeated), as the engine continues its mask past the
    plan's slices.

    Args:
        volume: the CT (HU), canonical frame (the model box in training).
        seg: its :func:`~breathcast.segmentation.segment_thorax`, when already made.
    """
    seg = segment_thorax(volume) if seg is None else seg
    first, last = field_of_view_along_z(seg.body.any(axis=(1, 2)))
    # The slices at a cut are partial volumes the segmentation may miss: continue from CUT_SLICES inside it.
    first = None if first is None else min(first + CUT_SLICES, volume.shape[0] - 1)
    last = None if last is None else max(last - CUT_SLICES, 0)
    continued = dataclasses.replace(seg, cavity=_continued_past(seg.cavity, first, last))
    return sliding_weight(continued, z_sigma_mm=SLIDING_Z_SIGMA_MM)


def prior_and_sliding_mask(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """:func:`motion_prior` and :func:`sliding_mask` of ``volume`` from one segmentation."""
    seg = segment_thorax(volume)
    return motion_prior(volume, seg), sliding_mask(volume, seg)
