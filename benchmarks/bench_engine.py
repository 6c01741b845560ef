"""Engine benchmark: per-frame time of the direct and distilled paths, plan load, memory, distilled vs direct.

Run ``python benchmarks/bench_engine.py`` (``make bench`` runs it too). For each held-out patient of the shipped
model (simulated again in memory from the dataset seed, as ``benchmarks/bench_cvae.py`` does) the plan is the
patient's most exhaled scan with its per-slice trace, the target its tumour centroid, and the windows come
from the patient's own breathing trace. Writes ``benchmarks/results/engine.json`` and the README table.

``--package`` measures another package: its results go to ``engine_<kind>.json`` (``--name``) and the README
block ``engine-<kind>`` (the shipped cVAE's table is left alone). An ``ldm`` package is run with its manifest's
DDIM steps or ``--sampling-steps``, and one ``denoise`` run (batch 1) is timed as well.

Targets (engine issue, 2 CPU cores): direct 64³ onnxruntime per-frame compute (window -> displacement) median
<= 40 ms; distilled per frame with a 128x128x112 float16 mm-LPS output median <= 5 ms; distilled vs direct
<= 0.3 mm mean and <= 1 mm 99th percentile inside the lungs, per test patient; plan load (encoder +
distillation fit) <= 10 s at 64³.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from common import markdown_table, time_call, update_readme_table, write_results

from breathcast.sim.anatomy import LUNG_LABELS, Label
from breathcast.geometry import Volume
from breathcast.metrics import centroid_mm
from breathcast.sim.simulator import SimulatedPatient, SimulatedScan, SimulationConfig, patient_seed, simulate_patient
from breathcast.engine.package import DEFAULT_PACKAGE, ModelPackage, read_package
from breathcast.engine.predictor import Plan, PredictorConfig, load_predictor

DATASET_SEED = 2026  # the first models' data (a manifest split names their test patients)
TEST_DATASET_SEED = 3031  # the held-out test set of the models trained with no test split
TEST_CARTOON_PATIENTS = 8  # its first patients are cartoon ones
OUTPUT_SHAPE = (112, 128, 128)  # (Z, Y, X): 128 x 128 in plane, 112 slices


def memory_mb() -> dict[str, float]:
    """Resident and peak resident memory of this process, MB (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    value = {k: float(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}
    return {"rss_mb": value["VmRSS"], "peak_rss_mb": value["VmHWM"]}


def windows_from_trace(trace, spec, count: int) -> list[np.ndarray]:
    """``count`` windows of the patient's trace, evenly spread over the session, on the model's time base."""
    span = spec.window_duration_s
    ends = np.linspace(span + 1.0, trace.duration_s - 0.5, count)
    offsets = np.arange(spec.window_samples) * spec.sample_interval_s
    return [trace.amplitude_at(end - span + offsets) for end in ends]


def held_out_ids(package: ModelPackage) -> list[str]:
    """The held-out patient ids the package's training manifest names; for a model trained with no test split,
    the cartoon patients of the held-out test set (:data:`TEST_DATASET_SEED`, README "The shipped model")."""
    training = package.manifest.training
    test_ids = training.get("data", {}).get("split", {}).get("test") or training.get("test_ids")
    if not test_ids:
        return [f"patient_{i:03d}" for i in range(TEST_CARTOON_PATIENTS)]
    return list(test_ids)


def dataset_seed(package: ModelPackage) -> int:
    """The simulator seed the held-out patients of :func:`held_out_ids` are simulated again from."""
    split = package.manifest.training.get("data", {}).get("split", {})
    return DATASET_SEED if split.get("test") else TEST_DATASET_SEED


def planning_case(patient_id: str, grid: int, seed: int = DATASET_SEED) -> tuple[SimulatedPatient, SimulatedScan, Plan]:
    """A held-out patient simulated again at ``grid``³ from dataset ``seed``, its most exhaled scan, and the plan on
    that scan (the tumour centroid as the target)."""
    index = int(re.fullmatch(r"patient_(\d+)", patient_id).group(1))
    patient = simulate_patient(patient_seed(seed, index), SimulationConfig(grid_size=grid), patient_id=patient_id)
    scan = min(patient.scans, key=lambda s: float(s.amplitude.mean()))
    target = centroid_mm(scan.labels == Label.TUMOUR, patient.grid)[None]
    return patient, scan, Plan(Volume(scan.image_hu, patient.grid), scan.amplitude, target, name=patient_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="engine package (default: the shipped one)")
    parser.add_argument("--patients", type=int, default=12, help="held-out patients to use (default 12, all of them)")
    parser.add_argument("--windows", type=int, default=20, help="windows per patient (default 20)")
    parser.add_argument("--repeats", type=int, default=50, help="timed frames per measurement (default 50)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="ldm package: DDIM steps (default: the package's)")
    parser.add_argument("--name", default=None,
                        help="results name: results/<name>.json and README block <name> with _ as - (default: engine for the "
                        "shipped package, engine_<kind> for another)")  # fmt: skip
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()

    package = read_package(args.package)
    kind = package.manifest.kind
    default_package = Path(args.package).resolve() == DEFAULT_PACKAGE.resolve()
    name = args.name or ("engine" if default_package else f"engine_{kind}")
    predictor_options = {"sampling_steps": args.sampling_steps} if kind == "ldm" else {}
    test_ids = held_out_ids(package)
    grid = package.manifest.grid[0]
    memory_before = memory_mb()
    per_patient, timings = [], {}
    for pid in test_ids[: args.patients]:
        patient, scan, plan = planning_case(pid, grid, dataset_seed(package))

        start = time.perf_counter()
        direct = load_predictor(package, plan, PredictorConfig(path="direct", **predictor_options))
        direct_load = time.perf_counter() - start
        start = time.perf_counter()
        distilled = load_predictor(package, plan, PredictorConfig(path="distilled", **predictor_options))
        distilled_load = time.perf_counter() - start
        memory_loaded = memory_mb()

        lungs = np.isin(scan.labels, LUNG_LABELS)
        spacing = np.asarray(patient.grid.spacing_zyx, dtype=np.float32)[:, None]
        errors = []
        windows = windows_from_trace(patient.trace, package.manifest.trace, args.windows)
        for window in windows:
            difference = direct.predict(window).displacement - distilled.predict(window).displacement
            errors.append(np.linalg.norm(difference[:, lungs] * spacing, axis=0))
        e = np.concatenate(errors)
        row = {
            "patient": pid,
            "direct_load_s": round(direct_load, 2),
            "distilled_load_s": round(distilled_load, 2),
            "distilled_vs_direct_mean_mm": round(float(e.mean()), 3),
            "distilled_vs_direct_p99_mm": round(float(np.percentile(e, 99)), 3),
            "distilled_vs_direct_max_mm": round(float(e.max()), 3),
            "distillation_check_at_load_mm": {k: round(v, 3) for k, v in distilled.distillation_error_mm.items()},
        }
        per_patient.append(row)
        print(json.dumps(row))

        if not timings:  # per-frame times on the first patient (they do not depend on the patient)
            window = windows[len(windows) // 2]
            b_f = direct.predict(window).amplitude[None]
            resizer, _ = distilled.field_resizer(OUTPUT_SHAPE, np.float16)
            out = np.empty((3, *OUTPUT_SHAPE), np.float16)

            def distilled_frame() -> None:
                resizer(distilled.predict(window).displacement, out=out)

            timings = {
                "direct_frame": time_call(lambda: direct.predict(window), args.repeats),
                "direct_network_and_integration_only": time_call(lambda: direct.network_displacements(b_f), args.repeats),
                "distilled_frame_model_grid": time_call(lambda: distilled.predict(window), args.repeats),
                "distilled_frame_128x128x112_float16": time_call(distilled_frame, args.repeats),
                "memory_after_loading_two_predictors": memory_loaded,
            }
            if kind == "ldm":  # one U-Net pass, batch 1, at the first timestep
                network = direct.network
                t = np.full(1, len(package.manifest.model["ddim"]["alphas_cumprod"]) - 1, np.int64)
                timings["ldm_sampling_steps"] = network.steps
                timings["ldm_denoise_step_batch1"] = time_call(lambda: network.denoise(network.noise, t, b_f.astype(np.float32)), args.repeats)
            print(json.dumps(timings))

    loads = [r["distilled_load_s"] for r in per_patient]
    summary = {
        "direct_frame_median_ms": round(timings["direct_frame"]["median_ms"], 1),
        "distilled_frame_median_ms": round(timings["distilled_frame_128x128x112_float16"]["median_ms"], 2),
        "distilled_load_median_s": round(float(np.median(loads)), 2),
        "distilled_vs_direct_mean_mm_worst_patient": max(r["distilled_vs_direct_mean_mm"] for r in per_patient),
        "distilled_vs_direct_p99_mm_worst_patient": max(r["distilled_vs_direct_p99_mm"] for r in per_patient),
        "memory_before_mb": memory_before,
        "memory_after_mb": memory_mb(),
    }
    if kind == "ldm":
        summary["ldm_sampling_steps"] = timings["ldm_sampling_steps"]
        summary["ldm_denoise_step_median_ms"] = round(timings["ldm_denoise_step_batch1"]["median_ms"], 1)
    results = {
        "package": str(args.package),
        "kind": kind,
        "model_id": package.model_id,
        "grid": package.manifest.grid,
        "output_shape_zyx": OUTPUT_SHAPE,
        "summary": summary,
        "timings": timings,
        "per_patient": per_patient,
    }
    path = write_results(name, results)
    print(f"wrote {path}")
    if not args.no_readme:
        direct_what = f"{grid}³, onnxruntime" + (f", {summary['ldm_sampling_steps']} DDIM steps" if kind == "ldm" else "")
        rows = [
            {"measure": f"direct {direct_what}: window -> displacement (median)", "target": "<= 40 ms", "measured": f"{summary['direct_frame_median_ms']} ms"},
            {"measure": "distilled: window -> 128x128x112 float16 mm field (median)", "target": "<= 5 ms", "measured": f"{summary['distilled_frame_median_ms']} ms"},
            {"measure": f"plan load with distillation, {grid}³ (median over patients)", "target": "<= 10 s", "measured": f"{summary['distilled_load_median_s']} s"},
            {"measure": "distilled vs direct in the lungs, mean (worst patient)", "target": "<= 0.3 mm", "measured": f"{summary['distilled_vs_direct_mean_mm_worst_patient']} mm"},
            {"measure": "distilled vs direct in the lungs, p99 (worst patient)", "target": "<= 1 mm", "measured": f"{summary['distilled_vs_direct_p99_mm_worst_patient']} mm"},
            {"measure": "resident memory with a direct and a distilled predictor loaded (process peak)", "target": "stated",
             "measured": f"{memory_loaded['rss_mb']:.0f} MB ({memory_loaded['peak_rss_mb']:.0f} MB)"},
        ]
        if kind == "ldm":
            rows.insert(1, {"measure": f"one denoise run (U-Net pass), batch 1, {grid}³ model (median)", "target": "stated",
                            "measured": f"{summary['ldm_denoise_step_median_ms']} ms"})  # fmt: skip
        per = markdown_table(per_patient, ["patient", "distilled_load_s", "distilled_vs_direct_mean_mm", "distilled_vs_direct_p99_mm", "distilled_vs_direct_max_mm"])
        table = markdown_table(rows, ["measure", "target", "measured"]) + "\n\nPer test patient:\n\n" + per
        try:
            update_readme_table(name.replace("_", "-"), table)
        except SystemExit as exc:
            print(f"README not updated: {exc}")


if __name__ == "__main__":
    main()
