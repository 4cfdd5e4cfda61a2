"""What the CUDA modules share: ``numba.cuda`` bound on first use, launch constants and helpers,
the kernels' geometry arguments, and the elementwise kernels (device copies, grad-bias).

Kernels look ``cuda`` up as a global of the module that defines them. So every module starts
with ``cuda = None``, and every kernel factory calls ``_cuda(globals())`` before its
``@cuda.jit``: that binds the module there and leaves ``numba.cuda`` unimported until a kernel
is first needed.
"""

from __future__ import annotations

import functools

import numpy as np

from .._numba import cdiv as _cdiv

cuda = None  # numba.cuda, bound on first use

_TPB = 256  # threads per block of the elementwise kernels
_TARGET_BLOCKS = 512  # blocks a split-K launch aims for (fixed: results never depend on the GPU)
_WORKSPACE_ELEMS = 64 * 2**20  # at most this many elements in an im2col / partials buffer
_SHARED_BYTES = 48 * 1024  # static shared memory a block may use without opting in


def _cuda(namespace=None):
    """``numba.cuda``, imported on first use; also bound as ``cuda`` in ``namespace`` (a module's
    ``globals()``), where that module's kernels look it up."""
    global cuda
    if cuda is None:
        from numba import cuda as numba_cuda

        cuda = numba_cuda
    if namespace is not None:
        namespace["cuda"] = cuda
    return cuda


def _sim():
    """True under NUMBA_ENABLE_CUDASIM=1 (Python threads, slow: keep launches small there)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _nbtype(dtype):
    from numba import from_dtype

    return from_dtype(np.dtype(dtype))


def _pow2(v, cap):
    return min(cap, 1 << max(0, int(v) - 1).bit_length())


def _tiles(hw, th, tw):
    tiles_w = _cdiv(hw[1], tw)
    return tiles_w, _cdiv(hw[0], th) * tiles_w




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
    _cuda(globals())

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

    @cuda.jit
    def add_bias(out, b):
        d1, d2, d3 = out.shape[1], out.shape[2], out.shape[3]
        for t in range(cuda.grid(1), out.size, cuda.gridsize(1)):
            a = t // (d1 * d2 * d3)
            r = t - a * (d1 * d2 * d3)
            k = r // (d2 * d3)
            r -= k * (d2 * d3)
            c = r // d3
            out[a, k, c, r - c * d3] += b[k]

    @cuda.jit
    def permute4(src, dst, p0, p1, p2, p3):
        """dst[i0, i1, i2, i3] = src at the index whose axis p_k is i_k."""
        d1, d2, d3 = dst.shape[1], dst.shape[2], dst.shape[3]
        idx = cuda.local.array(4, np.int64)
        for t in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
            a = t // (d1 * d2 * d3)
            r = t - a * (d1 * d2 * d3)
            b = r // (d2 * d3)
            r -= b * (d2 * d3)
            c = r // d3
            e = r - c * d3
            idx[p0] = a
            idx[p1] = b
            idx[p2] = c
            idx[p3] = e
            dst[a, b, c, e] = src[idx[0], idx[1], idx[2], idx[3]]

    return _ns(copy1=copy1, copy4=copy4, bias_grad=bias_grad, add_bias=add_bias,
               permute4=permute4)


def _ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def _bias_grad(gd, spec, io):
    """The sums of ``gd``'s channels (axis 1), on the device."""
    db = io.empty(gd.shape[1])
    blocks = min(gd.shape[1], 2 if _sim() else 65535)
    _elementwise().bias_grad[blocks, 4 if _sim() else _TPB](gd, db)
    return db
