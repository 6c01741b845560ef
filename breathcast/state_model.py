"""Per-voxel polynomial motion models in the breathing state: u(x) = sum_k c_k(x) * a^i_k * r^j_k.

The 5D motion model of Low et al. (u = alpha * A + beta * rate + offset) and the engine's distilled model
(a network queried over breathing states, then fitted per voxel) are the same object with different terms
and different fitting data, so both live here.

The state is per slice, as a helical scan records it: slice z of a field is at its own amplitude ``a[z]``
(dimensionless, DESIGN.md) and rate ``r[z]`` (1/s). Fields are (3, Z, Y, X) float32, voxels of the model
grid, components (dz, dy, dx), pull-back, as everywhere inside the code.

Example:
    >>> import numpy as np
    >>> terms = LINEAR_5D_TERMS
    >>> a = np.array([[0.0, 0.5], [1.0, 1.0], [0.2, 0.0]])  # 3 fields, 2 slices
    >>> r = np.array([[0.0, 0.1], [-0.5, 0.2], [0.3, 0.3]])
    >>> truth = np.arange(3 * 3 * 2 * 1 * 1, dtype=np.float32).reshape(3, 3, 2, 1, 1)  # (K, 3, Z, Y, X)
    >>> fields = np.stack([evaluate_terms(truth, terms, a[q], r[q]) for q in range(3)])
    >>> model = fit_state_model(fields, a, r, terms)
    >>> bool(np.allclose(model.coefficients, truth, atol=1e-4))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from breathcast.errors import BreathcastError

__all__ = [
    "LINEAR_5D_TERMS",
    "DISTILLED_TERMS",
    "StateModel",
    "design_matrix",
    "evaluate_terms",
    "fit_state_model",
]

Terms = tuple[tuple[int, int], ...]

LINEAR_5D_TERMS: Terms = ((0, 0), (1, 0), (0, 1))
"""offset + alpha * a + beta * r: the 5D model of Low et al."""

DISTILLED_TERMS: Terms = ((0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (0, 2))
"""Cubic in amplitude, quadratic in rate, with the amplitude-rate cross terms that hysteresis needs."""


def _check_terms(terms: Terms) -> Terms:
    terms = tuple((int(i), int(j)) for i, j in terms)
    if not terms or len(set(terms)) != len(terms) or any(i < 0 or j < 0 for i, j in terms):
        raise BreathcastError(f"terms must be distinct non-negative (amplitude, rate) exponent pairs, got {terms}")
    return terms


def design_matrix(a: np.ndarray, r: np.ndarray, terms: Terms) -> np.ndarray:
    """Basis values a^i * r^j for every state.

    Args:
        a: (...,) amplitude, dimensionless.
        r: (...,) rate, 1/s, same shape as ``a``.
        terms: (i, j) exponent pairs, K of them.

    Returns:
        (..., K) float64.
    """
    a = np.asarray(a, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if a.shape != r.shape:
        raise BreathcastError(f"amplitude and rate must have the same shape, got {a.shape} and {r.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(r))):
        raise BreathcastError("breathing state must be finite (got NaN or Inf in amplitude or rate)")
    return np.stack([a**i * r**j for i, j in _check_terms(terms)], axis=-1)


def evaluate_terms(coefficients: np.ndarray, terms: Terms, a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The field for a per-slice state.

    Args:
        coefficients: (K, 3, Z, Y, X) per-voxel coefficients, voxels.
        terms: K (i, j) exponent pairs.
        a: (Z,) amplitude per slice (or a scalar for every slice).
        r: (Z,) rate per slice, 1/s (or a scalar).

    Returns:
        (3, Z, Y, X) float32 displacement, voxels.
    """
    k, _, z = coefficients.shape[:3]
    a = np.broadcast_to(np.asarray(a, dtype=np.float64), (z,))
    r = np.broadcast_to(np.asarray(r, dtype=np.float64), (z,))
    basis = design_matrix(a, r, terms).astype(np.float32)  # (Z, K)
    if basis.shape[1] != k:
        raise BreathcastError(f"{k} coefficient fields for {basis.shape[1]} terms")
    return np.einsum("zk,kczyx->czyx", basis, coefficients, optimize=True)


