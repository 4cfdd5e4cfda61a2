"""Pool windows: the max-pool window scan and the average pools' window tables.

The max-pool window scan is written once as plain Python and compiled where it is needed:
``numba.njit`` in naive.py and pool.py (windows touching the padding), ``cuda.jit(device=True)``
in cuda/pool.py. Kernels only: inputs are validated upstream.

Numba caches a kernel with the code of what it calls, and does not notice an edit to this file
from the kernels' files: after changing it, clear the kernel caches (``__pycache__/*.nb*``).
"""

import functools
import math
from typing import NamedTuple

import numpy as np

__all__ = ["window_max", "box_windows", "BoxWindows"]


def window_max(x, base, h, w, i, j, kh, kw, sh, sw, ph, pw, dh, dw):
    """(maximum, flat index) of window (i, j) of the ``h x w`` plane at ``x[base:]`` (flat).

    Taps in the -inf padding are skipped. Strictly greater keeps the first maximum in
    row-major window order; the first NaN wins (``v != v``: no -ffast-math). A window with no
    tap inside gives -inf and PyTorch's index: its first tap at or after row and column 0.
    """
    r0 = i * sh - ph
    while r0 < 0:
        r0 += dh
    c0 = j * sw - pw
    while c0 < 0:
        c0 += dw
    best = -math.inf
    arg = r0 * w + c0
    for p in range(kh):
        row = i * sh - ph + p * dh
        if row < 0 or row >= h:
            continue
        for q in range(kw):
            col = j * sw - pw + q * dw
            if col < 0 or col >= w:
                continue
            v = x[base + row * w + col]
            if v > best or (v != v and best == best):
                best = v
                arg = row * w + col
    return best, arg


class BoxWindows(NamedTuple):
    """The windows of an average pool, per output row and per output column.

    ``rows[i] = (start, end, divisor)``: window row ``i`` sums input rows ``start <= h < end``
    (clipped to the input) and its divisor is ``rows[i, 2] * cols[j, 2]``. ``row_users[h] =
    (first, end)``: the output rows whose windows contain input row ``h`` (a contiguous range);
    likewise for columns.
    """

    rows: np.ndarray
    cols: np.ndarray
    row_users: np.ndarray
    col_users: np.ndarray


def _axis(size, out, k, s, p, count_include_pad, adaptive):
    table = np.empty((out, 3), np.int64)
    for i in range(out):
        if adaptive:  # PyTorch: floor(i * size / out) .. ceil((i + 1) * size / out)
            lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
            div = hi - lo
        else:
            lo = i * s - p
            hi = min(lo + k, size + p)
            div = hi - lo  # counting the padding the window covers
            lo, hi = max(lo, 0), min(hi, size)
            if not count_include_pad:
                div = hi - lo
        table[i] = lo, max(hi, lo), div
    users = np.zeros((size, 2), np.int64)
    for h in range(size):
        inside = np.nonzero((table[:, 0] <= h) & (h < table[:, 1]))[0]
        users[h] = (inside[0], inside[-1] + 1) if inside.size else (0, 0)
    return table, users


@functools.lru_cache(maxsize=256)
def box_windows(spec) -> BoxWindows:
    """The `BoxWindows` of an average-pool spec (`fastconv._validate.AvgPoolSpec`)."""
    h, w = spec.x_shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    rows, row_users = _axis(h, spec.out_hw[0], kh, sh, ph, spec.count_include_pad,
                            spec.adaptive)
    cols, col_users = _axis(w, spec.out_hw[1], kw, sw, pw, spec.count_include_pad,
                            spec.adaptive)
    if spec.divisor_override is not None:
        rows[:, 2], cols[:, 2] = spec.divisor_override, 1
    for a in (rows, cols, row_users, col_users):
        a.setflags(write=False)
    return BoxWindows(rows, cols, row_users, col_users)
