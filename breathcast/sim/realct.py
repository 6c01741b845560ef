"""Training patients with real anatomy: a real thorax CT, augmented, given breathing built on its segmentation.

Beside the cartoon simulator, this takes a real CT as the rest anatomy (end-exhale, amplitude 0) and makes a
patient of it in the same dataset format, with the same scan protocol and ground truth:

1. **Source** (:func:`load_anatomy_source`): the CT in the canonical frame; when its anatomy contradicts its
   header's anterior-posterior direction (the spine in front of the lungs) it is flipped and that is recorded.
2. **Augmentation** (:class:`Augmentation`, drawn by :func:`sample_augmentation`, applied by
   :func:`augmented_anatomy`): left-right mirroring, anisotropic scaling, a small rotation about z, a smooth
   elastic deformation, HU calibration (gain, offset), reconstruction kernel (blur or sharpening); then the
   scan grid is the model box centred on the lungs with jitter, and a scanner field of view may cut the body
   and the lungs (:func:`breathcast.sim.simulator.scanner_fov`). A tumour is added in a lung.
3. **Motion** (:func:`build_real_motion_field`), the same two-basis model as the cartoon
   (:class:`~breathcast.sim.motion.MotionField`: nonlinear in amplitude, hysteresis through rate), built on the
   segmentation (:mod:`breathcast.segmentation`): superior-inferior motion largest at the diaphragm, decaying to a
   fraction of it at the apex and into the abdomen (:func:`~breathcast.sim.motion.si_height_profile`; larger at the
   back than at the front, as in every DIR-Lab case: ``MotionParams.posterior_gain``), inside the cavity only (a 4 mm shear layer at its edge:
   the lungs slide along the pleura; chest wall, ribs and spine stay); the lungs' own anterior-posterior and lateral
   expansion with it, and their front-to-back motion that grows with height and distance from the midline
   (:func:`~breathcast.sim.motion.lung_posterior_shift`); an outward chest-wall and abdominal-wall expansion that is zero at the spine.
   Magnitudes are drawn to match real lungs (DIR-Lab, POPI: ``benchmarks/bench_motion_realism.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from breathcast.canonical import to_canonical
from breathcast.errors import BreathcastError
from breathcast.geometry import HU_MIN, Grid, Volume, field_from_lps_mm
from breathcast.io.dataset import describe_dataset, prepare_output_dir
from breathcast.model_box import lung_centred_grid, resample_to_spacing
from breathcast.segmentation import ThoraxSegmentation, lung_bounding_box_mm, segment_thorax, signed_distance_mm
from breathcast.sim.anatomy import Label
from breathcast.sim.motion import (
    APEX_FRACTION,
    LUNG_SHIFT_RANGES,
    MotionField,
    MotionParams,
    lung_posterior_shift,
    posterior_profile,
    si_height_profile,
    smooth_step,
    without_folds,
)
from breathcast.sim.simulator import (
    SimulatedPatient,
    SimulationConfig,
    acquire_session,
    patient_from_session,
    patient_seed,
    save_patient,
    scanner_fov,
)

__all__ = [
    "AnatomySource",
    "load_anatomy_source",
    "Augmentation",
    "sample_augmentation",
    "RealAnatomy",
    "augmented_anatomy",
    "RealMotionParams",
    "sample_real_motion",
    "population_motion",
    "REAL_MOTION_RANGES",
    "build_real_motion_field",
    "RealPatientAnatomy",
    "build_realct_anatomy",
    "simulate_realct_patient",
    "simulate_realct_dataset",
]


@dataclass(frozen=True)
class AnatomySource:
    """A real CT to build patients on.

    Args:
        name: shown in the dataset (the file or folder name).
        volume: canonical CT in HU, blurred to about the fine simulation grid (3 mm).
        flipped_anterior_posterior: True when the header's y direction contradicted the anatomy and was flipped.
    """

    name: str
    volume: Volume
    flipped_anterior_posterior: bool = False

    @cached_property
    def lung_centre_lps_mm(self) -> np.ndarray:
        """(3,) LPS mm, the centre of the source's lungs' bounding box: the augmentation's fixed point and the
        patients' box centre before jitter (segmented once per source)."""
        low, high = lung_bounding_box_mm(segment_thorax(self.volume))
        return 0.5 * (low + high)


