"""Simulated 4DCT: one breathing cycle binned into phase volumes, with the true field of every phase.

A clinical 4DCT sorts the slices of a slow scan into ``n_phases`` bins of the breathing cycle and reconstructs
one volume per bin; every slice of a phase shows (nearly) the same breathing state. Phase 0 % is end-inhale
and 50 % end-exhale, as scanners label them. The cycle's amplitude is the asymmetric cosine of Lujan et al.
(1999), ``A(φ) = peak · cos^(2n)(π φ)``: the exhale branch (0-50 %) falls, the inhale branch (50-100 %) rises,
and breathing lingers near end-exhale for n > 1. The rate is ``dA/dt = dA/dφ / period`` (1/s), so it has
the branch's sign.

The anatomy is a cartoon patient or a real CT (:mod:`breathcast.sim.realct`), in the lung-centred model box,
moved by the same motion model as the free-breathing simulator; the truth is each phase's pull-back field
from the rest anatomy (end-exhale, A = 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.sim.realct import AnatomySource, build_realct_anatomy
from breathcast.sim.simulator import RestAnatomy, SimulationConfig, cartoon_anatomy, image_at, scanner_fov

__all__ = ["FourDCTConfig", "FourDCT", "breathing_cycle", "simulate_4dct"]


@dataclass(frozen=True)
class FourDCTConfig:
    """How to simulate a 4DCT.

    Args:
        n_phases: phase bins over one cycle (10 on most scanners).
        period_s: (min, max) breathing period drawn per patient, s.
        peak_amplitude: (min, max) end-inhale amplitude drawn per patient (1 = the population's typical inhale).
        lujan_n: (min, max) the exponent n of cos^(2n): larger lingers longer at end-exhale.
        simulation: the scan grid, supersampling and noise, as the free-breathing scans'.
        crop_to_scanner: let the scanner's field of view cut the body and lungs as it may the free-breathing
            scans' (:func:`~breathcast.sim.simulator.scanner_fov`); off by default, since a planning 4DCT is
            prescribed to cover the lungs.
    """

    n_phases: int = 10
    period_s: tuple[float, float] = (3.5, 5.0)
    peak_amplitude: tuple[float, float] = (0.8, 1.1)
    lujan_n: tuple[float, float] = (1.0, 2.0)
    simulation: SimulationConfig = SimulationConfig()
    crop_to_scanner: bool = False

    def __post_init__(self) -> None:
        if self.n_phases < 3:
            raise BreathcastError(f"a 4DCT needs at least 3 phases, got {self.n_phases}")


@dataclass(frozen=True)
class FourDCT:
    """A simulated 4DCT and its truth.

    Args:
        patient_id: who.
        grid: the phases' grid.
        phase_percent: (P,) the bins' phase, percent of the cycle from end-inhale.
        images_hu: (P, Z, Y, X) float32 HU.
        labels: (P, Z, Y, X) uint8 labels as each phase shows them.
        fields: (P, 3, Z, Y, X) float32 voxels, pull-back from the rest anatomy: ``phase(x) = rest(x + u(x))``.
        amplitude: (P,) breathing amplitude of each phase; rate: (P,) its rate, 1/s.
        period_s: the cycle's period.
        rest_hu, rest_labels: the rest anatomy (A = 0) on ``grid``.
        anatomy, motion: what made the patient (stored with it).
    """

    patient_id: str
    grid: Grid
    phase_percent: np.ndarray
    images_hu: np.ndarray
    labels: np.ndarray
    fields: np.ndarray
    amplitude: np.ndarray
    rate: np.ndarray
    period_s: float
    rest_hu: np.ndarray
    rest_labels: np.ndarray
    anatomy: object
    motion: object


def breathing_cycle(phase: np.ndarray, period_s: float, peak: float = 1.0, n: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and rate (1/s) at cycle phases (fractions, 0 = end-inhale), Lujan's ``peak · cos^(2n)(π φ)``.

    Example:
        >>> a, r = breathing_cycle(np.array([0.0, 0.25, 0.5, 0.75]), period_s=4.0)
        >>> np.round(a, 3).tolist(), bool(r[1] < 0 < r[3])
        ([1.0, 0.5, 0.0, 0.5], True)
    """
    phase = np.asarray(phase, dtype=np.float64)
    c, s = np.cos(np.pi * phase), np.sin(np.pi * phase)
    amplitude = peak * np.abs(c) ** (2 * n)
    # d/dφ cos^(2n)(πφ) = -2n π cos^(2n-1)(πφ) sin(πφ), the odd power keeping cos's sign.
    d_phase = -2.0 * n * np.pi * peak * np.sign(c) * np.abs(c) ** (2 * n - 1) * s
    return amplitude, d_phase / period_s


def simulate_4dct(
    seed: int,
    config: FourDCTConfig = FourDCTConfig(),
    source: AnatomySource | None = None,
    patient_id: str = "",
) -> FourDCT:
    """A 4DCT of a cartoon patient (``source`` None) or of a real CT's anatomy, with the truth of every phase.

    Args:
        seed: everything about the patient derives from it.
        config: phases, breathing and the scan grid.
        source: a real CT as anatomy (:func:`breathcast.sim.realct.load_anatomy_source`), or None.
        patient_id: defaults to ``f"4dct{seed}"``.
    """
    rng = np.random.default_rng(seed)
    sim = config.simulation
    if source is None:
        rest = cartoon_anatomy(rng, sim)
    else:
        real = build_realct_anatomy(source, rng, sim)
        rest = RestAnatomy(real.grid, real.fine_hu, real.fine_labels, real.motion_field, real.record, real.motion)
        sim = dataclasses.replace(sim, noise_hu=real.record.augmentation.noise_hu)
    outside = scanner_fov(rest.grid, sim, rng) if config.crop_to_scanner else None
    period = float(rng.uniform(*config.period_s))
    peak = float(rng.uniform(*config.peak_amplitude))
    n = float(rng.uniform(*config.lujan_n))
    percent = 100.0 * np.arange(config.n_phases) / config.n_phases
    amplitude, rate = breathing_cycle(percent / 100.0, period, peak, n)
    noise_rng = np.random.default_rng(int(rng.integers(2**31)))
    images, labels, fields = [], [], []
    for a, r in zip(amplitude, rate):
        u = rest.motion_field.displacement(a, r)
        image, label = image_at(rest.fine_hu, rest.fine_labels, u, sim, noise_rng, outside)
        images.append(image)
        labels.append(label)
        fields.append(u)
    rest_hu, rest_labels = image_at(rest.fine_hu, rest.fine_labels, np.zeros((3, *rest.grid.shape), np.float32), sim, noise_rng, outside)
    return FourDCT(
        patient_id=patient_id or f"4dct{seed}",
        grid=rest.grid,
        phase_percent=percent,
        images_hu=np.stack(images),
        labels=np.stack(labels),
        fields=np.stack(fields),
        amplitude=amplitude,
        rate=rate,
        period_s=period,
        rest_hu=rest_hu,
        rest_labels=rest_labels,
        anatomy=rest.anatomy,
        motion=rest.motion,
    )
