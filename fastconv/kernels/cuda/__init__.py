"""conv2d and max-pool on an NVIDIA GPU through Numba CUDA: cuda-naive, cuda-im2col, cuda-direct.

Inputs are already validated (see fastconv._validate). Host arrays arrive C-contiguous in
``spec.dtype``; they are copied to the device and the results copied back. Device arrays
(anything with ``__cuda_array_interface__``) are used where they are: a non-contiguous one is
copied once on the device, and the results stay on the device as Numba device arrays.

This module imports no part of ``numba.cuda`` until a kernel is first needed, so it imports on a
machine without a GPU or a CUDA toolkit. Only the core API is used (``cuda.jit``, ``cuda.grid``,
shared and local arrays, ``syncthreads``, ``to_device``, ``device_array``; on a GPU, results come
from a pool of recycled blocks, see ``_devpool``), so the same code runs
on Numba's built-in CUDA target, on the ``numba-cuda`` package and in the simulator
(``NUMBA_ENABLE_CUDASIM=1``).

The three algorithms
--------------------
cuda-naive
    One thread per output element (a grid-stride loop), straight loops, float64 accumulation.
    Backward: dx gathers per input pixel, dw one thread per weight element; the max-pool
    backward walks each (n, c) plane serially, so any indices work. (grad-bias, for every
    method: a block per channel, its threads' partial sums added in order by thread 0.)
cuda-im2col
    An im2col kernel writes the unfolded input ``col[n, (c, p, q), (i, j)]`` (in chunks of
    images), then a batched shared-memory tiled GEMM with register blocking (each thread keeps a
    TM x TN block of C in registers) computes ``out[n, g] = W[g] @ col[n, g]``. grad-input is
    ``W[g]^T @ grad_out[n, g]`` followed by a col2im that gathers per input pixel; grad-weight
    is split-K: ``grad_out[n, g] @ col[n, g]^T`` per image (and per chunk of positions) into a
    partials buffer, summed in a fixed order by a reduction kernel.
cuda-direct
    A block owns a tile of output pixels of one image and KB output channels; it stages the input
    tile (with its halo) for CB input channels and the matching weights in shared memory, and
    each thread accumulates RY x RX pixels x KB channels in registers. grad-input is the same
    structure run backwards (a tile of dx gathers from a shared tile of grad_out); grad-weight
    stages grad_out and input tiles and each thread owns some (c, p, q) taps for KB output
    channels, over a split of the (image, tile) pairs, followed by a fixed-order reduction.

Each sum runs in a fixed order and launch configurations depend only on the problem, not on
the GPU model, so results are deterministic, with one exception: cuda-direct's max-pool
backward, after its deterministic gather, adds with ``cuda.atomic.add`` the gradients whose
index lies in the plane but outside their own window (``_pool_strays_kernel``). max_pool2d
never returns such indices; a caller's may, and where several of them land on one pixel the
order of those additions, and so the last bits of that pixel, may vary. Kernels are compiled per
problem geometry (kernel size, stride, dilation and tile configuration are compile-time
constants) on first use in a process.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading

import numpy as np

from . import _devpool

__all__ = [
    "conv2d_forward_naive", "conv2d_backward_naive",
    "conv2d_forward_im2col", "conv2d_backward_im2col",
    "conv2d_forward_direct", "conv2d_backward_direct",
    "max_pool2d_forward_naive", "max_pool2d_backward_naive",
    "max_pool2d_forward_direct", "max_pool2d_backward_direct",
    "empty_cache",
]

cuda = None  # numba.cuda, bound on first use; kernels look it up as a module global

_TPB = 256  # threads per block of the elementwise kernels
_TARGET_BLOCKS = 512  # blocks a split-K launch aims for (fixed: results never depend on the GPU)
_WORKSPACE_ELEMS = 64 * 2**20  # at most this many elements in an im2col / partials buffer
_SHARED_BYTES = 48 * 1024  # static shared memory a block may use without opting in


def _cuda():
    global cuda
    if cuda is None:
        from numba import cuda as numba_cuda

        cuda = numba_cuda
    return cuda


def _sim():
    """True under NUMBA_ENABLE_CUDASIM=1 (Python threads, slow: keep launches small there)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _nbtype(dtype):
    from numba import from_dtype

    return from_dtype(np.dtype(dtype))


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# arrays: host <-> device, contiguity, workspaces


