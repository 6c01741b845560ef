"""The per-plan predictor: load a package with a planning CT and its trace once, then trace window -> field.

::

    predictor = load_predictor(package, plan, PredictorConfig(path="distilled"))
    prediction = predictor.predict(window)        # window: (448,) amplitude on the model's time base
    prediction.displacement                       # (3, D, D, D) float32, model-grid voxels, pull-back
    prediction.target_lps_mm                      # (P, 3) where the target points are now, mm LPS

Three paths, one interface:

* ``direct``: the network every frame, then scaling and squaring (numba) at half resolution and a resize to
  the model grid. A ``cvae`` package runs its ``frame`` graph (exact, tens of ms); an ``ldm`` package a DDIM
  loop of ``sampling_steps`` ``denoise`` runs, then ``decode`` (one :class:`Network` per kind, prepared once
  per plan: :class:`CVAENetwork`, :class:`LDMNetwork`).
* ``distilled``: at plan load the network is queried over a designed set of breathing states and a per-voxel
  polynomial in the slice's own (amplitude, rate) is fitted (:mod:`breathcast.state_model`); per frame only
  the polynomial is evaluated. Its error against ``direct`` on realistic windows is measured at plan load
  (:attr:`Predictor.distillation_error_mm`).
* ``linear5d``: the same evaluation with a 5D model fitted from registrations (a ``linear5d`` package).

Window modes: ``window`` (slice z takes the state of window sample z, as the paper's b_f; window sample 0,
the oldest, maps to slice 0, the newest to slice D-1) and ``snapshot`` (every slice at the newest state: the
anatomy now; the direct path then gets a constant b_f and so no rate).

A state (A, Ȧ) reaches the network during distillation as the per-slice trace a scan would record around it,
``b_f[z] = A + Ȧ (t_z - t_c)`` (DESIGN.md), and each slice is fitted at its own (b_f[z], Ȧ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.signal import savgol_filter

from breathcast.canonical import to_canonical
from breathcast.errors import BreathcastError, PlanRejected
from breathcast.geometry import Grid, Volume, hu_to_unit, resample_volume
from breathcast.model_box import PlanCheck, model_box_volume, resample_onto
from breathcast.motion_prior import motion_prior
from breathcast.segmentation import SLIDING_Z_SIGMA_MM, sliding_weight
from breathcast.resize import FieldResizer, axis_weights, evaluate_polynomial, trilinear_corners, voxel_to_lps_matrix
from breathcast.state_model import DISTILLED_TERMS, StateModel, Terms, design_matrix, fit_state_model
from breathcast.traces import TraceConfig, synthetic_trace
from breathcast.warp import integrate_velocity
from breathcast.engine.ddim import ddim_sample
from breathcast.engine.package import ModelPackage, PackageError, TraceSpec, read_package
from breathcast.engine.runtimes import RuntimeConfig, open_graph

__all__ = [
    "PredictorPath",
    "WindowMode",
    "DistillationConfig",
    "PredictorConfig",
    "Plan",
    "Prediction",
    "Predictor",
    "Network",
    "CVAENetwork",
    "LDMNetwork",
    "load_predictor",
    "window_states",
    "design_states",
]

_RATE_SMOOTHING_S = 0.2  # as breathcast.traces.rate


class PredictorPath(str, Enum):
    DIRECT = "direct"
    DISTILLED = "distilled"
    LINEAR5D = "linear5d"


class WindowMode(str, Enum):
    WINDOW = "window"
    SNAPSHOT = "snapshot"


@dataclass(frozen=True)
class DistillationConfig:
    """The designed breathing states the network is queried at, and the fitted polynomial.

    Args:
        amplitudes: number of centre amplitudes A, evenly spaced over ``amplitude_range``.
        rates: number of rates Ȧ, evenly spaced over [-max_rate, max_rate] (1/s).
        amplitude_range: (low, high) of A; also the range every query's per-slice trace must stay in,
            widened by ``margin``.
        max_rate: largest |Ȧ|, 1/s.
        margin: how far outside ``amplitude_range`` a ramp may go.
        terms: the polynomial's (amplitude, rate) exponents.
        batch: queries per run of the network's graphs. 1 loads fastest on 2 CPU cores with onnxruntime (a 64³
            plan: cVAE 4.9 s at 1, 6.2 s at 8; LDM 8.3 s at 1, 11.1 s at 8), whose convolutions gain nothing per
            query from a batch there.
        breathing_windows: realistic windows (synthetic traces of varied simulated patients) queried besides
            the ramps, so the fit also sees curved per-slice traces as real windows have them.
        validation_windows: realistic windows (another synthetic breathing trace) on which the fit is compared
            with the network at plan load.
    """

    amplitudes: int = 11
    rates: int = 9
    amplitude_range: tuple[float, float] = (-0.2, 1.3)
    max_rate: float = 1.2
    margin: float = 0.1
    terms: Terms = DISTILLED_TERMS
    batch: int = 1
    breathing_windows: int = 64
    validation_windows: int = 4


@dataclass(frozen=True)
class PredictorConfig:
    """How to predict.

    Args:
        path: ``direct``, ``distilled`` or ``linear5d`` (:class:`PredictorPath`).
        mode: ``window`` or ``snapshot`` (:class:`WindowMode`).
        runtime: which runtime runs the graphs and with how many threads.
        distillation: the distilled path's design.
        sampling_steps: DDIM steps of an ``ldm`` package; None takes the package's ``sampling_steps``.
        sliding_mask: with a lung-centred package, multiply the network's displacement by the plan's sliding
            weight (:func:`breathcast.segmentation.sliding_weight`: 1 in the cavity that moves, 0 in the chest
            wall, ribs, spine and outside the body, a 4 mm step between, smoothed along z by
            :data:`~breathcast.segmentation.SLIDING_Z_SIGMA_MM`). The network's velocity lives on a half-resolution grid (12.5 mm voxels at
            64³) that cannot hold the shear at the pleura by itself.
    """

    path: PredictorPath | str = PredictorPath.DIRECT
    mode: WindowMode | str = WindowMode.WINDOW
    runtime: RuntimeConfig = RuntimeConfig()
    distillation: DistillationConfig = DistillationConfig()
    sampling_steps: int | None = None
    sliding_mask: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("path", PredictorPath), ("mode", WindowMode)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                valid = ", ".join(v.value for v in kind)
                raise BreathcastError(f"predictor {name} must be one of {valid}, got {value!r}") from None
        if self.sampling_steps is not None and (isinstance(self.sampling_steps, bool) or int(self.sampling_steps) != self.sampling_steps or self.sampling_steps < 1):
            raise BreathcastError(f"sampling_steps must be a positive whole number or None, got {self.sampling_steps!r}")


@dataclass(frozen=True)
class Plan:
    """A planning CT, the breathing trace recorded with it, and the target.

    Args:
        volume: planning CT, HU, any grid (it is resampled to the model grid over its field of view).
        amplitude: (Z,) per-slice amplitude of the planning CT (its own slices, Z = volume.shape[0]).
        target_lps_mm: (P, 3) target points in the planning CT, mm LPS (e.g. a tumour centroid); may be empty.
        frame_of_reference_uid: the CT's Frame of Reference (published with every field).
        name: shown in status messages.
    """

    volume: Volume
    amplitude: np.ndarray
    target_lps_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    frame_of_reference_uid: str = ""
    name: str = "plan"

    def __post_init__(self) -> None:
        amplitude = np.asarray(self.amplitude, dtype=np.float64)
        if amplitude.shape != (self.volume.shape[0],) or not np.all(np.isfinite(amplitude)):
            raise BreathcastError(f"planning trace must be {self.volume.shape[0]} finite amplitudes (one per CT slice), got shape {amplitude.shape}")
        object.__setattr__(self, "amplitude", amplitude)
        target = np.asarray(self.target_lps_mm, dtype=np.float64).reshape(-1, 3)
        if not np.all(np.isfinite(target)):
            raise BreathcastError("target points must be finite mm LPS positions")
        object.__setattr__(self, "target_lps_mm", target)


@dataclass(frozen=True)
class Prediction:
    """One frame's result.

    Args:
        displacement: (3, D, D, D) float32, model-grid voxels (dz, dy, dx), pull-back from the planning CT.
        amplitude, rate: (D,) per-slice state the field was made for (dimensionless, 1/s).
        target_lps_mm: (P, 3) target points now, mm LPS.
        target_displacement_mm: (P, 3) their motion from the planning CT, mm LPS.
        compute_s: seconds from window to displacement and target.
    """

    displacement: np.ndarray
    amplitude: np.ndarray
    rate: np.ndarray
    target_lps_mm: np.ndarray
    target_displacement_mm: np.ndarray
    compute_s: float


@lru_cache(maxsize=16)
def _window_operators(window_samples: int, sample_interval_s: float, slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice amplitude and rate are linear in the window: ((D, W) amplitude, (D, W) rate, (W,) newest rate)
    operators, built once per time base from the Savitzky-Golay filter applied to the unit windows."""
    length = max(5, int(round(_RATE_SMOOTHING_S / sample_interval_s)) | 1)
    longest_odd = window_samples if window_samples % 2 else window_samples - 1
    rate = savgol_filter(np.eye(window_samples), min(length, longest_odd), 2, deriv=1, delta=sample_interval_s, axis=0)
    positions = np.linspace(0.0, window_samples - 1, slices)
    lo = np.minimum(np.floor(positions).astype(int), window_samples - 2)
    w = positions - lo
    interpolate = np.zeros((slices, window_samples))
    interpolate[np.arange(slices), lo] = 1.0 - w
    interpolate[np.arange(slices), lo + 1] += w
    return interpolate, interpolate @ rate, rate[-1].copy()


