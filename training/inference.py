"""Using a trained cVAE: the shipped default model, one prediction, and the demo's prediction figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import breathcast
from breathcast.sim.anatomy import LUNG_LABELS, Label
from breathcast.errors import BreathcastError
from breathcast.geometry import Grid, Volume, field_to_lps_mm, hu_to_unit
from breathcast.metrics import endpoint_error_mm, lung_region_mask, masked_mse, target_error_mm, target_motion_error_mm
from breathcast.motion_prior import motion_prior
from breathcast.plots import plot_prediction
from breathcast.sim.simulator import SimulatedPatient, pair_field
from breathcast.training.cvae import CVAE, load_cvae
from breathcast.training.ldm import LDM
from breathcast.warp import count_folds, warp_image, warp_labels

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_LDM",
    "default_model",
    "predict_displacement",
    "predict_with_uncertainty",
    "predict_ldm_with_uncertainty",
    "DemoPrediction",
    "demo_prediction",
]

DEFAULT_MODEL = Path(breathcast.__file__).parent / "models" / "cvae64" / "model.pt"
"""The shipped cVAE (64³), trained by the command in its manifest.json (see README, "The shipped model")."""

DEFAULT_LDM = Path(breathcast.__file__).parent / "models" / "ldm64" / "model.pt"
"""The shipped latent diffusion model (64³), trained by the commands in README ("The latent diffusion model")."""


def default_model() -> CVAE:
    """Load the shipped cVAE; a clear error when the package was installed without it."""
    if not DEFAULT_MODEL.is_file():
        raise BreathcastError(f"the shipped model is missing ({DEFAULT_MODEL}); reinstall breathcast or pass a model")
    return load_cvae(DEFAULT_MODEL)


def predict_displacement(
    model: CVAE, moving_unit: np.ndarray, b_m: np.ndarray, b_f: np.ndarray, z: torch.Tensor | None = None,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """One prediction, z = 0 unless ``z`` is given.

    Args:
        model: the cVAE (on any device; inputs follow it).
        moving_unit: (D, D, D) planning scan in [0, 1] at the model grid.
        b_m, b_f: (D,) per-slice amplitude of the planning scan and of the wanted state.
        z: (1, latent_dim) latent sample, or None for z = 0.
        prior: (3, D/2, D/2, D/2) the planning scan's motion prior (:mod:`breathcast.motion_prior`), for a
            model that takes one.

    Returns:
        (3, D, D, D) float32 displacement, model-grid voxels, pull-back.
    """
    device = next(model.parameters()).device
    moving = torch.from_numpy(np.ascontiguousarray(moving_unit, dtype=np.float32))[None, None].to(device)
    b_m_t = torch.from_numpy(np.asarray(b_m, dtype=np.float32))[None].to(device)
    b_f_t = torch.from_numpy(np.asarray(b_f, dtype=np.float32))[None].to(device)
    prior_t = None if prior is None else torch.from_numpy(np.ascontiguousarray(prior, dtype=np.float32))[None].to(device)
    u = model.predict(moving, b_m_t, b_f_t, z=None if z is None else z.to(device), prior=prior_t)
    return u[0].cpu().numpy().astype(np.float32, copy=False)


def predict_with_uncertainty(
    model: CVAE, moving_unit: np.ndarray, b_m: np.ndarray, b_f: np.ndarray, grid: Grid, samples: int = 8, seed: int = 0,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The z = 0 prediction and a per-voxel uncertainty from ``samples`` draws of z ~ N(0, I) (paper §2).

    Args:
        model, moving_unit, b_m, b_f, prior: as :func:`predict_displacement`.
        grid: the model grid (for millimetres).
        samples: number of latent samples (>= 2).
        seed: seed of the latent samples; the same seed gives the same map.

    Returns:
        (displacement (3, D, D, D) float32 voxels at z = 0,
         std (D, D, D) float32 mm: the root of the summed per-component variance over the samples).
    """
    if samples < 2:
        raise BreathcastError(f"an uncertainty map needs at least 2 samples, got {samples}")
    z = torch.randn(samples, model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    draws = np.stack([predict_displacement(model, moving_unit, b_m, b_f, z=z[i : i + 1], prior=prior) for i in range(samples)])
    draws_mm = draws * np.asarray(grid.spacing_zyx, dtype=np.float32)[None, :, None, None, None]
    std_mm = np.sqrt(draws_mm.var(axis=0).sum(axis=0)).astype(np.float32)
    return predict_displacement(model, moving_unit, b_m, b_f, prior=prior), std_mm


def predict_ldm_with_uncertainty(
    model: LDM, moving_unit: np.ndarray, b_m: np.ndarray, b_f: np.ndarray, grid: Grid, samples: int = 8,
    steps: int = 50, seed: int = 0, prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` DDIM samples of the LDM from different noise (drawn from ``seed``): their mean and spread.

    Args:
        model: the LDM; moving_unit (D, D, D) in [0, 1]; b_m, b_f (D,) per-slice amplitudes.
        grid: the model grid (for millimetres).
        samples: number of samples (>= 2); steps: DDIM steps per sample.
        prior: as :func:`predict_displacement`, for a model that takes one.

    Returns:
        (mean displacement (3, D, D, D) float32 voxels, std (D, D, D) float32 mm: the root of the summed
        per-component variance over the samples). The same seed gives the same pair.
    """
    if samples < 2:
        raise BreathcastError(f"an uncertainty map needs at least 2 samples, got {samples}")
    moving = torch.from_numpy(np.ascontiguousarray(moving_unit, dtype=np.float32))[None, None]
    b_m_t = torch.from_numpy(np.asarray(b_m, dtype=np.float32))[None]
    b_f_t = torch.from_numpy(np.asarray(b_f, dtype=np.float32))[None].expand(samples, -1)
    prior_t = None if prior is None else torch.from_numpy(np.ascontiguousarray(prior, dtype=np.float32))[None]
    model.check_inputs(moving, b_m_t, b_f_t[:1], prior_t)
    condition = model.encode(moving, b_m_t).expand(samples, -1, -1, -1, -1)
    latents = model.sample_latent(condition, b_f_t, steps=steps, seed=seed)
    with torch.no_grad():
        draws = torch.cat([model.integrate(model.decode_velocity(latents[i : i + 1], condition[:1], moving, prior_t, b_m_t, b_f_t[:1]))
                           for i in range(samples)]).numpy()
    draws_mm = draws * np.asarray(grid.spacing_zyx, dtype=np.float32)[None, :, None, None, None]
    std_mm = np.sqrt(draws_mm.var(axis=0).sum(axis=0)).astype(np.float32)
    return draws.mean(axis=0).astype(np.float32), std_mm


@dataclass(frozen=True)
class DemoPrediction:
    """What the demo reports: errors of the prediction against the simulator's truth."""

    moving_scan: int
    fixed_scan: int
    masked_mse_no_deformation: float
    masked_mse_predicted: float
    field_error_mm: float
    true_tumour_motion_mm: float
    tumour_error_mm: float  # from the fields (target_motion_error_mm)
    tumour_label_error_mm: float  # between warped and true label-map centroids (quantized at the model grid)
    folded_voxels: int
    figure: Path

    @property
    def masked_mse_reduction(self) -> float:
        return 1.0 - self.masked_mse_predicted / self.masked_mse_no_deformation


def demo_prediction(patient: SimulatedPatient, model: CVAE, out_dir: Path) -> DemoPrediction:
    """Predict the patient's most inhaled scan from its most exhaled one and its trace; write the figure.

    The patient's grid must be the model grid.
    """
    if patient.grid.shape != (model.config.grid,) * 3:
        raise BreathcastError(f"the model works on a {model.config.grid}³ grid; the patient is on {patient.grid.shape}")
    means = [scan.amplitude.mean() for scan in patient.scans]
    k, j = int(np.argmin(means)), int(np.argmax(means))
    moving, fixed = patient.scans[k], patient.scans[j]
    m, f = hu_to_unit(moving.image_hu), hu_to_unit(fixed.image_hu)
    prior = motion_prior(Volume(moving.image_hu, patient.grid), version=model.config.prior_version) if model.config.prior_channels else None
    u = predict_displacement(model, m, moving.amplitude, fixed.amplitude, prior=prior)
    predicted = warp_image(m, u)
    grid = patient.grid
    region = lung_region_mask(np.isin(fixed.labels, LUNG_LABELS), grid)
    truth = pair_field(moving.field, fixed.field)
    tumour_fixed = fixed.labels == Label.TUMOUR
    tumour_predicted = warp_labels(moving.labels, u) == Label.TUMOUR
    row = int(np.round(np.argwhere(tumour_fixed)[:, 1].mean())) if tumour_fixed.any() else grid.shape[1] // 2
    figure = plot_prediction(
        m, f, predicted, field_to_lps_mm(u, grid)[2], field_to_lps_mm(truth, grid)[2], grid, row,
        Path(out_dir) / "demo_prediction.png",
        f"{patient.patient_id}: scan {j} (mean amplitude {means[j]:.2f}) predicted from scan {k} "
        f"(mean amplitude {means[k]:.2f}) and the two per-slice traces",
    )  # fmt: skip
    lungs = np.isin(fixed.labels, LUNG_LABELS)
    return DemoPrediction(
        moving_scan=k,
        fixed_scan=j,
        masked_mse_no_deformation=masked_mse(m, f, region),
        masked_mse_predicted=masked_mse(predicted, f, region),
        field_error_mm=endpoint_error_mm(u, truth, grid, lungs)["mean"],
        true_tumour_motion_mm=target_motion_error_mm(np.zeros_like(truth), truth, tumour_fixed, grid),
        tumour_error_mm=target_motion_error_mm(u, truth, tumour_fixed, grid),
        tumour_label_error_mm=target_error_mm(tumour_predicted, tumour_fixed, grid),
        folded_voxels=count_folds(u),
        figure=figure,
    )
