"""Channels-last (NHWC, with HWIO filters) for kernels written for NCHW: transpose the
arguments in, run the NCHW kernel, transpose the results back. Kernels that read NHWC natively
are registered as such and never come here (see fastconv._registry).

Activations move between the layouts in `to_nchw` / `to_nhwc`: a tiled transpose on the
thread pool. NumPy's ``ascontiguousarray(a.transpose(...))`` runs on one thread at 2-3 GB/s
on these shapes (4.8 ms for keras-c1's 11 MB grad-output, more than the convolution).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from . import NUMBA_CACHE, _parallel
from ._numba import cdiv, claim
from ._simd import lanes, transpose_block

__all__ = ["adapt", "to_nchw", "to_nhwc"]

ROWS = 256  # rows of the source per work item (a multiple of the lanes)


@njit(cache=NUMBA_CACHE, nogil=True)
def _transpose_part(src, dst, a, b, rows, counter):
    """dst[i, q, p] = src[i, p, q] for src (n, a, b) and dst (n, b, a), both flat; items are
    (image i, ``rows`` rows p of src, a multiple of the lanes), moved in blocks of lanes x
    lanes elements transposed in registers (`transpose_block`), a column of blocks at a time
    (so that each dst row is written in order); the edges go element by element."""
    n_lanes = lanes(src)
    n_chunks = cdiv(a, rows)
    n_items = (src.size // (a * b)) * n_chunks
    item = claim(counter)
    while item < n_items:
        base = (item // n_chunks) * a * b
        p_lo = (item % n_chunks) * rows
        p_hi = min(a, p_lo + rows)
        p_full = p_lo + (p_hi - p_lo) // n_lanes * n_lanes
        q0 = 0
        while q0 + n_lanes <= b:
            for p0 in range(p_lo, p_full, n_lanes):
                transpose_block(src, base + p0 * b + q0, b, dst, base + q0 * a + p0, a)
            q0 += n_lanes
        _transpose_edge(src, dst, a, b, base, p_lo, p_full, q0, b)
        _transpose_edge(src, dst, a, b, base, p_full, p_hi, 0, b)
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _narrow_part(src, dst, a, b, rows, counter):
    """dst[i, q, p] = src[i, p, q] as `_transpose_part`, where a or b is below the lanes (a
    first layer's channels); items are (image i, ``rows`` entries of the long side), the loops
    ordered so that dst is written in order. NumPy's loop for the same (a first layer's dx to
    channels-last) ran at half this speed."""
    long_side = max(a, b)
    n_chunks = cdiv(long_side, rows)
    n_items = (src.size // (a * b)) * n_chunks
    ua, ub = uint64(a), uint64(b)
    item = claim(counter)
    while item < n_items:
        base = uint64((item // n_chunks) * a * b)
        lo = uint64((item % n_chunks) * rows)
        hi = min(uint64(long_side), lo + uint64(rows))  # uint64 + int64 would be a float
        if a < b:  # a few planes of b pixels -> b pixels of a channels
            for q in range(lo, hi):
                for p in range(ua):
                    dst[base + q * ua + p] = src[base + p * ub + q]
        else:  # a pixels of b channels -> b planes of a pixels
            for q in range(ub):
                for p in range(lo, hi):
                    dst[base + q * ua + p] = src[base + p * ub + q]
        item = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True)
def _transpose_edge(src, dst, a, b, base, p0, p1, q0, q1):
    for q in range(uint64(q0), uint64(q1)):
        d = uint64(base) + q * uint64(a)
        for p in range(uint64(p0), uint64(p1)):
            dst[d + p] = src[uint64(base) + p * uint64(b) + q]


def _transpose(src, shape, a, b):
    """``src`` (C-contiguous, read as (n, a, b)) transposed to (n, b, a), returned as
    ``shape``: a view of src when a or b is 1 (the same elements in the same order)."""
    if a == 1 or b == 1:
        return src.reshape(shape)
    dst = np.empty(shape, dtype=src.dtype)
    if src.size == 0:
        return dst
    if min(a, b) < lanes(src.dtype):  # a first layer's 3 channels: no lanes x lanes blocks
        wide = max(a, b)
        _parallel.run(_narrow_part, (src.reshape(-1), dst.reshape(-1), a, b, ROWS * 16),
                      (src.size // (a * b)) * cdiv(wide, ROWS * 16), src.size // 2)
        return dst
    _parallel.run(_transpose_part, (src.reshape(-1), dst.reshape(-1), a, b, ROWS),
                  (src.size // (a * b)) * cdiv(a, ROWS), src.size // 2)
    return dst


def to_nhwc(a):
    """An NCHW activation (C-contiguous) as a C-contiguous NHWC array (new, or a view where
    C = 1 or H*W = 1)."""
    n, c, h, w = a.shape
    return _transpose(a, (n, h, w, c), c, h * w)


def to_nchw(a):
    """An NHWC activation (C-contiguous) as a C-contiguous NCHW array (new, or a view where
    C = 1 or H*W = 1)."""
    n, h, w, c = a.shape
    return _transpose(a, (n, c, h, w), h * w, c)


# For each op: the kind of each positional argument of its entry point and of each result.
# "x": an activation (N, H, W, C) <-> (N, C, H, W); "w": filters (R, S, I, O) <-> (O, I, R, S);
# "spec": the spec; None: passed through (bias, flags, bias gradient).
_ARGS = {
    "conv2d": (("x", "w", None, "spec"), "x"),
    "conv2d_backward": (("x", "x", "w", "spec", None, None, None), ("x", "w", None)),
    "conv_transpose2d": (("x", "w", None, "spec"), "x"),
    "conv_transpose2d_backward": (("x", "x", "w", "spec", None, None, None), ("x", "w", None)),
    "max_pool2d": (("x", "spec", None), ("x", "x")),
    "max_pool2d_backward": (("x", "x", "spec"), "x"),
    "avg_pool2d": (("x", "spec"), "x"),
    "avg_pool2d_backward": (("x", "spec"), "x"),
    "adaptive_avg_pool2d": (("x", "spec"), "x"),
    "adaptive_avg_pool2d_backward": (("x", "spec"), "x"),
}

_IN = {"x": (0, 3, 1, 2), "w": (3, 2, 0, 1)}
_OUT = {"x": (0, 2, 3, 1), "w": (2, 3, 1, 0)}


def adapt(op, fn):
    """``fn`` (an NCHW entry point of ``op``) as an entry point for NHWC arguments and specs."""
    kinds, results = _ARGS[op]

    def channels_last(*args):
        spec = args[kinds.index("spec")]
        inner = spec._replace(layout="NCHW")
        moved = [inner if kind == "spec" else _permute(a, _IN.get(kind), spec)
                 for a, kind in zip(args, kinds)]
        out = fn(*moved)
        if isinstance(results, str):
            return _permute(out, _OUT[results], spec)
        return tuple(_permute(o, _OUT.get(kind), spec) for o, kind in zip(out, results))

    channels_last.__name__ = f"{getattr(fn, '__name__', op)}_nhwc"
    return channels_last


def _permute(a, axes, spec):
    if a is None or axes is None:
        return a
    if spec.on_device:
        from .cuda import arrays

        return arrays.permute(a, axes)
    if a.dtype in (np.float32, np.float64) and a.flags.c_contiguous:
        if axes == _IN["x"]:
            return to_nchw(a)
        if axes == _OUT["x"]:
            return to_nhwc(a)
    return np.ascontiguousarray(np.transpose(a, axes))  # filters, indices
