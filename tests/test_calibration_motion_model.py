"""The 5D motion model: SimpleITK registration in our units and sign, the fit, its files, and the predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from breathcast.calibration.motion_model import (
    FiveDModel,
    FiveDPredictor,
    RegistrationConfig,
    fit_five_d,
    fit_five_d_patient,
    register_pair,
)
from breathcast.cli import main
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, hu_to_unit
from breathcast.sim.simulator import SimulationConfig, simulate_dataset
from breathcast.warp import warp_image

pytest.importorskip("SimpleITK")

# Axes permuted and flipped, anisotropic spacing: a slip in the LPS <-> (dz, dy, dx) conversion shows.
OBLIQUE = Grid(shape=(28, 32, 30), spacing=(2.0, 1.5, 2.5), origin=(-10.0, 20.0, 35.0),
               direction=((0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)))  # fmt: skip


def blobs(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth textured image in [0, 1] that demons can lock onto."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 2.0)
    image = (image - image.min()) / np.ptp(image)
    return image.astype(np.float32)


@pytest.mark.parametrize("grid", [Grid((28, 32, 30), (1.0, 1.0, 1.0)), OBLIQUE], ids=["axial", "oblique"])
def test_registration_recovers_a_known_translation(grid):
    """moving shifted by t: the registered pull-back field is +t voxels (dz, dy, dx) in the interior."""
    moving = blobs(grid.shape)
    t = np.array([1.5, -1.0, 2.0], np.float32)  # voxels (dz, dy, dx)
    shift = np.broadcast_to(t[:, None, None, None], (3, *grid.shape)).copy()
    fixed = warp_image(moving, shift)  # fixed(x) = moving(x + t)
    u = register_pair(fixed, moving, grid, RegistrationConfig(iterations=(80, 60, 40)))
    inner = u[:, 6:-6, 6:-6, 6:-6].reshape(3, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), t, atol=0.25)


def test_registration_recovers_a_smooth_field():
    """A smooth known field (up to 2 voxels) is recovered with a small end-point error and the right sign."""
    grid = Grid((32, 32, 32), (2.0, 2.0, 2.5))
    moving = blobs(grid.shape, seed=1)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in grid.shape], indexing="ij")
    bump = np.exp(-(x**2 + y**2 + z**2) / 0.3)
    true = np.stack([2.0 * bump, -1.0 * bump, 0.5 * bump]).astype(np.float32)
    fixed = warp_image(moving, true)
    u = register_pair(fixed, moving, grid)
    inner = (slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    error = np.linalg.norm(u[inner] - true[inner], axis=0).mean()
    before = np.linalg.norm(true[inner], axis=0).mean()
    assert error < 0.35 * before, (error, before)
    centre = u[:, 14:18, 14:18, 14:18].reshape(3, -1).mean(axis=1)
    np.testing.assert_array_equal(np.sign(centre), [1.0, -1.0, 1.0])  # the sign of each component
    np.testing.assert_allclose(centre, [2.0, -1.0, 0.5], atol=0.8)  # demons smooths the 2-voxel peak down


def test_registration_bad_input():
    """Mismatched shapes and NaN images are refused."""
    grid = Grid((8, 8, 8), (1.0, 1.0, 1.0))
    with pytest.raises(BreathcastError, match="must both be"):
        register_pair(np.zeros((8, 8, 7)), np.zeros((8, 8, 8)), grid)
    with pytest.raises(BreathcastError, match="NaN"):
        register_pair(np.full((8, 8, 8), np.nan), np.zeros((8, 8, 8)), grid)


def test_fit_from_ground_truth_and_predict(small_patient):
    """Fitted to the simulator's truth: small residual, and a pair prediction much closer to the truth than none."""
    p = small_patient
    amplitude = np.stack([s.amplitude for s in p.scans])
    rate = np.stack([s.rate for s in p.scans])
    fields = np.stack([s.field for s in p.scans])
    model = fit_five_d(fields, amplitude, rate, p.grid, p.patient_id, "ground-truth")
    assert model.residual_rms_voxels < 0.05
    from breathcast.sim.simulator import pair_field

    true = pair_field(fields[0], fields[3])
    predicted = model.predict_pair((amplitude[0], rate[0]), (amplitude[3], rate[3]))
    assert np.abs(predicted - true).mean() < 0.2 * np.abs(true).mean()


