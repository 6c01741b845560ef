"""Evaluation (Table 1, Fig. 5, ground-truth errors): known answers with an oracle, files, JSON, the CLI."""

from __future__ import annotations

import dataclasses
import doctest
import json

import numpy as np
import pytest

import breathcast.training.evaluate as evaluate_module
from breathcast.sim.anatomy import DICE_BUCKETS
from breathcast.cli import main
from breathcast.errors import BreathcastError
from breathcast.metrics import mse
from breathcast.sim.simulator import SimulationConfig, simulate_dataset
from breathcast.training.cvae import CVAE, CVAEConfig, save_cvae
from breathcast.training.data import PatientData, simulate_patients
from breathcast.training.evaluate import (
    NoDeformation,
    Predictor,
    TrueField,
    draw_pairs,
    evaluate,
    markdown_report,
    read_results,
    write_results,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def patients() -> list[PatientData]:
    # Seed 5: its tumours move by more than the label grid's rounding (12.5 mm voxels at 32³), so the
    # tumour-centroid error can tell a right field from no field at all.
    return simulate_patients(3, SimulationConfig(grid_size=32, n_scans=3, crop_probability=0.0), seed=5, grid_size=32)


@pytest.fixture(scope="module")
def result(patients):
    return evaluate([NoDeformation(), TrueField()], patients, pairs_per_patient=2, seed=0, progress=False)


def test_oracle_beats_no_deformation(result):
    """The true field lowers masked MSE and the tumour error from the fields to ~0, with ~0 field error; No
    Deformation's EPE is the motion. (The label-map tumour error is not compared: these tumours move 1-5 mm, under a
    third of a 12.5 mm voxel, and the warped label maps mostly equal the unwarped ones.)"""
    base, oracle = result.summary["No Deformation"], result.summary["True field"]
    assert oracle.masked_mse < 0.35 * base.masked_mse  # 0.25-0.27 on these draws: noise, the truth composed at 12.5 mm
    assert oracle.epe_mm < 0.2 < 1.0 < base.epe_mm
    assert oracle.tumour_motion_error_mm < 0.1 < 1.0 < base.tumour_motion_error_mm
    assert oracle.ms_ssim > base.ms_ssim and oracle.mse < base.mse
    assert oracle.folded_voxels_total == base.folded_voxels_total == 0
    assert set(oracle.dice) == set(DICE_BUCKETS)
    assert oracle.dice["Lung Lobes"] > base.dice["Lung Lobes"]


def test_reduction_is_one_minus_the_ratio_of_mean_masked_mse(result):
    """The headline number: 1 - mean(predicted) / mean(no deformation), in percent, as the paper's 60.4 %."""
    pred = np.mean([p.metrics["True field"].masked_mse for p in result.pairs])
    base = np.mean([p.metrics["No Deformation"].masked_mse for p in result.pairs])
    assert result.summary["True field"].masked_mse_reduction_percent == pytest.approx(100 * (1 - pred / base), rel=1e-12)
    assert result.summary["No Deformation"].masked_mse_reduction_percent == 0.0
    for pid, rows in result.per_patient.items():
        mine = [p.metrics["True field"].masked_mse for p in result.pairs if p.patient_id == pid]
        assert rows["True field"].masked_mse == pytest.approx(np.mean(mine), rel=1e-12) and rows["True field"].pairs == 2


def test_no_deformation_scores_the_moving_image(result, patients):
    """No Deformation's prediction is the moving image itself: its MSE is MSE(moving, fixed)."""
    by_id = {p.patient_id: p for p in patients}
    for pair in result.pairs:
        images = by_id[pair.patient_id].images
        assert pair.metrics["No Deformation"].mse == pytest.approx(mse(images[pair.moving], images[pair.fixed]), rel=1e-6)


def test_pairs_are_drawn_from_the_seed(patients, result):
    """Pairs are distinct (k, j != k), the same for the same seed, and all ordered pairs when too few exist."""
    p = patients[0]
    assert draw_pairs(p, 4, seed=3) == draw_pairs(p, 4, seed=3)
    assert all(k != j for k, j in draw_pairs(p, 4, seed=3))
    assert len(set(draw_pairs(p, 4, seed=3))) == 4
    assert sorted(draw_pairs(p, 50, seed=3)) == [(k, j) for k in range(3) for j in range(3) if k != j]
    assert [(q.patient_id, q.moving, q.fixed) for q in result.pairs] == [
        (q.patient_id, k, j) for q in patients for k, j in draw_pairs(q, 2, seed=0)
    ]
    with pytest.raises(BreathcastError, match="pairs_per_patient must be at least 1, got 0"):
        draw_pairs(p, 0, seed=0)


def test_baseline_is_added_and_names_must_be_unique(patients):
    """Without a No Deformation row one is put first (the reduction needs it); duplicate names are refused."""
    assert isinstance(TrueField(), Predictor)
    small = evaluate([TrueField()], patients[:1], pairs_per_patient=1, seed=0, progress=False)
    assert small.predictors == ["No Deformation", "True field"]
    with pytest.raises(BreathcastError, match="predictor names must be unique"):
        evaluate([TrueField(), TrueField()], patients[:1], pairs_per_patient=1, progress=False)


class _Broken:
    name = "broken"

    def __init__(self, field: np.ndarray) -> None:
        self.field = field

    def predict(self, patient, moving, fixed_amplitude):
        return self.field


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (np.zeros((3, 16, 16, 16), np.float32), r"'broken' returned a field of shape \(3, 16, 16, 16\); expected \(3, 32, 32, 32\)"),
        (np.full((3, 32, 32, 32), np.nan, np.float32), r"'broken' returned NaN or infinite displacements for patient patient_000"),
    ],
)
def test_a_bad_prediction_is_named(patients, field, message):
    """A field of the wrong shape or with NaN stops the evaluation with the predictor's name."""
    with pytest.raises(BreathcastError, match=message):
        evaluate([_Broken(field)], patients[:1], pairs_per_patient=1, progress=False)


