"""Fields without bytes: the distilled / 5D polynomial published once per plan, the state per frame (issue 17).

The distilled and linear5d predictors make every field from a per-voxel polynomial in the per-slice breathing state
(:mod:`breathcast.state_model`). A client that holds the polynomial needs only the state of each frame (2 x D numbers)
to make the field itself, on any grid, or at a few points. docs/protocol.md section 4.5 is the contract; this module
is its implementation, used by the daemon (to make the published field from the very same coefficients, so that the
two agree) and by clients (:class:`FieldModel`).

The evaluation, exactly (docs/protocol.md 4.5):

1. ``basis[z, k] = a[z] ** i_k * r[z] ** j_k`` in float64 (``0 ** 0 = 1``), then rounded to float32;
2. ``u[c, z, y, x] = sum_k basis[z, k] * C[k, c, z, y, x]`` in float32: the field on the model grid, mm along
   patient LPS (component 0 = x, 1 = y, 2 = z);
3. the published field is ``u`` resampled to the field grid (same field of view) by separable linear interpolation
   between voxel centres: output index ``d`` of ``n_dst`` samples source position
   ``s = max((d + 0.5) * n_src / n_dst - 0.5, 0)``, ``lo = min(floor(s), n_src - 1)``, ``hi = min(lo + 1, n_src - 1)``,
   ``value = v[lo] + (s - lo) * (v[hi] - v[lo])``, along x, then z, then y; rounded to the field's dtype at the end.

Example:
    >>> import numpy as np
    >>> from breathcast.geometry import Grid
    >>> grid = Grid.centered((2, 2, 2), (20.0, 20.0, 20.0))
    >>> c = np.zeros((2, 3, 2, 2, 2), np.float32); c[1, 2] = 4.0     # u_z = 4 mm * amplitude
    >>> model = FieldModel(c, ((0, 0), (1, 0)), grid)
    >>> float(model.field(np.full(2, 0.5), np.zeros(2))[2, 0, 0, 0])
    2.0
    >>> model.field(np.full(2, 0.5), np.zeros(2), shape=(4, 4, 4)).shape
    (3, 4, 4, 4)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from numba import njit, prange

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid
from breathcast.resize import axis_weights, load_float32, store_as, trilinear_corners, voxel_to_lps_matrix

__all__ = ["FieldModel", "state_basis", "reference_field", "field_model_from_predictor", "COEFFICIENT_DTYPES"]

COEFFICIENT_DTYPES = ("float32", "float16")
"""How the daemon may hold and ship the coefficients (``field.coefficients_dtype``)."""

_KERNEL = dict(parallel=True, cache=True, fastmath=True, error_model="numpy", nogil=True)


@njit(**_KERNEL)
def _polynomial_x(coefficients, live, basis, xlo, xhi, xw, out):
    """(K, 3, Z, Y, X) coefficients at (Z, K) basis -> (3, Z, Y, Xd): each row of the polynomial is made once and
    resampled along x while it is in cache (the model-grid field is never written). Rows whose coefficients are
    all zero (``live[c, z, y]`` 0: outside what moves, e.g. beyond a sliding mask) are not read."""
    k_terms, _, nz, ny, nx = coefficients.shape
    nxd = out.shape[3]
    for k in prange(3 * nz):
        c, z = k // nz, k % nz
        row = np.empty(nx, np.float32)
        for y in range(ny):
            if not live[c, z, y]:
                dst = out[c, z, y]
                for x in range(nxd):
                    dst[x] = 0.0
                continue
            b0 = basis[z, 0]
            src = coefficients[0, c, z, y]
            for x in range(nx):
                row[x] = b0 * load_float32(src[x])
            for t in range(1, k_terms):
                bt = basis[z, t]
                src = coefficients[t, c, z, y]
                for x in range(nx):
                    row[x] += bt * load_float32(src[x])
            dst = out[c, z, y]
            for x in range(nxd):
                v = row[xlo[x]]
                dst[x] = v + xw[x] * (row[xhi[x]] - v)


@njit(**_KERNEL)
def _resize_zy(src, zlo, zhi, zw, ylo, yhi, yw, write, out):
    """(3, Zs, Ys, X) float32 -> (3, Zd, Yd, X): per output slice two source slices blended along z once, then
    each output row blends two of those rows along y and is written in the output dtype; rows with
    ``write[c, z, y]`` 0 are left as they are (the caller knows they hold zeros already)."""
    _, _, nys, nx = src.shape
    _, nzd, nyd, _ = out.shape
    for k in prange(3 * nzd):
        c, z = k // nzd, k % nzd
        s0, s1, wz = src[c, zlo[z]], src[c, zhi[z]], zw[z]
        blended = np.empty((nys, nx), np.float32)
        for y in range(nys):
            for x in range(nx):
                blended[y, x] = s0[y, x] + wz * (s1[y, x] - s0[y, x])
        for y in range(nyd):
            if not write[c, z, y]:
                continue
            r0, r1, wy = blended[ylo[y]], blended[yhi[y]], yw[y]
            dst = out[c, z, y]
            for x in range(nx):
                dst[x] = store_as(r0[x] + wy * (r1[x] - r0[x]), dst)


def state_basis(a: np.ndarray, r: np.ndarray, terms: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(Z, K) float32 basis ``a[z] ** i * r[z] ** j`` (computed in float64, then rounded), as the doc's step 1.

    Args:
        a: (Z,) per-slice amplitude, dimensionless.
        r: (Z,) per-slice rate, 1/s.
        terms: K (i, j) exponent pairs.
    """
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    if a.shape != r.shape or a.ndim != 1:
        raise BreathcastError(f"state must be two (Z,) arrays, got {a.shape} and {r.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(r))):
        raise BreathcastError("breathing state must be finite (got NaN or Inf in amplitude or rate)")
    return np.stack([a**i * r**j for i, j in terms], axis=-1).astype(np.float32)


class FieldModel:
    """A per-voxel polynomial field in the per-slice state: coefficients in mm LPS on the model grid.

    Args:
        coefficients: (K, 3, Z, Y, X) float32 or float16, mm along patient LPS (component 0 = x, 1 = y, 2 = z).
        terms: K (i, j) exponent pairs: term k is ``a ** i * r ** j``.
        grid: the model grid (Z, Y, X) the coefficients live on.
        version: the daemon's coefficient version (1, 2, ... per load); 0 when made locally.
        plan_hash, model_id: what the coefficients were made for (published beside them).
    """

    def __init__(self, coefficients: np.ndarray, terms, grid: Grid, version: int = 0, plan_hash: str = "", model_id: str = "") -> None:
        c = np.asarray(coefficients)
        if c.dtype not in (np.float32, np.float16):
            raise BreathcastError(f"coefficients must be float32 or float16, got {c.dtype}")
        self.terms = tuple((int(i), int(j)) for i, j in terms)
        if c.ndim != 5 or c.shape[0] != len(self.terms) or c.shape[1] != 3 or tuple(c.shape[2:]) != tuple(grid.shape):
            raise BreathcastError(f"coefficients must have shape ({len(self.terms)}, 3, {', '.join(map(str, grid.shape))}), got {c.shape}")
        self.coefficients = np.ascontiguousarray(c.astype(c.dtype.newbyteorder("<"), copy=False))
        self.grid, self.version, self.plan_hash, self.model_id = grid, int(version), plan_hash, model_id
        self.dtype = "float16" if self.coefficients.dtype == np.float16 else "float32"
        self.hash = _coefficient_hash(self.coefficients, self.terms, grid)
        self._plans: dict[tuple, tuple] = {}
        # (Z, K) largest |coefficient| per slice and term: bounds every value a state can make (the resize only averages)
        self._largest = np.abs(self.coefficients.astype(np.float32)).max(axis=(1, 3, 4)).T.astype(np.float64)
        if not np.all(np.isfinite(self._largest)):
            raise BreathcastError("coefficients hold NaN or Inf")
        self.quantization_error_mm = 0.0  # set by field_model_from_predictor for float16 coefficients
        self._live = np.ascontiguousarray(np.any(self.coefficients != 0, axis=(0, 4)), dtype=np.uint8)  # (3, Z, Y)

    def __repr__(self) -> str:
        return (f"FieldModel(terms: {len(self.terms)}; grid: {self.grid.shape}; dtype: {self.dtype}; version: {self.version}; "
                f"hash: {self.hash}; memory: {self.coefficients.nbytes / 2**20:.1f} MiB)")  # fmt: skip

    # -- evaluation ---------------------------------------------------------------------------------------------

    def _plan(self, shape: tuple[int, int, int]):
        if shape not in self._plans:
            (zs, ys, xs), (zd, yd, xd) = self.grid.shape, shape
            zlo, zhi, zw = axis_weights(zs, zd)
            ylo, yhi, yw = axis_weights(ys, yd)
            live = self._live.astype(bool)
            # an output row is a blend of 4 rows of the x-resized field: zero for every state when all 4 are dead
            out_live = live[:, zlo][:, :, ylo] | live[:, zlo][:, :, yhi] | live[:, zhi][:, :, ylo] | live[:, zhi][:, :, yhi]
            self._plans[shape] = (axis_weights(xs, xd), (zlo, zhi, zw, ylo, yhi, yw), np.empty((3, zs, ys, xd), np.float32),
                                  np.ones((3, zd, yd), np.uint8), np.ascontiguousarray(out_live, dtype=np.uint8))  # fmt: skip
        return self._plans[shape]

    def field(self, a: np.ndarray, r: np.ndarray, shape: tuple[int, int, int] | None = None, dtype: Any = np.float32,
              out: np.ndarray | None = None, zeros_kept: bool = False) -> np.ndarray:  # fmt: skip
        """The field for per-slice state (a, r) on the model grid resampled to ``shape`` (default: the model grid).

        Args:
            a: (Z,) per-slice amplitude of the model grid's slices (the ``state`` message's ``slice_amplitude``).
            r: (Z,) per-slice rate, 1/s (``slice_rate``).
            shape: (Z, Y, X) of the output grid over the model grid's field of view.
            dtype: float32 or float16 output.
            out: a (3, *shape) array of that dtype to write into.
            zeros_kept: ``out`` was last written by this model at this shape (and by nothing else since), so the rows
                that are zero for every state (outside what moves) still are: they are not written again. The field
                is 11 MB at 128x128x112 float16 and writing it is most of the cost.

        Returns:
            (3, Z, Y, X) mm along patient LPS, planar components x, y, z (docs/protocol.md 4.3).
        """
        shape = tuple(int(n) for n in (shape or self.grid.shape))
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16) or len(shape) != 3 or min(shape) < 1:
            raise BreathcastError(f"output must be float32 or float16 on a (Z, Y, X) grid, got {dtype} {shape}")
        if out is None:
            out = np.empty((3, *shape), dtype)
        elif out.shape != (3, *shape) or out.dtype != dtype or not out.flags.c_contiguous:
            raise BreathcastError(f"out must be a C-contiguous {dtype} array of shape (3, {shape}), got {out.dtype} {out.shape}")
        basis = state_basis(a, r, self.terms)
        if basis.shape[0] != self.grid.shape[0]:
            raise BreathcastError(f"state has {basis.shape[0]} slices; the model grid has {self.grid.shape[0]}")
        bound = float((np.abs(basis.astype(np.float64)) * self._largest).sum(axis=1).max())
        if not bound < (6.0e4 if dtype == np.float16 else 1.0e30):  # the largest float16 is 65504
            raise BreathcastError(f"the model produced a non-finite displacement (values up to {bound:.3g} mm do not fit {dtype})")
        x_weights, zy_weights, after_x, every_row, live_rows = self._plan(shape)
        c = self.coefficients.view(np.uint16) if self.dtype == "float16" else self.coefficients
        _polynomial_x(c, self._live, basis, *x_weights, after_x)
        write = live_rows if zeros_kept else every_row
        _resize_zy(after_x, *zy_weights, write, out.view(np.uint16) if dtype == np.float16 else out)
        return out

    def at_lps(self, a: np.ndarray, r: np.ndarray, points_lps_mm: np.ndarray) -> np.ndarray:
        """(P, 3) field values, mm LPS, at (P, 3) patient LPS points: trilinear on the model grid (clamped at its
        border), only the 8 voxels around each point evaluated."""
        basis = state_basis(a, r, self.terms).astype(np.float64)
        p = np.asarray(self.grid.lps_to_index(np.asarray(points_lps_mm, float).reshape(-1, 3)), float)  # (P, 3) z, y, x
        out = np.zeros((p.shape[0], 3))
        for idx, weight in trilinear_corners(p, self.grid.shape):
            coefficients = self.coefficients[:, :, idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)  # (K, 3, P)
            out += weight[:, None] * np.einsum("kcp,pk->pc", coefficients, basis[idx[:, 0]])
        return out

    # -- the wire -----------------------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        """The ``coefficients`` map of docs/protocol.md 4.5 (without the grid's frame of reference, which the caller adds)."""
        from breathcast.stream.protocol import array_header, grid_header

        return {"version": self.version, "hash": self.hash, "terms": [list(t) for t in self.terms],
                "components": ["x", "y", "z"], "units": "mm", "grid": grid_header(self.grid),
                "plan_hash": self.plan_hash, "model_id": self.model_id, "quantization_error_mm": self.quantization_error_mm,
                **array_header(self.coefficients)}  # fmt: skip

    @classmethod
    def from_wire(cls, header: dict[str, Any], payload: bytes | memoryview) -> FieldModel:
        """A model from the ``coefficients`` reply (its map and raw frame); refuses one whose hash does not match."""
        from breathcast.stream.protocol import decode_array

        try:
            g = header["grid"]
            grid = Grid(tuple(g["shape"]), tuple(g["spacing_mm"]), tuple(g["origin_mm"]),
                        tuple(tuple(g["direction"][3 * i : 3 * i + 3]) for i in range(3)), g.get("frame_of_reference_uid", ""))  # fmt: skip
            coefficients = decode_array(header, payload)
            model = cls(coefficients, header["terms"], grid, header["version"], header.get("plan_hash", ""), header.get("model_id", ""))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BreathcastError(f"coefficients header incomplete or malformed ({type(exc).__name__}: {exc})") from None
        if model.hash != header.get("hash"):
            raise BreathcastError(f"coefficients hash {model.hash} does not match the header's {header.get('hash')!r}: corrupted transfer")
        return model