def _read_ct(path: Path) -> Volume:
    if path.is_dir():
        from breathcast.io.dicom_io import read_ct_series

        return read_ct_series(path).volume
    from breathcast.io.dataset import read_volume

    return read_volume(path)


def load_anatomy_source(path: Path | str, spacing_mm: float = 3.0) -> AnatomySource:
    """Read a real thorax CT (a DICOM series folder or a NIfTI file) as an anatomy source."""
    path = Path(path)
    if not path.exists():
        raise BreathcastError(f"{path}: no such CT (a DICOM series folder or a NIfTI file)")
    canonical, _ = to_canonical(_read_ct(path))
    volume = resample_to_spacing(canonical, spacing_mm)
    seg = segment_thorax(volume)
    if seg.superior_inferior_ok is False:
        raise BreathcastError(f"{path}: the CT's superior-inferior direction contradicts its anatomy (the trachea below the "
                              "lungs' middle): check its slice order and patient position")
    flipped = False
    if not seg.anterior_posterior_ok:
        volume = volume.with_array(np.ascontiguousarray(volume.array[:, ::-1, :]))
        if not segment_thorax(volume).anterior_posterior_ok:
            raise BreathcastError(f"{path}: cannot tell anterior from posterior in this CT (no spine, no mediastinum found)")
        flipped = True
    name = path.name.split(".")[0]
    return AnatomySource(name, volume, flipped)


@dataclass(frozen=True)
class Augmentation:
    """How one patient differs from its source CT.

    Args:
        mirror: left-right mirror.
        scale: (x, y, z) size factors.
        rotation_deg: rotation about the superior-inferior axis.
        elastic_mm: largest displacement of the smooth elastic deformation.
        elastic_seed: seed of its random lattice.
        hu_gain, hu_offset: HU calibration, ``hu * gain + offset``.
        kernel_sigma_mm: reconstruction kernel: > 0 blurs (soft kernel), < 0 sharpens (bone kernel).
        noise_hu: CT noise of the scans.
    """

    mirror: bool
    scale: tuple[float, float, float]
    rotation_deg: float
    elastic_mm: float
    elastic_seed: int
    hu_gain: float
    hu_offset: float
    kernel_sigma_mm: float
    noise_hu: float


def sample_augmentation(rng: np.random.Generator) -> Augmentation:
    """Draw one patient's augmentation."""
    return Augmentation(
        mirror=bool(rng.uniform() < 0.5),
        scale=tuple(float(s) for s in rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, size=3)),
        rotation_deg=float(rng.uniform(-6.0, 6.0)),
        elastic_mm=float(rng.uniform(0.0, 6.0)),
        elastic_seed=int(rng.integers(2**31)),
        hu_gain=float(rng.uniform(0.96, 1.04)),
        hu_offset=float(rng.uniform(-20.0, 20.0)),
        kernel_sigma_mm=float(rng.uniform(-1.0, 2.0)),
        noise_hu=float(rng.uniform(8.0, 30.0)),
    )


@dataclass(frozen=True)
class RealAnatomy:
    """What a real-CT patient's anatomy was made from (stored in the dataset's metadata)."""

    source: str
    flipped_anterior_posterior: bool
    augmentation: Augmentation
    tumour_centre_lps_mm: tuple[float, float, float]
    tumour_radius_mm: float


