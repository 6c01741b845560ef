"""4DCT as DICOM: one CT series per breathing phase, read with every check, and written as scanners write it.

A 4DCT folder holds one series per phase bin (files in sub-folders included). Each series' phase comes from,
in order: a mapping the user gives (SeriesDescription, SeriesInstanceUID or folder name -> percent), the
Enhanced CT tag NominalPercentageOfRespiratoryPhase (0020,9245), or a percentage in the SeriesDescription
("Gated, 50.0%", "CT 4D 20%", "T=30%"). Refused, with the series named: a series without a phase, two series
of one phase, phases that are not evenly spaced over the cycle (a phase missing), series on different Frames
of Reference or geometries (shape, spacing, origin, direction), fewer than 3 phases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, grid_difference
from breathcast.io.dicom_io import CTSeries, SeriesIdentity, new_series_identity, read_ct_study, read_dicom_file, write_ct_series
from breathcast.io.files import atomic_output_dir

__all__ = ["PhaseSeries", "phase_description", "phase_from_description", "read_4dct", "write_4dct"]

_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


@dataclass(frozen=True)
class PhaseSeries:
    """One phase of a 4DCT: its percent of the cycle (0 = end-inhale), the series, and where the percent came from."""

    percent: float
    series: CTSeries
    percent_from: str


def phase_description(percent: float) -> str:
    """The SeriesDescription a scanner gives a phase bin, e.g. ``"Gated, 50.0%"``."""
    return f"Gated, {percent:.1f}%"


def phase_from_description(description: str) -> float | None:
    """The phase percent written in a SeriesDescription, or None.

    Example:
        >>> phase_from_description("Gated, 50.0%"), phase_from_description("CT 4D  T=30 %"), phase_from_description("Ave-IP")
        (50.0, 30.0, None)
    """
    found = _PERCENT.findall(description or "")
    return float(found[-1]) if found else None


def _series_folder(series: CTSeries) -> str:
    return str(Path(series.files[0]).parent) if series.files else ""


def _phase_of(series: CTSeries, phases: dict[str, float] | None) -> tuple[float | None, str]:
    identity = series.identity
    if phases:
        folder = Path(_series_folder(series)).name
        for key in (identity.series_description, identity.series_instance_uid, folder):
            if key in phases:
                return float(phases[key]), "given"
        return None, "given"
    if series.files:
        ds = read_dicom_file(Path(series.files[0]), stop_before_pixels=True)
        nominal = ds.get("NominalPercentageOfRespiratoryPhase") if ds is not None else None
        if nominal is not None:
            return float(nominal), "NominalPercentageOfRespiratoryPhase"
    return phase_from_description(identity.series_description), "SeriesDescription"


def read_4dct(folder: Path | str, phases: dict[str, float] | None = None) -> list[PhaseSeries]:
    """Read a 4DCT folder: every CT series, its phase, all checked to be one 4DCT; sorted by phase.

    Args:
        folder: the folder of the phase series.
        phases: optional mapping SeriesDescription / SeriesInstanceUID / folder name -> phase percent; when
            given, series it does not name are ignored (an average or MIP series beside the phases).

    Raises:
        BreathcastError: one line naming the series (its folder and description) for each refusal in the
            module docstring. Nothing is written.
    """
    folder = Path(folder)
    found = []
    for series in read_ct_study(folder):
        percent, source = _phase_of(series, phases)
        where = f"{_series_folder(series) or folder} (series {series.identity.series_description!r})"
        if percent is None:
            if phases:
                continue
            raise BreathcastError(f"{where}: no breathing phase in its tags or description; give the phases with --phase DESCRIPTION=PERCENT")
        if not 0.0 <= percent < 100.0:
            raise BreathcastError(f"{where}: phase {percent}% is outside 0-100%")
        found.append((where, PhaseSeries(percent, series, source)))
    if len(found) < 3:
        raise BreathcastError(f"{folder}: {len(found)} phase series found; a 4DCT needs at least 3")
    found.sort(key=lambda item: item[1].percent)
    first_where, first = found[0]
    for where, phase in found[1:]:
        if phase.series.identity.frame_of_reference_uid != first.series.identity.frame_of_reference_uid:
            raise BreathcastError(f"{where}: Frame of Reference differs from {first_where}; all phases must share one")
        why = grid_difference(first.series.volume.grid, phase.series.volume.grid)
        if why:
            raise BreathcastError(f"{where}: geometry differs from {first_where}: {why}")
    percents = np.array([p.percent for _, p in found])
    duplicate = np.flatnonzero(np.diff(percents) < 1e-6)
    if duplicate.size:
        raise BreathcastError(f"{found[duplicate[0] + 1][0]}: phase {percents[duplicate[0]]}% appears twice (also {found[duplicate[0]][0]})")
    step = 100.0 / len(percents)
    expected = percents[0] + step * np.arange(len(percents))
    if not np.allclose(percents, expected, atol=0.05 * step):
        raise BreathcastError(
            f"{folder}: phases {', '.join(f'{p:g}%' for p in percents)} are not evenly spaced over the cycle; "
            "is a phase missing?"
        )
    return [phase for _, phase in found]


def write_4dct(
    images_hu: np.ndarray,
    grid: Grid,
    phase_percent: np.ndarray,
    folder: Path | str,
    patient_id: str = "",
    orientation: str | None = None,
) -> list[SeriesIdentity]:
    """Write a 4DCT as a scanner does: one CT series per phase in sub-folders ``phase_NN``, one study and
    Frame of Reference, SeriesDescription ``"Gated, 50.0%"`` (:func:`phase_description`); written whole or not at all.

    Args:
        images_hu: (P, Z, Y, X) HU, one volume per phase, on ``grid``.
        grid: the phases' grid.
        phase_percent: (P,) phase of each volume, percent of the cycle from end-inhale.
        folder: must not exist or be empty.
        patient_id: PatientID of the series.
        orientation: a PatientPosition to store the series in (see :func:`write_ct_series`), None as ``grid``.

    Returns:
        The identity of each phase series.
    """
    folder = Path(folder)
    identities: list[SeriesIdentity] = []
    first: SeriesIdentity | None = None
    with atomic_output_dir(folder) as tmp:
        for k, (image, percent) in enumerate(zip(images_hu, phase_percent)):
            identity = new_series_identity(first, grid.shape[0], grid.frame_of_reference_uid)
            if first is None and patient_id:
                identity = replace(identity, patient_id=patient_id, patient_name=patient_id)
            written = write_ct_series(
                Volume(np.asarray(image, dtype=np.float32), grid),
                tmp / f"phase_{k:02d}",
                reference=first,
                description=phase_description(float(percent)),
                series_number=100 + k,
                derivation="breathcast: simulated 4DCT phase",
                orientation=orientation,
                identity=identity,
            )
            first = first or written
            identities.append(written)
    return identities
