"""Real landmark motion: DIR-Lab 4DCT landmark pairs and the POPI model's landmarks, in one patient frame.

Both readers return :class:`LandmarkPairs`: the same anatomical points at end-exhale and at end-inhale, in mm, in a
patient frame with x towards the patient's left, y posterior and z superior (LPS-like), so that statistics of the
exhale -> inhale motion (:mod:`breathcast.sim.motion_statistics`) read the same on every source and on simulated
fields in patient LPS.

* DIR-Lab (Castillo et al., Phys. Med. Biol. 2009; Med. Phys. 2010), ``caseNN.csv`` as described in
  ``../shared/data/README.md``: 300 pairs, end-exhale ``ee_*`` and end-inhale ``ei_*``, mm = 1-based index x spacing,
  no image geometry. The index z axis runs towards the feet, so z is negated (+z superior). x and y are kept as the
  index axes i (image column) and j (image row) give them, taken as left and posterior (LPS, as an axial image stored
  the way it is displayed, radiological convention, would give). DIR-Lab publishes no direction cosines, so the
  signs of x and y are unverified: trust |LR| and |AP|, not the signed LR and AP means. The origin is arbitrary (the
  index origin), which is harmless: motion statistics use displacements and each sample's own z extent.
* POPI (Vandemeulebroucke et al., ICCR 2007), ``phase00.csv`` (END-INHALE) and ``phase50.csv`` (END-EXHALE): 40
  landmarks in the patient LPS mm of the popi-phase00 DICOM series (columns ``x_lps_mm``, ``y_lps_mm``,
  ``z_lps_mm``), used as they are.

Malformed input raises :class:`~breathcast.errors.DatasetError` with one line that names the file.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breathcast.errors import DatasetError

__all__ = [
    "LandmarkPairs",
    "DIRLAB_MEAN_DISPLACEMENT_MM",
    "read_dirlab_case",
    "read_dirlab_cases",
    "read_popi",
]

DIRLAB_MEAN_DISPLACEMENT_MM: dict[str, float] = {
    "dirlab01": 3.89,
    "dirlab02": 4.34,
    "dirlab03": 6.94,
    "dirlab04": 9.83,
    "dirlab05": 7.48,
    "dirlab06": 10.89,
    "dirlab07": 11.03,
    "dirlab08": 14.99,
    "dirlab09": 7.92,
    "dirlab10": 7.30,
}
"""DIR-Lab's published mean landmark displacement per case (mm), which the files must reproduce."""

_DIRLAB_HEADER = re.compile(
    r"image\s+(\d+)x(\d+)x(\d+)\s+voxels.*?spacing\s+([0-9.]+)\s*x\s*([0-9.]+)\s*x\s*([0-9.]+)\s*mm"
)
_DIRLAB_COLUMNS = tuple(f"{phase}_{axis}" for phase in ("ee", "ei") for axis in ("i", "j", "k")) + tuple(
    f"{phase}_{axis}_mm" for phase in ("ee", "ei") for axis in ("x", "y", "z")
)
_POPI_COLUMNS = ("point", "x_lps_mm", "y_lps_mm", "z_lps_mm")
_INDEX_TOLERANCE_MM = 0.02
"""mm = index x spacing holds to the files' 2-decimal rounding; allow for it (and for the spacing's own rounding)."""


@dataclass(frozen=True)
class LandmarkPairs:
    """The same anatomical points at end-exhale and end-inhale.

    Args:
        name: e.g. ``"dirlab01"``, ``"popi"``.
        exhale_mm: (N, 3) float64 positions at end-exhale, (x, y, z) mm, x left, y posterior, z superior.
        inhale_mm: (N, 3) float64 positions of the same points at end-inhale, same frame.
        source: the file (or files) they were read from, for messages.

    Example:
        >>> p = LandmarkPairs("toy", np.zeros((2, 3)), np.array([[0.0, 0.0, -3.0], [0.0, 4.0, 0.0]]))
        >>> p.displacement_mm[:, 2].tolist(), p.n_points
        ([-3.0, 0.0], 2)
    """

    name: str
    exhale_mm: np.ndarray
    inhale_mm: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        exhale = np.asarray(self.exhale_mm, dtype=np.float64)
        inhale = np.asarray(self.inhale_mm, dtype=np.float64)
        where = f"{self.source}: " if self.source else ""
        if exhale.ndim != 2 or exhale.shape[1] != 3 or exhale.shape != inhale.shape or len(exhale) == 0:
            raise DatasetError(
                f"{where}landmarks must be two equal (N, 3) arrays, got exhale {exhale.shape}, inhale {inhale.shape}"
            )
        if not (np.isfinite(exhale).all() and np.isfinite(inhale).all()):
            raise DatasetError(f"{where}landmark positions must be finite")
        object.__setattr__(self, "exhale_mm", exhale)
        object.__setattr__(self, "inhale_mm", inhale)

    @property
    def n_points(self) -> int:
        return int(self.exhale_mm.shape[0])

    @property
    def displacement_mm(self) -> np.ndarray:
        """(N, 3) exhale -> inhale motion of each point, (x, y, z) mm in the same frame."""
        return self.inhale_mm - self.exhale_mm