def _elastic_offsets(grid: Grid, amplitude_mm: float, seed: int, lattice: int = 6) -> np.ndarray:
    """(3, Z, Y, X) mm (x, y, z): a smooth random displacement, at most ``amplitude_mm`` per component."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1.0, 1.0, size=(3, lattice, lattice, lattice))
    factors = np.asarray(grid.shape) / lattice
    return np.stack([ndimage.zoom(c, factors, order=3, mode="nearest", grid_mode=True)[: grid.shape[0], : grid.shape[1], : grid.shape[2]] for c in coarse]) * amplitude_mm


def _source_positions(grid: Grid, centre: np.ndarray, aug: Augmentation) -> np.ndarray:
    """(3, Z, Y, X) LPS mm (x, y, z) of the source point each voxel of ``grid`` shows."""
    nz, ny, nx = grid.shape
    axes = [grid.origin[a] + grid.spacing[a] * np.arange(n) for a, n in zip(range(3), (nx, ny, nz))]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    p = np.stack([x, y, z]) - centre[:, None, None, None]
    angle = np.deg2rad(aug.rotation_deg)
    c, s = np.cos(angle), np.sin(angle)
    q = np.stack([c * p[0] - s * p[1], s * p[0] + c * p[1], p[2]]) / np.asarray(aug.scale)[:, None, None, None]
    if aug.mirror:
        q[0] = -q[0]
    if aug.elastic_mm > 0:
        q = q + _elastic_offsets(grid, aug.elastic_mm, aug.elastic_seed)
    return q + centre[:, None, None, None]


def _apply_kernel(hu: np.ndarray, sigma_mm: float, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    sigma = [abs(sigma_mm) / s for s in spacing_zyx]
    blurred = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    return blurred if sigma_mm >= 0 else hu + (hu - blurred)  # unsharp masking for a sharp kernel


def augmented_anatomy(
    source: AnatomySource, aug: Augmentation, fine_grid: Grid, centre_lps_mm: np.ndarray
) -> np.ndarray:
    """(Z, Y, X) float32 HU: the source CT augmented, on ``fine_grid``; air where the source has no data."""
    q = _source_positions(fine_grid, centre_lps_mm, aug)
    src = source.volume
    index = (q - np.asarray(src.grid.origin)[:, None, None, None]) / np.asarray(src.grid.spacing)[:, None, None, None]
    hu = ndimage.map_coordinates(src.array, index[::-1], order=1, mode="constant", cval=HU_MIN, prefilter=False)
    hu = _apply_kernel(hu.astype(np.float32), aug.kernel_sigma_mm, fine_grid.spacing_zyx)
    return (hu * aug.hu_gain + aug.hu_offset).astype(np.float32)


@dataclass(frozen=True)
class RealMotionParams:
    """A real-CT patient's breathing motion: the cartoon's :class:`MotionParams` and the lungs' expansion.

    Args:
        base: superior-inferior amplitude at the diaphragm (mm), chest wall, nonlinearity, hysteresis, ...
        lung_ap_ratio: anterior-posterior expansion of the lungs, as a fraction of their SI motion, at the
            lungs' anterior and posterior extremes.
        lung_lr_ratio: lateral expansion of the lungs, the same way.
    """

    base: MotionParams
    lung_ap_ratio: float
    lung_lr_ratio: float


# Ranges of the uniform draws (in the order they are drawn), tuned to real lungs (bench_motion_realism).
REAL_MOTION_RANGES: dict[str, tuple[float, float]] = {
    "si_amplitude_mm": (5.5, 21.0),
    "chest_wall_mm": (0.4, 2.1),
    "lateral_mm": (0.5, 3.0),
    "si_nonlinearity": (0.15, 0.45),
    "hysteresis_s": (0.08, 0.25),
    "right_to_left": (0.85, 1.15),
    "apex_exponent": (1.2, 1.8),  # (1.0, 1.6) and no apex_fraction before 2026-12-06's profile calibration
    "lung_ap_ratio": (0.0, 0.06),
    "lung_lr_ratio": (0.0, 0.22),
    "posterior_gain": (0.7, 1.5),  # (0.5, 1.1) before 2026-12-06: gradient at equal height 1.02, DIR-Lab 1.53
    **LUNG_SHIFT_RANGES,
    "apex_fraction": APEX_FRACTION,
}


def _real_motion(values: dict[str, float]) -> RealMotionParams:
    own = {f.name for f in fields(RealMotionParams)} - {"base"}
    base = MotionParams(**{k: v for k, v in values.items() if k not in own})
    return RealMotionParams(base, **{k: v for k, v in values.items() if k in own})


def sample_real_motion(rng: np.random.Generator) -> RealMotionParams:
    """Draw a motion whose landmark statistics match real lungs (DIR-Lab, POPI; see the module docstring)."""
    return _real_motion({name: rng.uniform(low, high) for name, (low, high) in REAL_MOTION_RANGES.items()})


def population_motion() -> RealMotionParams:
    """The middle of every range of :func:`sample_real_motion`: the motion of a typical patient."""
    return _real_motion({name: 0.5 * (low + high) for name, (low, high) in REAL_MOTION_RANGES.items()})


def _block_mean(u: np.ndarray, factor: int) -> np.ndarray:
    """(C, Z*f, Y*f, X*f) -> (C, Z, Y, X): the value at the coarse voxel centres."""
    c, z, y, x = u.shape
    return u.reshape(c, z // factor, factor, y // factor, factor, x // factor, factor).mean(axis=(2, 4, 6))


def build_real_motion_field(seg: ThoraxSegmentation, motion: RealMotionParams, grid: Grid) -> MotionField:
    """The patient's two motion bases on the scan ``grid``, built on ``seg`` (a finer grid over the same box).

    ``seg.grid`` must be ``grid`` refined by an integer factor (the simulation's fine grid).
    """
    factor = seg.grid.shape[0] // grid.shape[0]
    if seg.grid.shape != tuple(n * factor for n in grid.shape):
        raise BreathcastError(f"segmentation grid {seg.grid.shape} is not an integer refinement of the scan grid {grid.shape}")
    m = motion.base
    g = seg.grid
    sp = g.spacing_zyx
    nz, ny, nx = g.shape
    x = (g.origin[0] + g.spacing[0] * np.arange(nx))[None, None, :]
    y = (g.origin[1] + g.spacing[1] * np.arange(ny))[None, :, None]
    z = (g.origin[2] + g.spacing[2] * np.arange(nz))[:, None, None]
    lungs = seg.lungs
    low, high = lung_bounding_box_mm(seg)
    mid_x, mid_y = 0.5 * (low[0] + high[0]), 0.5 * (low[1] + high[1])
    half_x, half_y = max(0.5 * (high[0] - low[0]), 50.0), max(0.5 * (high[1] - low[1]), 40.0)

    dome = seg.dome_z_mm[None]
    apex = seg.apex_z_mm
    profile = si_height_profile(z, dome, apex, m, min_span_mm=30.0)
    depth = signed_distance_mm(seg.cavity, sp)  # mm inside the moving cavity
    inside = smooth_step(depth, m.sliding_width_mm)  # = sliding_weight(seg, width), from the depth computed once
    right = smooth_step(mid_x - x, 20.0)  # LPS: the patient's right is -x
    side = m.right_to_left * right + (1.0 - right)
    back = posterior_profile((y - mid_y) / half_y, m.posterior_gain)
    si = (m.si_amplitude_mm * profile * inside * side * back).astype(np.float32)

    # Pull-back, amplitude 1: the tissue seen at x came from further superior (+z) and nearer the lungs' centre.
    si_lps = np.zeros((3, nz, ny, nx), dtype=np.float32)
    si_lps[2] = si
    base = float(np.percentile(seg.dome_z_mm[lungs.any(axis=0)], 2))  # the lowest lung point; completed past a cut
    height = (z - 0.5 * (apex + base)) / max(0.5 * (apex - base), 40.0)
    shift = lung_posterior_shift(height, np.abs(x - mid_x) / half_x, depth, m)
    si_lps[1] = -si * (motion.lung_ap_ratio * np.clip((y - mid_y) / half_y, -1.0, 1.0) + shift)
    si_lps[0] = -motion.lung_lr_ratio * si * np.clip((x - mid_x) / half_x, -1.0, 1.0)

    # Chest and abdominal wall: outward, growing towards the lower thorax, zero at the spine and behind it.
    body = seg.body
    body_y = np.flatnonzero(body.any(axis=(0, 2)))
    front = float(g.origin[1] + g.spacing[1] * body_y[0])
    if seg.spine.any():
        still = float(g.origin[1] + g.spacing[1] * np.argwhere(seg.spine)[:, 1].min())
    else:
        still = float(g.origin[1] + g.spacing[1] * body_y[-1]) - 0.25 * (g.spacing[1] * (body_y[-1] - body_y[0]))
    anterior = np.clip((still - y) / max(still - front, 1.0), 0.0, 1.0)
    dome_mean = float(np.mean(seg.dome_z_mm[lungs.any(axis=0)]))
    lower = 0.5 + 0.5 * np.clip((apex - z) / max(apex - dome_mean, 30.0), 0.0, 1.3)
    near_body = smooth_step(signed_distance_mm(body, sp) + 10.0, 5.0)  # fades out within ~20 mm outside the skin
    cw_lps = np.zeros((3, nz, ny, nx), dtype=np.float32)
    cw_lps[1] = m.chest_wall_mm * anterior * lower * near_body
    cw_lps[0] = -m.lateral_mm * np.clip((x - mid_x) / (1.3 * half_x), -1.0, 1.0) * lower * near_body * (1.0 - 0.8 * (1.0 - anterior))
    field = MotionField(
        si=field_from_lps_mm(_block_mean(si_lps, factor), grid),
        chest_wall=field_from_lps_mm(_block_mean(cw_lps, factor), grid),
        params=m,
    )
    # The sliding layer folds where the cavity's edge is slanted or stepped along z and the motion is large.
    return without_folds(field)


def _add_tumour(hu: np.ndarray, labels: np.ndarray, seg: ThoraxSegmentation, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Put a soft-tissue sphere in a lung (lower lobes favoured); returns (centre LPS mm, radius mm)."""
    radius = float(rng.uniform(6.0, 14.0))
    depth = signed_distance_mm(seg.lungs, seg.grid.spacing_zyx)
    candidates = np.argwhere(depth > radius + 6.0)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max())
    weights = 1.0 + (candidates[:, 0].max() - candidates[:, 0]) / max(1, np.ptp(candidates[:, 0]))
    pick = candidates[rng.choice(len(candidates), p=weights / weights.sum())]
    centre = seg.grid.index_to_lps(pick)
    g = seg.grid
    zz, yy, xx = np.ogrid[: g.shape[0], : g.shape[1], : g.shape[2]]
    d2 = ((zz - pick[0]) * g.spacing[2]) ** 2 + ((yy - pick[1]) * g.spacing[1]) ** 2 + ((xx - pick[2]) * g.spacing[0]) ** 2
    sphere = d2 <= radius**2
    hu[sphere] = 30.0 + rng.normal(0.0, 15.0, size=int(sphere.sum()))
    labels[sphere] = Label.TUMOUR
    return centre, radius