def _coefficient_hash(coefficients: np.ndarray, terms, grid: Grid) -> str:
    """16 hex digits of SHA-256 over a JSON description (terms, dtype, shape, grid) and the raw little-endian bytes."""
    meta = {"terms": [list(t) for t in terms], "dtype": coefficients.dtype.str, "shape": list(coefficients.shape),
            "grid": {"shape": list(grid.shape), "spacing_mm": [float(v) for v in grid.spacing],
                     "origin_mm": [float(v) for v in grid.origin], "direction": [float(v) for row in grid.direction for v in row]}}  # fmt: skip
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    h.update(memoryview(coefficients).cast("B"))
    return h.hexdigest()[:16]


def reference_field(coefficients: np.ndarray, terms, a: np.ndarray, r: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The doc's evaluation in plain numpy (float64), for tests and as the reference a client port checks against:
    (3, *shape) mm LPS."""
    basis = state_basis(a, r, tuple(tuple(t) for t in terms)).astype(np.float64)
    u = np.einsum("zk,kczyx->czyx", basis, np.asarray(coefficients, np.float64))
    for axis, n in ((3, shape[2]), (1, shape[0]), (2, shape[1])):
        lo, hi, w = axis_weights(u.shape[axis], n)
        shape_w = [1, 1, 1, 1]
        shape_w[axis] = n
        w = w.astype(np.float64).reshape(shape_w)
        u = np.take(u, lo, axis=axis) + w * (np.take(u, hi, axis=axis) - np.take(u, lo, axis=axis))
    return u


def field_model_from_predictor(predictor, dtype: str = "float32", version: int = 0, plan_hash: str = "") -> FieldModel | None:
    """The predictor's polynomial (model-grid voxels, (dz, dy, dx)) turned into mm LPS, in ``dtype``; None on the
    direct path, which has no polynomial."""
    model = getattr(predictor, "state_model", None)
    if model is None:
        return None
    if dtype not in COEFFICIENT_DTYPES:
        raise BreathcastError(f"coefficients dtype must be one of {COEFFICIENT_DTYPES}, got {dtype!r}")
    matrix = voxel_to_lps_matrix(predictor.grid).astype(np.float64)  # (x, y, z) mm <- (dz, dy, dx) voxels
    lps = np.einsum("ij,kjzyx->kizyx", matrix, model.coefficients.astype(np.float64))
    exact = FieldModel(lps.astype(np.float32), model.terms, predictor.grid, version, plan_hash, predictor.model_id)
    if dtype == "float32":
        return exact
    half = FieldModel(lps.astype(np.float16), model.terms, predictor.grid, version, plan_hash, predictor.model_id)
    # What rounding the coefficients to float16 costs, measured over the distillation's states (mm, vector length)
    z = predictor.grid.shape[0]
    errors = [np.linalg.norm(half.field(np.full(z, a), np.full(z, r)) - exact.field(np.full(z, a), np.full(z, r)), axis=0).max()
              for a in (-0.2, 0.5, 1.3) for r in (-1.2, 0.0, 1.2)]  # fmt: skip
    half.quantization_error_mm = float(max(errors))
    return half
