"""Figures a physicist looks at first: a simulated patient's anatomy, trace and ground-truth motion."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no screen on these machines
import matplotlib.pyplot as plt
import numpy as np

from breathcast.anatomy import Label
from breathcast.geometry import field_to_lps_mm
from breathcast.simulator import SimulatedPatient

__all__ = ["plot_patient_overview"]


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
