"""Foundation benchmark: the numba warp kernels and the 5DCT simulator, against the foundation issue's targets.

Run ``make bench`` (or ``python benchmarks/bench_kernels.py``). Writes ``benchmarks/results/kernels.json`` and
the table in README.md. Targets (2 CPU cores): scaling and squaring (7 steps) of a 3x128³ field <= 60 ms
median; trilinear warp of a 128³ volume <= 10 ms median; one simulated 25-scan patient at 64³ <= 20 s.
Leave NUMBA_NUM_THREADS unset to use every core. The first call of each kernel (compile, or load from
numba's on-disk cache) is excluded from the medians and reported on its own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import markdown_table, time_call, update_readme_table, write_results
from scipy import ndimage

from breathcast.simulator import SimulationConfig, save_patient, simulate_patient
from breathcast.warp import integrate_velocity, invert, jacobian_determinant, warp_image, warp_labels


def smooth_velocity(size: int, max_voxels: float = 2.5, sigma_voxels: float = 6.0, seed: int = 0) -> np.ndarray:
    """A (3, size, size, size) float32 velocity: Gaussian-smoothed noise, largest component ``max_voxels``."""
    rng = np.random.default_rng(seed)
    v = np.stack([
        ndimage.gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32), sigma_voxels, mode="nearest")
        for _ in range(3)
    ])
    return (v * (max_voxels / np.abs(v).max())).astype(np.float32)


def first_call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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
    results = {}
    for name, (fn, target) in cases.items():
        first = first_call_ms(fn)
        results[name] = {**time_call(fn, repeats, warmup=1), "first_call_ms": first, "target_ms": target}
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
            "first call (ms)": f"{r['first_call_ms']:.0f}" if "first_call_ms" in r else "",
        })
    return markdown_table(rows, ["what", "median (ms)", "p90 (ms)", "target (ms)", "", "first call (ms)"])


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
        update_readme_table("kernels", text + f"\n\nFirst call = compile, or load from numba's cache (`{path.name}`).")


if __name__ == "__main__":
    main()
