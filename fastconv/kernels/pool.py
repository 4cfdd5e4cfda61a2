"""Max-pool and average pools (Numba, CPU, parallel over blocks of (n, c) planes).

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``. Kernels never look at user input beyond that, with one exception: backward
range-checks the indices itself, as it reads them (registered with ``checks_indices``).

Windows lying fully inside the input run in vector code: 2x2 and 3x3 windows of stride 1 or 2
along rows eight at a time, shorter rows too (fastconv.kernels._simd.max_block: compares and
selects in vector registers), other sizes tap by tap over a row; windows touching the -inf
padding are clipped one by one, as in naive.py. A candidate replaces the running maximum
when it is strictly greater (the first maximum wins ties) or when it is the first NaN (NaN
propagates). Indices are flat positions in the unpadded plane. Backward zeroes each grad-input
plane and adds the output gradients at their indices, in output order, so results do not
depend on the thread count; where windows tile the plane without overlapping (2x2 or 3x3 with
their own stride) it writes each grad-input element once instead.
"""

from __future__ import annotations

import numpy as np
from numba import int64, literally, njit, uint64

from . import NUMBA_CACHE, IndicesOutsidePlane, _parallel, _reduce
from ._numba import cdiv, claim, sum_flat, wide
from ._simd import POOL_LANES, max_block, unpool_block
from ._window import box_windows, window_max

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
           "avg_pool2d_backward"]


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_rows(xf, pb, hw, planes, of, af, want_idx, rb, drb, o0, do, ohw, rows, n, rstep, size,
               step, o8, a8):
    """In each of ``planes`` planes (the first at pb in xf, its outputs at o0 in of; the next
    hw and ohw further on), ``rows`` rows of n size x size windows lying fully inside, stride
    step along a row: tap (p, q) of window j of row r is at plane offset rb + r*drb + j*step +
    p*rstep + q (no dilation along rows), its output at o0 + r*do + j.

    Blocks of `POOL_LANES` windows by the vector kernel `max_block` (size and step are
    literals: one specialization each); a row's last block overlaps the one before it
    (recomputing an output is harmless), so no scalar remainder runs. A row shorter than a
    block (12x12 planes pooled 2x2) is one block all the same, its results put in the scratch
    ``o8``/``a8`` and its first n copied: the block's other lanes read on into the next rows,
    which stay inside ``xf`` everywhere but at its very end, where the row goes window by
    window (scalar code whose selects become branches, mispredicted on about every other tap
    of random data: 8x slower). One call does many planes: each call costs atomic reference
    counts on its five arrays, more than a small plane's windows (pooling 12x12 planes took
    3x longer with a call per plane).
    """
    literally(size)
    literally(step)
    lanes = uint64(POOL_LANES)
    ustep = uint64(step)
    pb0 = pb
    # past a block's first tap, its loads end before this (a stride-2 tap loads 2 * lanes)
    reach = uint64(size - 1) * rstep + uint64(size) + 2 * lanes
    end = uint64(xf.size)
    for pl in range(planes):
        pb = pb0 + pl * hw
        for r in range(rows):
            kr = rb + r * drb
            orow = o0 + pl * ohw + r * do
            if n < lanes and pb + kr + reach <= end:
                if want_idx:
                    max_block(xf, pb, kr, rstep, o8, a8, 0, size, step, True)
                    for j in range(n):
                        af[orow + j] = a8[j]
                else:
                    max_block(xf, pb, kr, rstep, o8, a8, 0, size, step, False)
                for j in range(n):
                    of[orow + j] = o8[j]
                continue
            if n < lanes:
                for j in range(n):
                    k0 = kr + j * ustep
                    best = xf[pb + k0]
                    arg = k0
                    for p in range(size):
                        for q in range(size):
                            k = k0 + uint64(p) * rstep + uint64(q)
                            v = xf[pb + k]
                            if v > best or (v != v and best == best):
                                best = v
                                arg = k
                    of[orow + j] = best
                    if want_idx:
                        af[orow + j] = arg
                continue
            j = uint64(0)
            while j < n:
                jj = min(j, n - lanes)
                k0 = kr + jj * ustep
                if want_idx:
                    max_block(xf, pb, k0, rstep, of, af, orow + jj, size, step, True)
                else:
                    max_block(xf, pb, k0, rstep, of, af, orow + jj, size, step, False)
                j += lanes


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
def _pool_forward_nchw(x, out, idx, want_idx, kh, kw, sh, sw, ph, pw, dh, dw, per, counter):
    """Blocks of ``per`` (n, c) planes claimed from counter (a claim per small plane would
    cost more than pooling it: the threads share the counter's cache line)."""
    h, w = x.shape[2], x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    af = idx.reshape(-1)
    n_planes = x.shape[0] * x.shape[1]
    o8 = np.empty(POOL_LANES, dtype=xf.dtype)  # a short row's block of results (_pool_rows)
    a8 = np.empty(POOL_LANES, dtype=np.int64)
    b = claim(counter)
    while b * per < n_planes:
        _pool_planes(b * per, min(n_planes, (b + 1) * per), xf, of, af, h, w, oh, ow, want_idx,
                     kh, kw, sh, sw, ph, pw, dh, dw, o8, a8)
        b = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_planes(nc0, nc1, xf, of, af, h, w, oh, ow, want_idx, kh, kw, sh, sw, ph, pw, dh, dw,
                 o8, a8):
    """Planes nc0 <= nc < nc1: the windows touching the padding one by one, then the others
    in one `_pool_rows` call."""
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
    clipped = i_lo > 0 or i_hi < oh or j_lo > 0 or j_hi < ow
    for nc in range(nc0, nc1 if clipped else nc0):
        pb = uint64(nc * h * w)
        for i in range(oh):
            o = nc * oh * ow + i * ow
            if i < i_lo or i >= i_hi:  # windows touching the padding, clipped
                for j in range(ow):
                    _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw,
                                 ph, pw, dh, dw)
                continue
            for j in range(j_lo):
                _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw, ph,
                             pw, dh, dw)
            for j in range(j_hi, ow):
                _win_clipped(xf, pb, of, af, want_idx, o + j, i, j, h, w, kh, kw, sh, sw, ph,
                             pw, dh, dw)
    if n_in == 0 or i_hi == i_lo:
        return
    pb, hw, planes = uint64(nc0 * h * w), uint64(h * w), uint64(nc1 - nc0)
    rb = uint64((i_lo * sh - ph) * w + j_lo * sw - pw)
    o0, ohw = uint64(nc0 * oh * ow + i_lo * ow + j_lo), uint64(oh * ow)
    rows, drb, do = uint64(i_hi - i_lo), uint64(sh * w), uint64(ow)
    if fused and kh == 2 and sw == 1:  # sizes and strides as literals: see _pool_rows
        _pool_rows(xf, pb, hw, planes, of, af, want_idx, rb, drb, o0, do, ohw, rows, n_in,
                   rstep, 2, 1, o8, a8)
    elif fused and kh == 2:
        _pool_rows(xf, pb, hw, planes, of, af, want_idx, rb, drb, o0, do, ohw, rows, n_in,
                   rstep, 2, 2, o8, a8)
    elif fused and sw == 1:
        _pool_rows(xf, pb, hw, planes, of, af, want_idx, rb, drb, o0, do, ohw, rows, n_in,
                   rstep, 3, 1, o8, a8)
    elif fused:
        _pool_rows(xf, pb, hw, planes, of, af, want_idx, rb, drb, o0, do, ohw, rows, n_in,
                   rstep, 3, 2, o8, a8)
    else:
        best = np.empty(n_in, dtype=xf.dtype)
        arg = np.empty(n_in, dtype=np.int64)
        for pl in range(planes):
            for r in range(rows):
                _win_any(xf, pb + pl * hw, of, af, want_idx, rb + r * drb, n_in, usw, udw,
                         rstep, o0 + pl * ohw + r * do, kh, kw, best, arg)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_backward_nchw(g, idx, dx, tile, per, bad, counter):
    """Blocks of ``per`` (n, c) planes claimed from counter. ``tile`` (2 or 3): the windows
    are tile x tile with stride tile, no padding or dilation, so they never overlap and each
    grad-input element is written once (`_unpool_plane`); 0: any windows (`_scatter_plane`).
    Indices are checked against the plane as they are read: ``bad[nc]`` counts the ones
    plane nc skipped (the indices are not validated beforehand: see `max_pool2d_backward`)."""
    h, w = dx.shape[2], dx.shape[3]
    oh, ow = g.shape[2], g.shape[3]
    gf = g.reshape(-1)
    af = idx.reshape(-1)
    df = dx.reshape(-1)
    n_planes = dx.shape[0] * dx.shape[1]
    rows8 = np.empty(max(tile - 1, 0) * w + max(tile, 1) * POOL_LANES, dtype=df.dtype)
    b = claim(counter)
    while b * per < n_planes:  # a call per block of planes: see _pool_rows
        nc0, nc1 = uint64(b * per), uint64(min(n_planes, (b + 1) * per))
        if tile == 2:
            _unpool_planes(nc0, nc1, gf, af, df, uint64(h), uint64(w), uint64(oh), uint64(ow),
                           2, bad, rows8)
        elif tile == 3:
            _unpool_planes(nc0, nc1, gf, af, df, uint64(h), uint64(w), uint64(oh), uint64(ow),
                           3, bad, rows8)
        else:
            for nc in range(nc0, nc1):
                bad[nc] = _scatter_plane(nc, gf, af, df, uint64(h * w), uint64(oh * ow))
        b = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _scatter_plane(nc, gf, af, df, plane, outs):
    """Zero the plane (while it is in cache), then add each output gradient at its index, in
    output order (so overlapping windows, and any index shared by several outputs, add
    deterministically); the number of indices outside the plane, skipped."""
    d0 = nc * plane
    for t in range(plane):
        df[d0 + t] = 0
    g0 = nc * outs
    skipped = 0
    for t in range(outs):
        k = uint64(af[g0 + t])  # a negative index is huge seen as unsigned
        if k < plane:
            df[d0 + k] += gf[g0 + t]
        else:
            skipped += 1
    return skipped