def test_files_are_written_and_the_json_round_trips(result, tmp_path):
    """results.json (read back equal), results.md (Table 1, ours, per patient), dice.png and example.png."""
    files = write_results(result, tmp_path)
    assert sorted(files) == ["dice.png", "example.png", "results.json", "results.md"]
    for name in ("dice.png", "example.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == result.to_dict()
    assert read_results(tmp_path / "results.json") == result
    assert len(data["pairs"]) == 6 and set(data["pairs"][0]["metrics"]) == {"No Deformation", "True field"}
    md = (tmp_path / "results.md").read_text()
    assert "3 patient(s) (patient_000, patient_001, patient_002), 6 pair(s)" in md
    assert "3 scale(s), Gaussian window 7 voxels" in md
    assert "| No Deformation | " in md and "| True field | " in md and "## Per patient" in md
    assert f"| True field | {result.summary['True field'].masked_mse_reduction_percent:.1f} |" in md


def test_patients_without_truth_get_none_columns(patients, tmp_path):
    """Real data (no labels, no true fields): the ground-truth columns are None / n/a, the rest is measured."""
    real = [dataclasses.replace(patients[0], labels=None, fields=None, reference_labels=None)]
    res = evaluate([NoDeformation()], real, pairs_per_patient=2, progress=False)
    s = res.summary["No Deformation"]
    assert (s.masked_mse, s.masked_mse_reduction_percent, s.epe_mm, s.tumour_error_mm, s.dice) == (None,) * 5
    assert s.mse > 0 and 0 < s.ms_ssim <= 1
    files = write_results(res, tmp_path)
    assert "dice.png" not in files and "example.png" in files
    assert "| No Deformation | n/a |" in markdown_report(res)
    assert read_results(files["results.json"]) == res


def test_module_doctests():
    """The docstring examples of the module run."""
    assert doctest.testmod(evaluate_module).failed == 0


# --- the CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-patient dataset and an untrained 32³ cVAE whose manifest holds patient_001 out for testing."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    data = root / "ds"
    simulate_dataset(data, 2, SimulationConfig(grid_size=32, n_scans=3), seed=1)
    model = root / "run" / "model.pt"
    model.parent.mkdir()
    save_cvae(CVAE(CVAEConfig(grid=32)), model)
    manifest = {"data": {"source": str(data.resolve()), "split": {"train": ["patient_000"], "val": [], "test": ["patient_001"]}}}
    (model.parent / "manifest.json").write_text(json.dumps(manifest))
    return data, model


def test_cli_evaluates_the_manifest_test_split(tiny_run, tmp_path, capsys):
    """`breathcast evaluate` takes the test patients from the manifest, prints Table 1 and writes the files."""
    data, model = tiny_run
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--pairs-per-patient", "2", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Table 1" in printed and "| cVAE | " in printed and str(out) in printed
    saved = read_results(out / "results.json")
    assert saved.patients == ["patient_001"] and saved.predictors == ["No Deformation", "cVAE"] and len(saved.pairs) == 2
    assert saved.info["predictors"]["cVAE"]["path"] == str(model.resolve())
    assert (out / "dice.png").read_bytes()[:8] == PNG and (out / "example.png").read_bytes()[:8] == PNG


def _manifest(model, **data) -> None:
    (model.parent / "manifest.json").write_text(json.dumps({"data": data}))


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("other-source", [], r"records data from '/elsewhere', not .*; name the patients with --patients ID"),
        ("no-manifest", [], r"manifest\.json is missing; name the patients with --patients ID"),
        ("empty-test", [], r"the test split is empty \(trained with --test-patients 0\)"),
        ("other-source", ["--patients", "patient_009"], r"patient\(s\) patient_009 not in .* \(it holds patient_000, patient_001\)"),
        ("missing-model", ["--patients", "patient_000"], r"model\.pt: model file is missing"),
    ],
)
def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys, setup, extra, message):
    """No usable test split, unknown patients or a missing model: exit 2 and one line that says what to do."""
    import re
    import shutil

    data, trained = tiny_run
    model = tmp_path / "m" / "model.pt"
    model.parent.mkdir()
    if setup != "missing-model":
        shutil.copy(trained, model)
    if setup == "other-source":
        _manifest(model, source="/elsewhere", split={"test": ["patient_001"]})
    elif setup == "empty-test":
        _manifest(model, source=str(data), split={"train": ["patient_000", "patient_001"], "test": []})
    code = main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("breathcast: error: ")
    assert re.search(message, err), err


