"""Max-pool (Numba, CPU, parallel over (n, c) planes).

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``. Kernels never look at user input beyond that.

Windows lying fully inside the input run in vector loops over an output row (2x2 and 3x3 by
one row kernel compiled for each size and stride, other sizes tap by tap); windows touching the
-inf padding are clipped one by one, as in naive.py. A candidate replaces the running maximum
when it is strictly greater (the first maximum wins ties) or when it is the first NaN (NaN
propagates). Indices are flat positions in the unpadded plane. Backward zeroes each grad-input
plane and adds the output gradients at their indices, in output order, so results do not
depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import int32, int64, literally, njit, uint64

from . import NUMBA_CACHE, _parallel
from ._numba import cdiv, claim, wide
from ._window import box_windows, window_max

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
           "avg_pool2d_backward"]


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_row(xf, pb, of, af, want_idx, rb, n, rstep, o0, size, step):
    """n size x size windows lying fully inside, stride step along the row: tap (p, q) of
    window j is at plane offset rb + j*step + p*rstep + q (no dilation along rows: neighbouring
    taps form one interleaved load).

    size (2 or 3) and step (1 or 2) are compiled in (`literally`: one specialization each), so
    the tap loops unroll and the j loops are branch-free and vectorize; a literal step makes the
    loads interleaved accesses, not gathers. Values and indices go in separate loops: with
    three arrays in one loop LLVM's alias checks keep rows shorter than ~32 on the scalar path.
    The index stays in 32 bits in the loop (the caller checks the plane fits), so 512-bit
    registers hold 8 lanes of it. Windows go in blocks of 8 and a last block of up to 24
    overlaps the ones before (recomputing an output is harmless), so no scalar remainder runs.

    Written so that LLVM emits the loops of the former hand-unrolled kernels (compare
    ``inspect_asm``): it calls no other function (a call costs every row an atomic reference
    count on each array); the part loop's trip count is not a constant (a constant one gets
    unrolled and its copies specialised, slower on short rows); and the index is formed as
    ``int32(kp) + int32(q)``, not from the load address (which LLVM rewrites as
    ``k0 + (rstep + q)``: 10% slower for 2x2 stride 2). Planes fit in 31 bits, so it equals
    ``int32(kp + q)``.
    """
    literally(size)
    literally(step)
    wide()
    u8 = uint64(8)
    m = n - n % u8 if n >= u8 else n
    tail = min(n, uint64(24))  # the index loop takes its vector path from ~24 windows
    for part in range(4 if want_idx else 2):
        if part == 1 or part == 3:
            if m == n:
                continue
            b, cnt, oo = rb + (n - tail) * uint64(step), tail, o0 + n - tail
        else:
            b, cnt, oo = rb, m, o0
        if part < 2:
            for j in range(cnt):
                k0 = b + j * uint64(step)
                best = xf[pb + k0]
                for p in range(size):
                    kp = k0 + uint64(p) * rstep
                    for q in range(size):
                        if p == 0 and q == 0:
                            continue
                        v = xf[pb + kp + uint64(q)]
                        take = (v > best) | ((v != v) & (best == best))
                        best = v if take else best
                of[oo + j] = best
        else:
            for j in range(cnt):
                k0 = b + j * uint64(step)
                best = xf[pb + k0]
                arg = int32(k0)
                for p in range(size):
                    kp = k0 + uint64(p) * rstep
                    for q in range(size):
                        if p == 0 and q == 0:
                            continue
                        v = xf[pb + kp + uint64(q)]
                        take = (v > best) | ((v != v) & (best == best))
                        best = v if take else best
                        arg = int32(kp) + int32(q) if take else arg
                af[oo + j] = arg


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_row_short(xf, pb, of, af, rb, n, sw, rstep, o0, kh, kw):
    """Windows fully inside with their indices, one at a time, for rows too short for the index
    loops of _pool_row to take their vector path: their scalar fallback is slower still
    (the x86 backend turns its selects back into branches)."""
    for j in range(n):
        k0 = rb + j * sw
        best = xf[pb + k0]
        arg = k0
        for p in range(kh):
            for q in range(kw):
                k = k0 + uint64(p) * rstep + uint64(q)
                v = xf[pb + k]
                if v > best or (v != v and best == best):
                    best = v
                    arg = k
        of[o0 + j] = best
        af[o0 + j] = arg


@njit(cache=NUMBA_CACHE, nogil=True)
def _win_any(xf, pb, of, af, want_idx, rb, n, sw, dwc, rstep, o0, kh, kw, best, arg):
    """Fully inside windows of any size, one vector pass per tap over best/arg scratch."""
    for p in range(kh):
        for q in range(kw):
            d = uint64(p) * rstep + uint64(q) * dwc
            if p == 0 and q == 0:
                for j in range(n):
                    k = rb + j * sw + d
                    best[j] = xf[pb + k]
                    arg[j] = k
                continue
            for j in range(n):
                k = rb + j * sw + d
                v = xf[pb + k]
                bv = best[j]
                take = (v > bv) | ((v != v) & (bv == bv))
                best[j] = v if take else bv
                arg[j] = k if take else arg[j]
    for j in range(n):
        of[o0 + j] = best[j]
        if want_idx:
            af[o0 + j] = arg[j]


_window_max = njit(cache=NUMBA_CACHE, nogil=True)(window_max)


@njit(cache=NUMBA_CACHE, nogil=True)
def _win_clipped(xf, pb, of, af, want_idx, o, i, j, h, w, kh, kw, sh, sw, ph, pw, dh, dw):
    """One window touching the padding: its taps inside the input only (as naive.py)."""
    best, arg = _window_max(xf, int64(pb), h, w, i, j, kh, kw, sh, sw, ph, pw, dh, dw)
    of[o] = best
    if want_idx:
        af[o] = arg


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_forward_nchw(x, out, idx, want_idx, kh, kw, sh, sw, ph, pw, dh, dw, counter):
    """(n, c) planes claimed from counter."""
    nc = claim(counter)
    while nc < x.shape[0] * x.shape[1]:
        _pool_plane(nc, x, out, idx, want_idx, kh, kw, sh, sw, ph, pw, dh, dw)
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_plane(nc, x, out, idx, want_idx, kh, kw, sh, sw, ph, pw, dh, dw):
    h, w = x.shape[2], x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    af = idx.reshape(-1)
    # windows fully inside: i*sh - ph >= 0 and i*sh - ph + (kh-1)*dh <= h - 1 (likewise j)
    i_lo = min(oh, cdiv(ph, sh))
    i_hi = max(i_lo, min(oh, (h - 1 - (kh - 1) * dh + ph) // sh + 1))
    j_lo = min(ow, cdiv(pw, sw))
    j_hi = max(j_lo, min(ow, (w - 1 - (kw - 1) * dw + pw) // sw + 1))
    n_in = uint64(j_hi - j_lo)
    usw, udw, rstep = uint64(sw), uint64(dw), uint64(dh * w)
    # 2x2 and 3x3 windows, stride 1 or 2 along rows, no dilation along rows, int32 indices
    fused = kh == kw and (kh == 2 or kh == 3) and (sw == 1 or sw == 2) and dw == 1
    fused = fused and h * w < 2**31
    pb = uint64(nc * h * w)
    for i in range(oh):
        o = nc * oh * ow + i * ow
        if i < i_lo or i >= i_hi:
            for j in range(ow):
                _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw, ph, pw,
                             dh, dw)
            continue
        for j in range(j_lo):
            _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw, ph, pw,
                         dh, dw)
        for j in range(j_hi, ow):
            _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw, ph, pw,
                         dh, dw)
        if n_in == 0:
            continue
        rb = uint64((i * sh - ph) * w + j_lo * sw - pw)
        o0 = uint64(o + j_lo)
        if fused and want_idx and n_in < 24:
            _pool_row_short(xf, pb, of, af, rb, n_in, usw, rstep, o0, kh, kw)
        elif fused and kh == 2 and sw == 1:  # sizes and strides as literals: see _pool_row
            _pool_row(xf, pb, of, af, want_idx, rb, n_in, rstep, o0, 2, 1)
        elif fused and kh == 2:
            _pool_row(xf, pb, of, af, want_idx, rb, n_in, rstep, o0, 2, 2)
        elif fused and sw == 1:
            _pool_row(xf, pb, of, af, want_idx, rb, n_in, rstep, o0, 3, 1)
        elif fused:
            _pool_row(xf, pb, of, af, want_idx, rb, n_in, rstep, o0, 3, 2)
        else:
            best = np.empty(n_in, dtype=x.dtype)
            arg = np.empty(n_in, dtype=np.int64)
            _win_any(xf, pb, of, af, want_idx, rb, n_in, usw, udw, rstep, o0, kh, kw, best, arg)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_backward_nchw(g, idx, dx, counter):
    """(n, c) planes claimed from counter: zero the plane (while it is in cache), then add each
    output gradient at its index, in output order (so overlapping windows, and any index
    shared by several outputs, add deterministically)."""
    nc = claim(counter)
    while nc < g.shape[0] * g.shape[1]:
        _pool_backward_plane(nc, g, idx, dx)
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_backward_plane(nc, g, idx, dx):
    oh, ow = g.shape[2], g.shape[3]
    plane = dx.shape[2] * dx.shape[3]
    gf = g.reshape(-1)
    af = idx.reshape(-1)
    df = dx.reshape(-1)
    d0 = uint64(nc * plane)
    for t in range(uint64(plane)):
        df[d0 + t] = 0
    g0 = uint64(nc * oh * ow)
    for t in range(uint64(oh * ow)):
        df[d0 + uint64(af[g0 + t])] += gf[g0 + t]


def max_pool2d_forward(x, spec, return_indices):
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    idx = np.empty(spec.out_shape if return_indices else (1, 1, 1, 1), dtype=np.int64)
    _parallel.run(_pool_forward_nchw, (x, out, idx, return_indices, *spec.loop_args),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.pool_work_ns(spec))
    return out, (idx if return_indices else None)


def max_pool2d_backward(g, idx, spec):
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    _parallel.run(_pool_backward_nchw, (g, idx, dx), spec.x_shape[0] * spec.x_shape[1],
                  _parallel.pool_work_ns(spec, backward=True))
    return dx


# ---------------------------------------------------------------------------------------------
# average pools, fixed and adaptive windows alike (fastconv.kernels._window.box_windows): per
# plane, the rows of each window row are summed into one accumulator row (a vector loop over
# the plane's width), then each window's columns of it; float64 accumulators. Backward
# spreads each window row's gradients over a column row, then adds it to the window's rows.


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_forward_nchw(x, out, rows, cols, counter):
    """(n, c) planes claimed from counter."""
    n_planes = x.shape[0] * x.shape[1]
    h, w = x.shape[2], x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    xf, of = x.reshape(-1), out.reshape(-1)
    acc = np.empty(w, dtype=np.float64)
    nc = claim(counter)
    while nc < n_planes:
        base = nc * h * w
        for i in range(oh):
            for q in range(w):
                acc[q] = 0.0
            for r in range(rows[i, 0], rows[i, 1]):
                row = base + r * w
                for q in range(w):
                    acc[q] += xf[row + q]
            for j in range(ow):
                total = 0.0
                for q in range(cols[j, 0], cols[j, 1]):
                    total += acc[q]
                of[(nc * oh + i) * ow + j] = total / (rows[i, 2] * cols[j, 2])
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_backward_nchw(g, dx, rows, cols, counter):
    """(n, c) planes claimed from counter; each plane summed in a fixed order."""
    n_planes = dx.shape[0] * dx.shape[1]
    h, w = dx.shape[2], dx.shape[3]
    oh, ow = g.shape[2], g.shape[3]
    gf, df = g.reshape(-1), dx.reshape(-1)
    spread = np.empty(w, dtype=np.float64)
    plane = np.empty(h * w, dtype=np.float64)
    nc = claim(counter)
    while nc < n_planes:
        for t in range(h * w):
            plane[t] = 0.0
        for i in range(oh):
            for q in range(w):
                spread[q] = 0.0
            for j in range(ow):
                v = gf[(nc * oh + i) * ow + j] / (rows[i, 2] * cols[j, 2])
                for q in range(cols[j, 0], cols[j, 1]):
                    spread[q] += v
            for r in range(rows[i, 0], rows[i, 1]):
                for q in range(w):
                    plane[r * w + q] += spread[q]
        base = nc * h * w
        for t in range(h * w):
            df[base + t] = plane[t]
        nc = claim(counter)


def avg_pool2d_forward(x, spec):
    t = box_windows(spec)
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    _parallel.run(_box_forward_nchw, (x, out, t.rows, t.cols),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return out


def avg_pool2d_backward(g, spec):
    t = box_windows(spec)
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    _parallel.run(_box_backward_nchw, (g, dx, t.rows, t.cols),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return dx
