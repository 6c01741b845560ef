"""Motion calibrated on real lungs (issue 13, part 2): real landmark motion against simulated patients, side by side.

Real: DIR-Lab's 10 4DCT cases (300 landmark pairs each) and POPI's 40 landmarks, end-exhale -> end-inhale, read from
``../shared/data/landmarks/``. Synthetic: ``--patients`` patients of each ``--kind``, their pull-back field at
amplitude 1 (rate 0) sampled in the exhale lungs (:func:`breathcast.sim.motion_statistics.field_statistics`).
Both go through the same statistics: mean |d| against normalised superior-inferior position (0 = lung base,
1 = apex, by each sample's own 1st-99th percentile of exhale z) and anterior-posterior position (0 = anterior,
1 = posterior, the same way), LR : AP : SI shares of mean |component|, signed
means, the LR and AP expansion slopes, the lungs' front-to-back shift with height and distance from the midline
(:func:`~breathcast.sim.motion_statistics.lung_shift`), fraction above 10 mm, per-patient mean magnitude and its spread
between patients. Beside them, the evidence that the shift is a population trait and not one case's
(:func:`shift_leave_one_out`): each DIR-Lab case's front-back landmark motion predicted from the other nine cases'
median shift, against predicting none.

Writes ``benchmarks/results/motion_realism.json`` and ``.png`` and the README block ``motion_realism``, with a
met/missed verdict per statistic (the criteria are :data:`CRITERIA`, also written to the JSON).
Run: ``python benchmarks/bench_motion_realism.py`` (about 20 s on 2 cores for 20 cartoon patients at 64³).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, markdown_table, update_readme_table, write_results  # noqa: E402

from breathcast.geometry import Grid, field_to_lps_mm  # noqa: E402
from breathcast.io.landmarks import read_dirlab_cases, read_popi  # noqa: E402
from breathcast.sim.anatomy import LUNG_LABELS  # noqa: E402
from breathcast.sim.motion import build_motion_field  # noqa: E402
from breathcast.sim.motion_statistics import (  # noqa: E402
    MotionStatistics,
    PopulationStatistics,
    field_statistics,
    landmark_statistics,
    lung_shift,
    lung_shift_design,
    population_statistics,
)
from breathcast.sim.realct import build_realct_anatomy, load_anatomy_source  # noqa: E402
from breathcast.sim.simulator import SimulationConfig, patient_seed, simulate_patient  # noqa: E402

LANDMARKS = ROOT.parent / "shared" / "data" / "landmarks"

SyntheticPatient = tuple[str, np.ndarray, np.ndarray, Grid]
"""(name, pull-back field at amplitude 1 (3, Z, Y, X) (x, y, z) mm LPS, exhale lung mask (Z, Y, X) bool, grid)."""

SyntheticSource = Callable[[int, int, int], list[SyntheticPatient]]
"""(n_patients, grid_size, seed) -> one :data:`SyntheticPatient` per patient."""

CRITERIA = {
    "mean_range": "every synthetic patient's mean |d| inside the real per-patient range (min-max)",
    "mean_level": "synthetic mean of per-patient means within real mean +- 1 real SD",
    "spread": "SD of per-patient means between 0.5x and 2x the real SD",
    "ratio": "each LR, AP, SI share of mean |component| within 0.05 of the real mean share",
    "si_sign": "every synthetic patient moves inferior on inhale (signed mean SI < 0), as every real case does",
    "profile": "in every position bin, the synthetic mean of (bin |d| / patient mean |d|) inside the DIR-Lab range",
    "profile_level": "in every position bin, the synthetic mean of (bin |d| / patient mean |d|) within 2 standard errors "
                     "of DIR-Lab's mean (SD / sqrt(cases)): the typical decay from base to apex, not only its extremes",
    "ap_profile": "the same along anterior -> posterior",
    "si_ap_gradient": "synthetic mean of the back-over-front gradient of |d_z| at equal height (si_ap_gradient) within "
                      "DIR-Lab's mean's standard error (SD / sqrt(cases))",
    "expansion": "the synthetic mean LR and AP expansion slopes each within 0.10 of the real mean",
    "lung_shift": "the synthetic mean shift coefficients (height, distance from the midline) each within 0.10 of the real mean",
    "signed_ap": "synthetic mean of the per-patient signed mean AP motion within the real mean's standard error "
                 "(real SD / sqrt(cases)): the lungs as a whole move neither more anterior nor more posterior",
    "fraction": "synthetic mean fraction of points above 10 mm within 0.10 of the real mean",
}
"""What 'met' means for each statistic. The profiles and the gradient at equal height use DIR-Lab only: POPI's 40
landmarks span ~110 mm of z, not the lungs from base to apex, so its own-extent normalisation does not map to base and
apex."""

RATIO_TOLERANCE = 0.05
EXPANSION_TOLERANCE = 0.10
FRACTION_TOLERANCE = 0.10


def cartoon_patients(n_patients: int, grid_size: int, seed: int) -> list[SyntheticPatient]:
    """The cartoon simulator's patients (:func:`~breathcast.sim.simulator.simulate_patient`), one scan each.

    The field is the simulator's own motion at amplitude 1, rate 0 (``MotionField.displacement(1, 0)``: c_si = 1,
    c_cw = 1), rebuilt from the patient's anatomy and motion parameters exactly as the simulator builds it; the lung
    mask is :data:`~breathcast.sim.anatomy.LUNG_LABELS` of the reference (amplitude 0) labels.
    """
    config = SimulationConfig(grid_size=grid_size, n_scans=1, supersampling=1, noise_hu=0.0)
    out = []
    for index in range(n_patients):
        patient = simulate_patient(patient_seed(seed, index), config, patient_id=f"cartoon{index:02d}")
        motion = build_motion_field(patient.anatomy, patient.motion, patient.grid)
        field = field_to_lps_mm(motion.displacement(1.0, 0.0), patient.grid)
        out.append((patient.patient_id, field, np.isin(patient.reference_labels, LUNG_LABELS), patient.grid))
    return out


REAL_CTS = [ROOT.parent / "shared" / "data" / "ct" / p for p in
            ("lungct-examples/lungct-0001-phase5.nii.gz", "lungct-examples/lungct-0103-phase5.nii.gz", "popi-phase00")]


def realct_patients(n_patients: int, grid_size: int, seed: int) -> list[SyntheticPatient]:
    """Real-anatomy patients (:func:`~breathcast.sim.realct.build_realct_anatomy`) on the three real CTs in turn.

    The field is the motion at amplitude 1, rate 0, on the scan grid; the lung mask is the segmentation's lungs of
    the exhale anatomy, taken at the scan grid's voxel centres (every ``supersampling``-th fine voxel, offset by 1/2).
    """
    config = SimulationConfig(grid_size=grid_size, n_scans=1)
    sources = [load_anatomy_source(p) for p in REAL_CTS if p.exists()]
    out = []
    for index in range(n_patients):
        source = sources[index % len(sources)]
        anatomy = build_realct_anatomy(source, np.random.default_rng(patient_seed(seed, index)), config)
        f = config.supersampling
        lungs = anatomy.segmentation.lungs[f // 2 :: f, f // 2 :: f, f // 2 :: f]
        field = field_to_lps_mm(anatomy.motion_field.displacement(1.0, 0.0), anatomy.grid)
        out.append((f"{source.name}-{index:02d}", field, lungs, anatomy.grid))
    return out


SOURCES: dict[str, SyntheticSource] = {"cartoon": cartoon_patients, "realct": realct_patients}
"""Synthetic sources by kind; ``--kind`` picks among them."""


def shift_leave_one_out(landmarks: Path) -> list[dict[str, object]]:
    """Per DIR-Lab case: mean |d_y| error (mm) of no front-back motion and of d_y = |d_z| (c + a h + b l) with the
    other nine cases' median (c, a, b) (:func:`~breathcast.sim.motion_statistics.lung_shift`; the case's own |d_z|)."""
    cases = read_dirlab_cases(landmarks / "dirlab")
    shifts = np.stack([lung_shift(c.exhale_mm, c.displacement_mm) for c in cases])
    rows = []
    for i, case in enumerate(cases):
        coefficients = np.median(np.delete(shifts, i, axis=0), axis=0)
        d = case.displacement_mm
        predicted = lung_shift_design(case.exhale_mm, d) @ coefficients
        rows.append({"case": case.name, "coefficients": coefficients.round(3).tolist(),
                     "error_none_mm": round(float(np.abs(d[:, 1]).mean()), 3),
                     "error_shift_mm": round(float(np.abs(d[:, 1] - predicted).mean()), 3)})
    return rows


def real_statistics(landmarks: Path) -> tuple[list[MotionStatistics], list[MotionStatistics]]:
    """(DIR-Lab cases, all real samples = DIR-Lab + POPI) statistics."""
    dirlab = [landmark_statistics(pairs) for pairs in read_dirlab_cases(landmarks / "dirlab")]
    return dirlab, [*dirlab, landmark_statistics(read_popi(landmarks / "popi"))]


def _profile_standard_error(dirlab: PopulationStatistics) -> np.ndarray:
    """(N_BINS,) the standard error of DIR-Lab's mean base-to-apex profile: SD / sqrt(cases)."""
    return dirlab.bin_profile_sd / np.sqrt(len(dirlab.names))


