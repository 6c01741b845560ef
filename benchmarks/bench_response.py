"""How polynomial a package's network is in the breathing amplitude: why distillation fits one model and not another.

Run ``python benchmarks/bench_response.py`` (the shipped cVAE package and ``packages/ldm64``; ``--packages`` for
others). For one held-out patient (the first test patient of each package's manifest, planned on its most exhaled
scan by ``bench_engine.planning_case``) the direct path is queried at constant per-slice traces b_f = a for
``--points`` amplitudes a evenly over [-0.2, 1.3] (the distillation's amplitude range, rate 0). Reported per package: the mean
superior-inferior displacement in the lungs at each a, and how well a polynomial in a of degree 3 (the distilled
path's), 5 and 7 fitted on the even-numbered points predicts the odd-numbered ones (error norm in the lungs, mm).

Writes ``benchmarks/results/response.json`` and the README table ``response``. No target: it explains the
distilled-vs-direct numbers of ``bench_engine.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bench_engine import dataset_seed, held_out_ids, planning_case
from common import ROOT, markdown_table, update_readme_table, write_results

from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.engine.package import DEFAULT_PACKAGE, read_package
from breathcast.engine.predictor import PredictorConfig, load_predictor

DEGREES = (3, 5, 7)
AMPLITUDE_RANGE = (-0.2, 1.3)


def holdout_errors_mm(amplitudes: np.ndarray, fields: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, degree: int) -> np.ndarray:
    """Fit ``fields`` (A, 3, Z, Y, X) voxels as a polynomial of ``degree`` in the even-indexed amplitudes; the error
    norms (mm) at the odd-indexed ones in the lungs, all voxels of all held-out amplitudes flattened."""
    basis = np.vander(amplitudes, degree + 1)
    fit, held = slice(0, None, 2), slice(1, None, 2)
    coefficients, *_ = np.linalg.lstsq(basis[fit], fields[fit].reshape(len(amplitudes[fit]), -1), rcond=None)
    predicted = (basis[held] @ coefficients).reshape(fields[held].shape)
    return np.linalg.norm((predicted - fields[held])[:, :, lungs] * spacing[:, None], axis=1).ravel()


def package_response(path: Path, points: int) -> dict[str, object]:
    package = read_package(path)
    test_id = held_out_ids(package)[0]
    grid = package.manifest.grid[0]
    patient, scan, plan = planning_case(test_id, grid, dataset_seed(package))
    predictor = load_predictor(package, plan, PredictorConfig(path="direct"))
    amplitudes = np.linspace(*AMPLITUDE_RANGE, points).astype(np.float32)
    fields = predictor.network_displacements(np.repeat(amplitudes[:, None], grid, axis=1))
    lungs = np.isin(scan.labels, LUNG_LABELS)
    spacing = np.asarray(patient.grid.spacing_zyx, dtype=np.float32)
    si_mm = (fields[:, 0][:, lungs] * spacing[0]).mean(axis=1)
    fits = {}
    for degree in DEGREES:
        e = holdout_errors_mm(amplitudes, fields, lungs, spacing, degree)
        fits[str(degree)] = {"mean_mm": float(e.mean()), "p99_mm": float(np.percentile(e, 99))}
    return {
        "package": str(path), "kind": package.manifest.kind, "model_id": package.manifest.model_id, "patient": test_id,
        "planning_scan_mean_amplitude": float(scan.amplitude.mean()), "amplitudes": amplitudes.tolist(),
        "mean_si_lungs_mm": si_mm.tolist(), "largest_step_mm": float(np.abs(np.diff(si_mm)).max()),
        "smallest_step_mm": float(np.abs(np.diff(si_mm)).min()), "polynomial_holdout": fits,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, nargs="+", default=[DEFAULT_PACKAGE, ROOT / "packages" / "ldm64"])
    parser.add_argument("--points", type=int, default=31, help="amplitudes queried (default 31)")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()
    results = [package_response(p, args.points) for p in args.packages]
    rows = []
    for r in results:
        row = {"package": r["model_id"], "patient": r["patient"],
               "SI change between neighbouring amplitudes, min - max (mm)": f"{r['smallest_step_mm']:.2f} - {r['largest_step_mm']:.2f}"}  # fmt: skip
        for degree, fit in r["polynomial_holdout"].items():
            row[f"degree {degree}: mean / p99 (mm)"] = f"{fit['mean_mm']:.3f} / {fit['p99_mm']:.3f}"
        rows.append(row)
    table = markdown_table(rows, list(rows[0]))
    print(table)
    write_results("response", {"packages": results})
    if not args.no_readme:
        update_readme_table("response", table)


if __name__ == "__main__":
    main()
