"""max-pool forward and backward: every registered method against a NumPy reference."""

import numpy as np
import pytest

import fastconv as fc
from helpers import DTYPES, SIM, checked, is_cuda, ref_max_pool2d, to_host

POOL_CASES = [  # (name, x shape, options, tiny enough for the simulator)
    ("2x2", (2, 3, 8, 8), dict(kernel_size=2), True),
    ("2x2-odd-input", (2, 2, 7, 9), dict(kernel_size=2), True),
    ("3x3-s2-overlap", (2, 3, 9, 9), dict(kernel_size=3, stride=2), True),
    ("3x3-s1-pad1", (1, 2, 6, 7), dict(kernel_size=3, stride=1, padding=1), True),
    ("3x2-s21-pad10", (2, 2, 7, 8), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
     False),
    ("3x3-s2-ceil", (2, 2, 8, 8), dict(kernel_size=3, stride=2, ceil_mode=True), True),
    ("2x2-s2-ceil-odd", (1, 2, 7, 5), dict(kernel_size=2, ceil_mode=True), True),
    ("3x3-s2-pad1-ceil", (2, 2, 10, 9), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
     False),
    ("2x2-dil2", (2, 2, 9, 8), dict(kernel_size=2, stride=1, dilation=2), True),
    ("3x3-dil2-pad1", (1, 3, 9, 10), dict(kernel_size=3, stride=2, dilation=2, padding=1),
     False),
    ("4x4-s3-pad2-ceil", (2, 2, 11, 13), dict(kernel_size=4, stride=3, padding=2,
                                             ceil_mode=True), False),
    ("1x1", (2, 2, 5, 4), dict(kernel_size=1), False),
    ("whole-plane", (2, 3, 5, 6), dict(kernel_size=(5, 6)), True),
    ("medium", (3, 17, 23, 21), dict(kernel_size=3, stride=2, padding=1), False),
    # rows of 8 windows and more: the vector blocks, a row's last block overlapping
    ("2x2-wide", (2, 3, 6, 38), dict(kernel_size=2), False),
    ("2x2-s1-wide", (1, 2, 5, 21), dict(kernel_size=2, stride=1), False),
    ("3x3-s1-wide", (1, 2, 6, 20), dict(kernel_size=3, stride=1), False),
    ("3x3-s3-ceil-wide", (2, 2, 11, 29), dict(kernel_size=3, ceil_mode=True), False),
    # rows shorter than a block in many planes: several work items of planes each, the
    # last plane's last rows at the end of the array
    ("2x2-short-rows-many-planes", (40, 30, 12, 12), dict(kernel_size=2), False),
    ("3x3-s1-pad1-short-rows-many-planes", (8, 64, 9, 7), dict(kernel_size=3, stride=1,
                                                               padding=1), False),
]


def pool_params():
    from fastconv import _registry

    out = []
    for m in _registry.known("max_pool2d"):
        for name, shape, opts, tiny in POOL_CASES:
            if is_cuda(m) and SIM and not tiny:
                continue
            out.append(pytest.param(m, shape, opts, marks=[pytest.mark.cuda] if is_cuda(m)
                                    else [], id=f"{m}-{name}"))
    return out


def _all_methods():
    from fastconv import _registry

    return [pytest.param(m, marks=[pytest.mark.cuda] if is_cuda(m) else [], id=m)
            for m in _registry.known("max_pool2d")]