def verdicts(real: PopulationStatistics, dirlab: PopulationStatistics, synthetic: PopulationStatistics,
             samples: list[MotionStatistics]) -> dict[str, dict[str, object]]:
    """One {value, real, met} per criterion of :data:`CRITERIA`."""
    lo, hi = (float(v) for v in real.range_of_means_mm)
    ratio_gap = np.abs(synthetic.component_ratio - real.component_ratio)
    spread = synthetic.std_of_means_mm / real.std_of_means_mm
    low, high = dirlab.bin_profile_range
    in_profile = (synthetic.bin_profile >= low) & (synthetic.bin_profile <= high)
    profile_se = _profile_standard_error(dirlab)
    profile_gap = np.abs(synthetic.bin_profile - dirlab.bin_profile) / profile_se
    ap_low, ap_high = dirlab.ap_profile_range
    in_ap_profile = (synthetic.ap_profile >= ap_low) & (synthetic.ap_profile <= ap_high)
    si_signs = np.array([s.signed_mean_mm[2] for s in samples])
    expansion_gap = np.abs(synthetic.expansion - real.expansion)
    shift_gap = np.abs(synthetic.lung_shift[1:] - real.lung_shift[1:])  # (a, b); the constant depends on the frame
    return {
        "mean_range": {"value": synthetic.range_of_means_mm.round(2).tolist(), "real": [round(lo, 2), round(hi, 2)],
                       "met": bool(synthetic.range_of_means_mm[0] >= lo and synthetic.range_of_means_mm[1] <= hi)},
        "mean_level": {"value": round(synthetic.mean_of_means_mm, 2),
                       "real": [round(real.mean_of_means_mm, 2), round(real.std_of_means_mm, 2)],
                       "met": bool(abs(synthetic.mean_of_means_mm - real.mean_of_means_mm) <= real.std_of_means_mm)},
        "spread": {"value": round(synthetic.std_of_means_mm, 2), "real": round(real.std_of_means_mm, 2),
                   "met": bool(0.5 <= spread <= 2.0)},
        "ratio": {"value": synthetic.component_ratio.round(3).tolist(), "real": real.component_ratio.round(3).tolist(),
                  "met": bool((ratio_gap <= RATIO_TOLERANCE).all())},
        "si_sign": {"value": int((si_signs < 0).sum()), "real": len(real.names), "met": bool((si_signs < 0).all())},
        "profile": {"value": synthetic.bin_profile.round(2).tolist(),
                    "real": dirlab.bin_profile_range.round(2).tolist(),
                    "met": bool(in_profile.all())},
        "profile_level": {"value": synthetic.bin_profile.round(2).tolist(),
                          "real": [dirlab.bin_profile.round(2).tolist(), profile_se.round(3).tolist()],
                          "standard_errors_off": profile_gap.round(1).tolist(),
                          "met": bool((profile_gap <= 2.0).all())},
        "ap_profile": {"value": synthetic.ap_profile.round(2).tolist(),
                       "real": dirlab.ap_profile_range.round(2).tolist(),
                       "met": bool(in_ap_profile.all())},
        "si_ap_gradient": {"value": round(float(synthetic.si_ap_gradient[0]), 2),
                           "real": dirlab.si_ap_gradient.round(2).tolist(),
                           "met": bool(abs(synthetic.si_ap_gradient[0] - dirlab.si_ap_gradient[0])
                                       <= dirlab.si_ap_gradient[1] / np.sqrt(len(dirlab.names)))},
        "expansion": {"value": synthetic.expansion.round(2).tolist(), "real": real.expansion.round(2).tolist(),
                      "met": bool((expansion_gap <= EXPANSION_TOLERANCE).all())},
        "lung_shift": {"value": synthetic.lung_shift[1:].round(2).tolist(), "real": real.lung_shift[1:].round(2).tolist(),
                       "constant": round(float(synthetic.lung_shift[0]), 3),
                       "real_constant": round(float(real.lung_shift[0]), 3),
                       "met": bool((shift_gap <= EXPANSION_TOLERANCE).all())},
        "signed_ap": {"value": round(float(synthetic.signed_ap_mm[0]), 2), "real": real.signed_ap_mm.round(2).tolist(),
                      "met": bool(abs(synthetic.signed_ap_mm[0] - real.signed_ap_mm[0])
                                  <= real.signed_ap_mm[1] / np.sqrt(len(real.names)))},
        "fraction": {"value": round(synthetic.fraction_above, 3), "real": round(real.fraction_above, 3),
                     "met": bool(abs(synthetic.fraction_above - real.fraction_above) <= FRACTION_TOLERANCE)},
    }


