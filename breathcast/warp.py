"""Warp kernels (numba, CPU): warping, scaling and squaring, composition, inversion, Jacobian determinant.

Conventions (DESIGN.md, :mod:`breathcast.geometry`):

* Images are ``(Z, Y, X)`` arrays. Fields (displacement or velocity) are ``(3, Z, Y, X)`` float32, components in
  array-axis order (dz, dy, dx), in voxels.
* Pull-back: ``warped(x) = moving(x + u(x))``.
* A sample outside the grid takes the value at the nearest border voxel (the coordinate is clamped), like
  ``torch.nn.functional.grid_sample(padding_mode="border", align_corners=True)``;
  :mod:`breathcast.warp_torch` is the differentiable twin of this module and the tests hold the two equal.

The public functions read like the maths. Speed lives in a private layer underneath:

* Vector fields are packed into an interleaved layout, one 16-byte record ``(dz, dy, dx, 0)`` per voxel,
  so the two x-neighbours of a trilinear corner pair are 8 consecutive floats: one 256-bit load, and the
  three components share their weights (:func:`_add_trilinear_records`, a small LLVM intrinsic).
* Each image row is done in two passes: pass A turns sample positions into corner offsets and weights
  (branch-free, so LLVM vectorises it), pass B gathers the corners, prefetching the rows it will need.
* Scaling and squaring ping-pongs two packed buffers, kept per thread between calls of the same grid; the
  division by ``2**steps`` happens while packing, and the last squaring writes the unpacked result.

Measured on 2 cores (AMD EPYC, AVX2) at 128³ (``make bench``, ``benchmarks/bench_kernels.py``): 7-step scaling and
squaring 55-56 ms median (one fused scalar kernel per step: ~105 ms), trilinear image warp 5 ms, label warp
3.3 ms, Jacobian determinant 3.2 ms. The first call in a fresh environment compiles for ~6.5 s (scaling and
squaring) plus ~2 s per other kernel; ``cache=True`` keeps the machine code in ``__pycache__``, and a later
process's first call takes ~0.3 s. The kernels release the GIL.
"""

from __future__ import annotations

import threading
from enum import Enum

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from scipy import ndimage

from breathcast.errors import BreathcastError

__all__ = [
    "WarpMode",
    "warp",
    "warp_image",
    "warp_labels",
    "warp_field",
    "integrate_velocity",
    "compose",
    "invert",
    "jacobian_determinant",
    "count_folds",
    "smooth_folds",
]


class WarpMode(str, Enum):
    """How an image is sampled between voxel centres (the names of ``grid_sample``'s modes).

    ``BILINEAR`` is trilinear in 3-D, as in ``torch.nn.functional.grid_sample``.
    """

    BILINEAR = "bilinear"
    NEAREST = "nearest"


# Every kernel: parallel over the slowest axis, machine code cached on disk, float32 fast maths
# (no NaN/inf guarantees: fields must be finite), numpy's error model (no division checks), and no GIL
# held while it runs (a daemon's intake threads keep going).
_KERNEL = dict(parallel=True, cache=True, fastmath=True, error_model="numpy", nogil=True)
_SERIAL = dict(cache=True, fastmath=True, error_model="numpy")

_LANES = 4  # floats per voxel record in the packed layout: (dz, dy, dx, 0)
_PREFETCH_AHEAD = 32  # voxels; measured at 128³: 16-32 saves ~8% per squaring, 4 or 64 nothing
_MAX_PACKED_FLOATS = 2**31 - 8  # packed offsets are int32


