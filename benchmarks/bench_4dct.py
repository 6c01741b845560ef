"""The patient's own 4DCT: per-patient models measured leave-one-phase-out against the truth (4DCT issue).

Run ``python benchmarks/bench_4dct.py``. Cases: simulated 10-phase 4DCT of cartoon patients and of real CTs'
anatomy (``../shared/data/ct``: POPI and a 4D-Lung CT, skipped when absent), at the model grid (64³ in the
lung-centred box). Writes ``benchmarks/results/4dct.json`` and the README table.

- **Leave-one-phase-out**: for a held-out phase j, each model predicts the field from the end-exhale reference
  to phase j's state, measured in phase j's images (lung volume; the rate from the neighbouring phases). Models:
  *registration* (sees phase j's image: the upper bound the others approach), *5D* (fitted on the other phases'
  registrations), *adapted network* (the shipped population cVAE fine-tuned on the other phases' pairs, image
  loss only), *population network* (the shipped cVAE as it is), and the *truth* (the ceiling that image noise
  leaves). Per model: masked-MSE reduction vs no deformation (lungs dilated 10 mm, as everywhere) and mean
  field error in the lungs (mm). Phases barely moving from end-exhale (< 2 mm mean) are reported apart: their
  masked MSE is mostly image noise that no field removes.
- **Registration**: end-point error in the lungs vs the truth, folded voxels, seconds per pair (all phases).
- **Folder to package**: a simulated 4DCT written as DICOM through ``plan_4dct`` (what ``breathcast plan-4dct``
  runs), with adaptation: seconds per stage and in all (bar <= 300 s on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, markdown_table, update_readme_table, write_results

from breathcast.calibration.four_dct import FourDCTInput, fit_4dct_five_d, lung_volume_ml, phase_states, register_phases
from breathcast.engine.plan_4dct import Plan4DCTConfig, phase_patient, plan_4dct
from breathcast.geometry import Volume, hu_to_unit
from breathcast.io.four_dct import write_4dct
from breathcast.metrics import endpoint_error_mm, folded_voxels, lung_region_mask, masked_mse
from breathcast.segmentation import segment_thorax
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.sim.four_dct import FourDCT, FourDCTConfig, simulate_4dct
from breathcast.sim.realct import load_anatomy_source
from breathcast.sim.simulator import SimulationConfig, pair_field
from breathcast.training.adapt import AdaptConfig, adapt_cvae
from breathcast.training.cvae import load_cvae
from breathcast.training.inference import DEFAULT_MODEL, predict_displacement
from breathcast.warp import warp

DATA = ROOT.parent / "shared" / "data" / "ct"
REAL_CTS = [DATA / "popi-phase00", DATA / "lungct-examples" / "lungct-0103-phase5.nii.gz"]
MODELS = ("registration", "5D", "adapted network", "population network", "truth")
MOVING_MM = 2.0


def case_input(four_dct: FourDCT, period_s: float) -> FourDCTInput:
    """The 4DCT as plan-4dct sees it, on the simulator's grid (so the truth needs no resampling)."""
    grid = four_dct.grid
    segs = [segment_thorax(Volume(image, grid)) for image in four_dct.images_hu]
    lung_ml = np.array([lung_volume_ml(s.labels, grid) for s in segs])
    return FourDCTInput(four_dct.images_hu, grid, phase_states(four_dct.phase_percent, lung_ml, period_s), segs)


def predict_network(model, patient, reference: int, phase: int) -> np.ndarray:
    prior = patient.motion_prior(reference, model.config.prior_version) if model.config.prior_channels else None
    return predict_displacement(model, patient.images[reference], patient.amplitude[reference], patient.amplitude[phase], prior=prior)


def score(data: FourDCTInput, four_dct: FourDCT, phase: int, u: np.ndarray) -> dict[str, float]:
    ref = data.states.reference
    moving, fixed = hu_to_unit(data.images_hu[ref]), hu_to_unit(data.images_hu[phase])
    region = lung_region_mask(np.isin(data.segmentations[phase].labels, LUNG_LABELS), data.grid)
    none = masked_mse(moving, fixed, region)
    lungs = np.isin(four_dct.labels[phase], LUNG_LABELS)
    truth = pair_field(four_dct.fields[ref], four_dct.fields[phase])
    return {
        "reduction": 1.0 - masked_mse(warp(moving, u), fixed, region) / none,
        "field_error_mm": endpoint_error_mm(u, truth, data.grid, lungs)["mean"],
        "true_motion_mm": endpoint_error_mm(truth, np.zeros_like(truth), data.grid, lungs)["mean"],
        "folds": folded_voxels(u),
    }


