"""The model grid is a physical box centred on the lungs, not whatever the CT's field of view is.

A network trained on one fixed field of view learns a template relative to that frame (the motion peak sat
at ~21 % of the volume's height whatever the anatomy). So every CT reaches a model the same way: in the
canonical frame (:mod:`breathcast.canonical`), resampled into a box of fixed size in mm
(:data:`MODEL_BOX_MM`) whose centre is the centre of the lungs' bounding box; what the scanner did not
see is air. Training data is made in the same box (with jitter), so the model sees anatomy, not the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from breathcast.errors import BreathcastError, PlanRejected
from breathcast.canonical import resample_onto
from breathcast.geometry import Grid, Triplet, Volume
from breathcast.segmentation import ThoraxSegmentation, lung_bounding_box_mm, segment_thorax

__all__ = [
    "MODEL_BOX_MM",
    "SEGMENTATION_SPACING_MM",
    "lung_centred_grid",
    "resample_onto",
    "resample_to_spacing",
    "PlanCheck",
    "check_plan",
    "NO_TRACHEA_WARNING",
    "lung_centre_mm",
    "lungs_cut_along_z",
    "field_of_view_along_z",
    "model_box_volume",
    "model_box_of_simulation",
]

MODEL_BOX_MM: Triplet = (400.0, 400.0, 320.0)
"""(x, y, z) extent of the model box in mm: at 64³, 6.25 x 6.25 x 5 mm voxels."""

TYPICAL_LUNG_HEIGHT_MM = 230.0
"""Apex to the lowest lung base in an adult at exhale, about; used only where a CT cuts the lungs."""

SEGMENTATION_SPACING_MM = 3.0
"""A plan is segmented on a grid of about this voxel size (the answer does not need more)."""


def lung_centred_grid(centre_lps_mm: np.ndarray, shape: tuple[int, int, int], extent_mm: Triplet = MODEL_BOX_MM) -> Grid:
    """The canonical grid of ``shape`` (Z, Y, X) covering ``extent_mm`` (x, y, z) centred at ``centre_lps_mm``.

    Example:
        >>> lung_centred_grid(np.array([0.0, 10.0, -20.0]), (4, 4, 4), (40.0, 40.0, 40.0)).origin
        (-15.0, -5.0, -35.0)
    """
    centred = Grid.centered(tuple(shape), tuple(extent_mm))
    origin = np.asarray(centred.origin) + np.asarray(centre_lps_mm, dtype=float)
    return Grid(shape=centred.shape, spacing=centred.spacing, origin=tuple(origin))


def resample_to_spacing(volume: Volume, spacing_mm: float) -> Volume:
    """A canonical volume on a grid of about ``spacing_mm`` voxels over the same field of view."""
    g = volume.grid
    shape = tuple(max(8, int(round(n * s / spacing_mm))) for n, s in zip(g.shape, g.spacing_zyx))
    return resample_onto(volume, g.with_shape(shape), fill=None)


@dataclass(frozen=True)
class PlanCheck:
    """What a plan check found; ``warnings`` are published with every status, ``segmentation`` is kept.

    Args:
        segmentation: the plan's segmentation at :data:`SEGMENTATION_SPACING_MM`.
        lung_centre_lps_mm: (3,) centre of the lungs' bounding box, mm LPS.
        warnings: one line each: what about the plan lies at the edge of what the model was trained on.
    """

    segmentation: ThoraxSegmentation
    lung_centre_lps_mm: np.ndarray
    warnings: tuple[str, ...] = field(default_factory=tuple)


NO_TRACHEA_WARNING = "no trachea in view: the CT's superior-inferior direction could not be checked against its anatomy"
"""A plan's warning where too little trachea is in view (a field of view below the carina; a coarse simulated CT)."""


