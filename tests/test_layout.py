"""layout="NHWC" (channels-last x, HWIO filters) on every conv and pool function and method:
the same numbers as NCHW on transposed arrays, whether the method reads NHWC natively or not."""

import numpy as np
import pytest

import fastconv as fc
from helpers import DTYPES, checked, conv_cases, is_cuda, method_params, takes, to_host, tol

X_IN, X_OUT = (0, 2, 3, 1), (0, 3, 1, 2)  # NCHW -> NHWC, NHWC -> NCHW
W_IN, W_OUT = (2, 3, 1, 0), (3, 2, 0, 1)  # OIHW -> HWIO, HWIO -> OIHW


def nhwc(a):
    return np.ascontiguousarray(a.transpose(X_IN))


def hwio(w):
    return np.ascontiguousarray(w.transpose(W_IN))


def _conv_params():
    return [pytest.param(m.values[0], c, marks=m.marks, id=f"{m.id}-{c.name}")
            for m in method_params("conv2d") for c in conv_cases(m.values[0])
            if takes("conv2d", m.values[0], c.x_shape, c.w_shape, c.conf)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method,case", _conv_params())
def test_conv2d_nhwc_is_nchw_transposed(method, case, dtype):
    x, w, b = case.arrays(dtype, seed=31, n=1 if is_cuda(method) else None)
    want = fc.conv2d(x, w, b, **case.conf, method="naive")
    y = to_host(checked(fc.conv2d, nhwc(x), hwio(w), b, **case.conf, layout="NHWC",
                        method=method))
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y.transpose(X_OUT), want, **tol(dtype, case.reduction))
    g = np.random.default_rng(32).standard_normal(want.shape).astype(dtype)
    ref = fc.conv2d_backward(g, x, w, **case.conf, method="naive")
    got = fc.conv2d_backward(nhwc(g), nhwc(x), hwio(w), **case.conf, layout="NHWC",
                             method=method)
    n_pos = g.size // g.shape[1]
    np.testing.assert_allclose(to_host(got.grad_input).transpose(X_OUT), ref.grad_input,
                               **tol(dtype, case.reduction))
    np.testing.assert_allclose(to_host(got.grad_weight).transpose(W_OUT), ref.grad_weight,
                               **tol(dtype, n_pos))
    np.testing.assert_allclose(to_host(got.grad_bias), ref.grad_bias, **tol(dtype, n_pos))


TRANSPOSED = [((4, 3, 3, 2), dict(stride=2)),
              ((4, 3, 3, 2), dict(stride=2, padding=1, output_padding=1, groups=2)),
              ((4, 3, 3, 2), dict(dilation=2, padding=1)),
              ((4, 3, 3, 3), dict(padding=1))]


@pytest.mark.parametrize("method,ws,opts", [
    pytest.param(m.values[0], ws, opts, marks=m.marks, id=f"{m.id}-{opts}")
    for ws, opts in TRANSPOSED
    for m in method_params("conv_transpose2d", ((2, 4, 5, 4), ws, opts))])
def test_conv_transpose2d_nhwc_is_nchw_transposed(method, ws, opts):
    rng = np.random.default_rng(33)
    x, w, b = rng.standard_normal((2, 4, 5, 4)), rng.standard_normal(ws), np.ones(
        3 * opts.get("groups", 1))
    want = fc.conv_transpose2d(x, w, b, **opts, method="naive")
    y = to_host(fc.conv_transpose2d(nhwc(x), hwio(w), b, **opts, layout="NHWC", method=method))
    np.testing.assert_allclose(y.transpose(X_OUT), want, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(want.shape)
    ref = fc.conv_transpose2d_backward(g, x, w, **opts, method="naive")
    got = fc.conv_transpose2d_backward(nhwc(g), nhwc(x), hwio(w), **opts, layout="NHWC",
                                       method=method)
    np.testing.assert_allclose(to_host(got[0]).transpose(X_OUT), ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(got[1]).transpose(W_OUT), ref[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(got[2]), ref[2], rtol=1e-12)


MAX = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
       dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1))]