# ---------------------------------------------------------------------------------------------------
# Validation at the door


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _as_field(u: np.ndarray, name: str, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """``u`` as a C-contiguous float32 (3, Z, Y, X) array, or a :class:`BreathcastError` naming what is wrong."""
    u = np.asarray(u)
    expected = "(3, Z, Y, X)" if shape is None else f"(3, {', '.join(map(str, shape))})"
    if u.ndim != 4 or u.shape[0] != 3 or min(u.shape) < 1:
        raise BreathcastError(
            f"{name} must have shape {expected} (components dz, dy, dx in voxels), got {_shape_str(u.shape)}"
        )
    if shape is not None and tuple(u.shape[1:]) != tuple(shape):
        raise BreathcastError(f"{name} must have shape {expected} to match the other input, got {_shape_str(u.shape)}")
    if not np.issubdtype(u.dtype, np.floating):
        raise BreathcastError(f"{name} must be a floating-point field (float32), got dtype {u.dtype}")
    if u[0].size * _LANES > _MAX_PACKED_FLOATS:
        raise BreathcastError(
            f"{name} has {u[0].size} voxels; the kernels handle at most {_MAX_PACKED_FLOATS // _LANES}: "
            "resample it to a coarser grid (breathcast.geometry.resample_field)"
        )
    return np.ascontiguousarray(u, dtype=np.float32)


def _as_image(image: np.ndarray, shape: tuple[int, int, int], name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or tuple(image.shape) != tuple(shape):
        raise BreathcastError(
            f"{name} must have shape (Z, Y, X) = {_shape_str(shape)} to match the field, got {_shape_str(image.shape)}"
        )
    if image.dtype.kind not in "biuf":
        raise BreathcastError(f"{name} must be integer, bool or float, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _as_steps(steps: int) -> int:
    if int(steps) != steps or steps < 0:
        raise BreathcastError(f"steps must be a non-negative integer, got {steps!r}")
    return int(steps)


# ---------------------------------------------------------------------------------------------------
# Shared pieces of every kernel


@njit(inline="always", **_SERIAL)
def _axis(p, last, stride):
    """One axis of a trilinear sample: clamp ``p`` to [0, last] (border padding) and split it.

    Returns:
        (offset of floor(p) along the axis, offset to the next sample (0 at the last voxel), fraction in [0, 1]).
    """
    p = min(max(p, np.float32(0.0)), last)
    i = np.int32(p)  # p >= 0, so truncation is floor
    step = stride if p < last else np.int32(0)
    return i * stride, step, p - np.float32(i)


@njit(inline="always", **_SERIAL)
def _nearest(p, last):
    """Index of the voxel nearest to ``p`` after clamping to [0, last]: floor(p + 0.5)."""
    return np.int64(min(max(p, np.float32(0.0)), last) + np.float32(0.5))


@njit(inline="always", **_SERIAL)
def _corners_to_scratch(x, pz, py, px, lasts, strides, offs, ws):
    """Pass A for voxel ``x`` of a row: store the four corner-row offsets and six weights of ``(pz, py, px)``.

    ``offs[:, x]`` are the offsets of the rows (z0, y0), (z0, y1), (z1, y0), (z1, y1) at x0, ``offs[4, x]`` the
    step to x1; ``ws[:, x]`` are (1 - fx, fx) and the four (z, y) weights in the same row order.
    """
    oz, dz, fz = _axis(pz, lasts[0], strides[0])
    oy, dy, fy = _axis(py, lasts[1], strides[1])
    ox, dx, fx = _axis(px, lasts[2], strides[2])
    a = oz + oy + ox
    offs[0, x] = a
    offs[1, x] = a + dy
    offs[2, x] = a + dz
    offs[3, x] = a + dz + dy
    offs[4, x] = dx
    one = np.float32(1.0)
    ws[0, x] = one - fx
    ws[1, x] = fx
    ws[2, x] = (one - fz) * (one - fy)
    ws[3, x] = (one - fz) * fy
    ws[4, x] = fz * (one - fy)
    ws[5, x] = fz * fy


@intrinsic
def _add_trilinear_records(typingctx, dst, o_dst, base, o, alpha, beta, src, a, b, c, d, gx, fx, w00, w01, w10, w11):
    """``dst[o_dst:o_dst+4] = alpha * base[o:o+4] + beta * sum_r w_r * (gx * src[r:r+4] + fx * src[r+4:r+8])``.

    ``r`` runs over the four corner rows (a, b, c, d) of packed records; one 8-float load per row holds both
    x-neighbours, so the three components share the weights in one vector FMA. ``src`` must hold 4 floats past
    the last record (the x1 half of the last voxel is read with weight fx = 0).
    """
    sig = types.void(dst, o_dst, base, o, alpha, beta, src, a, b, c, d, gx, fx, w00, w01, w10, w11)
    i32 = ir.IntType(32)
    v4 = ir.VectorType(ir.FloatType(), 4)
    v8 = ir.VectorType(ir.FloatType(), 8)

    def codegen(context, builder, signature, args):
        (dst_, o_dst_, base_, o_, alpha_, beta_, src_, a_, b_, c_, d_, gx_, fx_, w00_, w01_, w10_, w11_) = args
        argtys = signature.args

        def pointer(index, value):
            return context.make_array(argtys[index])(context, builder, value).data

        def splat(x, vty):
            lane0 = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(lane0, lane0, ir.Constant(ir.VectorType(i32, vty.count), [0] * vty.count))

        def load(ptr, offset, vty):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset], inbounds=True), vty.as_pointer()), align=4)

        src_ptr = pointer(6, src_)
        weight_x = builder.shuffle_vector(
            splat(gx_, v8), splat(fx_, v8), ir.Constant(ir.VectorType(i32, 8), [0, 1, 2, 3, 8, 9, 10, 11])
        )
        total = None
        for row, w in ((a_, w00_), (b_, w01_), (c_, w10_), (d_, w11_)):
            term = builder.fmul(load(src_ptr, row, v8), builder.fmul(weight_x, splat(w, v8)))
            total = term if total is None else builder.fadd(total, term)
        low = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, 4), [0, 1, 2, 3]))
        high = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, 4), [4, 5, 6, 7]))
        sample = builder.fadd(low, high)
        own = load(pointer(2, base_), o_, v4)
        result = builder.fadd(builder.fmul(own, splat(alpha_, v4)), builder.fmul(sample, splat(beta_, v4)))
        out = builder.bitcast(builder.gep(pointer(0, dst_), [o_dst_], inbounds=True), v4.as_pointer())
        builder.store(result, out, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, array, offset):
    """Hint the CPU to bring ``array[offset]`` into cache (``llvm.prefetch``: read, high locality, data)."""
    sig = types.void(array, offset)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        prefetch = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        address = builder.bitcast(builder.gep(data, [args[1]], inbounds=True), i8p)
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------
# Packed vector fields: flat float32, record (dz, dy, dx, 0) per voxel, 4 spare floats at the end