class _Io:
    """Moves a call's arrays to the device and its results back, as the inputs were given."""

    def __init__(self, spec):
        self.on_device = spec.on_device
        self.dtype = np.dtype(spec.dtype)
        _cuda()

    def inputs(self, *arrays):
        return tuple(None if a is None else self._to_device(a) for a in arrays)

    def _to_device(self, a):
        if not self.on_device:  # C-contiguous already; size-1 axes may carry odd strides
            d = _empty(a.shape, a.dtype)
            d.copy_to_device(a if _canonical(a) else a.copy(order="C"))
            return d
        if getattr(a, "__cuda_ndarray__", False):  # a Numba device array (or the simulator's)
            d = a
        else:  # CuPy, PyTorch, ...: a Numba view of the same memory
            d = cuda.as_cuda_array(a)
        return d if _canonical(d) else _contiguous_copy(d)

    def output(self, d):
        return d if self.on_device else d.copy_to_host()

    def empty(self, shape, dtype=None):
        return _empty(shape, self.dtype if dtype is None else dtype)


def _c_strides(shape, itemsize):
    """The strides of a fresh C-contiguous array."""
    strides, step = [], itemsize
    for dim in reversed(tuple(shape)):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _canonical(a):
    """C-contiguous with the strides of a fresh array (what device-array reshapes need)."""
    return tuple(a.strides) == _c_strides(a.shape, np.dtype(a.dtype).itemsize)


def _contiguous_copy(d):
    """A C-contiguous copy, made on the device, of a strided device array."""
    out = _empty(d.shape, d.dtype)
    if d.ndim == 1:
        _launch_flat(_elementwise().copy1, d.shape[0], d, out)
    elif d.ndim == 4:
        _launch_flat(_elementwise().copy4, int(np.prod(d.shape)), d, out)
    else:  # pragma: no cover - the validators only pass 1-D and 4-D arrays
        raise ValueError(f"unexpected {d.ndim}-D device array")
    return out


_pool = None  # a _devpool.BlockPool once the first array is made; False when not used
_pool_off_reason = ""
_live: dict = {}  # token -> the pointer of a pooled array, alive until its last view is gone
_tokens = itertools.count()


def _get_pool():
    global _pool, _pool_off_reason
    if _pool is None:
        limit = _devpool.limit_from_env()
        if _sim():
            _pool, _pool_off_reason = False, "the CUDA simulator"
        elif limit == 0:
            _pool, _pool_off_reason = False, "FASTCONV_CUDA_POOL_MB=0"
        elif _per_thread_default_streams():
            # each thread's default stream would order only that thread's kernels: a block
            # freed in one thread could be written by another while still being read
            _pool, _pool_off_reason = False, "per-thread default streams"
        else:
            _pool = _devpool.BlockPool(limit)
    return _pool


def _per_thread_default_streams():
    from numba import config

    env = os.environ.get("NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM", "0").strip()
    return bool(getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", 0)) or env not in ("", "0")


def _context_key(ctx):
    h = ctx.handle
    return getattr(h, "value", None) or int(h)


def _allocate(ctx, pool, size):
    """A fresh block; when the device is full, the pool's idle blocks are freed first."""
    try:
        return ctx.memalloc(size)
    except Exception:  # out of memory (CudaAPIError): Numba retries after its pending frees
        if not pool.idle:
            raise
        pool.clear()
        return ctx.memalloc(size)


def _empty(shape, dtype):
    """``cuda.device_array(shape, dtype)``, its memory from the pool (see fastconv.kernels.
    _devpool): an array built the way Numba builds its own, with a finalizer that hands the
    block back instead of freeing it."""
    global _pool, _pool_off_reason
    dtype = np.dtype(dtype)
    shape = tuple(int(v) for v in shape) if isinstance(shape, tuple) else (int(shape),)
    nbytes = math.prod(shape) * dtype.itemsize
    pool = _get_pool()
    if not pool or nbytes == 0:
        return cuda.device_array(shape, dtype=dtype)
    try:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.cudadrv.driver import AutoFreePointer
    except ImportError as e:  # a Numba without these internals: allocate plainly
        _pool, _pool_off_reason = False, f"Numba's internals differ ({e})"
        return cuda.device_array(shape, dtype=dtype)
    size = _devpool.rounded(nbytes)
    ctx = cuda.current_context()
    key = _context_key(ctx)
    block = pool.take(key, size)
    try:
        pointer = block.device_pointer if block is not None else None
    except ReferenceError:  # its context was closed meanwhile
        pointer = None
    if pointer is None:
        block = _allocate(ctx, pool, size)
        pointer = block.device_pointer
    token = next(_tokens)

    def release():
        _live.pop(token, None)
        pool.give(key, size, block)

    # the array's own size, not the block's: Numba copies that many bytes to and from it
    mem = AutoFreePointer(ctx, pointer, nbytes, finalizer=release)
    _live[token] = mem  # as Numba's context keeps its allocations: refcounts decide the end
    return DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype, gpu_data=mem.own())


