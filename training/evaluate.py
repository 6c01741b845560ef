"""Evaluation on held-out patients: the paper's Table 1 and Fig. 5, and what the paper could not measure.

For every test patient, ``pairs_per_patient`` pairs (moving scan k, fixed scan j != k) are drawn from the seed.
Each :class:`Predictor` sees the moving scan, its per-slice trace and the fixed scan's per-slice trace (never the
fixed image) and returns a displacement u; the moving image warped by u (``breathcast.warp.warp_image``) is
scored against the fixed image:

* the paper's (§4, Table 1): masked MSE (the FIXED scan's lungs, ``LUNG_LABELS``, dilated by 10 mm), MSE,
  MS-SSIM (``breathcast.metrics.ms_ssim``: 3D, 7-voxel Gaussian window, as many scales as the grid fits),
  folded voxels (det(I + grad u) <= 0), seconds per prediction (``predict`` only, after one warm-up call);
* Fig. 5: Dice per bucket (``DICE_BUCKETS``) of the moving labels warped by u against the fixed labels;
* ours, from the simulator's ground truth: the field end-point error (mm) inside the fixed scan's lungs against
  the true pair field, and the tumour-centroid error (mm) of the warped tumour against the fixed scan's.

Columns that need labels or true fields are None for patients that lack them (real data). Aggregates are the
means over all pairs (and per patient); the masked-MSE reduction is ``1 - mean(pred) / mean(no deformation)``,
the paper's 60.4 % for its cVAE (0.00827 vs 0.02089). :func:`write_results` writes ``results.json``,
``results.md``, ``dice.png`` (Fig. 5) and ``example.png`` (Fig. 4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import matplotlib

matplotlib.use("Agg")  # files only; no screen on these machines
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

import breathcast
from breathcast.sim.anatomy import DICE_BUCKETS, LUNG_LABELS, Label
from breathcast.io.dataset import open_dataset, prepare_output_dir
from breathcast.errors import BreathcastError
from breathcast.metrics import (
    WANG_MS_SSIM_WEIGHTS,
    dice_per_bucket,
    endpoint_error_mm,
    folded_voxels,
    lung_region_mask,
    masked_mse,
    ms_ssim,
    ms_ssim_scales,
    mse,
    target_error_mm,
    target_motion_error_mm,
)
from breathcast.training.cvae import CVAE, load_cvae
from breathcast.training.ldm import LDM, load_ldm
from breathcast.training.data import PatientData, load_patients
from breathcast.training.inference import predict_displacement
from breathcast.warp import warp_image, warp_labels

__all__ = [
    "Predictor",
    "NoDeformation",
    "CVAEPredictor",
    "LDMPredictor",
    "TrueField",
    "PairMetrics",
    "PairResult",
    "Summary",
    "ExampleSlices",
    "EvaluationResult",
    "draw_pairs",
    "evaluate",
    "write_results",
    "read_results",
    "markdown_report",
    "held_out_patients",
    "evaluate_models",
]

log = logging.getLogger(__name__)

LUNG_MARGIN_MM = 10.0
"""Dilation of the lung mask for the masked MSE (paper §4)."""
MS_SSIM_KERNEL_SIZE = 7
MS_SSIM_KERNEL_SIGMA = 1.5


@runtime_checkable
class Predictor(Protocol):
    """What an evaluated model is: a name and a displacement from (patient, moving scan, wanted trace).

    ``predict`` gets the whole :class:`PatientData` for the moving scan's image and trace (and whatever a
    per-patient model such as the 5D model fits on), but must not look at the fixed scan: the wanted state
    reaches it only as ``fixed_amplitude``.
    """

    name: str

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        """(3, D, D, D) float32 displacement, voxels, (dz, dy, dx), pull-back, from scan ``moving`` to the state
        of the per-slice trace ``fixed_amplitude`` (D,)."""
        ...


class NoDeformation:
    """The paper's baseline: the moving image is the prediction (u = 0)."""

    name = "No Deformation"
    info: dict[str, Any] = {"kind": "identity"}

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        return np.zeros((3, *patient.images.shape[1:]), dtype=np.float32)


