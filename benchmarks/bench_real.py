"""Real anatomy: a motion model measured on real CT and real landmarks (real-anatomy issue).

Run ``python benchmarks/bench_real.py`` (after ``breathcast export`` of the model: see README "The shipped model").
Needs ``../shared/data`` (POPI, the two 4D-Lung CTs, POPI landmarks). Writes ``benchmarks/results/real.json``,
``benchmarks/results/real.png`` (POPI coronal and sagittal with the predicted superior-inferior motion, and the
landmarks) and the README table. Every number is measured through the engine's predictor, as the daemon serves it:
canonical frame, lung-centred model box, direct path.

- **POPI landmarks**: the plan is popi-phase00 (end-inhale, amplitude 1 on every slice); the field for amplitude 0
  (end-exhale) moves its 40 landmarks (pull-back: solve p + u(p) = q) and they are compared with the real
  phase-50 landmarks. Bar: mean TRE <= 2.5 mm (goal 1.5); no deformation 5.6 mm. Beside it, where the error lies
  (:func:`landmark_error_parts`): the predicted and real motion per component (LR, AP, SI), the SI motion of each
  lung, the TRE at the best single scale of the predicted motion, and DIR-Lab's spread of the same between patients;
  and a population reference without a network (:func:`population_reference`): DIR-Lab's average motion pattern given
  POPI's true mean motion, i.e. what a model that sees no patient-specific motion can reach.
- **Anatomical plausibility** on the three real CTs, plan -> the other end of the breath (4D-Lung phase 5 is
  taken as exhale: amplitude 0 -> 1; POPI is inhale: 1 -> 0): mean |u| of the vertebrae and outside the body
  (<= 1 mm), of the chest wall 5-25 mm outside the lungs (<= 3 mm), of the lowest fifth of the lungs (>= 8 mm),
  and folded voxels (0).
- **Field-of-view invariance**: POPI cropped 60 mm from below, 60 mm from above, and moved in space; the
  predicted motion of the same landmarks changes by <= 1 mm (the motion prior's own change beside it tells the
  network's part from the prior's).
- **Simulated test patients** (``--test-data``, held out): masked-MSE reduction (>= 60 %) and tumour error from
  the fields (<= 1.5 mm), by kind: cartoon, real-anatomy on the training CTs, real-anatomy on POPI (unseen CT).
  Beside them, the same tumour error and reduction with the patient's breathing depth known (:class:`DepthKnown`, an oracle that
  scales the model's field by one number per patient fitted on the true fields), which tells how much of the error
  is the depth that one planning scan and a normalised trace do not reveal (the simulator draws 5-25 mm).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import RESULTS, ROOT, markdown_table, update_readme_table, write_results

from breathcast.canonical import to_canonical
from breathcast.engine.package import read_package
from breathcast.engine.predictor import Plan, Predictor, PredictorConfig, load_predictor
from breathcast.errors import PlanRejected
from breathcast.geometry import Grid, Volume, field_to_lps_mm
from breathcast.io.dataset import read_volume
from breathcast.io.dicom_io import read_ct_series
from breathcast.io.landmarks import read_dirlab_cases, read_popi
from breathcast.model_box import check_plan, model_box_volume, resample_onto
from breathcast.motion_prior import motion_prior
from breathcast.segmentation import ThoraxSegmentation, signed_distance_mm
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.sim.landmark_model import fit_landmark_model, leave_one_out_tre
from breathcast.sim.motion_statistics import point_extent_mm, si_ap_gradient
from breathcast.warp import count_folds

DATA = ROOT.parent / "shared" / "data"
POPI = DATA / "ct" / "popi-phase00"
LUNGCT = [DATA / "ct" / "lungct-examples" / f"lungct-{n}-phase5.nii.gz" for n in ("0001", "0103")]
DEFAULT_PACKAGE = ROOT / "breathcast" / "models" / "cvae64-engine"
CROP_MM = 60.0
SHIFT_MM = np.array([25.0, -20.0, 30.0])


def read_ct(path: Path) -> Volume:
    """A real CT in the canonical frame."""
    volume = read_ct_series(path).volume if path.is_dir() else read_volume(path)
    return to_canonical(volume)[0]


def predictor_for(package, volume: Volume, plan_amplitude: float, targets: np.ndarray, sliding_mask: bool = True) -> Predictor:
    """The direct-path predictor of ``package`` on a plan at one amplitude on every slice."""
    plan = Plan(volume, np.full(volume.shape[0], plan_amplitude), target_lps_mm=targets, name="bench")
    return load_predictor(package, plan, PredictorConfig(path="direct", sliding_mask=sliding_mask))


def field_at(predictor: Predictor, amplitude: float) -> np.ndarray:
    """(3, D, D, D) model-grid voxels: every slice at ``amplitude``, rate 0."""
    return predictor.network_displacements(np.full((1, predictor.slices), amplitude, np.float32))[0]


def crop_z(volume: Volume, below_mm: float, above_mm: float) -> Volume:
    """The volume without ``below_mm`` of its inferior and ``above_mm`` of its superior slices."""
    g = volume.grid
    z = g.origin[2] + g.spacing[2] * np.arange(g.shape[0])
    keep = np.flatnonzero((z >= z[0] + below_mm) & (z <= z[-1] - above_mm))
    grid = Grid((len(keep),) + g.shape[1:], g.spacing, (g.origin[0], g.origin[1], float(z[keep[0]])),
                frame_of_reference_uid=g.frame_of_reference_uid)
    return Volume(np.ascontiguousarray(volume.array[keep]), grid)


def shifted(volume: Volume, shift_mm: np.ndarray) -> Volume:
    g = volume.grid
    return Volume(volume.array, Grid(g.shape, g.spacing, tuple(np.asarray(g.origin) + shift_mm), frame_of_reference_uid=g.frame_of_reference_uid))


def popi_landmarks(package) -> tuple[dict, tuple]:
    """TRE of POPI's 40 landmarks, phase 00 (plan) -> phase 50, and the field-of-view invariance; and what
    :func:`draw` needs."""
    pairs = read_popi(DATA / "landmarks" / "popi")
    inhale, exhale = pairs.inhale_mm, pairs.exhale_mm
    full = read_ct(POPI)
    predictor = predictor_for(package, full, 1.0, inhale)
    u = field_at(predictor, 0.0)
    now, moved = predictor.target_positions(u)
    tre = np.linalg.norm(now - exhale, axis=1)
    none = np.linalg.norm(inhale - exhale, axis=1)
    result = {
        "landmarks": len(tre), "tre_mean_mm": float(tre.mean()), "tre_p95_mm": float(np.percentile(tre, 95)),
        "tre_max_mm": float(tre.max()), "no_deformation_mean_mm": float(none.mean()),
        "predicted_mean_motion_mm": float(np.linalg.norm(moved, axis=1).mean()),
        "real_mean_motion_mm": float(none.mean()),
        "plan_warnings": list(predictor.plan_warnings), "model_grid": repr(predictor.grid),
        "error_parts": landmark_error_parts(inhale, now - inhale, exhale - inhale),
    }
    variants = {
        f"cropped {CROP_MM:.0f} mm below": (crop_z(full, CROP_MM, 0.0), np.zeros(3)),
        f"cropped {CROP_MM:.0f} mm above": (crop_z(full, 0.0, CROP_MM), np.zeros(3)),
        "moved (25, -20, 30) mm": (shifted(full, SHIFT_MM), SHIFT_MM),
    }
    invariance = {}
    prior_full = prior_motion(full, inhale, package.prior_version)
    for name, (volume, shift) in variants.items():
        z0, z1 = volume.grid.origin[2], volume.grid.origin[2] + volume.grid.spacing[2] * (volume.shape[0] - 1)
        inside = (inhale[:, 2] + shift[2] >= z0) & (inhale[:, 2] + shift[2] <= z1)
        p = predictor_for(package, volume, 1.0, inhale[inside] + shift)
        _, d = p.target_positions(field_at(p, 0.0))
        change = np.linalg.norm(d - moved[inside], axis=1)
        prior_change = np.linalg.norm(prior_motion(volume, inhale[inside] + shift, package.prior_version) - prior_full[inside], axis=1)
        invariance[name] = {"landmarks": int(inside.sum()), "mean_change_mm": float(change.mean()),
                            "prior_mean_change_mm": float(prior_change.mean()),
                            "max_change_mm": float(change.max()),
                            "tre_mean_mm": float(np.linalg.norm(inhale[inside] + shift + d - exhale[inside] - shift, axis=1).mean())}
    result["field_of_view"] = invariance
    alone = predictor_for(package, full, 1.0, inhale, sliding_mask=False)
    now_alone, _ = alone.target_positions(field_at(alone, 0.0))
    result["tre_mean_mm_network_alone"] = float(np.linalg.norm(now_alone - exhale, axis=1).mean())
    result["tre_mean_mm_prior_alone"] = float(np.linalg.norm(inhale + prior_full - exhale, axis=1).mean())
    result["population_reference"] = population_reference(predictor.plan_check.segmentation, inhale, exhale)
    return result, (full, predictor, u, inhale, exhale, now)


@functools.cache
def dirlab_cases() -> tuple:
    """DIR-Lab's 10 cases of landmark pairs, read once."""
    return tuple(read_dirlab_cases(DATA / "landmarks" / "dirlab"))


