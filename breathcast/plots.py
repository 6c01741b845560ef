"""Figures a physicist looks at first: a simulated patient's anatomy, trace and ground-truth motion."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no screen on these machines
import matplotlib.pyplot as plt
import numpy as np

from breathcast.sim.anatomy import Label
from breathcast.geometry import Grid, field_to_lps_mm
from breathcast.sim.simulator import SimulatedPatient

__all__ = ["plot_patient_overview", "plot_prediction"]


def plot_patient_overview(patient: SimulatedPatient, path: Path) -> Path:
    """Write a PNG: coronal slices at exhale and inhale, their difference, the trace, the true motion.

    The exhale and inhale scans are the patient's scans of lowest and highest mean per-slice amplitude;
    the coronal plane passes through the first tumour. Displacements are shown in mm (pull-back,
    superior-inferior component, patient LPS).
    """
    grid = patient.grid
    means = [float(scan.amplitude.mean()) for scan in patient.scans]
    exhale, inhale = patient.scans[int(np.argmin(means))], patient.scans[int(np.argmax(means))]
    tumour = np.argwhere(patient.reference_labels == Label.TUMOUR)
    row = int(np.round(tumour[:, 1].mean())) if len(tumour) else grid.shape[1] // 2
    sx, sy, sz = grid.spacing
    extent = (0, grid.shape[2] * sx, 0, grid.shape[0] * sz)  # mm across (x) and up (z)
    image_kw = dict(cmap="gray", vmin=-1000, vmax=400, origin="lower", extent=extent)

    fig = plt.figure(figsize=(15, 7.5), layout="constrained")
    axes = fig.subplot_mosaic([["exhale", "inhale", "difference", "motion"], ["trace", "trace", "trace", "trace"]],
                              height_ratios=[2.2, 1])
    for key, scan, title in (("exhale", exhale, "exhale scan"), ("inhale", inhale, "inhale scan")):
        axes[key].imshow(scan.image_hu[:, row, :], **image_kw)
        axes[key].set_title(f"{title} (mean amplitude {scan.amplitude.mean():.2f})")
    diff = inhale.image_hu[:, row, :] - exhale.image_hu[:, row, :]
    axes["difference"].imshow(diff, cmap="RdBu_r", vmin=-800, vmax=800, origin="lower", extent=extent)
    axes["difference"].set_title("inhale - exhale (HU)")
    si_mm = field_to_lps_mm(inhale.field, grid)[2, :, row, :]
    shown = axes["motion"].imshow(si_mm, cmap="magma", origin="lower", extent=extent)
    fig.colorbar(shown, ax=axes["motion"], label="superior-inferior displacement (mm)")
    axes["motion"].contour(inhale.labels[:, row, :] > 0, levels=[0.5], colors="w", linewidths=0.5, extent=extent)
    axes["motion"].set_title("true motion of the inhale scan")
    for key in ("exhale", "inhale", "difference", "motion"):
        axes[key].set_xlabel("x (mm)")
        axes[key].set_ylabel("z (mm)")

    ax = axes["trace"]
    ax.plot(patient.trace.time_s, patient.trace.amplitude, lw=0.8, color="0.3", label="breathing amplitude")
    for k, scan in enumerate(patient.scans):
        color = "tab:blue" if scan is exhale else "tab:red" if scan is inhale else "tab:green"
        ax.plot(scan.slice_times_s, scan.amplitude, color=color, lw=2.0 if color != "tab:green" else 1.2,
                label="per-slice trace of a scan" if k == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("amplitude (0 exhale, 1 inhale)")
    ax.legend(loc="upper right")
    fig.suptitle(
        f"{patient.patient_id}: {len(patient.scans)} fast helical scans, diaphragm motion "
        f"{patient.motion.si_amplitude_mm:.1f} mm at amplitude 1"
    )
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_prediction(
    moving: np.ndarray,
    fixed: np.ndarray,
    predicted: np.ndarray,
    si_predicted_mm: np.ndarray,
    si_true_mm: np.ndarray,
    grid: Grid,
    row: int,
    path: Path,
    title: str,
) -> Path:
    """Write a PNG in the manner of the paper's Fig. 4, on one coronal plane (array row ``row``).

    Args:
        moving, fixed, predicted: (Z, Y, X) images in [0, 1]: the planning scan, the true scan at the new
            trace, and the planning scan warped by the predicted field.
        si_predicted_mm, si_true_mm: (Z, Y, X) superior-inferior displacement (mm, LPS z) of the predicted and
            the true field.
        grid: the images' grid.
    """
    sx, _, sz = grid.spacing
    extent = (0, grid.shape[2] * sx, 0, grid.shape[0] * sz)
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5), layout="constrained")
    panels = [
        (moving, "planning scan M", "gray", (0, 1)),
        (fixed, "true scan at the new trace F", "gray", (0, 1)),
        (predicted, "predicted φ∘M", "gray", (0, 1)),
        (np.abs(predicted - fixed) - np.abs(moving - fixed), "error vs no deformation (lower is better)", "RdBu_r", (-0.3, 0.3)),
    ]
    for ax, (image, name, cmap, (lo, hi)) in zip(axes[0], panels):
        shown = ax.imshow(image[:, row, :], cmap=cmap, vmin=lo, vmax=hi, origin="lower", extent=extent)
        ax.set_title(name)
    fig.colorbar(shown, ax=axes[0, 3], label="|φ∘M - F| - |M - F|")
    top = float(max(np.abs(si_true_mm[:, row, :]).max(), 1e-3))
    for ax, field, name in ((axes[1, 0], si_true_mm, "true"), (axes[1, 1], si_predicted_mm, "predicted")):
        shown = ax.imshow(field[:, row, :], cmap="coolwarm", vmin=-top, vmax=top, origin="lower", extent=extent)
        ax.set_title(f"{name} superior-inferior displacement")
    fig.colorbar(shown, ax=axes[1, 1], label="mm")
    diff = si_predicted_mm[:, row, :] - si_true_mm[:, row, :]
    shown = axes[1, 2].imshow(diff, cmap="RdBu_r", vmin=-top / 2, vmax=top / 2, origin="lower", extent=extent)
    axes[1, 2].set_title("predicted - true (mm)")
    fig.colorbar(shown, ax=axes[1, 2], label="mm")
    axes[1, 3].axis("off")
    for ax in axes.flat[:7]:
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("z (mm)")
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