class CVAEPredictor:
    """The cVAE at z = 0 (deterministic; the encoder is skipped), as in the paper's Table 1.

    Args:
        model: the cVAE; its grid must be the patients' grid.
        name: row name in the tables.
        info: what to record about the model in ``results.json`` (path, sha256, ...).
    """

    def __init__(self, model: CVAE, name: str = "cVAE", info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        self.info = {"kind": "cvae", "config": model.config.to_dict(), "device": str(self.device), **(info or {})}

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        d = self.model.config.grid
        if patient.images.shape[1:] != (d, d, d):
            raise BreathcastError(
                f"{self.name} works on a {d}³ grid; patient {patient.patient_id} is on {patient.images.shape[1:]}: "
                f"load the patients at grid {d}"
            )
        prior = patient.motion_prior(moving, self.model.config.prior_version) if self.model.config.prior_channels else None
        u = predict_displacement(self.model, patient.images[moving], patient.amplitude[moving], fixed_amplitude, prior=prior)
        return u * patient.sliding_mask(moving) if self.model.config.sliding_mask else u


class LDMPredictor:
    """The latent diffusion model: DDIM with ``steps`` steps from seeded noise (deterministic), as Table 1's LDM row.

    Args:
        model: the LDM; its grid must be the patients' grid.
        steps: DDIM steps (the paper's 50; fewer are faster).
        seed: seed of the initial noise.
        name, info: as :class:`CVAEPredictor`.
    """

    def __init__(self, model: LDM, steps: int = 50, seed: int = 0, name: str = "LDM", info: dict[str, Any] | None = None) -> None:
        self.model, self.steps, self.seed, self.name = model.eval(), int(steps), int(seed), name
        self.info = {"kind": "ldm", "config": model.config.to_dict(), "autoencoder": model.autoencoder.config.to_dict(),
                     "ddim_steps": self.steps, "seed": self.seed, "device": "cpu", **(info or {})}

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        d = self.model.grid
        if patient.images.shape[1:] != (d, d, d):
            raise BreathcastError(f"{self.name} works on a {d}³ grid; patient {patient.patient_id} is on "
                                  f"{patient.images.shape[1:]}: load the patients at grid {d}")  # fmt: skip
        image = torch.from_numpy(patient.images[moving])[None, None]
        b_m = torch.from_numpy(np.asarray(patient.amplitude[moving], dtype=np.float32))[None]
        b_f = torch.from_numpy(np.asarray(fixed_amplitude, dtype=np.float32))[None]
        config = self.model.config
        prior = torch.from_numpy(patient.motion_prior(moving, config.prior_version))[None] if config.prior_channels else None
        return self.model.predict(image, b_m, b_f, steps=self.steps, seed=self.seed, prior=prior)[0].numpy()


class TrueField:
    """The simulator's true field, found from the fixed trace: the floor of every metric (simulated data only).

    Not a model: it shows how much of an error is the metric's own (interpolation, label quantization).
    """

    name = "True field"

    def predict(self, patient: PatientData, moving: int, fixed_amplitude: np.ndarray) -> np.ndarray:
        distances = np.abs(patient.amplitude - np.asarray(fixed_amplitude)[None]).max(axis=1)
        fixed = int(np.argmin(distances))
        if distances[fixed] > 1e-6:
            raise BreathcastError(f"{patient.patient_id}: no scan has the requested trace; the true field needs one")
        return patient.true_pair_field(moving, fixed)


@dataclass(frozen=True)
class PairMetrics:
    """One predictor on one pair. None where the patient lacks what the metric needs (labels, true fields).

    Args:
        masked_mse: MSE within the fixed scan's lungs dilated by 10 mm (squared [0, 1] units).
        mse: MSE over the volume.
        ms_ssim: 3D MS-SSIM against the fixed image.
        folded_voxels: voxels with det(I + grad u) <= 0.
        seconds: wall time of ``predict``.
        epe_mm: mean end-point error (mm) against the true pair field, inside the fixed scan's lungs.
        tumour_error_mm: distance (mm) between the centroids of the warped and the fixed tumour label maps.
        tumour_motion_error_mm: the same from the fields, free of label quantization
            (:func:`~breathcast.metrics.target_motion_error_mm` over the fixed scan's tumour).
        dice: bucket -> Dice of the warped moving labels against the fixed labels (None: empty in both).
    """

    masked_mse: float | None
    mse: float
    ms_ssim: float
    folded_voxels: int
    seconds: float
    epe_mm: float | None
    tumour_error_mm: float | None
    dice: dict[str, float | None] | None
    tumour_motion_error_mm: float | None = None


@dataclass(frozen=True)
class PairResult:
    """A pair (moving scan k -> fixed scan j of one patient) and every predictor's metrics on it."""

    patient_id: str
    moving: int
    fixed: int
    moving_mean_amplitude: float
    fixed_mean_amplitude: float
    metrics: dict[str, PairMetrics]


@dataclass(frozen=True)
class Summary:
    """One predictor's metrics over a set of pairs: means (None when no pair had the metric)."""

    pairs: int
    masked_mse: float | None
    mse: float
    ms_ssim: float
    masked_mse_reduction_percent: float | None
    folded_voxels_total: int
    folded_voxels_max: int
    seconds_mean: float
    seconds_std: float
    epe_mm: float | None
    tumour_error_mm: float | None
    dice: dict[str, float | None] | None
    tumour_motion_error_mm: float | None = None


@dataclass(frozen=True)
class ExampleSlices:
    """Coronal slices of one pair for the Fig. 4-like figure (images in [0, 1], (Z, X) each)."""

    patient_id: str
    moving: int
    fixed: int
    row: int
    spacing_mm: tuple[float, float, float]
    moving_slice: np.ndarray
    fixed_slice: np.ndarray
    predicted: dict[str, np.ndarray]
    b_m: np.ndarray
    b_f: np.ndarray


@dataclass(frozen=True)
class EvaluationResult:
    """Everything an evaluation measured; ``to_dict`` is ``results.json``.

    Args:
        predictors: row names, the baseline (No Deformation) first.
        patients: the evaluated patient ids.
        pairs_per_patient, seed: how the pairs were drawn.
        grid_shape: (Z, Y, X) of the evaluation grid; spacing_mm: its (x, y, z) voxel size.
        ms_ssim: kernel size, sigma (voxels), number of scales and their weights.
        lung_margin_mm: dilation of the lung mask of the masked MSE.
        summary: predictor -> means over all pairs.
        per_patient: patient -> predictor -> means over that patient's pairs.
        pairs: every pair with every predictor's metrics.
        info: versions, threads, creation time, what each predictor is.
        example: slices for ``example.png`` (not in the JSON).
    """

    predictors: list[str]
    patients: list[str]
    pairs_per_patient: int
    seed: int
    grid_shape: list[int]
    spacing_mm: list[float]
    ms_ssim: dict[str, Any]
    lung_margin_mm: float
    summary: dict[str, Summary]
    per_patient: dict[str, dict[str, Summary]]
    pairs: list[PairResult]
    info: dict[str, Any]
    example: ExampleSlices | None = field(default=None, compare=False, repr=False)

    @property
    def baseline(self) -> str:
        return self.predictors[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: only dicts, lists, str, int, float and None (no NaN)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("summary", "per_patient", "pairs", "example")}
        data["summary"] = {name: dataclasses.asdict(s) for name, s in self.summary.items()}
        data["per_patient"] = {pid: {name: dataclasses.asdict(s) for name, s in rows.items()} for pid, rows in self.per_patient.items()}
        data["pairs"] = [dataclasses.asdict(p) for p in self.pairs]
        return json.loads(json.dumps(data, allow_nan=False))  # a deep copy with tuples as lists

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """The inverse of :meth:`to_dict` (without the example slices)."""
        try:
            simple = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name not in ("summary", "per_patient", "pairs", "example")}
            return cls(
                **simple,
                summary={name: Summary(**s) for name, s in data["summary"].items()},
                per_patient={pid: {name: Summary(**s) for name, s in rows.items()} for pid, rows in data["per_patient"].items()},
                pairs=[PairResult(**{**p, "metrics": {n: PairMetrics(**m) for n, m in p["metrics"].items()}}) for p in data["pairs"]],
            )
        except (KeyError, TypeError) as exc:
            raise BreathcastError(f"not a breathcast evaluation result ({type(exc).__name__}: {exc})") from None


