"""The max-pool window scan, written once as plain Python and compiled where it is needed:
``numba.njit`` in naive.py and pool.py (windows touching the padding), ``cuda.jit(device=True)``
in cuda/pool.py. Kernels only: inputs are validated upstream.

Numba caches a kernel with the code of what it calls, and does not notice an edit to this file
from the kernels' files: after changing it, clear the kernel caches (``__pycache__/*.nb*``).
"""

import math

__all__ = ["window_max"]


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
