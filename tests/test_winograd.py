"""The winograd method beyond the shared grid: random 3x3 stride-1 problems against scipy.signal
and the numerical gradients, its block tails, its accuracy, what it refuses, and that it never
keeps stale weights."""

import numpy as np
import pytest

import fastconv as fc
from fastconv import _validate
from fastconv.kernels import winograd
from helpers import einsum_conv2d, numerical_grads, scipy_conv2d, tol

pytestmark = pytest.mark.skipif("winograd" not in fc.methods("conv2d"),
                                reason="winograd needs the compiled core's BLAS")


def _random_problem(rng, dtype):
    n, c, k = (int(v) for v in rng.integers(1, 6, 3))
    h, w = (int(v) for v in rng.integers(1, 16, 2))
    pads = tuple(tuple(int(p) for p in rng.integers(0, 4, 2)) for _ in range(2))
    if h + sum(pads[0]) < 3:
        h = 3
    if w + sum(pads[1]) < 3:
        w = 3
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    return x, wt, b, dict(padding=pads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_random_problems_match_scipy(dtype):
    rng = np.random.default_rng(7)
    for _ in range(40):
        x, w, b, conf = _random_problem(rng, dtype)
        got = fc.conv2d(x, w, b, **conf, method="winograd")
        want = scipy_conv2d(x, w, b, **conf)
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **tol(dtype, 9 * x.shape[1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_random_gradients_match_naive(dtype):
    rng = np.random.default_rng(8)
    for _ in range(25):
        x, w, _, conf = _random_problem(rng, dtype)
        g = rng.standard_normal(einsum_conv2d(x, w, **conf).shape).astype(dtype)
        got = fc.conv2d_backward(g, x, w, **conf, method="winograd")
        want = fc.conv2d_backward(g, x, w, **conf, method="naive")
        for a, e in zip(got, want):
            np.testing.assert_allclose(a, e, **tol(dtype, 9 * max(x.shape[1], w.shape[0])))


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _hwio(w):
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_channels_last_random_problems_match_scipy_and_naive(dtype):
    """The channels-last kernel (transforms along the channels, products of tiles x channels):
    forward against scipy.signal, all gradients against naive, on channel counts below, at
    and above a vector."""
    rng = np.random.default_rng(13)
    for i in range(30):
        x, w, b, conf = _random_problem(rng, dtype)
        if i % 3 == 0:  # wider than a vector of channels, with a partial one
            x = rng.standard_normal((*x.shape[:1], 19, *x.shape[2:])).astype(dtype)
            w = rng.standard_normal((21, 19, 3, 3)).astype(dtype)
            b = rng.standard_normal(21).astype(dtype)
        got = fc.conv2d(_nhwc(x), _hwio(w), b, **conf, layout="NHWC", method="winograd")
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), scipy_conv2d(x, w, b, **conf),
                                   **tol(dtype, 9 * x.shape[1]))
        g = rng.standard_normal(einsum_conv2d(x, w, **conf).shape).astype(dtype)
        dx, dw, db = fc.conv2d_backward(_nhwc(g), _nhwc(x), _hwio(w), **conf, layout="NHWC",
                                        method="winograd")
        want = fc.conv2d_backward(g, x, w, **conf, method="naive")
        red = 9 * max(x.shape[1], w.shape[0])
        np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), want[0], **tol(dtype, red))
        np.testing.assert_allclose(dw.transpose(3, 2, 0, 1), want[1], **tol(dtype, red))
        np.testing.assert_allclose(db, want[2], **tol(dtype, red))