def _empty_packed(shape: tuple[int, ...]) -> np.ndarray:
    """A packed buffer for a (Z, Y, X) grid: records uninitialised, the spare floats at the end zero.

    Big buffers are allocated by numpy, not inside the kernels: numpy asks the kernel for transparent huge
    pages, which makes first-touch page faults ~5x cheaper (measured: 4 ms vs 20 ms for 33 MB).
    """
    nz, ny, nx = shape[-3:]
    packed = np.empty(nz * ny * nx * _LANES + _LANES, np.float32)
    packed[-_LANES:] = 0.0  # read with weight 0 past the last voxel: must be finite
    return packed


class _SquaringBuffers(threading.local):
    """The two packed buffers of the last grid this thread integrated, kept for the next call.

    Fresh buffers cost their first-touch page faults on every call: ~4.5 ms of a ~60 ms scaling and squaring
    at 128³ (measured). Grids whose buffers are larger than ``keep_bytes`` each are never kept, so a one-off
    large call does not pin memory; at most two buffers per thread are held.
    """

    keep_bytes = 64 * 2**20

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.pair: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self.shape == shape and self.pair is not None:
            return self.pair
        pair = (_empty_packed(shape), _empty_packed(shape))
        if pair[0].nbytes <= self.keep_bytes:
            self.shape, self.pair = shape, pair
        return pair


