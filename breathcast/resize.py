"""Field-of-view-preserving trilinear resizing of fields (numba), and the per-voxel polynomial evaluator.

A field on the model grid goes to any grid that covers the same field of view along the same axes (the
planning CT grid, a display grid) by separable linear interpolation between voxel centres, exactly as
``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)`` does: output voxel ``d`` samples
source position ``(d + 0.5) * n_src / n_dst - 0.5``, clamped at the borders. While writing, the components
are mixed by a 3x3 matrix, which turns (dz, dy, dx) voxels of the source grid into voxels of the output grid
or into mm along patient LPS in one pass (:func:`voxel_to_lps_matrix`).

The resize takes two passes: x first, on the small source (its gathers do not vectorise), then z and y
together: per output slice two source slices are blended once, then each output row blends two of those rows
while the components are mixed (three multiplies when the mix is diagonal) and written. Writing the output is
most of the cost (an 11 MB float16 field at 128x128x112), so no full-size intermediate is written. :class:`FieldResizer` can
write into a kept output buffer, because allocating and first-touching tens of MB per frame costs milliseconds.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from breathcast.errors import BreathcastError
from breathcast.geometry import Grid

__all__ = [
    "axis_weights",
    "trilinear_corners",
    "voxel_to_lps_matrix",
    "voxel_rescale_matrix",
    "FieldResizer",
    "resize_field",
    "evaluate_polynomial",
    "store_as",
    "load_float32",
]

_KERNEL = dict(parallel=True, cache=True, fastmath=True, error_model="numpy", nogil=True)


def trilinear_corners(points_zyx: np.ndarray, shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 8 corners of trilinear interpolation at index positions, clamped at the borders.

    Args:
        points_zyx: (P, 3) float (z, y, x) index positions.
        shape: (Z, Y, X) of the grid.

    Returns:
        Per corner, ((P, 3) int indices, (P,) weights); over the 8 corners the weights sum to 1.

    Example:
        >>> corners = trilinear_corners(np.array([[0.5, 0.0, 0.25]]), (2, 2, 2))
        >>> round(sum(float(w[0]) for _, w in corners), 6), sorted(round(float(w[0]), 3) for _, w in corners)[-2:]
        (1.0, [0.375, 0.375])
    """
    grid_shape = np.asarray(shape)
    p = np.clip(np.asarray(points_zyx, dtype=np.float64), 0, grid_shape - 1)
    lo = np.minimum(np.floor(p).astype(int), np.maximum(grid_shape - 2, 0))
    w = p - lo
    corners = []
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        corners.append((np.minimum(lo + offset, grid_shape - 1), np.prod(np.where(offset, w, 1 - w), axis=1)))
    return corners


