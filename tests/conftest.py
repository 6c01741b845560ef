"""Shared fixtures: small simulated patients and the project's shared real data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from breathcast.sim.simulator import SimulatedPatient, SimulationConfig, simulate_patient

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_file(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is not there."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


@pytest.fixture(scope="session")
def small_patient() -> SimulatedPatient:
    """A 48³ patient with 6 noiseless scans, the whole body in view: quick, its ground truth exact up to interpolation."""
    return simulate_patient(13, SimulationConfig(grid_size=48, n_scans=6, noise_hu=0.0, crop_probability=0.0))


@pytest.fixture(scope="session")
def thorax64() -> SimulatedPatient:
    """A 64³ patient with one noiseless scan, the whole body in view: its trachea is seen (at 48³ it is not), which
    the plan check's head-feet cue needs."""
    return simulate_patient(3, SimulationConfig(grid_size=64, n_scans=1, noise_hu=0.0, crop_probability=0.0))