_squaring_buffers = _SquaringBuffers()


@njit(**_KERNEL)
def _pack(u, scale, packed):
    """(3, Z, Y, X) -> ``packed`` records of ``scale * u``; returns ``packed``."""
    _, nz, ny, nx = u.shape
    for z in prange(nz):
        for y in range(ny):
            row = (z * ny + y) * nx * 4
            for x in range(nx):
                o = row + 4 * x
                packed[o] = u[0, z, y, x] * scale
                packed[o + 1] = u[1, z, y, x] * scale
                packed[o + 2] = u[2, z, y, x] * scale
                packed[o + 3] = 0.0
    return packed


@njit(**_KERNEL)
def _unpack(packed, u):
    """Packed records -> ``u`` (3, Z, Y, X); returns ``u``."""
    _, nz, ny, nx = u.shape
    for z in prange(nz):
        for y in range(ny):
            row = (z * ny + y) * nx * 4
            for x in range(nx):
                o = row + 4 * x
                u[0, z, y, x] = packed[o]
                u[1, z, y, x] = packed[o + 1]
                u[2, z, y, x] = packed[o + 2]
    return u


@njit(inline="always", **_SERIAL)
def _resample_row(dst, dst_start, base, alpha, beta, w, u, row, zf, yf, xs, lasts, strides, offs, ws):
    """One row of ``alpha * base + beta * w ∘ (id + u)``, packed records in, packed records out.

    Reads the row's records at ``row, row + 4, ...`` of ``base`` and ``u``; writes from ``dst[dst_start]`` on.
    """
    for x in range(xs.size):  # pass A: positions -> corners (vectorised)
        o = row + 4 * x
        _corners_to_scratch(x, zf + u[o], yf + u[o + 1], xs[x] + u[o + 2], lasts, strides, offs, ws)
    for x in range(xs.size):  # pass B: gather the corner records, 3 components at once
        ahead = x + _PREFETCH_AHEAD
        if ahead < xs.size:  # the corner rows off the current row are cache misses: request them early
            _prefetch(w, offs[1, ahead])
            _prefetch(w, offs[2, ahead])
            _prefetch(w, offs[3, ahead])
        _add_trilinear_records(
            dst, dst_start + 4 * x, base, row + 4 * x, alpha, beta, w,
            offs[0, x], offs[1, x], offs[2, x], offs[3, x],
            ws[0, x], ws[1, x], ws[2, x], ws[3, x], ws[4, x], ws[5, x],
        )  # fmt: skip


@njit(**_KERNEL)
def _resample_packed(dst, base, alpha, beta, w, u, nz, ny, nx):
    """``dst(x) = alpha * base(x) + beta * w(x + u(x))``, all packed; trilinear, border-clamped.

    Scaling and squaring is ``w = u = base``, alpha = beta = 1. ``dst`` must not be ``w`` or ``u``.
    """
    lasts = (np.float32(nz - 1), np.float32(ny - 1), np.float32(nx - 1))
    strides = (np.int32(ny * nx * 4), np.int32(nx * 4), np.int32(4))
    xs = np.arange(nx).astype(np.float32)
    for z in prange(nz):
        offs, ws = np.empty((5, nx), np.int32), np.empty((6, nx), np.float32)
        for y in range(ny):
            row = (z * ny + y) * nx * 4
            _resample_row(dst, row, base, alpha, beta, w, u, row, np.float32(z), np.float32(y), xs, lasts, strides,
                          offs, ws)  # fmt: skip