def axis_weights(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of each output sample along one axis.

    Example:
        >>> lo, hi, w = axis_weights(2, 4)
        >>> lo.tolist(), hi.tolist(), w.tolist()
        ([0, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.25, 0.75, 0.25])
    """
    src = (np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_src - 1)
    hi = np.minimum(lo + 1, n_src - 1)
    return lo, hi, (src - lo).astype(np.float32)


def voxel_to_lps_matrix(grid: Grid) -> np.ndarray:
    """(3, 3) float32: (dz, dy, dx) voxels of ``grid`` -> (x, y, z) mm along patient LPS, as
    :func:`breathcast.geometry.field_to_lps_mm` does it."""
    spacing = np.asarray(grid.spacing, dtype=np.float64)  # (x, y, z)
    ijk_to_lps = grid.direction_matrix * spacing[None, :]
    return ijk_to_lps[:, ::-1].astype(np.float32)  # columns reordered for (dz, dy, dx) input


def voxel_rescale_matrix(src_shape: tuple[int, int, int], dst_shape: tuple[int, int, int]) -> np.ndarray:
    """(3, 3) float32: (dz, dy, dx) voxels of a grid -> voxels of the same field of view at ``dst_shape``."""
    return np.diag(np.asarray(dst_shape, np.float64) / np.asarray(src_shape, np.float64)).astype(np.float32)


@intrinsic
def _half_bits(typingctx, x):
    """float32 -> the bits of the nearest float16 (one vcvtps2ph with F16C; numba has no float16 arrays)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _half_value(typingctx, bits):
    """The bits of a float16 (uint16) -> its float32 value (vcvtph2ps with F16C)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# Kernels read and write float16 arrays through uint16 views. These two helpers pick the conversion by type, so that
# one kernel serves both dtypes: numba cannot cache a kernel made per dtype by a closure (every process compiled the
# field kernels again, 8.6 s in all, and added files to the cache: README "Benchmarks").


def store_as(value, out_row):
    """In numba kernels: float32 ``value`` as an element of ``out_row`` (float32, or a uint16 view of float16)."""
    raise NotImplementedError("only for numba kernels")


def load_float32(value):
    """In numba kernels: an element of a float32 array, or of a uint16 view of float16, as float32."""
    raise NotImplementedError("only for numba kernels")


@overload(store_as, inline="always")
def _store_as(value, out_row):
    if out_row.dtype == types.uint16:
        return lambda value, out_row: _half_bits(value)
    return lambda value, out_row: value


@overload(load_float32, inline="always")
def _load_float32(value):
    if value == types.uint16:
        return lambda value: _half_value(value)
    return lambda value: value


@njit(**_KERNEL)
def _resize_x(src, lo, hi, w, out):  # (C, Z, Y, Xs) -> (C, Z, Y, Xd): the gathers, on the small side
    c, nz, ny, _ = src.shape
    for k in prange(c * nz):
        ci, z = k // nz, k % nz
        for y in range(ny):
            row, dst = src[ci, z, y], out[ci, z, y]
            for x in range(out.shape[3]):
                a = row[lo[x]]
                dst[x] = a + w[x] * (row[hi[x]] - a)


@njit(**_KERNEL)
def _resize_zy(src, zlo, zhi, zw, ylo, yhi, yw, m, out):
    """(3, Zs, Ys, X) -> (3, Zd, Yd, X): per output slice, blend two source slices along z once, then each
    output row blends two of those rows along y; components mixed by m while writing."""
    _, _, nys, nx = src.shape
    _, nzd, nyd, _ = out.shape
    diagonal = m[0, 1] == 0 and m[0, 2] == 0 and m[1, 0] == 0 and m[1, 2] == 0 and m[2, 0] == 0 and m[2, 1] == 0
    for z in prange(nzd):
        z0, z1, wz = zlo[z], zhi[z], zw[z]
        blended = np.empty((3, nys, nx), np.float32)
        for c in range(3):
            for y in range(nys):
                s0, s1, b = src[c, z0, y], src[c, z1, y], blended[c, y]
                for x in range(nx):
                    b[x] = s0[x] + wz * (s1[x] - s0[x])
        for y in range(nyd):
            y0, y1, wy = ylo[y], yhi[y], yw[y]
            a0, a1 = blended[0, y0], blended[0, y1]
            b0, b1 = blended[1, y0], blended[1, y1]
            c0, c1 = blended[2, y0], blended[2, y1]
            o0, o1, o2 = out[0, z, y], out[1, z, y], out[2, z, y]
            if diagonal:
                m0, m1, m2 = m[0, 0], m[1, 1], m[2, 2]
                for x in range(nx):
                    o0[x] = store_as(m0 * (a0[x] + wy * (a1[x] - a0[x])), o0)
                    o1[x] = store_as(m1 * (b0[x] + wy * (b1[x] - b0[x])), o1)
                    o2[x] = store_as(m2 * (c0[x] + wy * (c1[x] - c0[x])), o2)
            else:
                for x in range(nx):
                    a = a0[x] + wy * (a1[x] - a0[x])
                    b = b0[x] + wy * (b1[x] - b0[x])
                    c = c0[x] + wy * (c1[x] - c0[x])
                    o0[x] = store_as(m[0, 0] * a + m[0, 1] * b + m[0, 2] * c, o0)
                    o1[x] = store_as(m[1, 0] * a + m[1, 1] * b + m[1, 2] * c, o1)
                    o2[x] = store_as(m[2, 0] * a + m[2, 1] * b + m[2, 2] * c, o2)


class FieldResizer:
    """Resize (3, Z, Y, X) fields from one shape to another, mixing components, with kept buffers.

    Args:
        src_shape: (Z, Y, X) of the input fields.
        dst_shape: (Z, Y, X) of the output fields (same field of view).
        matrix: (3, 3) applied to the interpolated (dz, dy, dx) vector; default: voxels of the output grid.
        dtype: output dtype, float32 or float16.
    """

    def __init__(
        self,
        src_shape: tuple[int, int, int],
        dst_shape: tuple[int, int, int],
        matrix: np.ndarray | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        self.src_shape, self.dst_shape = tuple(map(int, src_shape)), tuple(map(int, dst_shape))
        if len(self.src_shape) != 3 or len(self.dst_shape) != 3 or min(self.src_shape + self.dst_shape) < 1:
            raise BreathcastError(f"shapes must be three positive sizes, got {src_shape} and {dst_shape}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise BreathcastError(f"output dtype must be float32 or float16, got {self.dtype}")
        if matrix is None:
            matrix = voxel_rescale_matrix(self.src_shape, self.dst_shape)
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if self.matrix.shape != (3, 3):
            raise BreathcastError(f"component matrix must be 3x3, got {self.matrix.shape}")
        (zs, ys, xs), (zd, yd, xd) = self.src_shape, self.dst_shape
        self._x = axis_weights(xs, xd)
        self._zy = (*axis_weights(zs, zd), *axis_weights(ys, yd))
        self._after_x = np.empty((3, zs, ys, xd), np.float32)

    def __call__(self, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(3, *src_shape) float32 -> (3, *dst_shape) in ``dtype``; writes into ``out`` when given."""
        if u.shape != (3, *self.src_shape):
            raise BreathcastError(f"field must have shape (3, {', '.join(map(str, self.src_shape))}), got {u.shape}")
        if out is None:
            out = np.empty((3, *self.dst_shape), self.dtype)
        elif out.shape != (3, *self.dst_shape) or out.dtype != self.dtype:
            raise BreathcastError(f"out must be a {self.dtype} array of shape (3, {self.dst_shape}), got {out.dtype} {out.shape}")
        _resize_x(np.ascontiguousarray(u, dtype=np.float32), *self._x, self._after_x)
        # float16 is written as its bits into a uint16 view (numba has no float16 arrays)
        _resize_zy(self._after_x, *self._zy, self.matrix, out.view(np.uint16) if self.dtype == np.float16 else out)
        return out


def resize_field(u: np.ndarray, shape: tuple[int, int, int], matrix: np.ndarray | None = None) -> np.ndarray:
    """One-off :class:`FieldResizer`: (3, Z, Y, X) float32 -> (3, *shape) float32, voxels of the new shape
    unless ``matrix`` says otherwise.

    Example:
        >>> u = np.ones((3, 2, 2, 2), np.float32)
        >>> resize_field(u, (4, 4, 4))[:, 0, 0, 0].tolist()  # one voxel of the coarse grid is two of the fine
        [2.0, 2.0, 2.0]
    """
    return FieldResizer(u.shape[1:], shape, matrix)(u)


@njit(**_KERNEL)
def _polynomial(coefficients, basis, out):  # (K, 3, Z, Y, X), (Z, K) -> (3, Z, Y, X)
    k_terms, _, nz, ny, nx = coefficients.shape
    for k in prange(3 * nz):
        c, z = k // nz, k % nz
        for y in range(ny):
            dst = out[c, z, y]
            b0 = basis[z, 0]
            src = coefficients[0, c, z, y]
            for x in range(nx):
                dst[x] = b0 * src[x]
            for t in range(1, k_terms):
                bt = basis[z, t]
                src = coefficients[t, c, z, y]
                for x in range(nx):
                    dst[x] += bt * src[x]


def evaluate_polynomial(coefficients: np.ndarray, basis: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """sum_k basis[z, k] * coefficients[k, :, z]: a per-voxel polynomial at a per-slice state (numba).

    Args:
        coefficients: (K, 3, Z, Y, X) float32 C-contiguous.
        basis: (Z, K) float32, the basis values of each slice's state
            (:func:`breathcast.state_model.design_matrix`).
        out: optional (3, Z, Y, X) float32 to write into.

    Returns:
        (3, Z, Y, X) float32.
    """
    k, _, nz, ny, nx = coefficients.shape
    basis = np.ascontiguousarray(basis, dtype=np.float32)
    if basis.shape != (nz, k):
        raise BreathcastError(f"basis must have shape ({nz}, {k}), got {basis.shape}")
    if out is None:
        out = np.empty((3, nz, ny, nx), np.float32)
    _polynomial(coefficients, basis, out)
    return out
