"""Registration of one 64³ pair (SimpleITK multi-resolution demons, the 5D model's default): time and accuracy.

Simulates one 64³ patient (the shipped cVAE's protocol), registers its most-inhaled scan to its most-exhaled
scan (the 5D model's reference) ``--repeats`` times, and writes ``benchmarks/results/registration.json``:
seconds per pair (median, p90, min), the field end-point error inside the lungs against the simulator's truth,
and the same error without registration. Run: ``python benchmarks/bench_registration.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_call, write_results  # noqa: E402

from breathcast.sim.anatomy import LUNG_LABELS  # noqa: E402
from breathcast.calibration.motion_model import RegistrationConfig, reference_scan_index, register_pair  # noqa: E402
from breathcast.geometry import hu_to_unit  # noqa: E402
from breathcast.metrics import endpoint_error_mm  # noqa: E402
from breathcast.sim.simulator import SimulationConfig, pair_field, patient_seed, simulate_patient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    import SimpleITK as sitk

    patient = simulate_patient(patient_seed(args.seed, 2), SimulationConfig(grid_size=args.grid), patient_id="bench")
    amplitude = np.stack([s.amplitude for s in patient.scans])
    reference = reference_scan_index(amplitude)
    target = int(np.argmax(amplitude.mean(axis=1)))
    fixed = hu_to_unit(patient.scans[target].image_hu)
    moving = hu_to_unit(patient.scans[reference].image_hu)
    config = RegistrationConfig()
    result: dict[str, np.ndarray] = {}

    def run() -> None:
        result["u"] = register_pair(fixed, moving, patient.grid, config)

    timing = time_call(run, repeats=args.repeats, warmup=1)
    true = pair_field(patient.scans[reference].field, patient.scans[target].field)
    lungs = np.isin(patient.scans[target].labels, LUNG_LABELS)
    epe = endpoint_error_mm(result["u"], true, patient.grid, lungs)["mean"]
    before = endpoint_error_mm(np.zeros_like(true), true, patient.grid, lungs)["mean"]
    payload = {
        "grid": [args.grid] * 3,
        "method": "SimpleITK FastSymmetricForcesDemons, multi-resolution",
        "config": dataclasses.asdict(config),
        "simpleitk": sitk.Version.VersionString(),
        "simpleitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "seconds_per_pair": {(k[:-3] + "_s" if k.endswith("_ms") else k): (v / 1e3 if k.endswith("_ms") else v) for k, v in timing.items()},
        "pair": {"reference_scan": reference, "fixed_scan": target,
                 "mean_amplitude": [float(amplitude[reference].mean()), float(amplitude[target].mean())]},
        "lung_field_error_mm": {"registered": epe, "no_registration": before},
        "target_seconds": 10.0,
    }  # fmt: skip
    path = write_results("registration", payload)
    print(f"{args.grid}³ pair: median {timing['median_ms'] / 1e3:.2f} s (p90 {timing['p90_ms'] / 1e3:.2f} s) on "
          f"{machine()['cpu_count']} cores; lung field error {epe:.2f} mm (without registration {before:.2f} mm) -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