def window_states(window: np.ndarray, trace: TraceSpec, slices: int, mode: WindowMode | str = WindowMode.WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice amplitude and rate from a window.

    Args:
        window: (W,) amplitude samples on the model's time base (``trace.sample_interval_s``), oldest first.
        trace: the model's trace spec (W = ``trace.window_samples``).
        slices: D, the model grid's slice count.
        mode: ``window`` (slice z at window position z (W-1)/(D-1), linearly interpolated) or ``snapshot``
            (every slice at the newest sample).

    Returns:
        ((D,) amplitude, (D,) rate in 1/s: a quadratic Savitzky-Golay derivative over 0.2 s), float64.
    """
    window = np.asarray(window, dtype=np.float64)
    if window.shape != (trace.window_samples,):
        raise BreathcastError(f"window must hold {trace.window_samples} samples, got shape {window.shape}")
    if not np.all(np.isfinite(window)):
        raise BreathcastError("window holds NaN or Inf")
    interpolate, rate, newest_rate = _window_operators(trace.window_samples, trace.sample_interval_s, slices)
    if WindowMode(mode) is WindowMode.SNAPSHOT:
        return np.full(slices, window[-1]), np.full(slices, float(newest_rate @ window))
    return interpolate @ window, rate @ window


def design_states(trace: TraceSpec, slices: int, config: DistillationConfig = DistillationConfig()) -> tuple[np.ndarray, np.ndarray]:
    """The distillation queries: ramps ``b_f[z] = A + Ȧ (t_z - t_c)`` that stay in the amplitude range.

    Returns:
        ((Q, D) per-slice amplitude, (Q, D) per-slice rate 1/s).
    """
    t = np.linspace(0.0, trace.window_duration_s, slices)
    t -= t.mean()
    low, high = config.amplitude_range
    amplitudes, rates = [], []
    for a in np.linspace(low, high, config.amplitudes):
        for r in np.linspace(-config.max_rate, config.max_rate, config.rates):
            ramp = a + r * t
            if ramp.min() >= low - config.margin and ramp.max() <= high + config.margin:
                amplitudes.append(ramp)
                rates.append(np.full(slices, r))
    return np.array(amplitudes), np.array(rates)


def _resample_slices(values: np.ndarray, slices: int) -> np.ndarray:
    """(Z,) per-slice values -> (slices,) over the same extent (slice centres, like the volume resampling)."""
    lo, hi, w = axis_weights(values.shape[0], slices)
    return values[lo] * (1 - w) + values[hi] * w


def _sample_field(u: np.ndarray, points_zyx: np.ndarray) -> np.ndarray:
    """Trilinear samples (P, 3) of a (3, Z, Y, X) field at (P, 3) index positions, clamped at the borders."""
    out = np.zeros((len(points_zyx), 3))
    for idx, weight in trilinear_corners(points_zyx, u.shape[1:]):
        out += weight[:, None] * u[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    return out


class Network(Protocol):
    """A package's network with a plan prepared: a batch of per-slice traces -> displacements.

    Made once per plan (what depends only on the planning CT and its trace runs then); ``displacements`` runs
    per query.
    """

    def displacements(self, b_f: np.ndarray) -> np.ndarray:
        """(N, D) float32 per-slice traces b_f -> (N, 3, D, D, D) float32 model-grid voxels (dz, dy, dx), pull-back."""
        ...


class _Integrator:
    """Velocities at half resolution -> displacements on the model grid: scaling and squaring (numba), then a
    resize that also turns half-grid voxels into model-grid voxels."""

    def __init__(self, shape: tuple[int, int, int], steps: int) -> None:
        self.steps = int(steps)
        self._upsample = FieldResizer(tuple(n // 2 for n in shape), shape)

    def __call__(self, velocity: np.ndarray) -> np.ndarray:
        return np.stack([self._upsample(integrate_velocity(v, self.steps)) for v in velocity])


def _plan_motion_prior(model_volume: Volume, package: ModelPackage) -> np.ndarray:
    """(1, 3, D/2, D/2, D/2) the plan's motion prior on the model grid, of the version the package's model was
    trained with (:attr:`~breathcast.engine.package.ModelPackage.prior_version`); a plan without one is refused."""
    try:
        return motion_prior(model_volume, version=package.prior_version)[None]
    except BreathcastError as error:
        raise PlanRejected(f"plan rejected: no motion prior on the model grid: {error}") from None


class CVAENetwork:
    """A ``cvae`` package: the ``plan`` graph once per plan, the ``frame`` graph per batch (z = 0: the mean).

    The plan graph gets the plan (HU, on the model grid) in [0, 1] and, for a package whose model takes one, the
    plan's motion prior (:func:`~breathcast.motion_prior.motion_prior`); a plan without one is refused.
    """

    def __init__(self, package: ModelPackage, model_volume: Volume, b_m: np.ndarray, config: PredictorConfig) -> None:
        manifest = package.manifest
        plan = open_graph(package, "plan", config.runtime)
        feed = {"moving": hu_to_unit(model_volume.array)[None, None].astype(np.float32), "b_m": b_m[None]}
        if manifest.model.get("prior_channels"):
            feed["prior"] = _plan_motion_prior(model_volume, package)
        outputs = plan.run(feed)
        self._plan_tensors = dict(zip((spec.name for spec in manifest.graphs["plan"].outputs), outputs))
        self._b_m = b_m[None]
        self._frame = open_graph(package, "frame", config.runtime)
        self._latent_dim = int(manifest.model["latent_dim"])
        self._integrate = _Integrator(tuple(manifest.grid), manifest.model["integration_steps"])

    def displacements(self, b_f: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        z = np.zeros((b_f.shape[0], self._latent_dim), np.float32) if z is None else np.ascontiguousarray(z, dtype=np.float32)
        (velocity,) = self._frame.run(self._plan_tensors | {"b_m": self._b_m, "b_f": b_f, "z": z})
        return self._integrate(velocity)


class LDMNetwork:
    """An ``ldm`` package: ``encode`` once per plan; per batch a DDIM loop (numpy, :mod:`breathcast.engine.ddim`)
    around batched ``denoise`` runs from the package's fixed noise (so a query's field does not depend on the
    batch it is in, nor on the run), then ``decode`` and integration.

    ``config.sampling_steps`` DDIM steps (default: the manifest's ``sampling_steps``). A package whose model takes
    a motion prior gets the plan's, as :class:`CVAENetwork` does, and ``decode`` the traces too.
    """

    def __init__(self, package: ModelPackage, model_volume: Volume, b_m: np.ndarray, config: PredictorConfig) -> None:
        manifest = package.manifest
        model = manifest.model
        ddim = model["ddim"]
        self.steps = int(config.sampling_steps or model["sampling_steps"])
        if not 1 <= self.steps <= int(ddim["train_timesteps"]):
            raise BreathcastError(f"sampling steps must be 1..{ddim['train_timesteps']}, got {self.steps}")
        self._alphas_cumprod = np.asarray(ddim["alphas_cumprod"], dtype=np.float32)
        self._final_alpha_cumprod = float(ddim.get("final_alpha_cumprod", 1.0))
        self._moving = hu_to_unit(model_volume.array)[None, None].astype(np.float32)
        encode = open_graph(package, "encode", config.runtime)
        (self._condition,) = encode.run({"moving": self._moving, "b_m": b_m[None]})
        self._plan = {"condition": self._condition, "moving": self._moving}
        if model["ldm"].get("prior_channels"):
            self._plan |= {"prior": _plan_motion_prior(model_volume, package), "b_m": b_m[None]}
        self._noise = np.ascontiguousarray(np.load(package.file("noise.npy")), dtype=np.float32)
        if self._noise.shape != (1, *model["latent_shape"]):
            raise PackageError(f"{package.path}: noise.npy has shape {self._noise.shape}, the latent {model['latent_shape']}")
        self._denoise = open_graph(package, "denoise", config.runtime)
        self._decode = open_graph(package, "decode", config.runtime)
        self._integrate = _Integrator(tuple(manifest.grid), model["integration_steps"])

    def denoise(self, x_t: np.ndarray, t: np.ndarray, b_f: np.ndarray) -> np.ndarray:
        """One ``denoise`` run: (N, C, L, L, L) noisy latents at timesteps t (N,) int64, b_f (N, D) -> x0."""
        return self._denoise.run({"x_t": x_t, "condition": self._condition, "t": t, "b_f": b_f})[0]

    @property
    def noise(self) -> np.ndarray:
        """(1, C, L, L, L) the package's DDIM start."""
        return self._noise

    def latents(self, b_f: np.ndarray) -> np.ndarray:
        """(N, D) b_f -> (N, C, L, L, L) the sampled clean latents."""
        noise = np.repeat(self._noise, b_f.shape[0], axis=0)
        return ddim_sample(lambda x, t: self.denoise(x, t, b_f), noise, self._alphas_cumprod, self.steps, self._final_alpha_cumprod)

    def displacements(self, b_f: np.ndarray) -> np.ndarray:
        (velocity,) = self._decode.run(self._plan | {"x0": self.latents(b_f), "b_f": b_f})
        return self._integrate(velocity)


_NETWORKS: dict[str, type] = {"cvae": CVAENetwork, "ldm": LDMNetwork}


def _check_fitted_box(grid: Grid, fitted: dict) -> None:
    """Refuse a plan whose lung-centred box is not the box a per-patient 5D model was fitted in (another CT,
    or the same patient in another Frame of Reference): its coefficients would move the wrong voxels."""
    origin = np.asarray(fitted.get("origin", grid.origin), dtype=np.float64)
    offset = float(np.max(np.abs(origin - np.asarray(grid.origin)) / np.asarray(grid.spacing)))
    frame = fitted.get("frame_of_reference_uid", "")
    if offset > 0.5 or (frame and grid.frame_of_reference_uid and frame != grid.frame_of_reference_uid):
        raise PlanRejected(
            f"plan rejected: this 5D model was fitted in a box at {np.round(origin, 1).tolist()} mm (Frame of Reference "
            f"{frame or '?'}); the plan's lungs put it at {np.round(grid.origin, 1).tolist()} mm ({offset:.1f} voxels away, "
            f"Frame of Reference {grid.frame_of_reference_uid or '?'}): serve it with the CT it was fitted on"
        )


class Predictor:
    """A loaded package and plan; :meth:`predict` turns a window into a :class:`Prediction`.

    Use :func:`load_predictor` to make one.
    """

    def __init__(self, package: ModelPackage, plan: Plan, config: PredictorConfig) -> None:
        started = time.perf_counter()
        self.package, self.plan, self.config = package, plan, config
        manifest = package.manifest
        self.trace: TraceSpec = manifest.trace
        self.mode = config.mode
        shape = tuple(manifest.grid)
        if config.path is PredictorPath.LINEAR5D:
            if manifest.kind != "linear5d":
                raise PackageError(f"{package.path}: the linear5d path needs a linear5d package, got {manifest.kind!r}")
            if manifest.model_box.get("anchor") != "lungs" and plan.volume.shape != shape:
                raise PackageError(f"{package.path}: a 5D model fitted on {shape} cannot serve a plan on {plan.volume.shape}")
        elif manifest.kind not in _NETWORKS:
            kinds = " or an ".join(f"{k} package" for k in _NETWORKS)  # "a cvae package or an ldm package"
            raise PackageError(f"{package.path}: the {config.path.value} path needs a {kinds}, got {manifest.kind!r}")
        try:  # the model sees the plan in the canonical frame; an oblique plan is one it does not know
            canonical_plan, self.frame = to_canonical(plan.volume)
        except BreathcastError as error:
            raise PlanRejected(f"plan rejected: {error}") from None
        if self.frame.axes[0] != 0:
            raise PlanRejected("plan rejected: the planning CT's slices are not axial; its per-slice trace cannot be placed along z")
        plan_amplitude = plan.amplitude[::-1] if self.frame.flips[0] else plan.amplitude
        self.slices = shape[0]
        self.plan_check: PlanCheck | None = None  # what the plan check found (lung-centred packages)
        self._motion_weight: np.ndarray | None = None  # (1, D, D, D): the sliding mask, when the config asks
        box = manifest.model_box
        if box.get("anchor") == "lungs":  # a box of fixed size in mm centred on the plan's lungs
            model_volume, check = model_box_volume(canonical_plan, shape, tuple(box["extent_mm"]))
            self.plan_check = check
            if config.sliding_mask:
                weight = Volume(sliding_weight(check.segmentation, z_sigma_mm=SLIDING_Z_SIGMA_MM), check.segmentation.grid)
                # Past the plan's slices the cavity continues (its nearest face), as the prior's does past a cut:
                # a mask that stopped there would fold the motion the network continues.
                self._motion_weight = resample_onto(weight, model_volume.grid, fill=None).array[None]
            plan_z = canonical_plan.grid.origin[2] + canonical_plan.grid.spacing[2] * np.arange(canonical_plan.shape[0])
            box_z = model_volume.grid.origin[2] + model_volume.grid.spacing[2] * np.arange(self.slices)
            self.b_m = np.interp(box_z, plan_z, plan_amplitude).astype(np.float32)  # held beyond the plan's slices
        else:  # packages from before the box: the plan's own field of view
            model_volume = canonical_plan if canonical_plan.shape == shape else resample_volume(canonical_plan, shape)
            self.b_m = _resample_slices(plan_amplitude, self.slices).astype(np.float32)
        self.grid: Grid = model_volume.grid
        if config.path is PredictorPath.LINEAR5D and box.get("anchor") == "lungs":
            _check_fitted_box(self.grid, manifest.model.get("grid") or {})
        self._to_lps = voxel_to_lps_matrix(self.grid)
        self._target_index = self.grid.lps_to_index(plan.target_lps_mm) if len(plan.target_lps_mm) else np.zeros((0, 3))
        self.distillation_error_mm: dict[str, float] = {}
        self._coefficients: np.ndarray | None = None
        self._terms: Terms = ()
        self.network: Network | None = None
        if manifest.kind in _NETWORKS:
            self.network = _NETWORKS[manifest.kind](package, model_volume, self.b_m, config)
        if config.path is PredictorPath.DISTILLED:
            self._distil(model_volume)
        elif config.path is PredictorPath.LINEAR5D:
            self._coefficients = np.ascontiguousarray(np.load(package.file("coefficients.npy")), dtype=np.float32)
            self._terms = tuple(tuple(t) for t in manifest.model["terms"])
        self._unmasked = bool(manifest.model.get("sliding_mask")) and self._motion_weight is None
        self.load_s = time.perf_counter() - started

    @property
    def plan_warnings(self) -> tuple[str, ...]:
        """One line each: what about the plan lies at the edge of what the model knows, or how it is served
        unlike it was trained (empty: nothing)."""
        unmasked = ("served without the sliding mask the model was trained through: its motion outside the lungs is "
                    "not a prediction",) if self._unmasked else ()
        return (self.plan_check.warnings if self.plan_check else ()) + unmasked

    # -- the network ------------------------------------------------------------------------------------

    def network_displacements(self, b_f: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """The direct path for a batch: (N, D) per-slice traces -> (N, 3, D, D, D) float32 model-grid voxels.

        ``z``: (N, latent_dim) cVAE latent samples (default 0, the mean); an LDM package takes none.
        """
        if self.network is None:
            raise BreathcastError(f"a {self.package.manifest.kind} package has no network to query")
        b_f = np.ascontiguousarray(b_f, dtype=np.float32).reshape(-1, self.slices)
        if z is not None:
            if not isinstance(self.network, CVAENetwork):
                raise BreathcastError("only a cvae package takes latent samples z")
            u = self.network.displacements(b_f, z)
        else:
            u = self.network.displacements(b_f)
        if self._motion_weight is not None:
            u *= self._motion_weight[None]
        return u

    # -- distillation -----------------------------------------------------------------------------------

    def _distil(self, model_volume: Volume) -> None:
        cfg = self.config.distillation
        amplitude, rate = design_states(self.trace, self.slices, cfg)
        if cfg.breathing_windows:
            from breathcast.calibration.quantization_data import representative_windows

            windows = representative_windows(cfg.breathing_windows, self.trace.window_samples, self.trace.sample_interval_s, seed=1)
            states = [window_states(w, self.trace, self.slices, WindowMode.WINDOW) for w in windows]
            amplitude = np.concatenate([amplitude, [a for a, _ in states]])
            rate = np.concatenate([rate, [r for _, r in states]])
        fields = np.concatenate([self.network_displacements(amplitude[i : i + cfg.batch]) for i in range(0, len(amplitude), cfg.batch)])
        model = fit_state_model(fields, amplitude, rate, cfg.terms)
        self._coefficients, self._terms = model.coefficients, model.terms
        self.distillation_error_mm = self._distillation_error(model_volume, cfg.validation_windows)

    def _distillation_error(self, model_volume: Volume, count: int) -> dict[str, float]:
        """Distilled vs direct on ``count`` windows of a synthetic breathing trace, inside the body (> -500 HU)."""
        if count < 1:
            return {}
        trace = synthetic_trace(TraceConfig(duration_s=60.0), seed=0)
        span = self.trace.window_duration_s
        ends = np.linspace(span + 5.0, trace.duration_s - 1.0, count)
        body = model_volume.array > -500.0
        spacing = np.asarray(self.grid.spacing_zyx, dtype=np.float32)[:, None]
        errors = []
        for end in ends:
            times = end - span + np.arange(self.trace.window_samples) * self.trace.sample_interval_s
            window = trace.amplitude_at(times)
            a, r = window_states(window, self.trace, self.slices, WindowMode.WINDOW)
            direct = self.network_displacements(a[None])[0]
            distilled = self._evaluate(a, r)
            errors.append(np.linalg.norm((direct - distilled)[:, body] * spacing, axis=0))
        e = np.concatenate(errors)
        return {"mean": float(e.mean()), "p99": float(np.percentile(e, 99)), "max": float(e.max()), "windows": count}

    def _evaluate(self, a: np.ndarray, r: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        basis = design_matrix(a, r, self._terms).astype(np.float32)
        return evaluate_polynomial(self._coefficients, basis, out)

    @property
    def state_model(self) -> StateModel | None:
        """The per-voxel polynomial of the distilled and linear5d paths (None on the direct path)."""
        if self._coefficients is None:
            return None
        return StateModel(self._coefficients, self._terms)

    def state_displacement(self, a: np.ndarray, r: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(3, D, D, D) float32 model-grid voxels for a per-slice state (a (D,), r (D,) 1/s), polynomial paths only."""
        if self._coefficients is None:
            raise BreathcastError("the direct path has no state model; use predict(window)")
        u = self._evaluate(a, r, out)
        if not np.all(np.isfinite(u)):
            raise BreathcastError("the model produced a non-finite displacement")
        return u

    @property
    def target_index(self) -> np.ndarray:
        """(P, 3) the plan's target points as (z, y, x) indices of the model grid."""
        return self._target_index

    # -- per frame --------------------------------------------------------------------------------------

    def predict(self, window: np.ndarray) -> Prediction:
        """One frame: (W,) amplitude window on the model's time base -> :class:`Prediction`."""
        started = time.perf_counter()
        a, r = window_states(window, self.trace, self.slices, self.mode)
        if self.config.path is PredictorPath.DIRECT:
            u = self.network_displacements(a[None])[0]
        else:
            u = self._evaluate(a, r)
        if not np.all(np.isfinite(u)):
            raise BreathcastError("the model produced a non-finite displacement")
        now, moved = self.target_positions(u)
        return Prediction(u, a, r, now, moved, time.perf_counter() - started)

    def target_positions(self, u: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Where the plan's target points are under ``u``: solve x + u(x) = p (the field pulls back).

        Returns:
            ((P, 3) positions now, (P, 3) displacement from the plan), mm LPS.
        """
        p = self._target_index
        if len(p) == 0:
            return np.zeros((0, 3)), np.zeros((0, 3))
        x = p.copy()
        for _ in range(iterations):
            x_new = p - _sample_field(u, x)
            converged = np.abs(x_new - x).max() < 1e-6
            x = x_new
            if converged:
                break
        now = self.grid.index_to_lps(x)
        return now, now - self.plan.target_lps_mm

    def field_resizer(self, shape: tuple[int, int, int] | None = None, dtype: type = np.float32) -> tuple[FieldResizer, Grid]:
        """A resizer from the model grid to ``shape`` over the plan's field of view, writing mm LPS (x, y, z),
        and the output grid."""
        shape = tuple(shape or self.grid.shape)
        return FieldResizer(self.grid.shape, shape, self._to_lps, dtype), self.grid.with_shape(shape)

    @property
    def model_id(self) -> str:
        return self.package.model_id


def load_predictor(package: ModelPackage | Path | str, plan: Plan, config: PredictorConfig = PredictorConfig()) -> Predictor:
    """Verify the package (if given as a path), prepare the plan, distil if asked; see the module docstring."""
    if not isinstance(package, ModelPackage):
        package = read_package(Path(package))
    return Predictor(package, plan, config)
