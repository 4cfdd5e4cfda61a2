"""The register-tile micro-kernels (fastconv.kernels._simd.tile4 and tile4t, with 1 to 4
vectors per row, and tile1t with 1 to 8) against NumPy, in both dtypes, on unaligned bases,
odd strides and offset tables, and an empty reduction; the grad-weight sums (dot_taps)
against NumPy, with reductions that end mid-vector; the max-pool block (max_block) against a
scalar loop, with NaNs and ties; its backward (unpool_block) against NumPy, with a NaN
gradient and indices outside their windows; the register transpose (transpose_block) and the
depthwise channels-last tiles (tile_dw, dot_dw) against NumPy; the write prefetch
(prefetch_write) changes nothing."""

import numpy as np
import pytest
from numba import literally, njit

from fastconv.kernels._simd import (POOL_LANES, dot_dw, dot_taps, lanes, max_block,
                                    prefetch_write, tile1t, tile4, tile4t, tile_dw,
                                    transpose_block, unpool_block)


@njit
def _call(src, ts, off, r0, r1, w, wb, ws, out, qs, nvec):
    literally(nvec)
    tile4(src, ts[0], ts[1], ts[2], ts[3], off, r0, r1, w, wb, ws, out, qs[0], qs[1], qs[2],
          qs[3], nvec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nvec", [1, 2, 4])
@pytest.mark.parametrize("r0,r1", [(0, 7), (2, 5), (3, 3)])
def test_tile4_matches_numpy(dtype, nvec, r0, r1):
    rng = np.random.default_rng(r1)
    nl = lanes(np.dtype(dtype)) * nvec  # elements per accumulator row
    src = rng.standard_normal(300).astype(dtype)
    off = rng.integers(0, 200, 7).astype(np.uint64)
    ts, qs = np.array([1, 13, 40, 77]), np.array([3, 3 + nl + 5, 2 * nl + 20, 3 * nl + 40])
    wb, ws = 5, nl + 3
    w = rng.standard_normal(wb + 7 * ws + nl).astype(dtype)
    out = rng.standard_normal(150 + 4 * nl).astype(dtype)
    want = out.copy()
    for t, q in zip(ts, qs):
        for r in range(r0, r1):
            want[q:q + nl] += src[t + int(off[r])] * w[wb + r * ws:wb + r * ws + nl]
    untouched = np.ones(out.size, bool)
    for q in qs:
        untouched[q:q + nl] = False
    before = out.copy()
    _call(src, ts, off, r0, r1, w, wb, ws, out, qs, nvec)
    np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-5 if dtype == np.float32 else 1e-13)
    np.testing.assert_array_equal(out[untouched], before[untouched])


