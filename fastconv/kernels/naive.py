"""Naive conv2d and max-pool: straight loops, no tricks (Numba, CPU). The readable oracle.

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``. Padding is handled by skipping out-of-range taps, so no padded copy is made.
Sums accumulate in float64 whatever the dtype, which makes this the most accurate method.
"""

import numpy as np
from numba import njit

from . import NUMBA_CACHE
from ._window import box_windows, window_max

__all__ = ["conv2d_forward", "conv2d_backward", "max_pool2d_forward", "max_pool2d_backward",
           "avg_pool2d_forward", "avg_pool2d_backward"]


@njit(cache=NUMBA_CACHE, nogil=True)
def _forward_nchw(x, w, out, sh, sw, pt, pl, dh, dw, groups):
    n_batch, _, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    kg = c_out // groups
    oh, ow = out.shape[2], out.shape[3]
    for n in range(n_batch):
        for o in range(c_out):
            c0 = (o // kg) * cg
            for i in range(oh):
                for j in range(ow):
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
                    out[n, o, i, j] = acc


@njit(cache=NUMBA_CACHE, nogil=True)
def _backward_input_nchw(g, w, dx, sh, sw, pt, pl, dh, dw, groups):
    """Scatter each output gradient back through the taps that produced it (the adjoint)."""
    n_batch, _, h, wd = dx.shape
    c_out, cg, kh, kw = w.shape
    kg = c_out // groups
    oh, ow = g.shape[2], g.shape[3]
    acc = np.zeros(dx.shape, dtype=np.float64)
    for n in range(n_batch):
        for o in range(c_out):
            c0 = (o // kg) * cg
            for i in range(oh):
                for j in range(ow):
                    go = g[n, o, i, j]
                    for c in range(cg):
                        for p in range(kh):
                            row = i * sh - pt + p * dh
                            if row < 0 or row >= h:
                                continue
                            for q in range(kw):
                                col = j * sw - pl + q * dw
                                if 0 <= col < wd:
                                    acc[n, c0 + c, row, col] += go * w[o, c, p, q]
    dx[...] = acc


@njit(cache=NUMBA_CACHE, nogil=True)
def _backward_weight_nchw(g, x, dwt, sh, sw, pt, pl, dh, dw, groups):
    n_batch, _, h, wd = x.shape
    c_out, cg, kh, kw = dwt.shape
    kg = c_out // groups
    oh, ow = g.shape[2], g.shape[3]
    for o in range(c_out):
        c0 = (o // kg) * cg
        for c in range(cg):
            for p in range(kh):
                for q in range(kw):
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


@njit(cache=NUMBA_CACHE, nogil=True)
def _backward_bias_nchw(g, db):
    n_batch, c_out, oh, ow = g.shape
    for o in range(c_out):
        acc = 0.0
        for n in range(n_batch):
            for i in range(oh):
                for j in range(ow):
                    acc += g[n, o, i, j]
        db[o] = acc



def conv2d_forward(x, w, b, spec):
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    _forward_nchw(x, w, out, *spec.loop_args)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    dx = dw = db = None
    if need_input:
        dx = np.empty(spec.x_shape, dtype=spec.dtype)
        _backward_input_nchw(g, w, dx, *spec.loop_args)
    if need_weight:
        dw = np.empty(spec.w_shape, dtype=spec.dtype)
        _backward_weight_nchw(g, x, dw, *spec.loop_args)
    if need_bias:
        db = np.empty(spec.w_shape[0], dtype=spec.dtype)
        _backward_bias_nchw(g, db)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# max-pool


_window_max = njit(cache=NUMBA_CACHE, nogil=True)(window_max)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_forward_nchw(x, out, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    n_batch, chans, h, wd = x.shape
    oh, ow = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    for n in range(n_batch):
        for c in range(chans):
            base = (n * chans + c) * h * wd
            for i in range(oh):
                for j in range(ow):
                    out[n, c, i, j], idx[n, c, i, j] = _window_max(
                        xf, base, h, wd, i, j, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=NUMBA_CACHE, nogil=True)
def _pool_backward_nchw(g, idx, dx):
    n_batch, chans, oh, ow = g.shape
    wd = dx.shape[3]
    for n in range(n_batch):
        for c in range(chans):
            for i in range(oh):
                for j in range(ow):
                    k = idx[n, c, i, j]
                    dx[n, c, k // wd, k % wd] += g[n, c, i, j]


def max_pool2d_forward(x, spec, return_indices):
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    idx = np.empty(spec.out_shape, dtype=np.int64)
    _pool_forward_nchw(x, out, idx, *spec.loop_args)
    return out, (idx if return_indices else None)


def max_pool2d_backward(g, idx, spec):
    dx = np.zeros(spec.x_shape, dtype=spec.dtype)
    _pool_backward_nchw(g, idx, dx)
    return dx


# ---------------------------------------------------------------------------------------------
# average pools (fixed and adaptive windows alike: see fastconv.kernels._window.box_windows)


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_forward_nchw(x, out, rows, cols):
    n_batch, chans, oh, ow = out.shape
    for n in range(n_batch):
        for c in range(chans):
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0
                    for r in range(rows[i, 0], rows[i, 1]):
                        for q in range(cols[j, 0], cols[j, 1]):
                            acc += x[n, c, r, q]
                    out[n, c, i, j] = acc / (rows[i, 2] * cols[j, 2])


@njit(cache=NUMBA_CACHE, nogil=True)
def _box_backward_nchw(g, dx, rows, cols):
    n_batch, chans, oh, ow = g.shape
    acc = np.zeros(dx.shape, dtype=np.float64)
    for n in range(n_batch):
        for c in range(chans):
            for i in range(oh):
                for j in range(ow):
                    v = g[n, c, i, j] / (rows[i, 2] * cols[j, 2])
                    for r in range(rows[i, 0], rows[i, 1]):
                        for q in range(cols[j, 0], cols[j, 1]):
                            acc[n, c, r, q] += v
    dx[...] = acc


def avg_pool2d_forward(x, spec):
    t = box_windows(spec)
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    _box_forward_nchw(x, out, t.rows, t.cols)
    return out


def avg_pool2d_backward(g, spec):
    t = box_windows(spec)
    dx = np.empty(spec.x_shape, dtype=spec.dtype)
    _box_backward_nchw(g, dx, t.rows, t.cols)
    return dx