def check_plan(volume: Volume) -> PlanCheck:
    """Find the lungs of a canonical planning CT and check the plan is inside what the model knows.

    Raises:
        PlanRejected: no lungs; an anterior-posterior direction that contradicts the anatomy (the spine in
            front of the lungs); a superior-inferior direction that contradicts it (the trachea below the lungs'
            middle: slices in reverse order, or a feet-first scan whose header says head-first); an HU calibration
            that is not CT's (lungs or soft tissue far off their HU).
    """
    small = resample_to_spacing(volume, SEGMENTATION_SPACING_MM)
    try:
        seg = segment_thorax(small)
    except BreathcastError as error:
        raise PlanRejected(f"plan rejected: {error}") from error
    hu = small.array
    lung_hu = float(np.median(hu[seg.lungs]))
    soft = seg.body & ~seg.lungs & (hu > -300.0) & (hu < 600.0)  # fat, muscle, organs; not air, not dense bone
    soft_hu = float(np.median(hu[soft])) if soft.any() else float("nan")
    if not -950.0 <= lung_hu <= -600.0 or not -80.0 <= soft_hu <= 150.0:
        raise PlanRejected(
            f"plan rejected: implausible HU calibration (lung median {lung_hu:.0f} HU, expected -950..-600; "
            f"soft tissue median {soft_hu:.0f} HU, expected -80..150)"
        )
    if not seg.anterior_posterior_ok:
        raise PlanRejected(
            "plan rejected: the CT's anterior-posterior direction contradicts its anatomy "
            f"(spine {seg.spine_offset_mm:+.0f} mm, mediastinum {seg.heart_offset_mm:+.0f} mm from the lungs' centre, "
            "posterior +): check the orientation in the file's header"
        )
    if seg.superior_inferior_ok is False:
        raise PlanRejected(
            "plan rejected: the CT's superior-inferior direction contradicts its anatomy (only "
            f"{100.0 * seg.trachea_above_fraction:.0f} % of the trachea and main bronchi above the lungs' middle): check "
            "the slice order and the patient position (head or feet first) in the file's header"
        )
    warnings = []
    if seg.superior_inferior_ok is None:
        warnings.append(NO_TRACHEA_WARNING)
    lungs = seg.lungs
    cut_low, cut_high = lungs_cut_along_z(seg)
    if cut_low or cut_high:
        which = " and ".join(w for w, cut in (("base", cut_low), ("apex", cut_high)) if cut)
        warnings.append(f"the lungs are cut at the {which} by the CT's field of view: motion there is extrapolated")
    if lungs[:, :, 0].any() or lungs[:, :, -1].any() or lungs[:, 0, :].any() or lungs[:, -1, :].any():
        warnings.append("the lungs touch the in-plane edge of the CT's field of view")
    return PlanCheck(seg, lung_centre_mm(seg), tuple(warnings))


def lungs_cut_along_z(seg: ThoraxSegmentation, margin_slices: int = 2) -> tuple[bool, bool]:
    """(at the first slices, at the last slices): whether lung lies within ``margin_slices`` of the CT's z ends
    (the segmentation's morphology keeps it off the very last slice)."""
    lungs = seg.lungs
    return bool(lungs[: margin_slices + 1].any()), bool(lungs[-margin_slices - 1 :].any())


def field_of_view_along_z(body_per_slice: np.ndarray) -> tuple[int | None, int | None]:
    """Where a CT's field of view ends inside its model box along z, from (Z,) bool "this slice shows body":
    (first, last) slice showing body, each None where the body reaches the box's end. The box is 320 mm tall
    around the lungs, so a body in view fills it: one that stops short of an end was cut there."""
    slices = np.flatnonzero(body_per_slice)
    if len(slices) == 0:
        return None, None
    first, last = int(slices[0]), int(slices[-1])
    return (first if first > 0 else None), (last if last < len(body_per_slice) - 1 else None)


def lung_centre_mm(seg: ThoraxSegmentation) -> np.ndarray:
    """(3,) LPS mm: the centre of the lungs' bounding box, the box's anchor.

    Where the CT's field of view cuts the lungs along z (they reach its first or last slices) and what is seen
    is shorter than :data:`TYPICAL_LUNG_HEIGHT_MM`, the cut end is taken that far from the end that is seen,
    so a crop that removes the lung base or apex moves the anchor less.
    """
    low, high = lung_bounding_box_mm(seg)
    cut_low, cut_high = lungs_cut_along_z(seg)
    if cut_low != cut_high and high[2] - low[2] < TYPICAL_LUNG_HEIGHT_MM:
        if cut_low:
            low[2] = high[2] - TYPICAL_LUNG_HEIGHT_MM
        else:
            high[2] = low[2] + TYPICAL_LUNG_HEIGHT_MM
    return 0.5 * (low + high)


def model_box_volume(volume: Volume, shape: tuple[int, int, int], extent_mm: Triplet = MODEL_BOX_MM) -> tuple[Volume, PlanCheck]:
    """A canonical planning CT in its lung-centred model box of ``shape``, and the plan check behind it."""
    check = check_plan(volume)
    grid = lung_centred_grid(check.lung_centre_lps_mm, shape, extent_mm)
    grid = Grid(grid.shape, grid.spacing, grid.origin, frame_of_reference_uid=volume.grid.frame_of_reference_uid)
    return resample_onto(volume, grid), check


def model_box_of_simulation(config: dict | None) -> dict:
    """The manifest's ``model_box`` for data made with a simulation config (a dict as in ``dataset.json``):
    ``{"anchor": "lungs", "extent_mm": [x, y, z]}`` for the lung-centred box, ``{}`` for data on its own field
    of view (real data, or a simulator from before the box)."""
    if not config or "box_jitter_mm" not in config:
        return {}
    return {"anchor": "lungs", "extent_mm": [float(e) for e in config["field_of_view_mm"]]}
