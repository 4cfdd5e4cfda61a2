"""The Cython im2col / col2im cores against NumPy references (padded copies and strided slices).

The extension must be built (`pip install -e .`): a missing build fails here, it is not skipped.
The fused kernels are part functions of fastconv's pool; `run_parts` runs one from several
Python threads at once, sharing one work counter, as the pool does.
"""

import itertools
import threading

import numpy as np
import pytest

from fastconv.kernels import _im2col

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def out_size(size, lo, hi, k, stride, dilation):
    return (size + lo + hi - dilation * (k - 1) - 1) // stride + 1


def padded_extent(size, lo, k, stride, dilation, out):
    """Bottom/right padding the windows of `out` outputs reach past the input."""
    return max(0, (out - 1) * stride + dilation * (k - 1) + 1 - lo - size)


def ref_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=None):
    """cols[(c*kh + r)*kw + s, (n*oh + i)*ow + j] from an explicitly zero-padded copy of x."""
    n_batch, _, h, w = x.shape
    xs = x[:, c0:c1]
    pb = padded_extent(h, pt, kh, sh, dh, oh)
    pr = padded_extent(w, pl, kw, sw, dw, ow)
    xp = np.pad(xs, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    cols = np.empty((xs.shape[1], kh, kw, n_batch, oh, ow), x.dtype)
    for r in range(kh):
        for s in range(kw):
            win = xp[:, :, r * dh: r * dh + (oh - 1) * sh + 1: sh,
                     s * dw: s * dw + (ow - 1) * sw + 1: sw]
            cols[:, r, s] = win.transpose(1, 0, 2, 3)
    return cols.reshape(xs.shape[1] * kh * kw, n_batch * oh * ow)


def ref_col2im(cols, shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=None):
    """dx[:, c0:c1] by adding every window back into a padded buffer, then cropping."""
    n_batch, n_chan, h, w = shape
    nc = len(range(n_chan)[c0:c1])
    pb = padded_extent(h, pt, kh, sh, dh, oh)
    pr = padded_extent(w, pl, kw, sw, dw, ow)
    dxp = np.zeros((n_batch, nc, h + pt + pb, w + pl + pr), cols.dtype)
    c6 = cols.reshape(nc, kh, kw, n_batch, oh, ow)
    for r in range(kh):
        for s in range(kw):
            dxp[:, :, r * dh: r * dh + (oh - 1) * sh + 1: sh,
                s * dw: s * dw + (ow - 1) * sw + 1: sw] += c6[:, r, s].transpose(1, 0, 2, 3)
    return dxp[:, :, pt: pt + h, pl: pl + w]


def brute_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow):
    """The defining formula, one element at a time (checks the references above)."""
    n_batch, n_chan, h, w = x.shape
    cols = np.zeros((n_chan * kh * kw, n_batch * oh * ow), x.dtype)
    for c, r, s, n, i, j in itertools.product(*map(range, (n_chan, kh, kw, n_batch, oh, ow))):
        ih, iw = i * sh - pt + r * dh, j * sw - pl + s * dw
        if 0 <= ih < h and 0 <= iw < w:
            cols[(c * kh + r) * kw + s, (n * oh + i) * ow + j] = x[n, c, ih, iw]
    return cols


def rand(rng, shape, dtype):
    """Random values bounded away from zero, so that a skipped copy cannot pass as padding."""
    return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)).astype(dtype)


def geom(shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, k=1, groups=1):
    """The kernels' geometry tuple (fastconv.kernels._geom.Geom)."""
    return (*shape, k, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, groups)


def run_parts(part, args, n_threads):
    """``part(*args, counter)`` from ``n_threads`` threads at once, sharing the counter."""
    counter = np.zeros(1, np.int64)
    start = threading.Barrier(n_threads)
    errors = []

    def one():
        start.wait()
        try:
            part(*args, counter)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=-1):
    nc = (x.shape[1] if c1 == -1 else c1) - c0
    cols = np.full((nc * kh * kw, x.shape[0] * oh * ow), np.nan, x.dtype)   # every entry written
    _im2col.im2col(x, cols, geom(x.shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow), c0, c1)
    return cols


def run_col2im(cols, shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=-1, fill=np.nan):
    dx = np.full(shape, fill, cols.dtype)   # col2im overwrites its channels, it does not add
    _im2col.col2im(cols, dx, geom(shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow), c0, c1)
    return dx