def _finite(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _patient_stream(seed: int, patient_id: str) -> np.random.Generator:
    # Keyed by the patient's id, so a patient's pairs do not change when others are added or removed.
    return np.random.default_rng([seed, zlib.crc32(patient_id.encode())])


def draw_pairs(patient: PatientData, pairs_per_patient: int, seed: int) -> list[tuple[int, int]]:
    """``pairs_per_patient`` distinct (moving k, fixed j != k) pairs of the patient's scans, a function of the seed.

    A patient with fewer ordered pairs than asked gives all of them.

    Example:
        >>> from breathcast.geometry import Grid
        >>> p = PatientData("p", np.zeros((3, 2, 2, 2), np.float32), np.zeros((3, 2)), Grid((2, 2, 2), (1.0, 1.0, 1.0)))
        >>> sorted(draw_pairs(p, 10, seed=0))
        [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    """
    if pairs_per_patient < 1:
        raise BreathcastError(f"pairs_per_patient must be at least 1, got {pairs_per_patient}")
    n = patient.n_scans
    if n < 2:
        raise BreathcastError(f"patient {patient.patient_id} has {n} scan(s); a pair needs 2")
    ordered = [(k, j) for k in range(n) for j in range(n) if k != j]
    chosen = _patient_stream(seed, patient.patient_id).choice(len(ordered), size=min(pairs_per_patient, len(ordered)), replace=False)
    return [ordered[i] for i in chosen]


@dataclass(frozen=True)
class _Truth:
    """What the fixed scan offers to score against; None where the patient lacks labels or fields."""

    region: np.ndarray | None  # lungs + 10 mm
    lungs: np.ndarray | None
    true_field: np.ndarray | None
    tumour: np.ndarray | None
    row: int


def _truth(patient: PatientData, k: int, j: int) -> _Truth:
    grid = patient.grid
    region = lungs = true_field = tumour = None
    row = grid.shape[1] // 2
    if patient.labels is not None:
        lungs = np.isin(patient.labels[j], LUNG_LABELS)
        if lungs.any():
            region = lung_region_mask(lungs, grid, margin_mm=LUNG_MARGIN_MM)
        else:
            lungs = None
        tumour = patient.labels[j] == Label.TUMOUR
        if tumour.any():
            row = int(np.round(np.argwhere(tumour)[:, 1].mean()))
        else:
            tumour = None
    if patient.fields is not None:
        true_field = patient.true_pair_field(k, j)
    return _Truth(region, lungs, true_field, tumour, row)


def _score(patient: PatientData, k: int, j: int, u: np.ndarray, warped: np.ndarray, seconds: float, truth: _Truth) -> PairMetrics:
    fixed = patient.images[j]
    grid = patient.grid
    epe = tumour_error = tumour_motion_error = dice = None
    if truth.true_field is not None and truth.lungs is not None:
        epe = endpoint_error_mm(u, truth.true_field, grid, truth.lungs)["mean"]
    if truth.true_field is not None and truth.tumour is not None:
        tumour_motion_error = target_motion_error_mm(u, truth.true_field, truth.tumour, grid)
    if patient.labels is not None:
        warped_labels = warp_labels(patient.labels[k], u)
        dice = {name: _finite(v) for name, v in dice_per_bucket(warped_labels, patient.labels[j], DICE_BUCKETS).items()}
        predicted_tumour = warped_labels == Label.TUMOUR
        if truth.tumour is not None and predicted_tumour.any():
            tumour_error = target_error_mm(predicted_tumour, truth.tumour, grid)
        elif truth.tumour is not None:
            log.warning("%s scan %d -> %d: the warped tumour vanished; no tumour error for this pair", patient.patient_id, k, j)
    return PairMetrics(
        masked_mse=masked_mse(warped, fixed, truth.region) if truth.region is not None else None,
        mse=mse(warped, fixed),
        ms_ssim=ms_ssim(warped, fixed, kernel_size=MS_SSIM_KERNEL_SIZE, kernel_sigma=MS_SSIM_KERNEL_SIGMA),
        folded_voxels=folded_voxels(u),
        seconds=float(seconds),
        epe_mm=epe,
        tumour_error_mm=tumour_error,
        dice=dice,
        tumour_motion_error_mm=tumour_motion_error,
    )


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _summarise(metrics: list[PairMetrics], baseline: list[PairMetrics]) -> Summary:
    masked = _mean([m.masked_mse for m in metrics])
    masked_base = _mean([m.masked_mse for m in baseline])
    reduction = None
    if masked is not None and masked_base is not None and masked_base > 0:
        reduction = 100.0 * (1.0 - masked / masked_base)
    dice = None
    if any(m.dice is not None for m in metrics):
        dice = {name: _mean([m.dice[name] for m in metrics if m.dice is not None]) for name in DICE_BUCKETS}
    seconds = np.asarray([m.seconds for m in metrics], dtype=np.float64)
    folds = [m.folded_voxels for m in metrics]
    return Summary(
        pairs=len(metrics),
        masked_mse=masked,
        mse=float(np.mean([m.mse for m in metrics])),
        ms_ssim=float(np.mean([m.ms_ssim for m in metrics])),
        masked_mse_reduction_percent=reduction,
        folded_voxels_total=int(sum(folds)),
        folded_voxels_max=int(max(folds)),
        seconds_mean=float(seconds.mean()),
        seconds_std=float(seconds.std()),
        epe_mm=_mean([m.epe_mm for m in metrics]),
        tumour_error_mm=_mean([m.tumour_error_mm for m in metrics]),
        dice=dice,
        tumour_motion_error_mm=_mean([m.tumour_motion_error_mm for m in metrics]),
    )


def _timed_predict(predictor: Predictor, patient: PatientData, k: int, b_f: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    u = predictor.predict(patient, k, b_f)
    seconds = time.perf_counter() - start
    u = np.asarray(u)
    expected = (3, *patient.images.shape[1:])
    if u.shape != expected:
        raise BreathcastError(f"predictor {predictor.name!r} returned a field of shape {u.shape}; expected {expected}")
    if not np.all(np.isfinite(u)):
        raise BreathcastError(f"predictor {predictor.name!r} returned NaN or infinite displacements for patient "
                              f"{patient.patient_id}, scan {k}")  # fmt: skip
    return np.ascontiguousarray(u, dtype=np.float32), seconds


def evaluate(
    predictors: list[Predictor],
    patients: list[PatientData],
    pairs_per_patient: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationResult:
    """Score each predictor on the same pairs of every patient; see the module docstring for the metrics.

    No Deformation is the baseline of the masked-MSE reduction: when ``predictors`` holds no
    :class:`NoDeformation`, one is put first.

    Args:
        predictors: the models to compare (unique names).
        patients: held-out patients, all on the same grid (images (K, D, D, D) in [0, 1]).
        pairs_per_patient: pairs drawn per patient (all ordered pairs when a patient has fewer).
        seed: the pairs are a function of it and the patient ids.
        progress: show a progress bar over the pairs.

    Returns:
        The per-pair metrics and their means, overall and per patient.
    """
    if not patients:
        raise BreathcastError("no patients to evaluate")
    baseline = next((p for p in predictors if isinstance(p, NoDeformation)), None)
    predictors = [baseline or NoDeformation(), *[p for p in predictors if p is not baseline]]
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise BreathcastError(f"predictor names must be unique, got {names}")
    shape = patients[0].images.shape[1:]
    for patient in patients:
        if patient.images.shape[1:] != shape:
            raise BreathcastError(f"patients must share one grid: {patient.patient_id} is {patient.images.shape[1:]}, "
                                  f"{patients[0].patient_id} is {shape}")  # fmt: skip
    scales = ms_ssim_scales(shape, MS_SSIM_KERNEL_SIZE)
    weights = np.asarray(WANG_MS_SSIM_WEIGHTS[:scales])
    plan = [(patient, k, j) for patient in patients for k, j in draw_pairs(patient, pairs_per_patient, seed)]
    log.info("evaluating %s on %d patient(s), %d pair(s)", ", ".join(names), len(patients), len(plan))

    # One untimed call each, so the times do not include first-call costs (torch, numba compilation).
    first_patient, first_k, first_j = plan[0]
    for predictor in predictors:
        predictor.predict(first_patient, first_k, first_patient.amplitude[first_j])

    pairs: list[PairResult] = []
    example, example_score = None, -np.inf
    for patient, k, j in tqdm(plan, desc="evaluating", unit="pair", disable=not progress):
        truth = _truth(patient, k, j)
        metrics: dict[str, PairMetrics] = {}
        slices: dict[str, np.ndarray] = {}
        for predictor in predictors:
            u, seconds = _timed_predict(predictor, patient, k, patient.amplitude[j])
            warped = warp_image(patient.images[k], u)
            metrics[predictor.name] = _score(patient, k, j, u, warped, seconds, truth)
            slices[predictor.name] = warped[:, truth.row, :].copy()
        # The figure shows the pair with the most motion to recover (largest baseline error).
        base = metrics[names[0]]
        score = base.masked_mse if base.masked_mse is not None else base.mse
        if score > example_score:
            example_score = score
            example = ExampleSlices(
                patient.patient_id, k, j, truth.row, patient.grid.spacing,
                patient.images[k][:, truth.row, :].copy(), patient.images[j][:, truth.row, :].copy(), slices,
                patient.amplitude[k].copy(), patient.amplitude[j].copy(),
            )  # fmt: skip
        pairs.append(PairResult(
            patient.patient_id, k, j, float(patient.amplitude[k].mean()), float(patient.amplitude[j].mean()), metrics,
        ))  # fmt: skip

    def summaries(selected: list[PairResult]) -> dict[str, Summary]:
        base = [p.metrics[names[0]] for p in selected]
        return {name: _summarise([p.metrics[name] for p in selected], base) for name in names}

    ids = [p.patient_id for p in patients]
    return EvaluationResult(
        predictors=names,
        patients=ids,
        pairs_per_patient=int(pairs_per_patient),
        seed=int(seed),
        grid_shape=[int(s) for s in shape],
        spacing_mm=[float(s) for s in patients[0].grid.spacing],
        ms_ssim={"kernel_size": MS_SSIM_KERNEL_SIZE, "kernel_sigma": MS_SSIM_KERNEL_SIGMA, "scales": scales,
                 "weights": [float(w) for w in weights / weights.sum()]},
        lung_margin_mm=LUNG_MARGIN_MM,
        summary=summaries(pairs),
        per_patient={pid: summaries([p for p in pairs if p.patient_id == pid]) for pid in ids},
        pairs=pairs,
        info={
            "breathcast_version": breathcast.__version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "predictors": {p.name: dict(getattr(p, "info", {}) or {}) for p in predictors},
        },
        example=example,
    )  # fmt: skip


# --- reports -------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _device_label(result: EvaluationResult) -> str:
    devices = {info.get("device", "cpu") for info in result.info.get("predictors", {}).values()}
    kind = "GPU" if any(str(d).startswith("cuda") for d in devices) else "CPU"
    return f"{kind} s / prediction"


def _table1(result: EvaluationResult) -> list[str]:
    rows = []
    for name in result.predictors:
        s = result.summary[name]
        rows.append([name, _fmt(s.masked_mse, ".5f"), _fmt(s.mse, ".5f"), _fmt(s.ms_ssim, ".4f"),
                     f"{s.folded_voxels_total} ({s.folded_voxels_max})", f"{s.seconds_mean:.3f} ± {s.seconds_std:.3f}"])  # fmt: skip
    header = ["Model", "Masked MSE ↓", "MSE ↓", "MS-SSIM ↑", "folded voxels, total (max per pair) ↓", _device_label(result)]
    return _table(header, rows)


def _table_ours(result: EvaluationResult) -> list[str]:
    rows = []
    for name in result.predictors:
        s = result.summary[name]
        rows.append([name, _fmt(s.masked_mse_reduction_percent, ".1f"), _fmt(s.epe_mm, ".2f"), _fmt(s.tumour_error_mm, ".2f"),
                     _fmt(s.tumour_motion_error_mm, ".2f")])  # fmt: skip
    header = ["Model", "masked-MSE reduction vs No Deformation (%) ↑", "field end-point error in the lungs (mm) ↓",
              "tumour-centroid error, label maps (mm) ↓", "tumour-centroid error, fields (mm) ↓"]  # fmt: skip
    return _table(header, rows)


def markdown_report(result: EvaluationResult, full: bool = True) -> str:
    """``results.md``: Table 1, our ground-truth table, and (``full``) Dice and per-patient tables.

    With ``full=False``, the two main tables only (what the CLI prints).
    """
    n_pairs = len(result.pairs)
    grid = "x".join(str(s) for s in result.grid_shape[::-1])
    spacing = ", ".join(f"{s:.2f}" for s in result.spacing_mm)
    ssim = result.ms_ssim
    threads = result.info.get("torch_threads")
    lines = [
        "# Evaluation on held-out patients",
        "",
        f"{len(result.patients)} patient(s) ({', '.join(result.patients)}), {n_pairs} pair(s) of scans (moving k, fixed j ≠ k; "
        f"up to {result.pairs_per_patient} per patient, drawn with seed {result.seed}). Grid {grid} voxels (x, y, z), "
        f"spacing ({spacing}) mm. Means over all pairs.",
        "",
        "## Table 1 (the paper's metrics)",
        "",
        *_table1(result),
        "",
        f"Masked MSE: within the fixed scan's lungs dilated by {result.lung_margin_mm:g} mm (images scaled to [0, 1]). "
        f"MS-SSIM: 3D, {ssim['scales']} scale(s), Gaussian window {ssim['kernel_size']} voxels (σ {ssim['kernel_sigma']:g}), "
        f"Wang et al.'s first {ssim['scales']} weights renormalised ({', '.join(f'{w:.3f}' for w in ssim['weights'])}); "
        "comparable only between runs on the same grid. Folded voxels: det(I + ∇u) ≤ 0. Time: `predict` only, after "
        f"one untimed warm-up call, {threads} torch thread(s); mean ± std over pairs.",
        "",
        "## Beyond the paper (simulator ground truth)",
        "",
        *_table_ours(result),
        "",
        "Reduction: 1 − mean masked MSE / mean masked MSE of No Deformation (the paper's cVAE: 60.4 %). End-point error: "
        "mean |u − u_true| in mm inside the fixed scan's lungs (undilated). Tumour error: distance between the centroid "
        "of the moving tumour warped by u and the fixed scan's tumour. For No Deformation these two are the true motion. "
        "n/a: the patients have no label maps or true fields (real data).",
    ]
    if not full:
        return "\n".join(lines) + "\n"
    names = result.predictors
    first = result.summary[names[0]]
    if first.dice is not None:
        rows = [[bucket, *[_fmt((result.summary[n].dice or {}).get(bucket), ".3f") for n in names]] for bucket in DICE_BUCKETS]
        lines += ["", "## Dice per bucket (Fig. 5, `dice.png`)", "", *_table(["Bucket", *names], rows), "",
                  "Moving labels warped by u (nearest neighbour) against the fixed scan's labels; mean over the pairs "
                  "where the bucket is present."]  # fmt: skip
    header = ["Patient", "pairs"]
    for n in names:
        header += [f"{n}: masked MSE", f"{n}: reduction (%)", f"{n}: tumour error (mm)"]
    rows = []
    for pid in result.patients:
        per = result.per_patient[pid]
        row = [pid, str(per[names[0]].pairs)]
        for n in names:
            row += [_fmt(per[n].masked_mse, ".5f"), _fmt(per[n].masked_mse_reduction_percent, ".1f"), _fmt(per[n].tumour_error_mm, ".2f")]
        rows.append(row)
    lines += ["", "## Per patient", "", *_table(header, rows)]
    if result.example is not None:
        ex = result.example
        lines += ["", f"`example.png` (Fig. 4): {ex.patient_id}, scan {ex.fixed} predicted from scan {ex.moving} "
                  f"(the pair with the largest No Deformation error), coronal row {ex.row}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot_dice(result: EvaluationResult, path: Path) -> Path:
    buckets = list(DICE_BUCKETS)
    names = result.predictors
    width = 0.8 / len(names)
    x = np.arange(len(buckets))
    fig, ax = plt.subplots(figsize=(12, 4.8), layout="constrained")
    for i, name in enumerate(names):
        dice = result.summary[name].dice or {}
        values = [np.nan if dice.get(b) is None else dice[b] for b in buckets]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, buckets, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean Dice")
    ax.legend(loc="lower right")
    ax.set_title(f"Dice per bucket (Fig. 5): {len(result.patients)} patient(s), {len(result.pairs)} pair(s)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_example(result: EvaluationResult, path: Path) -> Path:
    ex = result.example
    names = result.predictors
    models = names[1:]
    sx, _, sz = ex.spacing_mm
    nz, nx = ex.moving_slice.shape
    extent = (0, nx * sx, 0, nz * sz)
    cols = 2 + len(models)
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 8.5), layout="constrained", squeeze=False)
    image_kw = dict(cmap="gray", vmin=0, vmax=1, origin="lower", extent=extent)
    axes[0, 0].imshow(ex.moving_slice, **image_kw)
    axes[0, 0].set_title(f"moving M (scan {ex.moving})")
    axes[0, 1].imshow(ex.fixed_slice, **image_kw)
    axes[0, 1].set_title(f"fixed F (scan {ex.fixed})")
    baseline_error = np.abs(ex.moving_slice - ex.fixed_slice)
    shown = axes[1, 1].imshow(baseline_error, cmap="magma", vmin=0, vmax=0.3, origin="lower", extent=extent)
    axes[1, 1].set_title("|M − F| (no deformation)")
    fig.colorbar(shown, ax=axes[1, 1], shrink=0.8)
    shown = None
    for c, name in enumerate(models, start=2):
        axes[0, c].imshow(ex.predicted[name], **image_kw)
        axes[0, c].set_title(f"{name}: φ∘M")
        diff = np.abs(ex.predicted[name] - ex.fixed_slice) - baseline_error
        shown = axes[1, c].imshow(diff, cmap="RdBu_r", vmin=-0.3, vmax=0.3, origin="lower", extent=extent)
        axes[1, c].set_title(f"{name}: error vs no deformation")
    if shown is not None:
        fig.colorbar(shown, ax=axes[1, -1], shrink=0.8, label="|φ∘M − F| − |M − F| (lower is better)")
    z_mm = (np.arange(nz) + 0.5) * sz
    ax = axes[1, 0]
    ax.plot(ex.b_m, z_mm, label=f"b_m (scan {ex.moving})")
    ax.plot(ex.b_f, z_mm, label=f"b_f (scan {ex.fixed})")
    ax.set_xlabel("amplitude (0 exhale, 1 inhale)")
    ax.set_ylabel("z (mm)")
    ax.set_title("per-slice traces")
    ax.legend()
    for a in list(axes[0]) + list(axes[1, 1:]):
        a.set_xlabel("x (mm)")
        a.set_ylabel("z (mm)")
    fig.suptitle(f"{ex.patient_id}: scan {ex.fixed} predicted from scan {ex.moving} and the two traces (coronal row {ex.row})")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_results(result: EvaluationResult, out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``dice.png`` and ``example.png`` into ``out_dir``.

    ``dice.png`` needs label maps and ``example.png`` the example slices (absent in a result read back
    from JSON); each is skipped, with a log line, when missing.

    Returns:
        file name -> path, for the files written.
    """
    out = prepare_output_dir(Path(out_dir))
    files = {}
    path = out / "results.json"
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    files["results.json"] = path
    path = out / "results.md"
    path.write_text(markdown_report(result))
    files["results.md"] = path
    if result.summary[result.baseline].dice is not None:
        files["dice.png"] = _plot_dice(result, out / "dice.png")
    else:
        log.info("no label maps: dice.png not written")
    if result.example is not None:
        files["example.png"] = _plot_example(result, out / "example.png")
    else:
        log.info("no example slices in the result: example.png not written")
    return files


def read_results(path: Path) -> EvaluationResult:
    """Read a ``results.json`` written by :func:`write_results` (without the example slices)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BreathcastError(f"{path}: not readable JSON ({exc})") from None
    return EvaluationResult.from_dict(data)


# --- models and test patients from disk (what `breathcast evaluate` runs) --------------------------------------


def _read_manifest(model_path: Path) -> tuple[Path, dict[str, Any] | None]:
    path = Path(model_path).parent / "manifest.json"
    if not path.is_file():
        return path, None
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BreathcastError(f"{path}: not readable JSON ({exc})") from None


def _same_folder(source: Any, data_dir: Path) -> bool:
    if not isinstance(source, str) or not source:
        return False
    try:
        return Path(source).resolve() == Path(data_dir).resolve()
    except OSError:
        return False


def _split(manifest: dict[str, Any], part: str) -> list[str]:
    return list(((manifest.get("data") or {}).get("split") or {}).get(part) or [])


def held_out_patients(model_paths: list[Path], data_dir: Path) -> list[str]:
    """The test split recorded in the models' ``manifest.json`` (next to each ``model.pt``).

    A manifest counts when its ``data.source`` is ``data_dir`` (resolved paths compared). Every counting
    manifest must name the same test patients.

    Raises:
        BreathcastError: no manifest trained on ``data_dir``, an empty test split, or manifests that disagree;
            the message says to name the patients.
    """
    splits: dict[Path, list[str]] = {}
    reasons = []
    for model_path in model_paths:
        path, manifest = _read_manifest(model_path)
        if manifest is None:
            reasons.append(f"{path} is missing")
            continue
        source = (manifest.get("data") or {}).get("source")
        if not _same_folder(source, data_dir):
            reasons.append(f"{path} records data from {source!r}, not {Path(data_dir).resolve()}")
            continue
        splits[path] = sorted(_split(manifest, "test"))
    if not splits:
        raise BreathcastError(f"no test split for this dataset: {'; '.join(reasons)}; name the patients with --patients ID ...")
    first_path, first = next(iter(splits.items()))
    if not first:
        raise BreathcastError(f"{first_path}: the test split is empty (trained with --test-patients 0); name the patients with --patients ID ...")
    for path, ids in splits.items():
        if ids != first:
            raise BreathcastError(f"{first_path} and {path} name different test patients; name the patients with --patients ID ...")
    return first


def _model_kind(path: Path) -> str:
    """The ``kind`` a model file records ("cvae" or "ldm"); a clear error for anything else."""
    if not Path(path).is_file():
        raise BreathcastError(f"{path}: model file is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise BreathcastError(f"{path}: not a readable breathcast model ({exc})") from None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind not in ("cvae", "ldm"):
        raise BreathcastError(f"{path}: not a breathcast cVAE or LDM model file")
    return kind


def _model_names(model_paths: list[Path], kinds: list[str]) -> list[str]:
    label = {"cvae": "cVAE", "ldm": "LDM"}
    names = [label[k] if kinds.count(k) == 1 else f"{label[k]} ({Path(p).resolve().parent.name})" for p, k in zip(model_paths, kinds)]
    if len(set(names)) != len(names):
        names = [f"{label[k]} ({Path(p)})" for p, k in zip(model_paths, kinds)]
    if len(set(names)) != len(names):
        raise BreathcastError("the same model is given twice")
    return names


def evaluate_models(
    model_paths: list[Path],
    data_dir: Path,
    out_dir: Path,
    patient_ids: list[str] | None = None,
    pairs_per_patient: int = 10,
    seed: int = 0,
    progress: bool = True,
    extra_predictors: list[Predictor] | None = None,
    ldm_steps: list[int] | None = None,
) -> tuple[EvaluationResult, dict[str, Path]]:
    """Load cVAE and LDM models and test patients, :func:`evaluate` them against No Deformation, write the results.

    Args:
        model_paths: ``model.pt`` files (``save_cvae`` or ``save_ldm``); all on one grid.
        data_dir: dataset folder (docs/data-format.md).
        out_dir: where :func:`write_results` writes.
        patient_ids: patients to evaluate; None takes the test split of the models' manifests
            (:func:`held_out_patients`).
        pairs_per_patient, seed, progress: as :func:`evaluate`.
        extra_predictors: more rows after the cVAEs (e.g. the calibration's 5D models, which the CLI adds);
            one with a ``prepare(patients)`` method gets it called with the loaded patients first, so a
            per-patient fit is not timed as a prediction.
        ldm_steps: DDIM step counts; each LDM gives one row per count (default [50], the paper's).

    Returns:
        The result and the files written.
    """
    if not model_paths:
        raise BreathcastError("no model to evaluate; pass --model PATH/model.pt")
    model_paths = [Path(p) / "model.pt" if Path(p).is_dir() else Path(p) for p in model_paths]  # a run folder will do
    kinds = [_model_kind(p) for p in model_paths]
    names = _model_names(model_paths, kinds)
    models = [load_cvae(p) if kind == "cvae" else load_ldm(p) for p, kind in zip(model_paths, kinds)]
    grids = {m.config.grid if isinstance(m, CVAE) else m.grid for m in models}
    if len(grids) != 1:
        raise BreathcastError(f"the models work on different grids ({sorted(grids)}); evaluate them separately")
    grid = grids.pop()
    dataset = open_dataset(Path(data_dir))
    if patient_ids is None:
        patient_ids = held_out_patients([Path(p) for p in model_paths], Path(data_dir))
    patient_ids = list(dict.fromkeys(patient_ids))
    if not patient_ids:
        raise BreathcastError("no patients to evaluate")
    missing = [pid for pid in patient_ids if pid not in dataset.patients]
    if missing:
        held = ", ".join(dataset.patients[:8]) + (", ..." if len(dataset.patients) > 8 else "")
        raise BreathcastError(f"patient(s) {', '.join(missing)} not in {dataset.path} (it holds {held or 'no patients'})")
    for model_path in model_paths:
        path, manifest = _read_manifest(Path(model_path))
        if manifest is not None and _same_folder((manifest.get("data") or {}).get("source"), Path(data_dir)):
            seen = sorted(set(patient_ids) & set(_split(manifest, "train") + _split(manifest, "val")))
            if seen:
                log.warning("%s: patient(s) %s were used for training or validation; they are not held out", path, ", ".join(seen))
    out = prepare_output_dir(Path(out_dir))
    with_priors = any(m.config.prior_channels for m in models)  # each scan's, once
    with_masks = any(isinstance(m, CVAE) and m.config.sliding_mask for m in models)
    patients = load_patients(dataset, patient_ids, grid, with_truth=True, with_priors=with_priors, with_sliding_masks=with_masks)
    predictors: list[Predictor] = [NoDeformation()]
    for name, model, model_path in zip(names, models, model_paths):
        info = {"path": str(Path(model_path).resolve())}
        manifest_path, manifest = _read_manifest(Path(model_path))
        if manifest is not None:
            info["manifest"] = str(manifest_path.resolve())
            info["sha256"] = (manifest.get("files") or {}).get("model.pt")
        if isinstance(model, CVAE):
            predictors.append(CVAEPredictor(model, name=name, info=info))
            continue
        steps = list(dict.fromkeys(ldm_steps or [50]))
        for n in steps:
            predictors.append(LDMPredictor(model, n, name=name if len(steps) == 1 else f"{name} ({n} steps)", info=info))
    for extra in extra_predictors or []:
        prepare = getattr(extra, "prepare", None)
        if callable(prepare):
            prepare(patients)
        predictors.append(extra)
    result = evaluate(predictors, patients, pairs_per_patient=pairs_per_patient, seed=seed, progress=progress)
    result = dataclasses.replace(result, info={**result.info, "data": str(dataset.path.resolve())})
    return result, write_results(result, out)
