"""Direct-loop conv2d (Numba, CPU, parallel), with no column buffer. Max-pool: pool.py.

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``. Kernels never look at user input beyond that.

How a convolution runs here
---------------------------
Forward and grad-input are both one *tap-list correlation*. The source (the input, or the
grad-output) is laid out in a zero-padded grid of width ``gw``; with stride > 1 the grid is
split into stride phases (``xq[c, a, b, u, v] = xpad[c, u*sh + a, v*sw + b]``), so every tap
reads a stride-1 window of one phase plane. Output pixel ``(i, j)`` is then grid position
``t = i*gw + j`` and each tap ``(c, p, q)`` is a constant offset: ``acc[t] += w * src[off + t]``.
Flattening rows this way gives one long contiguous loop per tile (the columns ``j >= OW`` are
computed and dropped). A register tile (fastconv.kernels._simd.tile4t) holds 4 output channels
x ``NVEC`` vectors of positions in registers over the whole reduction and stores them once
(16 accumulators with AVX-512's 32 registers, 4 elsewhere), so each loaded input vector feeds
4 FMAs and each weight NVEC (a block of one channel over more than 9 taps, as a grad-input of
one input channel, takes `tile1t`: 2*NVEC vectors, or 4 with AVX2); the last vector of a tile
runs past its end rather than leave a scalar tail (narrow planes such as 11x11 would spend
more there than in the vectors). Where that would read past the source, the positions left
over take a micro-kernel that keeps the 9 weights of a chunk of 9 taps in registers and makes
one pass over them per chunk. 1x1, 3x3, 5x5 and 11x11 kernels, dilation and groups differ only
in their offset tables.

In the forward pass each work item builds just the grid rows of its tile (all channels its
output channels read), in cache, right before using them: no padded copy of the whole input
exists, and the input is read from memory once. The backward pass works on one padded copy of
the grad-output and, for grad-weight, one of the input.

Grad-input with stride > 1 runs once per output phase ``(h % sh, w % sw)``: each phase is a
stride-1 correlation of the padded grad-output with the taps that land on it. Grad-weight uses
the same two grids (their widths are made equal) and reduces over ``t`` and every image with 3
output channels x 9 taps of vector accumulators held in registers throughout
(fastconv.kernels._simd.dot_taps): summing each image's few hundred positions into memory would
cost more loads and stores than FMAs. Stride-1 depthwise backward has a fused kernel that pads one
plane of the grad-output and of the input locally and computes all three gradients from them;
so has a stride-1 backward of one to four input channels (first layers: there the grad-output
is large and each of its elements feeds few FMAs, so the separate passes were bound by reading
it three times and copying it), with a few images per work item.

Channels-last arrays (``spec.layout == "NHWC"``) run the kernels of direct_nhwc.py, which read
them as they are.

Every parallel loop writes disjoint outputs and sums in a fixed order, so results do not depend
on the thread count and are bit-identical from run to run.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import njit, uint64

from . import NUMBA_CACHE, _parallel, _reduce, _simd, direct_nhwc
from ._numba import cdiv, claim, sum_flat, wide
from ._simd import dot_taps, lanes, prefetch_write, tile1t, tile4t, transpose_block

__all__ = ["unsupported", "conv2d_forward", "conv2d_backward"]

TAPS = 9  # taps per micro-kernel pass: one 3x3 kernel, or a chunk of a longer reduction
KB = 4  # output channels per forward / grad-input micro-kernel
KBW = 3  # output channels per grad-weight micro-kernel (3 x 9 accumulators fit AVX-512's 32)
TILE = 1024  # target elements per output tile (4 accumulator rows stay in L1)
NVEC = _simd.TILE_VECTORS  # vectors of positions per register tile, by the CPU's registers
NVEC1 = 2 * NVEC if NVEC > 2 else 4  # the same for a 1-channel tile (tile1t)
TILE_LOCAL = 4096  # the same for depthwise tiles, which hold one accumulator row

# FMA contraction only: no assumption about NaN/inf, so NaN and inf propagate as in naive.py.
_FM = {"contract"}
# Grad-weight and bias sums are reductions: reassociation lets them vectorize. The order is
# still fixed by the compiled code, so results stay deterministic.
_FMR = {"contract", "reassoc"}


# ---------------------------------------------------------------------------------------------
# micro-kernels. Indices are unsigned (base + offset + t), so Numba emits no wraparound check
# and the t loop vectorizes; weights are hoisted to scalars; each loads an accumulator once per
# 9 taps. They loop over all chunks themselves: a call, its alias checks and spills cost about
# as much as a short pass.


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _mk4(src, offs, wpk, acc, base, n):
    """acc[r, :n] += sum over chunks c and taps j of wpk[c, j, r] * src[base + offs[c, j] + t]."""
    wide()
    for ch in range(offs.shape[0]):
        o0 = uint64(base + offs[ch, 0])
        o1 = uint64(base + offs[ch, 1])
        o2 = uint64(base + offs[ch, 2])
        o3 = uint64(base + offs[ch, 3])
        o4 = uint64(base + offs[ch, 4])
        o5 = uint64(base + offs[ch, 5])
        o6 = uint64(base + offs[ch, 6])
        o7 = uint64(base + offs[ch, 7])
        o8 = uint64(base + offs[ch, 8])
        w00, w01, w02, w03 = wpk[ch, 0, 0], wpk[ch, 0, 1], wpk[ch, 0, 2], wpk[ch, 0, 3]
        w10, w11, w12, w13 = wpk[ch, 1, 0], wpk[ch, 1, 1], wpk[ch, 1, 2], wpk[ch, 1, 3]
        w20, w21, w22, w23 = wpk[ch, 2, 0], wpk[ch, 2, 1], wpk[ch, 2, 2], wpk[ch, 2, 3]
        w30, w31, w32, w33 = wpk[ch, 3, 0], wpk[ch, 3, 1], wpk[ch, 3, 2], wpk[ch, 3, 3]
        w40, w41, w42, w43 = wpk[ch, 4, 0], wpk[ch, 4, 1], wpk[ch, 4, 2], wpk[ch, 4, 3]
        w50, w51, w52, w53 = wpk[ch, 5, 0], wpk[ch, 5, 1], wpk[ch, 5, 2], wpk[ch, 5, 3]
        w60, w61, w62, w63 = wpk[ch, 6, 0], wpk[ch, 6, 1], wpk[ch, 6, 2], wpk[ch, 6, 3]
        w70, w71, w72, w73 = wpk[ch, 7, 0], wpk[ch, 7, 1], wpk[ch, 7, 2], wpk[ch, 7, 3]
        w80, w81, w82, w83 = wpk[ch, 8, 0], wpk[ch, 8, 1], wpk[ch, 8, 2], wpk[ch, 8, 3]
        for t in range(uint64(n)):
            v = src[o0 + t]
            b0 = acc[0, t] + w00 * v
            b1 = acc[1, t] + w01 * v
            b2 = acc[2, t] + w02 * v
            b3 = acc[3, t] + w03 * v
            v = src[o1 + t]
            b0 += w10 * v
            b1 += w11 * v
            b2 += w12 * v
            b3 += w13 * v
            v = src[o2 + t]
            b0 += w20 * v
            b1 += w21 * v
            b2 += w22 * v
            b3 += w23 * v
            v = src[o3 + t]
            b0 += w30 * v
            b1 += w31 * v
            b2 += w32 * v
            b3 += w33 * v
            v = src[o4 + t]
            b0 += w40 * v
            b1 += w41 * v
            b2 += w42 * v
            b3 += w43 * v
            v = src[o5 + t]
            b0 += w50 * v
            b1 += w51 * v
            b2 += w52 * v
            b3 += w53 * v
            v = src[o6 + t]
            b0 += w60 * v
            b1 += w61 * v
            b2 += w62 * v
            b3 += w63 * v
            v = src[o7 + t]
            b0 += w70 * v
            b1 += w71 * v
            b2 += w72 * v
            b3 += w73 * v
            v = src[o8 + t]
            b0 += w80 * v
            b1 += w81 * v
            b2 += w82 * v
            b3 += w83 * v
            acc[0, t] = b0
            acc[1, t] = b1
            acc[2, t] = b2
            acc[3, t] = b3


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FM)
def _mk1(src, offs, wpk, acc, base, n):
    """_mk4 for one output channel (depthwise, and a last channel of a group)."""
    wide()
    for ch in range(offs.shape[0]):
        o0 = uint64(base + offs[ch, 0])
        o1 = uint64(base + offs[ch, 1])
        o2 = uint64(base + offs[ch, 2])
        o3 = uint64(base + offs[ch, 3])
        o4 = uint64(base + offs[ch, 4])
        o5 = uint64(base + offs[ch, 5])
        o6 = uint64(base + offs[ch, 6])
        o7 = uint64(base + offs[ch, 7])
        o8 = uint64(base + offs[ch, 8])
        w0, w1, w2 = wpk[ch, 0, 0], wpk[ch, 1, 0], wpk[ch, 2, 0]
        w3, w4, w5 = wpk[ch, 3, 0], wpk[ch, 4, 0], wpk[ch, 5, 0]
        w6, w7, w8 = wpk[ch, 6, 0], wpk[ch, 7, 0], wpk[ch, 8, 0]
        for t in range(uint64(n)):
            b = acc[0, t] + w0 * src[o0 + t]
            b += w1 * src[o1 + t]
            b += w2 * src[o2 + t]
            b += w3 * src[o3 + t]
            b += w4 * src[o4 + t]
            b += w5 * src[o5 + t]
            b += w6 * src[o6 + t]
            b += w7 * src[o7 + t]
            b += w8 * src[o8 + t]
            acc[0, t] = b


@njit(cache=NUMBA_CACHE, nogil=True)
def _few_channels_backward_nchw(x, g, goffs, wpk, blocks, dx, xoffs, widx, wblocks, part_w,
                                part_b, need_bias, geom, counter):
    """All gradients of a stride-1 convolution with few input channels, ``ib`` images per item.

    Each item lays its images' grad-output planes out padded on grids (in cache) and their
    inputs on grids of the same width, then computes the images' dx, their share of dw
    (part_w[item]) and of db (part_b[n]) from them. g is read from memory once, where the
    separate passes read it three times and wrote and read a padded copy of it (keras-c1 in
    float64: about 110 MB moved, 30 here); with one to four input channels that traffic, not
    the FMAs, is the cost. Several images per item let each grad-weight register pass run
    over all of them (per image, its setup and lane sums cost as much as its FMAs). The
    shares are summed afterwards, in a fixed order.
    """
    gpt, gpl, hg, pt, pl, hq, gw, ib, g_nhwc = geom
    n_img, c, h, w = x.shape
    k, oh, ow = g.shape[1], g.shape[2], g.shape[3]
    if g_nhwc:  # g is (N, OH, OW, K)
        oh, ow, k = g.shape[1], g.shape[2], g.shape[3]
    gplane, xplane = hg * gw, hq * gw
    gf, xf = g.reshape(-1), x.reshape(-1)
    gl = np.empty((ib, k * gplane), dtype=x.dtype)
    xl = np.empty((ib, c * xplane), dtype=x.dtype)
    n_red = (oh - 1) * gw + ow
    cgrs = part_w.shape[1] // k
    no_bias = np.zeros(1, dtype=x.dtype)
    sums = np.empty((TAPS, KBW), dtype=x.dtype)
    vsums = np.empty(TAPS * KBW * lanes(x), dtype=x.dtype)
    item = claim(counter)
    while item * ib < n_img:
        for i in range(ib):
            n = item * ib + i
            if n >= n_img:  # the last item's empty slots add nothing to dw
                gl[i, :] = 0
                xl[i, :] = 0
                continue
            if g_nhwc:
                _fill_grids_channels_last(gf, n, oh, ow, k, gl[i], gpt, gpl, gplane, gw)
                if need_bias:  # the grid's zeros add nothing
                    for kk in range(k):
                        part_b[n, kk] = sum_flat(gl[i], kk * gplane, gplane)
            else:
                for kk in range(k):
                    _fill_grid(gf, (n * k + kk) * oh * ow, oh, ow, gl[i], kk * gplane, gpt, gpl,
                               1, 1, 0, hg, gw)
                    if need_bias:
                        part_b[n, kk] = sum_flat(gf, (n * k + kk) * oh * ow, oh * ow)
            _correlate_tile(gl[i], 0, n, 0, h, 0, blocks.shape[0], goffs, wpk, blocks, no_bias,
                            False, dx, gw, w, 1, 0, 1, 0, no_bias, False)
            for cc in range(c):
                _fill_grid(xf, (n * c + cc) * h * w, h, w, xl[i], cc * xplane, pt, pl, 1, 1, 0,
                           hq, gw)
        for j in range(wblocks.shape[0] * widx.shape[0]):
            _grad_weight_sums(j, xl, gl, xoffs, widx, wblocks, gpt * gw + gpl, gplane, n_red,
                              part_w[item], cgrs, sums, vsums)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _fill_grids_channels_last(gf, n, oh, ow, k, dst, pt, pl, plane, gw):
    """dst[kk*plane + (i + pt)*gw + pl + j] = g[n, i, j, kk] (g channels-last, flat), zero
    elsewhere: image n's grad-output moved into K padded planes by register transposes, so
    that a channels-last grad-output is never transposed whole."""
    d0 = uint64(0)
    for t in range(uint64(k * plane)):
        dst[d0 + t] = 0
    for i in range(oh):  # row i: (ow pixels x k channels) into k planes' rows
        _transpose_into(gf, ((n * oh + i) * ow) * k, k, dst, (i + pt) * gw + pl, plane, ow, k,
                        True)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FMR)
def _dwk2(xs, offs, gs, g0, g1, sums, n):
    """sums[j, r] += sum_t gs[g_r + t] * xs[offs[j] + t] for 9 taps j and 2 channels r."""
    wide()
    o0 = uint64(offs[0])
    o1 = uint64(offs[1])
    o2 = uint64(offs[2])
    o3 = uint64(offs[3])
    o4 = uint64(offs[4])
    o5 = uint64(offs[5])
    o6 = uint64(offs[6])
    o7 = uint64(offs[7])
    o8 = uint64(offs[8])
    h0, h1 = uint64(g0), uint64(g1)
    c00, c01 = sums[0, 0], sums[0, 1]
    c10, c11 = sums[1, 0], sums[1, 1]
    c20, c21 = sums[2, 0], sums[2, 1]
    c30, c31 = sums[3, 0], sums[3, 1]
    c40, c41 = sums[4, 0], sums[4, 1]
    c50, c51 = sums[5, 0], sums[5, 1]
    c60, c61 = sums[6, 0], sums[6, 1]
    c70, c71 = sums[7, 0], sums[7, 1]
    c80, c81 = sums[8, 0], sums[8, 1]
    for t in range(uint64(n)):
        u = gs[h0 + t]
        v = gs[h1 + t]
        x = xs[o0 + t]
        c00 += u * x
        c01 += v * x
        x = xs[o1 + t]
        c10 += u * x
        c11 += v * x
        x = xs[o2 + t]
        c20 += u * x
        c21 += v * x
        x = xs[o3 + t]
        c30 += u * x
        c31 += v * x
        x = xs[o4 + t]
        c40 += u * x
        c41 += v * x
        x = xs[o5 + t]
        c50 += u * x
        c51 += v * x
        x = xs[o6 + t]
        c60 += u * x
        c61 += v * x
        x = xs[o7 + t]
        c70 += u * x
        c71 += v * x
        x = xs[o8 + t]
        c80 += u * x
        c81 += v * x
    sums[0, 0], sums[0, 1] = c00, c01
    sums[1, 0], sums[1, 1] = c10, c11
    sums[2, 0], sums[2, 1] = c20, c21
    sums[3, 0], sums[3, 1] = c30, c31
    sums[4, 0], sums[4, 1] = c40, c41
    sums[5, 0], sums[5, 1] = c50, c51
    sums[6, 0], sums[6, 1] = c60, c61
    sums[7, 0], sums[7, 1] = c70, c71
    sums[8, 0], sums[8, 1] = c80, c81


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FMR)
def _dwk1(xs, offs, gs, g0, sums, n):
    """_dwk2 for one output channel."""
    wide()
    o0 = uint64(offs[0])
    o1 = uint64(offs[1])
    o2 = uint64(offs[2])
    o3 = uint64(offs[3])
    o4 = uint64(offs[4])
    o5 = uint64(offs[5])
    o6 = uint64(offs[6])
    o7 = uint64(offs[7])
    o8 = uint64(offs[8])
    h0 = uint64(g0)
    c0, c1, c2 = sums[0, 0], sums[1, 0], sums[2, 0]
    c3, c4, c5 = sums[3, 0], sums[4, 0], sums[5, 0]
    c6, c7, c8 = sums[6, 0], sums[7, 0], sums[8, 0]
    for t in range(uint64(n)):
        u = gs[h0 + t]
        c0 += u * xs[o0 + t]
        c1 += u * xs[o1 + t]
        c2 += u * xs[o2 + t]
        c3 += u * xs[o3 + t]
        c4 += u * xs[o4 + t]
        c5 += u * xs[o5 + t]
        c6 += u * xs[o6 + t]
        c7 += u * xs[o7 + t]
        c8 += u * xs[o8 + t]
    sums[0, 0], sums[1, 0], sums[2, 0] = c0, c1, c2
    sums[3, 0], sums[4, 0], sums[5, 0] = c3, c4, c5
    sums[6, 0], sums[7, 0], sums[8, 0] = c6, c7, c8



# ---------------------------------------------------------------------------------------------
# parallel drivers


@njit(cache=NUMBA_CACHE, nogil=True)
def _correlate_nchw(src, offs, wpk, blocks, bias, has_bias, out, gw, nvr, nvc, ys, yo, xs, xo,
                    tile_rows, nkpart, local, geom, nhwc, counter):
    """out[n, k, r*ys + yo, v*xs + xo] = bias[k] + sum over taps of w * src[n, off + r*gw + v].

    src is (images, flat grid); offs[g, chunk, 9] the tap offsets of group g; wpk[block, chunk,
    9, 4] the packed weights; blocks[block] = (first channel, valid channels 1..4, group).
    Work items are (image, tile of rows, part of the channel blocks), claimed from counter;
    each writes its own part of out.

    With ``local``, src is the unpadded input (images, C*H*W) and each item builds the grid rows
    of its tile for just its groups' channels (geom = C, H, W, pt, pl, sh, sw, grid rows per
    tile, channels per group): for depthwise layers this halves the memory traffic.

    With ``nhwc``, out is (N, OH, OW, K) and out[n, r*ys + yo, v*xs + xo, k] is written instead.
    """
    n_items = src.shape[0] * cdiv(nvr, tile_rows) * nkpart
    # the channels-last store's scratch, once per thread (a fresh one per tile page-faults)
    scr = np.empty(out.shape[3] * cdiv(tile_rows * gw, 16) * 16 if nhwc else 0, dtype=out.dtype)
    item = claim(counter)
    while item < n_items:
        _correlate_item(item, src, offs, wpk, blocks, bias, has_bias, out, gw, nvr, nvc,
                        ys, yo, xs, xo, tile_rows, nkpart, local, geom, scr, nhwc)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _correlate_item(item, src, offs, wpk, blocks, bias, has_bias, out, gw, nvr, nvc, ys, yo, xs,
                    xo, tile_rows, nkpart, local, geom, scr, nhwc):
    _, h, w, pt, pl, sh, sw, lrows, cg = geom
    n_blk = wpk.shape[0]
    n_tiles = cdiv(nvr, tile_rows)
    per_part = cdiv(n_blk, nkpart)
    n = item // (n_tiles * nkpart)
    tile = (item // nkpart) % n_tiles
    part = item % nkpart
    r0 = tile * tile_rows
    nr = min(tile_rows, nvr - r0)
    t0 = r0 * gw
    b_lo, b_hi = part * per_part, min(n_blk, (part + 1) * per_part)
    if b_lo >= b_hi:  # parts of ceil(n_blk / nkpart) blocks can leave the last ones empty
        return
    if local:
        lchan = sh * sw * lrows * gw  # a channel's share of the tile grid
        c_lo, c_hi = blocks[b_lo, 2] * cg, (blocks[b_hi - 1, 2] + 1) * cg
        # a vector's slack past the last channel: the last strip may read (and drop) it
        img = np.empty((c_hi - c_lo) * lchan + lanes(out), dtype=out.dtype)
        img[(c_hi - c_lo) * lchan:] = 0
        for c in range(c_lo, c_hi):
            _fill_grid(src[n], c * h * w, h, w, img, (c - c_lo) * lchan, pt, pl, sh, sw, r0,
                       lrows, gw)
        t0 = -c_lo * lchan
    else:
        img = src[n]
    _correlate_tile(img, t0, n, r0, nr, b_lo, b_hi, offs, wpk, blocks, bias, has_bias, out, gw,
                    nvc, ys, yo, xs, xo, scr, nhwc)


@njit(cache=NUMBA_CACHE, nogil=True)
def _correlate_tile(img, t0, n, r0, nr, b_lo, b_hi, offs, wpk, blocks, bias, has_bias, out, gw,
                    nvc, ys, yo, xs, xo, scr, nhwc):
    """Output rows r0 <= r < r0 + nr of image n for channel blocks b_lo <= b < b_hi, the tile's
    grid positions starting at img[t0] (see _correlate_nchw); with ``nhwc``, through ``scr``
    (room for all channels' rows of the tile)."""
    k_out, oh_out, ow_out = out.shape[1], out.shape[2], out.shape[3]
    if nhwc:
        oh_out, ow_out, k_out = out.shape[1], out.shape[2], out.shape[3]
    of = out.reshape(-1)
    acc_width = cdiv(nr * gw, 16) * 16
    kc0 = blocks[b_lo, 0]
    kc1 = blocks[b_hi - 1, 0] + blocks[b_hi - 1, 1]
    m = (nr - 1) * gw + nvc  # the last row stops at its last valid column
    acc = np.empty((KB, acc_width), dtype=out.dtype)
    pf0 = pf_n = 0
    if nhwc and xs == ys == 1 and xo == yo == 0:  # the tile's rows: one range of the output
        pf0 = (n * oh_out + r0) * ow_out * k_out
        pf_n = nr * ow_out * k_out
    for blk in range(b_lo, b_hi):
        k0, nv, grp = blocks[blk, 0], blocks[blk, 1], blocks[blk, 2]
        for r in range(KB if nv > 1 else 1):
            for t in range(uint64(m)):  # a slice assignment here is several times slower
                acc[r, t] = 0
        # channels x vectors of positions in registers over all taps, then the tail
        nl = lanes(acc)
        taps, wts = offs[grp].reshape(-1), wpk[blk].reshape(-1)
        # the last vector may run past m (into the next row's columns or the slack): those
        # lanes are computed and dropped, where a scalar tail would cost more than the
        # vectors on narrow planes
        mv = cdiv(m, nl) * nl
        reach = taps.max() if taps.size else 0  # a phase may have no taps
        tv = mv if t0 + reach + mv <= img.size else m // nl * nl
        accf, aw = acc.reshape(-1), acc_width
        if nv == 1 and taps.size <= TAPS:  # one pass of _mk1 (depthwise 3x3): no faster
            _mk1(img, offs[grp], wpk[blk], acc, t0, m)
        elif nv == 1:
            tw = tv // (NVEC1 * nl) * (NVEC1 * nl)
            for t in range(0, tw, NVEC1 * nl):
                tile1t(wts, 0, KB, img, t0 + t, taps, 0, taps.size, accf, t, NVEC1)
            # what is left, by halving widths: one vector alone is an FMA latency chain
            t = tw
            if NVEC1 > 4 and t + 4 * nl <= tv:
                tile1t(wts, 0, KB, img, t0 + t, taps, 0, taps.size, accf, t, 4)
                t += 4 * nl
            if t + 2 * nl <= tv:
                tile1t(wts, 0, KB, img, t0 + t, taps, 0, taps.size, accf, t, 2)
                t += 2 * nl
            if t < tv:
                tile1t(wts, 0, KB, img, t0 + t, taps, 0, taps.size, accf, t, 1)
            if tv < m:
                _mk1(img, offs[grp], wpk[blk], acc[:, tv:], t0 + tv, m - tv)
        else:
            tw = m // (NVEC * nl) * (NVEC * nl)
            for t in range(0, tw, NVEC * nl):
                tile4t(wts, 0, 1, 2, 3, KB, img, t0 + t, taps, 0, taps.size, accf, t, aw + t,
                       2 * aw + t, 3 * aw + t, NVEC)
            for t in range(tw, tv, nl):
                tile4t(wts, 0, 1, 2, 3, KB, img, t0 + t, taps, 0, taps.size, accf, t, aw + t,
                       2 * aw + t, 3 * aw + t, 1)
            if tv < m:  # only where a full vector would read past the source
                _mk4(img, offs[grp], wpk[blk], acc[:, tv:], t0 + tv, m - tv)
        if nhwc:  # into the tile's channels-major scratch, stored transposed at the end
            for r in range(nv):
                bk = bias[k0 + r] if has_bias else 0
                s0 = uint64((k0 + r - kc0) * acc_width)
                for t in range(uint64(m)):
                    scr[s0 + t] = acc[r, t] + bk
            if pf_n > 0:
                # the output rows' lines fetched for writing a share per block, while the
                # blocks compute: the stores at the end of the tile then find them in cache
                share = cdiv(pf_n, b_hi - b_lo)
                lo = (blk - b_lo) * share
                prefetch_write(of, pf0 + lo, max(0, min(share, pf_n - lo)))
            continue
        for r in range(nv):
            k = k0 + r
            obase = ((n * k_out + k) * oh_out + yo) * ow_out + xo
            for rr in range(nr):
                a0 = uint64(rr * gw)
                o0 = uint64(obase + (r0 + rr) * ys * ow_out)
                if xs != 1:
                    for v in range(uint64(nvc)):
                        of[o0 + v * uint64(xs)] = acc[r, a0 + v]
                elif has_bias:
                    bk = bias[k]
                    for v in range(uint64(nvc)):
                        of[o0 + v] = acc[r, a0 + v] + bk
                else:
                    for v in range(uint64(nvc)):
                        of[o0 + v] = acc[r, a0 + v]
    if nhwc:
        for rr in range(nr):
            o0 = ((n * oh_out + (r0 + rr) * ys + yo) * ow_out + xo) * k_out + kc0
            # of[o0 + v*xs*k_out + kk] = scr[kk*acc_width + rr*gw + v]
            _transpose_into(scr, rr * gw, acc_width, of, o0, xs * k_out, kc1 - kc0, nvc, False)


@njit(cache=NUMBA_CACHE, nogil=True)
def _transpose_into(src, s0, sstride, dst, d0, dstride, ni, nj, src_order):
    """dst[d0 + j*dstride + i] = src[s0 + i*sstride + j] for i < ni, j < nj: blocks of lanes x
    lanes transposed in registers, a row of src's blocks at a time with ``src_order`` (src is
    read in order: the channels-last grad-output) or else of dst's (dst is written in order:
    the channels-last output), the last block of each side overlapping the one before it (a
    copy, so writing those elements twice is harmless; element-by-element edges cost a third of
    keras-c1's channels-last store), element by element only where a side is shorter than a
    block."""
    nl = lanes(src)
    if ni < nl or nj < nl:
        for i in range(ni):
            for j in range(nj):
                dst[d0 + j * dstride + i] = src[s0 + i * sstride + j]
        return
    na, nb = (ni, nj) if src_order else (nj, ni)  # outer and inner block counts' sides
    a = 0
    while a < na:
        a = min(a, na - nl)
        b = 0
        while b < nb:
            b = min(b, nb - nl)
            i, j = (a, b) if src_order else (b, a)
            transpose_block(src, s0 + i * sstride + j, sstride, dst, d0 + j * dstride + i, dstride)
            b += nl
        a += nl


@njit(cache=NUMBA_CACHE, nogil=True)
def _grad_weight_nchw(xsrc, gsrc, offs, widx, blocks, gbase, gplane, n_red, dwflat, cgrs,
                      counter):
    """dw[k, tap] = sum_n sum_t g[n, k, t] * x[n, off(tap) + t], x and g on grids of one width.

    gsrc[n] holds grad-output planes of gplane elements, each read from gbase for n_red elements
    (its padding columns are zero, so they add nothing). Work items are (block of up to 3
    channels, chunk of 9 taps), claimed from counter; each sums over all images in order.
    """
    item = claim(counter)
    while item < blocks.shape[0] * widx.shape[0]:
        _grad_weight_item(item, xsrc, gsrc, offs, widx, blocks, gbase, gplane, n_red, dwflat,
                          cgrs)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _grad_weight_item(item, xsrc, gsrc, offs, widx, blocks, gbase, gplane, n_red, dwflat, cgrs):
    sums = np.empty((TAPS, KBW), dtype=dwflat.dtype)
    vsums = np.empty(TAPS * KBW * lanes(sums), dtype=dwflat.dtype)
    _grad_weight_sums(item, xsrc, gsrc, offs, widx, blocks, gbase, gplane, n_red, dwflat, cgrs,
                      sums, vsums)


@njit(cache=NUMBA_CACHE, nogil=True)
def _grad_weight_sums(item, xsrc, gsrc, offs, widx, blocks, gbase, gplane, n_red, dwflat, cgrs,
                      sums, vsums):
    """Item ``item`` of _grad_weight_nchw, summed over all images of xsrc and gsrc, in the
    caller's scratch ``sums`` and ``vsums`` (the fused few-channel backward makes one of these
    per few images and block: allocating them each time, and a slice's sum per lane group, cost
    it a third of its grad-weight)."""
    n_ch = widx.shape[0]
    blk = item // n_ch
    ch = item % n_ch
    k0, nv, grp = blocks[blk, 0], blocks[blk, 1], blocks[blk, 2]
    o = offs[grp, ch]
    sums[:] = 0
    g0 = k0 * gplane + gbase
    n_img = xsrc.shape[0]
    nl = lanes(sums)
    if n_red >= nl:
        vsums[:] = 0
        xst, gst = xsrc.shape[1], gsrc.shape[1]
        if nv == 1:
            dot_taps(xsrc, xst, o, gsrc, gst, g0, gplane, n_img, n_red, vsums, TAPS, 1)
        elif nv == 2:
            dot_taps(xsrc, xst, o, gsrc, gst, g0, gplane, n_img, n_red, vsums, TAPS, 2)
        else:
            dot_taps(xsrc, xst, o, gsrc, gst, g0, gplane, n_img, n_red, vsums, TAPS, 3)
        for j in range(TAPS):
            for r in range(nv):
                base = (j * nv + r) * nl
                total = vsums[base]
                for lane in range(1, nl):
                    total += vsums[base + lane]
                sums[j, r] = total
    else:
        for n in range(n_img):
            if nv == 1:
                _dwk1(xsrc[n], o, gsrc[n], g0, sums, n_red)
            else:
                _dwk2(xsrc[n], o, gsrc[n], g0, g0 + gplane, sums, n_red)
            if nv == 3:
                _dwk1(xsrc[n], o, gsrc[n], g0 + 2 * gplane, sums[:, 2:], n_red)
    for j in range(TAPS):
        if widx[ch, j] >= 0:
            for r in range(nv):
                dwflat[(k0 + r) * cgrs + widx[ch, j]] = sums[j, r]


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_backward_nchw(x, g, goffs, wpk, dx, xoffs, uniq, part_w, part_b, need, geom,
                             counter):
    """All gradients of a stride-1 depthwise conv (groups == C == K), one (n, c) plane per item.

    Each item pads its grad-output plane and its input plane locally (in cache), then computes
    dx, its image's share of dw (part_w[n, c]) and of db (part_b[n, c]): the memory traffic is
    one read of g and x and one write of dx, against four extra full passes on the general
    path. The shares are summed over images afterwards, in a fixed order.
    """
    nc = claim(counter)
    while nc < x.shape[0] * x.shape[1]:
        _depthwise_backward_plane(nc, x, g, goffs, wpk, dx, xoffs, uniq, part_w, part_b, need,
                                  geom)
        nc = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _depthwise_backward_plane(nc, x, g, goffs, wpk, dx, xoffs, uniq, part_w, part_b, need,
                              geom):
    need_input, need_weight, need_bias = need
    gpt, gpl, hg, pt, pl, hq, gw = geom
    chans, h, w = x.shape[1], x.shape[2], x.shape[3]
    oh, ow = g.shape[2], g.shape[3]
    n = nc // chans
    c = nc % chans
    gf = g.reshape(-1)
    gl = np.empty(hg * gw, dtype=x.dtype)
    _fill_grid(gf, nc * oh * ow, oh, ow, gl, 0, gpt, gpl, 1, 1, 0, hg, gw)
    if need_input:
        m = (h - 1) * gw + w
        acc = np.empty((1, m), dtype=x.dtype)
        for t in range(uint64(m)):
            acc[0, t] = 0
        _mk1(gl, goffs, wpk[c], acc, 0, m)
        dxf = dx.reshape(-1)
        for i in range(h):
            a0 = uint64(i * gw)
            o0 = uint64((nc * h + i) * w)
            for j in range(uint64(w)):
                dxf[o0 + j] = acc[0, a0 + j]
    if need_weight:
        xl = np.empty(hq * gw, dtype=x.dtype)
        _fill_grid(x.reshape(-1), nc * h * w, h, w, xl, 0, pt, pl, 1, 1, 0, hq, gw)
        sums = np.empty((TAPS, KBW), dtype=x.dtype)
        n_red = (oh - 1) * gw + ow
        for ch in range(xoffs.shape[0]):
            for j in range(TAPS):
                sums[j, 0] = 0
            _dwk1(xl, xoffs[ch], gl, gpt * gw + gpl, sums, n_red)
            for j in range(TAPS):
                if uniq[ch, j] >= 0:
                    part_w[n, c, uniq[ch, j]] = sums[j, 0]
    if need_bias:
        part_b[n, c] = _sum_plane(gf, uint64(nc * oh * ow), oh * ow)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath=_FMR)