@pytest.mark.parametrize("opts", MAX, ids=str)
@pytest.mark.parametrize("method", method_params("max_pool2d"))
def test_max_pool_nhwc_is_nchw_transposed(method, opts):
    x = np.random.default_rng(34).permutation(2 * 3 * 9 * 8).reshape(2, 3, 9, 8) / 5.0
    y, idx = fc.max_pool2d(x, **opts, return_indices=True, method="naive")
    yn, idxn = fc.max_pool2d(nhwc(x), **opts, return_indices=True, layout="NHWC",
                             method=method)
    np.testing.assert_array_equal(to_host(yn).transpose(X_OUT), y)
    np.testing.assert_array_equal(to_host(idxn).transpose(X_OUT), idx)
    g = np.random.default_rng(35).standard_normal(y.shape)
    dx = fc.max_pool2d_backward(g, idx, x.shape, **opts, method="naive")
    dxn = fc.max_pool2d_backward(nhwc(g), to_host(idxn), nhwc(x).shape, **opts, layout="NHWC",
                                 method=method)
    np.testing.assert_allclose(to_host(dxn).transpose(X_OUT), dx, rtol=1e-12, atol=1e-12)


AVG = [("avg_pool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                           count_include_pad=False)),
       ("avg_pool2d", dict(kernel_size=2)),
       ("adaptive_avg_pool2d", dict(output_size=1)),
       ("adaptive_avg_pool2d", dict(output_size=(4, 3)))]


@pytest.mark.parametrize("op,opts", AVG, ids=str)
@pytest.mark.parametrize("method", method_params("avg_pool2d"))
def test_average_pools_nhwc_are_nchw_transposed(method, op, opts):
    forward, backward = getattr(fc, op), getattr(fc, f"{op}_backward")
    x = np.random.default_rng(36).standard_normal((2, 5, 9, 8))
    y = forward(x, **opts, method="naive")
    yn = to_host(forward(nhwc(x), **opts, layout="NHWC", method=method))
    np.testing.assert_allclose(yn.transpose(X_OUT), y, rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(37).standard_normal(y.shape)
    dx = backward(g, x.shape, **opts, method="naive")
    dxn = to_host(backward(nhwc(g), nhwc(x).shape, **opts, layout="NHWC", method=method))
    np.testing.assert_allclose(dxn.transpose(X_OUT), dx, rtol=1e-12, atol=1e-12)


def test_views_are_accepted_and_never_modified():
    """A channels-last view of an NCHW array (what x.transpose gives) is a valid NHWC input."""
    rng = np.random.default_rng(38)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    for method in ("naive", "im2col", "direct"):
        y = checked(fc.conv2d, x.transpose(X_IN), w.transpose(W_IN), layout="nhwc",
                    method=method)
        np.testing.assert_allclose(y.transpose(X_OUT), fc.conv2d(x, w), rtol=1e-12)


def test_errors_show_the_shapes_as_given():
    x, w = np.ones((2, 8, 8, 3)), np.ones((3, 3, 4, 5))
    with pytest.raises(ValueError, match=r"weight of shape \(3, 3, 4, 5\) expect x with 4 "
                                         r"channels, got x of shape \(2, 8, 8, 3\)"):
        fc.conv2d(x, w, layout="NHWC")
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape "
                                         r"\(2, 6, 6, 5\)"):
        fc.conv2d_backward(np.ones((2, 5, 6, 6)), np.ones((2, 8, 8, 4)), w, layout="NHWC")
    with pytest.raises(ValueError, match=r"x of shape \(2, 2, 2, 3\).*empty"):
        fc.max_pool2d(np.ones((2, 2, 2, 3)), 3, layout="NHWC")
    with pytest.raises(ValueError, match="layout='CHWN' is not one of"):
        fc.conv2d(x, w, layout="CHWN")
    with pytest.raises(ValueError, match="layout"):
        fc.Conv2D(w, None, layout="NCWH")


def test_layers_take_a_layout():
    rng = np.random.default_rng(39)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), np.ones(4)
    for make, args in ((fc.Conv2D, (w, b)), (fc.MaxPool2D, (2,)), (fc.AvgPool2D, (2,)),
                       (fc.AdaptiveAvgPool2D, (3,)),
                       (fc.ConvTranspose2D, (rng.standard_normal((3, 2, 2, 2)), None))):
        first, last = make(*args), make(*(hwio(a) if getattr(a, "ndim", 0) == 4 else a
                                          for a in args), layout="NHWC")
        y = first.forward(x)
        np.testing.assert_allclose(last.forward(nhwc(x)).transpose(X_OUT), y, rtol=1e-12)
        g = rng.standard_normal(y.shape)
        np.testing.assert_allclose(last.backward(nhwc(g)).transpose(X_OUT), first.backward(g),
                                   rtol=1e-12, atol=1e-12)
        if hasattr(first, "dW"):
            np.testing.assert_allclose(last.dW.transpose(W_OUT), first.dW, rtol=1e-12)