@dataclass(frozen=True)
class RealPatientAnatomy:
    """A real-CT patient before scanning: its box, rest anatomy, segmentation and breathing motion.

    Args:
        grid: the scan grid (the lung-centred model box).
        fine_hu: (Z*f, Y*f, X*f) float32 HU, the augmented rest anatomy (exhale) on the fine grid.
        fine_labels: its labels (the segmentation's, with the tumour).
        segmentation: the segmentation on the fine grid the motion was built on.
        motion_field: the breathing motion on ``grid``.
        motion: its parameters.
        record: what the anatomy was made from.
    """

    grid: Grid
    fine_hu: np.ndarray
    fine_labels: np.ndarray
    segmentation: ThoraxSegmentation
    motion_field: MotionField
    motion: RealMotionParams
    record: RealAnatomy


def build_realct_anatomy(source: AnatomySource, rng: np.random.Generator, config: SimulationConfig = SimulationConfig()) -> RealPatientAnatomy:
    """Draw a patient on ``source``: augmentation, motion, the jittered lung-centred box, tumour, motion bases."""
    aug = sample_augmentation(rng)
    motion = sample_real_motion(rng)
    source_centre = source.lung_centre_lps_mm
    # The augmentation keeps the source's lung centre in place; the box sits there, jittered.
    box_centre = source_centre + rng.uniform(-1.0, 1.0, size=3) * np.asarray(config.box_jitter_mm)
    grid = lung_centred_grid(box_centre, (config.grid_size,) * 3, config.field_of_view_mm)
    factor = config.supersampling
    fine_grid = grid.with_shape(tuple(n * factor for n in grid.shape))
    fine_hu = augmented_anatomy(source, aug, fine_grid, source_centre)
    seg = segment_thorax(Volume(fine_hu, fine_grid))
    fine_labels = seg.labels.copy()
    tumour_centre, tumour_radius = _add_tumour(fine_hu, fine_labels, seg, rng)
    record = RealAnatomy(source.name, source.flipped_anterior_posterior, aug, tuple(float(c) for c in tumour_centre), tumour_radius)
    return RealPatientAnatomy(grid, fine_hu, fine_labels, seg, build_real_motion_field(seg, motion, grid), motion, record)


