"""Large sums on the thread pool (Numba, CPU): the sum of each plane (global average pooling,
in pool.py) and the sum of each channel over a whole batch (the bias gradients of every CPU
convolution method, in NCHW and NHWC).

NumPy's ``g.sum(axis=(0, 2, 3))`` runs on one thread at about a third of the memory bandwidth
(1.3 ms of keras-c1's 6.6 ms backward); here fixed blocks of the array are work items, each
summed in the array's dtype in short runs (see `sum_flat` and `_add_rows`), and their sums are
added in float64 in item order, so the result depends on the shape alone, never on the thread
count or the schedule.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

from . import NUMBA_CACHE, _parallel
from ._numba import cdiv, claim, sum_flat, wide

__all__ = ["plane_sums", "channel_sums"]

BLOCK = 16384  # elements per work item: a few microseconds, many hand-offs' worth


@njit(cache=NUMBA_CACHE, nogil=True)
def _plane_sums(src, m, out, div, per, counter):
    """out[p] = sum(src[p*m:(p+1)*m]) / div; blocks of ``per`` planes claimed from counter."""
    n_planes = out.size
    b = claim(counter)
    while b * per < n_planes:
        for p in range(b * per, min(n_planes, (b + 1) * per)):
            out[p] = sum_flat(src, p * m, m) / div
        b = claim(counter)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"reassoc", "contract"})
def _add_rows(src, r0, r1, k, q, acc, part, p0):
    """part[p0:p0 + k] = the sum of rows r0 <= r < r1 of src (rows of k), in float64. q rows
    at a time are one vector loop of q*k >= 256 elements into ``acc`` (q*k of src's dtype),
    whose q rows go to part at the end: a loop over one row of a few dozen channels was
    shorter than the vectorized loop's step and ran scalar, and accumulating in float64 was
    bound by the conversions and the accumulator's load-add-store latency."""
    wide()
    m, kk = uint64(q * k), uint64(k)
    for j in range(m):
        acc[j] = 0.0
    r = r0
    while r + q <= r1:
        s = uint64(r * k)
        for j in range(m):
            acc[j] += src[s + j]
        r += q
    while r < r1:
        s = uint64(r * k)
        for j in range(kk):
            acc[j] += src[s + j]
        r += 1
    for j in range(kk):
        total = 0.0
        for i in range(q):
            total += acc[uint64(i) * kk + j]
        part[uint64(p0) + j] = total


@njit(cache=NUMBA_CACHE, nogil=True)
def _row_sums(src, k, rows, part, counter):
    """Row ``b`` of part (n_items x k, flat): the sum of src's rows b*rows .. (b+1)*rows - 1."""
    n_rows = src.size // k
    n_items = part.size // k
    q = cdiv(256, k)
    acc = np.empty(q * k, dtype=src.dtype)
    b = claim(counter)
    while b < n_items:
        _add_rows(src, b * rows, min(n_rows, (b + 1) * rows), k, q, acc, part, b * k)
        b = claim(counter)


def plane_sums(src, m, out, div=1.0):
    """``out[p] = sum(src[p*m:(p+1)*m]) / div`` for every p < out.size (src, out: flat)."""
    per = max(1, BLOCK // m)
    _parallel.run(_plane_sums, (src, m, out, float(div), per), cdiv(out.size, per),
                  out.size * m // 8)


def channel_sums(g, channels_last=False):
    """``g`` (4-D, C-contiguous) summed over all axes but its channels (axis 1, or 3 if
    ``channels_last``), blocks' sums added in float64, returned in g's dtype: a convolution's
    bias gradient."""
    if channels_last:
        k = g.shape[3]
        rows = max(1, BLOCK // k)
        part = np.empty((cdiv(g.size // k, rows), k))
        _parallel.run(_row_sums, (g.reshape(-1), k, rows, part.reshape(-1)), part.shape[0],
                      g.size // 8)
    else:
        n, k = g.shape[:2]
        part = np.empty((n, k))
        plane_sums(g.reshape(-1), g.shape[2] * g.shape[3], part.reshape(-1))
    return part.sum(axis=0).astype(g.dtype)
