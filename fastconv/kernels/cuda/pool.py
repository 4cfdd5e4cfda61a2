"""max-pool on the GPU: cuda-naive and cuda-direct.

cuda-naive
    One thread per output element, straight loops. Backward: one thread per (n, c) plane walks
    its outputs in order, so any indices work.
cuda-direct
    Forward: a block stages a tile of one plane, with its halo, in shared memory (``-inf`` in
    the padding) and each thread takes RY outputs. Backward: each input pixel gathers, from a
    shared tile of grad_out and indices, the gradients of the windows whose index chose it;
    then ``_pool_strays_kernel`` adds, with ``cuda.atomic.add``, those whose index lies in the
    plane but outside its own window. max_pool2d never returns such indices, so for its indices
    the result is deterministic; with a caller's, several landing on one pixel add in any
    order. A window too large for a shared tile runs the cuda-naive kernels.
"""

from __future__ import annotations

import functools

import numpy as np

from ._common import (_SHARED_BYTES, _cuda, _launch_flat, _nbtype, _ns, _sim,
                      _tiles)
from ._memory import _Io
from .. import _window
from .._window import box_windows

cuda = None  # numba.cuda, bound by _cuda(globals()) on first use


@functools.cache
def _window_empty_fn():
    """Device function: whether pool window ``i`` along an axis holds no pixel of a ``size``
    axis (every tap in the padding), for kernel ``k``, stride ``s``, padding ``p``, dilation
    ``d``."""
    _cuda(globals())

    @cuda.jit(device=True)
    def window_empty(i, size, k, s, p, d):
        for t in range(k):
            if 0 <= i * s - p + t * d < size:
                return False
        return True

    return window_empty


# ---------------------------------------------------------------------------------------------
# cuda-naive max-pool