def empty_cache():
    """Free the idle blocks of the CUDA methods' memory pool (arrays in use stay)."""
    if _pool:
        _pool.clear()


_local = threading.local()


def _workspace(name, shape, dtype):
    """A scratch device array, reused between calls of one Python thread (never returned)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    size = int(np.prod(shape))
    buf = cache.get(name)
    if buf is None or buf.dtype != np.dtype(dtype) or buf.shape[0] < size:
        cache[name] = buf = _empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


def _dummy(dtype):
    """A stand-in for an absent bias (kernels take arrays, not None)."""
    return _empty(1, dtype)


def _launch_flat(kernel, total, *args):
    """Launch a grid-stride kernel over ``total`` items: one thread per item on a GPU."""
    if _sim():
        kernel[2, 4](*args)
    else:
        kernel[max(1, min(_cdiv(total, _TPB), 2**20)), _TPB](*args)


# ---------------------------------------------------------------------------------------------
# elementwise and reduction kernels shared by the methods


@functools.cache
def _elementwise():
    _cuda()

    @cuda.jit
    def copy1(src, dst):
        for t in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
            dst[t] = src[t]

    @cuda.jit
    def copy4(src, dst):
        d1, d2, d3 = dst.shape[1], dst.shape[2], dst.shape[3]
        for t in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
            a = t // (d1 * d2 * d3)
            r = t - a * (d1 * d2 * d3)
            b = r // (d2 * d3)
            r -= b * (d2 * d3)
            c = r // d3
            dst[a, b, c, r - c * d3] = src[a, b, c, r - c * d3]

    @cuda.jit
    def bias_grad(g, db):
        """db[k] = sum of g[:, k]: a block per channel; thread 0 adds the partial sums in order."""
        n_batch, k_out, oh, ow = g.shape
        plane = oh * ow
        buf = cuda.shared.array(_TPB, np.float64)
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, k_out, cuda.gridDim.x):
            acc = 0.0
            for e in range(tid, n_batch * plane, cuda.blockDim.x):
                n = e // plane
                r = e - n * plane
                i = r // ow
                acc += g[n, k, i, r - i * ow]
            buf[tid] = acc
            cuda.syncthreads()
            if tid == 0:
                for t in range(1, cuda.blockDim.x):
                    acc += buf[t]
                db[k] = acc
            cuda.syncthreads()

    return _ns(copy1=copy1, copy4=copy4, bias_grad=bias_grad)


def _ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def _bias_grad(gd, spec):
    db = _empty(spec.w_shape[0], spec.dtype)
    blocks = min(spec.w_shape[0], 2 if _sim() else 65535)
    _elementwise().bias_grad[blocks, 4 if _sim() else _TPB](gd, db)
    return db


def _conv_args(spec):
    (pt, _), (pl, _) = spec.padding
    return (*spec.stride, pt, pl, *spec.dilation, spec.groups)


@functools.cache
def _window_empty_fn():
    """Device function: whether pool window ``i`` along an axis holds no pixel of a ``size``
    axis (every tap in the padding), for kernel ``k``, stride ``s``, padding ``p``, dilation
    ``d``."""
    _cuda()

    @cuda.jit(device=True)
    def window_empty(i, size, k, s, p, d):
        for t in range(k):
            if 0 <= i * s - p + t * d < size:
                return False
        return True

    return window_empty


# ---------------------------------------------------------------------------------------------
# cuda-naive


@functools.cache
def _naive():
    _cuda()
    _window_empty = _window_empty_fn()

    @cuda.jit
    def forward(x, w, b, out, sh, sw, pt, pl, dh, dw, groups, has_bias):
        _, _, h, wd = x.shape
        k_out, cg, kh, kw = w.shape
        oh, ow = out.shape[2], out.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            o = r % k_out
            n = r // k_out
            c0 = (o // kg) * cg
            acc = 0.0
            for c in range(cg):
                for p in range(kh):
                    row = i * sh - pt + p * dh
                    if row < 0 or row >= h:
                        continue
                    for q in range(kw):
                        col = j * sw - pl + q * dw
                        if 0 <= col < wd:
                            acc += x[n, c0 + c, row, col] * w[o, c, p, q]
            if has_bias:
                acc += b[o]
            out[n, o, i, j] = acc

    @cuda.jit
    def backward_input(g, w, dx, sh, sw, pt, pl, dh, dw, groups):
        """dx gathers, per input pixel, every (output, tap) pair that read it."""
        _, c_in, h, wd = dx.shape
        k_out, cg, kh, kw = w.shape
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
            col = t % wd
            r = t // wd
            row = r % h
            r //= h
            c = r % c_in
            n = r // c_in
            grp = c // cg
            cl = c - grp * cg
            acc = 0.0
            for ol in range(kg):
                o = grp * kg + ol
                for p in range(kh):
                    ti = row + pt - p * dh
                    if ti < 0 or ti % sh != 0 or ti // sh >= oh:
                        continue
                    i = ti // sh
                    for q in range(kw):
                        tj = col + pl - q * dw
                        if tj < 0 or tj % sw != 0 or tj // sw >= ow:
                            continue
                        acc += g[n, o, i, tj // sw] * w[o, cl, p, q]
            dx[n, c, row, col] = acc

    @cuda.jit
    def backward_weight(g, x, dwt, sh, sw, pt, pl, dh, dw, groups):
        n_batch, _, h, wd = x.shape
        k_out, cg, kh, kw = dwt.shape
        oh, ow = g.shape[2], g.shape[3]
        kg = k_out // groups
        for t in range(cuda.grid(1), dwt.size, cuda.gridsize(1)):
            q = t % kw
            r = t // kw
            p = r % kh
            r //= kh
            c = r % cg
            o = r // cg
            c0 = (o // kg) * cg
            acc = 0.0
            for n in range(n_batch):
                for i in range(oh):
                    row = i * sh - pt + p * dh
                    if row < 0 or row >= h:
                        continue
                    for j in range(ow):
                        col = j * sw - pl + q * dw
                        if 0 <= col < wd:
                            acc += g[n, o, i, j] * x[n, c0 + c, row, col]
            dwt[o, c, p, q] = acc

    @cuda.jit
    def pool_forward(x, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
        _, chans, h, wd = x.shape
        oh, ow = out.shape[2], out.shape[3]
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            j = t % ow
            r = t // ow
            i = r % oh
            r //= oh
            c = r % chans
            n = r // chans
            r0 = i * sh - ph
            while r0 < 0:  # the first tap inside the input, where PyTorch starts its index
                r0 += dh
            c0 = j * sw - pw
            while c0 < 0:
                c0 += dw
            best = -math.inf
            arg = r0 * wd + c0
            for p in range(kh):
                row = i * sh - ph + p * dh
                if row < 0 or row >= h:
                    continue
                for q in range(kw):
                    col = j * sw - pw + q * dw
                    if col < 0 or col >= wd:
                        continue
                    v = x[n, c, row, col]
                    # strictly greater keeps the first maximum; the first NaN wins
                    if v > best or (v != v and best == best):
                        best = v
                        arg = row * wd + col
            out[n, c, i, j] = best
            idx[n, c, i, j] = arg

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

    return _ns(forward=forward, backward_input=backward_input, backward_weight=backward_weight,
               pool_forward=pool_forward, pool_backward=pool_backward)


def conv2d_forward_naive(x, w, b, spec):
    io = _Io(spec)
    xd, wd, bd = io.inputs(x, w, b)
    out = io.empty(spec.out_shape)
    _launch_flat(_naive().forward, out.size, xd, wd, _dummy(spec.dtype) if bd is None else bd,
                 out, *_conv_args(spec), bd is not None)
    return io.output(out)


def conv2d_backward_naive(g, x, w, spec, need_input, need_weight, need_bias):
    io = _Io(spec)
    gd, xd, wd = io.inputs(g, x if need_weight else None, w if need_input else None)
    dx = dw = db = None
    if need_input:
        dx = io.empty(spec.x_shape)
        _launch_flat(_naive().backward_input, dx.size, gd, wd, dx, *_conv_args(spec))
        dx = io.output(dx)
    if need_weight:
        dw = io.empty(spec.w_shape)
        _launch_flat(_naive().backward_weight, dw.size, gd, xd, dw, *_conv_args(spec))
        dw = io.output(dw)
    if need_bias:
        db = io.output(_bias_grad(gd, spec))
    return dx, dw, db


def _pool_args(spec):
    return (*spec.kernel, *spec.stride, *spec.padding, *spec.dilation)


def max_pool2d_forward_naive(x, spec, return_indices):
    io = _Io(spec)
    (xd,) = io.inputs(x)
    out = io.empty(spec.out_shape)
    idx = io.empty(spec.out_shape, np.int64)
    _launch_flat(_naive().pool_forward, out.size, xd, out, idx, *_pool_args(spec))
    return io.output(out), (io.output(idx) if return_indices else None)


def max_pool2d_backward_naive(g, idx, spec):
    io = _Io(spec)
    gd, idd = io.inputs(g, idx)
    dx = io.empty(spec.x_shape)
    _launch_flat(_naive().pool_backward, spec.x_shape[0] * spec.x_shape[1], gd, idd, dx,
                 *_pool_args(spec))
    return io.output(dx)


# ---------------------------------------------------------------------------------------------
# cuda-im2col: unfold, then a tiled GEMM


@functools.cache
def _unfold():
    _cuda()

    @cuda.jit
    def im2col(x, col, n0, kh, kw, sh, sw, pt, pl, dh, dw, ow):
        """col[n, (c, p, q), (i, j)] = x[n0 + n, c, i*sh - pt + p*dh, j*sw - pl + q*dw] or 0.

        Threads span (j, i) of the output; the grid's z axis walks the (n, c) planes, and each
        thread writes the kh*kw rows of its pixel.
        """
        _, c_in, h, wd = x.shape
        m, npix = col.shape[0], col.shape[2]
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        if i * ow + j < npix and j < ow:
            for z in range(cuda.blockIdx.z, m * c_in, cuda.gridDim.z):
                n = z // c_in
                c = z - n * c_in
                for p in range(kh):
                    row = i * sh - pt + p * dh
                    for q in range(kw):
                        colx = j * sw - pl + q * dw
                        v = 0.0
                        if 0 <= row < h and 0 <= colx < wd:
                            v = x[n0 + n, c, row, colx]
                        col[n, (c * kh + p) * kw + q, i * ow + j] = v

    @cuda.jit
    def col2im(dcol, dx, n0, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow):
        """dx[n0 + n, c, y, x] gathers dcol[n, (c, p, q), (i, j)] over the taps that read it."""
        _, c_in, h, wd = dx.shape
        taps = kh * kw
        m = dcol.shape[0]
        for t in range(cuda.grid(1), m * c_in * h * wd, cuda.gridsize(1)):
            xx = t % wd
            r = t // wd
            y = r % h
            r //= h
            c = r % c_in
            n = r // c_in
            acc = 0.0  # float64: a few terms, and exact enough for any dtype
            for p in range(kh):
                ti = y + pt - p * dh
                if ti < 0 or ti % sh != 0 or ti // sh >= oh:
                    continue
                i = ti // sh
                for q in range(kw):
                    tj = xx + pl - q * dw
                    if tj < 0 or tj % sw != 0 or tj // sw >= ow:
                        continue
                    acc += dcol[n, c * taps + p * kw + q, i * ow + tj // sw]
            dx[n0 + n, c, y, xx] = acc

    @cuda.jit
    def reduce_weight(partial, dwt, groups, n_batch, nsplit):
        """dwt[g*kg + m, r] = sum over (n, s) of partial[(n*groups + g)*nsplit + s, m, r]."""
        k_out, rows = dwt.shape
        kg = k_out // groups
        for t in range(cuda.grid(1), k_out * rows, cuda.gridsize(1)):
            o = t // rows
            r = t - o * rows
            grp = o // kg
            m = o - grp * kg
            acc = 0.0
            for n in range(n_batch):
                base = (n * groups + grp) * nsplit
                for s in range(nsplit):
                    acc += partial[base + s, m, r]
            dwt[o, r] = acc

    return _ns(im2col=im2col, col2im=col2im, reduce_weight=reduce_weight)


# GEMM tile configurations (BM, BN, BK, TM, TN): a block computes a BM x BN tile of C with
# (BM/TM) x (BN/TN) threads, each holding TM x TN results in registers.
GEMM_CONFIGS = {
    "large": (128, 64, 16, 8, 4),
    "medium": (64, 64, 16, 4, 4),
    "narrow": (32, 128, 16, 2, 8),  # few rows of C (few output channels per group)
    "square": (128, 128, 8, 8, 8),
    "wide": (64, 128, 16, 4, 8),
}


def _pow2(v, cap):
    return min(cap, 1 << max(0, int(v) - 1).bit_length())


def _gemm_config(m, n):
    if _sim():  # 2 x 2 threads and few blocks: each block and syncthreads costs ms there
        bm, bn = _pow2(max(m, 2), 16), _pow2(max(n, 2), 64)
        return bm, bn, 8, bm // 2, bn // 2
    if m <= 32:
        return GEMM_CONFIGS["narrow"]
    if m >= 128 and n >= 256:
        return GEMM_CONFIGS["large"]
    return GEMM_CONFIGS["medium"]


@functools.cache
def _gemm_kernel(dtype, bm, bn, bk, tm, tn, ta, tb):
    """C[z] = op(A[za]) @ op(B[zb]) (+ bias), batched and split along K over blockIdx.z.

    A is (BA, M, K), or (BA, K, M) when ``ta``; B is (BB, K, N), or (BB, N, K) when ``tb``;
    C is (batch * nsplit, M, N). Block z = bz * nsplit + s computes the K range of split s of
    batch bz, reading A[bz % BA] and B[bz % BB].
    """
    _cuda()
    nbt = _nbtype(dtype)
    zero = np.dtype(dtype).type(0)
    tx_n, ty_n = bn // tn, bm // tm
    nt = tx_n * ty_n
    assert (bm * bk) % nt == 0 and (bn * bk) % nt == 0, (bm, bn, bk, tm, tn)
    a_iters, b_iters = bm * bk // nt, bn * bk // nt
    # pad the row that the global loads walk along K, so their shared stores don't conflict
    a_shape = (bk, bm + (0 if ta else 1))
    b_shape = (bk, bn + (1 if tb else 0))
    acc_shape = (tm, tn)

    @cuda.jit
    def gemm(a, b, c, bias, has_bias, kchunk, nsplit, z0):
        m_size, n_size = c.shape[1], c.shape[2]
        k_size = a.shape[1] if ta else a.shape[2]
        z = cuda.blockIdx.z + z0
        bz = z // nsplit
        k_lo = (z - bz * nsplit) * kchunk
        k_hi = min(k_size, k_lo + kchunk)
        za = bz % a.shape[0]
        zb = bz % b.shape[0]
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tx_n + tx
        a_s = cuda.shared.array(a_shape, nbt)
        b_s = cuda.shared.array(b_shape, nbt)
        acc = cuda.local.array(acc_shape, nbt)
        a_r = cuda.local.array(tm, nbt)
        b_r = cuda.local.array(tn, nbt)
        a_pf = cuda.local.array(a_iters, nbt)
        b_pf = cuda.local.array(b_iters, nbt)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = zero
        # software pipelining: the global loads of tile t are in flight (in registers) while
        # the block multiplies tile t - 1 out of shared memory
        for k0 in range(k_lo, k_hi + bk, bk):
            if k0 > k_lo:
                for it in range(a_iters):
                    e = tid + it * nt
                    if ta:
                        a_s[e // bm, e - (e // bm) * bm] = a_pf[it]
                    else:
                        a_s[e - (e // bk) * bk, e // bk] = a_pf[it]
                for it in range(b_iters):
                    e = tid + it * nt
                    if tb:
                        b_s[e - (e // bk) * bk, e // bk] = b_pf[it]
                    else:
                        b_s[e // bn, e - (e // bn) * bn] = b_pf[it]
                cuda.syncthreads()
            if k0 < k_hi:
                for it in range(a_iters):
                    e = tid + it * nt
                    if ta:  # stored (K, M): consecutive threads walk M
                        kk = e // bm
                        mm = e - kk * bm
                        v = zero
                        if m0 + mm < m_size and k0 + kk < k_hi:
                            v = a[za, k0 + kk, m0 + mm]
                    else:  # stored (M, K): consecutive threads walk K
                        mm = e // bk
                        kk = e - mm * bk
                        v = zero
                        if m0 + mm < m_size and k0 + kk < k_hi:
                            v = a[za, m0 + mm, k0 + kk]
                    a_pf[it] = v
                for it in range(b_iters):
                    e = tid + it * nt
                    if tb:  # stored (N, K)
                        nn = e // bk
                        kk = e - nn * bk
                        v = zero
                        if n0 + nn < n_size and k0 + kk < k_hi:
                            v = b[zb, n0 + nn, k0 + kk]
                    else:  # stored (K, N)
                        kk = e // bn
                        nn = e - kk * bn
                        v = zero
                        if n0 + nn < n_size and k0 + kk < k_hi:
                            v = b[zb, k0 + kk, n0 + nn]
                    b_pf[it] = v
            if k0 > k_lo:
                for kk in range(bk):
                    for i in range(tm):
                        a_r[i] = a_s[kk, ty + i * ty_n]
                    for j in range(tn):
                        b_r[j] = b_s[kk, tx + j * tx_n]
                    for i in range(tm):
                        for j in range(tn):
                            acc[i, j] += a_r[i] * b_r[j]
                cuda.syncthreads()
        for i in range(tm):
            m = m0 + ty + i * ty_n
            if m < m_size:
                for j in range(tn):
                    n = n0 + tx + j * tx_n
                    if n < n_size:
                        v = acc[i, j]
                        if has_bias:
                            v += bias[za * m_size + m]
                        c[z, m, n] = v

    return gemm


def _gemm(a, b, c, ta, tb, nsplit=1, bias=None):
    """Launch the batched GEMM: c has shape (batch * nsplit, M, N)."""
    m_size, n_size = c.shape[1], c.shape[2]
    k_size = a.shape[1] if ta else a.shape[2]
    bm, bn, bk, tm, tn = _gemm_config(m_size, n_size)
    kern = _gemm_kernel(str(c.dtype), bm, bn, bk, tm, tn, ta, tb)
    kchunk = _cdiv(_cdiv(k_size, nsplit), bk) * bk
    bias_arg = _dummy(c.dtype) if bias is None else bias
    nz = c.shape[0]
    for z0 in range(0, nz, 65535):
        grid = (_cdiv(n_size, bn), _cdiv(m_size, bm), min(65535, nz - z0))
        kern[grid, (bn // tn, bm // tm)](a, b, c, bias_arg, bias is not None, kchunk, nsplit, z0)


def _im2col(xd, col, n0, spec):
    """Launch im2col over col's images: a thread per output pixel, z over (image, channel)."""
    oh, ow = spec.out_hw
    if _sim():
        tx, ty, planes = 2, 2, 2
    else:
        tx = min(32, _pow2(ow, 32))
        ty, planes = _TPB // tx, 65535
    grid = (_cdiv(ow, tx), min(_cdiv(oh, ty), 65535), min(col.shape[0] * spec.x_shape[1], planes))
    _unfold().im2col[grid, (tx, ty)](xd, col, n0, *_unfold_args(spec), ow)


