"""Real landmark readers: DIR-Lab's and POPI's published motion, the patient frame, and malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from breathcast.errors import DatasetError
from breathcast.io.landmarks import (
    DIRLAB_MEAN_DISPLACEMENT_MM,
    LandmarkPairs,
    read_dirlab_case,
    read_dirlab_cases,
    read_popi,
)
from tests.conftest import shared_data_file

DIRLAB = "landmarks/dirlab"
POPI = "landmarks/popi"

HEADER = "# DIR-Lab 4DCT case 1: image 4x4x3 voxels (x, y, z), spacing 1.0 x 2.0 x 2.5 mm; mm = index * spacing"
COLUMNS = "point,ee_i,ee_j,ee_k,ei_i,ei_j,ei_k,ee_x_mm,ee_y_mm,ee_z_mm,ei_x_mm,ei_y_mm,ei_z_mm"
GOOD_ROWS = ["0,1,1,1,1,1,2,1.0,2.0,2.5,1.0,2.0,5.0", "1,2,3,2,3,3,3,2.0,6.0,5.0,3.0,6.0,7.5"]


def _mean_magnitude(pairs: LandmarkPairs) -> float:
    return float(np.linalg.norm(pairs.displacement_mm, axis=1).mean())


def _write_dirlab(tmp_path: Path, lines: list[str], name: str = "case01.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dirlab_case1_reproduces_the_published_mean() -> None:
    """DIR-Lab case 1: 300 pairs, mean displacement 3.89 mm as published."""
    pairs = read_dirlab_case(shared_data_file(f"{DIRLAB}/case01.csv"))
    assert pairs.name == "dirlab01" and pairs.n_points == 300
    assert _mean_magnitude(pairs) == pytest.approx(3.89, abs=0.005)


def test_dirlab_all_cases_reproduce_the_published_means() -> None:
    """All ten cases, sorted, each within rounding of DIR-Lab's published mean."""
    cases = read_dirlab_cases(shared_data_file(DIRLAB))
    assert [c.name for c in cases] == sorted(DIRLAB_MEAN_DISPLACEMENT_MM)
    for pairs in cases:
        assert _mean_magnitude(pairs) == pytest.approx(DIRLAB_MEAN_DISPLACEMENT_MM[pairs.name], abs=0.005), pairs.name


def test_dirlab_z_is_flipped_to_superior() -> None:
    """The index z axis runs to the feet: positions are negated in z, so inhale moves the lungs to -z."""
    pairs = read_dirlab_case(shared_data_file(f"{DIRLAB}/case01.csv"))
    np.testing.assert_allclose(pairs.exhale_mm[0], [204.67, 136.77, -157.50])  # ee_*_mm of point 0
    np.testing.assert_allclose(pairs.inhale_mm[0], [204.67, 134.83, -165.00])
    assert pairs.displacement_mm[:, 2].mean() < -3.0


def test_popi_phase00_is_inhale_and_reproduces_its_mean() -> None:
    """POPI: phase 50 is exhale, phase 00 inhale; 40 points, 5.6 mm mean, moving inferior on inhale."""
    pairs = read_popi(shared_data_file(POPI))
    assert pairs.name == "popi" and pairs.n_points == 40
    np.testing.assert_allclose(pairs.exhale_mm[0], [48.91, 33.61, 31.50])
    np.testing.assert_allclose(pairs.inhale_mm[0], [48.91, 33.30, 29.50])
    assert _mean_magnitude(pairs) == pytest.approx(5.6, abs=0.05)
    assert pairs.displacement_mm[:, 2].mean() < -4.0


def test_tiny_dirlab_file_reads(tmp_path: Path) -> None:
    """A hand-made two-point file: z negated, displacement as written."""
    path = _write_dirlab(tmp_path, [HEADER, COLUMNS, *GOOD_ROWS])
    pairs = read_dirlab_case(path)
    np.testing.assert_allclose(pairs.displacement_mm, [[0.0, 0.0, -2.5], [1.0, 0.0, -2.5]])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["# no geometry here", COLUMNS, *GOOD_ROWS], "first line must state"),
        ([HEADER, COLUMNS.replace(",ei_z_mm", ""), "0,1,1,1,1,1,2,1.0,2.0,2.5,1.0,2.0"], "lacks column"),
        ([HEADER, COLUMNS, GOOD_ROWS[0].replace("2.5,", "abc,", 1)], "row 1 has 'abc'"),
        ([HEADER, COLUMNS], "no rows"),
        ([HEADER, COLUMNS, "0,9,1,1,1,1,2,9.0,2.0,2.5,1.0,2.0,5.0"], "outside the stated image"),
        ([HEADER, COLUMNS, "0,1,1,1,1,1,2,1.0,2.0,2.5,1.0,2.0,6.0"], "disagree with index x spacing"),
    ],
)
def test_malformed_dirlab_names_the_file(tmp_path: Path, lines: list[str], message: str) -> None:
    """Each malformed file raises one DatasetError line that names the file and the fault."""
    path = _write_dirlab(tmp_path, lines)
    with pytest.raises(DatasetError, match=message) as error:
        read_dirlab_case(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_no_dirlab_cases(tmp_path: Path) -> None:
    """An empty directory is an error that names it."""
    with pytest.raises(DatasetError, match="no DIR-Lab case"):
        read_dirlab_cases(tmp_path)


def _write_popi(directory: Path, ids_50: tuple[int, int] = (0, 1)) -> None:
    header = "point,x_lps_mm,y_lps_mm,z_lps_mm"
    (directory / "phase00.csv").write_text(f"{header}\n0,1.0,2.0,3.0\n1,4.0,5.0,6.0\n")
    (directory / "phase50.csv").write_text(f"{header}\n{ids_50[0]},1.0,2.0,5.0\n{ids_50[1]},4.0,5.0,9.0\n")


def test_tiny_popi_reads_phase50_as_exhale(tmp_path: Path) -> None:
    """phase50 gives the exhale positions, phase00 the inhale ones."""
    _write_popi(tmp_path)
    pairs = read_popi(tmp_path)
    np.testing.assert_allclose(pairs.displacement_mm, [[0.0, 0.0, -2.0], [0.0, 0.0, -3.0]])


def test_popi_mismatched_points(tmp_path: Path) -> None:
    """Phase files listing other points are refused, naming the file."""
    _write_popi(tmp_path, ids_50=(1, 0))
    with pytest.raises(DatasetError, match="phase50.csv: lists other points"):
        read_popi(tmp_path)


def test_popi_missing_file(tmp_path: Path) -> None:
    """A missing phase file is a one-line error naming it."""
    with pytest.raises(DatasetError, match="phase00.csv: cannot read"):
        read_popi(tmp_path)


@pytest.mark.parametrize(
    ("exhale", "inhale", "message"),
    [
        (np.zeros((2, 3)), np.zeros((3, 3)), "two equal"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "two equal"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "two equal"),
        (np.zeros((1, 3)), np.full((1, 3), np.nan), "finite"),
    ],
)
def test_landmark_pairs_validate(exhale: np.ndarray, inhale: np.ndarray, message: str) -> None:
    """Unequal, non-(N, 3), empty or non-finite positions are refused."""
    with pytest.raises(DatasetError, match=message):
        LandmarkPairs("bad", exhale, inhale)
