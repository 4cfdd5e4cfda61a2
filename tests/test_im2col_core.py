"""The Cython im2col / col2im cores against NumPy references (padded copies and strided slices).

The extension must be built (`pip install -e .`): a missing build fails here, it is not skipped.
"""

import itertools

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


def run_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=-1):
    nc = (x.shape[1] if c1 == -1 else c1) - c0
    cols = np.full((nc * kh * kw, x.shape[0] * oh * ow), np.nan, x.dtype)   # every entry written
    _im2col.im2col(x, cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0, c1)
    return cols


def run_col2im(cols, shape, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0=0, c1=-1, fill=np.nan):
    dx = np.full(shape, fill, cols.dtype)   # col2im overwrites its channels, it does not add
    _im2col.col2im(cols, dx, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, c0, c1)
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


def test_col2im_deterministic_across_runs_and_threads():
    rng = np.random.default_rng(3)
    shape, params = (4, 16, 20, 20), (3, 3, 1, 1, 1, 1, 1, 1, 20, 20)
    cols = rand(rng, (16 * 9, 4 * 20 * 20), np.float32)
    saved = _im2col.get_max_threads()
    try:
        _im2col.set_num_threads(4)
        runs = [run_col2im(cols, shape, *params) for _ in range(3)]
        _im2col.set_num_threads(1)
        runs.append(run_col2im(cols, shape, *params))
    finally:
        _im2col.set_num_threads(saved)
    for dx in runs[1:]:
        assert dx.tobytes() == runs[0].tobytes()
    np.testing.assert_allclose(runs[0], ref_col2im(cols, shape, *params), **TOL[np.float32])


def test_im2col_threads_agree_with_serial():
    rng = np.random.default_rng(4)
    x = rand(rng, (4, 16, 20, 20), np.float64)
    params = (3, 3, 2, 1, 1, 2, 1, 2, 10, 18)
    saved = _im2col.get_max_threads()
    try:
        _im2col.set_num_threads(4)
        par = run_im2col(x, *params)
        _im2col.set_num_threads(1)
        ser = run_im2col(x, *params)
    finally:
        _im2col.set_num_threads(saved)
    np.testing.assert_array_equal(par, ser)
    np.testing.assert_array_equal(par, ref_im2col(x, *params))


def test_read_only_inputs_are_accepted():
    rng = np.random.default_rng(5)
    x = rand(rng, (1, 2, 5, 5), np.float64)
    x.flags.writeable = False
    cols = run_im2col(x, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)
    cols.flags.writeable = False
    dx = run_col2im(cols, x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3)
    np.testing.assert_allclose(dx, ref_col2im(cols, x.shape, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3))


def test_openmp_attributes():
    assert isinstance(_im2col.OPENMP_ENABLED, bool)
    n = _im2col.get_max_threads()
    assert isinstance(n, int) and n >= 1
    if not _im2col.OPENMP_ENABLED:
        assert n == 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        _im2col.set_num_threads(0)


@pytest.mark.parametrize("channels", [(0, -1), (1, 3)], ids=["all", "sub"])
@pytest.mark.parametrize("bad", ["rows", "cols"])
def test_cols_shape_mismatch_raises(bad, channels):
    c0, c1 = channels
    x = np.ones((2, 4, 5, 5), np.float32)
    nc = (4 if c1 == -1 else c1) - c0
    shape = [nc * 9 + (bad == "rows"), 2 * 3 * 3 + (bad == "cols")]
    cols = np.zeros(shape, np.float32)
    params = (3, 3, 1, 1, 0, 0, 1, 1, 3, 3, c0, c1)
    with pytest.raises(ValueError, match="cols has shape"):
        _im2col.im2col(x, cols, *params)
    with pytest.raises(ValueError, match="cols has shape"):
        _im2col.col2im(cols, x, *params)
    assert (x == 1).all()


@pytest.mark.parametrize(
    "params, match",
    [
        ((3, 3, 0, 1, 0, 0, 1, 1, 3, 3, 0, -1), "need kh"),         # stride 0
        ((0, 3, 1, 1, 0, 0, 1, 1, 3, 3, 0, -1), "need kh"),         # empty kernel
        ((3, 3, 1, 1, 0, 0, 1, 1, -3, -3, 0, -1), "need kh"),       # negative output size
        ((3, 3, 1, 1, 0, 0, 1, 1, 3, 3, 2, 5), "channel range"),    # past the channels
        ((3, 3, 1, 1, 0, 0, 1, 1, 3, 3, 3, 2), "channel range"),    # reversed
    ],
    ids=["stride0", "kernel0", "negative-out", "c1-too-big", "reversed"],
)
def test_bad_parameters_raise(params, match):
    x = np.ones((2, 4, 5, 5))
    cols = np.zeros((4 * 9, 2 * 3 * 3))
    with pytest.raises(ValueError, match=match):
        _im2col.im2col(x, cols, *params)
    with pytest.raises(ValueError, match=match):
        _im2col.col2im(cols, x, *params)


def test_mixed_dtypes_raise():
    with pytest.raises((TypeError, ValueError), match="dtype|signature"):
        _im2col.im2col(np.ones((1, 1, 3, 3), np.float32), np.zeros((1, 9), np.float64),
                       1, 1, 1, 1, 0, 0, 1, 1, 3, 3)


def test_empty_output_still_zeroes_dx():
    dx = run_col2im(np.zeros((2 * 4, 0)), (3, 2, 4, 4), 2, 2, 1, 1, 0, 0, 1, 1, 0, 0)
    assert dx.shape == (3, 2, 4, 4) and (dx == 0).all()