@dataclass(frozen=True)
class StateModel:
    """A fitted per-voxel polynomial model of displacement in the per-slice breathing state.

    Args:
        coefficients: (K, 3, Z, Y, X) float32, voxels of the grid the fields were on.
        terms: K (i, j) exponent pairs: term k is a^i * r^j.
        residual_rms: root-mean-square fit residual over the fitting fields, voxels.
    """

    coefficients: np.ndarray
    terms: Terms
    residual_rms: float = 0.0

    def __post_init__(self) -> None:
        terms = _check_terms(self.terms)
        object.__setattr__(self, "terms", terms)
        c = np.asarray(self.coefficients, dtype=np.float32)
        if c.ndim != 5 or c.shape[0] != len(terms) or c.shape[1] != 3:
            raise BreathcastError(f"coefficients must have shape ({len(terms)}, 3, Z, Y, X), got {c.shape}")
        object.__setattr__(self, "coefficients", c)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) of the fields it makes."""
        return tuple(self.coefficients.shape[2:])

    def displacement(self, a: np.ndarray | float, r: np.ndarray | float) -> np.ndarray:
        """(3, Z, Y, X) float32 displacement, voxels, for per-slice amplitude ``a`` and rate ``r`` (1/s), (Z,) or scalars."""
        return evaluate_terms(self.coefficients, self.terms, a, r)


def fit_state_model(fields: np.ndarray, a: np.ndarray, r: np.ndarray, terms: Terms) -> StateModel:
    """Least squares per voxel: each slice uses its own state, as the 5D model does.

    Args:
        fields: (Q, 3, Z, Y, X) displacement fields, voxels (e.g. Q scans of a patient, or Q network queries).
        a: (Q, Z) amplitude of each slice of each field.
        r: (Q, Z) rate of each slice of each field, 1/s.
        terms: K (i, j) exponent pairs; Q must be at least K and the states must span the terms.

    Returns:
        The fitted :class:`StateModel` (coefficients float32, residual RMS in voxels).
    """
    fields = np.asarray(fields, dtype=np.float32)
    terms = _check_terms(terms)
    if fields.ndim != 5 or fields.shape[1] != 3:
        raise BreathcastError(f"fields must have shape (Q, 3, Z, Y, X), got {fields.shape}")
    q, _, z = fields.shape[:3]
    a, r = np.asarray(a, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if a.shape != (q, z) or r.shape != (q, z):
        raise BreathcastError(f"amplitude and rate must have shape ({q}, {z}), got {a.shape} and {r.shape}")
    if q < len(terms):
        raise BreathcastError(f"{len(terms)} terms need at least {len(terms)} fields, got {q}")
    basis = design_matrix(a, r, terms)  # (Q, Z, K)
    coefficients = np.empty((len(terms), 3, *fields.shape[2:]), dtype=np.float32)
    squared_error = 0.0
    for s in range(z):
        x = basis[:, s, :]
        # Scale columns so that a^3 and r^2 do not make the system badly conditioned.
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        if np.linalg.matrix_rank(x / scale) < len(terms):
            raise BreathcastError(f"the breathing states at slice {s} do not span the {len(terms)} terms")
        y = fields[:, :, s].reshape(q, -1).astype(np.float64)
        solution, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        solution /= scale[:, None]
        coefficients[:, :, s] = solution.reshape(len(terms), 3, *fields.shape[3:])
        squared_error += float(np.sum((x @ solution - y) ** 2))
    return StateModel(coefficients, terms, residual_rms=float(np.sqrt(squared_error / fields.size)))
