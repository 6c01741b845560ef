"""Training the latent diffusion model in its two stages (paper §3): the CT auto-encoder, then the LDM.

``breathcast train autoencoder`` runs :func:`train_autoencoder`: scans with their per-slice traces, reconstruction
+ KL, effective batch ``micro_batch x accumulation`` (8 as the paper). It writes ``autoencoder.pt`` with the
latent scale (1 / std of the training latents, so the diffusion sees unit-variance latents).

``breathcast train ldm`` runs :func:`train_ldm`: the auto-encoder frozen (every training scan is encoded once,
up front), the diffusion U-Net and the velocity decoder trained together (AdamW, cosine decay 1e-4 -> 1e-6,
effective batch 16; the pretrained CT decoder at ``decoder_lr_scale`` x the learning rate). It writes
``model.pt`` (:func:`breathcast.training.ldm.save_ldm`).

Both write ``checkpoint.pt`` (resuming continues exactly), ``metrics.csv`` and ``manifest.json`` (data, split,
configuration, validation metrics, sha256 of the model file). Batches are pure functions of (seed, step).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import breathcast
from breathcast.checksums import sha256_file
from breathcast.io.dataset import prepare_output_dir
from breathcast.errors import BreathcastError
from breathcast.training.autoencoder import AutoencoderConfig, CTAutoencoder, autoencoder_loss, load_autoencoder, save_autoencoder
from breathcast.training.data import PatientData, check_training_prior_version, sample_pairs
from breathcast.training.ldm import LDM, LDMConfig, save_ldm
from breathcast.training.losses import image_loss, smoothness
from breathcast.training.train import load_training_data, lung_region, model_box_of_training_data
from breathcast.warp_torch import warp

__all__ = ["DataConfig", "AutoencoderTrainConfig", "train_autoencoder", "LDMTrainConfig", "train_ldm", "encode_patients", "read_autoencoder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the patients come from and how they are split (the same split as the cVAE's for the same values).

    Args:
        data: dataset folder; None simulates ``simulate_patients`` patients in memory.
        val_patients, test_patients: patient-level split sizes.
        simulate_patients, simulation_seed: the in-memory simulation when ``data`` is None.
    """

    data: Path | None = None
    val_patients: int = 2
    test_patients: int = 0
    simulate_patients: int = 8
    simulation_seed: int = 0


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """A training run of the CT auto-encoder.

    Args:
        out: output folder.
        source: the patients and their split.
        model: the auto-encoder's shape.
        steps: optimiser steps.
        micro_batch, accumulation: scans per forward pass and passes per step (effective batch = product).
        learning_rate: AdamW learning rate (constant).
        kl_weight: weight of the KL term (summed over the latent, mean over the batch).
        val_every: validate, log and checkpoint every this many steps.
        seed: scans, noise and initial weights derive from it.
        threads: torch intra-op threads; None keeps torch's default.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        progress: show a progress bar.
    """

    out: Path
    source: DataConfig = DataConfig()
    model: AutoencoderConfig = AutoencoderConfig()
    steps: int = 500
    micro_batch: int = 4
    accumulation: int = 2
    learning_rate: float = 1e-3
    kl_weight: float = 1e-9
    val_every: int = 50
    seed: int = 0
    threads: int | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "accumulation", "val_every"):
            if getattr(self, name) < 1:
                raise BreathcastError(f"{name} must be at least 1, got {getattr(self, name)}")