def _sum_plane(a, lo, n):
    s = a[lo]
    for t in range(uint64(1), uint64(n)):
        s += a[lo + t]
    return s


@njit(cache=NUMBA_CACHE, nogil=True)
def _fill_grid(xf, xo, h, w, df, do, pt, pl, sh, sw, r0, rows, gw):
    """Grid rows r0 <= u < r0 + rows of one channel, all phases: for phase (a, b),
    df[do + (a*sw + b)*rows*gw + (u - r0)*gw + v] = xf[xo + (u*sh + a - pt)*w + v*sw + b - pl],
    or 0 outside the image. Flat unsigned indices: a slice per row costs more than the row."""
    usw = uint64(sw)
    ugw = uint64(gw)
    if sh == 1 and sw == 1:  # zero the rows in one loop, then copy the image's part in
        d0 = uint64(do)
        for t in range(uint64(rows * gw)):
            df[d0 + t] = 0
        vlo = min(gw, max(0, pl))
        vhi = max(vlo, min(gw, w + pl))
        for u in range(max(0, pt - r0), min(rows, h + pt - r0)):
            d1 = uint64(do + u * gw + vlo)
            s1 = uint64(xo + (r0 + u - pt) * w + vlo - pl)
            for v in range(uint64(vhi - vlo)):
                df[d1 + v] = xf[s1 + v]
        return
    for a in range(sh):
        for b in range(sw):
            base = do + (a * sw + b) * rows * gw
            # columns v whose source column v*sw + b - pl lies in [0, w)
            vlo = min(gw, max(0, cdiv(pl - b, sw)))
            vhi = max(vlo, min(gw, cdiv(w + pl - b, sw)))
            for u in range(rows):
                d0 = uint64(base + u * gw)
                row = (r0 + u) * sh + a - pt
                if row < 0 or row >= h:
                    for v in range(ugw):
                        df[d0 + v] = 0
                    continue
                for v in range(uint64(vlo)):
                    df[d0 + v] = 0
                d1 = uint64(base + u * gw + vlo)
                s1 = uint64(xo + row * w + vlo * sw + b - pl)
                if sw == 1:
                    for v in range(uint64(vhi - vlo)):
                        df[d1 + v] = xf[s1 + v]
                else:
                    for v in range(uint64(vhi - vlo)):
                        df[d1 + v] = xf[s1 + v * usw]
                for v in range(uint64(vhi), ugw):
                    df[d0 + v] = 0