def test_direct_reads_channels_last_without_transposing(monkeypatch):
    """direct's conv kernels (and its conv_transpose2d over them) take NHWC as it is; the
    methods without a channels-last kernel go through the transposing adapter."""
    from fastconv import _registry
    from fastconv.kernels import layout

    for op in ("conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward"):
        assert "NHWC" in _registry.implementation(op, "direct").layouts
        assert "NHWC" not in _registry.implementation(op, "naive").layouts
    _registry._adapted.cache_clear()
    monkeypatch.setattr(layout, "adapt", lambda op, fn: pytest.fail(f"{op} was transposed"))
    rng = np.random.default_rng(40)
    x, w = rng.standard_normal((2, 7, 6, 5)), rng.standard_normal((3, 3, 5, 4))
    y = fc.conv2d(x, w, padding=1, layout="NHWC", method="direct")
    fc.conv2d_backward(y, x, w, padding=1, layout="NHWC", method="direct")
    # Keras's Conv2DTranspose kernel (R, S, C_out, C_in) is the forward conv's filter as it is.
    fc.conv_transpose2d(y, w, padding=1, layout="NHWC", method="direct")
    with pytest.raises(pytest.fail.Exception, match="was transposed"):
        fc.conv2d(x, w, padding=1, layout="NHWC", method="naive")
    _registry._adapted.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("tile_bytes", [1, 1 << 20], ids=["1row", "default"])
def test_im2col_nhwc_pointwise_is_a_gemm_in_place(tile_bytes, dtype, monkeypatch):
    """im2col's channels-last 1x1 layers (stride 1, no padding, one group) multiply the arrays
    as they lie, never transposed: forward and every subset of the gradients against naive,
    on one row per item and on the default blocks, with and without bias, on 1 and 3 threads
    (several slabs); other channels-last problems still go through the adapter."""
    from fastconv.kernels import im2col

    rng = np.random.default_rng(46)
    monkeypatch.setattr(im2col, "_through_nchw", lambda op: pytest.fail(f"{op} was transposed"))
    monkeypatch.setattr(im2col, "TILE_BYTES", tile_bytes)
    count = fc.get_num_threads()
    try:
        for threads, (n, h, w, c, k) in [(1, (2, 3, 5, 7, 9)), (3, (3, 17, 11, 40, 3)),
                                         (3, (1, 1, 1, 1, 1)), (1, (4, 9, 8, 33, 70))]:
            fc.set_num_threads(threads)
            x = rng.standard_normal((n, h, w, c)).astype(dtype)
            wt = rng.standard_normal((1, 1, c, k)).astype(dtype)
            b = rng.standard_normal(k).astype(dtype)
            g = rng.standard_normal((n, h, w, k)).astype(dtype)
            before = [a.copy() for a in (x, wt, b, g)]
            for bias in (b, None):
                want = fc.conv2d(x, wt, bias, layout="NHWC", method="naive")
                got = fc.conv2d(x, wt, bias, layout="NHWC", method="im2col")
                np.testing.assert_allclose(got, want, **tol(dtype, c))
            ref = fc.conv2d_backward(g, x, wt, layout="NHWC", method="naive")
            for need in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]:
                got = fc.conv2d_backward(g, x, wt, layout="NHWC", method="im2col",
                                         need_input=bool(need[0]), need_weight=bool(need[1]),
                                         need_bias=bool(need[2]))
                for flag, a, r, red in zip(need, got, ref, (k, n * h * w, n * h * w)):
                    if flag:
                        np.testing.assert_allclose(a, r, **tol(dtype, red))
                    else:
                        assert a is None
            for a, was in zip((x, wt, b, g), before):
                np.testing.assert_array_equal(a, was)
        with pytest.raises(pytest.fail.Exception, match="was transposed"):
            fc.conv2d(rng.standard_normal((1, 3, 3, 4)), rng.standard_normal((1, 1, 2, 6)),
                      groups=2, layout="NHWC", method="im2col")
    finally:
        fc.set_num_threads(count)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("tile_bytes", [1, 1 << 20], ids=["1row", "default"])