KERNELS = [(1, 1), (3, 3), (2, 5)]
STRIDES = [(1, 1), (2, 2), (3, 1), (1, 3)]
DILATIONS = [(1, 1), (2, 2), (1, 2)]
PADDINGS = {          # ((top, bottom), (left, right))
    "pad0": ((0, 0), (0, 0)),
    "pad1": ((1, 1), (1, 1)),
    "asym": ((2, 0), (1, 3)),
    "bottom-right": ((0, 2), (0, 1)),
}
CHANNELS = {"all": (0, -1), "sub": (1, 3)}


def geometry_cases():
    for (kh, kw), (sh, sw), (dh, dw), pad in itertools.product(KERNELS, STRIDES, DILATIONS, PADDINGS):
        yield pytest.param(kh, kw, sh, sw, dh, dw, PADDINGS[pad],
                           id=f"k{kh}x{kw}-s{sh}x{sw}-d{dh}x{dw}-{pad}")


@pytest.mark.parametrize("channels", list(CHANNELS.values()), ids=list(CHANNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kh, kw, sh, sw, dh, dw, padding", list(geometry_cases()))
def test_matches_reference(kh, kw, sh, sw, dh, dw, padding, dtype, channels):
    (pt, pb), (pl, pr) = padding
    c0, c1 = channels
    n_batch, n_chan, h, w = 2, 4, 9, 10
    oh, ow = out_size(h, pt, pb, kh, sh, dh), out_size(w, pl, pr, kw, sw, dw)
    assert oh > 0 and ow > 0
    rng = np.random.default_rng(0)
    x = rand(rng, (n_batch, n_chan, h, w), dtype)
    x_before = x.copy()
    params = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    c1_ref = None if c1 == -1 else c1

    cols = run_im2col(x, *params, c0, c1)
    np.testing.assert_array_equal(cols, ref_im2col(x, *params, c0, c1_ref))   # a pure copy: exact
    np.testing.assert_array_equal(x, x_before)

    y = rand(rng, cols.shape, dtype)
    y_before = y.copy()
    dx = run_col2im(y, x.shape, *params, c0, c1)
    np.testing.assert_array_equal(y, y_before)
    want = ref_col2im(y, x.shape, *params, c0, c1_ref)
    np.testing.assert_allclose(dx[:, c0:c1_ref], want, **TOL[dtype])
    untouched = np.ones(n_chan, bool)
    untouched[c0:c1_ref] = False
    assert np.isnan(dx[:, untouched]).all()   # other channels are left alone

    # adjoint: <im2col(x), y> == <x, col2im(y)>, accumulated in float64
    lhs = np.vdot(cols.astype(np.float64), y.astype(np.float64))
    rhs = np.vdot(x[:, c0:c1_ref].astype(np.float64), dx[:, c0:c1_ref].astype(np.float64))
    scale = np.abs(cols).astype(np.float64).ravel() @ np.abs(y).astype(np.float64).ravel()
    assert abs(lhs - rhs) <= (1e-5 if dtype == np.float32 else 1e-12) * scale


@pytest.mark.parametrize(
    "shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow",
    [
        ((1, 2, 5, 6), 3, 2, 2, 3, 1, 2, 2, 1, 4, 3),      # asymmetric everything
        ((2, 1, 4, 4), 1, 1, 1, 1, 3, 0, 1, 1, 10, 6),     # rows entirely inside the padding
        ((1, 3, 3, 7), 2, 5, 1, 2, 0, 0, 1, 1, 4, 6),      # windows past the bottom/right edge
        ((2, 2, 1, 1), 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),      # 1x1 input, 3x3 kernel, pad 1
        ((1, 2, 6, 5), 3, 3, 2, 2, 0, 0, 1, 1, 2, 2),      # fewer outputs than fit
    ],
    ids=["asym", "all-padding-rows", "past-edge", "1x1-input", "short-output"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_edge_geometries_match_formula(shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dtype):
    rng = np.random.default_rng(7)
    x = rand(rng, shape, dtype)
    params = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    want = brute_im2col(x, *params)
    np.testing.assert_array_equal(ref_im2col(x, *params), want)
    np.testing.assert_array_equal(run_im2col(x, *params), want)
    y = rand(rng, want.shape, dtype)
    np.testing.assert_allclose(run_col2im(y, shape, *params), ref_col2im(y, shape, *params),
                               **TOL[dtype])


def test_nan_is_copied_and_summed():
    x = np.ones((1, 1, 4, 4))
    x[0, 0, 1, 2] = np.nan
    cols = run_im2col(x, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4)
    assert np.isnan(cols).sum() == 9
    dx = run_col2im(cols, x.shape, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4)
    assert np.isnan(dx).sum() == 1 and np.isnan(dx[0, 0, 1, 2])


def test_col2im_deterministic_across_runs():
    rng = np.random.default_rng(3)
    shape, params = (4, 16, 20, 20), (3, 3, 1, 1, 1, 1, 1, 1, 20, 20)
    cols = rand(rng, (16 * 9, 4 * 20 * 20), np.float32)
    runs = [run_col2im(cols, shape, *params) for _ in range(3)]
    for dx in runs[1:]:
        assert dx.tobytes() == runs[0].tobytes()
    np.testing.assert_allclose(runs[0], ref_col2im(cols, shape, *params), **TOL[np.float32])


def test_read_only_inputs_are_accepted():
    rng = np.random.default_rng(5)
    x = rand(rng, (1, 2, 5, 5), np.float64)
    x.flags.writeable = False
    cols = run_im2col(x, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)
    cols.flags.writeable = False
    dx = run_col2im(cols, x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)
    np.testing.assert_allclose(dx, ref_col2im(cols, x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3))


@pytest.mark.parametrize("channels", [(0, -1), (1, 3)], ids=["all", "sub"])
@pytest.mark.parametrize("bad", ["rows", "cols"])
def test_cols_shape_mismatch_raises(bad, channels):
    c0, c1 = channels
    x = np.ones((2, 4, 5, 5), np.float32)
    nc = (4 if c1 == -1 else c1) - c0
    shape = [nc * 9 + (bad == "rows"), 2 * 3 * 3 + (bad == "cols")]
    cols = np.zeros(shape, np.float32)
    params = (geom(x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3), c0, c1)
    with pytest.raises(ValueError, match="cols has shape"):
        _im2col.im2col(x, cols, *params)
    with pytest.raises(ValueError, match="cols has shape"):
        _im2col.col2im(cols, x, *params)
    assert (x == 1).all()


@pytest.mark.parametrize(
    "params, match",
    [
        ((3, 3, 0, 1, 0, 0, 1, 1, 3, 3, 0, -1), "not a valid problem geometry"),   # stride 0
        ((0, 3, 1, 1, 0, 0, 1, 1, 3, 3, 0, -1), "not a valid problem geometry"),   # no kernel
        ((3, 3, 1, 1, 0, 0, 1, 1, -3, -3, 0, -1), "not a valid problem geometry"),  # out < 0
        ((3, 3, 1, 1, -1, 0, 1, 1, 3, 3, 0, -1), "not a valid problem geometry"),   # pad < 0
        ((3, 3, 1, 1, 0, 0, 1, 1, 3, 3, 2, 5), "channel range"),    # past the channels
        ((3, 3, 1, 1, 0, 0, 1, 1, 3, 3, 3, 2), "channel range"),    # reversed
    ],
    ids=["stride0", "kernel0", "negative-out", "negative-pad", "c1-too-big", "reversed"],
)
def test_bad_parameters_raise(params, match):
    x = np.ones((2, 4, 5, 5))
    cols = np.zeros((4 * 9, 2 * 3 * 3))
    args = (geom(x.shape, *params[:10]), *params[10:])
    with pytest.raises(ValueError, match=match):
        _im2col.im2col(x, cols, *args)
    with pytest.raises(ValueError, match=match):
        _im2col.col2im(cols, x, *args)
    with pytest.raises(ValueError, match="does not fit the geometry"):
        _im2col.im2col(x, cols, geom((2, 4, 5, 6), 3, 3, 1, 1, 0, 0, 1, 1, 3, 3))


def test_mixed_dtypes_raise():
    with pytest.raises((TypeError, ValueError), match="dtype|signature"):
        _im2col.im2col(np.ones((1, 1, 3, 3), np.float32), np.zeros((1, 9), np.float64),
                       geom((1, 1, 3, 3), 1, 1, 1, 1, 0, 0, 1, 1, 3, 3))


# ---------------------------------------------------------------------------------------------
# the fused conv kernels (tiles of columns, one BLAS call per tile and group), against the
# column matrices built by the references above and NumPy's matmul


def conv_reference(x, w, g, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, groups):
    """(forward, grad-weight, grad-input) of the grouped conv, from whole column matrices."""
    n_batch, n_chan = x.shape[:2]
    k = w.shape[0]
    cg, kg = n_chan // groups, k // groups
    params = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    w2 = w.reshape(k, -1).astype(np.float64)
    g2 = g.astype(np.float64).transpose(1, 0, 2, 3).reshape(k, -1)   # (K, N*oh*ow)
    y = np.empty((k, n_batch * oh * ow))
    dw_ = np.empty(w2.shape)
    dx = np.empty(x.shape)
    for grp in range(groups):
        ks, cs = slice(grp * kg, (grp + 1) * kg), slice(grp * cg, (grp + 1) * cg)
        cols = ref_im2col(x.astype(np.float64), *params, cs.start, cs.stop)
        y[ks] = w2[ks] @ cols
        dw_[ks] = g2[ks] @ cols.T
        dx[:, cs] = ref_col2im(w2[ks].T @ g2[ks], x.shape, *params, cs.start, cs.stop)
    y = y.reshape(k, n_batch, oh, ow).transpose(1, 0, 2, 3)
    return y, dw_, dx


FUSED_CASES = {  # x shape, (K, kh, kw), stride, dilation, ((top, bottom), (left, right)), groups
    "3x3-pad1": ((3, 4, 7, 6), (5, 3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1),
    "s2-d2-asym": ((2, 4, 9, 8), (6, 2, 3), (2, 1), (2, 2), ((2, 0), (1, 3)), 2),
    "depthwise": ((3, 6, 6, 7), (6, 3, 3), (1, 2), (1, 1), ((1, 1), (1, 1)), 6),
    "1x1": ((2, 5, 4, 5), (3, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1),
    # 1x1 stride 1 unpadded reads x and writes dx in place; padded or grouped variants too
    "1x1-groups": ((3, 6, 5, 4), (4, 1, 1), (1, 1), (2, 1), ((0, 0), (0, 0)), 2),
    "1x1-padded": ((2, 3, 4, 5), (2, 1, 1), (1, 1), (1, 1), ((1, 0), (0, 1)), 1),
    "past-edge": ((2, 2, 5, 4), (4, 3, 2), (3, 2), (1, 1), ((0, 3), (1, 2)), 2),
}
TILINGS = {  # tile_rows, n_slabs, chan_block, img_block
    "one-row-tiles": (1, 3, 1, 1),
    "odd-tiles": (3, 2, 2, 2),
    "one-tile": (10 ** 6, 8, 10 ** 6, 10 ** 6),
}


def fused_case(name, dtype, seed=0):
    shape, (k, kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)), groups = FUSED_CASES[name]
    rng = np.random.default_rng(seed)
    oh, ow = out_size(shape[2], pt, pb, kh, sh, dh), out_size(shape[3], pl, pr, kw, sw, dw)
    x = rand(rng, shape, dtype)
    w = rand(rng, (k, shape[1] // groups, kh, kw), dtype)
    g = rand(rng, (shape[0], k, oh, ow), dtype)
    b = rand(rng, (k,), dtype)
    return x, w, g, b, (kh, kw, sh, sw, pt, pl, dh, dw), (oh, ow), groups


def run_fused(x, w, g, b, geo, out_hw, groups, tiling, n_threads, direct=True):
    tile_rows, n_slabs, chan_block, img_block = tiling
    k = w.shape[0]
    n_batch, c = x.shape[:2]
    tile_rows = min(tile_rows, n_batch * out_hw[0])
    n_slabs = min(n_slabs, -(-n_batch * out_hw[0] // tile_rows))
    gm = geom(x.shape, *geo, *out_hw, k=k, groups=groups)
    y = np.full((n_batch, k, *out_hw), np.nan, x.dtype)
    run_parts(_im2col.conv_forward, (x, w.reshape(k, -1), b, y, gm, tile_rows, direct),
              n_threads)
    slabs = np.full((n_slabs, k, w[0].size), np.nan, x.dtype)
    run_parts(_im2col.conv_backward_weight, (g, x, slabs, gm, tile_rows, direct), n_threads)
    dw = np.add.reduce(slabs, axis=0).reshape(w.shape)
    dx = np.full(x.shape, np.nan, x.dtype)
    run_parts(_im2col.conv_backward_input, (g, w.reshape(k, -1), dx, gm,
                                            min(chan_block, c // groups),
                                            min(img_block, n_batch)), n_threads)
    return y, dw, dx


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staged"])
@pytest.mark.parametrize("n_threads", [1, 3])
@pytest.mark.parametrize("tiling", list(TILINGS.values()), ids=list(TILINGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_kernels_match_column_matrices(name, dtype, tiling, n_threads, direct):
    x, w, g, b, geo, out_hw, groups = fused_case(name, dtype)
    inputs = [a.copy() for a in (x, w, g, b)]
    y, dw, dx = run_fused(x, w, g, b, geo, out_hw, groups, tiling, n_threads, direct)
    for a, before in zip((x, w, g, b), inputs):
        np.testing.assert_array_equal(a, before)
    want_y, want_dw, want_dx = conv_reference(x, w, g, *geo, *out_hw, groups)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    assert y.dtype == dw.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, want_y + b.reshape(1, -1, 1, 1), **tol)
    np.testing.assert_allclose(dw.reshape(w.shape[0], -1), want_dw, **tol)
    np.testing.assert_allclose(dx, want_dx, **tol)
    # without bias
    y0 = np.empty_like(y)
    gm = geom(x.shape, *geo, *out_hw, k=w.shape[0], groups=groups)
    run_parts(_im2col.conv_forward, (x, w.reshape(w.shape[0], -1), None, y0, gm,
                                     min(tiling[0], x.shape[0] * out_hw[0]), direct), n_threads)
    np.testing.assert_allclose(y0, want_y, **tol)


@pytest.mark.parametrize("name", ["3x3-pad1", "s2-d2-asym", "depthwise", "1x1-groups"])
def test_fused_kernels_are_bit_identical_across_threads_and_runs(name):
    """The result depends on the tiling only: not on the thread count or the schedule."""
    x, w, g, b, geo, out_hw, groups = fused_case(name, np.float32, seed=5)
    tiling = (3, 3, 1, 1)
    for direct in (True, False):
        runs = [run_fused(x, w, g, b, geo, out_hw, groups, tiling, t, direct)
                for t in (1, 2, 4, 4, 3)]
        for run in runs[1:]:
            for a, ref in zip(run, runs[0]):
                assert a.tobytes() == ref.tobytes()


def test_fused_kernels_on_a_larger_problem():
    """Enough tiles, slabs and units that every thread gets several of each."""
    rng = np.random.default_rng(11)
    x = rand(rng, (6, 8, 15, 13), np.float64)
    w = rand(rng, (12, 4, 3, 3), np.float64)
    geo, out_hw, groups = (3, 3, 1, 1, 1, 1, 1, 1), (15, 13), 2
    g = rand(rng, (6, 12, *out_hw), np.float64)
    b = rand(rng, (12,), np.float64)
    want_y, want_dw, want_dx = conv_reference(x, w, g, *geo, *out_hw, groups)
    for direct in (True, False):
        y, dw, dx = run_fused(x, w, g, b, geo, out_hw, groups, (17, 5, 3, 2), 4, direct)
        np.testing.assert_allclose(y, want_y + b.reshape(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw.reshape(12, -1), want_dw, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)


def test_fused_kernels_reject_bad_arguments():
    x = np.ones((2, 4, 5, 5), np.float32)
    w = np.ones((6, 2 * 9), np.float32)
    y = np.zeros((2, 6, 3, 3), np.float32)
    c = np.zeros(1, np.int64)
    gm = geom(x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3, k=6, groups=2)
    with pytest.raises(ValueError, match="does not fit"):        # groups=1 needs 4*9 columns
        _im2col.conv_forward(x, w, None, y, geom(x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3, k=6),
                             1, True, c)
    with pytest.raises(ValueError, match="output-shaped"):
        _im2col.conv_forward(x, w, None, np.zeros((2, 5, 3, 3), np.float32), gm, 1, True, c)
    with pytest.raises(ValueError, match="bias"):
        _im2col.conv_forward(x, w, np.ones(5, np.float32), y, gm, 1, True, c)
    with pytest.raises(ValueError, match="tile_rows"):
        _im2col.conv_forward(x, w, None, y, gm, 0, True, c)
    with pytest.raises(ValueError, match="tile_rows"):
        _im2col.conv_forward(x, w, None, y, gm, 7, True, c)     # 2 images x 3 rows
    with pytest.raises(ValueError, match="C-contiguous"):
        _im2col.conv_forward(x[:, ::2], np.ones((6, 9), np.float32), None, y, gm, 1, True, c)
    with pytest.raises(ValueError, match="slabs for"):
        _im2col.conv_backward_weight(y, x, np.zeros((0, 6, 18), np.float32), gm, 1, True, c)
    with pytest.raises(ValueError, match="chan_block"):
        _im2col.conv_backward_input(y, w, x.copy(), gm, 0, 1, c)
    with pytest.raises(ValueError, match="not a valid problem geometry"):
        _im2col.conv_forward(x, w, None, y, gm[:-1] + (4,), 1, True, c)   # 4 groups, 6 outputs
    assert (y == 0).all() and c[0] == 0


def test_serial_blas_holds_the_kernels_blas_at_one_thread_and_restores():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastconv.kernels import im2col as kernels

    if _im2col.blas_threads() is None:
        pytest.skip("this BLAS has no thread count fastconv can read")

    def others():  # every BLAS but the kernels' (NumPy's, in the wheels)
        return sorted(i["num_threads"] for i in threadpoolctl.threadpool_info()
                      if i["user_api"] == "blas")

    saved = _im2col.blas_threads()
    try:
        _im2col.set_blas_threads(2)
        before = others()
        with kernels.serial_blas():
            with kernels.serial_blas():            # nested / concurrent users share the hold
                assert _im2col.blas_threads() == 1
            assert _im2col.blas_threads() == 1
            assert others().count(1) <= before.count(1) + 1  # only one library changed
        assert _im2col.blas_threads() == 2 and others() == before
    finally:
        _im2col.set_blas_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n_threads", [(1, 3), (5, 2), (64, 1)])
def test_row_products_match_numpy(rows, n_threads, dtype):
    """`rows_times` / `rows_gram` (channels-last 1x1 layers) against NumPy's products, run by
    several threads sharing one counter; the gram's slabs sum to the product."""
    rng = np.random.default_rng(7)
    m, p, q = 37, 11, 6
    a = rand(rng, (m, p), dtype)
    b, bias = rand(rng, (p, q), dtype), rand(rng, (q,), dtype)
    out = np.full((m, q), np.nan, dtype)
    run_parts(_im2col.rows_times, (a, b, bias, out, False, rows), n_threads)
    np.testing.assert_allclose(out, a @ b + bias, **TOL[dtype])
    back = np.full((m, p), np.nan, dtype)
    run_parts(_im2col.rows_times, (out, b, None, back, True, rows), n_threads)
    np.testing.assert_allclose(back, out @ b.T, **TOL[dtype])
    slabs = np.full((4, p, q), np.nan, dtype)
    run_parts(_im2col.rows_gram, (a, out, slabs, rows), n_threads)
    np.testing.assert_allclose(slabs.sum(axis=0), a.T @ out, **TOL[dtype])


def test_row_products_reject_misfit_arguments():
    z = np.zeros
    c = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="do not fit"):
        _im2col.rows_times(z((4, 3)), z((2, 5)), None, z((4, 5)), False, 2, c)
    with pytest.raises(ValueError, match="do not fit"):
        _im2col.rows_times(z((4, 3)), z((3, 5)), None, z((4, 5)), True, 2, c)
    with pytest.raises(ValueError, match="rows against"):
        _im2col.rows_times(z((4, 3)), z((3, 5)), None, z((5, 5)), False, 2, c)
    with pytest.raises(ValueError, match="bias has 4 entries"):
        _im2col.rows_times(z((4, 3)), z((3, 5)), z(4), z((4, 5)), False, 2, c)
    with pytest.raises(ValueError, match="rows=0"):
        _im2col.rows_times(z((4, 3)), z((3, 5)), None, z((4, 5)), False, 0, c)
    with pytest.raises(ValueError, match="slabs of shape"):
        _im2col.rows_gram(z((4, 3)), z((4, 5)), z((2, 5, 3)), 2, c)
    with pytest.raises(ValueError, match="5 slabs for 4 rows"):
        _im2col.rows_gram(z((4, 3)), z((4, 5)), z((5, 3, 5)), 2, c)
