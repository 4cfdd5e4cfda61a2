"""conv2d backward: every registered method against float64 central differences."""

import numpy as np
import pytest

import fastconv as fc
from helpers import (CONV_CASES, DTYPES, checked, is_cuda, method_case_params, method_params,
                     numgrad_for, takes, to_host, tol)


def _grads(method, g, x, w, conf, **need):
    out = checked(fc.conv2d_backward, g, x, w, **conf, method=method, **need)
    return tuple(None if a is None else to_host(a) for a in out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,case", method_case_params("conv2d_backward", small_only=True))
def test_backward_matches_numerical_gradient(method, case, dtype):
    x, w, g, (dx, dw, db) = numgrad_for(case.name)
    one_image = is_cuda(method)  # the simulator runs tiny problems: one image
    if one_image:  # images are independent, so dx of image 0 is unchanged; dw is not
        x, g, dx = x[:1], g[:1], dx[:1]
        db = g.sum(axis=(0, 2, 3))
    got = _grads(method, g.astype(dtype), x.astype(dtype), w.astype(dtype), case.conf)
    assert [a.shape for a in got] == [x.shape, w.shape, (w.shape[0],)]
    assert all(a.dtype == dtype for a in got)
    # dw and db sum over batch and positions; dx over output channels and taps
    reduction = int(np.prod(g.shape)) // g.shape[1]
    np.testing.assert_allclose(got[0], dx, **_numtol(dtype, case.reduction))
    if not one_image:  # see test_weight_grad_of_one_image_matches_naive
        np.testing.assert_allclose(got[1], dw, **_numtol(dtype, reduction))
    np.testing.assert_allclose(got[2], db, **_numtol(dtype, reduction))


def _numtol(dtype, reduction):
    t = tol(dtype, reduction)
    if np.dtype(dtype) == np.float64:  # central differences carry ~1e-9 of rounding noise
        t = dict(rtol=1e-6, atol=1e-6)
    return t


@pytest.mark.parametrize("method", method_params("conv2d_backward"))
def test_weight_grad_of_one_image_matches_naive(method):
    """The CUDA path of the test above checks dw on one image; here, for every method."""
    cases = [c for c in CONV_CASES[:12] if takes("conv2d_backward", method, c.x_shape,
                                                  c.w_shape, c.conf)]
    assert cases
    for case in cases:
        x, w, _ = case.arrays(np.float64, seed=9, n=1)
        g = np.random.default_rng(10).standard_normal(fc.conv2d(x, w, **case.conf).shape)
        want = _grads("naive", g, x, w, case.conf)
        got = _grads(method, g, x, w, case.conf)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, **tol(np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,case", [
    p for p in method_case_params("conv2d_backward") if p.values[1].name.startswith("medium")
])
def test_backward_on_larger_problems_matches_naive(method, case, dtype):
    x, w, _ = case.arrays(dtype, seed=4)
    g = np.random.default_rng(6).standard_normal(fc.conv2d(x, w, **case.conf).shape).astype(dtype)
    want = _grads("naive", g.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                  case.conf)
    got = _grads(method, g, x, w, case.conf)
    n_pos = int(np.prod(g.shape)) // g.shape[1]
    for a, b, red in zip(got, want, (case.reduction, n_pos, n_pos)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol(dtype, red))


@pytest.mark.parametrize("method", [p for p in method_params("conv2d_backward")
                                    if "cuda" not in p.id])