@njit(**_KERNEL)
def _resample_to_planar(out, base, alpha, beta, w, u):
    """:func:`_resample_packed` with the result unpacked into ``out`` (3, Z, Y, X) on the way; returns ``out``.

    The last step of a chain, so that no separate unpacking pass reads the whole field again.
    """
    _, nz, ny, nx = out.shape
    lasts = (np.float32(nz - 1), np.float32(ny - 1), np.float32(nx - 1))
    strides = (np.int32(ny * nx * 4), np.int32(nx * 4), np.int32(4))
    xs = np.arange(nx).astype(np.float32)
    for z in prange(nz):
        offs, ws = np.empty((5, nx), np.int32), np.empty((6, nx), np.float32)
        records = np.empty(4 * nx, np.float32)
        for y in range(ny):
            row = (z * ny + y) * nx * 4
            _resample_row(records, 0, base, alpha, beta, w, u, row, np.float32(z), np.float32(y), xs, lasts, strides,
                          offs, ws)  # fmt: skip
            for x in range(nx):
                out[0, z, y, x] = records[4 * x]
                out[1, z, y, x] = records[4 * x + 1]
                out[2, z, y, x] = records[4 * x + 2]
    return out


@njit(**_KERNEL)
def _max_abs_difference(a, b):
    """max |a - b| over two flat arrays of the same size."""
    n = a.size
    chunk = 1 << 16
    n_chunks = (n + chunk - 1) // chunk
    partial = np.zeros(n_chunks, np.float32)
    for c in prange(n_chunks):
        m = np.float32(0.0)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            m = max(m, abs(a[i] - b[i]))
        partial[c] = m
    return partial.max() if n_chunks else np.float32(0.0)


# ---------------------------------------------------------------------------------------------------
# Scalar images


@njit(**_KERNEL)
def _warp_image_kernel(image, u, out):
    nz, ny, nx = image.shape
    flat = image.reshape(-1)
    lasts = (np.float32(nz - 1), np.float32(ny - 1), np.float32(nx - 1))
    strides = (np.int32(ny * nx), np.int32(nx), np.int32(1))
    xs = np.arange(nx).astype(np.float32)
    for z in prange(nz):
        offs = np.empty((5, nx), np.int32)
        ws = np.empty((6, nx), np.float32)
        zf = np.float32(z)
        for y in range(ny):
            yf = np.float32(y)
            for x in range(nx):  # pass A (vectorised)
                _corners_to_scratch(x, zf + u[0, z, y, x], yf + u[1, z, y, x], xs[x] + u[2, z, y, x],
                                    lasts, strides, offs, ws)  # fmt: skip
            for x in range(nx):  # pass B
                a, b, c, d, dx = offs[0, x], offs[1, x], offs[2, x], offs[3, x], offs[4, x]
                gx, fx = ws[0, x], ws[1, x]
                out[z, y, x] = (
                    ws[2, x] * (gx * flat[a] + fx * flat[a + dx])
                    + ws[3, x] * (gx * flat[b] + fx * flat[b + dx])
                    + ws[4, x] * (gx * flat[c] + fx * flat[c + dx])
                    + ws[5, x] * (gx * flat[d] + fx * flat[d + dx])
                )
    return out


@njit(**_KERNEL)
def _warp_labels_kernel(labels, u, out):
    nz, ny, nx = labels.shape
    lz, ly, lx = np.float32(nz - 1), np.float32(ny - 1), np.float32(nx - 1)
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                out[z, y, x] = labels[
                    _nearest(np.float32(z) + u[0, z, y, x], lz),
                    _nearest(np.float32(y) + u[1, z, y, x], ly),
                    _nearest(np.float32(x) + u[2, z, y, x], lx),
                ]
    return out