def _right_lung(position: np.ndarray) -> np.ndarray:
    """(N,) bool: the points right of the median x (LPS: smaller x), taken as the right lung's."""
    return position[:, 0] < np.median(position[:, 0])


def _right_left_si(position: np.ndarray, motion: np.ndarray) -> float:
    """Mean |SI motion| of the points of :func:`_right_lung` over that of the others."""
    right = _right_lung(position)
    return float(np.abs(motion[right, 2]).mean() / np.abs(motion[~right, 2]).mean())


def landmark_error_parts(plan_points: np.ndarray, predicted: np.ndarray, real: np.ndarray) -> dict:
    """Where a landmark error lies: (N, 3) LPS mm plan positions, predicted and real motion from them (mm).

    Per component (LR, AP, SI): mean |predicted|, mean |real|, their signed means and the mean |error|; the right/left
    ratio of SI motion and how much more the back moves than the front at equal height
    (:func:`~breathcast.sim.motion_statistics.si_ap_gradient`, at the plan positions), predicted and real; the mean
    TRE after the best single scale s of the predicted motion (least squares, s = <p, r> / <p, p>), and after the best
    scale of each lung's SI motion alone (the points right and left of the median x); and, over DIR-Lab's
    10 cases (exhale -> inhale, the same measures), the range of the signed mean AP and of the right/left SI ratio: how
    far these differ between patients.
    """
    scale = float((predicted * real).sum() / max(float((predicted * predicted).sum()), 1e-12))
    per_lung = predicted.copy()
    right = _right_lung(plan_points)
    for side in (right, ~right):
        si = predicted[side, 2]
        per_lung[side, 2] *= float(si @ real[side, 2]) / max(float(si @ si), 1e-12)
    dirlab = dirlab_cases()
    signed_ap = [float((c.inhale_mm - c.exhale_mm)[:, 1].mean()) for c in dirlab]
    right_left = [_right_left_si(c.exhale_mm, c.inhale_mm - c.exhale_mm) for c in dirlab]
    return {
        "components": ["LR", "AP", "SI"],
        "predicted_mean_abs_mm": np.abs(predicted).mean(axis=0).tolist(), "real_mean_abs_mm": np.abs(real).mean(axis=0).tolist(),
        "predicted_signed_mean_mm": predicted.mean(axis=0).tolist(), "real_signed_mean_mm": real.mean(axis=0).tolist(),
        "mean_abs_error_mm": np.abs(predicted - real).mean(axis=0).tolist(),
        "right_left_si_ratio": {"predicted": _right_left_si(plan_points, predicted), "real": _right_left_si(plan_points, real)},
        "si_ap_gradient": {"predicted": si_ap_gradient(plan_points, predicted),
                           "real": si_ap_gradient(plan_points, real)},
        "best_scale": scale, "tre_mean_mm_at_best_scale": float(np.linalg.norm(scale * predicted - real, axis=1).mean()),
        "tre_mean_mm_at_best_si_scale_per_lung": float(np.linalg.norm(per_lung - real, axis=1).mean()),
        "dirlab_signed_mean_ap_mm_range": [min(signed_ap), max(signed_ap)],
        "dirlab_right_left_si_ratio_range": [min(right_left), max(right_left)],
    }


