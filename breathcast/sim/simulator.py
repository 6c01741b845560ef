"""The synthetic 5DCT simulator: patients, fast helical free-breathing scans, and their ground truth.

A patient is an anatomy (:mod:`breathcast.sim.anatomy`), a breathing motion (:mod:`breathcast.sim.motion`) and a
breathing trace (:mod:`breathcast.traces`). Each of the ``n_scans`` scans is a fast helical sweep: slice z
is acquired at its own time t_z, so it shows the anatomy at the breathing state (A(t_z), Ȧ(t_z)). The
anatomy is rendered once on a grid ``supersampling`` times finer than the scan grid and blurred by the
scanner's point-spread function; each scan samples it at the displaced positions x + u_k(x), then gets
CT noise. The ground-truth field u_k of every scan (pull-back from the rest anatomy) is kept, so errors
can be measured against the truth, which the paper could not do.

Everything is deterministic from the patient's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from breathcast.sim.anatomy import DICE_BUCKETS, LUNG_LABELS, AnatomyParams, Label, render_phantom, sample_anatomy
from breathcast.io.dataset import describe_dataset, prepare_output_dir, write_patient
from breathcast.errors import BreathcastError
from breathcast.geometry import HU_MIN, Grid, Triplet
from breathcast.model_box import lung_centred_grid
from breathcast.sim.motion import MotionField, MotionParams, build_motion_field, sample_motion
from breathcast.warp import compose, invert
from breathcast.traces import (
    BreathingTrace,
    HelicalScan,
    TraceConfig,
    axial_slice_positions_mm,
    sample_trace_config,
    synthetic_trace,
)

__all__ = [
    "MIN_GRID_SIZE",
    "SimulationConfig",
    "SimulatedScan",
    "SimulatedPatient",
    "RestAnatomy",
    "cartoon_anatomy",
    "simulate_patient",
    "scanner_fov",
    "image_at",
    "Session",
    "acquire_session",
    "patient_from_session",
    "pair_field",
    "patient_seed",
    "save_patient",
    "simulate_dataset",
]

MIN_GRID_SIZE = 16


@dataclass(frozen=True)
class SimulationConfig:
    """How to simulate a patient.

    Args:
        grid_size: scan grid is grid_size³ voxels (Z = Y = X).
        n_scans: free-breathing helical scans per patient (25 in the paper's protocol).
        field_of_view_mm: (x, y, z) extent of the scan grid.
        supersampling: the anatomy is rendered on a grid this many times finer per axis.
        noise_hu: standard deviation of CT noise (HU).
        blur_voxels: Gaussian point-spread sigma, in scan voxels.
        scan_gap_s: (min, max) pause between two consecutive scans, seconds.
        rotation_time_s: gantry rotation time of the helical scans.
        pitch: helical pitch.
        collimation_mm: total beam collimation; table speed = pitch * collimation / rotation time.
        n_tumours: lung tumours per patient.
        box_jitter_mm: (x, y, z) largest offset of the scan grid's centre from the lungs' centre.
        crop_probability: chance that the scanner's field of view is smaller than the grid.
        fov_radius_mm: (min, max) radius of that reconstruction circle.
        fov_half_height_mm: (min, max) extent of that field of view above and below the grid's centre.
    """

    grid_size: int = 64
    n_scans: int = 25
    field_of_view_mm: Triplet = (400.0, 400.0, 320.0)
    supersampling: int = 2
    noise_hu: float = 15.0
    blur_voxels: float = 0.8
    scan_gap_s: tuple[float, float] = (2.0, 7.0)
    rotation_time_s: float = 0.28
    pitch: float = 1.0
    collimation_mm: float = 38.4
    n_tumours: int = 1
    box_jitter_mm: Triplet = (15.0, 15.0, 25.0)
    crop_probability: float = 0.4
    fov_radius_mm: tuple[float, float] = (150.0, 260.0)
    fov_half_height_mm: tuple[float, float] = (90.0, 200.0)

    def __post_init__(self) -> None:
        if self.grid_size < MIN_GRID_SIZE:
            raise BreathcastError(f"grid must be at least {MIN_GRID_SIZE} voxels, got {self.grid_size}")
        if self.n_scans < 1:
            raise BreathcastError(f"need at least one scan per patient, got {self.n_scans}")
        if self.supersampling < 1:
            raise BreathcastError(f"supersampling must be >= 1, got {self.supersampling}")


@dataclass(frozen=True)
class SimulatedScan:
    """One fast helical free-breathing scan.

    Args:
        image_hu: (Z, Y, X) float32 CT in HU.
        labels: (Z, Y, X) uint8 :class:`~breathcast.sim.anatomy.Label` ids, the anatomy as the scan shows it.
        field: (3, Z, Y, X) float32 voxels (dz, dy, dx): ground-truth pull-back from the rest anatomy,
            ``image(x) = rest(x + field(x))``.
        slice_times_s: (Z,) acquisition time of each slice, seconds on the session clock.
        amplitude: (Z,) breathing amplitude at each slice's time (the per-slice trace b).
        rate: (Z,) d amplitude / dt at each slice's time, 1/s.
        direction: helical direction, as :class:`~breathcast.traces.HelicalScan` names it.
    """

    image_hu: np.ndarray
    labels: np.ndarray
    field: np.ndarray
    slice_times_s: np.ndarray
    amplitude: np.ndarray
    rate: np.ndarray
    direction: str


@dataclass(frozen=True)
class SimulatedPatient:
    """A simulated patient: rest anatomy, scans, trace, and what made them."""

    patient_id: str
    seed: int
    grid: Grid
    anatomy: AnatomyParams
    motion: MotionParams
    trace_config: TraceConfig
    trace: BreathingTrace
    reference_hu: np.ndarray
    reference_labels: np.ndarray
    scans: list[SimulatedScan] = field(default_factory=list)


def _sample_on_fine_grid(fine: np.ndarray, coords_coarse: np.ndarray, factor: int, order: int) -> np.ndarray:
    """Sample ``fine`` at scan-grid voxel coordinates (3, Z, Y, X) (z, y, x order), edges clamped."""
    coords = (coords_coarse + 0.5) * factor - 0.5
    return ndimage.map_coordinates(fine, coords, order=order, mode="nearest", prefilter=False)


@dataclass(frozen=True)
class RestAnatomy:
    """A patient before scanning: the scan grid and the rest anatomy on a finer grid, with its breathing motion.

    Args:
        grid: the scan grid (the lung-centred model box).
        fine_hu: (Z*f, Y*f, X*f) float32 HU on ``grid`` refined ``supersampling`` = f times, blurred.
        fine_labels: its uint8 labels.
        motion_field: the breathing motion on ``grid``.
        anatomy, motion: what made them (cartoon or real-anatomy parameters, stored with the patient).
    """

    grid: Grid
    fine_hu: np.ndarray
    fine_labels: np.ndarray
    motion_field: MotionField
    anatomy: Any
    motion: Any


def cartoon_anatomy(rng: np.random.Generator, config: SimulationConfig = SimulationConfig()) -> RestAnatomy:
    """Draw a cartoon patient: anatomy, motion, the jittered lung-centred box, rendered on the fine grid."""
    anatomy = sample_anatomy(rng, n_tumours=config.n_tumours)
    motion = sample_motion(rng)
    grid = _lung_centred_box(anatomy, config, rng)
    factor = config.supersampling
    fine_grid = grid.with_shape(tuple(n * factor for n in grid.shape))
    fine_hu, fine_labels = render_phantom(anatomy, fine_grid)
    fine_hu = ndimage.gaussian_filter(fine_hu, sigma=config.blur_voxels * factor, mode="nearest")
    return RestAnatomy(grid, fine_hu, fine_labels, build_motion_field(anatomy, motion, grid), anatomy, motion)


def simulate_patient(seed: int, config: SimulationConfig = SimulationConfig(), patient_id: str = "") -> SimulatedPatient:
    """Simulate one cartoon patient: the rest anatomy and ``config.n_scans`` helical scans with ground truth.

    The scan grid is the model box (``config.field_of_view_mm``) centred on the patient's lungs, moved by up
    to ``config.box_jitter_mm`` (the error of finding the lungs in a real plan), as the engine places it.

    Args:
        seed: everything about the patient derives from it.
        config: grid, scan protocol, noise.
        patient_id: stored with the patient; defaults to ``f"sim{seed}"``.
    """
    rng = np.random.default_rng(seed)
    rest = cartoon_anatomy(rng, config)
    grid = rest.grid
    session = acquire_session(rest.fine_hu, rest.fine_labels, rest.motion_field, grid, config, rng, scanner_fov(grid, config, rng))
    return patient_from_session(patient_id or f"sim{seed}", seed, grid, rest.anatomy, rest.motion, session)


def _lung_centred_box(anatomy: AnatomyParams, config: SimulationConfig, rng: np.random.Generator) -> Grid:
    """The scan grid: the model box centred on the lungs (found on a coarse rendering), jittered."""
    coarse = Grid.centered((48, 48, 48), (480.0, 480.0, 400.0))
    _, labels = render_phantom(anatomy, coarse)
    lungs = np.isin(labels, (Label.LUNG_LEFT, Label.LUNG_RIGHT))
    index = np.argwhere(lungs)
    centre = 0.5 * (coarse.index_to_lps(index.min(axis=0)) + coarse.index_to_lps(index.max(axis=0)))
    centre = centre + rng.uniform(-1.0, 1.0, size=3) * np.asarray(config.box_jitter_mm)
    return lung_centred_grid(centre, (config.grid_size,) * 3, config.field_of_view_mm)


def scanner_fov(grid: Grid, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray | None:
    """(Z, Y, X) bool, True where the scanner saw nothing: a reconstruction circle and a z range that
    may cut the body and the lungs (drawn with probability ``config.crop_probability``), else None."""
    if rng.uniform() >= config.crop_probability:
        return None
    nz, ny, nx = grid.shape
    x = (grid.origin[0] + grid.spacing[0] * np.arange(nx))[None, None, :]
    y = (grid.origin[1] + grid.spacing[1] * np.arange(ny))[None, :, None]
    z = (grid.origin[2] + grid.spacing[2] * np.arange(nz))[:, None, None]
    centre = grid.index_to_lps(np.asarray(grid.shape) / 2.0 - 0.5)
    radius = rng.uniform(*config.fov_radius_mm)
    low = centre[2] - rng.uniform(*config.fov_half_height_mm)
    high = centre[2] + rng.uniform(*config.fov_half_height_mm)
    circle = (x - centre[0] - rng.normal(0, 15.0)) ** 2 + (y - centre[1] - rng.normal(0, 15.0)) ** 2 > radius**2
    return np.broadcast_to(circle | (z < low) | (z > high), grid.shape).copy()


@dataclass(frozen=True)
class Session:
    """One simulated scanning session: the breathing trace, the rest images and the helical scans."""

    trace_config: TraceConfig
    trace: BreathingTrace
    reference_hu: np.ndarray
    reference_labels: np.ndarray
    scans: list[SimulatedScan]


def acquire_session(
    fine_hu: np.ndarray,
    fine_labels: np.ndarray,
    motion_field: MotionField,
    grid: Grid,
    config: SimulationConfig,
    rng: np.random.Generator,
    outside_fov: np.ndarray | None = None,
) -> Session:
    """Scan a rest anatomy ``config.n_scans`` times while it breathes: fast helical sweeps, back to back.

    Args:
        fine_hu: rest anatomy (HU) on ``grid`` refined ``config.supersampling`` times per axis, blurred.
        fine_labels: its labels, same grid.
        motion_field: the breathing motion on ``grid`` (scan voxels).
        grid: the scan grid.
        config: scan protocol and noise.
        rng: draws the session (pauses, trace, noise).
        outside_fov: (Z, Y, X) bool, where the scanner saw nothing (air, -1000 HU, in every image); None: all seen.
    """
    slice_z_mm = axial_slice_positions_mm(grid)
    protocols, start = [], float(rng.uniform(3.0, 6.0))
    for k in range(config.n_scans):
        helical = HelicalScan(
            rotation_time_s=config.rotation_time_s,
            pitch=config.pitch,
            collimation_mm=config.collimation_mm,
            start_time_s=start,
            direction="cranio-caudal" if k % 2 == 0 else "caudo-cranial",
        )
        protocols.append(helical)
        start += float(np.ptp(slice_z_mm)) / helical.table_speed_mm_s + float(rng.uniform(*config.scan_gap_s))
    trace_config = sample_trace_config(rng, TraceConfig(duration_s=start + 5.0))
    trace = synthetic_trace(trace_config, seed=int(rng.integers(2**31)))

    noise_rng = np.random.default_rng(int(rng.integers(2**31)))

    def acquire(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return image_at(fine_hu, fine_labels, u, config, noise_rng, outside_fov)

    reference_hu, reference_labels = acquire(np.zeros((3, *grid.shape), dtype=np.float32))
    scans = []
    for helical in protocols:
        times = helical.slice_times(slice_z_mm)
        amplitude, rate = trace.amplitude_at(times), trace.rate_at(times)
        u = motion_field.displacement(amplitude, rate)
        image, labels = acquire(u)
        scans.append(SimulatedScan(image, labels, u, times, amplitude, rate, helical.direction.value))
    return Session(trace_config, trace, reference_hu, reference_labels, scans)


def image_at(
    fine_hu: np.ndarray,
    fine_labels: np.ndarray,
    u: np.ndarray,
    config: SimulationConfig,
    noise_rng: np.random.Generator,
    outside_fov: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The scan grid's image (HU, float32, with CT noise) and labels of the fine rest anatomy moved by ``u``.

    Args:
        fine_hu, fine_labels: the rest anatomy on the scan grid refined ``config.supersampling`` times.
        u: (3, Z, Y, X) scan-grid voxels, pull-back from the rest anatomy.
        config: supersampling and ``noise_hu``.
        noise_rng: draws the noise.
        outside_fov: (Z, Y, X) bool, where the scanner saw nothing (-1000 HU); None: all seen.
    """
    coords = np.indices(u.shape[1:], dtype=np.float32) + u
    image = _sample_on_fine_grid(fine_hu, coords, config.supersampling, order=1)
    image += noise_rng.normal(0.0, config.noise_hu, size=image.shape).astype(np.float32)
    if outside_fov is not None:
        image[outside_fov] = HU_MIN
    return image.astype(np.float32), _sample_on_fine_grid(fine_labels, coords, config.supersampling, order=0)


def patient_from_session(patient_id: str, seed: int, grid: Grid, anatomy: Any, motion: Any, session: Session) -> SimulatedPatient:
    """A :class:`SimulatedPatient` of a scanned session and what made it (cartoon or real-anatomy parameters)."""
    return SimulatedPatient(
        patient_id=patient_id,
        seed=seed,
        grid=grid,
        anatomy=anatomy,
        motion=motion,
        trace_config=session.trace_config,
        trace=session.trace,
        reference_hu=session.reference_hu,
        reference_labels=session.reference_labels,
        scans=session.scans,
    )


def pair_field(u_moving: np.ndarray, u_fixed: np.ndarray) -> np.ndarray:
    """True field from a moving scan to a fixed scan of one patient, from their fields to the rest anatomy.

    With ``moving = warp(rest, u_moving)`` and ``fixed = warp(rest, u_fixed)``, returns u such that
    ``fixed ≈ warp(moving, u)``: undo the moving scan's motion, then apply the fixed scan's.

    Args:
        u_moving, u_fixed: (3, Z, Y, X) float32 voxels, pull-back from the rest anatomy.

    Returns:
        (3, Z, Y, X) float32 voxels.
    """
    return compose(invert(u_moving), u_fixed)


def patient_seed(dataset_seed: int, index: int) -> int:
    """The seed of patient ``index`` of a dataset made with ``dataset_seed`` (independent streams)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def save_patient(patient: SimulatedPatient, dataset_dir: Path) -> Path:
    """Write a simulated patient into a dataset folder (docs/data-format.md); returns its folder."""
    scans = [
        {
            "image_hu": scan.image_hu,
            "labels": scan.labels,
            "field": scan.field,
            "amplitude": scan.amplitude,
            "rate": scan.rate,
            "slice_times_s": scan.slice_times_s,
            "direction": scan.direction,
        }
        for scan in patient.scans
    ]
    metadata = {
        "simulator": {
            "seed": patient.seed,
            "anatomy": patient.anatomy,
            "motion": patient.motion,
            "trace_config": patient.trace_config,
            "label_names": Label.NAMES,
            "dice_buckets": DICE_BUCKETS,
            "lung_labels": LUNG_LABELS,
        }
    }
    return write_patient(
        dataset_dir,
        patient.patient_id,
        patient.grid,
        scans,
        patient.trace.time_s,
        patient.trace.amplitude,
        reference_hu=patient.reference_hu,
        reference_labels=patient.reference_labels,
        metadata=metadata,
        kind="simulated",
    )


def simulate_dataset(
    out_dir: Path,
    n_patients: int,
    config: SimulationConfig = SimulationConfig(),
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Simulate ``n_patients`` patients into ``out_dir``; patient i is ``patient_{i:03d}``, seeded from ``seed``."""
    if n_patients < 1:
        raise BreathcastError(f"need at least one patient, got {n_patients}")
    out_dir = prepare_output_dir(out_dir)
    folders = []
    for i in tqdm(range(n_patients), desc="simulating patients", unit="patient", disable=not progress):
        patient = simulate_patient(patient_seed(seed, i), config, patient_id=f"patient_{i:03d}")
        folders.append(save_patient(patient, out_dir))
    describe_dataset(out_dir, {"name": "breathcast simulator", "seed": seed, "config": config})
    return folders
