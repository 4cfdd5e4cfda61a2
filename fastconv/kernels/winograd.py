"""Winograd F(4x4, 3x3) conv2d (CPU, float32 and float64): 3x3 kernels, stride 1, no dilation,
one group, any padding.

Inputs are already validated and converted (see fastconv._validate): C-contiguous NCHW arrays
of ``spec.dtype``.

Algorithm
---------
The output is cut into 4x4 tiles; tile ``p`` of the output reads a 6x6 patch ``d`` of every
input channel (zero outside the input, so padding is never materialized). With Lavin and
Gray's matrices ``B`` (6x6), ``G`` (6x3) and ``A`` (6x4),

    y_tile[k] = A^T [ sum_c (G w[k, c] G^T) * (B^T d_c B) ] A          (* elementwise)

so with ``U[e] = (G w G^T)[e]`` (36 matrices K x C, made once per call) and ``V[e]`` (C x
tiles) the input patches transformed, the reduction over channels is 36 GEMMs ``M[e] = U[e] @
V[e]``: 36 x 2KC multiply-adds per tile of 16 outputs instead of 16 x 9 x 2KC, 2.25 times
fewer. The tiles are claimed in blocks of whole tile rows (`plan`): each thread transforms a
block's patches into its own ``V``, runs the 36 single-threaded BLAS GEMMs on it and transforms
the products straight into ``y``, so no buffer the size of the problem exists.

The filter transform is cheap (``36 K C`` values from ``9 K C``, under 2% of the work on the
suite's shapes) and made on every call from the weights as they are: nothing is cached, so
weights changed in place between two steps are always seen.

Grad-input is the same correlation: the grad-output, read at an offset of ``pad - 2`` (zero
outside it), correlated with the weights rotated by 180 degrees and with their two channel axes
swapped. Grad-weight and grad-bias come from the im2col kernels (a Winograd grad-weight
transforms grad-output tiles as well and does not beat their GEMMs at these sizes).

Accuracy: the transforms have coefficients up to 8 and 1/24, so float32 results carry 10 to 40
times im2col's rounding error (measured on the suite, see the README); float64 results are
within 1e-13 relative.

Every block writes its own output tiles, with sums in a fixed order: results are bit-identical
run after run and do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import NUMBA_CACHE, _parallel
from ._numba import claim

__all__ = ["unsupported", "conv2d_forward", "conv2d_backward", "transform_weight"]

_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_GG = np.kron(_G, _G)  # (36, 9): row 6*a + b, column 3*r + s

#: Tiles per block (the N of the block's 36 GEMMs): measured on vgg-256, single-threaded BLAS
#: runs 256x256 by 256xN products at 29 GFLOP/s for N = 28 and 60 for N = 128.
BLOCK_TILES = 128


def unsupported(spec):
    """Why Winograd F(4x4, 3x3) cannot take ``spec`` (None when it can)."""
    from . import im2col

    if spec.w_shape[2:] != (3, 3) or spec.stride != (1, 1) or spec.dilation != (1, 1):
        return (f"Winograd needs 3x3 kernels with stride 1 and dilation 1, got weight of shape "
                f"{spec.w_shape}, stride {spec.stride}, dilation {spec.dilation}")
    if spec.groups != 1:
        return f"Winograd needs groups=1, got groups={spec.groups}"
    return im2col.unsupported(spec)  # its grad-weight kernels


def transform_weight(w):
    """``U`` of shape (36, K, C): ``G w[k, c] G^T`` for every pair, entry ``e = 6*a + b``.

    The transform is linear in the nine taps, ``U[e] = sum_t (G kron G)[e, t] w[:, :, t]``:
    one (36 x 9) by (9 x K*C) GEMM, which writes ``U`` in the order the products read it.
    """
    k, c = w.shape[:2]
    return (_GG.astype(w.dtype) @ w.reshape(k * c, 9).T).reshape(36, k, c)


# ---------------------------------------------------------------------------------------------
# the kernel


@njit(cache=NUMBA_CACHE, inline="always")
def _bt(a0, a1, a2, a3, a4, a5, two, four, five):
    """B^T applied to a 6-vector (one factor of the input transform); the constants come in
    the data's dtype, so float32 data is transformed in float32 (a float64 literal would
    promote every operation to float64 and halve the vectors)."""
    return (four * a0 - five * a2 + a4,
            a3 + a4 - four * (a1 + a2),
            four * (a1 - a2) - a3 + a4,
            two * (a3 - a1) - a2 + a4,
            two * (a1 - a3) - a2 + a4,
            four * a1 - five * a3 + a5)


@njit(cache=NUMBA_CACHE, inline="always")
def _at(m0, m1, m2, m3, m4, m5, two, four, eight):
    """A^T applied to a 6-vector (one factor of the output transform)."""
    s, d = m1 + m2, m1 - m2
    t, u = m3 + m4, m3 - m4
    return m0 + s + t, d + two * u, s + four * t, d + eight * u + m5


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"contract"}, error_model="numpy",
      boundscheck=False)
def _correlate(x, u, b, out, top, left, tiles_w, tiles_h, rows_per_block, counter):
    """Part function: ``out[n, k, i, j] = b[k] + sum_{c, r, s} x[n, c, i + top + r,
    j + left + s] * w[k, c, r, s]`` (x zero outside itself), ``u = transform_weight(w)``.

    Items are blocks of ``rows_per_block`` rows of output tiles (flat over images). Per input
    channel and tile row, the six input rows the tiles read are copied into a zero-padded band
    split by column phase (column ``4*m + r`` at ``[r, m]``), so that tile ``tw``'s six columns
    are ``[0..3, tw]`` and ``[0..1, tw + 1]``: both halves of the transform are loops over
    contiguous tiles, which LLVM vectorizes. The output transform is the same the other way
    round, and its rows are interleaved back into ``out`` last.
    """
    n_c, h, w = x.shape[1], x.shape[2], x.shape[3]
    n_k, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    n_rows = x.shape[0] * tiles_h
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    block = rows_per_block * tiles_w
    tp = tiles_w + 1  # columns of a phase
    v = np.empty((36, n_c, block), dtype=x.dtype)
    m = np.empty((36, n_k, block), dtype=x.dtype)
    band = np.empty((6, 4, tp), dtype=x.dtype)  # every entry written before it is read
    t = np.empty((6, 4, tp), dtype=x.dtype)
    o = np.empty((4, 6, tiles_w), dtype=x.dtype)
    yp = np.empty((4, tiles_w), dtype=x.dtype)
    consts = np.empty(4, dtype=x.dtype)
    consts[0], consts[1], consts[2], consts[3] = 2.0, 4.0, 5.0, 8.0
    two, four, five, eight = consts[0], consts[1], consts[2], consts[3]
    # phase r's columns inside x: m in [m_lo[r], m_hi[r]) (column left + 4m + r in [0, w))
    m_lo = np.empty(4, dtype=np.int64)
    m_hi = np.empty(4, dtype=np.int64)
    for r in range(4):
        m_lo[r] = min(tp, max(0, (-left - r + 3) // 4))
        m_hi[r] = max(m_lo[r], min(tp, (w - left - r + 3) // 4))
    while True:
        item = claim(counter)
        if item >= n_blocks:
            break
        r0 = item * rows_per_block
        nr = min(rows_per_block, n_rows - r0)
        v[:, :, nr * tiles_w:] = 0.0  # the last block's missing rows: products ignored
        for c in range(n_c):
            for rr in range(nr):
                img, th = divmod(r0 + rr, tiles_h)
                i0 = th * 4 + top
                for i in range(6):
                    bi = band[i]
                    if 0 <= i0 + i < h:
                        src = x[img, c, i0 + i]
                        for r in range(4):
                            for mm in range(m_lo[r]):
                                bi[r, mm] = 0.0
                            for mm in range(m_lo[r], m_hi[r]):
                                bi[r, mm] = src[left + 4 * mm + r]
                            for mm in range(m_hi[r], tp):
                                bi[r, mm] = 0.0
                    else:
                        for r in range(4):
                            for mm in range(tp):
                                bi[r, mm] = 0.0
                for r in range(4):  # B^T d, down the columns
                    for mm in range(tp):
                        t0, t1, t2, t3, t4, t5 = _bt(band[0, r, mm], band[1, r, mm],
                                                     band[2, r, mm], band[3, r, mm],
                                                     band[4, r, mm], band[5, r, mm],
                                                     two, four, five)
                        t[0, r, mm] = t0
                        t[1, r, mm] = t1
                        t[2, r, mm] = t2
                        t[3, r, mm] = t3
                        t[4, r, mm] = t4
                        t[5, r, mm] = t5
                q0 = rr * tiles_w
                for a in range(6):  # (B^T d) B, along each tile's six columns
                    p0, p1, p2, p3 = t[a, 0], t[a, 1], t[a, 2], t[a, 3]
                    e = 6 * a
                    v0, v1, v2 = v[e, c], v[e + 1, c], v[e + 2, c]
                    v3, v4, v5 = v[e + 3, c], v[e + 4, c], v[e + 5, c]
                    for tw in range(tiles_w):
                        t0, t1, t2, t3, t4, t5 = _bt(p0[tw], p1[tw], p2[tw], p3[tw],
                                                     p0[tw + 1], p1[tw + 1], two, four, five)
                        v0[q0 + tw] = t0
                        v1[q0 + tw] = t1
                        v2[q0 + tw] = t2
                        v3[q0 + tw] = t3
                        v4[q0 + tw] = t4
                        v5[q0 + tw] = t5
        for e in range(36):
            np.dot(u[e], v[e], m[e])
        for k in range(n_k):
            bias = b[k]
            for rr in range(nr):
                img, th = divmod(r0 + rr, tiles_h)
                i0 = th * 4
                q0 = rr * tiles_w
                for j in range(6):  # A^T M, down each tile's columns
                    m0, m1, m2 = m[j, k], m[6 + j, k], m[12 + j, k]
                    m3, m4, m5 = m[18 + j, k], m[24 + j, k], m[30 + j, k]
                    o0, o1, o2, o3 = o[0, j], o[1, j], o[2, j], o[3, j]
                    for tw in range(tiles_w):
                        q = q0 + tw
                        y0, y1, y2, y3 = _at(m0[q], m1[q], m2[q], m3[q], m4[q], m5[q],
                                             two, four, eight)
                        o0[tw] = y0
                        o1[tw] = y1
                        o2[tw] = y2
                        o3[tw] = y3
                for i in range(min(4, oh - i0)):  # (A^T M) A, along the rows
                    oi = o[i]
                    y0, y1, y2, y3 = yp[0], yp[1], yp[2], yp[3]
                    for tw in range(tiles_w):
                        a0, a1, a2, a3 = _at(oi[0, tw], oi[1, tw], oi[2, tw], oi[3, tw],
                                             oi[4, tw], oi[5, tw], two, four, eight)
                        y0[tw] = a0 + bias
                        y1[tw] = a1 + bias
                        y2[tw] = a2 + bias
                        y3[tw] = a3 + bias
                    dst = out[img, k, i0 + i]
                    for r in range(4):  # interleave the phases back into the row
                        yr = yp[r]
                        for tw in range((ow - r + 3) // 4):
                            dst[4 * tw + r] = yr[tw]


def _work_ns(spec):
    """The hand-off's estimate: a quarter of a direct pass (36 multiply-adds per channel pair
    and 4x4 tile instead of 144)."""
    return _parallel.conv_work_ns(spec, 36 / 144)


def plan(n_rows, tiles_w, threads):
    """Tile rows per block: about `BLOCK_TILES` tiles (the GEMMs' N dimension: smaller blocks
    run BLAS below its speed), but at least two blocks per thread where the problem has them."""
    rows = max(1, BLOCK_TILES // tiles_w)
    return min(rows, max(1, -(-n_rows // (2 * threads))))


def _run(x, w, b, out, top, left, work_ns):
    """``out`` = the 3x3 correlation of x (read from row ``top``, column ``left``) with w."""
    from .im2col import serial_blas

    n, k, oh, ow = out.shape
    tiles_w, tiles_h = -(-ow // 4), -(-oh // 4)
    rows = plan(n * tiles_h, tiles_w, _parallel.count)
    n_blocks = -(-n * tiles_h // rows)
    bias = b if b is not None else np.zeros(k, dtype=x.dtype)
    args = (x, transform_weight(w), bias, out, top, left, tiles_w, tiles_h, rows)
    with serial_blas():
        _parallel.run(_correlate, args, n_blocks, work_ns)
    return out


def conv2d_forward(x, w, b, spec):
    """conv2d by Winograd F(4x4, 3x3) (see the module docstring)."""
    (pt, _), (pl, _) = spec.padding
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    return _run(x, w, b, out, -pt, -pl, _work_ns(spec))


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    """Grad-input by Winograd; grad-weight and grad-bias by the im2col kernels."""
    from . import im2col

    dx = dw = db = None
    if need_input:
        (pt, _), (pl, _) = spec.padding
        rotated = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dx = _run(g, rotated, None, np.empty(spec.x_shape, dtype=spec.dtype), pt - 2, pl - 2,
                  _work_ns(spec))
    if need_weight or need_bias:
        _, dw, db = im2col.conv2d_backward(g, x, w, spec, False, need_weight, need_bias)
    return dx, dw, db