def population_reference(lungs_segmentation: ThoraxSegmentation, inhale: np.ndarray, exhale: np.ndarray) -> dict:
    """How well the average pattern of real lungs places POPI's landmarks: the population model of DIR-Lab's 10 cases
    (:func:`~breathcast.sim.landmark_model.fit_landmark_model`, inhale -> exhale) given POPI's true mean |SI| motion (an
    oracle no served model has), the points placed in the lungs by the landmarks' own extent (as in the fit) and by
    the segmented lungs' (``lungs_segmentation``, the plan check's: 1st-99th percentiles of the lung voxels); and the
    same model's error on each DIR-Lab case when fitted on the other nine
    (:func:`~breathcast.sim.landmark_model.leave_one_out_tre`)."""
    cases = list(dirlab_cases())
    model = fit_landmark_model(cases)
    real = exhale - inhale
    mean_si = float(np.abs(real[:, 2]).mean())
    lung_voxels = lungs_segmentation.grid.index_to_lps(np.argwhere(lungs_segmentation.lungs))
    by_landmarks = model.predict(inhale, mean_si)
    by_lungs = model.predict(inhale, mean_si, point_extent_mm(lung_voxels))
    leave_one_out = leave_one_out_tre(cases)
    return {
        "tre_mean_mm_by_landmark_extent": float(np.linalg.norm(by_landmarks - real, axis=1).mean()),
        "tre_mean_mm_by_lung_extent": float(np.linalg.norm(by_lungs - real, axis=1).mean()),
        "right_left_si_ratio_by_lung_extent": _right_left_si(inhale, by_lungs),
        "dirlab_leave_one_out_tre_mean_mm": float(np.mean(leave_one_out)),
        "dirlab_mean_motion_mm": float(np.mean([np.linalg.norm(c.displacement_mm, axis=1).mean() for c in cases])),
    }