@njit
def _call_1t(w, s0, sstride, src, vb, off, r0, r1, out, q0, nvec):
    literally(nvec)
    tile1t(w, s0, sstride, src, vb, off, r0, r1, out, q0, nvec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nvec", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("r0,r1", [(0, 40), (5, 9), (3, 3)])
def test_tile1t_matches_numpy(dtype, nvec, r0, r1):
    rng = np.random.default_rng(nvec * 10 + r1)
    span = nvec * lanes(np.dtype(dtype))
    src = rng.standard_normal(600).astype(dtype)
    off = rng.integers(0, 600 - span - 9, 40).astype(np.int64)
    s0, sstride, vb, q0 = 3, 4, 7, 5
    w = rng.standard_normal(s0 + 40 * sstride).astype(dtype)
    out = rng.standard_normal(span + 20).astype(dtype)
    want = out.copy()
    for r in range(r0, r1):
        want[q0:q0 + span] += w[s0 + r * sstride] * src[vb + off[r]:vb + off[r] + span]
    before = out.copy()
    _call_1t(w, s0, sstride, src, vb, off, r0, r1, out, q0, nvec)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(out[:q0], before[:q0])
    np.testing.assert_array_equal(out[q0 + span:], before[q0 + span:])


@njit
def _call_t(w, ss, sstride, src, vb, off, r0, r1, out, qs, nvec):
    literally(nvec)
    tile4t(w, ss[0], ss[1], ss[2], ss[3], sstride, src, vb, off, r0, r1, out, qs[0], qs[1],
           qs[2], qs[3], nvec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nvec", [1, 2, 3, 4])
@pytest.mark.parametrize("r0,r1", [(0, 9), (4, 7), (2, 2)])
def test_tile4t_matches_numpy(dtype, nvec, r0, r1):
    rng = np.random.default_rng(nvec * 100 + r1)
    span = nvec * lanes(np.dtype(dtype))
    src = rng.standard_normal(400).astype(dtype)
    off = rng.integers(0, 250, 9).astype(np.int64)
    ss, sstride, vb = np.array([0, 2, 3, 7]), 11, 9
    w = rng.standard_normal(8 + 9 * sstride).astype(dtype)
    qs = np.array([1, 1 + span + 3, 2 * span + 40, 3 * span + 97])
    out = rng.standard_normal(4 * span + 120).astype(dtype)
    want = out.copy()
    for s0, q in zip(ss, qs):
        for r in range(r0, r1):
            want[q:q + span] += w[s0 + r * sstride] * src[vb + off[r]:vb + off[r] + span]
    untouched = np.ones(out.size, bool)
    for q in qs:
        untouched[q:q + span] = False
    before = out.copy()
    _call_t(w, ss, sstride, src, vb, off, r0, r1, out, qs, nvec)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(out[untouched], before[untouched])


@njit
def _dot_taps(x, xs, offs, g, gs, g0, gp, n_img, n, acc, ntaps, nk):
    literally(ntaps)
    literally(nk)
    dot_taps(x, xs, offs, g, gs, g0, gp, n_img, n, acc, ntaps, nk)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nk", [1, 2, 3])
@pytest.mark.parametrize("ntaps,n,n_img", [(9, 37, 3), (4, 16, 1), (1, 8, 2), (9, 100, 2)])
def test_dot_taps_matches_numpy(dtype, nk, ntaps, n, n_img):
    nl = lanes(np.dtype(dtype))
    if n < nl:
        n = nl
    rng = np.random.default_rng(nk * 1000 + ntaps * 10 + n)
    xst, gp, g0 = n + 40, n + 3, 2
    gst = g0 + nk * gp + 1
    x = rng.standard_normal((n_img, xst)).astype(dtype)
    g = rng.standard_normal((n_img, gst)).astype(dtype)
    offs = rng.integers(0, xst - n + 1, ntaps).astype(np.int64)
    acc = rng.standard_normal(ntaps * nk * nl).astype(dtype)
    want = acc.reshape(ntaps, nk, nl).sum(axis=2).astype(np.float64)
    for j in range(ntaps):
        for r in range(nk):
            gr = g[:, g0 + r * gp:g0 + r * gp + n].astype(np.float64)
            want[j, r] += (gr * x[:, offs[j]:offs[j] + n]).sum()
    _dot_taps(x, xst, offs, g, gst, g0, gp, n_img, n, acc, ntaps, nk)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(acc.reshape(ntaps, nk, nl).sum(axis=2), want, rtol=tol,
                               atol=tol * n)


@njit
def _max_block(xf, pb, kp, rstep, of, af, o, size, step, with_idx):
    literally(size)
    literally(step)
    literally(with_idx)
    max_block(xf, pb, kp, rstep, of, af, o, size, step, with_idx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size,step", [(2, 1), (2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("with_idx", [True, False])
def test_max_block_matches_scalar_loop(dtype, size, step, with_idx):
    rng = np.random.default_rng(size * 10 + step)
    rstep, pb, kp, o = 37, 3, 5, 4
    x = rng.standard_normal(pb + kp + rstep * size + 2 * POOL_LANES * step).astype(dtype)
    x[rng.random(x.size) < 0.08] = np.nan
    x[pb + kp + 1] = x[pb + kp]          # a tie: the first tap must win
    x[pb + kp + rstep + 2] = x[pb + kp + 2]
    of = np.full(o + POOL_LANES + 3, 7.0, dtype)
    af = np.full(o + POOL_LANES + 3, -1, np.int64)
    _max_block(x, pb, kp, rstep, of, af, o, size, step, with_idx)
    for lane in range(POOL_LANES):
        taps = [kp + lane * step + p * rstep + q for p in range(size) for q in range(size)]
        best, arg = x[pb + taps[0]], taps[0]
        for t in taps[1:]:
            v = x[pb + t]
            if v > best or (np.isnan(v) and not np.isnan(best)):
                best, arg = v, t
        np.testing.assert_array_equal(of[o + lane], best)
        assert af[o + lane] == (arg if with_idx else -1)
    assert np.all(of[:o] == 7.0) and np.all(of[o + POOL_LANES:] == 7.0)
    assert np.all(af[:o] == -1) and np.all(af[o + POOL_LANES:] == -1)


@njit
def _unpool_block(gf, af, o, df, d0, kp, rstep, size):
    literally(size)
    return unpool_block(gf, af, o, df, d0, kp, rstep, size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("stray", [False, True])
def test_unpool_block_writes_each_tap_once(dtype, size, stray):
    rng = np.random.default_rng(size)
    rstep, kp, d0, o = 61, 4, 7, 3
    g = rng.standard_normal(o + POOL_LANES + 2).astype(dtype)
    g[o + 2] = np.nan
    idx = np.zeros(g.size, np.int64)
    for lane in range(POOL_LANES):
        p, q = rng.integers(0, size, 2)
        idx[o + lane] = kp + lane * size + p * rstep + q
    if stray:  # in the plane, not in its window: the block must say so
        idx[o + 5] = kp + rstep * size + 1
    df = np.full(d0 + kp + rstep * size + POOL_LANES * size + 5, 9.0, dtype)
    hits = _unpool_block(g, idx, o, df, d0, kp, rstep, size)
    want = np.full_like(df, 9.0)
    for lane in range(POOL_LANES):
        for p in range(size):
            for q in range(size):
                pos = kp + lane * size + p * rstep + q
                want[d0 + pos] = g[o + lane] if idx[o + lane] == pos else 0
    np.testing.assert_array_equal(df, want)
    assert hits == (1 << POOL_LANES) - 1 - ((1 << 5) if stray else 0)


@njit
def _transpose(src, s0, ss, dst, d0, ds):
    transpose_block(src, s0, ss, dst, d0, ds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_block_matches_numpy(dtype):
    """One lanes x lanes block, at unaligned bases and strides wider than the block; nothing
    outside the destination block is written."""
    n = lanes(np.dtype(dtype))
    rng = np.random.default_rng(8)
    src = rng.standard_normal(2000).astype(dtype)
    for s0, ss, d0, ds in [(3, 21, 5, 19), (0, n, 0, n), (7, 40, 1, 33)]:
        dst = np.full(1600, np.nan, dtype)
        _transpose(src, s0, ss, dst, d0, ds)
        want = np.full_like(dst, np.nan)
        for p in range(n):
            for q in range(n):
                want[d0 + q * ds + p] = src[s0 + p * ss + q]
        np.testing.assert_array_equal(dst, want)


@njit
def _dw_tile(src, ts, off, r0, r1, w, wb, ws, out, qs, nvec):
    literally(nvec)
    tile_dw(src, ts[0], ts[1], ts[2], ts[3], off, r0, r1, w, wb, ws, out, qs[0], qs[1], qs[2],
            qs[3], nvec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nvec", [1, 2, 4])
@pytest.mark.parametrize("r0,r1", [(0, 9), (2, 5), (4, 4)])
def test_tile_dw_matches_numpy(dtype, nvec, r0, r1):
    """Depthwise tile: each lane its own filter; it adds to what the outputs hold."""
    rng = np.random.default_rng(r1 + 10 * nvec)
    m = lanes(np.dtype(dtype)) * nvec
    src = rng.standard_normal(700).astype(dtype)
    w = rng.standard_normal(9 * 70 + m).astype(dtype)
    off = rng.integers(0, 300, 9).astype(np.uint64)
    ts, qs, wb, ws = np.array([3, 50, 101, 177]), np.array([1, 130, 260, 390]), 5, 70
    out = rng.standard_normal(600).astype(dtype)
    want = out.copy()
    for t, q in zip(ts, qs):
        for r in range(r0, r1):
            s0 = int(t) + int(off[r])
            want[q:q + m] += src[s0:s0 + m] * w[wb + r * ws:wb + r * ws + m]
    _dw_tile(src, ts, off, r0, r1, w, wb, ws, out, qs, nvec)
    t = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=t, atol=t)


@njit
def _dw_dot(x, xs, xstep, off, r0, g, gs, gstep, n, out, o0, ostride, ntaps, nvec):
    literally(ntaps)
    literally(nvec)
    dot_dw(x, xs, xstep, off, r0, g, gs, gstep, n, out, o0, ostride, ntaps, nvec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ntaps,nvec", [(9, 2), (1, 2), (9, 1), (4, 3)])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_dot_dw_matches_numpy(dtype, ntaps, nvec, n):
    """Depthwise grad-weight sums over pixels, stored (not added) for every tap."""
    rng = np.random.default_rng(ntaps + n)
    m = lanes(np.dtype(dtype)) * nvec
    x = rng.standard_normal(1500).astype(dtype)
    g = rng.standard_normal(900).astype(dtype)
    off = rng.integers(0, 200, 12).astype(np.uint64)
    xs, xstep, r0, gs, gstep, o0, ostride = 7, 131, 2, 3, 117, 4, m + 5
    out = np.full(o0 + ntaps * ostride + m, np.nan, dtype)
    want = out.copy()
    for j in range(ntaps):
        acc = np.zeros(m, dtype)
        for p in range(n):
            xa = xs + p * xstep + int(off[r0 + j])
            acc += x[xa:xa + m] * g[gs + p * gstep:gs + p * gstep + m]
        want[o0 + j * ostride:o0 + j * ostride + m] = acc
    _dw_dot(x, xs, xstep, off, r0, g, gs, gstep, n, out, o0, ostride, ntaps, nvec)
    t = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=t, atol=t)


@njit
def _prefetch(a, start, count):
    prefetch_write(a, start, count)
    return a[start] if count else a[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_prefetch_write_changes_nothing(dtype):
    """A hint only: whole lines, a part of one, none, an unaligned start; the array and what
    is read after it are unchanged."""
    a = np.arange(1000).astype(dtype)
    before = a.copy()
    for start, count in [(0, 1000), (3, 5), (999, 1), (17, 0), (500, 333)]:
        assert _prefetch(a, start, count) == before[start if count else 0]
    np.testing.assert_array_equal(a, before)
