"""Adapt the population cVAE to one patient: a few CPU minutes on the patient's own image pairs.

The population model is the prior; the patient's own phases (a 4DCT, or free-breathing scans) are the data.
Fine-tuning uses the image loss only (no ground truth exists for a patient): the deterministic prediction
``u = decode(moving, b_m, b_f, z = 0)``, exactly what the engine serves, warps the moving image onto the
fixed one; the loss is the multiscale MSE inside the fixed image's lung region plus the velocity smoothness
of the population training. The encoder (which only training uses) is left alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from breathcast.errors import BreathcastError
from breathcast.training.cvae import CVAE
from breathcast.training.data import PatientData
from breathcast.training.losses import image_loss, smoothness
from breathcast.training.train import lung_region
from breathcast.warp_torch import warp

__all__ = ["AdaptConfig", "AdaptResult", "adapt_cvae"]


@dataclass(frozen=True)
class AdaptConfig:
    """How to adapt.

    Args:
        steps: optimiser steps (one pair each).
        learning_rate: Adam.
        smooth: weight of the velocity smoothness (the population training's).
        lung_margin_weight: weight of the image error outside the lung region (1: the whole image counts
            alike; small: the lungs dominate, as the masked-MSE measure does).
        seed: pair order.
        threads: torch intra-op threads (None: torch's default).
        time_limit_s: stop early after this many seconds (None: run every step).
    """

    steps: int = 150
    learning_rate: float = 2e-4
    smooth: float = 0.01
    lung_margin_weight: float = 0.1
    seed: int = 0
    threads: int | None = None
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.learning_rate > 0:
            raise BreathcastError(f"adaptation needs steps >= 1 and a positive learning rate, got {self.steps}, {self.learning_rate}")


@dataclass(frozen=True)
class AdaptResult:
    """The adapted model and what adapting it took."""

    model: CVAE
    steps: int
    seconds: float
    pairs: list[tuple[int, int]]
    loss_first: float
    loss_last: float

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "pairs": [list(p) for p in self.pairs],
                "loss_first_10_mean": self.loss_first, "loss_last_10_mean": self.loss_last}  # fmt: skip


def _weights(patient: PatientData, scan: int, margin_weight: float) -> torch.Tensor:
    lungs = lung_region(patient, scan)
    return torch.from_numpy(np.where(lungs, 1.0, margin_weight).astype(np.float32))[None, None]


def adapt_cvae(
    population: CVAE,
    patient: PatientData,
    config: AdaptConfig = AdaptConfig(),
    scans: list[int] | None = None,
    progress: bool = False,
) -> AdaptResult:
    """Fine-tune a copy of ``population`` on ordered pairs of ``patient``'s scans (image loss only).

    Args:
        population: the starting model (not changed).
        patient: the patient at the model grid (images in [0, 1], per-slice amplitudes, labels for the lungs).
        config: steps, learning rate, loss weights.
        scans: the scans to learn from (default all); leave one out to test on it.
        progress: a progress bar.
    """
    if patient.images.shape[1:] != (population.config.grid,) * 3:
        raise BreathcastError(f"patient images are {patient.images.shape[1:]}; the model grid is {population.config.grid}³")
    scans = list(range(patient.n_scans)) if scans is None else list(scans)
    pairs = [(m, f) for m in scans for f in scans if m != f]
    if not pairs:
        raise BreathcastError(f"patient {patient.patient_id}: adapting needs at least 2 scans, got {len(scans)}")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = CVAE(population.config)
    model.load_state_dict(population.state_dict())
    model.train()
    decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("encoder."))
    optimizer = torch.optim.Adam(decoder, lr=config.learning_rate)
    images = torch.from_numpy(patient.images)[:, None]
    amplitude = torch.from_numpy(np.asarray(patient.amplitude, dtype=np.float32))
    weights = {s: _weights(patient, s, config.lung_margin_weight) for s in scans}
    order = np.random.default_rng(config.seed).integers(len(pairs), size=config.steps)
    z = torch.zeros(1, model.config.latent_dim)
    version = model.config.prior_version
    priors = {s: torch.from_numpy(patient.motion_prior(s, version))[None] for s in scans} if model.config.prior_channels else {}
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(config.steps), desc=f"adapting to {patient.patient_id}", unit="step", disable=not progress):
        m, f = pairs[order[step]]
        moving, fixed = images[m : m + 1], images[f : f + 1]
        velocity = model.decode_velocity(moving, amplitude[m : m + 1], amplitude[f : f + 1], z, priors.get(m))
        warped = warp(moving, model.integrate(velocity))
        loss = image_loss(warped, fixed, weight=weights[f]) + config.smooth * smoothness(velocity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        if config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s:
            break
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)) :]
    return AdaptResult(model, len(losses), time.perf_counter() - started, pairs, float(np.mean(head)), float(np.mean(tail)))