def prior_motion(volume: Volume, inhale: np.ndarray, version: int) -> np.ndarray:
    """(N, 3) LPS mm: the motion prior of ``version`` read as the motion of the landmarks ``inhale`` (N, 3): p -> p + prior(p)
    (the prior is the pull-back to amplitude 1 of the anatomy it is built on: where the tissue at p of an inhaled CT
    lies on exhale)."""
    box, _ = model_box_volume(volume, (64, 64, 64))
    half = box.grid.with_shape((32, 32, 32))
    u_mm = field_to_lps_mm(0.5 * motion_prior(box, version=version), half)  # model-grid voxels -> half-grid voxels -> mm
    points = half.lps_to_index(inhale).T
    return np.stack([ndimage.map_coordinates(u_mm[c], points, order=1, mode="nearest") for c in range(3)], axis=1)


@dataclass(frozen=True)
class Regions:
    vertebrae: np.ndarray
    outside: np.ndarray
    chest_wall: np.ndarray
    lung_base: np.ndarray


def regions(seg) -> Regions:
    """The plausibility regions on the segmentation's grid (see the module docstring)."""
    lungs = seg.lungs
    sp = seg.grid.spacing_zyx
    distance = -signed_distance_mm(lungs, sp)  # mm outside the lungs
    slices = np.flatnonzero(lungs.any(axis=(1, 2)))
    in_lung_range = np.zeros(lungs.shape, bool)
    in_lung_range[slices[0] : slices[-1] + 1] = True
    chest_wall = seg.body & ~seg.cavity & (distance >= 5.0) & (distance <= 25.0) & in_lung_range
    z = np.arange(lungs.shape[0])[:, None, None]
    base = lungs & (z <= slices[0] + 0.2 * (slices[-1] - slices[0]))
    return Regions(seg.spine, ~ndimage.binary_dilation(seg.body, iterations=2), chest_wall, base)