@njit(**_KERNEL)
def _jacobian_determinant_kernel(u, out):
    """det(I + grad u), np.gradient's differences (edge_order=1), 0 derivative along an axis of size 1."""
    _, nz, ny, nx = u.shape
    for z in prange(nz):
        zm, zp = max(z - 1, 0), min(z + 1, nz - 1)
        sz = np.float32(1.0) / np.float32(max(zp - zm, 1))
        for y in range(ny):
            ym, yp = max(y - 1, 0), min(y + 1, ny - 1)
            sy = np.float32(1.0) / np.float32(max(yp - ym, 1))
            for x in range(nx):
                xm, xp = max(x - 1, 0), min(x + 1, nx - 1)
                sx = np.float32(1.0) / np.float32(max(xp - xm, 1))
                # J[i][j] = delta_ij + d u_i / d x_j, rows and columns in (z, y, x) order
                j00 = np.float32(1.0) + (u[0, zp, y, x] - u[0, zm, y, x]) * sz
                j01 = (u[0, z, yp, x] - u[0, z, ym, x]) * sy
                j02 = (u[0, z, y, xp] - u[0, z, y, xm]) * sx
                j10 = (u[1, zp, y, x] - u[1, zm, y, x]) * sz
                j11 = np.float32(1.0) + (u[1, z, yp, x] - u[1, z, ym, x]) * sy
                j12 = (u[1, z, y, xp] - u[1, z, y, xm]) * sx
                j20 = (u[2, zp, y, x] - u[2, zm, y, x]) * sz
                j21 = (u[2, z, yp, x] - u[2, z, ym, x]) * sy
                j22 = np.float32(1.0) + (u[2, z, y, xp] - u[2, z, y, xm]) * sx
                out[z, y, x] = (
                    j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20)
                )
    return out


# ---------------------------------------------------------------------------------------------------
# Public API


