"""Foundation benchmark: the numba warp kernels and the 5DCT simulator, against the foundation issue's targets.

Run ``make bench`` (or ``python benchmarks/bench_kernels.py``). Writes ``benchmarks/results/kernels.json`` and
the table in README.md. Targets (2 CPU cores): scaling and squaring (7 steps) of a 3x128³ field <= 60 ms
median; trilinear warp of a 128³ volume <= 10 ms median; one simulated 25-scan patient at 64³ <= 20 s.
Leave NUMBA_NUM_THREADS unset to use every core. Medians exclude warm-up calls; what a new process pays
before its first result (numba's on-disk cache warm) is a row of its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import markdown_table, time_call, update_readme_table, write_results
from scipy import ndimage

from breathcast.sim.simulator import SimulationConfig, save_patient, simulate_patient
from breathcast.warp import integrate_velocity, invert, jacobian_determinant, warp_image, warp_labels


def smooth_velocity(size: int, max_voxels: float = 2.5, sigma_voxels: float = 6.0, seed: int = 0) -> np.ndarray:
    """A (3, size, size, size) float32 velocity: Gaussian-smoothed noise, largest component ``max_voxels``."""
    rng = np.random.default_rng(seed)
    v = np.stack([
        ndimage.gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32), sigma_voxels, mode="nearest")
        for _ in range(3)
    ])
    return (v * (max_voxels / np.abs(v).max())).astype(np.float32)


def _in_new_process_ms(code: str) -> float:
    """Milliseconds from a fresh process's start of ``code`` (Python, after ``import time``) to its end."""
    timed = f"import time; t = time.perf_counter(); {code}; print((time.perf_counter() - t) * 1e3)"
    return float(subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True).stdout)


def first_call_in_new_process_ms() -> float:
    """Import + first scaling and squaring in a fresh process: what a daemon pays at start-up (numba cache warm)."""
    return _in_new_process_ms(
        "import numpy as np; from breathcast.warp import integrate_velocity; integrate_velocity(np.zeros((3, 8, 8, 8), np.float32))"
    )


def field_kernels_in_new_process_ms() -> float:
    """Import + the first field resize and coefficient field of each dtype (float32, float16) in a fresh process:
    the daemon's field kernels at start-up (numba cache warm)."""
    return _in_new_process_ms(
        "import numpy as np; from breathcast.geometry import Grid;"
        "from breathcast.resize import FieldResizer; from breathcast.stream.field_coefficients import FieldModel;"
        "grid = Grid.centered((4, 4, 4), (20.0, 20.0, 20.0));"
        "[FieldModel(np.ones((1, 3, 4, 4, 4), c), ((0, 0),), grid).field(np.ones(4), np.zeros(4), shape=(6, 6, 6), dtype=o)"
        " for c in (np.float32, np.float16) for o in (np.float32, np.float16)];"
        "[FieldResizer((4, 4, 4), (6, 6, 6), dtype=o)(np.ones((3, 4, 4, 4), np.float32)) for o in (np.float32, np.float16)]"
    )


def bench_kernels(size: int, repeats: int) -> dict[str, dict]:
    v = smooth_velocity(size)
    u = integrate_velocity(v)
    image = np.random.default_rng(1).random((size,) * 3).astype(np.float32)
    labels = (image * 10).astype(np.uint8)
    u64 = integrate_velocity(smooth_velocity(64))
    cases = {
        f"integrate_velocity (7 steps), 3x{size}³": (lambda: integrate_velocity(v, steps=7), 60.0),
        f"warp_image (trilinear), {size}³": (lambda: warp_image(image, u), 10.0),
        f"warp_labels (nearest), {size}³": (lambda: warp_labels(labels, u), None),
        f"jacobian_determinant, {size}³": (lambda: jacobian_determinant(u), None),
        "invert (fixed point), 64³": (lambda: invert(u64), None),
    }
    results = {name: {**time_call(fn, repeats, warmup=2), "target_ms": target} for name, (fn, target) in cases.items()}
    samples = [first_call_in_new_process_ms() for _ in range(3)]
    results["new process: import + first integrate_velocity (numba cache warm)"] = {
        "median_ms": float(np.median(samples)), "p90_ms": float(np.max(samples)), "repeats": 3, "target_ms": None,
    }
    samples = [field_kernels_in_new_process_ms() for _ in range(3)]
    results["new process: import + first field resize and coefficient field, float32 and float16 (numba cache warm)"] = {
        "median_ms": float(np.median(samples)), "p90_ms": float(np.max(samples)), "repeats": 3, "target_ms": None,
    }
    return results


def bench_simulator(grid: int, scans: int, repeats: int) -> dict[str, dict]:
    config = SimulationConfig(grid_size=grid, n_scans=scans)
    simulate_patient(0, SimulationConfig(grid_size=16, n_scans=1))  # compile the phantom painter
    seeds = iter(range(1, 1000))
    name = f"simulate one patient, {scans} scans at {grid}³"
    results = {name: {**time_call(lambda: simulate_patient(next(seeds), config), repeats, warmup=0), "target_ms": 20000.0}}
    patient = simulate_patient(0, config)
    with tempfile.TemporaryDirectory() as tmp:
        results[f"write it to disk (NIfTI + JSON), {scans} scans"] = {
            **time_call(lambda: save_patient(patient, Path(tmp)), repeats, warmup=0), "target_ms": None,
        }
    return results


def table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        target = r["target_ms"]
        verdict = "" if target is None else ("met" if r["median_ms"] <= target else "**missed**")
        rows.append({
            "what": name,
            "median (ms)": f"{r['median_ms']:.1f}",
            "p90 (ms)": f"{r['p90_ms']:.1f}",
            "target (ms)": "" if target is None else f"<= {target:g}",
            "": verdict,
        })
    return markdown_table(rows, ["what", "median (ms)", "p90 (ms)", "target (ms)", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="kernel grid edge (default 128)")
    parser.add_argument("--repeats", type=int, default=20, help="timed kernel calls (default 20)")
    parser.add_argument("--patients", type=int, default=3, help="timed simulated patients (default 3)")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()
    results = {**bench_kernels(args.size, args.repeats), **bench_simulator(64, 25, args.patients)}
    path = write_results("kernels", {"results": results})
    text = table(results)
    print(text)
    print(f"wrote {path}")
    if not args.no_readme:
        update_readme_table("kernels", text)


if __name__ == "__main__":
    main()
