"""The Cython max-pool cores (fastconv.kernels._pool) called directly, against the naive oracle.

The conformance suite (test_pool.py, test_torch.py) checks them through the public functions;
here: the arguments the public layer never passes (no indices, bad indices, several threads
sharing a call's work counter).
"""

import numpy as np
import pytest

from fastconv._validate import max_pool2d as validate_pool
from fastconv.kernels import _pool, naive
from fastconv.kernels.im2col import geometry
from test_im2col_core import run_parts

CASES = [
    (((2, 3, 9, 8), 3, 2, 1, 1, False)),
    (((1, 2, 10, 9), (3, 2), (2, 1), (1, 0), (2, 1), True)),
    (((2, 2, 7, 5), 2, 2, 0, 1, True)),
]


def spec_of(shape, kernel, stride, padding, dilation, ceil_mode):
    x = np.zeros(shape)
    return validate_pool(x, kernel, stride, padding, dilation, ceil_mode)[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=["3x3-s2-pad1", "dilated-ceil", "2x2-ceil-odd"])
def test_forward_matches_naive_with_and_without_indices(case, dtype):
    spec = spec_of(*case)
    x = np.random.default_rng(0).standard_normal(spec.x_shape).astype(dtype)
    x[0, 0, 1, 1] = np.nan
    want, want_idx = naive.max_pool2d_forward(x, spec, True)
    out = np.full(spec.out_shape, 7, dtype)
    idx = np.full(spec.out_shape, -1, np.int64)
    geo = geometry(spec, spec.kernel)
    run_parts(_pool.max_pool_forward, (x, out, idx, geo), 3)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(idx, want_idx)
    out2 = np.full(spec.out_shape, 7, dtype)
    run_parts(_pool.max_pool_forward, (x, out2, None, geo), 2)
    np.testing.assert_array_equal(out2, want)


def test_backward_adds_overlaps_and_is_identical_across_threads():
    spec = spec_of((4, 8, 33, 31), 3, 1, 1, 1, False)
    x = np.random.default_rng(1).permutation(int(np.prod(spec.x_shape))).reshape(spec.x_shape)
    x = x.astype(np.float32)
    _, idx = naive.max_pool2d_forward(x, spec, True)
    g = np.random.default_rng(2).standard_normal(spec.out_shape).astype(np.float32)
    want = naive.max_pool2d_backward(g, idx, spec)
    runs = []
    for t in (1, 3, 3):
        dx = np.full(spec.x_shape, np.nan, np.float32)
        run_parts(_pool.max_pool_backward, (g, idx, dx), t)
        runs.append(dx)
    np.testing.assert_allclose(runs[0], want, rtol=1e-6, atol=1e-6)
    for dx in runs[1:]:
        assert dx.tobytes() == runs[0].tobytes()


def test_backward_rejects_indices_outside_the_plane():
    g = np.ones((1, 1, 2, 2))
    idx = np.array([[[[0, 3], [16, 5]]]])
    dx = np.empty((1, 1, 4, 4))
    with pytest.raises(ValueError, match="1 indices lie outside"):
        _pool.max_pool_backward(g, idx, dx, np.zeros(1, np.int64))


def test_bad_arguments_raise():
    x = np.zeros((1, 2, 4, 4))
    c = np.zeros(1, np.int64)
    geo = (1, 2, 4, 4, 2, 2, 2, 2, 2, 0, 0, 1, 1, 2, 2, 1)
    with pytest.raises(ValueError, match="not a valid problem geometry"):
        _pool.max_pool_forward(x, np.zeros((1, 2, 2, 2)), None, geo[:5] + (0,) + geo[6:], c)
    with pytest.raises(ValueError, match="do not fit the geometry"):
        _pool.max_pool_forward(x, np.zeros((1, 3, 2, 2)), None, geo, c)
    with pytest.raises(ValueError, match="indices must have"):
        _pool.max_pool_forward(x, np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 1), np.int64),
                               geo, c)
    with pytest.raises(ValueError, match="indices must have"):
        _pool.max_pool_backward(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 1, 2), np.int64), x, c)