def _read_rows(path: Path, columns: tuple[str, ...], skip_lines: int) -> dict[str, np.ndarray]:
    """The named numeric columns of a CSV file (after ``skip_lines`` comment lines), as float64 arrays."""
    try:
        lines = path.read_text().splitlines()[skip_lines:]
    except OSError as error:
        raise DatasetError(f"{path}: cannot read landmark file ({error.strerror})") from error
    reader = csv.DictReader(lines)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DatasetError(f"{path}: landmark file lacks column(s) {', '.join(missing)}; has {reader.fieldnames}")
    rows = list(reader)
    if not rows:
        raise DatasetError(f"{path}: landmark file has a header but no rows")
    out: dict[str, np.ndarray] = {}
    for column in columns:
        try:
            out[column] = np.array([float(row[column]) for row in rows], dtype=np.float64)
        except (TypeError, ValueError):
            bad = next(n for n, row in enumerate(rows) if not _is_number(row[column]))
            raise DatasetError(
                f"{path}: row {bad + 1} has {rows[bad].get(column)!r} in column {column}, not a number"
            ) from None
    return out


def _is_number(value: str | None) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def read_dirlab_case(path: str | Path) -> LandmarkPairs:
    """One DIR-Lab case: 300 end-exhale -> end-inhale landmark pairs.

    Args:
        path: ``caseNN.csv``; its first line states the image size (x, y, z voxels) and spacing (x, y, z mm).

    Returns:
        :class:`LandmarkPairs` named ``dirlabNN``, mm with x, y as the image's index axes i, j (LPS in DIR-Lab's
        images) and z negated so that +z is superior.

    Raises:
        DatasetError: the first line, a column or a value is malformed, an index lies outside the stated image, or
            the mm columns disagree with index x spacing.
    """
    path = Path(path)
    try:
        first = path.read_text().splitlines()[:1]
    except OSError as error:
        raise DatasetError(f"{path}: cannot read landmark file ({error.strerror})") from error
    match = _DIRLAB_HEADER.search(first[0]) if first else None
    if match is None:
        raise DatasetError(f"{path}: first line must state 'image NxNxN voxels ... spacing a x b x c mm'")
    size = np.array([int(v) for v in match.groups()[:3]])
    spacing = np.array([float(v) for v in match.groups()[3:]])
    values = _read_rows(path, _DIRLAB_COLUMNS, skip_lines=1)
    positions: dict[str, np.ndarray] = {}
    for phase in ("ee", "ei"):
        index = np.stack([values[f"{phase}_{a}"] for a in ("i", "j", "k")], axis=1)
        mm = np.stack([values[f"{phase}_{a}_mm"] for a in ("x", "y", "z")], axis=1)
        if (index < 1).any() or (index > size).any():
            raise DatasetError(f"{path}: {phase} voxel indices outside the stated image of {tuple(size)} voxels")
        off = np.abs(mm - index * spacing) - (_INDEX_TOLERANCE_MM + index * 0.005)
        if (off > 0).any():
            raise DatasetError(f"{path}: {phase} mm columns disagree with index x spacing {tuple(spacing)} mm")
        positions[phase] = mm * np.array([1.0, 1.0, -1.0])  # index k runs towards the feet: +z superior
    number = re.search(r"(\d+)", path.stem)
    name = f"dirlab{int(number.group(1)):02d}" if number else path.stem
    return LandmarkPairs(name, exhale_mm=positions["ee"], inhale_mm=positions["ei"], source=str(path))


def read_dirlab_cases(directory: str | Path) -> list[LandmarkPairs]:
    """Every ``case*.csv`` in ``directory`` (DIR-Lab's 10 cases), sorted by case number.

    Raises:
        DatasetError: no case file there, or one of them is malformed.
    """
    directory = Path(directory)
    paths = sorted(directory.glob("case*.csv"))
    if not paths:
        raise DatasetError(f"{directory}: no DIR-Lab case*.csv landmark files")
    return sorted((read_dirlab_case(p) for p in paths), key=lambda pairs: pairs.name)


def read_popi(directory: str | Path) -> LandmarkPairs:
    """POPI's 40 landmarks: ``phase50.csv`` is end-exhale, ``phase00.csv`` end-inhale (patient LPS mm).

    Args:
        directory: holds ``phase00.csv`` and ``phase50.csv`` with columns ``point``, ``x_lps_mm``, ``y_lps_mm``,
            ``z_lps_mm``.

    Returns:
        :class:`LandmarkPairs` named ``popi``, in the popi-phase00 series' LPS mm.

    Raises:
        DatasetError: a file is missing or malformed, or the two files do not list the same points in order.
    """
    directory = Path(directory)
    phases = {}
    for phase in ("00", "50"):
        path = directory / f"phase{phase}.csv"
        values = _read_rows(path, _POPI_COLUMNS, skip_lines=0)
        phases[phase] = (path, values["point"], np.stack([values[c] for c in _POPI_COLUMNS[1:]], axis=1))
    (inhale_path, inhale_ids, inhale), (exhale_path, exhale_ids, exhale) = phases["00"], phases["50"]
    if inhale_ids.shape != exhale_ids.shape or (inhale_ids != exhale_ids).any():
        raise DatasetError(f"{exhale_path}: lists other points than {inhale_path} (ids must match row by row)")
    return LandmarkPairs("popi", exhale_mm=exhale, inhale_mm=inhale, source=f"{exhale_path} + {inhale_path}")