def _image_chunk(spec, per_image):
    n = spec.x_shape[0]
    if _sim():
        return max(1, min(n, 1))
    return max(1, min(n, _WORKSPACE_ELEMS // max(per_image, 1)))


def _unfold_args(spec):
    (pt, _), (pl, _) = spec.padding
    return (*spec.w_shape[2:], *spec.stride, pt, pl, *spec.dilation)


def conv2d_forward_im2col(x, w, b, spec):
    io = _Io(spec)
    xd, wd, bd = io.inputs(x, w, b)
    n_batch, c_in = spec.x_shape[:2]
    k_out, cg, kh, kw = spec.w_shape
    groups, (oh, ow) = spec.groups, spec.out_hw
    npix, rows = oh * ow, cg * kh * kw
    out = io.empty(spec.out_shape)
    a = wd.reshape(groups, k_out // groups, rows)
    chunk = _image_chunk(spec, c_in * kh * kw * npix)
    col = _workspace("col", (chunk, c_in * kh * kw, npix), spec.dtype)
    for n0 in range(0, n_batch, chunk):
        m = min(chunk, n_batch - n0)
        colv = col[:m]
        _im2col(xd, colv, n0, spec)
        _gemm(a, colv.reshape(m * groups, rows, npix),
              out[n0:n0 + m].reshape(m * groups, k_out // groups, npix), False, False,
              bias=bd)
    return io.output(out)


def _split_k(batches, tiles, k_size, bk):
    """How many K-splits give about _TARGET_BLOCKS blocks (at least 2*bk of K per split)."""
    if _sim():
        return 2 if k_size > 2 * bk else 1
    want = _cdiv(_TARGET_BLOCKS, max(batches * tiles, 1))
    return max(1, min(want, k_size // (2 * bk)))


def conv2d_backward_im2col(g, x, w, spec, need_input, need_weight, need_bias):
    io = _Io(spec)
    gd, xd, wd = io.inputs(g, x if need_weight else None, w if need_input else None)
    n_batch, c_in, h, wdt = spec.x_shape
    k_out, cg, kh, kw = spec.w_shape
    groups, (oh, ow) = spec.groups, spec.out_hw
    kg, npix, rows = k_out // groups, oh * ow, cg * kh * kw
    (pt, _), (pl, _) = spec.padding
    chunk = _image_chunk(spec, c_in * kh * kw * npix)
    dx = dw = db = None
    if need_input:
        dx = io.empty(spec.x_shape)
        a = wd.reshape(groups, kg, rows)
        dcol = _workspace("col", (chunk, c_in * kh * kw, npix), spec.dtype)
        for n0 in range(0, n_batch, chunk):
            m = min(chunk, n_batch - n0)
            dcolv = dcol[:m]
            _gemm(a, gd[n0:n0 + m].reshape(m * groups, kg, npix),
                  dcolv.reshape(m * groups, rows, npix), True, False)
            _launch_flat(_unfold().col2im, m * c_in * h * wdt, dcolv, dx, n0, kh, kw,
                         *spec.stride, pt, pl, *spec.dilation, oh, ow)
        dx = io.output(dx)
    if need_weight:
        bm, bn, bk, _, _ = _gemm_config(kg, rows)
        nsplit = _split_k(n_batch * groups, _cdiv(kg, bm) * _cdiv(rows, bn), npix, bk)
        nsplit = max(1, min(nsplit, _WORKSPACE_ELEMS // (n_batch * k_out * rows)))
        partial = _workspace("partial", (n_batch * groups * nsplit, kg, rows), spec.dtype)
        col = _workspace("col", (chunk, c_in * kh * kw, npix), spec.dtype)
        for n0 in range(0, n_batch, chunk):
            m = min(chunk, n_batch - n0)
            colv = col[:m]
            _im2col(xd, colv, n0, spec)
            _gemm(gd[n0:n0 + m].reshape(m * groups, kg, npix),
                  colv.reshape(m * groups, rows, npix),
                  partial[n0 * groups * nsplit:(n0 + m) * groups * nsplit], False, True,
                  nsplit=nsplit)
        dw = io.empty(spec.w_shape)
        _launch_flat(_unfold().reduce_weight, k_out * rows, partial, dw.reshape(k_out, rows),
                     groups, n_batch, nsplit)
        dw = io.output(dw)
    if need_bias:
        db = io.output(_bias_grad(gd, spec))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# cuda-direct: shared-memory tiles, several output channels per thread


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
    _cuda()
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
    _cuda()
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
    _cuda()
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
    _cuda()

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


def _tiles(hw, th, tw):
    tiles_w = _cdiv(hw[1], tw)
    return tiles_w, _cdiv(hw[0], th) * tiles_w


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
        _launch_flat(_naive().backward_input, dx.size, gd, wd, dx, *_conv_args(spec))
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
        _launch_flat(_naive().backward_weight, dw_out.size, gd, xd, dw_out, *_conv_args(spec))
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
        db = io.output(_bias_grad(gd, spec))
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# cuda-direct max-pool: shared-memory tiles of one plane


POOL_CONFIGS = {"default": (4, 32, 2), "sim": (2, 4, 2)}  # (TPY, TPX, RY)


@functools.cache
def _pool_forward_kernel(dtype, kh, kw, sh, sw, dh, dw, tpy, tpx, ry):
    _cuda()
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
    _cuda()
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
    _cuda()
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
    _launch_flat(_pool_strays_kernel(), gd.size, gd, idd, dx, *_pool_args(spec))
    return io.output(dx)
