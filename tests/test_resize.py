"""FieldResizer: torch's trilinear (align_corners=False) resizing, component mixing, float16 output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from breathcast.errors import BreathcastError
from breathcast.geometry import field_to_lps_mm
from breathcast.resize import FieldResizer, evaluate_polynomial, resize_field, voxel_to_lps_matrix
from breathcast.state_model import DISTILLED_TERMS, design_matrix, evaluate_terms

from grids import OBLIQUE


@pytest.mark.parametrize("src, dst", [((8, 8, 8), (16, 16, 16)), ((6, 7, 9), (11, 5, 20)), ((8, 8, 8), (8, 8, 8))])
def test_resize_matches_torch_trilinear(src, dst):
    u = np.random.default_rng(0).normal(size=(3, *src)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(u)[None], size=dst, mode="trilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(FieldResizer(src, dst, np.eye(3, dtype=np.float32))(u), expected, atol=1e-5)


def test_default_matrix_rescales_voxels_and_float16_rounds_the_float32_result():
    u = np.random.default_rng(1).normal(size=(3, 6, 6, 6)).astype(np.float32) * 40
    as_voxels = resize_field(u, (12, 9, 6))
    same_fov = F.interpolate(torch.from_numpy(u)[None], size=(12, 9, 6), mode="trilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(as_voxels, same_fov * np.array([2.0, 1.5, 1.0])[:, None, None, None], rtol=1e-5, atol=1e-4)
    half = FieldResizer((6, 6, 6), (12, 9, 6), dtype=np.float16)(u)
    np.testing.assert_array_equal(half, as_voxels.astype(np.float16))


def test_lps_matrix_equals_field_to_lps_mm_on_an_oblique_grid():
    u = np.random.default_rng(2).normal(size=(3, *OBLIQUE.shape)).astype(np.float32)
    resized = FieldResizer(OBLIQUE.shape, OBLIQUE.shape, voxel_to_lps_matrix(OBLIQUE))(u)
    np.testing.assert_allclose(resized, field_to_lps_mm(u, OBLIQUE), atol=1e-4)


def test_polynomial_evaluation_matches_the_state_model():
    rng = np.random.default_rng(3)
    coefficients = rng.normal(size=(len(DISTILLED_TERMS), 3, 5, 4, 3)).astype(np.float32)
    a, r = rng.uniform(0, 1, 5), rng.uniform(-1, 1, 5)
    basis = design_matrix(a, r, DISTILLED_TERMS)
    np.testing.assert_allclose(evaluate_polynomial(coefficients, basis), evaluate_terms(coefficients, DISTILLED_TERMS, a, r), atol=1e-5)


def test_bad_shapes_are_refused():
    resizer = FieldResizer((4, 4, 4), (8, 8, 8))
    with pytest.raises(BreathcastError, match="field must have shape"):
        resizer(np.zeros((3, 4, 4, 5), np.float32))
    with pytest.raises(BreathcastError, match="out must be"):
        resizer(np.zeros((3, 4, 4, 4), np.float32), out=np.zeros((3, 8, 8, 8), np.float16))
    with pytest.raises(BreathcastError, match="float32 or float16"):
        FieldResizer((4, 4, 4), (8, 8, 8), dtype=np.float64)


_KERNEL_CACHE_PROBE = """
import json, numpy as np
from breathcast import resize
from breathcast.geometry import Grid
from breathcast.stream import field_coefficients
grid = Grid.centered((4, 4, 4), (20.0, 20.0, 20.0))
for coefficients in (np.float32, np.float16):
    model = field_coefficients.FieldModel(np.ones((1, 3, 4, 4, 4), coefficients), ((0, 0),), grid)
    for out in (np.float32, np.float16):
        model.field(np.ones(4), np.zeros(4), shape=(6, 6, 6), dtype=out)
        resize.FieldResizer((4, 4, 4), (6, 6, 6), dtype=out)(np.ones((3, 4, 4, 4), np.float32))
kernels = [resize._resize_x, resize._resize_zy, field_coefficients._polynomial_x, field_coefficients._resize_zy]
print(json.dumps([[sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())] for k in kernels]))
"""


def test_a_new_process_loads_the_field_kernels_from_numbas_cache():
    """Every float32/float16 variant of the field kernels compiles once per install, not once per process (a kernel
    made by a closure is never found in numba's cache: ~5-9 s of compiling at every start of a daemon)."""
    runs = [subprocess.run([sys.executable, "-c", _KERNEL_CACHE_PROBE], capture_output=True, text=True, check=True) for _ in range(2)]
    hits_and_misses = json.loads(runs[1].stdout)
    assert all(misses == 0 and hits > 0 for hits, misses in hits_and_misses), hits_and_misses
