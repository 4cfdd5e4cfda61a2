"""cuda-direct conv2d: shared-memory tiles, several output channels per thread.

A block owns a tile of output pixels of one image and KB output channels; it stages the input
tile (with its halo) for CB input channels and the matching weights in shared memory, and each
thread accumulates RY x RX pixels x KB channels in registers. grad-input is the same structure
run backwards (a tile of dx gathers from a shared tile of grad_out); grad-weight stages grad_out
and input tiles and each thread owns some (c, p, q) taps for KB output channels, over a split of
the (image, tile) pairs, followed by a fixed-order reduction. A kernel too large for the shared
tiles runs the cuda-naive kernels.
"""

from __future__ import annotations

import functools

import numpy as np

from ._common import (_SHARED_BYTES, _TARGET_BLOCKS, _WORKSPACE_ELEMS, _bias_grad, _cdiv,
                      _cuda, _launch_flat, _nbtype, _pow2, _sim, _tiles)
from ._memory import _dummy, _Io, _workspace
from .naive import _naive, conv2d_forward_naive

cuda = None  # numba.cuda, bound by _cuda(globals()) on first use


# (TPY, TPX, RY, RX, KB, CB): threads TPY x TPX, each RY x RX pixels of KB channels; CB input
# channels staged per step. The tile is (TPY*RY) x (TPX*RX) output pixels.
DIRECT_CONFIGS = {
    "default": (8, 16, 2, 2, 8, 8),
    "small": (8, 8, 1, 1, 8, 8),
    "depthwise": (8, 16, 2, 2, 1, 1),
    "k16": (8, 16, 1, 2, 16, 4),
    "sim": (2, 2, 2, 4, 4, 2),
}


def _direct_config(spec_out_hw, k_per_group, c_per_group, forward=False):
    if _sim():
        return DIRECT_CONFIGS["sim"]
    if k_per_group < 4:
        return DIRECT_CONFIGS["depthwise"]
    if spec_out_hw[0] * spec_out_hw[1] <= 16 * 16:
        return DIRECT_CONFIGS["small"]
    if forward and k_per_group >= 16:  # measured on vgg-256 (H100): 1.58 ms against 1.79 ms
        return DIRECT_CONFIGS["k16"]
    return DIRECT_CONFIGS["default"]


def _fit_channels(cb, per_channel, fixed, itemsize):
    """Largest CB <= cb with (fixed + CB * per_channel) elements in static shared memory."""
    while cb > 1 and (fixed + cb * per_channel) * itemsize > _SHARED_BYTES:
        cb -= 1
    return cb if (fixed + cb * per_channel) * itemsize <= _SHARED_BYTES else 0