def test_cli_evaluates_an_ldm_beside_the_cvae_with_one_row_per_step_count(tiny_run, tmp_path, capsys):
    """`--model` takes LDM files too; `--ldm-steps 2 3` gives the LDM one Table 1 row per DDIM step count."""
    from breathcast.training.autoencoder import AutoencoderConfig, CTAutoencoder
    from breathcast.training.ldm import LDM, LDMConfig, save_ldm

    data, cvae = tiny_run
    ldm = tmp_path / "ldm" / "model.pt"
    ldm.parent.mkdir()
    autoencoder = CTAutoencoder(AutoencoderConfig(grid=32, channels=(4, 8, 8), norm_num_groups=4))
    save_ldm(LDM(autoencoder, 1.0, LDMConfig(channels=(16, 16, 16, 16), norm_num_groups=8, head_channels=8)), ldm)
    (ldm.parent / "manifest.json").write_text((cvae.parent / "manifest.json").read_text())
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(cvae), "--model", str(ldm), "--ldm-steps", "2", "3", "--data", str(data),
                 "--out", str(out), "--pairs-per-patient", "1", "-q"])  # fmt: skip
    assert code == 0
    assert "| LDM (2 steps) | " in capsys.readouterr().out
    saved = read_results(out / "results.json")
    assert saved.predictors == ["No Deformation", "cVAE", "LDM (2 steps)", "LDM (3 steps)"]
    assert saved.info["predictors"]["LDM (3 steps)"]["ddim_steps"] == 3
