"""Accuracy benchmark of the shipped cVAE (breathcast/models/cvae64) on its held-out simulated patients.

Run ``python benchmarks/bench_cvae.py`` (``make bench`` runs it too). The test patients are the ones the
model's manifest names; by default they are simulated again in memory from the dataset seed (the same
patients ``breathcast simulate --patients 60 --grid 64 --seed 2026`` writes, before that command rounds HU to
integers), or read from ``--data DIR`` when that dataset is on disk. Writes ``benchmarks/results/cvae.json``,
the full evaluation in ``benchmarks/results/cvae64/`` (Table 1, Fig. 5, an example) and the README table.

Targets (cVAE issue): masked MSE at least 60% below No Deformation (the paper: 60.4%), 0 folded voxels, mean
tumour-centroid error <= 1.5 mm, on >= 10 held-out patients.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from common import RESULTS, markdown_table, update_readme_table, write_results

from breathcast.sim.simulator import SimulationConfig
from breathcast.training.data import load_patients, simulate_patients
from breathcast.training.evaluate import CVAEPredictor, NoDeformation, TrueField, evaluate
from breathcast.training.evaluate import write_results as write_evaluation
from breathcast.training.inference import DEFAULT_MODEL, default_model

DATASET_SEED = 2026  # README: the command that made the shipped model's data


def held_out(manifest: dict, data: Path | None, grid: int, dataset_seed: int, with_priors: bool = False) -> list:
    """The test patients: those of the manifest's split, or, for a model trained with no test split, every patient
    of the held-out test set ``data`` (README "The shipped model" makes it)."""
    ids = manifest["data"]["split"]["test"]
    if not ids:
        if data is None:
            raise SystemExit("the model was trained with no test split: give --data, the held-out test set (README \"The shipped model\")")
        from breathcast.io.dataset import open_dataset

        return load_patients(data, open_dataset(data).patients, grid, with_truth=True, with_priors=with_priors)
    if data is not None:
        return load_patients(data, ids, grid, with_truth=True, with_priors=with_priors)
    patients = []
    for pid in ids:
        index = int(re.fullmatch(r"patient_(\d+)", pid).group(1))
        patients += simulate_patients(1, SimulationConfig(grid_size=grid), dataset_seed, grid, first=index, with_priors=with_priors)
    return patients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the dataset on disk (default: simulate the test patients)")
    parser.add_argument("--dataset-seed", type=int, default=DATASET_SEED, help=f"simulator seed of the dataset (default {DATASET_SEED})")
    parser.add_argument("--pairs-per-patient", type=int, default=10, help="pairs per test patient (default 10)")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()

    manifest = json.loads((DEFAULT_MODEL.parent / "manifest.json").read_text())
    model = default_model()
    patients = held_out(manifest, args.data, model.config.grid, args.dataset_seed, model.config.prior_channels > 0)
    predictors = [NoDeformation(), CVAEPredictor(model), TrueField()]
    result = evaluate(predictors, patients, pairs_per_patient=args.pairs_per_patient, seed=0)
    write_evaluation(result, RESULTS / "cvae64")
    cvae, baseline, truth = (result.summary[name] for name in ("cVAE", result.baseline, "True field"))
    checks = {
        "masked MSE reduction vs No Deformation (%)": (cvae.masked_mse_reduction_percent, ">= 60", cvae.masked_mse_reduction_percent >= 60.0),
        "folded voxels (all pairs)": (cvae.folded_voxels_total, "0", cvae.folded_voxels_total == 0),
        "tumour-centroid error, label maps (mm, mean)": (cvae.tumour_error_mm, "<= 1.5", cvae.tumour_error_mm <= 1.5),
        "tumour-centroid error, fields (mm, mean)": (cvae.tumour_motion_error_mm, "<= 1.5", cvae.tumour_motion_error_mm <= 1.5),
    }
    summary = {
        "model": str(DEFAULT_MODEL.relative_to(DEFAULT_MODEL.parents[3])),
        "model_sha256": manifest["files"]["model.pt"],
        "patients": len(patients),
        "pairs": cvae.pairs,
        "torch_threads": torch.get_num_threads(),
        **{key: {"masked_mse": r.masked_mse, "mse": r.mse, "ms_ssim": r.ms_ssim, "epe_mm": r.epe_mm,
                 "tumour_error_mm": r.tumour_error_mm, "tumour_motion_error_mm": r.tumour_motion_error_mm,
                 "folded_voxels": r.folded_voxels_total, "seconds_per_prediction": r.seconds_mean}
           for key, r in (("no_deformation", baseline), ("cvae", cvae), ("true_field", truth))},
        "targets": {name: {"value": v, "target": t, "met": bool(ok)} for name, (v, t, ok) in checks.items()},
    }
    path = write_results("cvae", summary)
    rows = [
        {
            "": label,
            "masked MSE": f"{r.masked_mse:.5f}",
            "MSE": f"{r.mse:.5f}",
            "MS-SSIM": f"{r.ms_ssim:.4f}",
            "folded voxels": str(r.folded_voxels_total),
            "field error, lungs (mm)": f"{r.epe_mm:.2f}",
            "tumour error, labels (mm)": f"{r.tumour_error_mm:.2f}",
            "tumour error, fields (mm)": f"{r.tumour_motion_error_mm:.2f}",
            "CPU s / prediction": f"{r.seconds_mean:.3f}" if r is cvae else "-",
        }
        for label, r in (("No Deformation", baseline), ("cVAE (shipped)", cvae), ("True field (the metrics' floor)", truth))
    ]
    table = markdown_table(rows, list(rows[0]))
    verdicts = "\n".join(f"- {name}: {v:.2f} (target {t}): {'met' if ok else '**missed**'}" for name, (v, t, ok) in checks.items())
    text = f"{table}\n\n{len(patients)} held-out patients, {cvae.pairs} pairs.\n{verdicts}"
    print(text)
    print(f"wrote {path} and {RESULTS / 'cvae64'}")
    if not args.no_readme:
        update_readme_table("cvae", text)


if __name__ == "__main__":
    main()