@functools.cache
def _direct_forward_kernel(dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry, rx, kb, cb):
    """out[n, o, y, x] over a (tpy*ry) x (tpx*rx) tile of one image and kb channels ``o``."""
    _cuda(globals())
    nbt = _nbtype(dtype)
    zero = np.dtype(dtype).type(0)
    th, tw = tpy * ry, tpx * rx
    ih, iw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    nt = tpy * tpx
    x_shape, w_shape, acc_shape = (cb, ih, iw), (kb, cb, kh, kw), (kb, ry, rx)
    x_load, w_load, taps = cb * ih * iw, kb * cb * kh * kw, kh * kw

    @cuda.jit
    def forward(x, w, b, out, pt, pl, groups, has_bias, tiles_w, tiles):
        _, _, h, wd = x.shape
        k_out, cg = w.shape[0], w.shape[1]
        oh, ow = out.shape[2], out.shape[3]
        kg = k_out // groups
        kblocks = (kg + kb - 1) // kb
        n = cuda.blockIdx.x // tiles
        tile = cuda.blockIdx.x - n * tiles
        oy0 = (tile // tiles_w) * th
        ox0 = (tile - (tile // tiles_w) * tiles_w) * tw
        grp = cuda.blockIdx.y // kblocks
        o0 = grp * kg + (cuda.blockIdx.y - grp * kblocks) * kb
        o_end = grp * kg + kg
        c_base = grp * cg
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * tpx + tx
        iy0 = oy0 * sh - pt
        ix0 = ox0 * sw - pl
        xs = cuda.shared.array(x_shape, nbt)
        ws = cuda.shared.array(w_shape, nbt)
        acc = cuda.local.array(acc_shape, nbt)
        wr = cuda.local.array(kb, nbt)
        for k in range(kb):
            for a in range(ry):
                for e in range(rx):
                    acc[k, a, e] = zero
        for c0 in range(0, cg, cb):
            for e in range(tid, x_load, nt):
                cc = e // (ih * iw)
                r = e - cc * (ih * iw)
                yy = r // iw
                xx = r - yy * iw
                v = zero
                if c0 + cc < cg and 0 <= iy0 + yy < h and 0 <= ix0 + xx < wd:
                    v = x[n, c_base + c0 + cc, iy0 + yy, ix0 + xx]
                xs[cc, yy, xx] = v
            for e in range(tid, w_load, nt):
                k = e // (cb * taps)
                r = e - k * (cb * taps)
                cc = r // taps
                r -= cc * taps
                p = r // kw
                v = zero
                if o0 + k < o_end and c0 + cc < cg:
                    v = w[o0 + k, c0 + cc, p, r - p * kw]
                ws[k, cc, p, r - p * kw] = v
            cuda.syncthreads()
            for cc in range(cb):
                for p in range(kh):
                    for q in range(kw):
                        for k in range(kb):
                            wr[k] = ws[k, cc, p, q]
                        for a in range(ry):
                            for e in range(rx):
                                xv = xs[cc, (ty + a * tpy) * sh + p * dh,
                                        (tx + e * tpx) * sw + q * dw]
                                for k in range(kb):
                                    acc[k, a, e] += wr[k] * xv
            cuda.syncthreads()
        for k in range(kb):
            o = o0 + k
            if o < o_end:
                bias = zero
                if has_bias:
                    bias = b[o]
                for a in range(ry):
                    y = oy0 + ty + a * tpy
                    if y < oh:
                        for e in range(rx):
                            xo = ox0 + tx + e * tpx
                            if xo < ow:
                                out[n, o, y, xo] = acc[k, a, e] + bias

    return forward


@functools.cache
def _direct_backward_input_kernel(dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry, rx, kb, ob):
    """dx[n, c, y, x] over a tile of one image and kb channels c: gathers a shared grad_out tile.

    dx[n, c, y, x] = sum over o, p, q of g[n, o, i, j] * w[o, c, p, q] where
    i = (y + pt - p*dh) / sh and j = (x + pl - q*dw) / sw are whole and in range.
    """
    _cuda(globals())
    nbt = _nbtype(dtype)
    zero = np.dtype(dtype).type(0)
    th, tw = tpy * ry, tpx * rx
    gh, gw = (th - 1 + (kh - 1) * dh) // sh + 2, (tw - 1 + (kw - 1) * dw) // sw + 2
    nt = tpy * tpx
    g_shape, w_shape, acc_shape = (ob, gh, gw), (kb, ob, kh, kw), (kb, ry, rx)
    g_load, w_load, taps = ob * gh * gw, kb * ob * kh * kw, kh * kw

    @cuda.jit
    def backward_input(g, w, dx, pt, pl, groups, tiles_w, tiles):
        _, c_in, h, wd = dx.shape
        k_out, cg = w.shape[0], w.shape[1]
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        cblocks = (cg + kb - 1) // kb
        n = cuda.blockIdx.x // tiles
        tile = cuda.blockIdx.x - n * tiles
        y0 = (tile // tiles_w) * th
        x0 = (tile - (tile // tiles_w) * tiles_w) * tw
        grp = cuda.blockIdx.y // cblocks
        cl0 = (cuda.blockIdx.y - grp * cblocks) * kb  # first channel, within the group
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * tpx + tx
        gi0 = (y0 + pt - (kh - 1) * dh) // sh  # the first row of g the tile reads (floor)
        gj0 = (x0 + pl - (kw - 1) * dw) // sw
        gs = cuda.shared.array(g_shape, nbt)
        ws = cuda.shared.array(w_shape, nbt)
        acc = cuda.local.array(acc_shape, nbt)
        wr = cuda.local.array(kb, nbt)
        for k in range(kb):
            for a in range(ry):
                for e in range(rx):
                    acc[k, a, e] = zero
        for o0 in range(0, kg, ob):
            for e in range(tid, g_load, nt):
                oo = e // (gh * gw)
                r = e - oo * (gh * gw)
                ii = r // gw
                jj = r - ii * gw
                v = zero
                if o0 + oo < kg and 0 <= gi0 + ii < oh and 0 <= gj0 + jj < ow:
                    v = g[n, grp * kg + o0 + oo, gi0 + ii, gj0 + jj]
                gs[oo, ii, jj] = v
            for e in range(tid, w_load, nt):
                k = e // (ob * taps)
                r = e - k * (ob * taps)
                oo = r // taps
                r -= oo * taps
                p = r // kw
                v = zero
                if cl0 + k < cg and o0 + oo < kg:
                    v = w[grp * kg + o0 + oo, cl0 + k, p, r - p * kw]
                ws[k, oo, p, r - p * kw] = v
            cuda.syncthreads()
            for oo in range(ob):
                for p in range(kh):
                    for q in range(kw):
                        for k in range(kb):
                            wr[k] = ws[k, oo, p, q]
                        for a in range(ry):
                            ti = y0 + ty + a * tpy + pt - p * dh
                            if ti % sh == 0:
                                for e in range(rx):
                                    tj = x0 + tx + e * tpx + pl - q * dw
                                    if tj % sw == 0:
                                        gv = gs[oo, ti // sh - gi0, tj // sw - gj0]
                                        for k in range(kb):
                                            acc[k, a, e] += wr[k] * gv
            cuda.syncthreads()
        for k in range(kb):
            if cl0 + k < cg:
                c = grp * cg + cl0 + k
                for a in range(ry):
                    y = y0 + ty + a * tpy
                    if y < h:
                        for e in range(rx):
                            xo = x0 + tx + e * tpx
                            if xo < wd:
                                dx[n, c, y, xo] = acc[k, a, e]

    return backward_input


# (NT, TH, TW, KB, ITEMS): NT threads; a step stages a TH x TW tile of grad_out for KB output
# channels and the matching input tile; each thread owns ITEMS (c, p, q) taps for the KB channels.
DIRECT_WEIGHT_CONFIGS = {
    "default": (128, 8, 16, 16, 2),
    "sim": (8, 4, 8, 4, 4),
}


@functools.cache
def _direct_backward_weight_kernel(dtype, kh, kw, sh, sw, dh, dw, nt, th, tw, kb, items, cb):
    """partial[s, o, c, p, q]: grad_out tiles times input tiles, over split s of (image, tile)."""
    _cuda(globals())
    nbt = _nbtype(dtype)
    zero = np.dtype(dtype).type(0)
    ih, iw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    g_shape, x_shape, acc_shape = (kb, th, tw), (cb, ih, iw), (items, kb)
    g_load, x_load, taps = kb * th * tw, cb * ih * iw, kh * kw

    @cuda.jit
    def backward_weight(g, x, partial, pt, pl, groups, tiles_w, tiles, chunk):
        n_batch, _, h, wd = x.shape
        k_out, cg = partial.shape[1], partial.shape[2]
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        kblocks = (kg + kb - 1) // kb
        cblocks = (cg + cb - 1) // cb
        bx = cuda.blockIdx.x
        grp = bx // (kblocks * cblocks)
        r = bx - grp * (kblocks * cblocks)
        o0 = grp * kg + (r // cblocks) * kb
        o_end = grp * kg + kg
        c0 = (r - (r // cblocks) * cblocks) * cb  # within the group
        s = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        gs = cuda.shared.array(g_shape, nbt)
        xs = cuda.shared.array(x_shape, nbt)
        acc = cuda.local.array(acc_shape, nbt)
        xr = cuda.local.array(items, nbt)
        ic = cuda.local.array(items, np.int32)
        ip = cuda.local.array(items, np.int32)
        iq = cuda.local.array(items, np.int32)
        for u in range(items):
            it = tid + u * nt
            cc = it // taps
            pq = it - cc * taps
            ic[u] = cc if cc < cb else 0
            ip[u] = pq // kw
            iq[u] = pq - (pq // kw) * kw
            for k in range(kb):
                acc[u, k] = zero
        t_end = min(tiles * n_batch, (s + 1) * chunk)
        for t in range(s * chunk, t_end):
            n = t // tiles
            tile = t - n * tiles
            oy0 = (tile // tiles_w) * th
            ox0 = (tile - (tile // tiles_w) * tiles_w) * tw
            iy0 = oy0 * sh - pt
            ix0 = ox0 * sw - pl
            for e in range(tid, g_load, nt):
                k = e // (th * tw)
                rr = e - k * (th * tw)
                yy = rr // tw
                xx = rr - yy * tw
                v = zero
                if o0 + k < o_end and oy0 + yy < oh and ox0 + xx < ow:
                    v = g[n, o0 + k, oy0 + yy, ox0 + xx]
                gs[k, yy, xx] = v
            for e in range(tid, x_load, nt):
                cc = e // (ih * iw)
                rr = e - cc * (ih * iw)
                yy = rr // iw
                xx = rr - yy * iw
                v = zero
                if c0 + cc < cg and 0 <= iy0 + yy < h and 0 <= ix0 + xx < wd:
                    v = x[n, grp * cg + c0 + cc, iy0 + yy, ix0 + xx]
                xs[cc, yy, xx] = v
            cuda.syncthreads()
            for yy in range(th):
                for xx in range(tw):
                    for u in range(items):
                        xr[u] = xs[ic[u], yy * sh + ip[u] * dh, xx * sw + iq[u] * dw]
                    for k in range(kb):
                        gv = gs[k, yy, xx]
                        for u in range(items):
                            acc[u, k] += xr[u] * gv
            cuda.syncthreads()
        for u in range(items):
            it = tid + u * nt
            cc = it // taps
            if cc < cb and c0 + cc < cg:
                for k in range(kb):
                    if o0 + k < o_end:
                        partial[s, o0 + k, c0 + cc, ip[u], iq[u]] = acc[u, k]

    return backward_weight


@functools.cache
def _direct_reduce():
    _cuda(globals())

    @cuda.jit
    def reduce_splits(partial, out):
        """out[e] = sum over s of partial[s, e], in order of s (both flat)."""
        nsplit, size = partial.shape
        for t in range(cuda.grid(1), size, cuda.gridsize(1)):
            acc = partial[0, t]
            for s in range(1, nsplit):
                acc += partial[s, t]
            out[t] = acc

    return reduce_splits


def conv2d_forward_direct(x, w, b, spec):
    io = _Io(spec)
    xd, wd, bd = io.inputs(x, w, b)
    n_batch = spec.x_shape[0]
    k_out, cg, kh, kw = spec.w_shape
    kg = k_out // spec.groups
    tpy, tpx, ry, rx, kb, cb = _direct_config(spec.out_hw, kg, cg, forward=True)
    kb, cb = _pow2(kg, kb), _pow2(cg, cb)  # powers of two: fewer kernels to compile
    th, tw = tpy * ry, tpx * rx
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    ih, iw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    cb = _fit_channels(cb, ih * iw + kb * kh * kw, 0, np.dtype(spec.dtype).itemsize)
    if cb == 0:  # a kernel too large for a shared tile: the straight loops
        return conv2d_forward_naive(x, w, b, spec)
    out = io.empty(spec.out_shape)
    kern = _direct_forward_kernel(spec.dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry, rx, kb, cb)
    tiles_w, tiles = _tiles(spec.out_hw, th, tw)
    (pt, _), (pl, _) = spec.padding
    grid = (n_batch * tiles, spec.groups * _cdiv(kg, kb))
    kern[grid, (tpx, tpy)](xd, wd, _dummy(spec.dtype) if bd is None else bd, out, pt, pl,
                           spec.groups, bd is not None, tiles_w, tiles)
    return io.output(out)


def _direct_backward_input(gd, wd, spec, io):
    n_batch, _, h, wdt = spec.x_shape
    k_out, cg, kh, kw = spec.w_shape
    kg = k_out // spec.groups
    tpy, tpx, ry, rx, kb, ob = _direct_config((h, wdt), cg, kg)
    kb, ob = _pow2(cg, kb), _pow2(kg, ob)
    th, tw = tpy * ry, tpx * rx
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    gh, gw = (th - 1 + (kh - 1) * dh) // sh + 2, (tw - 1 + (kw - 1) * dw) // sw + 2
    ob = _fit_channels(ob, gh * gw + kb * kh * kw, 0, np.dtype(spec.dtype).itemsize)
    dx = io.empty(spec.x_shape)
    if ob == 0:
        _launch_flat(_naive().backward_input, dx.size, gd, wd, dx, *spec.loop_args)
        return dx
    kern = _direct_backward_input_kernel(spec.dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry, rx,
                                         kb, ob)
    tiles_w, tiles = _tiles((h, wdt), th, tw)
    (pt, _), (pl, _) = spec.padding
    grid = (n_batch * tiles, spec.groups * _cdiv(cg, kb))
    kern[grid, (tpx, tpy)](gd, wd, dx, pt, pl, spec.groups, tiles_w, tiles)
    return dx


def _direct_backward_weight(gd, xd, spec, io):
    n_batch = spec.x_shape[0]
    k_out, cg, kh, kw = spec.w_shape
    kg = k_out // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    nt, th, tw, kb, items = DIRECT_WEIGHT_CONFIGS["sim" if _sim() else "default"]
    kb = _pow2(kg, kb)
    cb = max(1, min(_pow2(cg, 1 << 20), (nt * items) // (kh * kw)))
    items = _cdiv(cb * kh * kw, nt)
    ih, iw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    cb = _fit_channels(cb, ih * iw, kb * th * tw, np.dtype(spec.dtype).itemsize)
    dw_out = io.empty(spec.w_shape)
    if cb == 0 or items > 8:  # taps that do not fit a block: the straight loops
        _launch_flat(_naive().backward_weight, dw_out.size, gd, xd, dw_out, *spec.loop_args)
        return dw_out
    items = _cdiv(cb * kh * kw, nt)
    tiles_w, tiles = _tiles(spec.out_hw, th, tw)
    blocks = spec.groups * _cdiv(kg, kb) * _cdiv(cg, cb)
    total = n_batch * tiles
    if _sim():
        nsplit = min(total, 2)
    else:
        nsplit = max(1, min(total, _cdiv(_TARGET_BLOCKS, blocks),
                            _WORKSPACE_ELEMS // (k_out * cg * kh * kw)))
    chunk = _cdiv(total, nsplit)
    nsplit = _cdiv(total, chunk)
    partial = _workspace("partial", (nsplit, k_out, cg, kh, kw), spec.dtype)
    kern = _direct_backward_weight_kernel(spec.dtype, kh, kw, sh, sw, dh, dw, nt, th, tw, kb,
                                          items, cb)
    (pt, _), (pl, _) = spec.padding
    kern[(blocks, nsplit), nt](gd, xd, partial, pt, pl, spec.groups, tiles_w, tiles, chunk)
    size = k_out * cg * kh * kw
    _launch_flat(_direct_reduce(), size, partial.reshape(nsplit, size), dw_out.reshape(size))
    return dw_out


def conv2d_backward_direct(g, x, w, spec, need_input, need_weight, need_bias):
    io = _Io(spec)
    gd, xd, wd = io.inputs(g, x if need_weight else None, w if need_input else None)
    dx = dw = db = None
    if need_input:
        dx = io.output(_direct_backward_input(gd, wd, spec, io))
    if need_weight:
        dw = io.output(_direct_backward_weight(gd, xd, spec, io))
    if need_bias:
        db = io.output(_bias_grad(gd, spec, io))
    return dx, dw, db
