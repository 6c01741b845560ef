"""Accuracy and speed of the shipped latent diffusion model (breathcast/models/ldm64) on its held-out patients.

Run ``python benchmarks/bench_ldm.py``. The test patients are the ones the model's manifest names (the cVAE's:
same dataset, split sizes and seed), simulated again in memory as ``bench_cvae.py`` does, or read from
``--data DIR``. Rows: No Deformation, the shipped cVAE, the LDM at each ``--steps`` count (DDIM, seed 0), the
true field. Writes ``benchmarks/results/ldm.json``, the full evaluation in ``benchmarks/results/ldm64/``
(Table 1, Fig. 5, an example) and the README table.

Targets (LDM issue): masked MSE at least 40% below No Deformation at 50 steps (the paper: 40.7%), 0 folded
voxels, on >= 10 held-out patients; seconds per prediction at 50, 20 and 10 steps (and 5 and 2: how few suffice).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_cvae import DATASET_SEED, held_out
from common import RESULTS, markdown_table, update_readme_table, write_results

from breathcast.training.evaluate import CVAEPredictor, LDMPredictor, NoDeformation, TrueField, evaluate
from breathcast.training.evaluate import write_results as write_evaluation
from breathcast.training.inference import DEFAULT_LDM, default_model
from breathcast.training.ldm import load_ldm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_LDM, help="the LDM model.pt (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=None, help="the dataset on disk (default: simulate the test patients)")
    parser.add_argument("--dataset-seed", type=int, default=DATASET_SEED, help=f"simulator seed of the dataset (default {DATASET_SEED})")
    parser.add_argument("--pairs-per-patient", type=int, default=10, help="pairs per test patient (default 10)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 20, 10, 5, 2], help="DDIM step counts (default 50 20 10 5 2)")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()

    manifest = json.loads((args.model.parent / "manifest.json").read_text())
    model = load_ldm(args.model)
    cvae_model = default_model()
    with_priors = bool(cvae_model.config.prior_channels or model.config.prior_channels)  # each scan's, once, for both
    patients = held_out(manifest, args.data, model.grid, args.dataset_seed, with_priors=with_priors)
    ldm_rows = {n: LDMPredictor(model, n, name=f"LDM ({n} steps)") for n in args.steps}
    predictors = [NoDeformation(), CVAEPredictor(cvae_model), *ldm_rows.values(), TrueField()]
    result = evaluate(predictors, patients, pairs_per_patient=args.pairs_per_patient, seed=0)
    write_evaluation(result, RESULTS / "ldm64")
    baseline, cvae, truth = (result.summary[name] for name in (result.baseline, "cVAE", "True field"))
    ldm = {n: result.summary[p.name] for n, p in ldm_rows.items()}
    main_steps = 50 if 50 in ldm else args.steps[0]
    best = ldm[main_steps]
    checks = {
        f"masked MSE reduction vs No Deformation, {main_steps} steps (%)": (best.masked_mse_reduction_percent, ">= 40", best.masked_mse_reduction_percent >= 40.0),
        "folded voxels (all pairs, all step counts)": (sum(r.folded_voxels_total for r in ldm.values()), "0",
                                                       all(r.folded_voxels_total == 0 for r in ldm.values())),
    }
    summary = {
        "model": str(args.model),
        "model_sha256": manifest["files"]["model.pt"],
        "patients": len(patients),
        "pairs": best.pairs,
        "torch_threads": torch.get_num_threads(),
        **{key: {"masked_mse": r.masked_mse, "masked_mse_reduction_percent": r.masked_mse_reduction_percent, "mse": r.mse,
                 "ms_ssim": r.ms_ssim, "epe_mm": r.epe_mm, "tumour_motion_error_mm": r.tumour_motion_error_mm,
                 "folded_voxels": r.folded_voxels_total, "seconds_per_prediction": r.seconds_mean,
                 "seconds_per_prediction_std": r.seconds_std}
           for key, r in (("no_deformation", baseline), ("cvae", cvae), *((f"ldm_{n}_steps", r) for n, r in ldm.items()),
                          ("true_field", truth))},
        "targets": {name: {"value": v, "target": t, "met": bool(ok)} for name, (v, t, ok) in checks.items()},
    }
    path = write_results("ldm", summary)
    labelled = [("No Deformation", baseline), ("cVAE (shipped)", cvae), *((f"LDM, {n} DDIM steps", r) for n, r in ldm.items()),
                ("True field (the metrics' floor)", truth)]
    rows = [
        {
            "": label,
            "masked MSE": f"{r.masked_mse:.5f}",
            "reduction": "-" if r is baseline else f"{r.masked_mse_reduction_percent:.1f}%",
            "MSE": f"{r.mse:.5f}",
            "MS-SSIM": f"{r.ms_ssim:.4f}",
            "folded voxels": str(r.folded_voxels_total),
            "field error, lungs (mm)": f"{r.epe_mm:.2f}",
            "tumour error, fields (mm)": f"{r.tumour_motion_error_mm:.2f}",
            "CPU s / prediction": "-" if r in (baseline, truth) else f"{r.seconds_mean:.2f}",
        }
        for label, r in labelled
    ]
    table = markdown_table(rows, list(rows[0]))
    verdicts = "\n".join(f"- {name}: {v:.2f} (target {t}): {'met' if ok else '**missed**'}" for name, (v, t, ok) in checks.items())
    text = f"{table}\n\n{len(patients)} held-out patients, {best.pairs} pairs; torch on {torch.get_num_threads()} CPU threads.\n{verdicts}"
    print(text)
    print(f"wrote {path} and {RESULTS / 'ldm64'}")
    if not args.no_readme:
        update_readme_table("ldm", text)


if __name__ == "__main__":
    main()
