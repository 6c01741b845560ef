"""Warp kernels: known answers, a plain reference (scipy), and numba == torch parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from breathcast import warp_torch
from breathcast.errors import BreathcastError
from breathcast.warp import (
    WarpMode,
    compose,
    count_folds,
    integrate_velocity,
    invert,
    jacobian_determinant,
    smooth_folds,
    warp,
    warp_field,
    warp_image,
    warp_labels,
)

SHAPE = (12, 14, 16)


def smooth_field(shape: tuple[int, int, int], max_voxels: float, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """(3, Z, Y, X) float32: Gaussian-smoothed noise scaled so that its largest component is ``max_voxels``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *shape))
    field = np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest") for c in noise])
    return (field * (max_voxels / np.abs(field).max())).astype(np.float32)


def random_image(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def identity_grid(shape: tuple[int, ...]) -> np.ndarray:
    return np.mgrid[tuple(slice(0, n) for n in shape)].astype(np.float64)


def reference_warp(image: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The plain reference: trilinear at x + u(x); mode='nearest' is border clamping for order=1."""
    coords = identity_grid(image.shape) + u.astype(np.float64)
    return ndimage.map_coordinates(image.astype(np.float64), coords, order=1, mode="nearest")


def interior(margin: int) -> tuple[slice, slice, slice]:
    return (slice(margin, -margin),) * 3


def to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))[None]


# --- known answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (2, -1, 1)])
def test_integer_translation_is_recovered_exactly(shift):
    """A constant integer displacement shifts image and labels by exactly that many voxels (inside)."""
    image = random_image(SHAPE)
    labels = np.random.default_rng(2).integers(0, 7, SHAPE).astype(np.int32)
    u = np.broadcast_to(np.asarray(shift, np.float32)[:, None, None, None], (3, *SHAPE))
    m = 3  # >= the largest shift: x + shift stays in the grid
    dz, dy, dx = shift
    moved = (slice(m + dz, SHAPE[0] - m + dz), slice(m + dy, SHAPE[1] - m + dy), slice(m + dx, SHAPE[2] - m + dx))
    np.testing.assert_array_equal(warp_image(image, u)[interior(m)], image[moved])
    np.testing.assert_array_equal(warp_labels(labels, u)[interior(m)], labels[moved])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fractional_translation_is_linear_interpolation(axis):
    """A shift of 0.25 voxel along one axis gives 0.75 * here + 0.25 * next voxel."""
    image = random_image(SHAPE)
    u = np.zeros((3, *SHAPE), np.float32)
    u[axis] = 0.25
    expected = 0.75 * image + 0.25 * np.roll(image, -1, axis=axis)
    keep = [slice(None)] * 3
    keep[axis] = slice(0, -1)  # the last voxel reads its own value (border)
    np.testing.assert_allclose(warp_image(image, u)[tuple(keep)], expected[tuple(keep)], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("warp_image", lambda img, lab, f, zero: (warp_image(img, zero), img)),
        ("warp_labels", lambda img, lab, f, zero: (warp_labels(lab, zero), lab)),
        ("warp_field", lambda img, lab, f, zero: (warp_field(f, zero), f)),
        ("integrate_velocity", lambda img, lab, f, zero: (integrate_velocity(zero), zero)),
        ("compose(u, 0)", lambda img, lab, f, zero: (compose(f, zero), f)),
        ("compose(0, u)", lambda img, lab, f, zero: (compose(zero, f), f)),
        ("invert", lambda img, lab, f, zero: (invert(zero), zero)),
        ("jacobian_determinant", lambda img, lab, f, zero: (jacobian_determinant(zero), np.ones(SHAPE, np.float32))),
    ],
)
def test_zero_field_is_identity(name, call):
    """A zero displacement changes nothing, for every function."""
    zero = np.zeros((3, *SHAPE), np.float32)
    labels = np.random.default_rng(3).integers(0, 5, SHAPE).astype(np.uint8)
    result, expected = call(random_image(SHAPE), labels, smooth_field(SHAPE, 2.0), zero)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    assert count_folds(zero) == 0


@pytest.mark.parametrize("velocity", [(0.0, 0.0, 1.5), (-2.0, 0.5, 0.25), (3.0, -3.0, 3.0)])
def test_constant_velocity_integrates_to_its_translation(velocity):
    """exp of a constant velocity is the translation by that velocity, at every voxel."""
    v = np.broadcast_to(np.asarray(velocity, np.float32)[:, None, None, None], (3, *SHAPE)).copy()
    np.testing.assert_allclose(integrate_velocity(v), v, rtol=1e-6, atol=1e-6)


def test_zero_steps_returns_a_copy():
    """steps=0 returns v itself, as a new array."""
    v = smooth_field(SHAPE, 2.0)
    u = integrate_velocity(v, steps=0)
    np.testing.assert_array_equal(u, v)
    assert u is not v and not np.shares_memory(u, v)


def test_repeated_integration_is_independent():
    """Calls that reuse the kept scratch buffers return equal, unshared results, other grids in between."""
    v, other = smooth_field(SHAPE, 2.0), smooth_field((9, 10, 11), 2.0)
    first = integrate_velocity(v)
    np.testing.assert_array_equal(integrate_velocity(other), integrate_velocity(other.copy()))
    second, third = integrate_velocity(v), integrate_velocity(v)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(second, third)
    assert not np.shares_memory(second, third)


def test_integrated_field_inverts_to_identity():
    """invert(exp(v)) composes with exp(v) to identity (< 0.05 voxel inside), and matches exp(-v)."""
    shape = (24, 24, 24)
    v = smooth_field(shape, 3.0, seed=4, sigma=4.0)
    u = integrate_velocity(v)
    w = invert(u)
    assert count_folds(u) == 0
    np.testing.assert_allclose(compose(u, w)[(slice(None), *interior(5))], 0.0, rtol=0, atol=0.05)
    np.testing.assert_allclose(compose(w, u)[(slice(None), *interior(5))], 0.0, rtol=0, atol=0.05)
    np.testing.assert_allclose(w[(slice(None), *interior(5))], integrate_velocity(-v)[(slice(None), *interior(5))],
                               rtol=0, atol=0.05)  # fmt: skip


def test_invert_with_no_iterations_is_minus_u():
    """The fixed point starts from w = -u."""
    u = smooth_field(SHAPE, 1.0)
    np.testing.assert_array_equal(invert(u, iterations=0), -u)


def test_compose_matches_sequential_warping():
    """Warping by compose(u1, u2) equals warping by u1 then by u2 (a linear image: trilinear is exact)."""
    zz, yy, xx = identity_grid(SHAPE)
    image = (0.5 * zz - 0.25 * yy + 0.125 * xx + 3.0).astype(np.float32)
    u1, u2 = smooth_field(SHAPE, 1.5, seed=5), smooth_field(SHAPE, 1.5, seed=6)
    sequential = warp_image(warp_image(image, u1), u2)
    np.testing.assert_allclose(warp_image(image, compose(u1, u2))[interior(4)], sequential[interior(4)],
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_of_a_linear_field_is_det_of_i_plus_a(seed):
    """u = A x has det(I + ∇u) = det(I + A) at every voxel (finite differences are exact on linear fields)."""
    a = np.random.default_rng(seed).uniform(-0.3, 0.3, (3, 3))
    u = np.einsum("ij,j...->i...", a, identity_grid(SHAPE)).astype(np.float32)
    expected = np.linalg.det(np.eye(3) + a)
    np.testing.assert_allclose(jacobian_determinant(u), expected, rtol=1e-5, atol=1e-5)


def test_folding_and_smooth_fields_are_counted():
    """A field that reverses x in a slab folds there; a smooth small field folds nowhere."""
    u = np.zeros((3, *SHAPE), np.float32)
    u[2, 4:8] = -2.0 * np.arange(SHAPE[2])  # x -> -x: det = -1 inside the slab
    assert count_folds(u) >= 4 * SHAPE[1] * SHAPE[2]
    assert count_folds(smooth_field(SHAPE, 0.5)) == 0


def test_smooth_folds_removes_a_step_and_leaves_the_rest():
    """A 2-voxel step in u_z across one slice folds at 2x; smoothed, no multiple in ``scales`` folds, and voxels
    far from the step keep their values (to 1e-3 voxel)."""
    u = np.zeros((3, 24, 8, 8), np.float32)
    u[0, :12] = 2.0  # everything below slice 12 came from 2 voxels further along z: a compressive step
    assert count_folds(2.0 * u) > 0
    fixed, rounds = smooth_folds(u, scales=(-0.5, 2.0))
    assert rounds > 0 and count_folds(2.0 * fixed) == 0 and count_folds(-0.5 * fixed) == 0
    np.testing.assert_allclose(fixed[:, :3], u[:, :3], atol=1e-3)
    np.testing.assert_allclose(fixed[:, 21:], u[:, 21:], atol=1e-3)
    smooth = smooth_field(SHAPE, 0.5)
    same, none = smooth_folds(smooth)
    assert none == 0 and np.array_equal(same, smooth)
    with pytest.raises(BreathcastError, match="still folds"):
        smooth_folds(u, scales=(2.0,), max_rounds=0)


def test_jacobian_on_a_single_slice():
    """An axis of one voxel contributes a zero derivative (no division by zero)."""
    u = np.zeros((3, 1, 5, 6), np.float32)
    u[2] = 0.5 * np.arange(6)
    np.testing.assert_allclose(jacobian_determinant(u), 1.5, rtol=1e-6, atol=1e-6)


# --- the plain reference --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [SHAPE, (1, 9, 10), (7, 1, 5), (17, 13, 11)])
@pytest.mark.parametrize("max_voxels", [0.7, 4.0])  # 4 voxels leaves the grid: border clamping
def test_warp_image_matches_map_coordinates(shape, max_voxels):
    """The numba trilinear warp equals scipy's map_coordinates(order=1, mode='nearest')."""
    image = random_image(shape)
    u = smooth_field(shape, max_voxels, seed=7)
    np.testing.assert_allclose(warp_image(image, u), reference_warp(image, u), rtol=0, atol=2e-6)


def test_warp_field_matches_map_coordinates():
    """Each component of warp_field is the reference warp of that component."""
    w, u = smooth_field(SHAPE, 3.0, seed=8), smooth_field(SHAPE, 4.0, seed=9)
    expected = np.stack([reference_warp(c, u) for c in w])
    np.testing.assert_allclose(warp_field(w, u), expected, rtol=0, atol=5e-6)


def test_integrate_velocity_matches_the_textbook_loop():
    """The fused numba scaling and squaring equals u = v / 2**s; u = u + warp_field(u, u) written out in numpy."""
    v = smooth_field(SHAPE, 3.0, seed=10)
    u = v.astype(np.float64) / 2**7
    for _ in range(7):
        u = u + np.stack([reference_warp(c, u) for c in u])
    np.testing.assert_allclose(integrate_velocity(v), u, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float32, np.bool_])
def test_warp_labels_keeps_dtype(dtype):
    """Nearest-neighbour warping returns the labels' dtype, and its values come from the label map."""
    labels = np.random.default_rng(11).integers(0, 2, SHAPE).astype(dtype)
    out = warp_labels(labels, smooth_field(SHAPE, 2.0))
    assert out.dtype == labels.dtype
    assert set(np.unique(out)) <= set(np.unique(labels))


@pytest.mark.parametrize("mode", [WarpMode.BILINEAR, "bilinear", WarpMode.NEAREST, "nearest"])
def test_warp_dispatches_on_mode(mode):
    """warp(mode=...) is warp_image for bilinear and warp_labels for nearest."""
    image, u = random_image(SHAPE), smooth_field(SHAPE, 2.0)
    expected = warp_image(image, u) if WarpMode(mode) is WarpMode.BILINEAR else warp_labels(image, u)
    np.testing.assert_array_equal(warp(image, u, mode), expected)


# --- numba == torch -------------------------------------------------------------------------------

PARITY_SHAPES = [SHAPE, (1, 9, 10), (9, 10, 1), (15, 8, 11)]


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_torch_warp_matches_numba(shape):
    """Bilinear warping: torch grid_sample == numba (border clamping included)."""
    image, u = random_image(shape), smooth_field(shape, 3.0, seed=12)
    got = warp_torch.warp(to_torch(image[None]), to_torch(u))[0, 0].numpy()
    np.testing.assert_allclose(got, warp_image(image, u), rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_torch_nearest_matches_numba_labels(shape):
    """Nearest warping: torch == numba when no coordinate sits on a .5 tie."""
    labels = np.random.default_rng(13).integers(0, 9, shape).astype(np.int32)
    u = smooth_field(shape, 3.0, seed=14)
    frac = u - np.floor(u)
    u = np.where(np.abs(frac - 0.5) < 0.05, u + 0.1, u).astype(np.float32)  # keep away from ties
    got = warp_torch.warp(to_torch(labels[None].astype(np.float32)), to_torch(u), mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(got.astype(np.int32), warp_labels(labels, u))


@pytest.mark.parametrize("shape", PARITY_SHAPES)
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_torch_integrate_velocity_matches_numba(shape, steps):
    """Scaling and squaring: torch == numba to 1e-5 of a 3-voxel field."""
    v = smooth_field(shape, 3.0, seed=15)
    got = warp_torch.integrate_velocity(to_torch(v), steps=steps)[0].numpy()
    np.testing.assert_allclose(got, integrate_velocity(v, steps=steps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_torch_compose_matches_numba(shape):
    """Composition: torch == numba."""
    u1, u2 = smooth_field(shape, 2.0, seed=16), smooth_field(shape, 2.0, seed=17)
    got = warp_torch.compose(to_torch(u1), to_torch(u2))[0].numpy()
    np.testing.assert_allclose(got, compose(u1, u2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_torch_jacobian_matches_numba(shape):
    """Jacobian determinant: torch == numba (same finite differences)."""
    u = smooth_field(shape, 3.0, seed=18, sigma=2.0)
    got = warp_torch.jacobian_determinant(to_torch(u))[0].numpy()
    np.testing.assert_allclose(got, jacobian_determinant(u), rtol=0, atol=1e-5)


def _away_from_integers(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float64 displacement in ±[0.1, 0.4] voxel: no sample on a grid line, where trilinear has a kink."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.1, 0.4, shape) * rng.choice([-1.0, 1.0], shape)
    return torch.from_numpy(u)


def test_torch_warp_gradcheck():
    """Gradients of the bilinear warp with respect to image and displacement (float64)."""
    image = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    u = _away_from_integers((1, 3, 4, 5, 6), seed=19).requires_grad_(True)
    assert torch.autograd.gradcheck(warp_torch.warp, (image, u), eps=1e-6, atol=1e-5)


def test_torch_integrate_velocity_gradcheck():
    """Gradients of scaling and squaring with respect to the velocity (float64)."""
    v = _away_from_integers((1, 3, 4, 5, 6), seed=20).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: warp_torch.integrate_velocity(x, steps=4), (v,), eps=1e-6, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------

_U = np.zeros((3, *SHAPE), np.float32)
_IMAGE = np.zeros(SHAPE, np.float32)
_GOT = r"got \(2, 12, 14, 16\)"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: warp_image(_IMAGE, np.zeros((2, *SHAPE), np.float32)), r"shape \(3, Z, Y, X\).*" + _GOT),
        (lambda: warp_image(_IMAGE, np.zeros(SHAPE, np.float32)), r"shape \(3, Z, Y, X\).*got \(12, 14, 16\)"),
        (
            lambda: warp_image(np.zeros((12, 14)), _U),
            r"image must have shape \(Z, Y, X\) = \(12, 14, 16\) to match the field, got \(12, 14\)$",
        ),
        (lambda: warp_labels(np.zeros((12, 14, 15), int), _U), r"labels must have shape .*got \(12, 14, 15\)"),
        (lambda: warp_labels(np.zeros(SHAPE, "U1"), _U), r"labels must be integer, bool or float, got dtype <U1"),
        (lambda: warp_image(np.zeros(SHAPE, complex), _U), r"image must be integer, bool or float, got dtype complex"),
        (
            lambda: warp_field(np.zeros((3, 12, 14, 15)), _U),
            r"field w must have shape \(3, 12, 14, 16\) to match the other input, got \(3, 12, 14, 15\)",
        ),
        (lambda: compose(_U, np.zeros((3, 4, 4, 4))), r"u_first must have shape \(3, 4, 4, 4\).*got \(3, 12, 14, 16\)"),
        (lambda: integrate_velocity(np.zeros((3, *SHAPE), np.int32)), r"floating-point .* got dtype int32"),
        (lambda: integrate_velocity(_U, steps=-1), r"steps must be a non-negative integer, got -1"),
        (lambda: invert(_U, iterations=2.5), r"iterations must be a non-negative integer, got 2.5"),
        (lambda: jacobian_determinant(np.zeros((3, 0, 4, 4))), r"got \(3, 0, 4, 4\)"),
        (lambda: warp(_IMAGE, _U, mode="cubic"), r"unknown warp mode 'cubic'"),
    ],
)
def test_bad_input_is_refused_with_a_reason(call, match):
    """Wrong shapes, dtypes and parameters raise BreathcastError naming what was expected and received."""
    with pytest.raises(BreathcastError, match=match):
        call()


_T_IMAGE, _T_U = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: warp_torch.warp(_T_IMAGE, torch.zeros(1, 3, 4, 4)), r"\(N, 3, Z, Y, X\).*got \(1, 3, 4, 4\)"),
        (lambda: warp_torch.warp(torch.zeros(1, 1, 4, 4, 5), _T_U), r"image must have shape .*\(1, C, 4, 4, 4\)"),
        (lambda: warp_torch.warp(_T_IMAGE.long(), _T_U), r"image must be floating-point, got torch.int64"),
        (lambda: warp_torch.warp(_T_IMAGE, _T_U, mode="cubic"), r"unknown warp mode 'cubic'"),
        (lambda: warp_torch.integrate_velocity(torch.zeros(1, 2, 4, 4, 4)), r"velocity v must have shape \(N, 3, Z"),
        (lambda: warp_torch.jacobian_determinant(torch.zeros(3, 4, 4, 4)), r"got \(3, 4, 4, 4\)"),
    ],
)
def test_torch_bad_input_is_refused_with_a_reason(call, match):
    """The torch kernels check shapes at the door too."""
    with pytest.raises(BreathcastError, match=match):
        call()