@njit(cache=NUMBA_CACHE, nogil=True)
def _pack_weights(wflat, wbase, wdiv, cstride, blocks, wpk):
    """wpk[b, ch, j, r] = wflat[wbase[group, ch, j] + (blocks[b, 3] + r) * cstride] / wdiv[ch, j],
    and 0 for the padding rows of a block."""
    n_blk, n_ch = wpk.shape[0], wpk.shape[1]
    for blk in range(n_blk):
        nv, grp, row0 = blocks[blk, 1], blocks[blk, 2], blocks[blk, 3]
        for ch in range(n_ch):
            for j in range(TAPS):
                base = wbase[grp, ch, j]
                for r in range(KB):
                    if r < nv:
                        wpk[blk, ch, j, r] = wflat[base + (row0 + r) * cstride] / wdiv[ch, j]
                    else:
                        wpk[blk, ch, j, r] = 0


#: The largest padded, stride-phase-split plane (elements per channel) the kernels lay out.
GRID_LIMIT = 2**31


def unsupported(spec):
    """Why the conv kernels cannot take ``spec`` (None when they can): they lay the input out
    padded and split into stride phases, which huge paddings or strides make huge."""
    (pt, pb), (pl, pr) = spec.padding
    sh, sw = spec.stride
    h, w = spec.x_shape[2:]
    plane = sh * cdiv(h + pt + pb, sh) * sw * cdiv(w + pl + pr, sw)
    if plane > GRID_LIMIT:
        return (f"padding={spec.padding} and stride={spec.stride} on planes of {h}x{w} need "
                f"a padded, phase-split plane of {plane} elements, more than {GRID_LIMIT} "
                "(use method='im2col' or 'naive')")
    return None


