"""Training data: patients in memory at the model grid, patient-level splits, and deterministic pair batches.

A training sample is a pair of scans of one patient: a moving scan k and a fixed scan j != k, with their
per-slice traces b_m and b_f (paper §2). Batches are a pure function of (seed, step): the same step always
draws the same pairs and the same latent noise, whatever the number of processes — which is what makes
resuming from a checkpoint exact and data-parallel training equal to one process with the global batch.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from breathcast.io.dataset import DatasetIndex, open_dataset, read_patient
from breathcast.errors import BreathcastError, DatasetError
from breathcast.geometry import Grid, Volume, hu_to_unit, resample_field, resample_volume, unit_to_hu
from breathcast.model_box import field_of_view_along_z
from breathcast.motion_prior import PRIOR_VERSION, motion_prior, prior_and_sliding_mask, sliding_mask
from breathcast.segmentation import BODY_HU
from breathcast.sim.simulator import SimulationConfig, pair_field, patient_seed, simulate_patient
from breathcast.warp import compose, invert

__all__ = ["PatientData", "check_training_prior_version", "Split", "split_patients", "load_patients", "simulate_patients", "motion_priors", "priors_and_sliding_masks", "prior_pool", "field_of_view_weight", "PairBatch", "sample_pairs", "with_pair_truth"]


@dataclass(frozen=True)
class PatientData:
    """One patient at the model grid.

    Args:
        images: (K, D, D, D) float32 CT scaled to [0, 1], one per scan.
        amplitude: (K, D) per-slice amplitude of each scan.
        grid: the model grid (same field of view as the scans).
        labels: (K, D, D, D) uint8 label maps, or None.
        fields: (K, 3, D, D, D) float32 true pull-back fields from the rest anatomy (voxels), or None.
        reference_labels: (D, D, D) uint8 labels of the rest anatomy, or None.
        priors: (K, 3, D/2, D/2, D/2) float32 motion prior of each scan (:mod:`breathcast.motion_prior`), or
            None when the model takes none.
        sliding_masks: (K, D, D, D) float16 sliding mask of each scan
            (:func:`breathcast.motion_prior.sliding_mask`), or None when the model is not trained through one.
        inverse_fields: (K, 3, D, D, D) the inverses of ``fields`` (:func:`with_pair_truth`), or None: they make
            :meth:`true_pair_field` one composition.
    """

    patient_id: str
    images: np.ndarray
    amplitude: np.ndarray
    grid: Grid
    labels: np.ndarray | None = None
    fields: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
    priors: np.ndarray | None = None
    sliding_masks: np.ndarray | None = None
    inverse_fields: np.ndarray | None = None

    @property
    def n_scans(self) -> int:
        return self.images.shape[0]

    def motion_prior(self, scan: int, version: int = PRIOR_VERSION) -> np.ndarray:
        """(3, D/2, D/2, D/2) the scan's motion prior of ``version`` (a model's ``prior_version``): stored (the
        stored ones are :data:`~breathcast.motion_prior.PRIOR_VERSION`'s), or made from its image (the prior's
        thresholds lie inside the [0, 1] image's HU range, so this equals the prior of the scan in HU)."""
        if self.priors is not None and version == PRIOR_VERSION:
            return self.priors[scan]
        return motion_prior(Volume(unit_to_hu(self.images[scan]), self.grid), version=version)

    def sliding_mask(self, scan: int) -> np.ndarray:
        """(D, D, D) float32 the scan's sliding mask: stored, or made from its image (as :meth:`motion_prior`)."""
        if self.sliding_masks is not None:
            return self.sliding_masks[scan].astype(np.float32)
        return sliding_mask(Volume(unit_to_hu(self.images[scan]), self.grid))

    def true_pair_field(self, moving: int, fixed: int) -> np.ndarray:
        """(3, D, D, D) voxels: the true field with ``fixed ≈ warp(moving, u)`` (simulated data only)."""
        if self.fields is None:
            raise BreathcastError(f"patient {self.patient_id} has no ground-truth fields (real data)")
        if self.inverse_fields is not None:
            return compose(self.inverse_fields[moving].astype(np.float32), self.fields[fixed].astype(np.float32))
        return pair_field(self.fields[moving], self.fields[fixed])


def with_pair_truth(patient: PatientData) -> PatientData:
    """``patient`` with its true fields and their inverses stored as float16 (1.6 MB each per 64³ scan, together as
    much as the float32 fields alone; float16 keeps ~0.005 voxels at 5 voxels), so that a training pair's true field
    is one composition.

    Raises:
        DatasetError: the patient has no true fields (real data cannot train a field loss).
    """
    if patient.fields is None:
        raise DatasetError(f"patient {patient.patient_id} has no ground-truth fields: the field loss needs simulated patients")
    inverses = np.stack([invert(f.astype(np.float32)) for f in patient.fields]).astype(np.float16)
    return replace(patient, fields=patient.fields.astype(np.float16), inverse_fields=inverses)


@dataclass(frozen=True)
class Split:
    """Patient-level split: no patient appears in two parts."""

    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)