@njit(cache=NUMBA_CACHE, nogil=True)
def _unpool_planes(nc0, nc1, gf, af, df, h, w, oh, ow, size, bad, rows8):
    """Planes nc0 <= nc < nc1 of non-overlapping size x size windows, stride size: the full
    windows' taps written once (`unpool_block`, eight windows at a time, a row's last block
    overlapping the one before: writing the same values twice is harmless), the rest of the
    plane zeroed, then the partial windows that ``ceil_mode`` adds scattered into those
    zeros. A plane where a full window's index lies outside it is scattered instead
    (`_scatter_plane`, which counts the bad indices in ``bad``). Rows of fewer than eight
    windows go through one block too, into the scratch ``rows8`` ((size - 1) * w + 8 * size
    elements): scalar code there, its selects turned into branches, was 3x-5x slower per
    element."""
    literally(size)
    us = uint64(size)
    lanes = uint64(POOL_LANES)
    ohf, owf = min(oh, h // us), min(ow, w // us)
    every = (1 << POOL_LANES) - 1
    valid = (1 << min(owf, lanes)) - 1  # the lanes of a short row's block that are its own
    n_out = uint64(gf.size)
    for nc in range(nc0, nc1):
        d0, o_pl = nc * h * w, nc * oh * ow
        own = True
        for i in range(ohf):
            o_row = o_pl + i * ow
            kp_row = i * us * w
            if owf >= lanes:
                j = uint64(0)
                while j < owf:
                    jj = min(j, owf - lanes)
                    own &= unpool_block(gf, af, o_row + jj, df, d0, kp_row + jj * us, w,
                                        size) == every
                    j += lanes
            elif o_row + lanes <= n_out:
                # a short row: one block into the scratch rows (their stride w, so the lanes
                # past owf, the next windows', land past each row's valid part or under the
                # next row, which is stored after it), then the valid part copied
                hits = unpool_block(gf, af, o_row, rows8, -int64(kp_row), kp_row, w, size)
                own &= (hits & valid) == valid
                for p in range(us):
                    for c in range(owf * us):
                        df[d0 + kp_row + p * w + c] = rows8[p * w + c]
            else:  # the array's last outputs: a block would read past them
                for j in range(owf):
                    k, gv = uint64(af[o_row + j]), gf[o_row + j]
                    hit = False
                    for p in range(us):
                        for q in range(us):
                            pos = kp_row + j * us + p * w + q
                            hit |= k == pos
                            df[d0 + pos] = gv if k == pos else 0
                    own &= hit
            for p in range(us):
                for c in range(owf * us, w):
                    df[d0 + kp_row + p * w + c] = 0
        for t in range(ohf * us * w, h * w):
            df[d0 + t] = 0
        for i in range(oh):
            for j in range(owf if i < ohf else 0, ow):
                o = o_pl + i * ow + j
                k = uint64(af[o])
                if k < h * w:
                    df[d0 + k] += gf[o]
                else:
                    own = False  # the scatter redoes the plane and counts it
        if not own:
            bad[nc] = _scatter_plane(nc, gf, af, df, h * w, oh * ow)


def _plane_blocks(spec):
    """(planes per work item, work items): about 4096 outputs' worth of planes an item."""
    per = max(1, 4096 // (spec.out_hw[0] * spec.out_hw[1]))
    return per, -(-spec.x_shape[0] * spec.x_shape[1] // per)


def max_pool2d_forward(x, spec, return_indices):
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    idx = np.empty(spec.out_shape if return_indices else (1, 1, 1, 1), dtype=np.int64)
    per, items = _plane_blocks(spec)
    _parallel.run(_pool_forward_nchw, (x, out, idx, return_indices, *spec.loop_args, per),
                  items, _parallel.pool_work_ns(spec))
    return out, (idx if return_indices else None)


def max_pool2d_backward(g, idx, spec):
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    k = spec.kernel[0]
    tiled = (spec.kernel == spec.stride == (k, k) and k in (2, 3) and spec.padding == (0, 0)
             and spec.dilation == (1, 1))
    per, items = _plane_blocks(spec)
    bad = np.zeros(spec.x_shape[0] * spec.x_shape[1], np.int64)  # skipped indices, per plane
    _parallel.run(_pool_backward_nchw, (g, idx, dx, k if tiled else 0, per, bad), items,
                  _parallel.pool_work_ns(spec, backward=True))
    if bad.any():
        raise IndicesOutsidePlane(f"{int(bad.sum())} indices outside the plane")
    return dx


# ---------------------------------------------------------------------------------------------
# average pools, fixed and adaptive windows alike (fastconv.kernels._window.box_windows): per
# plane, the rows of each window row are summed into one accumulator row (a vector loop over
# the plane's width), then each window's columns of it; float64 accumulators. Backward
# spreads each window row's gradients over a column row, then adds it to the window's rows.


# Sums reassociate so that they vectorize (the order is still fixed by the compiled code, so
# results stay deterministic); indices are unsigned so that Numba emits no wraparound checks.
_SUMS = {"reassoc", "contract"}


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _add_row(acc, src, base, n):
    """acc[:n] += src[base:base + n] (in float64)."""
    wide()
    b = uint64(base)
    for q in range(uint64(n)):
        acc[q] += src[b + q]


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_row(xf, pb, of, rb, n, rstep, o0, size, step, div):
    """n size x size windows lying fully inside, stride step along the row, each sum divided
    by div: tap (p, q) of window j is at plane offset rb + j*step + p*rstep + q. size and step
    are compiled in (`literally`), so the taps unroll and the j loop vectorizes with
    interleaved loads (as `_pool_row`)."""
    literally(size)
    literally(step)
    wide()
    for j in range(n):
        k0 = pb + rb + j * uint64(step)
        total = 0.0
        for p in range(size):
            for q in range(size):
                total += xf[k0 + uint64(p) * rstep + uint64(q)]
        of[o0 + j] = total / div


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _box_taps(xf, pb, tot, rb, n, rstep, step, kh, kw):
    """tot[:n] = sums of n kh x kw windows lying fully inside, one strided pass per tap."""
    wide()
    for j in range(n):
        tot[j] = 0.0
    for p in range(kh):
        for q in range(kw):
            k0 = pb + rb + uint64(p) * rstep + uint64(q)
            for j in range(n):
                tot[j] += xf[k0 + j * step]


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _box_window(xf, base, w, rows, cols, i, j):
    """The sum of window (i, j) from the tables (windows at the edges, adaptive pools)."""
    total = 0.0
    for r in range(rows[i, 0], rows[i, 1]):
        for q in range(uint64(base + r * w + cols[j, 0]), uint64(base + r * w + cols[j, 1])):
            total += xf[q]
    return total


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _fill_flat(dst, base, n, v):
    wide()
    b = uint64(base)
    for t in range(uint64(n)):
        dst[b + t] = v


@njit(cache=NUMBA_CACHE, nogil=True)
def _divide_row(dst, base, tot, row_div, col_div, n):
    """dst[base + j] = tot[j] / (row_div * col_div[j]): one division by the window's size (an
    exact product), as PyTorch."""
    wide()
    b = uint64(base)
    for j in range(uint64(n)):
        dst[b + j] = tot[j] / (row_div * col_div[j])


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_forward_nchw(x, out, rows, cols, inner, div, counter):
    """(n, c) planes claimed from counter. inner = (kh, kw, sh, sw, ph, pw, i0, i1, j0, j1):
    the windows (i, j) with i0 <= i < i1 and j0 <= j < j1 lie wholly inside the plane and
    divide by div (none for adaptive pools); the others go by the tables, a row at a time
    when they are wide."""
    n_planes = x.shape[0] * x.shape[1]
    h, w = x.shape[2], x.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    kh, kw, sh, sw, ph, pw, i0, i1, j0, j1 = inner
    fused = kh == kw and (kh == 2 or kh == 3) and (sw == 1 or sw == 2)
    n_in, rstep, usw = uint64(j1 - j0), uint64(w), uint64(sw)
    xf, of = x.reshape(-1), out.reshape(-1)
    acc = np.empty(w, dtype=np.float64)
    tot = np.empty(ow, dtype=np.float64)
    col_div = cols[:, 2].astype(np.float64)
    full_rows = ow == 1 and cols[0, 0] == 0 and cols[0, 1] == w  # global pooling along W
    nc = claim(counter)
    while nc < n_planes:
        base = nc * h * w
        for i in range(oh):
            o = (nc * oh + i) * ow
            if full_rows:  # the window's rows lie one after the other: one flat sum
                r0, r1 = rows[i, 0], rows[i, 1]
                of[o] = sum_flat(xf, base + r0 * w, (r1 - r0) * w) / (rows[i, 2] * col_div[0])
                continue
            if i0 <= i < i1 and n_in > 0:
                for j in range(j0):
                    of[o + j] = _box_window(xf, base, w, rows, cols, i, j) / (
                        rows[i, 2] * col_div[j])
                for j in range(j1, ow):
                    of[o + j] = _box_window(xf, base, w, rows, cols, i, j) / (
                        rows[i, 2] * col_div[j])
                rb = uint64((i * sh - ph) * w + j0 * sw - pw)
                o0, pb = uint64(o + j0), uint64(base)
                if fused and kh == 2 and sw == 1:  # sizes and strides as literals
                    _box_row(xf, pb, of, rb, n_in, rstep, o0, 2, 1, div)
                elif fused and kh == 2:
                    _box_row(xf, pb, of, rb, n_in, rstep, o0, 2, 2, div)
                elif fused and sw == 1:
                    _box_row(xf, pb, of, rb, n_in, rstep, o0, 3, 1, div)
                elif fused:
                    _box_row(xf, pb, of, rb, n_in, rstep, o0, 3, 2, div)
                else:
                    _box_taps(xf, pb, tot, rb, n_in, rstep, usw, kh, kw)
                    for j in range(j0, j1):
                        of[o + j] = tot[j - j0] / div
                continue
            acc[:] = 0.0
            for r in range(rows[i, 0], rows[i, 1]):
                _add_row(acc, xf, base + r * w, w)
            for j in range(ow):
                tot[j] = sum_flat(acc, cols[j, 0], cols[j, 1] - cols[j, 0])
            _divide_row(of, o, tot, float(rows[i, 2]), col_div, ow)
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _spread_rows(plane, spread, r0, r1, w):
    """plane[r, :] += spread for rows r0 <= r < r1."""
    wide()
    n = uint64(w)
    for r in range(r0, r1):
        b = uint64(r * w)
        for q in range(n):
            plane[b + q] += spread[q]


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _store_plane(dst, base, plane, n):
    wide()
    b = uint64(base)
    for t in range(uint64(n)):
        dst[b + t] = plane[t]


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_SUMS)
def _spread_row(spread, gf, g0, rows, cols, col_div, i, inner):
    """spread[q] = the sum of the gradients, each divided by its window's size, of the windows
    of output row i that contain input column q. The inner windows (see `_box_forward_nchw`)
    go in one strided vector pass per kernel column."""
    wide()
    kh, kw, sh, sw, ph, pw, i0, i1, j0, j1 = inner
    ow = cols.shape[0]
    rdiv = float(rows[i, 2])
    spread[:] = 0.0
    for j in range(j0, j1):
        v = gf[uint64(g0 + j)] / (rdiv * col_div[j])
        for q in range(kw):
            spread[uint64(j * sw - pw + q)] += v
    for j in range(ow):
        if j0 <= j < j1:
            continue
        v = gf[g0 + j] / (rdiv * col_div[j])
        for q in range(cols[j, 0], cols[j, 1]):
            spread[q] += v


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_backward_nchw(g, dx, rows, cols, row_users, disjoint, inner, counter):
    """(n, c) planes claimed from counter; each plane summed in a fixed order. ``disjoint``:
    no input pixel lies in two windows (global pooling, 2x2 stride 2), so each row of dx is
    written once, without a float64 plane to add into. ``inner`` as for the forward."""
    n_planes = dx.shape[0] * dx.shape[1]
    h, w = dx.shape[2], dx.shape[3]
    oh, ow = g.shape[2], g.shape[3]
    gf, df = g.reshape(-1), dx.reshape(-1)
    spread = np.empty(w, dtype=np.float64)
    plane = np.empty(1 if disjoint else h * w, dtype=np.float64)
    col_div = cols[:, 2].astype(np.float64)
    full_rows = disjoint and ow == 1 and cols[0, 0] == 0 and cols[0, 1] == w
    nc = claim(counter)
    while nc < n_planes:
        base = nc * h * w
        if disjoint:  # rows in no window get zeros; the others are written once below
            for r in range(h):
                if row_users[r, 1] == row_users[r, 0]:
                    _fill_flat(df, base + r * w, w, 0.0)
        if full_rows:  # each window is a run of whole rows: one fill each
            for i in range(oh):
                r0, r1 = rows[i, 0], rows[i, 1]
                _fill_flat(df, base + r0 * w, (r1 - r0) * w,
                           gf[nc * oh + i] / (rows[i, 2] * col_div[0]))
            nc = claim(counter)
            continue
        if not disjoint:
            plane[:] = 0.0
        for i in range(oh):
            _spread_row(spread, gf, (nc * oh + i) * ow, rows, cols, col_div, i, inner)
            if disjoint:
                for r in range(rows[i, 0], rows[i, 1]):
                    _store_plane(df, base + r * w, spread, w)
            else:
                _spread_rows(plane, spread, rows[i, 0], rows[i, 1], w)
        if not disjoint:
            _store_plane(df, base, plane, h * w)
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _global_backward(g, dx, div, per, counter):
    """Global pooling's gradient: each plane filled with its gradient over div."""
    gf, df = g.reshape(-1), dx.reshape(-1)
    n_planes, m = dx.shape[0] * dx.shape[1], dx.shape[2] * dx.shape[3]
    b = claim(counter)
    while b * per < n_planes:
        for nc in range(b * per, min(n_planes, (b + 1) * per)):
            _fill_flat(df, nc * m, m, gf[nc] / div)
        b = claim(counter)


def _global_divisor(spec, t):
    """The divisor of global pooling if one window covers each whole plane (adaptive or not,
    padding and divisor_override included), else None: then the planes' sums
    (fastconv.kernels._reduce) and fills replace the general kernels, which took twice as
    long with a claim per plane and still 5-30% longer with blocks of planes (their per-plane
    checks)."""
    h, w = spec.x_shape[2:]
    rows, cols = t.rows, t.cols
    if rows.shape[0] != 1 or cols.shape[0] != 1 or tuple(rows[0, :2]) != (0, h) or tuple(
            cols[0, :2]) != (0, w):
        return None
    return float(rows[0, 2]) * float(cols[0, 2])


def avg_pool2d_forward(x, spec):
    t = box_windows(spec)
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    div = _global_divisor(spec, t)
    if div is not None:
        _reduce.plane_sums(x.reshape(-1), spec.x_shape[2] * spec.x_shape[3], out.reshape(-1),
                           div)
        return out
    inner, div = _inner_windows(spec)
    _parallel.run(_box_forward_nchw, (x, out, t.rows, t.cols, inner, div),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return out


def _inner_windows(spec):
    """((kh, kw, sh, sw, ph, pw, i0, i1, j0, j1), divisor) for `_box_forward_nchw`: the
    output rows and columns whose windows lie wholly inside the input."""
    if spec.adaptive:
        return (1, 1, 1, 1, 0, 0, 0, 0, 0, 0), 1.0
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    (h, w), (oh, ow) = spec.x_shape[2:], spec.out_hw
    i0, j0 = min(oh, cdiv(ph, sh)), min(ow, cdiv(pw, sw))
    i1 = max(i0, min(oh, (h + ph - kh) // sh + 1))
    j1 = max(j0, min(ow, (w + pw - kw) // sw + 1))
    div = spec.divisor_override if spec.divisor_override is not None else kh * kw
    return (kh, kw, sh, sw, ph, pw, i0, i1, j0, j1), float(div)


def avg_pool2d_backward(g, spec):
    t = box_windows(spec)
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    div = _global_divisor(spec, t)
    if div is not None:
        per = max(1, _reduce.BLOCK // (spec.x_shape[2] * spec.x_shape[3]))  # planes per item
        _parallel.run(_global_backward, (g, dx, div, per),
                      cdiv(spec.x_shape[0] * spec.x_shape[1], per), _parallel.box_work_ns(spec))
        return dx
    disjoint = bool((t.row_users[:, 1] - t.row_users[:, 0]).max() <= 1
                    and (t.col_users[:, 1] - t.col_users[:, 0]).max() <= 1)
    inner = _inner_windows(spec)[0]
    _parallel.run(_box_backward_nchw, (g, dx, t.rows, t.cols, t.row_users, disjoint, inner),
                  spec.x_shape[0] * spec.x_shape[1], _parallel.box_work_ns(spec))
    return dx