def _shares(ratio: np.ndarray) -> str:
    return " : ".join(f"{v:.2f}" for v in ratio)


def readme_table(real: PopulationStatistics, dirlab: PopulationStatistics, kinds: dict[str, dict]) -> str:
    """Statistic | real | each kind with its verdict."""
    def cell(kind: str, key: str, text: str) -> str:
        return f"{text} ({'met' if kinds[kind]['verdicts'][key]['met'] else '**missed**'})"

    rows = []
    for key, label, real_text, fmt in [
        ("mean_range", "per-patient mean \\|d\\| range (mm)", "{:.2f}-{:.2f}".format(*real.range_of_means_mm),
         lambda p: "{:.2f}-{:.2f}".format(*p.range_of_means_mm)),
        ("mean_level", "mean of per-patient means (mm)", f"{real.mean_of_means_mm:.2f} ± {real.std_of_means_mm:.2f}",
         lambda p: f"{p.mean_of_means_mm:.2f}"),
        ("spread", "SD between patients (mm)", f"{real.std_of_means_mm:.2f}", lambda p: f"{p.std_of_means_mm:.2f}"),
        ("ratio", "LR : AP : SI (shares of mean \\|component\\|)", _shares(real.component_ratio),
         lambda p: _shares(p.component_ratio)),
        ("si_sign", "moves inferior on inhale", f"{len(real.names)} of {len(real.names)}", None),
        ("profile", "\\|d\\| / mean, base -> apex (5 bins)", " ".join(f"{v:.2f}" for v in dirlab.bin_profile),
         lambda p: " ".join(f"{v:.2f}" for v in p.bin_profile)),
        ("profile_level", "the same, standard errors from DIR-Lab's mean per bin",
         "± " + " ".join(f"{v:.2f}" for v in _profile_standard_error(dirlab)),
         lambda p: " ".join(f"{v:.1f}" for v in np.abs(p.bin_profile - dirlab.bin_profile) / _profile_standard_error(dirlab))),
        ("ap_profile", "\\|d\\| / mean, anterior -> posterior (5 bins)", " ".join(f"{v:.2f}" for v in dirlab.ap_profile),
         lambda p: " ".join(f"{v:.2f}" for v in p.ap_profile)),
        ("si_ap_gradient", "\\|d_z\\| back over front at equal height (per mean \\|d_z\\|)",
         "{:.2f} ± {:.2f}".format(*dirlab.si_ap_gradient), lambda p: f"{p.si_ap_gradient[0]:.2f}"),
        ("expansion", "expansion LR, AP (slope of d_x, d_y across the lungs / mean \\|d_z\\|)",
         "{:.2f}, {:.2f}".format(*real.expansion), lambda p: "{:.2f}, {:.2f}".format(*p.expansion)),
        ("lung_shift", "posterior shift on inhale per mm of SI motion: by height, by distance from the midline",
         "{:.2f}, {:.2f}".format(*real.lung_shift[1:]), lambda p: "{:.2f}, {:.2f}".format(*p.lung_shift[1:])),
        ("signed_ap", "mean AP motion on inhale (mm, + posterior)", "{:+.2f} ± {:.2f}".format(*real.signed_ap_mm),
         lambda p: f"{p.signed_ap_mm[0]:+.2f}"),
        ("fraction", "fraction of points > 10 mm", f"{real.fraction_above:.2f}", lambda p: f"{p.fraction_above:.2f}"),
    ]:
        row = {"statistic": label, "real": real_text}
        for kind, result in kinds.items():
            population: PopulationStatistics = result["population"]
            count = f"{result['verdicts'][key]['value']} of {len(population.names)}"
            text = count if fmt is None else fmt(population)
            row[kind] = cell(kind, key, text)
        rows.append(row)
    return markdown_table(rows, ["statistic", "real", *kinds])