def run_case(name: str, four_dct: FourDCT, population, adapt_phases: list[float], adaptation: AdaptConfig, period_s: float) -> dict:
    data = case_input(four_dct, period_s)
    ref = data.states.reference
    start = time.perf_counter()
    fields, seconds = register_phases(data.images_hu, data.grid, ref, data.segmentations)
    registration_s = time.perf_counter() - start
    patient = phase_patient(data, name)
    rows, registration = [], []
    for j in range(len(data.images_hu)):
        if j == ref:
            continue
        truth = pair_field(four_dct.fields[ref], four_dct.fields[j])
        lungs = np.isin(four_dct.labels[j], LUNG_LABELS)
        registration.append({"phase_percent": float(data.states.phase_percent[j]),
                             "epe_mm": endpoint_error_mm(fields[j], truth, data.grid, lungs)["mean"],
                             "folds": folded_voxels(fields[j])})  # fmt: skip
        nz = data.grid.shape[0]
        five_d = fit_4dct_five_d(data, name, fields, seconds, exclude=(j,))
        predictions = {
            "registration": fields[j],
            "5D": five_d.displacement(np.full(nz, data.states.amplitude[j]), np.full(nz, data.states.rate[j])),
            "population network": predict_network(population, patient, ref, j),
            "truth": truth,
        }
        percent = float(data.states.phase_percent[j])
        if any(abs(percent - p) < 1e-6 for p in adapt_phases):
            adapted = adapt_cvae(population, patient, adaptation, scans=[k for k in range(len(data.images_hu)) if k != j])
            predictions["adapted network"] = predict_network(adapted.model, patient, ref, j)
        for model, u in predictions.items():
            rows.append({"case": name, "phase_percent": percent, "model": model, **score(data, four_dct, j, u)})
        print(f"{name} phase {percent:g}%: " + ", ".join(f"{r['model']} {r['reduction']:.1%} / {r['field_error_mm']:.2f} mm"
                                                      for r in rows if r["phase_percent"] == percent and r["case"] == name))  # fmt: skip
    return {"name": name, "states": data.states.to_dict(), "true_amplitude": four_dct.amplitude.tolist(),
            "registration": registration, "registration_seconds": registration_s,
            "seconds_per_pair": float(np.mean(seconds)), "rows": rows}  # fmt: skip


def summarise(cases: list[dict], adapt_phases: list[float]) -> list[dict]:
    """Mean over cases and held-out phases per model: all phases, the adaptation's phases, the moving ones."""
    rows = [r for c in cases for r in c["rows"]]
    out = []
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        adapted_set = [r for r in mine if any(abs(r["phase_percent"] - p) < 1e-6 for p in adapt_phases)]
        moving = [r for r in mine if r["true_motion_mm"] >= MOVING_MM]
        still = [r for r in mine if r["true_motion_mm"] < MOVING_MM]

        def mean(items, key):
            return float(np.mean([r[key] for r in items])) if items else float("nan")

        out.append({
            "model": model,
            "held_out": len(mine),
            "reduction_all": mean(mine, "reduction"),
            "reduction_moving": mean(moving, "reduction"),
            "reduction_still": mean(still, "reduction"),
            "field_error_mm_all": mean(mine, "field_error_mm"),
            "field_error_mm_moving": mean(moving, "field_error_mm"),
            "reduction_adapt_phases": mean(adapted_set, "reduction"),
            "field_error_mm_adapt_phases": mean(adapted_set, "field_error_mm"),
            "folds": int(sum(r["folds"] for r in mine)),
        })  # fmt: skip
    return out


