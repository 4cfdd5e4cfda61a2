"""Direct-loop conv2d on channels-last arrays (NHWC input, HWIO filters), for the direct method.

Inputs are validated and C-contiguous in ``spec.dtype`` (see fastconv._validate); the spec's
shapes are NCHW / OIHW whatever the layout, the arrays are NHWC / HWIO.

How it runs
-----------
In NHWC a pixel's channels are contiguous, and so are an HWIO filter's output channels: the
vector loops run over channels, the images' layout itself, with no transposes. Every pass is
one *pixel-row correlation*: ``out[pixel, k] += sum_r src[base(pixel) + off[r]] * w[r, k]``
over a flat reduction list ``r = (tap, input channel)`` whose source offsets ``off`` are
precomputed. The micro-kernel takes 4 pixels and 4 reduction entries at a time: 16 source
values held as scalars, so each loaded weight vector feeds 4 FMAs and each output vector's
load and store 4 of them. Chunks of the reduction cross tap boundaries, so a 3-channel first
layer loses nothing to remainders.

- Forward: the source is the input, zero-padded once (a copy only when there is padding).
- Grad-input: the same correlation on the zero-padded grad-output with flipped, transposed
  filters, once per stride phase ``(h % sh, w % sw)``: each phase reads only the taps that land
  on it, so a stride-2 layer does no multiply by an inserted zero.
- Grad-weight: ``dw[r, k] = sum over pixels of x[base(pixel) + off[r]] * g[pixel, k]``, 4 pixels
  x 4 reduction entries at a time; each work item owns a block of ``dw`` and walks the pixels in
  blocks that stay in cache while all its reduction entries use them.
- Depthwise layers (one input channel per group, one output channel each): 4 pixels x up to 4
  vectors of channels in registers over the taps (fastconv.kernels._simd.tile_dw), each
  channel with its own filter. They run by bands of rows, each work item laying out the
  zero-padded rows it reads in a per-thread scratch (in L2), so no padded copy of a whole
  array is written and read back; a stride-1 backward computes all its gradients in one such
  pass (dx from the padded grad-output rows, dw and db from the input rows and the
  grad-output's), reading each array once.
- The one exception to reading NHWC as it is: the grad-input of a layer with fewer input
  channels per group than a vector holds (a first layer, C = 1 or 3) would vectorize over
  those few channels, so it transposes the grad-output and runs direct.py's NCHW kernel.

Register tiles (fastconv.kernels._simd.tile4): forward and grad-input keep 4 pixels x
``NVEC`` vectors of output channels, grad-weight 4 reduction entries x ``NVEC`` vectors, in
vector registers over the whole reduction (forward) or a block of pixels (grad-weight), and
store them once. Forward and grad-input also tile the ends of rows and of channel blocks: the
last group of 4 pixels ends at the row's end and the last vector at the block's end, both
overlapping what is already done; such a tile goes to a scratch tile and only its new pixels
and channels are added to the output. The rest (fewer channels than a vector, rows of fewer
than 4 pixels, grad-weight's remainders) goes through the scalar-source kernels below.

Work items are rows (forward, grad-input) or blocks of ``dw`` (grad-weight); every item writes
its own outputs and sums in a fixed order, so results are deterministic and do not depend on
the thread count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import literally, njit, uint64

from . import NUMBA_CACHE, _parallel, _reduce, _simd
from ._numba import cdiv, claim, wide
from ._simd import dot_dw, lanes, tile4, tile_dw

__all__ = ["conv2d_forward", "conv2d_backward"]

KC = 64  # output channels per work item (a row of them is 4 zmm registers of float32)
NVEC = _simd.TILE_VECTORS  # vectors of channels per register tile (see fastconv.kernels._simd)
# depthwise grad-weight: taps x vectors of accumulators, 9 x 2 of AVX-512's 32 registers, 4 x 1
# elsewhere (a 64-byte vector is two of AVX2's 16)
DW_TAPS, NVEC_DW = (9, 2) if NVEC > 1 else (4, 1)
PIXEL_BLOCK = 256  # grad-weight: pixels of grad-output walked while they stay in cache
RED_BLOCK = 32, 1024  # grad-weight: reduction entries per work item, least and most
BAND_BYTES = 512 << 10  # depthwise: padded rows a work item lays out (in L2)
RED_CHUNK_BYTES = 160 << 10  # forward / grad-input: most filters of a reduction chunk (L2)

_FM = {"contract"}  # FMA contraction only: NaN and inf propagate as in naive.py


# ---------------------------------------------------------------------------------------------
# micro-kernels: out vectors over kc channels, sources as scalars. Vector-loop indices are
# unsigned (a base plus kk), so Numba emits no wraparound check and the kk loops vectorize;
# offset tables are uint64 for the same reason (uint64 + int64 would be a float in Numba).


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _row4(src, s0, sstep, off, r0, r1, w, w0, wstride, out, o0, ostep, kc):
    """For pixels u = 0..3 and kk < kc: out[o0 + u*ostep + kk] += sum over r in [r0, r1) of
    src[s0 + u*sstep + off[r]] * w[w0 + r*wstride + kk]."""
    wide()
    t0, t1 = uint64(s0), uint64(s0 + sstep)
    t2, t3 = uint64(s0 + 2 * sstep), uint64(s0 + 3 * sstep)
    q0, q1 = uint64(o0), uint64(o0 + ostep)
    q2, q3 = uint64(o0 + 2 * ostep), uint64(o0 + 3 * ostep)
    n = uint64(kc)
    r = r0
    while r + 4 <= r1:
        f0, f1, f2, f3 = off[r], off[r + 1], off[r + 2], off[r + 3]
        a00, a01, a02, a03 = src[t0 + f0], src[t0 + f1], src[t0 + f2], src[t0 + f3]
        a10, a11, a12, a13 = src[t1 + f0], src[t1 + f1], src[t1 + f2], src[t1 + f3]
        a20, a21, a22, a23 = src[t2 + f0], src[t2 + f1], src[t2 + f2], src[t2 + f3]
        a30, a31, a32, a33 = src[t3 + f0], src[t3 + f1], src[t3 + f2], src[t3 + f3]
        b0 = uint64(w0 + r * wstride)
        b1 = uint64(w0 + (r + 1) * wstride)
        b2 = uint64(w0 + (r + 2) * wstride)
        b3 = uint64(w0 + (r + 3) * wstride)
        for kk in range(n):
            v0, v1, v2, v3 = w[b0 + kk], w[b1 + kk], w[b2 + kk], w[b3 + kk]
            out[q0 + kk] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
            out[q1 + kk] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
            out[q2 + kk] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
            out[q3 + kk] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
        r += 4
    while r < r1:
        f0 = off[r]
        a0, a1, a2, a3 = src[t0 + f0], src[t1 + f0], src[t2 + f0], src[t3 + f0]
        b0 = uint64(w0 + r * wstride)
        for kk in range(n):
            v0 = w[b0 + kk]
            out[q0 + kk] += a0 * v0
            out[q1 + kk] += a1 * v0
            out[q2 + kk] += a2 * v0
            out[q3 + kk] += a3 * v0
        r += 1


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _row1(src, s0, off, r0, r1, w, w0, wstride, out, o0, kc):
    """`_row4` for one pixel."""
    wide()
    t0, q0, n = uint64(s0), uint64(o0), uint64(kc)
    r = r0
    while r + 4 <= r1:
        a0, a1 = src[t0 + off[r]], src[t0 + off[r + 1]]
        a2, a3 = src[t0 + off[r + 2]], src[t0 + off[r + 3]]
        b0 = uint64(w0 + r * wstride)
        b1 = uint64(w0 + (r + 1) * wstride)
        b2 = uint64(w0 + (r + 2) * wstride)
        b3 = uint64(w0 + (r + 3) * wstride)
        for kk in range(n):
            out[q0 + kk] += a0 * w[b0 + kk] + a1 * w[b1 + kk] + a2 * w[b2 + kk] + a3 * w[b3 + kk]
        r += 4
    while r < r1:
        a0 = src[t0 + off[r]]
        b0 = uint64(w0 + r * wstride)
        for kk in range(n):
            out[q0 + kk] += a0 * w[b0 + kk]
        r += 1


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _gw4(x, xb0, xb1, xb2, xb3, off, r0, r1, g, g0, g1, g2, g3, dw, d0, dstride, kc):
    """For r in [r0, r1) and kk < kc: dw[d0 + r*dstride + kk] += sum over the 4 pixels u of
    x[xb_u + off[r]] * g[g_u + kk]."""
    wide()
    t0, t1, t2, t3 = uint64(xb0), uint64(xb1), uint64(xb2), uint64(xb3)
    h0, h1, h2, h3 = uint64(g0), uint64(g1), uint64(g2), uint64(g3)
    n = uint64(kc)
    r = r0
    while r + 4 <= r1:
        f0, f1, f2, f3 = off[r], off[r + 1], off[r + 2], off[r + 3]
        a00, a01, a02, a03 = x[t0 + f0], x[t0 + f1], x[t0 + f2], x[t0 + f3]
        a10, a11, a12, a13 = x[t1 + f0], x[t1 + f1], x[t1 + f2], x[t1 + f3]
        a20, a21, a22, a23 = x[t2 + f0], x[t2 + f1], x[t2 + f2], x[t2 + f3]
        a30, a31, a32, a33 = x[t3 + f0], x[t3 + f1], x[t3 + f2], x[t3 + f3]
        e0 = uint64(d0 + r * dstride)
        e1 = uint64(d0 + (r + 1) * dstride)
        e2 = uint64(d0 + (r + 2) * dstride)
        e3 = uint64(d0 + (r + 3) * dstride)
        for kk in range(n):
            v0, v1, v2, v3 = g[h0 + kk], g[h1 + kk], g[h2 + kk], g[h3 + kk]
            dw[e0 + kk] += a00 * v0 + a10 * v1 + a20 * v2 + a30 * v3
            dw[e1 + kk] += a01 * v0 + a11 * v1 + a21 * v2 + a31 * v3
            dw[e2 + kk] += a02 * v0 + a12 * v1 + a22 * v2 + a32 * v3
            dw[e3 + kk] += a03 * v0 + a13 * v1 + a23 * v2 + a33 * v3
        r += 4
    while r < r1:
        f0 = off[r]
        a0, a1, a2, a3 = x[t0 + f0], x[t1 + f0], x[t2 + f0], x[t3 + f0]
        e0 = uint64(d0 + r * dstride)
        for kk in range(n):
            dw[e0 + kk] += a0 * g[h0 + kk] + a1 * g[h1 + kk] + a2 * g[h2 + kk] + a3 * g[h3 + kk]
        r += 1


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _gw1(x, xb0, off, r0, r1, g, g0, dw, d0, dstride, kc):
    """`_gw4` for one pixel."""
    wide()
    t0, h0, n = uint64(xb0), uint64(g0), uint64(kc)
    for r in range(r0, r1):
        a0 = x[t0 + off[r]]
        e0 = uint64(d0 + r * dstride)
        for kk in range(n):
            dw[e0 + kk] += a0 * g[h0 + kk]


# ---------------------------------------------------------------------------------------------
# parallel parts


@njit(cache=NUMBA_CACHE, nogil=True)
def _init_rows(out, o, ostep, nv, kc, bias, b0, has_bias):
    """out[o + v*ostep + kk] = bias[b0 + kk] (or 0) for v < nv, kk < kc: a vector loop per pixel
    (with the bias test inside, the loop ran scalar: a third of a 1-channel layer's forward)."""
    wide()
    n = uint64(kc)
    for v in range(nv):
        d = uint64(o + v * ostep)
        if has_bias:
            for kk in range(n):
                out[d + kk] = bias[uint64(b0) + kk]
        else:
            for kk in range(n):
                out[d + kk] = 0.0


@njit(cache=NUMBA_CACHE, nogil=True)
def _correlate_part(src, off, w, bias, out, geom, counter):
    """Rows of out: out[n, orow(u), ocol(v), koff + kk] = bias + sum_r src[...] * w[r, ...].

    geom: images, source (rows, cols, channels, row step, col step, channels per group), output
    (rows, cols, channels, row step, first row, col step, first col), rows and cols computed,
    groups, output channels per group, reduction length, whether to add the bias. Items are
    (image, row, group, block of KC output channels).
    """
    (n_img, hs, ws, cs, srs, scs, cgs, ho, wo, ko, ors, or0, ocs, oc0, nu, nv, groups, kg, red,
     has_bias) = geom
    n_kb = cdiv(kg, KC)
    n_items = n_img * nu * groups * n_kb
    sstep, ostep = scs * cs, ocs * ko
    scratch = np.empty(4 * NVEC * lanes(out), dtype=out.dtype)
    rc = max(4, RED_CHUNK_BYTES // (KC * out.itemsize))
    rc = cdiv(red, cdiv(red, rc)) if red else 1  # chunks of even size
    item = claim(counter)
    while item < n_items:
        kb = item % n_kb
        rest = item // n_kb
        grp = rest % groups
        rest //= groups
        u = rest % nu
        n = rest // nu
        koff = grp * kg + kb * KC
        kc = min(KC, kg - kb * KC)
        o = ((n * ho + or0 + u * ors) * wo + oc0) * ko + koff
        _init_rows(out, o, ostep, nv, kc, bias, koff, has_bias)
        s = ((n * hs + u * srs) * ws) * cs + grp * cgs
        # the reduction in chunks whose filters stay in L2 across the row's pixels: over the
        # whole reduction at once, every tile of 4 pixels streamed all of the block's filters
        # (vgg-256: 590 KB) from beyond it; one chunk where they fit (a chunk per 64 entries
        # made keras-c2 0.77x: each chunk loads and stores the tiles' accumulators again)
        for r0 in range(0, red, rc):
            r1 = min(red, r0 + rc)
            _row_part(src, s, sstep, off, r0, r1, w, koff, ko, out, o, ostep, nv, kc, scratch)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _row_part(src, s, sstep, off, r0, r1, w, koff, ko, out, o, ostep, nv, kc, scratch):
    """out[o + v*ostep + kk] += sum over r in [r0, r1) of src[s + v*sstep + off[r]] *
    w[r*ko + koff + kk] for a row's nv pixels v and kc channels kk (see `_correlate_part`)."""
    nl = lanes(out)
    v = 0
    while v < nv and nv >= 4:
        # the last group of 4 pixels ends at the row's end; its pixels already done
        # (u < fresh) are computed again in a scratch tile and not stored
        vs = min(v, nv - 4)
        fresh = v - vs
        s0, o0 = s + vs * sstep, o + vs * ostep
        k0 = 0
        while k0 + NVEC * nl <= kc:  # 4 pixels x NVEC vectors of channels, in registers
            if fresh == 0:
                tile4(src, s0, s0 + sstep, s0 + 2 * sstep, s0 + 3 * sstep, off, r0, r1, w,
                      koff + k0, ko, out, o0 + k0, o0 + ostep + k0, o0 + 2 * ostep + k0,
                      o0 + 3 * ostep + k0, NVEC)
            else:
                _tile_part(src, s0, sstep, off, r0, r1, w, koff + k0, ko, scratch, NVEC, out,
                           o0 + k0, ostep, fresh, 0)
            k0 += NVEC * nl
        while k0 + nl <= kc:
            if fresh == 0:
                tile4(src, s0, s0 + sstep, s0 + 2 * sstep, s0 + 3 * sstep, off, r0, r1, w,
                      koff + k0, ko, out, o0 + k0, o0 + ostep + k0, o0 + 2 * ostep + k0,
                      o0 + 3 * ostep + k0, 1)
            else:
                _tile_part(src, s0, sstep, off, r0, r1, w, koff + k0, ko, scratch, 1, out,
                           o0 + k0, ostep, fresh, 0)
            k0 += nl
        if k0 < kc and kc >= nl:  # one vector ending at kc; its lanes below k0 are done
            _tile_part(src, s0, sstep, off, r0, r1, w, koff + kc - nl, ko, scratch, 1, out,
                       o0 + kc - nl, ostep, fresh, k0 - (kc - nl))
        elif k0 < kc and fresh == 0:
            _row4(src, s0, sstep, off, r0, r1, w, koff + k0, ko, out, o0 + k0, ostep, kc - k0)
        elif k0 < kc:
            for uu in range(fresh, 4):
                _row1(src, s0 + uu * sstep, off, r0, r1, w, koff + k0, ko, out,
                      o0 + uu * ostep + k0, kc - k0)
        v = vs + 4
    while v < nv:  # rows of fewer than 4 pixels
        _row1(src, s + v * sstep, off, r0, r1, w, koff, ko, out, o + v * ostep, kc)
        v += 1


@njit(cache=NUMBA_CACHE, nogil=True)
def _tile_part(src, s0, sstep, off, r0, r1, w, wb, ko, scratch, nvec, out, o0, ostep, u0, l0):
    """The `tile4` of 4 pixels (source s0 + u*sstep) x nvec vectors of channels (filters from
    wb) into ``scratch``, then out[o0 + u*ostep + l] += scratch[u, l] for the pixels u >= u0
    and lanes l >= l0 only: the others overlap a tile already stored. Where a row's pixels or
    a block's channels are not a multiple of the tile, this keeps their last ones in registers
    (lenet-c1's 30 channels, keras-c2's 11 pixels) instead of a loop that loads and stores the
    outputs every 4 reduction entries. The whole tiles call `tile4` inline: through this
    function they were 6-17% slower (measured)."""
    literally(nvec)
    m = nvec * lanes(out)
    for i in range(4 * m):
        scratch[i] = 0.0
    tile4(src, s0, s0 + sstep, s0 + 2 * sstep, s0 + 3 * sstep, off, r0, r1, w, wb, ko, scratch,
          0, m, 2 * m, 3 * m, nvec)
    for uu in range(u0, 4):
        for q in range(l0, m):
            out[o0 + uu * ostep + q] += scratch[uu * m + q]


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _dw_pixel(src, sv, off, red, w, out, ov, nk, k0, k1):
    """One output pixel of a depthwise layer, channels k0 <= k < k1: out[ov + k] += sum over
    taps r of src[sv + off[r] + k] * w[r*nk + k]."""
    wide()
    ov, sv = uint64(ov), uint64(sv)
    for r in range(red):
        sr, wr = sv + off[r], uint64(r * nk)
        for k in range(uint64(k0), uint64(k1)):
            out[ov + k] += src[sr + k] * w[wr + k]


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_part(src, off, w, bias, out, geom, counter):
    """`_correlate_part` for depthwise layers (one channel in and out per group), by
    `_depthwise_row`. Items are (image, row)."""
    (n_img, hs, ws, cs, srs, scs, cgs, ho, wo, ko, ors, or0, ocs, oc0, nu, nv, groups, kg, red,
     has_bias) = geom
    n_items = n_img * nu
    item = claim(counter)
    while item < n_items:
        u = item % nu
        n = item // nu
        _depthwise_row(src, ((n * hs + u * srs) * ws) * cs, scs * cs, off, red, w, bias,
                       has_bias, out, ((n * ho + or0 + u * ors) * wo + oc0) * ko, ocs * ko, nv,
                       ko)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_row(src, s, sstep, off, red, w, bias, has_bias, out, o, ostep, nv, ko):
    """One row of a depthwise layer's output: out[o + v*ostep + k] = bias[k] + sum over taps r
    of src[s + v*sstep + off[r] + k] * w[r*ko + k] for nv pixels v and ko channels k: 4 pixels
    x NVEC vectors of channels in registers over the taps (`tile_dw`), the channels and pixels
    left over a vector loop per tap."""
    nl = lanes(out)
    _init_rows(out, o, ostep, nv, ko, bias, 0, has_bias)
    v = 0
    while v + 4 <= nv:
        s0, o0 = s + v * sstep, o + v * ostep
        k0 = 0
        while k0 + NVEC * nl <= ko:
            tile_dw(src, s0 + k0, s0 + sstep + k0, s0 + 2 * sstep + k0, s0 + 3 * sstep + k0,
                    off, 0, red, w, k0, ko, out, o0 + k0, o0 + ostep + k0,
                    o0 + 2 * ostep + k0, o0 + 3 * ostep + k0, NVEC)
            k0 += NVEC * nl
        while k0 + nl <= ko:
            tile_dw(src, s0 + k0, s0 + sstep + k0, s0 + 2 * sstep + k0, s0 + 3 * sstep + k0,
                    off, 0, red, w, k0, ko, out, o0 + k0, o0 + ostep + k0,
                    o0 + 2 * ostep + k0, o0 + 3 * ostep + k0, 1)
            k0 += nl
        if k0 < ko:
            for uu in range(4):
                _dw_pixel(src, s0 + uu * sstep, off, red, w, out, o0 + uu * ostep, ko, k0, ko)
        v += 4
    while v < nv:
        _dw_pixel(src, s + v * sstep, off, red, w, out, o + v * ostep, ko, 0, ko)
        v += 1


@njit(cache=NUMBA_CACHE, nogil=True)
def _dw_taps(x, xs, xstep, off, red, g, gs, nv, part, p0, nk, nvec):
    """`dot_dw` over all ``red`` taps for nvec vectors of channels (x, g and part offset to
    them): DW_TAPS taps at a time, then one by one."""
    literally(nvec)
    r = 0
    while r + DW_TAPS <= red:
        dot_dw(x, xs, xstep, off, r, g, gs, nk, nv, part, p0 + r * nk, nk, DW_TAPS, nvec)
        r += DW_TAPS
    while r < red:
        dot_dw(x, xs, xstep, off, r, g, gs, nk, nv, part, p0 + r * nk, nk, 1, nvec)
        r += 1


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _dw_grad_row(x, xs, xstep, off, red, g, gs, nv, part, p0, nk):
    """part[p0 + r*nk + k] = sum over the nv pixels v of a row of x[xs + v*xstep + off[r] + k]
    * g[gs + v*nk + k]: DW_TAPS taps x NVEC_DW vectors of channels in registers over the row
    (`dot_dw`), the channels left over a vector loop per pixel and tap."""
    wide()
    nl = lanes(part)
    k0 = 0
    while k0 + NVEC_DW * nl <= nk:
        _dw_taps(x, xs + k0, xstep, off, red, g, gs + k0, nv, part, p0 + k0, nk, NVEC_DW)
        k0 += NVEC_DW * nl
    while k0 + nl <= nk:
        _dw_taps(x, xs + k0, xstep, off, red, g, gs + k0, nv, part, p0 + k0, nk, 1)
        k0 += nl
    lo, n = uint64(k0), uint64(nk)
    for r in range(red):
        pr = uint64(p0 + r * nk)
        for k in range(lo, n):
            part[pr + k] = 0.0
    for v in range(nv):
        xv, gv = uint64(xs + v * xstep), uint64(gs + v * nk)
        for r in range(red):
            xr, pr = xv + off[r], uint64(p0 + r * nk)
            for k in range(lo, n):
                part[pr + k] += x[xr + k] * g[gv + k]


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_grad_weight_part(x, off, g, part, geom, counter):
    """Per output row (image, row): its share of dw, part[item, r, k]; summed by the caller
    in a fixed order."""
    n_img, hp, wp, c, sh, sw, oh, ow, red = geom
    n_items = n_img * oh
    item = claim(counter)
    while item < n_items:
        i = item % oh
        n = item // oh
        _dw_grad_row(x, ((n * hp + i * sh) * wp) * c, sw * c, off, red, g, (n * oh + i) * ow * c,
                     ow, part, item * red * c, c)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_bands(x, off, w, bias, has_bias, out, geom, counter):
    """Forward of a depthwise layer by bands of output rows: each item lays out the zero-padded
    input rows its band reads in a per-thread scratch, in cache, and runs `_depthwise_row` on
    them; no padded copy of the whole input is written and read back. Items are (image,
    band)."""
    n_img, h, wd, c, pt, pl, sh, sw, oh, ow, band, span, wp, red = geom
    n_bands = cdiv(oh, band)
    scratch = np.empty(((band - 1) * sh + span) * wp * c, dtype=out.dtype)
    item = claim(counter)
    while item < n_img * n_bands:
        n = item // n_bands
        u0 = (item % n_bands) * band
        nu = min(band, oh - u0)
        for y in range((nu - 1) * sh + span):
            _pad_row(x, n, u0 * sh - pt + y, h, wd, c, wp, pl, scratch, y * wp * c)
        for u in range(nu):
            _depthwise_row(scratch, u * sh * wp * c, sw * c, off, red, w, bias, has_bias, out,
                           (n * oh + u0 + u) * ow * c, c, ow, c)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_backward_bands(g, x, wflip, goff, xoff, dx, part_w, part_b, need, geom,
                              counter):
    """The gradients of a stride-1 depthwise layer by bands of rows, each item reading its
    rows of the grad-output and of the input once, into zero-padded rows of a per-thread
    scratch: dx for its band of input rows (the padded grad-output correlated with the flipped
    filters, `_depthwise_row`), and for its band of grad-output rows their shares of dw
    (`_dw_grad_row`, one row of part_w each) and of db (one row of part_b each). No padded copy
    of either array is written. Items are (image, band); need = (dx, dw, db)."""
    n_img, h, wd, c, oh, ow, et, el, gwp, pt, pl, xwp, span, band, red = geom
    n_bands = cdiv(max(h, oh), band)
    rows = band + span - 1
    gs = np.empty(rows * gwp * c if need[0] else 0, dtype=dx.dtype)
    xs = np.empty(rows * xwp * c if need[1] else 0, dtype=dx.dtype)
    q = cdiv(256, c)  # db: pixels per vector loop of _reduce._add_rows
    acc = np.empty(q * c if need[2] else 0, dtype=dx.dtype)
    zero = np.zeros(1, dtype=dx.dtype)
    item = claim(counter)
    while item < n_img * n_bands:
        n = item // n_bands
        b0 = (item % n_bands) * band
        nu, nj = max(0, min(band, h - b0)), max(0, min(band, oh - b0))
        # row by row: each padded row is laid out just before the rows that read it, and a
        # grad-output row is summed right after it was copied, while both are in cache
        for y in range(max(nu, nj) + span - 1):
            if need[0] and y < nu + span - 1:
                _pad_row(g, n, b0 - et + y, oh, ow, c, gwp, el, gs, y * gwp * c)
            if need[1] and y < nj + span - 1:
                _pad_row(x, n, b0 - pt + y, h, wd, c, xwp, pl, xs, y * xwp * c)
            u = y - (span - 1)
            if u < 0:
                continue
            if need[0] and u < nu:
                _depthwise_row(gs, u * gwp * c, c, goff, red, wflip, zero, False, dx,
                               (n * h + b0 + u) * wd * c, c, wd, c)
            if u < nj:
                j = n * oh + b0 + u
                if need[1]:
                    _dw_grad_row(xs, u * xwp * c, c, xoff, red, g, j * ow * c, ow, part_w,
                                 j * red * c, c)
                if need[2]:  # the row's pixels (rows of c in g) summed
                    _reduce._add_rows(g, j * ow, (j + 1) * ow, c, q, acc, part_b, j * c)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _gw_scalar(x, off, r0, r1, g, dw, koff, kc, gc, k, pix, p0, p1):
    """dw[r, koff + kk] += sum over pixels [p0, p1) of x[pix + gc + off[r]] * g[pixel, koff +
    kk] for r in [r0, r1), kk < kc: 4 pixels at a time through `_gw4`."""
    p = p0
    while p + 4 <= p1:
        _gw4(x, pix[p] + gc, pix[p + 1] + gc, pix[p + 2] + gc, pix[p + 3] + gc, off, r0, r1,
             g, p * k + koff, (p + 1) * k + koff, (p + 2) * k + koff, (p + 3) * k + koff, dw,
             koff, k, kc)
        p += 4
    while p < p1:
        _gw1(x, pix[p] + gc, off, r0, r1, g, p * k + koff, dw, koff, k, kc)
        p += 1


@njit(cache=NUMBA_CACHE, nogil=True)
def _grad_weight_part(x, off, g, dw, pix, geom, counter):
    """Blocks of dw (red, K): dw[r, koff + kk] = sum over pixels p of x[pix[p] + off[r]] *
    g[p, koff + kk] (``pix``: each grad-output pixel's first input element). geom: groups,
    channels per group in and out, reduction length, entries per block. Items are (group,
    block of reduction entries, block of KC output channels). Four reduction entries x NVEC
    (or one) vectors of channels are accumulated in registers over a block of pixels
    (`tile4`); the entries and channels left over go through `_gw4`."""
    groups, cg, kg, red, rblock = geom
    k = groups * kg
    n_pix = pix.size
    nl = lanes(dw)
    n_kb, n_rb = cdiv(kg, KC), cdiv(red, rblock)
    n_items = groups * n_rb * n_kb
    item = claim(counter)
    while item < n_items:
        kb = item % n_kb
        rest = item // n_kb
        rb = rest % n_rb
        grp = rest // n_rb
        koff = grp * kg + kb * KC
        kc = min(KC, kg - kb * KC)
        kv = kc - kc % nl  # channels the vector tiles take
        gc = grp * cg
        r0, r1 = rb * rblock, min(red, (rb + 1) * rblock)
        rv = r0 + (r1 - r0) // 4 * 4 if kv > 0 else r0  # entries the vector tiles take
        for r in range(r0, r1):
            for kk in range(kc):
                dw[r * k + koff + kk] = 0.0
        for p0 in range(0, n_pix, PIXEL_BLOCK):
            p1 = min(n_pix, p0 + PIXEL_BLOCK)
            for r in range(r0, rv, 4):
                f0, f1 = np.int64(off[r]) + gc, np.int64(off[r + 1]) + gc
                f2, f3 = np.int64(off[r + 2]) + gc, np.int64(off[r + 3]) + gc
                kw = kv // (NVEC * nl) * (NVEC * nl)
                for k0 in range(0, kw, NVEC * nl):
                    d = koff + k0
                    tile4(x, f0, f1, f2, f3, pix, p0, p1, g, d, k, dw, r * k + d,
                          (r + 1) * k + d, (r + 2) * k + d, (r + 3) * k + d, NVEC)
                for k0 in range(kw, kv, nl):
                    d = koff + k0
                    tile4(x, f0, f1, f2, f3, pix, p0, p1, g, d, k, dw, r * k + d,
                          (r + 1) * k + d, (r + 2) * k + d, (r + 3) * k + d, 1)
            if rv < r1:
                _gw_scalar(x, off, rv, r1, g, dw, koff, kc, gc, k, pix, p0, p1)
            if kv < kc and rv > r0:
                _gw_scalar(x, off, r0, rv, g, dw, koff + kv, kc - kv, gc, k, pix, p0, p1)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pad_rows(src, dst, h, w, c, hp, wp, top, left, counter):
    """Rows (image, padded row) of dst (n, hp, wp, c), flat, from src (n, h, w, c), flat, by
    `_pad_row`."""
    n_items = dst.size // (wp * c)
    item = claim(counter)
    while item < n_items:
        _pad_row(src, item // hp, item % hp - top, h, w, c, wp, left, dst, item * wp * c)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _pad_row(src, i, r, h, w, c, wp, left, dst, d0):
    """dst[d0 : d0 + wp*c] = row r of image i of src (n, h, w, c), flat, shifted right by
    ``left`` columns (negative: cropped) and zero-padded to wp columns; zeros where r is not a
    row of src. Each element written once."""
    wide()
    xa = min(max(0, left), wp)
    xb = max(xa, min(wp, w + left))  # [xa, xb): the columns that hold src
    d0 = uint64(d0)
    lo, hi = uint64(xa * c), uint64(xb * c)
    if r < 0 or r >= h:
        lo = hi = uint64(wp * c)
    for t in range(lo):
        dst[d0 + t] = 0.0
    s0 = uint64(((i * h + r) * w + xa - left) * c) if hi > lo else uint64(0)
    for t in range(hi - lo):
        dst[d0 + lo + t] = src[s0 + t]
    for t in range(hi, uint64(wp * c)):
        dst[d0 + t] = 0.0


def _pad(a, top, bottom, left, right):
    """``a`` (N, H, W, C) zero-padded (negative amounts crop); ``a`` itself when none. Written
    once, by rows on the thread pool: NumPy's zeros and slice copy took 2.8 ms of
    mobilenet-dw's 7.3 ms forward (when that forward still padded its whole input)."""
    if top == bottom == left == right == 0:
        return a
    n, h, w, c = a.shape
    hp, wp = h + top + bottom, w + left + right
    out = np.empty((n, hp, wp, c), dtype=a.dtype)
    if out.size:
        _parallel.run(_pad_rows, (a.reshape(-1), out.reshape(-1), h, w, c, hp, wp, top, left),
                      n * hp, out.size // 4)
    return out


def _depthwise(spec):
    return spec.w_shape[1] == 1 and spec.groups == spec.x_shape[1] == spec.w_shape[0]


def _offsets(taps, chans, ws, cs):
    """Source offsets of the reduction list (tap, channel) -> (dy * ws + dx) * cs + channel."""
    return np.array([(dy * ws + dx) * cs + ch for dy, dx in taps for ch in range(chans)],
                    dtype=np.uint64)


def _run_correlation(src, off, w, bias, out, geom, work_ns, depthwise):
    if bias is None:
        bias = np.zeros(1, dtype=out.dtype)
    n_img, nu, groups, kg = geom[0], geom[14], geom[16], geom[17]
    if depthwise:
        _parallel.run(_depthwise_part, (src, off, w, bias, out, geom), n_img * nu, work_ns)
    else:
        _parallel.run(_correlate_part, (src, off, w, bias, out, geom),
                      n_img * nu * groups * cdiv(kg, KC), work_ns)


def _forward_by_nchw(spec):
    """Whether a forward takes `_forward_nchw`: fewer input channels per group than a vector
    holds and one group (its tiles store all channels of a pixel together). In float64,
    interleaved against the kernels here, that won only where K is not a multiple of the
    vector (lenet-c1 1.29x; keras-c1 0.72x, cifar-c1 0.90x, alexnet-c1 0.89x: twice the bytes
    per pixel to transpose); in float32 it won or tied on all four (lenet-c1 1.74x, alexnet-c1
    1.29x, cifar-c1 1.04x-1.39x, keras-c1 0.90x-1.17x over four runs)."""
    nl = lanes(np.dtype(spec.dtype))
    k, cg = spec.w_shape[:2]
    return (cg < nl and spec.groups == 1
            and (np.dtype(spec.dtype).itemsize == 4 or k % nl != 0))


def conv2d_forward(x, w, b, spec):
    if _forward_by_nchw(spec):
        return _forward_nchw(x, w, b, spec)
    if _depthwise(spec):
        return _depthwise_forward(x, w, b, spec)
    n, c, h, wd = spec.x_shape
    k, cg, r, s = spec.w_shape
    (pt, pb), (pl, pr) = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    oh, ow = spec.out_hw
    src = _pad(x, pt, pb, pl, pr)
    hp, wp = src.shape[1:3]
    taps = [(p * dh, q * dw) for p in range(r) for q in range(s)]
    off = _offsets(taps, cg, wp, c)
    out = np.empty((n, oh, ow, k), dtype=spec.dtype)
    geom = (n, hp, wp, c, sh, sw, cg, oh, ow, k, 1, 0, 1, 0, oh, ow, spec.groups,
            k // spec.groups, len(off), b is not None)
    _run_correlation(src.reshape(-1), off, w.reshape(-1), b, out.reshape(-1), geom,
                     _parallel.conv_work_ns(spec), False)  # depthwise: _depthwise_forward
    return out


def _band(rows, halo, step, row_bytes, n_img):
    """Rows per band for depthwise items: as many as fit BAND_BYTES with the ``halo`` rows the
    taps add (``step`` input rows per row), fewer where that would leave threads idle, and
    bands of even height. Changes only who computes what, never the sums."""
    band = max(1, (BAND_BYTES // max(1, row_bytes) - halo - 1) // step + 1)
    band = min(band, max(1, rows // cdiv(4 * _parallel.count, max(1, n_img))))
    return cdiv(rows, cdiv(rows, band)) if rows else 1


def _depthwise_forward(x, w, b, spec):
    n, c, h, wd = spec.x_shape
    r, s = spec.w_shape[2:]
    (pt, _), (pl, _) = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    oh, ow = spec.out_hw
    span = (r - 1) * dh + 1
    wp = (ow - 1) * sw + (s - 1) * dw + 1  # the padded columns the row's taps read
    band = _band(oh, span - 1, sh, wp * c * x.itemsize, n)
    off = _offsets([(p * dh, q * dw) for p in range(r) for q in range(s)], 1, wp, c)
    out = np.empty((n, oh, ow, c), dtype=spec.dtype)
    if out.size:
        bias = b if b is not None else np.zeros(1, dtype=spec.dtype)
        geom = (n, h, wd, c, pt, pl, sh, sw, oh, ow, band, span, wp, len(off))
        _parallel.run(_depthwise_bands, (x.reshape(-1), off, w.reshape(-1), bias, b is not None,
                                         out.reshape(-1), geom),
                      n * cdiv(oh, band), _parallel.conv_work_ns(spec))
    return out


def _depthwise_backward(g, x, w, spec, need_input, need_weight, need_bias):
    """All requested gradients of a stride-1 depthwise layer in one pass over its arrays
    (`_depthwise_backward_bands`)."""
    n, c, h, wd = spec.x_shape
    r, s = spec.w_shape[2:]
    (pt, _), (pl, _) = spec.padding
    dh, dw = spec.dilation
    oh, ow = spec.out_hw
    span = (r - 1) * dh + 1
    gwp, xwp = wd + (s - 1) * dw, ow + (s - 1) * dw  # padded widths of the two scratches
    band = _band(max(h, oh), span - 1, 1, max(gwp, xwp) * c * g.itemsize, n)
    taps = [(p * dh, q * dw) for p in range(r) for q in range(s)]
    dt = spec.dtype
    dx = np.empty((n, h, wd, c) if need_input else 0, dtype=dt)
    part_w = np.empty((n * oh, r * s, c) if need_weight else 0, dtype=dt)
    part_b = np.empty((n * oh, c) if need_bias else 0)  # float64, as _reduce.channel_sums
    if g.size and x.size:
        wflip = np.ascontiguousarray(w[::-1, ::-1]).reshape(-1)
        geom = (n, h, wd, c, oh, ow, span - 1 - pt, (s - 1) * dw - pl, gwp, pt, pl, xwp, span,
                band, r * s)
        _parallel.run(_depthwise_backward_bands,
                      (g.reshape(-1), x.reshape(-1), wflip, _offsets(taps, 1, gwp, c),
                       _offsets(taps, 1, xwp, c), dx.reshape(-1), part_w.reshape(-1),
                       part_b.reshape(-1), (need_input, need_weight, need_bias), geom),
                      n * cdiv(max(h, oh), band),
                      _parallel.conv_work_ns(spec, need_input + need_weight + need_bias))
    elif need_input:
        dx[...] = 0
    return (dx if need_input else None,
            part_w.sum(axis=0).reshape(r, s, 1, c) if need_weight else None,
            part_b.sum(axis=0).astype(dt) if need_bias else None)


class _Phase(NamedTuple):
    a: int  # first dx row of the phase
    b: int  # first dx column
    rows: int
    cols: int
    taps: tuple  # ((p, q, dy, dx), ...): filter tap and its shift in the padded grad-output


@functools.lru_cache(maxsize=256)
def _grad_input_plan(spec):
    """(phases, padding of the grad-output (top, bottom, left, right))."""
    h, wd = spec.x_shape[2:]
    r, s = spec.w_shape[2:]
    (pt, _), (pl, _) = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    oh, ow = spec.out_hw
    phases, es, fs = [], [0], [0]
    for a in range(min(sh, h)):
        rows = cdiv(h - a, sh)
        for b in range(min(sw, wd)):
            cols = cdiv(wd - b, sw)
            taps = []
            for p in range(r):
                if (a + pt - p * dh) % sh:
                    continue
                e = (a + pt - p * dh) // sh  # dx row a + sh*u reads grad-output row u + e
                for q in range(s):
                    if (b + pl - q * dw) % sw:
                        continue
                    f = (b + pl - q * dw) // sw
                    taps.append((p, q, e, f))
                    es += [e, rows - 1 + e]
                    fs += [f, cols - 1 + f]
            phases.append(_Phase(a, b, rows, cols, tuple(taps)))
    top, left = max(0, -min(es)), max(0, -min(fs))
    bottom, right = max(0, max(es) - (oh - 1)), max(0, max(fs) - (ow - 1))
    return tuple(phases), (top, bottom, left, right)


def _grad_input(g, w, spec):
    n, c, h, wd = spec.x_shape
    k, cg, r, s = spec.w_shape
    groups = spec.groups
    kg = k // groups
    phases, (top, bottom, left, right) = _grad_input_plan(spec)
    src = _pad(g, top, bottom, left, right)
    hs, ws = src.shape[1:3]
    dwise = _depthwise(spec)
    # w (R, S, Cg, K) as rows (R, S, Kg) x columns (groups, Cg): dx's filters for each group
    wt = w.reshape(r, s, cg, groups, kg).transpose(0, 1, 4, 3, 2).reshape(r, s, kg, c)
    dx = np.empty((n, h, wd, c), dtype=spec.dtype)
    sh, sw = spec.stride
    for ph in phases:
        taps = [(e + top, f + left) for _, _, e, f in ph.taps]
        off = _offsets(taps, 1 if dwise else kg, ws, k)
        rows = np.ascontiguousarray(wt[[t[0] for t in ph.taps], [t[1] for t in ph.taps]])
        geom = (n, hs, ws, k, 1, 1, kg, h, wd, c, sh, ph.a, sw, ph.b, ph.rows, ph.cols, groups,
                cg, len(off), False)
        _run_correlation(src.reshape(-1), off, rows.reshape(-1), None, dx.reshape(-1), geom,
                         _parallel.conv_work_ns(spec, 1 / len(phases)), dwise)
    return dx


def _grad_weight(g, x, spec):
    n, c, h, wd = spec.x_shape
    k, cg, r, s = spec.w_shape
    (pt, pb), (pl, pr) = spec.padding
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    oh, ow = spec.out_hw
    src = _pad(x, pt, pb, pl, pr)
    hp, wp = src.shape[1:3]
    taps = [(p * dh, q * dw) for p in range(r) for q in range(s)]
    if _depthwise(spec):
        off = _offsets(taps, 1, wp, c)
        part = np.empty((n * oh, r * s, c), dtype=spec.dtype)
        _parallel.run(_depthwise_grad_weight_part,
                      (src.reshape(-1), off, g.reshape(-1), part.reshape(-1),
                       (n, hp, wp, c, sh, sw, oh, ow, r * s)), n * oh,
                      _parallel.conv_work_ns(spec))
        return part.sum(axis=0).reshape(r, s, 1, c)
    off = _offsets(taps, cg, wp, c)
    dwt = np.empty((r * s * cg, k), dtype=spec.dtype)
    # blocks as long as leave 4 items a thread: each item reads all of its channels'
    # grad-output, so 32-entry blocks read vgg-256's 288 times. Who computes which entries
    # only; every sum runs over the pixels in the same order.
    others = spec.groups * cdiv(k // spec.groups, KC)
    rblock = cdiv(len(off), max(1, 4 * _parallel.count // others))
    rblock = min(RED_BLOCK[1], max(RED_BLOCK[0], cdiv(rblock, 4) * 4))
    geom = (spec.groups, cg, k // spec.groups, len(off), rblock)
    pix = (((np.arange(n)[:, None, None] * hp + np.arange(oh)[None, :, None] * sh) * wp
            + np.arange(ow)[None, None, :] * sw) * c).astype(np.int64).reshape(-1)
    n_items = others * cdiv(len(off), rblock)
    _parallel.run(_grad_weight_part, (src.reshape(-1), off, g.reshape(-1), dwt.reshape(-1),
                                      pix, geom), n_items,
                  _parallel.conv_work_ns(spec))
    return dwt.reshape(r, s, cg, k)


def _oihw(w):
    """HWIO filters as direct's NCHW kernels take them (OIHW, C-contiguous; a few KB)."""
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def _forward_nchw(x, w, b, spec):
    """Forward of a layer with fewer input channels per group than one vector holds (a first
    layer): direct's NCHW kernel vectorizes over pixels where these kernels would over those
    few channels. Its input is transposed (a view for one channel), but its output, K channels
    wide, is written channels-last from the register tiles, never transposed."""
    from . import direct, layout

    return direct.conv2d_forward(layout.to_nchw(x), _oihw(w), b, spec._replace(layout="NCHW"),
                                 channels_last_out=True)


def _grad_input_nchw(g, w, spec):
    """Grad-input of a layer with fewer input channels per group than one vector holds (a
    first layer): the channels-last kernel would vectorize over those few channels, so this
    transposes the grad-output and runs direct's NCHW kernel, which vectorizes over pixels."""
    from . import direct, layout

    dx = direct.conv2d_backward(layout.to_nchw(g), None, _oihw(w),
                                spec._replace(layout="NCHW"), True, False, False)[0]
    return layout.to_nhwc(dx)


def _few_channels_nchw(g, x, w, spec, need_bias):
    """All gradients of a first layer by direct's fused few-channel backward: it reads the
    channels-last grad-output once, moving each image into its padded NCHW grids in cache;
    the input, dx and dw, with their few channels, are small and transposed whole."""
    from . import direct, layout

    dx, dw, db = direct.few_channels_backward(g, layout.to_nchw(x), _oihw(w),
                                              spec._replace(layout="NCHW"), need_bias,
                                              g_nhwc=True)
    return layout.to_nhwc(dx), np.ascontiguousarray(dw.transpose(2, 3, 1, 0)), db


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    from . import direct

    if need_input and need_weight and direct.few_channels(spec):
        return _few_channels_nchw(g, x, w, spec, need_bias)
    if _depthwise(spec) and spec.stride == (1, 1):
        return _depthwise_backward(g, x, w, spec, need_input, need_weight, need_bias)
    if need_input and spec.w_shape[1] < lanes(np.dtype(spec.dtype)) and not _depthwise(spec):
        dx = _grad_input_nchw(g, w, spec)
    else:
        dx = _grad_input(g, w, spec) if need_input else None
    dw = _grad_weight(g, x, spec) if need_weight else None
    db = _reduce.channel_sums(g, channels_last=True) if need_bias else None
    return dx, dw, db