@functools.cache
def _naive_pool():
    _cuda(globals())
    _window_empty = _window_empty_fn()

    window_max = cuda.jit(device=True)(_window.window_max)

    @cuda.jit
    def pool_forward(xf, h, wd, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
        """xf: the input planes of h x wd, flat; one thread per output (a grid-stride loop)."""
        _, chans, oh, ow = out.shape
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            c = r % chans
            n = r // chans
            out[n, c, i, j], idx[n, c, i, j] = window_max(
                xf, (n * chans + c) * h * wd, h, wd, i, j, kh, kw, sh, sw, ph, pw, dh, dw)

    @cuda.jit
    def pool_backward(g, idx, dx, kh, kw, sh, sw, ph, pw, dh, dw):
        """One thread per (n, c) plane walks its outputs in order: exact for any indices. A
        window lying wholly in the padding routes nothing, whatever its index."""
        _, chans, oh, ow = g.shape
        h, wd = dx.shape[2], dx.shape[3]
        for t in range(cuda.grid(1), g.shape[0] * chans, cuda.gridsize(1)):
            n = t // chans
            c = t - n * chans
            for k in range(h * wd):
                dx[n, c, k // wd, k % wd] = 0
            for i in range(oh):
                if _window_empty(i, h, kh, sh, ph, dh):
                    continue
                for j in range(ow):
                    k = idx[n, c, i, j]
                    if 0 <= k < h * wd and not _window_empty(j, wd, kw, sw, pw, dw):
                        dx[n, c, k // wd, k % wd] += g[n, c, i, j]

    return _ns(pool_forward=pool_forward, pool_backward=pool_backward)


def max_pool2d_forward_naive(x, spec, return_indices):
    io = _Io(spec)
    (xd,) = io.inputs(x)
    out = io.empty(spec.out_shape)
    idx = io.empty(spec.out_shape, np.int64)
    _launch_flat(_naive_pool().pool_forward, out.size, xd.reshape(-1), *spec.x_shape[2:], out,
                 idx, *spec.loop_args)
    return io.output(out), (io.output(idx) if return_indices else None)


def max_pool2d_backward_naive(g, idx, spec):
    io = _Io(spec)
    gd, idd = io.inputs(g, idx)
    dx = io.empty(spec.x_shape)
    _launch_flat(_naive_pool().pool_backward, spec.x_shape[0] * spec.x_shape[1], gd, idd, dx,
                 *spec.loop_args)
    return io.output(dx)


# ---------------------------------------------------------------------------------------------
# cuda-direct max-pool: shared-memory tiles of one plane


POOL_CONFIGS = {"default": (4, 32, 2), "sim": (2, 4, 2)}  # (TPY, TPX, RY)


@functools.cache
def _pool_forward_kernel(dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry):
    _cuda(globals())
    nbt = _nbtype(dtype)
    neg_inf = np.dtype(dtype).type(-np.inf)
    th, tw = tpy * ry, tpx
    ih, iw = (th - 1) * sh + (kh - 1) * dh + 1, (tw - 1) * sw + (kw - 1) * dw + 1
    nt = tpy * tpx

    @cuda.jit
    def pool_forward(x, out, idx, ph, pw, tiles_w, tiles):
        _, chans, h, wd = x.shape
        oh, ow = out.shape[2], out.shape[3]
        plane = cuda.blockIdx.x // tiles
        tile = cuda.blockIdx.x - plane * tiles
        n = plane // chans
        c = plane - n * chans
        oy0 = (tile // tiles_w) * th
        ox0 = (tile - (tile // tiles_w) * tiles_w) * tw
        iy0 = oy0 * sh - ph
        ix0 = ox0 * sw - pw
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        xs = cuda.shared.array((ih, iw), nbt)
        for e in range(ty * tpx + tx, ih * iw, nt):
            yy = e // iw
            xx = e - yy * iw
            v = neg_inf
            if 0 <= iy0 + yy < h and 0 <= ix0 + xx < wd:
                v = x[n, c, iy0 + yy, ix0 + xx]
            xs[yy, xx] = v
        cuda.syncthreads()
        j = ox0 + tx
        for a in range(ry):
            i = oy0 + ty + a * tpy
            if i < oh and j < ow:
                r0 = i * sh - ph
                while r0 < 0:
                    r0 += dh
                c0 = j * sw - pw
                while c0 < 0:
                    c0 += dw
                best = neg_inf
                arg = r0 * wd + c0
                ly = (ty + a * tpy) * sh
                lx = tx * sw
                for p in range(kh):
                    for q in range(kw):
                        v = xs[ly + p * dh, lx + q * dw]
                        # padding holds -inf, which never beats best: the index stays inside
                        if v > best or (v != v and best == best):
                            best = v
                            arg = (iy0 + ly + p * dh) * wd + ix0 + lx + q * dw
                out[n, c, i, j] = best
                idx[n, c, i, j] = arg

    return pool_forward


@functools.cache
def _pool_backward_kernel(dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry):
    """dx gathers, per input pixel, the gradients of the windows that chose it."""
    _cuda(globals())
    nbt = _nbtype(dtype)
    zero = np.dtype(dtype).type(0)
    th, tw = tpy * ry, tpx
    gh, gw = (th - 1 + (kh - 1) * dh) // sh + 2, (tw - 1 + (kw - 1) * dw) // sw + 2
    nt = tpy * tpx

    @cuda.jit
    def pool_backward(g, idx, dx, ph, pw, tiles_w, tiles):
        _, chans, h, wd = dx.shape
        oh, ow = g.shape[2], g.shape[3]
        plane = cuda.blockIdx.x // tiles
        tile = cuda.blockIdx.x - plane * tiles
        n = plane // chans
        c = plane - n * chans
        y0 = (tile // tiles_w) * th
        x0 = (tile - (tile // tiles_w) * tiles_w) * tw
        gi0 = (y0 + ph - (kh - 1) * dh) // sh
        gj0 = (x0 + pw - (kw - 1) * dw) // sw
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        gs = cuda.shared.array((gh, gw), nbt)
        js = cuda.shared.array((gh, gw), np.int64)
        for e in range(ty * tpx + tx, gh * gw, nt):
            ii = e // gw
            jj = e - ii * gw
            v = zero
            k = -1
            if 0 <= gi0 + ii < oh and 0 <= gj0 + jj < ow:
                v = g[n, c, gi0 + ii, gj0 + jj]
                k = idx[n, c, gi0 + ii, gj0 + jj]
            gs[ii, jj] = v
            js[ii, jj] = k
        cuda.syncthreads()
        xo = x0 + tx
        for a in range(ry):
            y = y0 + ty + a * tpy
            if y < h and xo < wd:
                me = y * wd + xo
                acc = zero
                for p in range(kh):
                    ti = y + ph - p * dh
                    if ti % sh == 0:
                        for q in range(kw):
                            tj = xo + pw - q * dw
                            if tj % sw == 0:
                                ii = ti // sh - gi0
                                jj = tj // sw - gj0
                                if js[ii, jj] == me:
                                    acc += gs[ii, jj]
                dx[n, c, y, xo] = acc

    return pool_backward


@functools.cache
def _pool_strays_kernel():
    """Adds, after the gather, the gradients whose index lies in the plane but outside their
    own window (max_pool2d never makes them; a caller's indices may): atomically, since such
    indices may collide anywhere."""
    _cuda(globals())
    window_empty = _window_empty_fn()

    @cuda.jit(device=True)
    def on_tap(v, start, k, d):
        off = v - start
        return off >= 0 and off % d == 0 and off // d < k

    @cuda.jit
    def pool_strays(g, idx, dx, kh, kw, sh, sw, ph, pw, dh, dw):
        _, chans, oh, ow = g.shape
        h, wd = dx.shape[2], dx.shape[3]
        for t in range(cuda.grid(1), g.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            c = r % chans
            n = r // chans
            k = idx[n, c, i, j]
            if k < 0 or k >= h * wd:
                continue
            row = k // wd
            col = k - row * wd
            if on_tap(row, i * sh - ph, kh, dh) and on_tap(col, j * sw - pw, kw, dw):
                continue  # the gather routed it
            if window_empty(i, h, kh, sh, ph, dh) or window_empty(j, wd, kw, sw, pw, dw):
                continue
            cuda.atomic.add(dx, (n, c, row, col), g[n, c, i, j])

    return pool_strays


def _pool_tile(spec, gather):
    tpy, tpx, ry = POOL_CONFIGS["sim" if _sim() else "default"]
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.stride, spec.dilation
    th, tw = tpy * ry, tpx
    if gather:
        size = ((th - 1 + (kh - 1) * dh) // sh + 2) * ((tw - 1 + (kw - 1) * dw) // sw + 2)
        itemsize = np.dtype(spec.dtype).itemsize + 8
    else:
        size = ((th - 1) * sh + (kh - 1) * dh + 1) * ((tw - 1) * sw + (kw - 1) * dw + 1)
        itemsize = np.dtype(spec.dtype).itemsize
    fits = size * itemsize <= _SHARED_BYTES
    return (tpy, tpx, ry) if fits else None


def max_pool2d_forward_direct(x, spec, return_indices):
    cfg = _pool_tile(spec, gather=False)
    if cfg is None:  # a window too large for a shared tile
        return max_pool2d_forward_naive(x, spec, return_indices)
    io = _Io(spec)
    (xd,) = io.inputs(x)
    out = io.empty(spec.out_shape)
    idx = io.empty(spec.out_shape, np.int64)
    tpy, tpx, ry = cfg
    kern = _pool_forward_kernel(spec.dtype, *spec.kernel, *spec.stride, *spec.dilation, *cfg)
    tiles_w, tiles = _tiles(spec.out_hw, tpy * ry, tpx)
    n, c = spec.x_shape[:2]
    kern[n * c * tiles, (tpx, tpy)](xd, out, idx, *spec.padding, tiles_w, tiles)
    return io.output(out), (io.output(idx) if return_indices else None)


def max_pool2d_backward_direct(g, idx, spec):
    """Gathers per input pixel the gradients of the windows whose index chose it; then adds
    those whose index lies outside its own window (see _pool_strays_kernel)."""
    cfg = _pool_tile(spec, gather=True)
    if cfg is None:
        return max_pool2d_backward_naive(g, idx, spec)
    io = _Io(spec)
    gd, idd = io.inputs(g, idx)
    dx = io.empty(spec.x_shape)
    tpy, tpx, ry = cfg
    kern = _pool_backward_kernel(spec.dtype, *spec.kernel, *spec.stride, *spec.dilation, *cfg)
    tiles_w, tiles = _tiles(spec.x_shape[2:], tpy * ry, tpx)
    n, c = spec.x_shape[:2]
    kern[n * c * tiles, (tpx, tpy)](gd, idd, dx, *spec.padding, tiles_w, tiles)
    _launch_flat(_pool_strays_kernel(), gd.size, gd, idd, dx, *spec.loop_args)
    return io.output(dx)


# ---------------------------------------------------------------------------------------------
# average pools, fixed and adaptive windows alike (fastconv.kernels._window.box_windows).
# cuda-naive: a thread per output sums its window; backward, a thread per input pixel gathers
# the windows that contain it (their rows and columns are contiguous ranges). cuda-direct: a
# block per output sums a large window together (shared-memory reduction in a fixed order).

_REDUCE_THREADS = 128
_REDUCE_FROM = 64  # window elements from which a block per output pays


@functools.cache
def _box_kernels():
    _cuda(globals())

    @cuda.jit
    def forward(x, out, rows, cols):
        _, chans, oh, ow = out.shape
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            c = r % chans
            n = r // chans
            acc = 0.0
            for y in range(rows[i, 0], rows[i, 1]):
                for q in range(cols[j, 0], cols[j, 1]):
                    acc += x[n, c, y, q]
            out[n, c, i, j] = acc / (rows[i, 2] * cols[j, 2])

    @cuda.jit
    def backward(g, dx, rows, cols, row_users, col_users):
        _, chans, h, wd = dx.shape
        for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
            q = t % wd
            r = t // wd
            y = r % h
            r //= h
            c = r % chans
            n = r // chans
            acc = 0.0
            for i in range(row_users[y, 0], row_users[y, 1]):
                for j in range(col_users[q, 0], col_users[q, 1]):
                    acc += g[n, c, i, j] / (rows[i, 2] * cols[j, 2])
            dx[n, c, y, q] = acc

    @cuda.jit
    def forward_reduce(x, out, rows, cols):
        """A block per output: its threads take the window's elements in turn."""
        _, chans, oh, ow = out.shape
        part = cuda.shared.array(_REDUCE_THREADS, np.float64)
        t = cuda.blockIdx.x
        j = t % ow
        r = t // ow
        i = r % oh
        r //= oh
        c = r % chans
        n = r // chans
        r0, c0 = rows[i, 0], cols[j, 0]
        width = cols[j, 1] - c0
        size = (rows[i, 1] - r0) * width
        acc = 0.0
        for e in range(cuda.threadIdx.x, size, _REDUCE_THREADS):
            acc += x[n, c, r0 + e // width, c0 + e % width]
        part[cuda.threadIdx.x] = acc
        cuda.syncthreads()
        step = _REDUCE_THREADS // 2
        while step > 0:
            if cuda.threadIdx.x < step:
                part[cuda.threadIdx.x] += part[cuda.threadIdx.x + step]
            cuda.syncthreads()
            step //= 2
        if cuda.threadIdx.x == 0:
            out[n, c, i, j] = part[0] / (rows[i, 2] * cols[j, 2])

    return _ns(forward=forward, backward=backward, forward_reduce=forward_reduce)


def _tables(io, spec):
    t = box_windows(spec)
    return t, io.inputs(*(np.ascontiguousarray(a) for a in t))


def avg_pool2d_forward_naive(x, spec):
    io = _Io(spec)
    (xd,) = io.inputs(x)
    _, (rows, cols, _, _) = _tables(io, spec)
    out = io.empty(spec.out_shape)
    _launch_flat(_box_kernels().forward, out.size, xd, out, rows, cols)
    return io.output(out)


def avg_pool2d_backward(g, spec):
    """Both methods: a thread per input pixel gathers (deterministic, no atomics)."""
    io = _Io(spec)
    (gd,) = io.inputs(g)
    _, tables = _tables(io, spec)
    dx = io.empty(spec.x_shape)
    _launch_flat(_box_kernels().backward, dx.size, gd, dx, *tables)
    return io.output(dx)


def avg_pool2d_forward_direct(x, spec):
    t = box_windows(spec)
    largest = int((t.rows[:, 1] - t.rows[:, 0]).max()) * int((t.cols[:, 1] - t.cols[:, 0]).max())
    if largest < _REDUCE_FROM:
        return avg_pool2d_forward_naive(x, spec)
    io = _Io(spec)
    (xd,) = io.inputs(x)
    _, (rows, cols, _, _) = _tables(io, spec)
    out = io.empty(spec.out_shape)
    _box_kernels().forward_reduce[out.size, _REDUCE_THREADS](xd, out, rows, cols)
    return io.output(out)