def simulate_realct_patient(
    source: AnatomySource, seed: int, config: SimulationConfig = SimulationConfig(), patient_id: str = ""
) -> SimulatedPatient:
    """One patient on ``source``'s anatomy: augmented, in its lung-centred box, breathing, scanned.

    Args:
        source: the real CT (see :func:`load_anatomy_source`).
        seed: everything about the patient derives from it.
        config: the scan grid (model box), protocol and field-of-view variation, as the cartoon's.
        patient_id: stored with the patient; defaults to ``f"{source.name}-{seed}"``.
    """
    rng = np.random.default_rng(seed)
    anatomy = build_realct_anatomy(source, rng, config)
    scan_config = SimulationConfig(**{**config.__dict__, "noise_hu": anatomy.record.augmentation.noise_hu})
    grid = anatomy.grid
    session = acquire_session(anatomy.fine_hu, anatomy.fine_labels, anatomy.motion_field, grid, scan_config, rng, scanner_fov(grid, config, rng))
    return patient_from_session(patient_id or f"{source.name}-{seed}", seed, grid, anatomy.record, anatomy.motion, session)


def simulate_realct_dataset(
    out_dir: Path,
    sources: list[AnatomySource],
    patients_per_source: int,
    config: SimulationConfig = SimulationConfig(),
    seed: int = 0,
    first_index: int = 0,
    progress: bool = False,
) -> list[Path]:
    """``patients_per_source`` patients on each source CT into ``out_dir`` (``patient_{i:03d}``, i from
    ``first_index``), seeded from ``seed`` as the cartoon's :func:`~breathcast.sim.simulator.simulate_dataset`."""
    if patients_per_source < 1 or not sources:
        raise BreathcastError(f"need at least one source CT and one patient per source, got {len(sources)} and {patients_per_source}")
    out_dir = prepare_output_dir(out_dir)
    folders = []
    jobs = [(s, first_index + i * len(sources) + k) for i in range(patients_per_source) for k, s in enumerate(sources)]
    for source, index in tqdm(jobs, desc="simulating real-anatomy patients", unit="patient", disable=not progress):
        patient = simulate_realct_patient(source, patient_seed(seed, index), config, patient_id=f"patient_{index:03d}")
        folders.append(save_patient(patient, out_dir))
    describe_dataset(out_dir, {"name": "breathcast real-anatomy simulator", "seed": seed, "config": config,
                               "sources": [{"name": s.name, "flipped_anterior_posterior": s.flipped_anterior_posterior} for s in sources]},
                     key="generator_real_anatomy")
    return folders