def _scans(patients: list[PatientData], count: int, seed: int, step: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random scans of random patients (a pure function of seed, step, part): images (N, 1, D, D, D), traces (N, D)."""
    rng = np.random.default_rng([seed, step, part])
    images, traces = [], []
    for p in rng.integers(len(patients), size=count):
        k = rng.integers(patients[p].n_scans)
        images.append(patients[p].images[k])
        traces.append(patients[p].amplitude[k])
    return torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(traces))


@torch.no_grad()
def _validate_autoencoder(model: CTAutoencoder, patients: list[PatientData]) -> dict[str, float]:
    """Mean squared reconstruction error of the latent mean on every validation patient's first 4 scans."""
    if not patients:
        return {}
    model.eval()
    image_err, trace_err, n = 0.0, 0.0, 0
    for p in patients:
        images = torch.from_numpy(p.images[:4])[:, None]
        traces = torch.from_numpy(p.amplitude[:4])
        mu, _ = model.encode(images, traces)
        reconstruction, trace = model.decode(mu)
        image_err += float(((reconstruction - images) ** 2).mean()) * len(images)
        trace_err += float(((trace - traces) ** 2).mean()) * len(images)
        n += len(images)
    model.train()
    return {"val_image_mse": image_err / n, "val_trace_mse": trace_err / n}


@torch.no_grad()
def latent_scale(model: CTAutoencoder, patients: list[PatientData], scans: int = 64, seed: int = 0) -> float:
    """1 / std of the latent means of ``scans`` random training scans (the diffusion's input scaling)."""
    images, traces = _scans(patients, scans, seed, step=2**31, part=0)  # a step no training batch uses
    mus = torch.cat([model.encode(images[i : i + 8], traces[i : i + 8])[0] for i in range(0, scans, 8)])
    return float(1.0 / mus.std().clamp_min(1e-6))


def write_manifest(out: Path, kind: str, config, summary: dict, metrics: dict, model_file: str, seconds: float, extra: dict | None = None) -> Path:
    """``manifest.json`` of a training run: what was trained from what, and the model file's sha256."""
    training = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    manifest = {
        "model_kind": kind,
        "breathcast_version": breathcast.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": {**training, "seconds": seconds},
        "data": summary,
        "metrics": metrics,
        "files": {model_file: sha256_file(out / model_file)},
        **(extra or {}),
    }
    path = out / "manifest.json"
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def run_steps(
    out: Path,
    parameters_of: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    steps: int,
    val_every: int,
    resume: bool,
    step_fn: Callable[[int], dict[str, float]],
    validate_fn: Callable[[], dict[str, float]],
    progress: bool,
    description: str,
) -> dict[str, float]:
    """The loop both stages share: resume, ``step_fn(step)`` per step, validate + log + checkpoint every ``val_every``.

    ``step_fn`` does forward, backward and ``optimizer.step()`` and returns the loss terms to log. Returns the last
    logged row.
    """
    checkpoint = out / "checkpoint.pt"
    start = 0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for name, module in parameters_of.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        log.info("resuming from %s at step %d", checkpoint, start)
    metrics_path = out / "metrics.csv"
    rows: list[dict[str, float]] = []
    last: dict[str, float] = {}
    tick, tick_step = time.perf_counter(), start
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=description, unit="step", disable=not progress)
    for step in bar:
        terms = step_fn(step)
        if scheduler is not None:
            scheduler.step()
        done = step + 1
        if done % val_every == 0 or done == steps:
            row = {"step": done, **terms, "seconds_per_step": (time.perf_counter() - tick) / (done - tick_step), **validate_fn()}
            write_header = not metrics_path.is_file() or (start == 0 and not rows)
            with metrics_path.open("w" if write_header else "a", newline="") as f:
                writer = csv.DictWriter(f, list(row))
                if write_header:
                    writer.writeheader()
                writer.writerow(row)
            rows.append(row)
            last = row
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("val_")})
            state = {"modules": {n: m.state_dict() for n, m in parameters_of.items()}, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None, "step": done}
            tmp = checkpoint.with_name(".checkpoint.pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
            tick, tick_step = time.perf_counter(), done
    if not last:
        last = {"step": steps, **validate_fn()}
    return last


def train_autoencoder(config: AutoencoderTrainConfig) -> Path:
    """Train the CT auto-encoder as ``config`` says; returns the output folder (module docstring)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = prepare_output_dir(config.out)
    src = config.source
    _, train_patients, val_patients, summary = load_training_data(
        src.data, config.model.grid, src.val_patients, src.test_patients, config.seed, src.simulate_patients, src.simulation_seed
    )
    torch.manual_seed(config.seed)
    model = CTAutoencoder(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    started = time.perf_counter()

    def step_fn(step: int) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for part in range(config.accumulation):
            images, traces = _scans(train_patients, config.micro_batch, config.seed, step, part)
            eps = torch.from_numpy(np.random.default_rng([config.seed, step, part, 1]).standard_normal(
                (config.micro_batch, config.model.latent_channels, *(config.model.latent_grid,) * 3)).astype(np.float32))
            terms = autoencoder_loss(model(images, traces, eps), images, traces, kl_weight=config.kl_weight)
            (terms["total"] / config.accumulation).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / config.accumulation
        optimizer.step()
        return totals

    last = run_steps(out, {"model": model}, optimizer, None, config.steps, config.val_every, config.resume, step_fn,
                     lambda: _validate_autoencoder(model, val_patients), config.progress, "training CT auto-encoder")
    model.eval()
    scale = latent_scale(model, train_patients, seed=config.seed)
    save_autoencoder(model, out / "autoencoder.pt", scale)
    write_manifest(out, "ct-autoencoder", config, summary, {**last, "latent_scale": scale}, "autoencoder.pt",
                   time.perf_counter() - started, {"model": config.model.to_dict()})
    return out


@torch.no_grad()
def encode_patients(model: CTAutoencoder, scale: float, patients: list[PatientData], batch: int = 5) -> list[np.ndarray]:
    """Every scan's scaled latent mean: one (K, C, L, L, L) float32 array per patient."""
    latents = []
    for p in patients:
        parts = []
        for i in range(0, p.n_scans, batch):
            images = torch.from_numpy(p.images[i : i + batch])[:, None]
            mu, _ = model.encode(images, torch.from_numpy(p.amplitude[i : i + batch]))
            parts.append((mu * scale).numpy())
        latents.append(np.concatenate(parts).astype(np.float32))
    return latents


def read_autoencoder(path: Path) -> tuple[CTAutoencoder, float]:
    """The auto-encoder of a run folder or file, frozen."""
    path = Path(path)
    model, scale = load_autoencoder(path / "autoencoder.pt" if path.is_dir() else path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, scale


@dataclass(frozen=True)
class LDMTrainConfig:
    """A training run of the latent diffusion model (the auto-encoder trained before, frozen here).

    Args:
        out: output folder.
        autoencoder: ``autoencoder.pt`` or the folder holding it (``breathcast train autoencoder``).
        source: the patients and their split (use the auto-encoder's).
        model: the diffusion model's shape.
        steps: optimiser steps.
        micro_batch, accumulation: pairs per forward pass and passes per step (effective batch 16 as the paper).
        learning_rate: AdamW, cosine-annealed to ``learning_rate / 100`` over ``steps`` (1e-4 -> 1e-6 as the paper).
        decoder_lr_scale: the pretrained CT decoder inside the velocity decoder learns at this fraction of it.
        image_weight, smooth_weight: weights of the warped-image error (multiscale, as the cVAE) and of the velocity
            smoothness, added to the latent x0 error.
        fov_margin_mm: no warped-image error within this of where a scan's field of view ends along z (mm; as the
            cVAE's :class:`~breathcast.training.losses.LossWeights`; 0: none).
        val_pairs, val_steps: validation pairs (fixed) and the DDIM steps used on them.
        val_every, seed, threads, resume, progress: as :class:`AutoencoderTrainConfig`.
    """

    out: Path
    autoencoder: Path
    source: DataConfig = DataConfig()
    model: LDMConfig = LDMConfig()
    steps: int = 500
    micro_batch: int = 8
    accumulation: int = 2
    learning_rate: float = 1e-4
    decoder_lr_scale: float = 0.1
    image_weight: float = 1.0
    smooth_weight: float = 0.01
    fov_margin_mm: float = 25.0
    val_pairs: int = 8
    val_steps: int = 10
    val_every: int = 50
    seed: int = 0
    threads: int | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "accumulation", "val_every", "val_pairs", "val_steps"):
            if getattr(self, name) < 1:
                raise BreathcastError(f"{name} must be at least 1, got {getattr(self, name)}")


def _latent_batch(batch, latents: dict[str, np.ndarray], seed: int, step: int, part: int, train_timesteps: int):
    """Condition and target latents of a pair batch, with the step's timesteps and noise."""
    condition = torch.from_numpy(np.stack([latents[pid][k] for pid, k, _ in batch.pairs]))
    target = torch.from_numpy(np.stack([latents[pid][j] for pid, _, j in batch.pairs]))
    rng = np.random.default_rng([seed, step, part, 2])
    t = torch.from_numpy(rng.integers(train_timesteps, size=len(batch.pairs)))
    noise = torch.from_numpy(rng.standard_normal(target.shape).astype(np.float32))
    return condition, target, t, noise


def ldm_loss(model: LDM, output, target: torch.Tensor, fixed: torch.Tensor, image_weight: float, smooth_weight: float,
             slice_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Latent x0 error + ``image_weight`` x warped-image error + ``smooth_weight`` x velocity smoothness;
    ``slice_weight`` (N, D) weighs the image error per slice (the field-of-view margin)."""
    latent = F.mse_loss(output.x0, target)
    weight = None if slice_weight is None else slice_weight[:, None, :, None, None]
    image = image_loss(output.warped, fixed, multiscale=True, weight=weight)
    smooth = smoothness(output.velocity)
    return {"total": latent + image_weight * image + smooth_weight * smooth, "latent": latent, "image": image, "smooth": smooth}


@torch.no_grad()
def _validate_ldm(model: LDM, patients: list[PatientData], pairs: int, steps: int, seed: int) -> dict[str, float]:
    """Masked MSE of DDIM predictions (``steps`` steps, seed 0) and of no deformation on fixed validation pairs."""
    if not patients:
        return {}
    model.eval()
    batch = sample_pairs(patients, pairs, 1, seed=seed + 7919, step=0)
    by_id = {p.patient_id: p for p in patients}
    predicted = no_deformation = 0.0
    for i, (pid, _, j) in enumerate(batch.pairs):
        moving = batch.moving[i : i + 1]
        prior = None if batch.prior is None else batch.prior[i : i + 1]
        u = model.predict(moving, batch.b_m[i : i + 1], batch.b_f[i : i + 1], steps=steps, seed=0, prior=prior)
        warped = warp(moving, u)[0, 0].numpy()
        mask = lung_region(by_id[pid], j)
        fixed = batch.fixed[i, 0].numpy()
        predicted += float(np.mean((warped[mask] - fixed[mask]) ** 2))
        no_deformation += float(np.mean((moving[0, 0].numpy()[mask] - fixed[mask]) ** 2))
    model.train()
    return {"val_masked_mse": predicted / pairs, "val_masked_mse_no_deformation": no_deformation / pairs,
            "val_masked_mse_reduction": 1.0 - predicted / max(no_deformation, 1e-12)}


def train_ldm(config: LDMTrainConfig) -> Path:
    """Train the latent diffusion model as ``config`` says; returns the output folder (module docstring)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    check_training_prior_version(config.model.prior_channels, config.model.prior_version)
    out = prepare_output_dir(config.out)
    autoencoder, scale = read_autoencoder(config.autoencoder)
    src = config.source
    _, train_patients, val_patients, summary = load_training_data(
        src.data, autoencoder.config.grid, src.val_patients, src.test_patients, config.seed, src.simulate_patients,
        src.simulation_seed, with_priors=config.model.prior_channels > 0, progress=config.progress,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    model = LDM(autoencoder, scale, config.model)
    latents = dict(zip((p.patient_id for p in train_patients), encode_patients(autoencoder, scale, train_patients)))
    decoder = model.velocity_decoder.pretrained_parameters()
    pretrained = {id(p) for p in decoder}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in pretrained]
    optimizer = torch.optim.AdamW([{"params": others}, {"params": decoder, "lr": config.learning_rate * config.decoder_lr_scale}],
                                  lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps, eta_min=config.learning_rate / 100)
    trainable = {"unet": model.unet, "trace_tokens": model.trace_tokens, "velocity_decoder": model.velocity_decoder}
    started = time.perf_counter()

    def step_fn(step: int) -> dict[str, float]:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for part in range(config.accumulation):
            batch = sample_pairs(train_patients, config.micro_batch, 1, config.seed, step * config.accumulation + part,
                                 fov_margin_mm=config.fov_margin_mm)
            condition, target, t, noise = _latent_batch(batch, latents, config.seed, step, part, config.model.train_timesteps)
            output = model(batch.moving, condition, target, batch.b_f, t, noise, batch.b_m, batch.prior)
            terms = ldm_loss(model, output, target, batch.fixed, config.image_weight, config.smooth_weight, batch.slice_weight)
            (terms["total"] / config.accumulation).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / config.accumulation
        optimizer.step()
        return totals

    last = run_steps(out, trainable, optimizer, schedule, config.steps, config.val_every, config.resume, step_fn,
                     lambda: _validate_ldm(model, val_patients, config.val_pairs, config.val_steps, config.seed),
                     config.progress, "training LDM")
    model.eval()
    save_ldm(model, out / "model.pt")
    ae_manifest = Path(config.autoencoder) / "manifest.json" if Path(config.autoencoder).is_dir() else Path(config.autoencoder).parent / "manifest.json"
    extra = {"grid": [autoencoder.config.grid] * 3, "model": config.model.to_dict(), "autoencoder": autoencoder.config.to_dict(),
             "latent_scale": scale,
             "model_box": model_box_of_training_data(summary),
             "autoencoder_manifest": json.loads(ae_manifest.read_text()) if ae_manifest.is_file() else None,
             "output": {"displacement": "(3, D, D, D) voxels of the model grid, (dz, dy, dx), pull-back"}}
    write_manifest(out, "ldm", config, summary, last, "model.pt", time.perf_counter() - started, extra)
    return out