def plot(path: Path, dirlab: list[MotionStatistics], popi: MotionStatistics, kinds: dict[str, dict]) -> None:
    """Magnitude and profile against position, LR : AP : SI shares, per-patient means: real and synthetic."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    colours = ["tab:orange", "tab:blue", "tab:green", "tab:purple"]
    fig, axes = plt.subplots(1, 7, figsize=(29, 4.2))
    centres = 0.5 * (dirlab[0].bin_edges[1:] + dirlab[0].bin_edges[:-1])
    for ax, normalise, along, title, xlabel in [
        (axes[0], False, "bin_mean_magnitude_mm", "mean |d| (mm)", "normalised SI position in the lungs (0 base, 1 apex)"),
        (axes[1], True, "bin_mean_magnitude_mm", "|d| / patient mean |d|", "normalised SI position in the lungs (0 base, 1 apex)"),
        (axes[2], True, "ap_bin_mean_magnitude_mm", "|d| / patient mean |d|", "normalised AP position (0 anterior, 1 posterior)"),
    ]:
        for i, s in enumerate(dirlab):
            scale = s.mean_magnitude_mm if normalise else 1.0
            ax.plot(centres, getattr(s, along) / scale, color="0.35", lw=0.8, label="DIR-Lab" if i == 0 else None)
        scale = popi.mean_magnitude_mm if normalise else 1.0
        ax.plot(centres, getattr(popi, along) / scale, color="k", lw=1.2, ls="--", label="POPI")
        for colour, (kind, result) in zip(colours, kinds.items()):
            for i, s in enumerate(result["samples"]):
                scale = s.mean_magnitude_mm if normalise else 1.0
                ax.plot(centres, getattr(s, along) / scale, color=colour, lw=0.6, alpha=0.6,
                        label=kind if i == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
    real_ratios = np.stack([s.component_ratio for s in [*dirlab, popi]])
    groups = [("real", real_ratios, "0.4")] + [
        (kind, np.stack([s.component_ratio for s in result["samples"]]), colour)
        for colour, (kind, result) in zip(colours, kinds.items())
    ]
    width = 0.8 / len(groups)
    for g, (label, ratios, colour) in enumerate(groups):
        mean = ratios.mean(axis=0)
        err = np.stack([mean - ratios.min(axis=0), ratios.max(axis=0) - mean])
        axes[3].bar(np.arange(3) + (g - (len(groups) - 1) / 2) * width, mean, width, yerr=err, color=colour,
                    capsize=3, label=label)
    axes[3].set_xticks(range(3), ["LR", "AP", "SI"])
    axes[3].set_ylabel("share of mean |component| (bars: min-max)")
    axes[3].legend(fontsize=7)
    means = [("DIR-Lab", [s.mean_magnitude_mm for s in dirlab], "0.35"), ("POPI", [popi.mean_magnitude_mm], "k")]
    means += [(kind, [s.mean_magnitude_mm for s in r["samples"]], c) for c, (kind, r) in zip(colours, kinds.items())]
    for g, (label, values, colour) in enumerate(means):
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        axes[4].scatter(g + jitter, values, color=colour, s=14)
    axes[4].set_xticks(range(len(means)), [m[0] for m in means])
    axes[4].set_ylabel("per-patient mean |d| (mm)")
    pairs = [(axes[5], lambda s: s.expansion, "LR expansion (slope of d_x / mean |d_z|)",
              "AP expansion (slope of d_y / mean |d_z|)"),
             (axes[6], lambda s: s.lung_shift[1:], "posterior shift per mm SI, by height (a)",
              "... by distance from the midline (b)")]
    for ax, pair, xlabel, ylabel in pairs:
        real_pairs = np.stack([pair(s) for s in dirlab])
        ax.scatter(real_pairs[:, 0], real_pairs[:, 1], color="0.35", s=16, label="DIR-Lab")
        ax.scatter(*pair(popi), color="k", marker="x", s=30, label="POPI")
        for colour, (kind, result) in zip(colours, kinds.items()):
            synthetic = np.stack([pair(s) for s in result["samples"]])
            ax.scatter(synthetic[:, 0], synthetic[:, 1], color=colour, s=10, alpha=0.7, label=kind)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("End-exhale -> end-inhale lung motion: real landmarks against simulated patients")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", action="append", choices=sorted(SOURCES), help="synthetic source (repeatable)")
    parser.add_argument("--patients", type=int, default=20, help="synthetic patients per kind")
    parser.add_argument("--grid", type=int, default=64, help="synthetic grid size (voxels per axis)")
    parser.add_argument("--points", type=int, default=5000, help="points drawn in each synthetic patient's lungs")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--landmarks", type=Path, default=LANDMARKS, help="holds dirlab/ and popi/")
    parser.add_argument("--no-readme", action="store_true", help="do not update the README block")
    args = parser.parse_args()
    if not args.landmarks.exists():
        raise SystemExit(f"real landmarks not found: {args.landmarks} (see ../shared/data/README.md)")

    dirlab_samples, real_samples = real_statistics(args.landmarks)
    real, dirlab = population_statistics(real_samples), population_statistics(dirlab_samples)
    print("real landmark motion, end-exhale -> end-inhale (mm; shares LR : AP : SI; bins base -> apex):")
    for s in real_samples:
        print(f"  {s.name:9s} mean {s.mean_magnitude_mm:6.2f}  shares {_shares(s.component_ratio)}  signed "
              f"{np.round(s.signed_mean_mm, 2).tolist()}  bins {np.round(s.bin_mean_magnitude_mm, 2).tolist()}  "
              f">10 mm {s.fraction_above:.2f}")
    leave_one_out = shift_leave_one_out(args.landmarks)
    none = np.mean([r["error_none_mm"] for r in leave_one_out])
    shifted = np.mean([r["error_shift_mm"] for r in leave_one_out])
    better = sum(r["error_shift_mm"] < r["error_none_mm"] for r in leave_one_out)
    print(f"lung shift, DIR-Lab leave-one-out: front-back landmark error {none:.2f} mm with none, {shifted:.2f} mm with "
          f"the other cases' median shift (better in {better} of {len(leave_one_out)} cases)")
    kinds: dict[str, dict] = {}
    for kind in args.kind or ["cartoon"]:
        patients = SOURCES[kind](args.patients, args.grid, args.seed)
        samples = [field_statistics(field, mask, grid, args.points, seed=args.seed, name=name)
                   for name, field, mask, grid in patients]
        population = population_statistics(samples)
        kinds[kind] = {"samples": samples, "population": population,
                       "verdicts": verdicts(real, dirlab, population, samples)}
        print(f"{kind}: per-patient mean {np.round(population.per_patient_mean_mm, 2).tolist()}; shares "
              f"{_shares(population.component_ratio)}; profile {np.round(population.bin_profile, 2).tolist()}; "
              f"lung-shift constant {population.lung_shift[0]:.3f} (real {real.lung_shift[0]:.3f})")
        for key, verdict in kinds[kind]["verdicts"].items():
            print(f"  {key:10s} {'met' if verdict['met'] else 'MISSED'}: {verdict['value']} (real {verdict['real']})")

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "motion_realism.png"
    plot(png, dirlab_samples, real_samples[-1], kinds)
    write_results("motion_realism", {
        "command": "python benchmarks/bench_motion_realism.py " + " ".join(sys.argv[1:]),
        "criteria": CRITERIA,
        "ratio_tolerance": RATIO_TOLERANCE,
        "expansion_tolerance": EXPANSION_TOLERANCE,
        "fraction_tolerance": FRACTION_TOLERANCE,
        "lung_shift_leave_one_out": {"cases": leave_one_out, "mean_error_none_mm": round(float(none), 3),
                                     "mean_error_shift_mm": round(float(shifted), 3), "cases_better": int(better)},
        "real": {"population": real.to_dict(), "dirlab_population": dirlab.to_dict(),
                 "samples": [s.to_dict() for s in real_samples]},
        "synthetic": {kind: {"patients": args.patients, "grid": [args.grid] * 3, "points": args.points,
                             "population": r["population"].to_dict(), "verdicts": r["verdicts"],
                             "samples": [s.to_dict() for s in r["samples"]]} for kind, r in kinds.items()},
        "figure": str(png.relative_to(ROOT)),
    })
    table = readme_table(real, dirlab, kinds)
    print(table)
    if not args.no_readme:
        update_readme_table("motion_realism", table)


if __name__ == "__main__":
    main()