def test_im2col_nhwc_forward_stores_channels_last(tile_bytes, dtype, monkeypatch):
    """im2col's channels-last forward of one group (`conv_forward_channels_last`): each tile's
    GEMM writes its pixels' channels into the NHWC output, tiles of one output row and tiles
    spanning images; with and without bias, strides, padding, dilation, on 1 and 3 threads;
    never through the transposing adapter."""
    from fastconv.kernels import im2col

    monkeypatch.setattr(im2col, "_through_nchw", lambda op: pytest.fail(f"{op} was transposed"))
    monkeypatch.setattr(im2col, "TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(47)
    count = fc.get_num_threads()
    try:
        for threads, x_shape, w_shape, conf in [
                (1, (3, 1, 9, 8), (5, 1, 3, 3), dict(padding=1)),
                (3, (2, 3, 11, 7), (20, 3, 3, 2), dict(stride=(2, 1), dilation=(1, 2))),
                (3, (5, 17, 4, 4), (9, 17, 1, 1), dict(stride=2, padding=(1, 0)))]:
            fc.set_num_threads(threads)
            x = rng.standard_normal(x_shape).astype(dtype)
            w = rng.standard_normal(w_shape).astype(dtype)
            b = rng.standard_normal(w_shape[0]).astype(dtype)
            for bias in (b, None):
                want = fc.conv2d(x, w, bias, **conf, method="naive")
                got = fc.conv2d(nhwc(x), hwio(w), bias, **conf, layout="NHWC",
                                method="im2col")
                assert got.flags.c_contiguous
                np.testing.assert_allclose(got.transpose(X_OUT), want,
                                           **tol(dtype, int(np.prod(w_shape[1:]))))
    finally:
        fc.set_num_threads(count)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_layout_transposes_match_numpy(dtype):
    """`to_nchw` / `to_nhwc` (the adapter's transposes: blocks transposed in registers on the
    thread pool, edges element by element, fewer channels than the lanes by loops) against
    NumPy's, on shapes whose pixel and channel counts are and are not multiples of the lanes,
    span several work items, or are 1 (then a view); one large enough to run on both threads. The source is never modified."""
    from fastconv.kernels import layout

    rng = np.random.default_rng(41)
    shapes = [(2, 17, 19, 33), (3, 23, 29, 40), (1, 16, 16, 16), (2, 300, 1, 17), (2, 5, 7, 3),
              (3, 4, 5, 1), (2, 1, 1, 9), (16, 26, 26, 64), (0, 3, 4, 5), (3, 70, 65, 3),
              (2, 2, 3, 5)]
    for n, h, w, c in shapes:
        a = rng.standard_normal((n, h, w, c)).astype(dtype)
        before = a.copy()
        t = layout.to_nchw(a)
        assert t.flags.c_contiguous and t.dtype == dtype
        np.testing.assert_array_equal(t, a.transpose(0, 3, 1, 2))
        back = layout.to_nhwc(t)
        assert back.flags.c_contiguous
        np.testing.assert_array_equal(back, a)
        assert np.shares_memory(t, a) == (c == 1 or h * w == 1) or a.size == 0
        np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("x_shape,w_shape,conf", [
    ((2, 5, 6, 11), (70, 5, 3, 3), dict(padding=1)),  # 64 + 6 channels, 4 + 4 + 3 pixels
    ((2, 1, 12, 12), (30, 1, 5, 5), {}),  # lenet-like: 30 channels, 8 pixels a row
    ((2, 3, 9, 13), (40, 3, 3, 3), dict(stride=2)),  # 40 channels, 6 pixels a row
    ((8, 3, 20, 21), (24, 3, 3, 3), {}),  # forward by NCHW tiles: 19 pixels, 24 channels
    ((2, 20, 9, 11), (24, 20, 3, 3), dict(padding=1, stride=2)),  # grad-input: 20 channels
    ((2, 72, 5, 9), (72, 1, 3, 3), dict(padding=1, groups=72)),  # depthwise: 64 + 8, 9 pixels
    ((2, 64, 9, 10), (64, 1, 3, 3), dict(padding=1, stride=2, groups=64)),
    # forward and grad-input reductions (648, 684 entries) in chunks (RED_CHUNK_BYTES)
    ((2, 72, 6, 7), (76, 72, 3, 3), dict(padding=1)),
], ids=["k70", "k30", "k40-s2", "k24", "c20-s2", "dw72", "dw64-s2", "red648"])
def test_direct_nhwc_register_tiles_match_naive(x_shape, w_shape, conf, dtype):
    """direct's channels-last register tiles where channels and pixels are not multiples of
    a tile (the last group of 4 pixels and the last vector of channels overlap the tiles
    before them, computed again in a scratch tile and not stored twice) and depthwise tiles
    of 4 pixels x up to 4 vectors of channels; first layers' forward by the NCHW tiles, stored
    channels-last through overlapping register transposes; reductions long enough to run in
    chunks: forward and all gradients against naive."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y = fc.conv2d(x, w, b, **conf, method="naive")
    g = rng.standard_normal(y.shape).astype(dtype)
    want = fc.conv2d_backward(g, x, w, **conf, method="naive")
    got_y = fc.conv2d(nhwc(x), hwio(w), b, **conf, layout="NHWC", method="direct")
    got = fc.conv2d_backward(nhwc(g), nhwc(x), hwio(w), **conf, layout="NHWC", method="direct")
    red = int(np.prod(w_shape[1:]))
    np.testing.assert_allclose(got_y.transpose(X_OUT), y, **tol(dtype, red))
    np.testing.assert_allclose(got.grad_input.transpose(X_OUT), want.grad_input,
                               **tol(dtype, red * 4))
    np.testing.assert_allclose(got.grad_weight.transpose(W_OUT), want.grad_weight,
                               **tol(dtype, g.size // g.shape[1]))
    np.testing.assert_allclose(got.grad_bias, want.grad_bias, **tol(dtype, g.size // g.shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_direct_nhwc_results_do_not_depend_on_threads(dtype):
    """direct's channels-last kernels split their work by the thread count (grad-weight's
    reduction blocks; the case's reductions also run in chunks): forward and all gradients
    bit-identical on 1, 2 and 3 threads."""
    from fastconv.kernels import _parallel

    rng = np.random.default_rng(45)
    x = rng.standard_normal((2, 7, 6, 72)).astype(dtype)
    w = rng.standard_normal((3, 3, 72, 76)).astype(dtype)
    b = rng.standard_normal(76).astype(dtype)
    g = rng.standard_normal((2, 7, 6, 76)).astype(dtype)
    count, runs = _parallel.count, []
    try:
        for threads in (1, 2, 3):
            fc.set_num_threads(threads)
            runs.append((fc.conv2d(x, w, b, padding=1, layout="NHWC", method="direct"),
                         *fc.conv2d_backward(g, x, w, padding=1, layout="NHWC",
                                             method="direct")))
    finally:
        fc.set_num_threads(count)
    for other in runs[1:]:
        for a, ref in zip(other, runs[0]):
            np.testing.assert_array_equal(a, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("band_bytes", [1, 6000, 512 << 10], ids=["1row", "few", "default"])
def test_direct_nhwc_depthwise_bands_match_naive(band_bytes, dtype, monkeypatch):
    """direct's channels-last depthwise layers by bands of rows, each padded in a scratch
    (`_depthwise_bands`; stride 1 backward: `_depthwise_backward_bands`, all gradients in one
    pass): one-row bands, several with an uneven last one, and one band per image; padding on
    one side only, wider than the kernel, dilation, a stride; every subset of the gradients;
    and bit-identical results on one thread and two (bands follow the thread count)."""
    from fastconv.kernels import _parallel, direct_nhwc

    monkeypatch.setattr(direct_nhwc, "BAND_BYTES", band_bytes)
    rng = np.random.default_rng(44)
    cases = [((2, 72, 7, 9), 3, dict(padding=1)),
             ((3, 17, 8, 7), 3, dict(padding=((2, 0), (0, 1)))),
             ((1, 33, 12, 11), 5, dict(padding=2, dilation=2)),
             ((2, 20, 7, 9), 3, dict(padding=3)),
             ((2, 16, 6, 6), 3, {}), ((2, 40, 9, 10), 3, dict(padding=1, stride=2)),
             ((1, 3, 4, 30), 3, dict(padding=(0, 4), stride=(1, 3))),
             ((1, 24, 5, 5), 3, dict(padding=((0, 0), (1, 1)), dilation=(2, 1)))]
    for x_shape, r, conf in cases:
        c = x_shape[1]
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal((c, 1, r, r)).astype(dtype)
        b = rng.standard_normal(c).astype(dtype)
        y = fc.conv2d(x, w, b, groups=c, **conf, method="naive")
        g = rng.standard_normal(y.shape).astype(dtype)
        want = fc.conv2d_backward(g, x, w, groups=c, **conf, method="naive")
        args = nhwc(g), nhwc(x), hwio(w)
        got_y = fc.conv2d(args[1], args[2], b, groups=c, **conf, layout="NHWC", method="direct")
        np.testing.assert_allclose(got_y.transpose(X_OUT), y, **tol(dtype, r * r))
        got = fc.conv2d_backward(*args, groups=c, **conf, layout="NHWC", method="direct")
        np.testing.assert_allclose(got.grad_input.transpose(X_OUT), want.grad_input,
                                   **tol(dtype, r * r))
        np.testing.assert_allclose(got.grad_weight.transpose(W_OUT), want.grad_weight,
                                   **tol(dtype, g.size // c))
        np.testing.assert_allclose(got.grad_bias, want.grad_bias, **tol(dtype, g.size // c))
        for need in [(True, False, False), (False, True, False), (False, False, True),
                     (True, False, True), (False, True, True)]:
            part = fc.conv2d_backward(*args, groups=c, **conf, layout="NHWC", method="direct",
                                      need_input=need[0], need_weight=need[1],
                                      need_bias=need[2])
            for wanted, a, full in zip(need, part, got):
                assert (a is not None) == wanted
                if wanted:
                    np.testing.assert_array_equal(a, full)
        count = _parallel.count
        for threads in (1, 3):
            try:
                fc.set_num_threads(threads)
                again = fc.conv2d_backward(*args, groups=c, **conf, layout="NHWC",
                                           method="direct")
                again_y = fc.conv2d(args[1], args[2], b, groups=c, **conf, layout="NHWC",
                                    method="direct")
            finally:
                fc.set_num_threads(count)
            np.testing.assert_array_equal(again_y, got_y)
            for a, full in zip(again, got):
                np.testing.assert_array_equal(a, full)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_direct_nhwc_padded_copy_writes_every_element(dtype):
    """direct's channels-last zero-padded copy (`_pad_rows`, which skips zero-filling) into a
    destination full of NaN, with a NaN guard after it: padding and cropping (negative
    amounts) on each side, a crop wider than the image, against NumPy; and `_pad` itself."""
    from fastconv.kernels import _parallel, direct_nhwc

    rng = np.random.default_rng(43)
    for shape in [(2, 5, 7, 3), (1, 4, 4, 16), (3, 9, 11, 5)]:
        a = rng.standard_normal(shape).astype(dtype)
        n, h, w, c = shape
        for top, bottom, left, right in [(1, 1, 1, 1), (2, 0, 0, 3), (-1, 2, 1, -2),
                                         (0, 0, 2, 0), (-2, -1, -3, -1), (3, 3, -4, 2),
                                         (1, -3, 0, 0), (0, 0, 3, -w - 1)]:
            hp, wp = h + top + bottom, w + left + right
            want = np.zeros((n, hp, wp, c), dtype)
            src = a[:, max(0, -top):h + min(0, bottom), max(0, -left):w + min(0, right)]
            rows, cols = min(src.shape[1], hp), min(src.shape[2], max(0, wp - max(0, left)))
            want[:, max(0, top):max(0, top) + rows, max(0, left):max(0, left) + cols] = \
                src[:, :rows, :cols]
            buf = np.full(want.size + 16, np.nan, dtype)
            if want.size:
                _parallel.run(direct_nhwc._pad_rows, (a.reshape(-1), buf[:want.size], h, w, c,
                                                      hp, wp, top, left), n * hp, 10**9)
            np.testing.assert_array_equal(buf[:want.size].reshape(want.shape), want)
            assert np.isnan(buf[want.size:]).all()
            np.testing.assert_array_equal(direct_nhwc._pad(a, top, bottom, left, right), want)