# ---------------------------------------------------------------------------------------------
# plans: geometry and offset tables, cached per spec


def _blocks(n_groups, per_group, kb):
    """(first channel, valid channels, group, first channel within group) per block.

    A remainder of one channel gets a 1-channel block; larger remainders a padded full block.
    """
    rem = per_group % kb
    return _block_rows(n_groups, per_group, [kb] * (per_group // kb) + [rem] * (rem > 0))


def _weight_blocks(n_groups, per_group):
    """`_blocks` for grad-weight: KBW channels each, a remainder of one shared with the block
    before it (3 + 1 as 2 + 2: a 1-channel block does 9 FMAs per 10 loads)."""
    sizes = [KBW] * (per_group // KBW)
    rem = per_group % KBW
    if rem == 1 and sizes:
        sizes[-1:] = [(KBW + 1) // 2, KBW + 1 - (KBW + 1) // 2]
    elif rem:
        sizes.append(rem)
    return _block_rows(n_groups, per_group, sizes)


def _block_rows(n_groups, per_group, sizes):
    rows = []
    for g in range(n_groups):
        c = 0
        for nv in sizes:
            rows.append((g * per_group + c, nv, g, c))
            c += nv
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _chunked(taps):
    """Cut a list of (source offset, weight index) taps into chunks of 9.

    A short last chunk repeats its own taps and splits their weights among the copies (wdiv),
    so no zero-weight tap reads a value that could be inf. Returns offsets, weight indices,
    divisors and, for grad-weight, the weight index of each first copy (-1 for repeats).
    """
    n_ch = cdiv(len(taps), TAPS)
    offs = np.zeros((n_ch, TAPS), dtype=np.int64)
    widx = np.zeros((n_ch, TAPS), dtype=np.int64)
    wdiv = np.ones((n_ch, TAPS))
    uniq = np.full((n_ch, TAPS), -1, dtype=np.int64)
    for ch in range(n_ch):
        real = taps[ch * TAPS:(ch + 1) * TAPS]
        m = len(real)
        for j in range(TAPS):
            offs[ch, j], widx[ch, j] = real[j % m]
            wdiv[ch, j] = len(range(j % m, TAPS, m))
            if j < m:
                uniq[ch, j] = widx[ch, j]
    return offs, widx, wdiv, uniq


class _Grid(NamedTuple):
    """A padded, phase-split copy of an NCHW array: planes of hq x gw per channel and phase."""

    pt: int
    pl: int
    sh: int
    sw: int
    hq: int
    gw: int

    @property
    def plane(self):
        return self.hq * self.gw


def _input_grid(spec):
    (pt, pb), (pl, pr) = spec.padding
    sh, sw = spec.stride
    h, w = spec.x_shape[2:]
    return _Grid(pt, pl, sh, sw, cdiv(h + pt + pb, sh), cdiv(w + pl + pr, sw))


@functools.lru_cache(maxsize=256)
def _input_taps(spec, grid):
    """Taps over the input grid: offsets (groups, chunks, 9), weight indices within a filter
    (chunks, 9), weight divisors and first copies (see _chunked)."""
    cg, r, s = spec.w_shape[1:]
    dh, dw = spec.dilation
    sh, sw = spec.stride
    per_chan = sh * sw * grid.plane
    offs = []
    for g in range(spec.groups):
        taps = []
        for c in range(cg):
            for p in range(r):
                a, u = (p * dh) % sh, (p * dh) // sh
                for q in range(s):
                    b, v = (q * dw) % sw, (q * dw) // sw
                    off = (g * cg + c) * per_chan + (a * sw + b) * grid.plane + u * grid.gw + v
                    taps.append((off, (c * r + p) * s + q))
        o, widx, wdiv, uniq = _chunked(taps)
        offs.append(o)
    return np.stack(offs), widx, wdiv, uniq


class _FwdPlan(NamedTuple):
    grid: _Grid
    offs: np.ndarray
    wbase: np.ndarray  # (groups, chunks, 9) weight index within a filter
    wdiv: np.ndarray
    blocks: np.ndarray
    local: tuple  # (tile geometry for _correlate_nchw, output rows per tile)


@functools.lru_cache(maxsize=256)
def _fwd_plan(spec):
    grid = _input_grid(spec)
    c, h, w = spec.x_shape[1:]
    k, cg, r = spec.w_shape[:3]
    # each work item builds the grid rows of its tile (see _correlate_nchw)
    tile = TILE_LOCAL if k == spec.groups else TILE  # one accumulator row, or four
    rows = max(1, min(spec.out_hw[0], tile // grid.gw))
    rows = cdiv(spec.out_hw[0], cdiv(spec.out_hw[0], rows))
    grid = grid._replace(hq=rows + (r - 1) * spec.dilation[0] // spec.stride[0])
    (pt, _), (pl, _) = spec.padding
    local = ((c, h, w, pt, pl, *spec.stride, grid.hq, cg), rows)
    offs, widx, wdiv, _ = _input_taps(spec, grid)
    blocks = _blocks(spec.groups, k // spec.groups, KB)
    blocks[:, 3] = blocks[:, 0]  # forward weight rows are global output channels
    wbase = np.broadcast_to(widx, offs.shape).copy()
    return _FwdPlan(grid, offs, wbase, wdiv, blocks, local)


class _Phase(NamedTuple):
    a: int
    b: int
    rows: int  # dx rows of this phase: h = a + sh*u for u < rows
    cols: int
    offs: np.ndarray  # (groups, chunks, 9) into the grad-output grid
    wbase: np.ndarray  # (groups, chunks, 9) weight index, plus c_local * R*S
    wdiv: np.ndarray


class _GradInputPlan(NamedTuple):
    grid: _Grid  # the grad-output grid (stride 1: sh = sw = 1)
    phases: tuple
    blocks: np.ndarray


def _tap_shifts(a, stride, pad, dil, k):
    """Taps p landing on dx phase a, with the grad-output shift e: g row = u + e."""
    return [(p, (a + pad - p * dil) // stride) for p in range(k)
            if (a + pad - p * dil) % stride == 0]


@functools.lru_cache(maxsize=256)
def _grad_input_plan(spec, min_gw):
    """Grad-input phases over a grad-output grid g[r - pt, s - pl], at least min_gw wide."""
    h, w = spec.x_shape[2:]
    k, cg, r, s = spec.w_shape
    oh, ow = spec.out_hw
    sh, sw = spec.stride
    dh, dw = spec.dilation
    (pt, _), (pl, _) = spec.padding
    rows = [(a, cdiv(h - a, sh), _tap_shifts(a, sh, pt, dh, r)) for a in range(min(sh, h))]
    cols = [(b, cdiv(w - b, sw), _tap_shifts(b, sw, pl, dw, s)) for b in range(min(sw, w))]
    es = [e for _, _, t in rows for _, e in t] or [0]
    fs = [f for _, _, t in cols for _, f in t] or [0]
    gpt, gpl = max(0, -min(es)), max(0, -min(fs))
    hg = max([gpt + oh] + [n_u + max(e for _, e in t) + gpt for _, n_u, t in rows if t])
    wg = max([gpl + ow] + [n_v + max(f for _, f in t) + gpl for _, n_v, t in cols if t])
    gw = max(wg, min_gw)
    if (hg, gw) != (oh, ow) and hg * gw * np.dtype(spec.dtype).itemsize % 4096 == 0:
        hg += 1  # planes 4 KB apart share L1 sets: a row of one element in each of 16 planes
    grid = _Grid(gpt, gpl, 1, 1, hg, gw)
    kg = k // spec.groups
    phases = []
    for a, n_u, tr in rows:
        for b, n_v, tc in cols:
            offs, wbase = [], []
            for g in range(spec.groups):
                taps = [((g * kg + kk) * grid.plane + (e + gpt) * grid.gw + f + gpl,
                         (g * kg + kk) * cg * r * s + p * s + q)
                        for kk in range(kg) for p, e in tr for q, f in tc]
                o, wi, wdiv, _ = _chunked(taps)
                offs.append(o)
                wbase.append(wi)
            phases.append(_Phase(a, b, n_u, n_v, np.stack(offs), np.stack(wbase), wdiv))
    blocks = _blocks(spec.groups, cg, KB)
    return _GradInputPlan(grid, tuple(phases), blocks)


# ---------------------------------------------------------------------------------------------
# helpers shared by the entry points


def _padded(x, grid):
    """The grid copy of x as (N, flat); x itself when the grid adds nothing.

    Each element written once (no zero-fill first), by planes on the pool's threads: NumPy's
    zeros and strided slice copy, on one thread and through fresh pages, took 6 ms of a 13 ms
    grad-input (100x30x24x24 float64 into 32x32 planes).
    """
    n, c, h, w = x.shape
    if (grid.pt, grid.pl, grid.sh, grid.sw, grid.hq, grid.gw) == (0, 0, 1, 1, h, w):
        return x.reshape(n, -1)
    dst = np.empty((n, c, grid.sh, grid.sw, grid.hq, grid.gw), dtype=x.dtype)
    plane = grid.sh * grid.sw * grid.plane
    per = max(1, 4096 // plane)  # planes per work item
    # a copy: a quarter of a nanosecond per element written, as the pools' estimates
    _parallel.run(_pad_planes, (x, dst, grid.pt, grid.pl, grid.sh, grid.sw, grid.hq, grid.gw,
                                per), cdiv(n * c, per), n * c * plane // 4)
    return dst.reshape(n, -1)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pad_planes(x, dst, pt, pl, sh, sw, hq, gw, per, counter):
    """Blocks of ``per`` (n, c) planes claimed from counter: grid row u of phase (a, b) holds
    input row u*sh + a - pt, its column v input column v*sw + b - pl, zero outside the input."""
    n, c, h, w = x.shape
    xf, df = x.reshape(-1), dst.reshape(-1)
    n_planes, plane = n * c, sh * sw * hq * gw
    blk = claim(counter)
    while blk * per < n_planes:
        for p in range(blk * per, min(n_planes, (blk + 1) * per)):
            for a in range(sh):
                for b in range(sw):
                    v0 = min(gw, max(0, cdiv(pl - b, sw)))
                    v1 = max(v0, min(gw, cdiv(w + pl - b, sw)))
                    for u in range(hq):
                        o = uint64(p * plane + ((a * sw + b) * hq + u) * gw)
                        row = u * sh + a - pt
                        if row < 0 or row >= h:
                            for v in range(uint64(gw)):
                                df[o + v] = 0
                            continue
                        for v in range(uint64(v0)):
                            df[o + v] = 0
                        src = uint64(p * h * w + row * w + b - pl)
                        for v in range(uint64(v0), uint64(v1)):
                            df[o + v] = xf[src + v * uint64(sw)]
                        for v in range(uint64(v1), uint64(gw)):
                            df[o + v] = 0
        blk = claim(counter)


def _tiling(n_img, nvr, gw, n_blk):
    """(rows per tile, channel-block parts): tiles of about TILE elements and enough items to
    keep every thread busy even at batch 1. Changes only who computes what, never the sums."""
    rows = max(1, min(nvr, TILE // gw))
    rows = cdiv(nvr, cdiv(nvr, rows))  # tiles of even height
    want = 4 * _parallel.count
    parts = min(n_blk, max(1, cdiv(want, n_img * cdiv(nvr, rows))))
    while n_img * cdiv(nvr, rows) * parts < want and rows > 1:
        rows = cdiv(rows, 2)
    return rows, parts


def _correlate(src, offs, wpk, blocks, bias, out, gw, nvr, nvc, ys=1, yo=0, xs=1, xo=0,
               local=None, work_ns=0, nhwc=False):
    n_img, n_blk = src.shape[0], blocks.shape[0]
    if local is None:
        rows, parts = _tiling(n_img, nvr, gw, n_blk)
        geom = (0, 0, 0, 0, 0, 1, 1, 0, 0)
    else:
        geom, rows = local
        want = 4 * _parallel.count
        parts = min(n_blk, max(1, cdiv(want, n_img * cdiv(nvr, rows))))
    has_bias = bias is not None
    if not has_bias:
        bias = np.zeros(1, dtype=out.dtype)
    _parallel.run(_correlate_nchw, (src, offs, wpk, blocks, bias, has_bias, out, gw, nvr, nvc,
                                    ys, yo, xs, xo, rows, parts, local is not None, geom,
                                    nhwc),
                  n_img * cdiv(nvr, rows) * parts, work_ns)


def _packed(w, wbase, wdiv, cstride, blocks):
    wpk = np.empty((blocks.shape[0], wbase.shape[1], TAPS, KB), dtype=w.dtype)
    _pack_weights(w.reshape(-1), wbase, wdiv, cstride, blocks, wpk)
    return wpk


# ---------------------------------------------------------------------------------------------
# conv2d entry points


def conv2d_forward(x, w, b, spec, channels_last_out=False):
    """The forward of an NCHW ``spec`` (channels-last specs go to direct_nhwc); with
    ``channels_last_out`` the result is (N, OH, OW, K), written so from the register tiles."""
    if spec.layout == "NHWC":
        return direct_nhwc.conv2d_forward(x, w, b, spec)
    plan = _fwd_plan(spec)
    src = x.reshape(x.shape[0], -1)  # items pad their own tiles
    cgrs = int(np.prod(spec.w_shape[1:]))
    wpk = _packed(w, plan.wbase, plan.wdiv, cgrs, plan.blocks)
    n, k, oh, ow = spec.out_shape
    out = np.empty((n, oh, ow, k) if channels_last_out else (n, k, oh, ow), dtype=spec.dtype)
    _correlate(src, plan.offs, wpk, plan.blocks, b, out, plan.grid.gw, oh, ow, local=plan.local,
               work_ns=_parallel.conv_work_ns(spec), nhwc=channels_last_out)
    return out


def _fused_grids(spec):
    """What the stride-1 fused backwards lay out: the grad-output's grid plan (one phase) and
    the input's grid of the same width, with the input's taps and their first copies."""
    xgrid = _input_grid(spec)
    gplan = _grad_input_plan(spec, xgrid.gw)
    xgrid = xgrid._replace(gw=gplan.grid.gw)
    xoffs, _, _, uniq = _input_taps(spec, xgrid)
    return gplan, xgrid, xoffs, uniq


def _depthwise_backward(g, x, w, spec, need_input, need_weight, need_bias):
    n, c = spec.x_shape[:2]
    r, s = spec.w_shape[2:]
    gplan, xgrid, xoffs, uniq = _fused_grids(spec)
    ggrid, ph = gplan.grid, gplan.phases[0]
    wpk = _packed(w, ph.wbase, ph.wdiv, r * s, gplan.blocks)
    dx = np.empty(spec.x_shape if need_input else (1, 1, 1, 1), dtype=spec.dtype)
    part_w = np.empty((n, c, r * s) if need_weight else (1, 1, 1), dtype=spec.dtype)
    part_b = np.empty((n, c) if need_bias else (1, 1), dtype=spec.dtype)
    if x is None:  # grad-input alone (conv_transpose2d): x is never read, dx has its shape
        x = dx
    # offsets of group (channel) 0 are those of every plane, relative to its start
    args = (x, g, ph.offs[0], wpk, dx, xoffs[0], uniq, part_w, part_b,
            (need_input, need_weight, need_bias),
            (ggrid.pt, ggrid.pl, ggrid.hq, xgrid.pt, xgrid.pl, xgrid.hq, ggrid.gw))
    _parallel.run(_depthwise_backward_nchw, args, n * c,
                  _parallel.conv_work_ns(spec, need_input + need_weight + 0.1))
    return (dx if need_input else None,
            part_w.sum(axis=0).reshape(spec.w_shape) if need_weight else None,
            part_b.sum(axis=0) if need_bias else None)


#: The most bytes of padded grids (grad-output and input) the few-channel backward lays out per
#: work item: they should stay in the core's L2 while dx and dw read them.
FEW_CHANNELS_GRID = 1 << 20
#: Input channels up to which a stride-1 backward takes the fused few-channel kernel.
FEW_CHANNELS = 4
#: ... and images at least
FEW_CHANNELS_BATCH = 4
#: Images per work item of the few-channel backward, at most.
FEW_CHANNELS_IMAGES = 4


def few_channels(spec):
    """Whether the backward of ``spec`` takes few_channels_backward (the spec decides, never
    the thread count, so that results do not depend on it)."""
    n, c = spec.x_shape[:2]
    if c > FEW_CHANNELS or spec.groups != 1 or spec.stride != (1, 1) or n < FEW_CHANNELS_BATCH:
        return False
    gplan, xgrid, _, _ = _fused_grids(spec)
    return _grid_bytes(spec, gplan, xgrid) <= FEW_CHANNELS_GRID


def _grid_bytes(spec, gplan, xgrid):
    """Bytes of one image's padded grad-output and input grids in few_channels_backward."""
    per = spec.w_shape[0] * gplan.grid.plane + spec.x_shape[1] * xgrid.plane
    return per * np.dtype(spec.dtype).itemsize


def few_channels_backward(g, x, w, spec, need_bias, g_nhwc=False):
    """All gradients of a `few_channels` spec; ``g`` may be channels-last (``g_nhwc``), x, w
    and the results are NCHW / OIHW."""
    n, c = spec.x_shape[:2]
    k, cg, r, s = spec.w_shape
    gplan, xgrid, xoffs, uniq = _fused_grids(spec)
    ggrid, ph = gplan.grid, gplan.phases[0]
    wpk = _packed(w, ph.wbase, ph.wdiv, r * s, gplan.blocks)
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    # images per item: as many as fit the grid budget, up to FEW_CHANNELS_IMAGES
    ib = max(1, min(FEW_CHANNELS_IMAGES, FEW_CHANNELS_GRID // _grid_bytes(spec, gplan, xgrid)))
    part_w = np.empty((cdiv(n, ib), k * cg * r * s), dtype=spec.dtype)
    part_b = np.empty((n, k))
    args = (x, g, ph.offs, wpk, gplan.blocks, dx, xoffs, uniq, _weight_blocks(1, k), part_w,
            part_b, need_bias, (ggrid.pt, ggrid.pl, ggrid.hq, xgrid.pt, xgrid.pl, xgrid.hq,
                                ggrid.gw, ib, g_nhwc))
    _parallel.run(_few_channels_backward_nchw, args, part_w.shape[0],
                  _parallel.conv_work_ns(spec))
    db = part_b.sum(axis=0).astype(spec.dtype) if need_bias else None
    return dx, np.add.reduce(part_w, axis=0).reshape(spec.w_shape), db


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    if spec.layout == "NHWC":
        return direct_nhwc.conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias)
    n, c = spec.x_shape[:2]
    if (spec.groups == c == spec.w_shape[0] and spec.stride == (1, 1)
            and (need_input or need_weight)):
        return _depthwise_backward(g, x, w, spec, need_input, need_weight, need_bias)
    if need_input and need_weight and few_channels(spec):
        return few_channels_backward(g, x, w, spec, need_bias)
    dx = dw = db = None
    n, c, h, wd = spec.x_shape
    k, cg, r, s = spec.w_shape
    oh, ow = spec.out_hw
    xgrid = _input_grid(spec)
    gsrc = ggrid = None
    if need_input:
        # the grad-output grid also serves grad-weight when both grids share a width
        gplan = _grad_input_plan(spec, xgrid.gw if need_weight else 0)
        ggrid = gplan.grid
        gsrc = _padded(g, ggrid)
        dx = np.empty(spec.x_shape, dtype=spec.dtype)
        sh, sw = spec.stride
        for ph in gplan.phases:
            wpk = _packed(w, ph.wbase, ph.wdiv, r * s, gplan.blocks)
            _correlate(gsrc, ph.offs, wpk, gplan.blocks, None, dx, ggrid.gw, ph.rows, ph.cols,
                       sh, ph.a, sw, ph.b,
                       work_ns=_parallel.conv_work_ns(spec, 1 / len(gplan.phases)))
    if need_weight:
        if ggrid is None:
            ggrid = _Grid(0, 0, 1, 1, oh, xgrid.gw)
            gsrc = _padded(g, ggrid)
        xgrid = xgrid._replace(gw=ggrid.gw)
        xsrc = _padded(x, xgrid)
        offs, _, _, uniq = _input_taps(spec, xgrid)
        blocks = _weight_blocks(spec.groups, k // spec.groups)
        n_red = (oh - 1) * ggrid.gw + ow
        dw = np.empty(spec.w_shape, dtype=spec.dtype)
        _parallel.run(_grad_weight_nchw, (xsrc, gsrc, offs, uniq, blocks,
                                          ggrid.pt * ggrid.gw + ggrid.pl, ggrid.plane, n_red,
                                          dw.reshape(-1), cg * r * s),
                      blocks.shape[0] * uniq.shape[0], _parallel.conv_work_ns(spec))
    if need_bias:
        db = _reduce.channel_sums(g)
    return dx, dw, db