def test_nchw_through_the_channels_last_kernel_matches_scipy_and_naive():
    """float32 NCHW problems with a vector to 64 channels each side run the channels-last
    kernel on transposed arrays (forward, and grad-input with the channel counts swapped)."""
    from fastconv.kernels._simd import lanes

    rng = np.random.default_rng(14)
    dtype = np.float32
    nl = lanes(np.dtype(dtype))
    assert not winograd._by_channels_last(64, 64, np.float64)
    assert not winograd._by_channels_last(nl - 1, 64, dtype)
    assert not winograd._by_channels_last(nl, 65, dtype)
    for c, k, hw, pads in [(nl, nl + 3, (13, 13), ((1, 1), (1, 1))),
                           (64, nl, (9, 22), ((0, 2), (3, 1)))]:
        assert winograd._by_channels_last(c, k, dtype)
        x = rng.standard_normal((2, c, *hw)).astype(dtype)
        w = rng.standard_normal((k, c, 3, 3)).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        got = fc.conv2d(x, w, b, padding=pads, method="winograd")
        assert got.flags.c_contiguous
        np.testing.assert_allclose(got, scipy_conv2d(x, w, b, padding=pads), **tol(dtype, 9 * c))
        g = rng.standard_normal(got.shape).astype(dtype)
        want = fc.conv2d_backward(g, x, w, padding=pads, method="naive")
        for need in [(True, True, True), (True, False, False), (False, True, False)]:
            dx, dw, db = fc.conv2d_backward(g, x, w, padding=pads, method="winograd",
                                            need_input=need[0], need_weight=need[1],
                                            need_bias=need[2])
            assert [a is not None for a in (dx, dw, db)] == list(need)
            if need[0]:
                np.testing.assert_allclose(dx, want.grad_input, **tol(dtype, 9 * k))
            if need[1]:
                assert dw.flags.c_contiguous
                np.testing.assert_allclose(dw, want.grad_weight, **tol(dtype, g[:, 0].size))
            if need[2]:
                np.testing.assert_allclose(db, want.grad_bias, **tol(dtype, g[:, 0].size))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("chunk", [1, 5000, 4 << 20], ids=["row", "few", "default"])