def test_model_save_load_round_trip_and_tamper(tmp_path):
    """save/load keep the coefficients (stored in mm LPS), grid and provenance; a changed npz is refused."""
    rng = np.random.default_rng(0)
    coefficients = rng.normal(size=(3, 3, *OBLIQUE.shape)).astype(np.float32)
    model = FiveDModel(coefficients, ((0, 0), (1, 0), (0, 1)), OBLIQUE, "p7", "registration", 4, 0.1, {"scans": 25})
    manifest_path = model.save(tmp_path / "m")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_kind"] == "linear5d" and manifest["term_names"] == ["offset", "A", "dA/dt"]
    assert len(manifest["files"]["coefficients.npz"]) == 64
    loaded = FiveDModel.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.coefficients, coefficients, atol=1e-5)
    assert loaded.grid == OBLIQUE and loaded.reference_scan == 4 and loaded.fitted_from == {"scans": 25}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["coefficients.npz", "manifest.json"]
    with np.load(tmp_path / "m" / "coefficients.npz") as data:
        stored = data["coefficients_lps_mm"]
    # On this grid the k (slice) axis points along +x LPS: the x component in mm is dz times the 2.5 mm spacing.
    assert stored[1, 0, 0, 0, 0] == pytest.approx(2.5 * coefficients[1, 0, 0, 0, 0], rel=1e-5)
    with open(tmp_path / "m" / "coefficients.npz", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(BreathcastError, match="sha256 does not match"):
        FiveDModel.load(tmp_path / "m")


def patient_data(p):
    from breathcast.training.data import PatientData

    images = np.stack([hu_to_unit(s.image_hu) for s in p.scans])
    amplitude = np.stack([s.amplitude for s in p.scans])
    return PatientData(p.patient_id, images, amplitude, p.grid, fields=np.stack([s.field for s in p.scans]))


@pytest.mark.parametrize("source", ["ground-truth", "registration"])
def test_predictor_beats_no_deformation(small_patient, source, tmp_path):
    """FiveDPredictor: field error well under no deformation's; cached fits load again; hold-out refits.

    Fitted on all 6 scans (hold_out=False): 5 scans do not pin the amplitude slope down well enough for this
    test (the 25-scan evaluation holds out). Demons at 8 mm voxels on 6 scans is coarse: registration reaches
    ~0.7 of the motion here (ground truth ~0.1), so its bound is 0.75 and the ground truth's 0.3.
    """
    p = small_patient
    data = patient_data(p)
    states = {p.patient_id: (data.amplitude, np.stack([s.rate for s in p.scans]))}
    predictor = FiveDPredictor(source, states=states, cache_dir=tmp_path, registration=RegistrationConfig(iterations=(30, 20, 10)),
                               hold_out=False)  # fmt: skip
    k, j = int(np.argmin(data.amplitude.mean(1))), int(np.argmax(data.amplitude.mean(1)))
    u = predictor.predict(data, k, data.amplitude[j])
    true = data.true_pair_field(k, j)
    lungs = np.abs(true).sum(0) > 0.5
    error = np.linalg.norm(u - true, axis=0)[lungs].mean()
    assert error < {"ground-truth": 0.3, "registration": 0.75}[source] * np.linalg.norm(true, axis=0)[lungs].mean()
    again = FiveDPredictor(source, states=states, cache_dir=tmp_path, hold_out=False)
    np.testing.assert_allclose(again.predict(data, k, data.amplitude[j]), u, atol=1e-4)
    held = FiveDPredictor(source, states=states, cache_dir=tmp_path)  # hold_out=True: refit without scan j
    held.predict(data, k, data.amplitude[j])
    (model,) = held._held_out.values()
    assert model.fitted_from["held_out_scan"] == j and model.fitted_from["scans"] == data.n_scans - 1
    assert (tmp_path / source / p.patient_id / "manifest.json").is_file()


def test_five_d_needs_truth_or_images():
    """Ground truth without fields, or too few scans: clear errors."""
    grid = Grid((4, 4, 4), (1.0, 1.0, 1.0))
    a = np.zeros((4, 4))
    with pytest.raises(BreathcastError, match="no ground-truth fields"):
        fit_five_d_patient("p", None, a, a, grid, "ground-truth")
    with pytest.raises(BreathcastError, match="needs at least 3 scans"):
        fit_five_d_patient("p", None, a[:2], a[:2], grid, "ground-truth")


def test_cli_calibrate_five_d(tmp_path, capsys):
    """`breathcast calibrate five-d` on a tiny dataset writes a loadable model; a wrong patient exits 2."""
    simulate_dataset(tmp_path / "data", 1, SimulationConfig(grid_size=24, n_scans=5, noise_hu=0.0), seed=3, progress=False)
    out = tmp_path / "model"
    for source in ("ground-truth", "registration"):
        args = ["calibrate", "five-d", "--data", str(tmp_path / "data"), "--patient", "patient_000", "--out", str(out), "--source", source]
        assert main(args) == 0
        assert FiveDModel.load(out).source == source
    assert "registration:" in capsys.readouterr().out
    assert main(["calibrate", "five-d", "--data", str(tmp_path / "data"), "--patient", "nobody", "--out", str(tmp_path / "x")]) == 2
    assert "patient nobody is not in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
