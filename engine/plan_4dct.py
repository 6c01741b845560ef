"""One command from a patient's 4DCT folder to servable per-patient packages: ``breathcast plan-4dct``.

Steps (each a stage of the progress bar): read and check the phases into the end-exhale phase's model box,
measure the breathing states, register every phase to end-exhale (sliding-aware demons), fit the 5D model
and export it as a ``linear5d`` package; adapt the population cVAE to the patient's phase pairs and export it
as a ``cvae`` package; write ``report.json`` and ``report.png``. The output folder is written whole or not
at all::

    OUT/linear5d/    the patient's 5D model  (breathcast serve --package OUT/linear5d --path linear5d ...)
    OUT/adapted/     the adapted network    (breathcast serve --package OUT/adapted ...)
    OUT/report.json  phases, states, registration residuals, 5D vs registered motion, times
    OUT/report.png   the same, as pictures

Serve either with the end-exhale phase as the plan (``--plan-amplitude 0``): the packages' box is that CT's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from breathcast.calibration.four_dct import FourDCTInput, fit_4dct_five_d, read_4dct_into_box, register_phases
from breathcast.calibration.readers import read_recording
from breathcast.engine.export import export_cvae, export_linear5d, scan_trace_spec
from breathcast.errors import BreathcastError
from breathcast.geometry import hu_to_unit
from breathcast.io.files import atomic_output_dir
from breathcast.metrics import endpoint_error_mm, folded_voxels, lung_region_mask, masked_mse
from breathcast.model_box import MODEL_BOX_MM
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.training.adapt import AdaptConfig, adapt_cvae
from breathcast.training.data import PatientData
from breathcast.training.inference import DEFAULT_MODEL
from breathcast.warp import warp

__all__ = ["Plan4DCTConfig", "plan_4dct", "phase_patient"]



@dataclass(frozen=True)
class Plan4DCTConfig:
    """What ``plan-4dct`` makes.

    Args:
        grid_size: D of the D³ model box (the population model's grid when adapting).
        period_s: the breathing period for the rates, s.
        phases: optional series -> phase percent mapping (see :func:`breathcast.io.four_dct.read_4dct`).
        recording: the breathing recording made with the 4DCT (RPM ``.vxp``, with a phase column): the phases'
            states come from it; None: from the images.
        adapt: also adapt the population network (needs ``population``).
        population: the population cVAE's ``model.pt`` (default: the shipped one).
        adaptation: its steps, learning rate and time limit.
        progress: show a progress bar.
    """

    grid_size: int = 64
    period_s: float = 4.0
    phases: dict[str, float] | None = None
    recording: Path | None = None
    adapt: bool = True
    population: Path = DEFAULT_MODEL
    adaptation: AdaptConfig = AdaptConfig(time_limit_s=150.0)
    progress: bool = True


def phase_patient(data: FourDCTInput, patient_id: str) -> PatientData:
    """The 4DCT as the training code's patient: phases in [0, 1], one amplitude per slice, segmentation labels."""
    nz = data.grid.shape[0]
    return PatientData(
        patient_id=patient_id,
        images=np.stack([hu_to_unit(x) for x in data.images_hu]).astype(np.float32),
        amplitude=np.repeat(data.states.amplitude[:, None], nz, axis=1).astype(np.float32),
        grid=data.grid,
        labels=np.stack([s.labels for s in data.segmentations]),
    )


def _residuals(data: FourDCTInput, fields: np.ndarray, five_d_fields: np.ndarray) -> list[dict[str, Any]]:
    """Per phase: masked MSE of no deformation and after the registration; 5D vs registered motion in the lungs."""
    ref = data.states.reference
    moving = hu_to_unit(data.images_hu[ref])
    rows = []
    for k, image in enumerate(data.images_hu):
        lungs = np.isin(data.segmentations[k].labels, LUNG_LABELS)
        region = lung_region_mask(lungs, data.grid)
        fixed = hu_to_unit(image)
        none = masked_mse(moving, fixed, region)
        registered = masked_mse(warp(moving, fields[k]), fixed, region)
        rows.append({
            "phase_percent": float(data.states.phase_percent[k]),
            "amplitude": float(data.states.amplitude[k]),
            "branch": data.states.branch[k],
            "masked_mse_no_deformation": none,
            "masked_mse_registered": registered,
            "registration_reduction": 1.0 - registered / none if none > 0 else 0.0,
            "registered_motion_mm": endpoint_error_mm(fields[k], np.zeros_like(fields[k]), data.grid, lungs)["mean"] if lungs.any() else 0.0,
            "five_d_vs_registered_mm": endpoint_error_mm(five_d_fields[k], fields[k], data.grid, lungs)["mean"] if lungs.any() else 0.0,
            "registration_folds": folded_voxels(fields[k]),
        })  # fmt: skip
    return rows


def _plot_report(data: FourDCTInput, rows: list[dict[str, Any]], five_d_inhale: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    percent = data.states.phase_percent
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colours = ["tab:red" if b.endswith("inhale") else "tab:blue" for b in data.states.branch]
    axes[0].bar(percent, data.states.amplitude, width=6, color=colours)
    source = "recording" if "recording" in data.states.amplitude_source else "lung volume"
    axes[0].set(xlabel="phase (%)", ylabel=f"amplitude ({source})", title="breathing state per phase (red: inhale)")
    axes[1].plot(percent, [r["registration_reduction"] * 100 for r in rows], "o-")
    axes[1].set(xlabel="phase (%)", ylabel="masked-MSE reduction (%)", title="registration to end-exhale", ylim=(0, 100))
    axes[2].plot(percent, [r["registered_motion_mm"] for r in rows], "o-", label="registered motion")
    axes[2].plot(percent, [r["five_d_vs_registered_mm"] for r in rows], "s-", label="5D - registered")
    axes[2].set(xlabel="phase (%)", ylabel="mean in the lungs (mm)", title="5D model vs registration")
    axes[2].legend()
    ref = data.states.reference
    y = data.grid.shape[1] // 2
    spacing = np.asarray(data.grid.spacing_zyx)[:, None, None]
    magnitude = np.linalg.norm(five_d_inhale[:, :, y, :] * spacing, axis=0)
    extent = (0, data.grid.shape[2] * data.grid.spacing[0], 0, data.grid.shape[0] * data.grid.spacing[2])
    axes[3].imshow(data.images_hu[ref][:, y, :], cmap="gray", vmin=-1000, vmax=400, origin="lower", extent=extent)
    shown = axes[3].imshow(np.ma.masked_less(magnitude, 0.5), cmap="magma", alpha=0.6, origin="lower", extent=extent)
    fig.colorbar(shown, ax=axes[3], label="|u| at end-inhale (mm)")
    axes[3].set(title="5D motion to end-inhale (coronal)", xlabel="x (mm)", ylabel="z (mm, up)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plan_4dct(folder: Path | str, out: Path | str, patient_id: str = "patient", config: Plan4DCTConfig = Plan4DCTConfig()) -> dict[str, Any]:
    """Make the per-patient packages of a 4DCT folder (see the module docstring); returns the report.

    Raises:
        BreathcastError: the 4DCT's refusals (one line naming the series), an existing non-empty ``out``,
            a population model whose grid is not ``config.grid_size``.
    """
    started = time.perf_counter()
    stages = ["read", "register", "fit 5D", "export 5D"] + (["adapt", "export adapted"] if config.adapt else []) + ["report"]
    bar = tqdm(stages, desc="plan-4dct", unit="stage", disable=not config.progress)
    seconds: dict[str, float] = {}

    def stage(name: str, tick: float) -> float:
        seconds[name] = time.perf_counter() - tick
        bar.update(1)
        bar.set_postfix_str(name)
        return time.perf_counter()

    population = None
    if config.adapt:
        from breathcast.training.cvae import load_cvae

        population = load_cvae(config.population)
        if population.config.grid != config.grid_size:
            raise BreathcastError(f"{config.population}: the population model's grid is {population.config.grid}³, not {config.grid_size}³")
    with atomic_output_dir(out) as tmp:
        tick = time.perf_counter()
        recording = read_recording(config.recording) if config.recording is not None else None
        data = read_4dct_into_box(folder, config.grid_size, config.phases, config.period_s, recording=recording)
        tick = stage("read", tick)
        fields, pair_seconds = register_phases(data.images_hu, data.grid, data.states.reference, data.segmentations)
        tick = stage("register", tick)
        model = fit_4dct_five_d(data, patient_id, fields, pair_seconds)
        five_d = np.stack([model.displacement(np.full(data.grid.shape[0], a), np.full(data.grid.shape[0], r))
                           for a, r in zip(data.states.amplitude, data.states.rate)])  # fmt: skip
        tick = stage("fit 5D", tick)
        trace = scan_trace_spec(config.grid_size)
        box = {"anchor": "lungs", "extent_mm": [float(e) for e in MODEL_BOX_MM]}
        rows = _residuals(data, fields, five_d)
        export_linear5d(model.coefficients, model.terms, data.grid, tmp / "linear5d", trace, {"patient_id": patient_id, **model.fitted_from},
                        metrics={"phases": rows}, model_box=box)  # fmt: skip
        tick = stage("export 5D", tick)
        report: dict[str, Any] = {"patient_id": patient_id, "source": str(Path(folder).resolve()), "grid": dataclasses.asdict(data.grid),
                                  "states": data.states.to_dict(), "phases": rows,
                                  "series": [{"percent": p.percent, "percent_from": p.percent_from,
                                              "series_instance_uid": p.series.identity.series_instance_uid,
                                              "series_description": p.series.identity.series_description} for p in data.phases]}  # fmt: skip
        if population is not None:
            result = adapt_cvae(population, phase_patient(data, patient_id), config.adaptation, progress=False)
            tick = stage("adapt", tick)
            training = {"adapted_from": str(config.population), "adaptation": {**dataclasses.asdict(config.adaptation), **result.to_dict()},
                        "data": {"kind": "4dct", "patient_id": patient_id, "phases": data.states.phase_percent.tolist()},
                        "model_box": box}  # fmt: skip
            export_cvae(result.model, tmp / "adapted", trace, training, {"adaptation_loss": [result.loss_first, result.loss_last]})
            tick = stage("export adapted", tick)
            report["adaptation"] = result.to_dict()
        _plot_report(data, rows, five_d[int(np.argmax(data.states.amplitude))], tmp / "report.png")
        stage("report", tick)
        report["seconds"] = {**seconds, "total": time.perf_counter() - started}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    bar.close()
    return report