def mean_motion_on(seg_grid: Grid, u_mm: np.ndarray, model_grid: Grid, mask: np.ndarray) -> float:
    """Mean |u| (mm) over ``mask`` voxels of the segmentation grid, the field sampled there (trilinear)."""
    index = np.argwhere(mask)
    if len(index) == 0:
        return float("nan")
    points = model_grid.lps_to_index(seg_grid.index_to_lps(index)).T
    samples = np.stack([ndimage.map_coordinates(u_mm[c], points, order=1, mode="nearest") for c in range(3)])
    return float(np.linalg.norm(samples, axis=0).mean())


def plausibility(package, name: str, volume: Volume, plan_amplitude: float, note: str = "", sliding_mask: bool = True) -> dict:
    predictor = predictor_for(package, volume, plan_amplitude, np.zeros((0, 3)), sliding_mask)
    target = 1.0 - plan_amplitude
    u = field_at(predictor, target)
    u_mm = field_to_lps_mm(u, predictor.grid)
    seg = predictor.plan_check.segmentation
    r = regions(seg)
    row = {"ct": name, "sliding mask": "yes" if sliding_mask else "no (network alone)", "plan -> amplitude": f"{plan_amplitude:g} -> {target:g}"}
    for key, mask in (("vertebrae", r.vertebrae), ("outside body", r.outside), ("chest wall 5-25 mm", r.chest_wall),
                      ("lung base", r.lung_base)):
        row[key] = mean_motion_on(seg.grid, u_mm, predictor.grid, mask)
    row["folded voxels"] = int(count_folds(u))
    row["note"] = note
    return row