def test_grad_weight_by_winograd_in_chunks(chunk, layout, dtype, monkeypatch):
    """Grad-weight by Winograd (`_grad_weight_nhwc`, where both channel counts fill a vector)
    over chunks of one tile row, a few and all, added in order: against naive, and
    bit-identical on 1 and 3 threads."""
    from fastconv.kernels._simd import lanes

    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(15)
    c, k = lanes(np.dtype(dtype)), lanes(np.dtype(dtype)) + 5
    x = rng.standard_normal((3, c, 10, 13)).astype(dtype)
    w = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    conf = dict(padding=((2, 0), (1, 1)))
    g = rng.standard_normal(einsum_conv2d(x, w, **conf).shape).astype(dtype)
    want = fc.conv2d_backward(g, x, w, **conf, method="naive").grad_weight
    assert winograd._weight_by_winograd(
        _validate.conv2d_backward(g, x, w, 1, conf["padding"], 1, 1)[3])
    if layout == "NHWC":
        x, w, g, want = _nhwc(x), _hwio(w), _nhwc(g), _hwio(want)
    threads, runs = fc.get_num_threads(), []
    try:
        for n in (1, 3):
            fc.set_num_threads(n)
            runs.append(fc.conv2d_backward(g, x, w, **conf, layout=layout, method="winograd",
                                           need_input=False, need_bias=False).grad_weight)
    finally:
        fc.set_num_threads(threads)
    np.testing.assert_allclose(runs[0], want, **tol(dtype, g.size // k))
    np.testing.assert_array_equal(runs[1], runs[0])


def test_gradients_match_central_differences():
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 3))
    conf = dict(padding=((2, 0), (1, 3)))
    g = rng.standard_normal(einsum_conv2d(x, w, **conf).shape)
    dx, dw, db = fc.conv2d_backward(g, x, w, **conf, method="winograd")
    ndx, ndw, ndb = numerical_grads(x, w, g, conf)
    np.testing.assert_allclose(dx, ndx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, ndw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(db, ndb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_small_problems_do_not_depend_on_the_threads(layout, dtype):
    """Blocks of tile rows never follow the thread count (BLAS's sums can depend on how many
    tiles one call holds): forward and grad-input bit-identical on 1, 2 and 3 threads, on
    problems of a few tile rows, through each kernel (16-64 channels take the channels-last
    one from NCHW in float32). Winograd's grad-weight: test_grad_weight_by_winograd_in_chunks
    (im2col's, for fewer channels, follows the threads, as documented there)."""
    rng = np.random.default_rng(16)
    for c, k, hw in [(32, 7, (12, 11)), (4, 3, (9, 14)), (20, 24, (5, 30))]:
        x = rng.standard_normal((1, c, *hw)).astype(dtype)
        w = rng.standard_normal((k, c, 3, 3)).astype(dtype)
        g = rng.standard_normal((1, k, *hw)).astype(dtype)
        if layout == "NHWC":
            x, w, g = _nhwc(x), _hwio(w), _nhwc(g)
        threads, runs = fc.get_num_threads(), []
        try:
            for n in (1, 2, 3):
                fc.set_num_threads(n)
                runs.append((fc.conv2d(x, w, padding=1, layout=layout, method="winograd"),
                             fc.conv2d_backward(g, x, w, padding=1, layout=layout,
                                                method="winograd").grad_input))
        finally:
            fc.set_num_threads(threads)
        for other in runs[1:]:
            for a, ref in zip(other, runs[0]):
                np.testing.assert_array_equal(a, ref)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_many_blocks_with_a_tail_and_thread_independent_results(layout):
    """More tiles than one block holds, a partial last block, and bit-identical results on one
    thread and on all."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 5, 70, 37)).astype(np.float32)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    rows = winograd.plan(3 * 18, 10)  # tile rows of 10 tiles
    assert rows < 3 * 18 and (3 * 18) % rows
    want = scipy_conv2d(x, w, padding=1)
    if layout == "NHWC":
        x, w, want = _nhwc(x), _hwio(w), _nhwc(want)
    got = fc.conv2d(x, w, padding=1, layout=layout, method="winograd")
    np.testing.assert_allclose(got, want, **tol(np.float32, 45))
    threads = fc.get_num_threads()
    try:
        fc.set_num_threads(1)
        one = fc.conv2d(x, w, padding=1, layout=layout, method="winograd")
    finally:
        fc.set_num_threads(threads)
    np.testing.assert_array_equal(one, got)


def test_float32_error_is_within_the_bench_check_on_a_deep_reduction():
    """The bench's check (relative max error <= 1e-5 sqrt(C R S)) on a VGG-like reduction, and
    within a known factor of im2col's own float32 error."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 128, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 128, 3, 3)).astype(np.float32)
    want = scipy_conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    scale = np.abs(want).max()
    err = np.abs(fc.conv2d(x, w, padding=1, method="winograd") - want).max() / scale
    base = np.abs(fc.conv2d(x, w, padding=1, method="im2col") - want).max() / scale
    assert err <= 1e-5 * np.sqrt(128 * 9)
    assert err <= 50 * base  # measured: about 20x (F(4x4, 3x3) amplifies rounding)


def test_weights_changed_in_place_are_seen():
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((1, 2, 8, 8)), rng.standard_normal((3, 2, 3, 3))
    first = fc.conv2d(x, w, method="winograd")
    w *= -2.0
    np.testing.assert_allclose(fc.conv2d(x, w, method="winograd"), -2.0 * first, rtol=1e-12)


@pytest.mark.parametrize("w_shape,conf,match", [
    ((4, 3, 5, 5), {}, "3x3 kernels"),
    ((4, 3, 3, 3), dict(stride=2), "stride 1"),
    ((4, 3, 3, 3), dict(dilation=2), "dilation 1"),
    ((6, 1, 3, 3), dict(groups=3), "groups=1"),
])
def test_refuses_what_it_cannot_compute_by_name(w_shape, conf, match):
    x = np.ones((1, 3, 9, 9))
    w = np.ones(w_shape)
    with pytest.raises(ValueError, match=f"method='winograd' cannot run this problem.*{match}"):
        fc.conv2d(x, w, **conf, method="winograd")
    g = np.ones_like(fc.conv2d(x, w, **conf, method="naive"))
    with pytest.raises(ValueError, match=match):
        fc.conv2d_backward(g, x, w, **conf, method="winograd")
    assert fc.choose_method("conv2d", x, w, **conf) != "winograd"


def test_weight_transform_is_exact_in_float64():
    """U = G w G^T: the 36 values reproduce the 3x3 correlation of a 6x6 patch (checked by the
    defining identity y = A^T (U * B^T d B) A)."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((1, 1, 3, 3))
    d = rng.standard_normal((6, 6))
    bt = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float)
    at = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                   [0, 1, -1, 8, -8, 1]], float)
    u = winograd.transform_weight(w)[:, 0, 0].reshape(6, 6)
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * w[0, 0]) for j in range(4)]
                     for i in range(4)])
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
