"""Training loop of the cVAE: single process or data parallel through ``torchrun``, one code path.

``breathcast train cvae`` runs :func:`train`. Under ``torchrun --nproc_per_node P`` every process runs the same
function; it joins the process group from the environment (gloo on CPU, nccl on GPU), takes its share of each
global batch (:func:`breathcast.training.data.sample_pairs`) and DistributedDataParallel averages gradients.
Rank 0 alone validates, logs and writes checkpoints.

The output folder holds ``checkpoint.pt`` (model, optimiser, step: resuming continues exactly),
``metrics.csv`` (one row per logged step), ``model.pt`` (the final weights) and ``manifest.json`` (what the
model was made from, its validation metrics, the sha256 of ``model.pt``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import breathcast
from breathcast.sim.anatomy import LUNG_LABELS
from breathcast.io.dataset import open_dataset, prepare_output_dir
from breathcast.checksums import sha256_file
from breathcast.errors import BreathcastError
from breathcast.geometry import HU_MAX, HU_MIN
from breathcast.metrics import lung_region_mask
from breathcast.model_box import model_box_of_simulation
from breathcast.sim.simulator import SimulationConfig
from breathcast.training.cvae import CVAE, CVAEConfig, save_cvae
from breathcast.training.data import (
    PatientData, Split, check_training_prior_version, load_patients, sample_pairs, split_patients, with_pair_truth,
)
from breathcast.training.data import simulate_patients as simulate_patients_in_memory
from breathcast.training.losses import LossWeights, cvae_loss
from breathcast.warp_torch import warp

__all__ = ["TrainConfig", "train", "learning_rate_at", "training_step", "validate", "load_training_data", "lung_region"]

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Args:
        out: output folder (checkpoint, metrics, model, manifest).
        data: dataset folder (docs/data-format.md); None to simulate ``simulate_patients`` patients in memory.
        simulate_patients: patients to simulate when ``data`` is None.
        simulation_seed: seed of the simulated patients.
        model: the network's shape.
        loss: loss weights.
        steps: optimiser steps in total (a resumed run stops at the same step).
        batch_size: global batch (pairs per step, over all processes).
        learning_rate: Adam, 1e-4 as the paper.
        lr_schedule: ``"constant"`` (the paper's), or ``"cosine"``: annealed to ``learning_rate / 100`` over
            ``steps``, as the LDM is (the constant rate leaves the validation score swinging between checkpoints).
        val_patients, test_patients: patient-level split sizes (test patients are only recorded here).
        val_pairs: validation pairs, drawn once, the same at every validation.
        val_every: validate (and log to metrics.csv) every this many steps.
        checkpoint_every: write checkpoint.pt every this many steps.
        seed: pairs, latent noise and initial weights derive from it.
        threads: torch intra-op threads per process; None keeps torch's default.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        progress: show a progress bar (rank 0).
    """

    out: Path
    data: Path | None = None
    simulate_patients: int = 8
    simulation_seed: int = 0
    model: CVAEConfig = CVAEConfig()
    loss: LossWeights = LossWeights()
    steps: int = 5000
    batch_size: int = 4
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    val_patients: int = 2
    test_patients: int = 0
    val_pairs: int = 16
    val_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    threads: int | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "val_pairs"):
            if getattr(self, name) < 1:
                raise BreathcastError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise BreathcastError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BreathcastError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Distributed:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Distributed(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return _Distributed(rank=dist.get_rank(), world_size=world_size, device=device)


def load_training_data(
    data: Path | None, grid: int, val_patients: int, test_patients: int, seed: int,
    simulate_patients: int = 8, simulation_seed: int = 0, with_priors: bool = False, progress: bool = False,
    with_sliding_masks: bool = False, with_truth: bool = False,
) -> tuple[Split, list[PatientData], list[PatientData], dict]:
    """The patient split, the training and validation patients at the model grid, and a summary for the manifest.

    ``data`` is a dataset folder; None simulates ``simulate_patients`` patients in memory. Every model trained
    with the same (data, val_patients, test_patients, seed) holds out the same patients. ``with_priors``: each
    scan's motion prior too, for a model that takes one; ``with_sliding_masks``: each scan's sliding mask, for a
    model trained through it; ``with_truth``: the training patients' true fields and their inverses
    (:func:`~breathcast.training.data.with_pair_truth`), for the field loss.
    """
    if data is not None:
        dataset = open_dataset(data)
        split = split_patients(dataset.patients, val_patients, test_patients, seed=seed)
        train = load_patients(dataset, split.train, grid, with_truth=with_truth, with_priors=with_priors, progress=progress,
                              with_sliding_masks=with_sliding_masks)
        val = load_patients(dataset, split.val, grid, with_truth=False, with_priors=with_priors, progress=progress,
                            with_sliding_masks=with_sliding_masks)
        summary = {"source": str(Path(data).resolve()), "kind": dataset.kind, "patients": len(dataset.patients),
                   "generator": dataset.metadata.get("generator"),
                   "generator_real_anatomy": dataset.metadata.get("generator_real_anatomy")}
    else:
        sim = SimulationConfig(grid_size=grid)
        ids = [f"patient_{i:03d}" for i in range(simulate_patients)]
        split = split_patients(ids, val_patients, test_patients, seed=seed)
        everyone = simulate_patients_in_memory(simulate_patients, sim, simulation_seed, grid, with_priors=with_priors,
                                               with_sliding_masks=with_sliding_masks)
        by_id = {p.patient_id: p for p in everyone}
        train, val = [by_id[i] for i in split.train], [by_id[i] for i in split.val]
        summary = {"source": "simulator (in memory)", "kind": "simulated", "patients": simulate_patients,
                   "simulation": dataclasses.asdict(sim), "simulation_seed": simulation_seed}
    if with_truth:  # one patient at a time, so that its float32 fields are freed before the next is converted
        for i in tqdm(range(len(train)), desc="inverting true fields", unit="patient", disable=not progress):
            train[i] = with_pair_truth(train[i])
    summary.update(split=dataclasses.asdict(split), scans=int(sum(p.n_scans for p in train)))
    return split, train, val, summary


def _load_data(config: TrainConfig, progress: bool) -> tuple[Split, list[PatientData], list[PatientData], dict]:
    return load_training_data(config.data, config.model.grid, config.val_patients, config.test_patients, config.seed,
                              config.simulate_patients, config.simulation_seed, config.model.prior_channels > 0, progress,
                              config.model.sliding_mask, config.loss.field > 0)


def model_box_of_training_data(summary: dict) -> dict:
    """The manifest's ``model_box`` of a model trained on the data a :func:`load_training_data` summary describes."""
    return model_box_of_simulation((summary.get("generator") or {}).get("config") or summary.get("simulation"))


def lung_region(patient: PatientData, scan: int) -> np.ndarray:
    """The masked-MSE region of a scan: its lungs dilated by 10 mm; the whole volume without labels."""
    if patient.labels is None:
        return np.ones(patient.images.shape[1:], dtype=bool)
    return lung_region_mask(np.isin(patient.labels[scan], LUNG_LABELS), patient.grid, margin_mm=10.0)


@torch.no_grad()
def validate(model: CVAE, patients: list[PatientData], pairs: int, seed: int, device: torch.device) -> dict[str, float]:
    """Masked MSE of the z = 0 prediction and of no deformation on fixed validation pairs, and their ratio."""
    if not patients:
        return {}
    model.eval()
    batch = sample_pairs(patients, pairs, model.config.latent_dim, seed=seed + 7919, step=0)
    by_id = {p.patient_id: p for p in patients}
    predicted = no_deformation = 0.0
    for i, (pid, _, j) in enumerate(batch.pairs):
        prior = None if batch.prior is None else batch.prior[i : i + 1].to(device)
        weight = None if batch.motion_weight is None else batch.motion_weight[i : i + 1].to(device)
        displacement = model.predict(batch.moving[i : i + 1].to(device), batch.b_m[i : i + 1].to(device), batch.b_f[i : i + 1].to(device),
                                     prior=prior, motion_weight=weight)
        warped = warp(batch.moving[i : i + 1].to(device), displacement)[0, 0].cpu().numpy()
        mask = lung_region(by_id[pid], j)
        fixed, moving = batch.fixed[i, 0].numpy(), batch.moving[i, 0].numpy()
        predicted += float(np.mean((warped[mask] - fixed[mask]) ** 2))
        no_deformation += float(np.mean((moving[mask] - fixed[mask]) ** 2))
    model.train()
    n = len(batch.pairs)
    return {
        "val_masked_mse": predicted / n,
        "val_masked_mse_no_deformation": no_deformation / n,
        "val_masked_mse_reduction": 1.0 - predicted / max(no_deformation, 1e-12),
    }


def training_step(network: torch.nn.Module, batch, weights: LossWeights):
    """Forward, loss and backward of one batch (gradients accumulate in ``network``); returns the loss terms.

    ``network`` is the :class:`CVAE` or its DistributedDataParallel wrapper (which averages gradients).
    """
    output = network(batch.moving, batch.fixed, batch.b_m, batch.b_f, batch.eps, batch.prior, batch.motion_weight)
    terms = cvae_loss(output, batch.fixed, weights, batch.slice_weight, batch.true_field)
    terms.total.backward()
    return terms


def _write_manifest(config: TrainConfig, summary: dict, metrics: dict, out: Path, seconds: float) -> Path:
    manifest = {
        "model_kind": "cvae",
        "breathcast_version": breathcast.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "grid": [config.model.grid] * 3,
        "model": config.model.to_dict(),
        "trace": {"length": config.model.grid, "time_base": "one amplitude per axial slice of the model grid",
                  "units": "dimensionless (0 end-exhale, 1 end-inhale)"},
        "intensity_normalisation": {"clip_hu": [HU_MIN, HU_MAX], "scaled_to": [0.0, 1.0]},
        "output": {"displacement": "(3, D, D, D) voxels of the model grid, (dz, dy, dx), pull-back"},
        "training": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
                     "seconds": seconds},
        "data": summary,
        "model_box": model_box_of_training_data(summary),
        "metrics": metrics,
        "files": {"model.pt": sha256_file(out / "model.pt")},
    }
    path = out / "manifest.json"
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _save_checkpoint(model: CVAE, optimizer: torch.optim.Optimizer, step: int, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def learning_rate_at(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): a function of (step, ``config.steps``) alone, so a
    resumed run continues the schedule exactly."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    floor = config.learning_rate / 100
    return floor + (config.learning_rate - floor) * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def train(config: TrainConfig) -> Path:
    """Train the cVAE as ``config`` says; returns the output folder. See the module docstring."""
    env = _init_distributed()
    if config.threads:
        torch.set_num_threads(config.threads)
    check_training_prior_version(config.model.prior_channels, config.model.prior_version)
    out = prepare_output_dir(config.out) if env.main else Path(config.out)
    split, train_patients, val_patients, summary = _load_data(config, config.progress and env.main)
    torch.manual_seed(config.seed)
    model = CVAE(config.model).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    start_step = 0
    checkpoint_path = out / "checkpoint.pt"
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=env.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if env.main:
            log.info("resuming from %s at step %d", checkpoint_path, start_step)
    network = torch.nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model
    metrics_path = out / "metrics.csv"
    fields = ["step", "loss", "image", "kl", "smooth", "field", "seconds_per_step", "val_masked_mse",
              "val_masked_mse_no_deformation", "val_masked_mse_reduction"]
    if env.main and not (metrics_path.is_file() and start_step > 0):
        with metrics_path.open("w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
    started = time.perf_counter()
    last = {}
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="training cVAE",
               unit="step", disable=not (env.main and config.progress))
    tick, tick_step = time.perf_counter(), start_step
    for step in bar:
        batch = sample_pairs(train_patients, config.batch_size, config.model.latent_dim, config.seed, step,
                             env.rank, env.world_size, config.loss.fov_margin_mm, config.loss.field > 0).to(env.device)
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, step)
        terms = training_step(network, batch, config.loss)
        optimizer.step()
        done = step + 1
        if env.main and (done % config.val_every == 0 or done == config.steps):
            elapsed = (time.perf_counter() - tick) / (done - tick_step)
            row = {"step": done, "loss": terms.total.item(), "image": terms.image.item(), "kl": terms.kl.item(),
                   "smooth": terms.smooth.item(), "field": terms.field.item(), "seconds_per_step": elapsed}
            row.update(validate(model, val_patients, config.val_pairs, config.seed, env.device))
            last = row
            with metrics_path.open("a", newline="") as f:
                csv.DictWriter(f, fields).writerow(row)
            bar.set_postfix(loss=f"{row['loss']:.5f}", val=f"{row.get('val_masked_mse_reduction', float('nan')):.1%}")
            tick, tick_step = time.perf_counter(), done
        if env.main and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(model, optimizer, done, checkpoint_path)
    if env.main and not last:  # resumed at the final step: nothing ran, so validate what was loaded
        last = {"step": config.steps, **validate(model, val_patients, config.val_pairs, config.seed, env.device)}
    if env.main:
        save_cvae(model, out / "model.pt")
        _write_manifest(config, summary, last, out, time.perf_counter() - started)
    if env.world_size > 1:
        dist.barrier()
    return out