def warp_image(image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Trilinear pull-back warp: ``warped(x) = image(x + u(x))``, border-clamped.

    Args:
        image: (Z, Y, X) intensities, any real dtype (computed in float32).
        u: (3, Z, Y, X) displacement, voxels, components (dz, dy, dx).

    Returns:
        (Z, Y, X) float32.

    Example:
        >>> image = np.arange(4, dtype=np.float32).reshape(1, 1, 4)
        >>> u = np.zeros((3, 1, 1, 4), np.float32); u[2] = 0.5  # half a voxel along x
        >>> warp_image(image, u).ravel().tolist()
        [0.5, 1.5, 2.5, 3.0]
    """
    u = _as_field(u, "displacement u")
    image = _as_image(image, u.shape[1:]).astype(np.float32, copy=False)
    return _warp_image_kernel(image, u, np.empty(image.shape, np.float32))


def warp_labels(labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Nearest-neighbour pull-back warp of a label map: ``warped(x) = labels(round(x + u(x)))``.

    ``round(p) = floor(p + 0.5)`` after clamping to the grid; torch's ``nearest`` rounds exact .5 ties to even.

    Args:
        labels: (Z, Y, X) label map, any integer, bool or float dtype.
        u: (3, Z, Y, X) displacement, voxels, components (dz, dy, dx).

    Returns:
        (Z, Y, X), same dtype as ``labels``.
    """
    u = _as_field(u, "displacement u")
    labels = _as_image(labels, u.shape[1:], "labels")
    if not labels.dtype.isnative:
        labels = labels.astype(labels.dtype.newbyteorder("="))
    source = labels.view(np.uint8) if labels.dtype == np.bool_ else labels  # numba indexes no bool images
    out = _warp_labels_kernel(source, u, np.empty_like(source))
    return out.view(labels.dtype)


_WARP_KERNELS = {WarpMode.BILINEAR: warp_image, WarpMode.NEAREST: warp_labels}


def warp(image: np.ndarray, u: np.ndarray, mode: WarpMode | str = WarpMode.BILINEAR) -> np.ndarray:
    """Pull-back warp with a named sampling mode; :func:`warp_image` (bilinear) or :func:`warp_labels` (nearest).

    Args:
        image: (Z, Y, X).
        u: (3, Z, Y, X) displacement, voxels, components (dz, dy, dx).
        mode: :class:`WarpMode` or its value, "bilinear" (trilinear, float32 out) or "nearest" (dtype kept).
    """
    try:
        kernel = _WARP_KERNELS[WarpMode(mode)]
    except ValueError:
        raise BreathcastError(f"unknown warp mode {mode!r}; use one of {[m.value for m in WarpMode]}") from None
    return kernel(image, u)


def warp_field(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each component of ``w`` sampled at ``x + u(x)`` (trilinear, border-clamped): ``w ∘ (id + u)``.

    Args:
        w: (3, Z, Y, X) field to resample, any units (here voxels).
        u: (3, Z, Y, X) displacement, voxels, components (dz, dy, dx).

    Returns:
        (3, Z, Y, X) float32.
    """
    u = _as_field(u, "displacement u")
    w = _as_field(w, "field w", u.shape[1:])
    w_packed = _pack(w, np.float32(1.0), _empty_packed(u.shape))
    u_packed = _pack(u, np.float32(1.0), _empty_packed(u.shape))
    return _resample_to_planar(np.empty_like(u), w_packed, np.float32(0.0), np.float32(1.0), w_packed, u_packed)


def integrate_velocity(v: np.ndarray, steps: int = 7) -> np.ndarray:
    """Scaling and squaring: the displacement of exp(v) for a stationary velocity field.

    ``u = v / 2**steps``, then ``steps`` times ``u = u + u ∘ (id + u)`` — the scaling and squaring layers of
    Dalca et al., Medical Image Analysis 57 (2019), which the paper (§1.1) uses to turn ``v`` into ``φ``.

    Args:
        v: (3, Z, Y, X) stationary velocity, voxels, components (dz, dy, dx).
        steps: number of squarings; 0 returns a float32 copy of ``v``.

    Returns:
        (3, Z, Y, X) float32 displacement, voxels.

    Example:
        >>> v = np.zeros((3, 2, 3, 4), np.float32); v[2] = 1.5  # a constant velocity is a translation
        >>> float(integrate_velocity(v)[2, 1, 1, 1])
        1.5
    """
    v = _as_field(v, "velocity v")
    steps = _as_steps(steps)
    if steps == 0:
        return v.copy()
    _, nz, ny, nx = v.shape
    one = np.float32(1.0)
    u, spare = _squaring_buffers.get(v.shape)
    u = _pack(v, np.float32(0.5**steps), u)  # u = v / 2**steps
    for _ in range(steps - 1):  # u = u + u ∘ (id + u), ping-ponging two buffers
        _resample_packed(spare, u, one, one, u, u, nz, ny, nx)
        u, spare = spare, u
    return _resample_to_planar(np.empty_like(v), u, one, one, u, u)  # the last squaring, unpacked on the way


def compose(u_first: np.ndarray, u_second: np.ndarray) -> np.ndarray:
    """The displacement of warping by ``u_first`` and then by ``u_second``.

    ``warp_image(image, compose(u1, u2)) ≈ warp_image(warp_image(image, u1), u2)``, with
    ``compose(u1, u2) = u2 + u1 ∘ (id + u2)`` (pull-back: the second warp looks up the first).

    Args:
        u_first: (3, Z, Y, X) displacement applied first, voxels, (dz, dy, dx).
        u_second: (3, Z, Y, X) displacement applied second, voxels, (dz, dy, dx).

    Returns:
        (3, Z, Y, X) float32 displacement, voxels.
    """
    u_second = _as_field(u_second, "u_second")
    u_first = _as_field(u_first, "u_first", u_second.shape[1:])
    first = _pack(u_first, np.float32(1.0), _empty_packed(u_first.shape))
    second = _pack(u_second, np.float32(1.0), _empty_packed(u_second.shape))
    return _resample_to_planar(np.empty_like(u_second), second, np.float32(1.0), np.float32(1.0), first, second)


def invert(u: np.ndarray, iterations: int = 50, tol: float = 1e-4) -> np.ndarray:
    """Inverse displacement by fixed-point iteration: ``w(x) = -u(x + w(x))``, so ``compose(u, w) ≈ 0``.

    Converges for fields whose Jacobian of u has norm < 1 (smooth, no folds). Stops early once the largest
    change of an iteration is below ``tol``.

    Args:
        u: (3, Z, Y, X) displacement, voxels, (dz, dy, dx).
        iterations: maximum number of iterations (>= 0; 0 returns -u).
        tol: stop when max |w_new - w| < tol, voxels.

    Returns:
        (3, Z, Y, X) float32 displacement, voxels.
    """
    u = _as_field(u, "displacement u")
    if int(iterations) != iterations or iterations < 0:
        raise BreathcastError(f"iterations must be a non-negative integer, got {iterations!r}")
    _, nz, ny, nx = u.shape
    u_packed = _pack(u, np.float32(1.0), _empty_packed(u.shape))
    w = _pack(u, np.float32(-1.0), _empty_packed(u.shape))  # first guess: w = -u
    new = _empty_packed(u.shape)
    for _ in range(int(iterations)):
        _resample_packed(new, u_packed, np.float32(0.0), np.float32(-1.0), u_packed, w, nz, ny, nx)
        change = _max_abs_difference(new, w)
        w, new = new, w
        if change < tol:
            break
    return _unpack(w, np.empty_like(u))


def jacobian_determinant(u: np.ndarray) -> np.ndarray:
    """det(I + ∇u) of φ(x) = x + u(x), voxel units (equal to the determinant in mm).

    Central differences inside, one-sided at the borders (``numpy.gradient``, ``edge_order=1``); an axis of
    size 1 contributes a zero derivative.

    Args:
        u: (3, Z, Y, X) displacement, voxels, (dz, dy, dx).

    Returns:
        (Z, Y, X) float32; <= 0 where the mapping folds.

    Example:
        >>> u = np.zeros((3, 3, 3, 3), np.float32); u[2] = 0.5 * np.arange(3)  # stretch x by 1.5
        >>> float(jacobian_determinant(u)[1, 1, 1])
        1.5
    """
    u = _as_field(u, "displacement u")
    return _jacobian_determinant_kernel(u, np.empty(u.shape[1:], np.float32))


def count_folds(u: np.ndarray) -> int:
    """Number of voxels where ``u`` folds space, det(I + ∇u) <= 0 (:func:`jacobian_determinant`).

    Args:
        u: (3, Z, Y, X) displacement, voxels, (dz, dy, dx).
    """
    return int(np.count_nonzero(jacobian_determinant(u) <= 0))


def smooth_folds(
    u: np.ndarray, scales: tuple[float, ...] = (1.0,), min_det: float = 0.1, max_rounds: int = 30
) -> tuple[np.ndarray, int]:
    """``u`` smoothed where ``s * u`` folds for some ``s`` in ``scales``, until none does.

    Each round blends a Gaussian-smoothed copy (σ 1 voxel) into ``u`` over the voxels with
    det(I + s ∇u) < ``min_det`` and 2 voxels around them (a soft mask: twice the mask blurred by σ 1 voxel, at most
    1), and leaves the rest nearly as it is.

    Args:
        u: (3, Z, Y, X) displacement, voxels, (dz, dy, dx).
        scales: the multiples of ``u`` that must not fold (a basis that the caller scales by amplitude).
        min_det: the smallest determinant kept without smoothing.
        max_rounds: rounds before giving up.

    Returns:
        (the field, float32, and the rounds it took; 0 when ``u`` was already fold-free).

    Raises:
        BreathcastError: folds remain after ``max_rounds``.
    """
    u = _as_field(u, "displacement u").copy()
    for rounds in range(max_rounds + 1):
        low = np.zeros(u.shape[1:], dtype=bool)
        for s in scales:
            low |= jacobian_determinant(s * u) < min_det
        if not low.any():
            return u, rounds
        near = ndimage.binary_dilation(low, iterations=2)
        weight = np.clip(2.0 * ndimage.gaussian_filter(near.astype(np.float32), 1.0), 0.0, 1.0)
        smoothed = ndimage.gaussian_filter(u, sigma=(0, 1.0, 1.0, 1.0), mode="nearest")
        u += weight[None] * (smoothed - u)
    raise BreathcastError(f"the displacement still folds after {max_rounds} rounds of smoothing")