def test_weight_grad_over_channel_counts_matches_naive(method):
    """Output channels per group 1-7 (direct splits them into blocks of 1-3 channels), on
    planes shorter and longer than one vector of positions, float32 against naive float64."""
    rng = np.random.default_rng(21)
    checked_any = False
    for per_group, groups, hw in [(k, 1, hw) for k in range(1, 8) for hw in (5, 14)] + [
            (4, 2, 14), (7, 2, 5)]:
        c, k = 2 * groups, per_group * groups
        x = rng.standard_normal((3, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((k, c // groups, 3, 3)).astype(np.float32)
        conf = dict(groups=groups)
        if not takes("conv2d_backward", method, x.shape, w.shape, conf):
            continue
        g = rng.standard_normal(fc.conv2d(x, w, **conf).shape).astype(np.float32)
        want = _grads("naive", g.astype(np.float64), x.astype(np.float64),
                      w.astype(np.float64), conf, need_input=False, need_bias=False)[1]
        got = _grads(method, g, x, w, conf, need_input=False, need_bias=False)[1]
        np.testing.assert_allclose(got, want, **tol(np.float32, 3 * (hw - 2) ** 2))
        checked_any = True
    assert checked_any


@pytest.mark.parametrize("method", method_params("conv2d_backward"))
def test_need_flags(method):
    case = CONV_CASES[0]
    x, w, _ = case.arrays(np.float64, n=1)
    g = np.random.default_rng(1).standard_normal(fc.conv2d(x, w).shape)
    full = _grads(method, g, x, w, {})
    for flags in [(True, False, False), (False, True, False), (False, False, True),
                  (False, False, False)]:
        got = _grads(method, g, x, w, {}, need_input=flags[0], need_weight=flags[1],
                     need_bias=flags[2])
        for want_it, a, b in zip(flags, got, full):
            if want_it:
                np.testing.assert_allclose(a, b, **tol(np.float64))
            else:
                assert a is None
    res = fc.conv2d_backward(g, x, w, method=method)
    assert res._fields == ("grad_input", "grad_weight", "grad_bias")


@pytest.mark.parametrize("method", [p for p in method_params("conv2d_backward")
                                    if "cuda" not in p.id])
def test_backward_is_deterministic(method):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 16, 20, 20)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    g = rng.standard_normal((4, 16, 20, 20)).astype(np.float32)
    runs = [fc.conv2d_backward(g, x, w, padding=1, method=method) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(r, runs[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,w_shape,conf", [
    ((4, 1, 13, 13), (30, 1, 5, 5), {}),  # lenet-like: one channel, 30 filters
    ((5, 1, 9, 31), (7, 1, 3, 3), dict(padding=1)),  # rows of several vectors, 7 filters
    ((4, 3, 8, 11), (5, 3, 3, 3), dict(padding=((2, 0), (1, 3)))),  # uneven padding
    ((4, 2, 12, 10), (2, 2, 3, 3), dict(dilation=2, padding=1)),
    ((6, 4, 7, 7), (1, 4, 1, 1), {}),  # one filter, 1x1
    ((4, 4, 6, 9), (9, 4, 3, 5), dict(padding="same")),
    ((4, 2, 6, 20), (24, 2, 3, 3), {}),  # NHWC: whole register transposes of 18 pixels
    ((5, 1, 5, 6), (3, 1, 3, 3), dict(padding=3)),  # padding wider than the kernel
    ((4, 1, 28, 28), (6, 1, 5, 5), {}),  # 32 x 32 grids, 4 KB: one row more (see below)
], ids=["c1-k30", "c1-k7", "c3-pad", "c2-dil", "c4-1x1", "c4-same", "c2-k24", "big-pad",
        "c1-4k"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_direct_few_channel_backward_matches_naive(layout, x_shape, w_shape, conf, dtype):
    """direct's fused backward for 1-4 input channels (a few images per work item: their
    grad-output padded in cache, then dx, dw and db from it), against naive: with and
    without the bias, its shares of dw and db summed over images in order, and channels-last
    arrays through it (their grad-output moved into the padded grids by register
    transposes); the cases are checked to take that path."""
    from fastconv import _validate
    from fastconv.kernels import direct

    rng = np.random.default_rng(8)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    g = rng.standard_normal(fc.conv2d(x, w, **conf, method="naive").shape).astype(dtype)
    opts = dict(stride=1, padding=0, dilation=1, groups=1) | conf
    spec = _validate.conv2d_backward(g, x, w, **opts)[3]
    assert direct.few_channels(spec)
    want = _grads("naive", g.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                  conf)
    n_pos = g.size // g.shape[1]
    for need_bias in (True, False):
        if layout == "NCHW":
            got = _grads("direct", g, x, w, conf, need_bias=need_bias)
        else:
            dx, dw, db = _grads("direct", g.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1),
                                w.transpose(2, 3, 1, 0), conf | dict(layout="NHWC"),
                                need_bias=need_bias)
            got = (dx.transpose(0, 3, 1, 2), dw.transpose(3, 2, 0, 1), db)
        for a, b, red in zip(got, want, (int(np.prod(w_shape)) // x_shape[1], n_pos, n_pos)):
            if a is not None:
                np.testing.assert_allclose(a, b, **tol(dtype, red))
        assert (got[2] is None) == (not need_bias)
    # and the gate: five channels, a stride or too few images take the general kernels
    for xs, ws, more in [((4, 5, 8, 8), (3, 5, 3, 3), {}), ((4, 1, 9, 9), (3, 1, 3, 3),
                         dict(stride=2)), ((3, 1, 8, 8), (3, 1, 3, 3), {})]:
        a, b = np.ones(xs, dtype), np.ones(ws, dtype)
        gg = np.ones(fc.conv2d(a, b, **more).shape, dtype)
        opts = dict(stride=1, padding=0, dilation=1, groups=1) | more
        assert not direct.few_channels(_validate.conv2d_backward(gg, a, b, **opts)[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_direct_grad_output_grids_are_never_4k_apart(dtype):
    """Grad-output planes a multiple of 4 KB apart share L1 sets (lenet-c1's 32 x 32): their
    grid takes one row more, which the general grad-input still reads right (the fused
    few-channel kernel's case is c1-4k above); a grid that adds nothing stays x itself."""
    from fastconv import _validate
    from fastconv.kernels import direct

    rng = np.random.default_rng(9)
    for x_shape, w_shape, padded in [((2, 5, 28, 28), (6, 5, 5, 5), True),
                                     ((4, 1, 28, 28), (3, 1, 5, 5), True),
                                     ((2, 6, 32, 32), (4, 6, 1, 1), False)]:
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        g = rng.standard_normal(fc.conv2d(x, w, method="naive").shape).astype(dtype)
        spec = _validate.conv2d_backward(g, x, w, stride=1, padding=0, dilation=1,
                                         groups=1)[3]
        grid = direct._grad_input_plan(spec, 0).grid
        assert (grid.plane * np.dtype(dtype).itemsize % 4096 != 0) == padded
        want = _grads("naive", g, x, w, {})
        got = _grads("direct", g, x, w, {})
        n_pos = g.size // g.shape[1]
        for a, b, red in zip(got, want, (int(np.prod(w_shape)), n_pos, n_pos)):
            np.testing.assert_allclose(a, b, **tol(dtype, red))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_direct_grid_copy_writes_every_element(dtype):
    """The direct method's padded, phase-split copy (`_pad_planes`, which skips zero-filling)
    into a destination full of NaN: every element is written, with x's value or zero, as the
    index arithmetic of `_Grid` says; several work items of planes, strides 1 to 3."""
    from fastconv.kernels import _parallel, direct

    rng = np.random.default_rng(3)
    for shape, (pt, pl, sh, sw, hq, gw), per in [((3, 5, 7, 9), (1, 2, 1, 1, 9, 13), 2),
                                                 ((2, 3, 7, 9), (2, 1, 2, 2, 6, 6), 1),
                                                 ((1, 2, 5, 5), (0, 0, 3, 2, 2, 3), 4),
                                                 ((2, 2, 10, 11), (3, 0, 3, 3, 3, 3), 3)]:
        x = rng.standard_normal(shape).astype(dtype)
        dst = np.full((*shape[:2], sh, sw, hq, gw), np.nan, dtype)
        n_planes = shape[0] * shape[1]
        _parallel.run(direct._pad_planes, (x, dst, pt, pl, sh, sw, hq, gw, per),
                      -(-n_planes // per), 10**9)
        want = np.zeros_like(dst)
        for a in range(sh):
            for b in range(sw):
                for u in range(hq):
                    for v in range(gw):
                        r, c = u * sh + a - pt, v * sw + b - pl
                        if 0 <= r < shape[2] and 0 <= c < shape[3]:
                            want[:, :, a, b, u, v] = x[:, :, r, c]
        np.testing.assert_array_equal(dst, want)
        assert direct._padded(x, direct._Grid(pt, pl, sh, sw, hq, gw)).tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bias_gradient_over_many_blocks(layout, dtype):
    """The bias gradient on the thread pool (fastconv.kernels._reduce) over grad-outputs of
    several work items, with partial last items (channels-last: rows left over after the
    groups of rows summed together); one large enough to run on both threads. Against a
    float64 NumPy sum, on every CPU method, and bit-identical with one thread and with two."""
    rng = np.random.default_rng(5)
    shapes = [(3, 5, 61, 67), (3, 13, 37, 41), (2, 3, 5, 7), (4, 7, 250, 251)]
    methods = [m for m in fc.methods("conv2d_backward") if not is_cuda(m) and m != "auto"]
    for shape in shapes:
        n, k, h, wd = shape
        x = rng.standard_normal((n, 2, h, wd)).astype(dtype)
        w = rng.standard_normal((k, 2, 1, 1)).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        want = g.astype(np.float64).sum(axis=(0, 2, 3))
        usable = [m for m in methods if takes("conv2d_backward", m, x.shape, w.shape)]
        if layout == "NHWC":
            x, g = x.transpose(0, 2, 3, 1).copy(), g.transpose(0, 2, 3, 1).copy()
            w = w.transpose(2, 3, 1, 0).copy()

        def bias_grad(method):
            return fc.conv2d_backward(g, x, w, layout=layout, method=method, need_input=False,
                                      need_weight=False).grad_bias

        for method in usable:
            db = [bias_grad(method), bias_grad(method)]
            before = fc.get_num_threads()
            fc.set_num_threads(1)
            try:
                db.append(bias_grad(method))
            finally:
                fc.set_num_threads(before)
            assert db[0].dtype == dtype and db[0].shape == (k,)
            np.testing.assert_allclose(db[0], want, **tol(dtype, n * h * wd))
            assert db[0].tobytes() == db[1].tobytes() == db[2].tobytes(), method