class DepthKnown:
    """An oracle, not a model: ``inner``'s field times one scale per patient, the least-squares fit of its
    superior-inferior displacement in the lungs to the true one over the scans -> the patient's most inhaled scan.

    Breathing depth (mm of motion per unit of the normalised trace) differs between patients; this is the
    tumour error a model would have that knew it and nothing more.
    """

    name = "depth known"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.scales: dict[str, float] = {}

    def scale(self, patient) -> float:
        if patient.patient_id not in self.scales:
            fixed = int(np.argmax(patient.amplitude.mean(axis=1)))
            lungs = np.isin(patient.labels[fixed], list(LUNG_LABELS))
            num = den = 0.0
            for k in (k for k in range(patient.n_scans) if k != fixed):
                u = self.inner.predict(patient, k, patient.amplitude[fixed])[0][lungs]
                num += float(u @ patient.true_pair_field(k, fixed)[0][lungs])
                den += float(u @ u)
            self.scales[patient.patient_id] = num / den
        return self.scales[patient.patient_id]

    def predict(self, patient, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        return self.scale(patient) * self.inner.predict(patient, moving, fixed_amplitude)


def simulated(model_path: Path, test_data: Path) -> list[dict]:
    """Masked MSE reduction and tumour error from the fields on held-out simulated patients, by kind; both with the
    breathing depth known (:class:`DepthKnown`) and the range of its per-patient scales beside."""
    from breathcast.io.dataset import open_dataset, read_patient
    from breathcast.training.cvae import load_cvae
    from breathcast.training.data import load_patients
    from breathcast.training.evaluate import CVAEPredictor, NoDeformation, TrueField, evaluate

    dataset = open_dataset(test_data)
    kinds: dict[str, list[str]] = {}
    for pid in dataset.patients:
        meta = read_patient(dataset, pid, with_fields=False).metadata.get("simulator", {})
        source = (meta.get("anatomy") or {}).get("source")
        kind = "cartoon" if source is None else ("real anatomy, POPI (unseen CT)" if "popi" in source else "real anatomy, training CTs")
        kinds.setdefault(kind, []).append(pid)
    model = load_cvae(model_path)
    rows = []
    for kind, ids in kinds.items():
        patients = load_patients(dataset, ids, model.config.grid, with_truth=True, with_priors=model.config.prior_channels > 0,
                                 with_sliding_masks=model.config.sliding_mask)
        depth_known = DepthKnown(CVAEPredictor(model))
        result = evaluate([NoDeformation(), CVAEPredictor(model), depth_known, TrueField()], patients, pairs_per_patient=10,
                          seed=0, progress=False)
        s = result.summary["cVAE"]
        scales = list(depth_known.scales.values())
        rows.append({"patients": kind, "n": len(ids), "masked MSE reduction (%)": s.masked_mse_reduction_percent,
                     "true field's reduction (%)": result.summary["True field"].masked_mse_reduction_percent,
                     "tumour error, fields (mm)": s.tumour_motion_error_mm,
                     "no deformation tumour motion (mm)": result.summary["No Deformation"].tumour_motion_error_mm,
                     "field error, lungs (mm)": s.epe_mm, "folded voxels": s.folded_voxels_total,
                     "tumour error, depth known (mm)": result.summary[depth_known.name].tumour_motion_error_mm,
                     "masked MSE reduction, depth known (%)": result.summary[depth_known.name].masked_mse_reduction_percent,
                     "depth scale, min - max": f"{min(scales):.2f} - {max(scales):.2f}"})
    return rows


def draw(path: Path, figure) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume, predictor, u, inhale, exhale, now = figure
    g = predictor.grid
    u_mm = field_to_lps_mm(u, g)
    ct_on_box = resample_onto(volume, g)
    y = int(round(g.lps_to_index(inhale.mean(axis=0))[1]))
    x = int(round(g.lps_to_index(np.array([inhale[:, 0].mean(), 0, 0]))[2]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    sx, sy, sz = g.spacing
    ext_cor = [g.origin[0], g.origin[0] + sx * g.shape[2], g.origin[2], g.origin[2] + sz * g.shape[0]]
    ext_sag = [g.origin[1], g.origin[1] + sy * g.shape[1], g.origin[2], g.origin[2] + sz * g.shape[0]]
    for ax, img, field, ext, cols, title in (
        (axes[0], ct_on_box.array[:, y, :], u_mm[2][:, y, :], ext_cor, 0, "coronal"),
        (axes[1], ct_on_box.array[:, :, x], u_mm[2][:, :, x], ext_sag, 1, "sagittal"),
    ):
        ax.imshow(img, cmap="gray", vmin=-1000, vmax=400, origin="lower", extent=ext)
        im = ax.imshow(np.ma.masked_inside(field, -0.5, 0.5), cmap="RdBu_r", vmin=-12, vmax=12, alpha=0.45, origin="lower", extent=ext)
        ax.scatter(inhale[:, cols], inhale[:, 2], s=10, c="y", label="phase 00 (plan)")
        ax.scatter(exhale[:, cols], exhale[:, 2], s=10, c="c", label="phase 50 (real)")
        ax.scatter(now[:, cols], now[:, 2], s=10, c="m", marker="x", label="predicted")
        ax.set_title(f"POPI, {title}")
        ax.set_xlabel("x (mm LPS)" if cols == 0 else "y (mm LPS)")
        ax.set_ylabel("z (mm LPS)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("predicted pull-back u_z (mm), end-inhale plan -> end-exhale, and the 40 landmarks")
    fig.colorbar(im, ax=axes, shrink=0.7, label="u_z (mm)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="engine package (default: the shipped one)")
    parser.add_argument("--model", type=Path, default=None, help="the package's model.pt, for the simulated test patients")
    parser.add_argument("--test-data", type=Path, default=None, help="held-out simulated patients (a dataset folder)")
    parser.add_argument("--name", default="real", help="results name (benchmarks/results/NAME.json, README block)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if not POPI.exists():
        raise SystemExit(f"real data not found: {POPI} (see ../shared/data/README.md)")
    package = read_package(args.package)

    popi, figure = popi_landmarks(package)
    print(f"POPI TRE mean {popi['tre_mean_mm']:.2f} mm (no deformation {popi['no_deformation_mean_mm']:.2f})")
    cases = [("popi-phase00", read_ct(POPI), 1.0, "end-inhale plan")]
    for path in LUNGCT:
        volume = read_ct(path)
        note = ""
        try:
            check_plan(volume)
        except PlanRejected:  # lungct-0001: its header's anterior-posterior axis contradicts the anatomy
            volume = volume.with_array(np.ascontiguousarray(volume.array[:, ::-1, :]))
            note = "refused as stored (plan_rejected: its header's front-back axis contradicts the anatomy); measured flipped"
        cases.append((path.name.split(".")[0], volume, 0.0, note))
    rows = [plausibility(package, *case) for case in cases]
    alone_rows = [plausibility(package, *case, sliding_mask=False) for case in cases]
    for row in rows + alone_rows:
        print(row)
    sim_rows = simulated(args.model, args.test_data) if args.model and args.test_data else []
    for row in sim_rows:
        print(row)

    bars = {
        "POPI mean TRE <= 2.5 mm (goal 1.5)": (popi["tre_mean_mm"], popi["tre_mean_mm"] <= 2.5),
        "vertebrae mean |u| <= 1 mm (every CT)": (max(r["vertebrae"] for r in rows), all(r["vertebrae"] <= 1.0 for r in rows)),
        "outside the body mean |u| <= 1 mm": (max(r["outside body"] for r in rows), all(r["outside body"] <= 1.0 for r in rows)),
        "chest wall 5-25 mm outside the lungs <= 3 mm": (max(r["chest wall 5-25 mm"] for r in rows), all(r["chest wall 5-25 mm"] <= 3.0 for r in rows)),
        "lung base >= 8 mm": (min(r["lung base"] for r in rows), all(r["lung base"] >= 8.0 for r in rows)),
        "folded voxels 0": (sum(r["folded voxels"] for r in rows), all(r["folded voxels"] == 0 for r in rows)),
        "field of view: landmark motion changes <= 1 mm (mean)": (max(v["mean_change_mm"] for v in popi["field_of_view"].values()),
                                                                  all(v["mean_change_mm"] <= 1.0 for v in popi["field_of_view"].values())),
    }
    for row in sim_rows:
        bars[f"{row['patients']}: masked MSE reduction >= 60 %"] = (row["masked MSE reduction (%)"], row["masked MSE reduction (%)"] >= 60.0)
        bars[f"{row['patients']}: tumour error (fields) <= 1.5 mm"] = (row["tumour error, fields (mm)"], row["tumour error, fields (mm)"] <= 1.5)
    manifest = package.manifest
    results = {"package": str(args.package), "model_id": package.model_id, "model_box": manifest.model_box,
               "trained_on": manifest.training.get("data", {}).get("source"), "popi": popi, "plausibility": rows,
               "plausibility_network_alone": alone_rows,
               "simulated": sim_rows, "bars": {k: {"value": v, "met": bool(m)} for k, (v, m) in bars.items()}}
    write_results(args.name, results)
    draw(RESULTS / f"{args.name}.png", figure)

    table = markdown_table([{"measure": k, "value": f"{v:.2f}", "": "met" if m else "**missed**"} for k, (v, m) in bars.items()],
                           ["measure", "value", ""])
    table += "\n\n" + markdown_table(
        [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items() if k != "note"} for r in rows + alone_rows],
        ["ct", "sliding mask", "plan -> amplitude", "vertebrae", "outside body", "chest wall 5-25 mm", "lung base", "folded voxels"])
    table += "\n\nMean |u| in mm. " + " ".join(f"{r['ct']}: {r['note']}." for r in rows if r["note"])
    fov = popi["field_of_view"]
    table += "\n\n" + markdown_table(
        [{"POPI variant": k, "landmarks": v["landmarks"], "mean change (mm)": f"{v['mean_change_mm']:.2f}",
          "max change (mm)": f"{v['max_change_mm']:.2f}", "TRE (mm)": f"{v['tre_mean_mm']:.2f}",
          "the prior's mean change (mm)": f"{v['prior_mean_change_mm']:.2f}"} for k, v in fov.items()],
        ["POPI variant", "landmarks", "mean change (mm)", "max change (mm)", "TRE (mm)", "the prior's mean change (mm)"])
    if sim_rows:
        table += "\n\n" + markdown_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in sim_rows],
                                         list(sim_rows[0]))
    table += (f"\n\nPOPI: {popi['landmarks']} landmarks, TRE mean {popi['tre_mean_mm']:.2f} mm, p95 {popi['tre_p95_mm']:.2f}, "
              f"max {popi['tre_max_mm']:.2f} (no deformation {popi['no_deformation_mean_mm']:.2f}; the network without the sliding "
              f"mask {popi['tre_mean_mm_network_alone']:.2f}; the motion prior alone {popi['tre_mean_mm_prior_alone']:.2f}); "
              f"predicted landmark motion "
              f"{popi['predicted_mean_motion_mm']:.2f} mm against {popi['real_mean_motion_mm']:.2f} real. Package {package.model_id}.")
    parts = popi["error_parts"]
    table += "\n\n" + markdown_table(
        [{"POPI landmark motion (mm)": name, "predicted mean abs": f"{parts['predicted_mean_abs_mm'][i]:.2f}",
          "real mean abs": f"{parts['real_mean_abs_mm'][i]:.2f}", "predicted signed mean": f"{parts['predicted_signed_mean_mm'][i]:.2f}",
          "real signed mean": f"{parts['real_signed_mean_mm'][i]:.2f}", "mean abs error": f"{parts['mean_abs_error_mm'][i]:.2f}"}
         for i, name in enumerate(parts["components"])],
        ["POPI landmark motion (mm)", "predicted mean abs", "real mean abs", "predicted signed mean", "real signed mean", "mean abs error"])
    rl = parts["right_left_si_ratio"]
    table += (f"\n\nInhale -> exhale, LPS (x left, y posterior, z superior). Right/left ratio of SI motion: predicted "
              f"{rl['predicted']:.2f}, real {rl['real']:.2f}. Back over front at equal height (SI, per mean |SI|): "
              f"predicted {parts['si_ap_gradient']['predicted']:.2f}, real {parts['si_ap_gradient']['real']:.2f}. "
              f"TRE at the best single scale of the predicted motion "
              f"({parts['best_scale']:.2f}): {parts['tre_mean_mm_at_best_scale']:.2f} mm; with each lung's SI motion at its "
              f"best scale: {parts['tre_mean_mm_at_best_si_scale_per_lung']:.2f} mm. DIR-Lab's 10 cases (exhale -> inhale): "
              f"signed mean AP {parts['dirlab_signed_mean_ap_mm_range'][0]:.2f} to {parts['dirlab_signed_mean_ap_mm_range'][1]:.2f} mm, "
              f"right/left SI ratio {parts['dirlab_right_left_si_ratio_range'][0]:.2f} to {parts['dirlab_right_left_si_ratio_range'][1]:.2f}.")
    ref = popi["population_reference"]
    table += (f"\n\nPopulation reference (no network): DIR-Lab's average motion pattern (`breathcast/sim/landmark_model.py`) given "
              f"POPI's true mean SI motion reads {ref['tre_mean_mm_by_landmark_extent']:.2f} mm on POPI (points placed by the "
              f"landmarks' extent, as fitted) or {ref['tre_mean_mm_by_lung_extent']:.2f} mm (by the segmented lungs'), right/left "
              f"SI ratio {ref['right_left_si_ratio_by_lung_extent']:.2f}; fitted on nine DIR-Lab cases it reads "
              f"{ref['dirlab_leave_one_out_tre_mean_mm']:.2f} mm on the tenth (mean over the ten; their mean motion "
              f"{ref['dirlab_mean_motion_mm']:.2f} mm).")
    print(table)
    if not args.no_readme:
        update_readme_table(args.name, table)
    print(json.dumps({k: v["met"] for k, v in results["bars"].items()}, indent=1))


if __name__ == "__main__":
    main()