def _scattered(g, idx, shape):
    """The reference backward: each gradient added at its flat index, by np.add.at."""
    want = np.zeros(shape)
    n, c = np.indices(shape[:2])
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            k = idx[:, :, i, j]
            np.add.at(want, (n, c, k // shape[3], k % shape[3]), g[:, :, i, j])
    return want


def distinct(shape, dtype, seed=0):
    """Values without ties (a shuffled arange), so every window has one maximum."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.5 - 40).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,shape,opts", pool_params())
def test_forward_and_indices(method, shape, opts, dtype):
    if is_cuda(method):
        shape = (1, *shape[1:])
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    out, idx = checked(fc.max_pool2d, x, **opts, return_indices=True, method=method)
    out, idx = to_host(out), to_host(idx)
    want, want_idx = ref_max_pool2d(x, **opts)
    assert out.dtype == dtype and idx.dtype == np.int64
    assert out.shape == want.shape == idx.shape
    np.testing.assert_array_equal(out, want.astype(dtype))
    np.testing.assert_array_equal(idx, want_idx)
    # out without indices is the same
    np.testing.assert_array_equal(to_host(fc.max_pool2d(x, **opts, method=method)), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,shape,opts", pool_params())
def test_backward_routes_and_adds(method, shape, opts, dtype):
    if is_cuda(method):
        shape = (1, *shape[1:])
    x = distinct(shape, dtype)
    out, idx = fc.max_pool2d(x, **opts, return_indices=True, method="naive")
    g = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    got = to_host(checked(fc.max_pool2d_backward, g, idx, x.shape, **opts, method=method))
    want = _scattered(g, idx, shape)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method", _all_methods())
@pytest.mark.parametrize("shape,opts", [((2, 3, 6, 38), dict(kernel_size=2)),
                                        ((1, 2, 9, 29), dict(kernel_size=3, ceil_mode=True)),
                                        ((1, 2, 4, 10), dict(kernel_size=2))],
                         ids=["2x2", "3x3-ceil", "2x2-short-rows"])
def test_backward_takes_any_positions(method, shape, opts, dtype):
    """Indices need not come from the forward: any position in the plane gets its gradient,
    also where the windows tile the plane (which has a write-once path for its own argmax)."""
    if is_cuda(method):
        shape = (1, *shape[1:])
    rng = np.random.default_rng(5)
    x = distinct(shape, dtype)
    out, idx = fc.max_pool2d(x, **opts, return_indices=True, method="naive")
    foreign = rng.random(idx.shape) < 0.1
    idx = np.where(foreign, rng.integers(0, shape[2] * shape[3], idx.shape), idx)
    g = rng.standard_normal(out.shape).astype(dtype)
    got = to_host(checked(fc.max_pool2d_backward, g, idx, x.shape, **opts, method=method))
    want = _scattered(g, idx, shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", _all_methods())
def test_backward_matches_numerical_gradient(method):
    opts = dict(kernel_size=3, stride=2, padding=1)
    x = distinct((1, 2, 7, 7), np.float64, seed=3)
    _, idx = fc.max_pool2d(x, **opts, return_indices=True, method=method)
    idx = to_host(idx)
    g = np.random.default_rng(4).standard_normal(idx.shape)
    got = to_host(fc.max_pool2d_backward(g, idx, x.shape, **opts, method=method))
    eps, num = 1e-4, np.empty_like(x)  # gaps between values are 0.5, so eps keeps the argmax
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        num[i] = np.sum((ref_max_pool2d(hi, **opts)[0] - ref_max_pool2d(lo, **opts)[0]) * g) / (
            2 * eps)
    np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", _all_methods())
def test_ties_take_the_first_maximum(method):
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = x[0, 0, 1, 1] = 5.0  # three maxima in the first window
    x[0, 0, 2:, 2:] = 1.0  # a window of four equal values
    out, idx = fc.max_pool2d(x, 2, return_indices=True, method=method)
    np.testing.assert_array_equal(to_host(idx)[0, 0], [[1, 2], [8, 10]])
    np.testing.assert_array_equal(to_host(out)[0, 0], [[5, 0], [0, 1]])


@pytest.mark.parametrize("method", _all_methods())
def test_nan_propagates(method):
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 3, 3] = np.nan
    out, idx = fc.max_pool2d(x, 2, return_indices=True, method=method)
    out, idx = to_host(out)[0, 0], to_host(idx)[0, 0]
    assert np.isnan(out[0, 0]) and np.isnan(out[1, 1])
    assert out[0, 1] == 7 and out[1, 0] == 13
    np.testing.assert_array_equal(idx, [[4, 7], [13, 15]])


@pytest.mark.parametrize("method", _all_methods())
def test_padding_is_minus_infinity(method):
    x = -np.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # all negative: zero padding would win
    out, idx = fc.max_pool2d(x, 3, stride=2, padding=1, return_indices=True, method=method)
    np.testing.assert_array_equal(to_host(out)[0, 0], [[-1, -2], [-5, -6]])
    np.testing.assert_array_equal(to_host(idx)[0, 0], [[0, 1], [4, 5]])


@pytest.mark.parametrize("method", _all_methods())
def test_ceil_mode_sizes_match_pytorch_rule(method):
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 5))
    assert to_host(fc.max_pool2d(x, 2, method=method)).shape == (1, 1, 2, 2)
    assert to_host(fc.max_pool2d(x, 2, ceil_mode=True, method=method)).shape == (1, 1, 3, 3)
    # a window that would start in the right padding is dropped
    assert to_host(fc.max_pool2d(x, 2, stride=2, padding=1, ceil_mode=True,
                                 method=method)).shape == (1, 1, 3, 3)


@pytest.mark.parametrize("method", [p for p in _all_methods() if "cuda" not in p.id])
def test_pool_is_deterministic_and_leaves_input(method):
    x = np.random.default_rng(3).standard_normal((4, 8, 32, 32)).astype(np.float32)
    runs = [checked(fc.max_pool2d, x, 3, 2, 1, return_indices=True, method=method)
            for _ in range(3)]
    for out, idx in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
        np.testing.assert_array_equal(idx, runs[0][1])


@pytest.mark.parametrize("method", [m for m in ("naive", "im2col", "direct", "auto")])
@pytest.mark.parametrize("shape,opts", [((2, 3, 6, 38), dict(kernel_size=2)),
                                        ((1, 2, 4, 10), dict(kernel_size=2)),
                                        ((1, 2, 9, 29), dict(kernel_size=3, ceil_mode=True)),
                                        ((2, 3, 9, 9), dict(kernel_size=3, stride=2))],
                         ids=["2x2-wide", "2x2-short", "3x3-ceil", "3x3-s2"])
@pytest.mark.parametrize("value", [-1, 1 << 32, "plane"])
def test_backward_refuses_indices_outside_the_plane(method, shape, opts, value):
    """Every method, also the ones that check indices in their own pass (direct): the same
    message, whether the bad index sits in a full window, a partial one or a short row, and
    whatever its value (one that equals a tap in its low 32 bits too)."""
    if method == "im2col" and "im2col" not in fc.methods():
        pytest.skip("no compiled core")
    x = distinct(shape, np.float32)
    out, idx = fc.max_pool2d(x, **opts, return_indices=True, method="naive")
    plane = shape[2] * shape[3]
    for where in [(0, 0, 0, 0), (0, 1, out.shape[2] - 1, out.shape[3] - 1)]:
        bad = idx.copy()
        bad[where] = plane if value == "plane" else (idx[where] + value if value > 0 else value)
        before = bad.copy()
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, {plane}\).*got "
                                             r"values in \["):
            fc.max_pool2d_backward(out, bad, shape, **opts, method=method)
        np.testing.assert_array_equal(bad, before)