def time_folder_to_package(seed: int, grid: int, adaptation: AdaptConfig) -> dict:
    four_dct = simulate_4dct(seed, FourDCTConfig(simulation=SimulationConfig(grid_size=grid)))
    with tempfile.TemporaryDirectory() as tmp:
        write_4dct(four_dct.images_hu, four_dct.grid, four_dct.phase_percent, Path(tmp) / "4dct", patient_id="timing")
        report = plan_4dct(Path(tmp) / "4dct", Path(tmp) / "out", "timing", Plan4DCTConfig(grid_size=grid, adaptation=adaptation, progress=False))
    return report["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--cartoon", type=int, nargs="*", default=[11, 12], metavar="SEED", help="cartoon patients' seeds")
    parser.add_argument("--real-seed", type=int, default=21, help="seed of the real-anatomy patients")
    parser.add_argument("--no-real", action="store_true", help="skip the real-CT-based cases")
    parser.add_argument("--adapt-phases", type=float, nargs="*", default=[20.0, 80.0], metavar="PERCENT",
                        help="held-out phases on which the adapted network is measured (one adaptation each)")
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument("--period", type=float, default=4.0, help="breathing period assumed for the rates, s")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="4dct")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    population = load_cvae(DEFAULT_MODEL)
    adaptation = AdaptConfig(steps=args.adapt_steps)
    config = FourDCTConfig(simulation=SimulationConfig(grid_size=args.grid))
    cases = []
    for seed in args.cartoon:
        cases.append(run_case(f"cartoon-{seed}", simulate_4dct(seed, config), population, args.adapt_phases, adaptation, args.period))
    if not args.no_real:
        for path in REAL_CTS:
            if not path.exists():
                print(f"skipping {path}: not found")
                continue
            source = load_anatomy_source(path)
            cases.append(run_case(f"realct-{source.name}", simulate_4dct(args.real_seed, config, source), population,
                                  args.adapt_phases, adaptation, args.period))  # fmt: skip
    summary = summarise(cases, args.adapt_phases)
    registration = [r for c in cases for r in c["registration"]]
    results = {
        "grid": args.grid,
        "adaptation": dataclasses.asdict(adaptation),
        "adapt_phases": args.adapt_phases,
        "period_s": args.period,
        "summary": summary,
        "registration": {"epe_mm_mean": float(np.mean([r["epe_mm"] for r in registration])),
                         "epe_mm_max_phase": float(np.max([r["epe_mm"] for r in registration])),
                         "folds": int(sum(r["folds"] for r in registration)),
                         "seconds_per_pair": float(np.mean([c["seconds_per_pair"] for c in cases]))},  # fmt: skip
        "cases": cases,
    }
    if not args.no_timing:
        results["folder_to_package_s"] = time_folder_to_package(args.cartoon[0] if args.cartoon else 11, args.grid, adaptation)
    write_results(args.name, results)

    def pct(v):
        return "–" if np.isnan(v) else f"{v:.1%}"

    def mm(v):
        return "–" if np.isnan(v) else f"{v:.2f}"

    table_rows = [{"model": s["model"], "held-out phases": s["held_out"], "masked-MSE reduction, all": pct(s["reduction_all"]),
                   f"moving ≥ {MOVING_MM:g} mm": pct(s["reduction_moving"]), f"still < {MOVING_MM:g} mm": pct(s["reduction_still"]),
                   "field error in lungs (mm), all": mm(s["field_error_mm_all"]),
                   f"at {', '.join(f'{p:g}%' for p in args.adapt_phases)}: reduction / error": f"{pct(s['reduction_adapt_phases'])} / {mm(s['field_error_mm_adapt_phases'])}",
                   "folds": s["folds"]} for s in summary]  # fmt: skip
    columns = list(table_rows[0])
    reg = results["registration"]
    lines = [markdown_table(table_rows, columns), "",
             f"Cases: {', '.join(c['name'] for c in cases)} ({args.grid}³ model box). Registration (all phases to end-exhale, "
             f"sliding-aware demons): end-point error in the lungs {reg['epe_mm_mean']:.2f} mm mean (worst phase "
             f"{reg['epe_mm_max_phase']:.2f} mm), {reg['folds']} folded voxels, {reg['seconds_per_pair']:.1f} s per pair."]  # fmt: skip
    if "folder_to_package_s" in results:
        t = results["folder_to_package_s"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
        lines.append(f"Folder to served packages (10-phase DICOM 4DCT, plan-4dct with adaptation): {t['total']:.0f} s ({stages}).")
    update_readme_table(args.name, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