def split_patients(patient_ids: list[str], val: int, test: int, seed: int = 0) -> Split:
    """Shuffle patients with ``seed`` and cut ``val`` and ``test`` patients off; the rest train.

    Raises:
        BreathcastError: when the training split would be empty, naming the counts.
    """
    if val < 0 or test < 0:
        raise BreathcastError(f"split sizes must be >= 0, got val={val}, test={test}")
    ids = sorted(patient_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    split = Split(train=sorted(shuffled[val + test :]), val=sorted(shuffled[:val]), test=sorted(shuffled[val : val + test]))
    if not split.train:
        raise BreathcastError(
            f"the training split is empty: {len(ids)} patient(s), {val} for validation, {test} for testing"
        )
    return split


def _to_model_grid(volume: Volume, grid_size: int, labels: bool = False) -> np.ndarray:
    shape = (grid_size,) * 3
    if volume.shape == shape:
        return volume.array
    return resample_volume(volume, shape, labels=labels).array


def _trace_to_model_grid(values: np.ndarray, grid_size: int) -> np.ndarray:
    """Per-slice values resampled to ``grid_size`` slices over the same z extent (slice centres)."""
    n = values.shape[-1]
    if n == grid_size:
        return values.astype(np.float32)
    source = (np.arange(n) + 0.5) / n
    target = (np.arange(grid_size) + 0.5) / grid_size
    return np.interp(target, source, values).astype(np.float32)


def check_training_prior_version(prior_channels: int, version: int) -> None:
    """Training feeds the priors stored with the patients, which are :data:`~breathcast.motion_prior.PRIOR_VERSION`'s:
    a model with a prior of another version cannot be trained here."""
    if prior_channels and version != PRIOR_VERSION:
        raise BreathcastError(f"training makes motion priors of version {PRIOR_VERSION} only; the model asks for version {version}")


def motion_priors(volumes: list[Volume], pool: ProcessPoolExecutor | None = None) -> np.ndarray:
    """(K, 3, D/2, D/2, D/2): :func:`~breathcast.motion_prior.motion_prior` of each volume, in ``pool``'s
    processes when given."""
    if pool is None:
        return np.stack([motion_prior(v) for v in volumes])
    return np.stack(list(pool.map(motion_prior, volumes, chunksize=4)))


def priors_and_sliding_masks(
    volumes: list[Volume], pool: ProcessPoolExecutor | None, with_priors: bool, with_masks: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(K, 3, D/2, D/2, D/2) motion priors and (K, D, D, D) float16 sliding masks of each volume, each only when
    asked for (else None), from one segmentation per volume, in ``pool``'s processes when given."""
    if not with_masks:
        return (motion_priors(volumes, pool) if with_priors else None), None
    run = map if pool is None else partial(pool.map, chunksize=4)
    if not with_priors:
        return None, np.stack(list(run(sliding_mask, volumes))).astype(np.float16)
    priors, masks = zip(*run(prior_and_sliding_mask, volumes))
    return np.stack(priors), np.stack(masks).astype(np.float16)


def prior_pool(with_priors: bool = True) -> ProcessPoolExecutor | nullcontext:
    """One process per CPU core for the priors of every patient loaded (a context; None without priors).

    Spawned, not forked: a fork of a process that has run a parallel numba kernel (OpenMP) aborts the child.
    """
    if not with_priors:
        return nullcontext()
    return ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn"))


def _patient_from_arrays(
    patient_id, grid, images_hu, amplitude, labels, fields, reference_labels, grid_size, with_priors: bool = False,
    pool: ProcessPoolExecutor | None = None, with_sliding_masks: bool = False,
) -> PatientData:
    model_grid = grid.with_shape((grid_size,) * 3)
    images_hu = [_to_model_grid(Volume(im, grid), grid_size) for im in images_hu]
    try:
        volumes = [Volume(im, model_grid) for im in images_hu]
        priors, masks = priors_and_sliding_masks(volumes, pool, with_priors, with_sliding_masks)
    except BreathcastError as error:
        raise DatasetError(f"patient {patient_id}: no motion prior: {error}") from None
    images = np.stack([hu_to_unit(im) for im in images_hu])
    amps = np.stack([_trace_to_model_grid(a, grid_size) for a in amplitude])
    if labels is not None:
        labels = np.stack([_to_model_grid(Volume(lab, grid), grid_size, labels=True) for lab in labels])
    if fields is not None:
        fields = np.stack([f if f.shape[1:] == model_grid.shape else resample_field(f, grid, model_grid.shape)[0] for f in fields])
    if reference_labels is not None:
        reference_labels = _to_model_grid(Volume(reference_labels, grid), grid_size, labels=True)
    return PatientData(patient_id, images.astype(np.float32), amps, model_grid, labels, fields, reference_labels, priors, masks)


def load_patients(
    dataset: DatasetIndex | Path, patient_ids: list[str], grid_size: int, with_truth: bool = True, with_priors: bool = False,
    progress: bool = False, with_sliding_masks: bool = False,
) -> list[PatientData]:
    """Read patients from a dataset folder into memory at the model grid (resampled if the scans differ);
    ``with_priors`` also computes each scan's motion prior (about 0.25 s per 64³ scan and core),
    ``with_sliding_masks`` its sliding mask."""
    if not isinstance(dataset, DatasetIndex):
        dataset = open_dataset(Path(dataset))
    patients = []
    with prior_pool(with_priors or with_sliding_masks) as pool:
        for pid in tqdm(patient_ids, desc="loading patients", unit="patient", disable=not progress):
            record = read_patient(dataset, pid, with_fields=with_truth)
            if len(record.scans) < 2:
                raise DatasetError(f"{record.path / 'patient.json'}: a patient needs at least 2 scans to make pairs")
            grid = record.scans[0].image.grid
            has_labels = all(s.labels is not None for s in record.scans)
            has_fields = with_truth and all(s.field is not None for s in record.scans)
            patients.append(
                _patient_from_arrays(
                    pid,
                    grid,
                    [s.image.array for s in record.scans],
                    [s.amplitude for s in record.scans],
                    [s.labels for s in record.scans] if has_labels else None,
                    [s.field for s in record.scans] if has_fields else None,
                    record.reference_labels,
                    grid_size,
                    with_priors,
                    pool,
                    with_sliding_masks,
                )
            )
    return patients


def simulate_patients(
    n: int, config: SimulationConfig, seed: int, grid_size: int, first: int = 0, with_priors: bool = False,
    with_sliding_masks: bool = False,
) -> list[PatientData]:
    """Patients straight from the simulator (no files), ids ``patient_{i:03d}`` as ``breathcast simulate`` names them."""
    patients = []
    with prior_pool(with_priors or with_sliding_masks) as pool:
        for i in range(first, first + n):
            p = simulate_patient(patient_seed(seed, i), config, patient_id=f"patient_{i:03d}")
            patients.append(
                _patient_from_arrays(
                    p.patient_id, p.grid, [s.image_hu for s in p.scans], [s.amplitude for s in p.scans],
                    [s.labels for s in p.scans], [s.field for s in p.scans], p.reference_labels, grid_size,
                    with_priors, pool, with_sliding_masks,
                )
            )  # fmt: skip
    return patients


BODY_UNIT = float(hu_to_unit(np.array(BODY_HU)))
"""A [0, 1] image brighter than this somewhere in a slice shows body there (the segmentation's body threshold)."""


def field_of_view_weight(image: np.ndarray, slice_mm: float, margin_mm: float) -> np.ndarray:
    """(D,) float32 per-slice image-loss weight of a scan (D, D, D) in [0, 1] on its model box: 0 within
    ``margin_mm`` of where its field of view ends along z and beyond
    (:func:`~breathcast.model_box.field_of_view_along_z`), 1 elsewhere."""
    weight = np.ones(image.shape[0], np.float32)
    first, last = field_of_view_along_z((image > BODY_UNIT).any(axis=(1, 2)))
    margin = int(np.ceil(margin_mm / slice_mm)) if margin_mm > 0 else 0
    if first is not None and margin:
        weight[: first + margin] = 0.0
    if last is not None and margin:
        weight[max(last + 1 - margin, 0) :] = 0.0
    return weight


@dataclass
class PairBatch:
    """A batch of (moving, fixed) pairs as tensors: images (N, 1, D, D, D), traces (N, D), eps (N, latent),
    the moving scans' motion priors (N, 3, D/2, D/2, D/2) when the patients carry them (else None), and the
    per-slice image-loss weights (N, D) when a field-of-view margin was asked for (else None), the moving
    scans' sliding masks (N, 1, D, D, D) float32 when the patients carry them (else None), and the pairs' true
    fields (N, 3, D, D, D) voxels when asked for (else None)."""

    moving: torch.Tensor
    fixed: torch.Tensor
    b_m: torch.Tensor
    b_f: torch.Tensor
    eps: torch.Tensor
    pairs: list[tuple[str, int, int]]
    prior: torch.Tensor | None = None
    slice_weight: torch.Tensor | None = None
    motion_weight: torch.Tensor | None = None
    true_field: torch.Tensor | None = None

    def to(self, device: torch.device) -> PairBatch:
        tensors = (self.moving, self.fixed, self.b_m, self.b_f, self.eps)
        optional = tuple(None if t is None else t.to(device)
                         for t in (self.prior, self.slice_weight, self.motion_weight, self.true_field))
        return PairBatch(*(t.to(device) for t in tensors), self.pairs, *optional)


def sample_pairs(
    patients: list[PatientData],
    batch_size: int,
    latent_dim: int,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    fov_margin_mm: float = 0.0,
    with_truth: bool = False,
) -> PairBatch:
    """The global batch of ``step`` (a pure function of seed and step), and this rank's share of it.

    Args:
        patients: the patients to draw from (each needs >= 2 scans).
        batch_size: global batch size; must divide by ``world_size``.
        latent_dim: size of the latent noise eps drawn with the pairs.
        seed, step: what the batch is a function of.
        rank, world_size: this process's slice of the global batch.
        fov_margin_mm: > 0 adds each pair's per-slice image-loss weight (:func:`field_of_view_weight` of the
            moving scan: both scans of a patient share its field of view).
        with_truth: add each pair's true field (:meth:`PatientData.true_pair_field`).
    """
    if batch_size % world_size:
        raise BreathcastError(f"batch size {batch_size} does not divide over {world_size} processes")
    rng = np.random.default_rng([seed, step])
    which = rng.integers(len(patients), size=batch_size)
    pairs, moving, fixed, b_m, b_f, prior, slice_weight, motion_weight = [], [], [], [], [], [], [], []
    for p_index in which:
        patient = patients[p_index]
        k, j = rng.choice(patient.n_scans, size=2, replace=False)
        pairs.append((patient.patient_id, int(k), int(j)))
        moving.append(patient.images[k])
        if patient.priors is not None:
            prior.append(patient.priors[k])
        if patient.sliding_masks is not None:
            motion_weight.append(patient.sliding_masks[k].astype(np.float32))
        if fov_margin_mm > 0:
            slice_weight.append(field_of_view_weight(patient.images[k], patient.grid.spacing[2], fov_margin_mm))
        fixed.append(patient.images[j])
        b_m.append(patient.amplitude[k])
        b_f.append(patient.amplitude[j])
    eps = rng.standard_normal((batch_size, latent_dim)).astype(np.float32)
    share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def tensor(values, image: bool = False) -> torch.Tensor:
        t = torch.from_numpy(np.stack(values[share]) if isinstance(values, list) else values[share])
        return t[:, None] if image else t

    truth = None
    if with_truth:  # only this rank's pairs: a pair's truth is a composition, the batch's costliest part
        truth = [patients[p].true_pair_field(k, j) for p, (_, k, j) in zip(which[share], pairs[share])]
    return PairBatch(
        moving=tensor(moving, image=True),
        fixed=tensor(fixed, image=True),
        b_m=tensor(b_m),
        b_f=tensor(b_f),
        eps=torch.from_numpy(eps[share]),
        pairs=pairs[share],
        prior=tensor(prior) if len(prior) == len(moving) else None,
        slice_weight=tensor(slice_weight) if slice_weight else None,
        motion_weight=tensor(motion_weight, image=True) if len(motion_weight) == len(moving) else None,
        true_field=None if truth is None else torch.from_numpy(np.stack(truth)),
    )
