"""A population model of real lung motion, fitted to landmark pairs: what a patient-agnostic model can predict.

The displacement of a point between two breathing states, per mm of the patient's mean superior-inferior motion,
as a quadratic function of its normalised position in the lungs (height, front-back, distance from the midline)
with right-lung terms, fitted by least squares to several patients' landmark pairs (DIR-Lab's 10 cases).
Positions are normalised as in :mod:`breathcast.sim.motion_statistics`: by the 1st and 99th percentiles of the
sample's own points (:func:`~breathcast.sim.motion_statistics.point_extent_mm`), so landmarks without images are
placed in their lungs by where they are.

It is a reference, not a predictor the engine serves: given a patient's mean motion it says how well the average
pattern of real lungs places that patient's landmarks, i.e. how much of a landmark error no anatomy-blind model
removes (``benchmarks/bench_real.py``, "population reference"). :func:`leave_one_out_tre` gives the same on the
fitting cases themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from breathcast.errors import BreathcastError
from breathcast.io.landmarks import LandmarkPairs
from breathcast.sim.motion_statistics import point_extent_mm

__all__ = ["TERMS", "LandmarkMotionModel", "fit_landmark_model", "leave_one_out_tre"]

TERMS = ("1", "h", "a", "l", "h^2", "a^2", "h a", "h l", "a l", "r", "r h", "r a")
"""The model's terms: h the normalised height (0 base, 1 apex), a the front-back position (0 front, 1 back), l the
distance from the midline (0 midline, 1 lateral), r 1 in the right lung (x below the lungs' middle: the patient's
right is LPS -x) and 0 in the left."""

def _design(points_mm: np.ndarray, extent_mm: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N, len(TERMS)) the terms at ``points_mm`` (N, 3) (x, y, z) mm, x left, y posterior, z superior, normalised by
    ``extent_mm`` (low, high corners, mm) or, when it is None, by the points' own 1st-99th percentiles."""
    q = np.asarray(points_mm, dtype=np.float64)
    low, high = extent_mm if extent_mm is not None else point_extent_mm(q)
    p = (q - np.asarray(low)) / np.maximum(np.asarray(high) - np.asarray(low), 1e-9)
    h, a = p[:, 2], p[:, 1]
    lateral = np.abs(p[:, 0] - 0.5) * 2.0
    right = (p[:, 0] < 0.5).astype(np.float64)
    return np.stack([np.ones_like(h), h, a, lateral, h * h, a * a, h * a, h * lateral, a * lateral, right, right * h, right * a], axis=1)


def _mean_si(displacement_mm: np.ndarray) -> float:
    si = float(np.abs(np.asarray(displacement_mm, dtype=np.float64)[:, 2]).mean())
    if si <= 0.0:
        raise BreathcastError("landmarks that do not move superior-inferior cannot scale a population motion model")
    return si


@dataclass(frozen=True)
class LandmarkMotionModel:
    """Displacement per mm of mean superior-inferior motion as a function of position in the lungs.

    Args:
        coefficients: (len(TERMS), 3) the weights of :data:`TERMS` for (dx, dy, dz).
        direction: ``"exhale->inhale"`` or ``"inhale->exhale"``: the points are the first state's positions.
        cases: how many patients it was fitted on.
    """

    coefficients: np.ndarray
    direction: str
    cases: int

    def predict(self, points_mm: np.ndarray, mean_si_mm: float, lungs_extent_mm: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(N, 3) mm: the displacement of ``points_mm`` (N, 3) for a patient whose mean |SI| motion is ``mean_si_mm``.

        ``lungs_extent_mm`` (low, high corners (x, y, z) mm) places the points in the lungs where a segmentation
        gives the lungs; without it the points' own 1st-99th percentiles do, as in the fit.
        """
        return mean_si_mm * (_design(points_mm, lungs_extent_mm) @ self.coefficients)


def _pairs(case: LandmarkPairs, direction: str) -> tuple[np.ndarray, np.ndarray]:
    if direction == "exhale->inhale":
        return case.exhale_mm, case.inhale_mm - case.exhale_mm
    if direction == "inhale->exhale":
        return case.inhale_mm, case.exhale_mm - case.inhale_mm
    raise BreathcastError(f"direction must be 'exhale->inhale' or 'inhale->exhale', not {direction!r}")


def fit_landmark_model(cases: list[LandmarkPairs], direction: str = "inhale->exhale") -> LandmarkMotionModel:
    """Least squares over every case's points, each case's displacements divided by its own mean |SI|.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> q = rng.uniform(0.0, 200.0, (300, 3))
        >>> d = np.zeros_like(q); d[:, 2] = 2.0 + 8.0 * (1.0 - (q[:, 2] - 2.0) / 196.0)  # falls from base to apex
        >>> model = fit_landmark_model([LandmarkPairs("toy", q, q + d)], "exhale->inhale")
        >>> bool(np.abs(model.predict(q, float(d[:, 2].mean())) - d).max() < 0.2)
        True
    """
    if not cases:
        raise BreathcastError("a population motion model needs at least one case of landmark pairs")
    designs, targets = [], []
    for case in cases:
        points, d = _pairs(case, direction)
        designs.append(_design(points))
        targets.append(d / _mean_si(d))
    x, y = np.concatenate(designs), np.concatenate(targets)
    coefficients = np.linalg.lstsq(x, y, rcond=None)[0]
    return LandmarkMotionModel(coefficients, direction, len(cases))


def leave_one_out_tre(cases: list[LandmarkPairs], direction: str = "inhale->exhale") -> list[float]:
    """Per case, the mean TRE (mm) of the model fitted on the other cases, given the case's own mean |SI| motion."""
    if len(cases) < 2:
        raise BreathcastError("leave-one-out needs at least two cases")
    errors = []
    for i, case in enumerate(cases):
        model = fit_landmark_model(cases[:i] + cases[i + 1:], direction)
        points, d = _pairs(case, direction)
        errors.append(float(np.linalg.norm(model.predict(points, _mean_si(d)) - d, axis=1).mean()))
    return errors
