"""Winograd F(4x4, 3x3) conv2d (CPU, float32 and float64): 3x3 kernels, stride 1, no dilation,
one group, any padding.

Inputs are already validated and converted (see fastconv._validate): C-contiguous arrays of
``spec.dtype``, NCHW or NHWC (with HWIO filters) as ``spec.layout`` says.

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
swapped. Grad-weight, where both channel counts fill a vector (`_weight_by_winograd`), is
Winograd's too: with ``GM = A dY A^T`` each 4x4 grad-output tile transformed, ``dU[e] = sum
over tiles V[e]^T GM[e]`` (36 deep GEMMs) and ``dw = (G kron G)^T dU`` (`_grad_weight_nhwc`,
channels-last; NCHW arrays are transposed for it). Elsewhere (first layers) grad-weight, and
grad-bias always, come from the im2col kernels and `fastconv.kernels._reduce`.

Accuracy: the transforms have coefficients up to 8 and 1/24, so float32 results carry 10 to 40
times im2col's rounding error (measured on the suite, see the README); float64 results are
within 1e-13 relative.

Every block writes its own output tiles, with sums in a fixed order: results are bit-identical
run after run and do not depend on the thread count.

Channels-last
-------------
`_correlate_nhwc` reads NHWC x and writes NHWC out natively: the transforms run along the
channels (contiguous in both arrays), a tile at a time, and the products are ``V[e] @ U[e]^T``
blocks of tiles x channels whose rows are output pixels. Where NCHW's tile rows hold fewer
tiles than a vector, that kernel's transforms fill whole vectors where `_correlate`'s do not,
so small float32 NCHW layers run it on transposed arrays (`_by_channels_last`).

Memory: per thread a block's transforms (``36 x BLOCK_TILES x (C + K)`` elements); Winograd's
grad-weight lays out up to `CHUNK_ELEMENTS` transformed elements at a time (16 MB in float32).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import NUMBA_CACHE, _parallel, _reduce
from ._numba import claim
from ._simd import lanes

__all__ = ["unsupported", "conv2d_forward", "conv2d_backward", "transform_weight"]

_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_GG = np.kron(_G, _G)  # (36, 9): row 6*a + b, column 3*r + s

#: Tiles per block (the N of the block's 36 GEMMs): measured on vgg-256, single-threaded BLAS
#: runs 256x256 by 256xN products at 29 GFLOP/s for N = 28 and 60 for N = 128.
BLOCK_TILES = 128
#: Blocks a problem is cut into at least, where it has the tile rows (two a thread on 2 cores).
MIN_BLOCKS = 4
#: Transformed elements (input and grad-output tiles together) the channels-last grad-weight
#: lays out at a time.
CHUNK_ELEMENTS = 4 << 20


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


def plan(n_rows, tiles_w):
    """Tile rows per block: about `BLOCK_TILES` tiles (the GEMMs' N dimension: smaller blocks
    run BLAS below its speed), but at least `MIN_BLOCKS` blocks where the problem has them.
    Never from the thread count: BLAS's sum for a tile can depend on how many tiles its call
    holds (1e-6 relative apart in float32), and results must not depend on the threads."""
    rows = max(1, BLOCK_TILES // tiles_w)
    return min(rows, max(1, -(-n_rows // MIN_BLOCKS)))


def _by_channels_last(c_in, c_out, dtype):
    """Whether an NCHW correlation runs faster through `_correlate_nhwc`, its arguments
    transposed: where both channel counts fill a vector but stay small, its transforms run
    along the channels in whole vectors, where `_correlate`'s run along tile rows of a few
    tiles (keras-c2's 13 x 13 planes: 4 tiles). Measured forward, NCHW kernel's time over
    this route's: 64 channels 1.72x (13 x 13), 1.17x (56 x 56), 32 channels 1.25x; 128 channels
    0.98x-1.16x, 64 to 128 0.92x, 256 0.57x-0.77x (the products of tiles x 256 channels run
    BLAS at 120-210 GFLOP/s, against 200-260 for the other orientation). float32 only: in
    float64 the two transposes move twice the bytes (keras-c2 0.80x, vgg-64 0.88x)."""
    dt = np.dtype(dtype)
    return dt == np.float32 and lanes(dt) <= min(c_in, c_out) and max(c_in, c_out) <= 64


def _run(x, w, b, out, top, left, work_ns):
    """``out`` = the 3x3 correlation of x (read from row ``top``, column ``left``) with w;
    returns it (or, through channels-last, a new array in its place)."""
    from . import layout
    from .im2col import serial_blas

    n, k, oh, ow = out.shape
    if _by_channels_last(x.shape[1], k, x.dtype):
        y = np.empty((n, oh, ow, k), dtype=x.dtype)
        return layout.to_nchw(_run_nhwc(layout.to_nhwc(x), w, b, y, top, left, work_ns))
    tiles_w, tiles_h = -(-ow // 4), -(-oh // 4)
    rows = plan(n * tiles_h, tiles_w)
    n_blocks = -(-n * tiles_h // rows)
    bias = b if b is not None else np.zeros(k, dtype=x.dtype)
    args = (x, transform_weight(w), bias, out, top, left, tiles_w, tiles_h, rows)
    with serial_blas():
        _parallel.run(_correlate, args, n_blocks, work_ns)
    return out


def conv2d_forward(x, w, b, spec):
    """conv2d by Winograd F(4x4, 3x3) (see the module docstring)."""
    if spec.layout == "NHWC":
        return _forward_nhwc(x, w, b, spec)
    (pt, _), (pl, _) = spec.padding
    out = np.empty(spec.out_shape, dtype=spec.dtype)
    return _run(x, w, b, out, -pt, -pl, _work_ns(spec))


def conv2d_backward(g, x, w, spec, need_input, need_weight, need_bias):
    """Grad-input by Winograd; grad-weight by Winograd or im2col's kernels (see the module
    docstring), grad-bias by `fastconv.kernels._reduce` or im2col's."""
    from . import im2col, layout

    if spec.layout == "NHWC":
        return _backward_nhwc(g, x, w, spec, need_input, need_weight, need_bias)
    dx = dw = db = None
    k, c = spec.w_shape[:2]
    by_winograd = need_weight and _weight_by_winograd(spec)
    if need_input and by_winograd and _by_channels_last(k, c, spec.dtype):
        # both through channels-last: the grad-output transposed once for the two
        dxt, dwt, _ = _backward_nhwc(layout.to_nhwc(g), layout.to_nhwc(x),
                                     np.ascontiguousarray(w.transpose(2, 3, 1, 0)), spec, True,
                                     True, False)
        dx, need_input = layout.to_nchw(dxt), False
    elif by_winograd:
        dwt = _grad_weight_nhwc(layout.to_nhwc(g), layout.to_nhwc(x), spec)
    if need_input:
        (pt, _), (pl, _) = spec.padding
        rotated = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dx = _run(g, rotated, None, np.empty(spec.x_shape, dtype=spec.dtype), pt - 2, pl - 2,
                  _work_ns(spec))
    if by_winograd:
        dw = np.ascontiguousarray(dwt.transpose(3, 2, 0, 1))
        db = _reduce.channel_sums(g) if need_bias else None
    elif need_weight or need_bias:
        _, dw, db = im2col.conv2d_backward(g, x, w, spec, False, need_weight, need_bias)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# channels-last


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"contract"}, error_model="numpy",
      boundscheck=False)
def _input_tiles(x, r0, nr, tiles_w, tiles_h, top, left, c_lo, c_hi, band, t, v, q0, two,
                 four, five):
    """``v[e, (q0 + q) * C + c] = (B^T d B)[e]`` of channel c's 6x6 patch of each tile q of the
    ``nr`` tile rows from flat row ``r0`` (x channels-last, zero outside itself). Per tile row
    the six input rows are copied into a zero-padded band once (``band[i, col]``, column
    ``col`` at input column ``col + left``; inside x for ``c_lo <= col < c_hi``), which the
    tiles of the row read without bounds checks."""
    n_c, h = x.shape[3], x.shape[1]
    for rr in range(nr):
        img, th = divmod(r0 + rr, tiles_h)
        i0 = th * 4 + top
        for i in range(6):
            bi = band[i]
            if 0 <= i0 + i < h:
                src = x[img, i0 + i]
                bi[:c_lo] = 0.0
                bi[c_lo:c_hi] = src[c_lo + left:c_hi + left]
                bi[c_hi:] = 0.0
            else:
                bi[:] = 0.0
        for tw in range(tiles_w):
            q = (q0 + rr * tiles_w + tw) * n_c
            for jj in range(6):  # B^T d, down each of the tile's six columns
                col = 4 * tw + jj
                d0, d1, d2 = band[0, col], band[1, col], band[2, col]
                d3, d4, d5 = band[3, col], band[4, col], band[5, col]
                s0, s1, s2 = t[0, jj], t[1, jj], t[2, jj]
                s3, s4, s5 = t[3, jj], t[4, jj], t[5, jj]
                for c in range(n_c):
                    s0[c], s1[c], s2[c], s3[c], s4[c], s5[c] = _bt(
                        d0[c], d1[c], d2[c], d3[c], d4[c], d5[c], two, four, five)
            for a in range(6):  # (B^T d) B, along its rows
                p0, p1, p2, p3, p4, p5 = t[a, 0], t[a, 1], t[a, 2], t[a, 3], t[a, 4], t[a, 5]
                e = 6 * a
                v0, v1, v2, v3, v4, v5 = v[e], v[e + 1], v[e + 2], v[e + 3], v[e + 4], v[e + 5]
                for c in range(n_c):
                    v0[q + c], v1[q + c], v2[q + c], v3[q + c], v4[q + c], v5[q + c] = _bt(
                        p0[c], p1[c], p2[c], p3[c], p4[c], p5[c], two, four, five)


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"contract"}, error_model="numpy",
      boundscheck=False)
def _correlate_nhwc(x, ut, b, out, top, left, tiles_w, tiles_h, rows_per_block, counter):
    """`_correlate` for channels-last x (N, H, W, C) and out (N, OH, OW, K), with ``ut`` (36,
    C, K): the transforms run along the channels, contiguous in both, so each is a loop over
    whole pixels' channels that LLVM vectorizes, and the products ``M[e] = V[e] @ ut[e]`` are
    (tiles x K) blocks whose rows are output pixels (`_input_tiles` transforms the input)."""
    n_c, w = x.shape[3], x.shape[2]
    n_k, oh, ow = out.shape[3], out.shape[1], out.shape[2]
    n_rows = x.shape[0] * tiles_h
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    block = rows_per_block * tiles_w
    cols = 4 * tiles_w + 2
    v = np.empty((36, block * n_c), dtype=x.dtype)  # entry e's rows: tile q at q * C
    m = np.empty((36, block * n_k), dtype=x.dtype)
    band = np.empty((6, cols, n_c), dtype=x.dtype)
    t = np.empty((6, 6, n_c), dtype=x.dtype)
    o = np.empty((4, 6, n_k), dtype=x.dtype)
    consts = np.empty(4, dtype=x.dtype)
    consts[0], consts[1], consts[2], consts[3] = 2.0, 4.0, 5.0, 8.0
    two, four, five, eight = consts[0], consts[1], consts[2], consts[3]
    c_lo = min(cols, max(0, -left))  # band columns inside x: [c_lo, c_hi)
    c_hi = max(c_lo, min(cols, w - left))
    while True:
        item = claim(counter)
        if item >= n_blocks:
            break
        r0 = item * rows_per_block
        nr = min(rows_per_block, n_rows - r0)
        _input_tiles(x, r0, nr, tiles_w, tiles_h, top, left, c_lo, c_hi, band, t, v, 0,
                     two, four, five)
        nq = nr * tiles_w
        for e in range(36):
            np.dot(v[e, :nq * n_c].reshape((nq, n_c)), ut[e],
                   m[e, :nq * n_k].reshape((nq, n_k)))
        for rr in range(nr):
            img, th = divmod(r0 + rr, tiles_h)
            i0 = th * 4
            for tw in range(tiles_w):
                q = (rr * tiles_w + tw) * n_k
                j0 = tw * 4
                for j in range(6):  # A^T M, down each of the tile's columns
                    m0, m1, m2 = m[j], m[6 + j], m[12 + j]
                    m3, m4, m5 = m[18 + j], m[24 + j], m[30 + j]
                    o0, o1, o2, o3 = o[0, j], o[1, j], o[2, j], o[3, j]
                    for k in range(n_k):
                        o0[k], o1[k], o2[k], o3[k] = _at(m0[q + k], m1[q + k], m2[q + k],
                                                         m3[q + k], m4[q + k], m5[q + k],
                                                         two, four, eight)
                for i in range(min(4, oh - i0)):  # (A^T M) A, along the rows, into out
                    q0, q1, q2 = o[i, 0], o[i, 1], o[i, 2]
                    q3, q4, q5 = o[i, 3], o[i, 4], o[i, 5]
                    row = out[img, i0 + i]
                    nj = min(4, ow - j0)
                    if nj == 4:
                        y0, y1, y2, y3 = row[j0], row[j0 + 1], row[j0 + 2], row[j0 + 3]
                        for k in range(n_k):
                            a0, a1, a2, a3 = _at(q0[k], q1[k], q2[k], q3[k], q4[k], q5[k],
                                                 two, four, eight)
                            y0[k] = a0 + b[k]
                            y1[k] = a1 + b[k]
                            y2[k] = a2 + b[k]
                            y3[k] = a3 + b[k]
                    else:
                        for k in range(n_k):
                            a0, a1, a2, a3 = _at(q0[k], q1[k], q2[k], q3[k], q4[k], q5[k],
                                                 two, four, eight)
                            row[j0, k] = a0 + b[k]
                            if nj > 1:
                                row[j0 + 1, k] = a1 + b[k]
                            if nj > 2:
                                row[j0 + 2, k] = a2 + b[k]


@njit(cache=NUMBA_CACHE, nogil=True, fastmath={"contract"}, error_model="numpy",
      boundscheck=False)
def _weight_tiles_nhwc(x, g, v, gm, top, left, tiles_w, tiles_h, row0, n_rows,
                       rows_per_block, counter):
    """Grad-weight's transforms of the tiles of ``n_rows`` tile rows from flat row ``row0``
    (tile ``q`` from that row's first): ``v`` (36, tiles * C) the input patches as in the
    forward, ``gm`` (36, tiles * K) the grad-output tiles ``A dY A^T`` (dY a 4x4 tile of g,
    zero past its edges), both channels-last along their rows. Items are blocks of
    ``rows_per_block`` tile rows."""
    n_c, w = x.shape[3], x.shape[2]
    n_k, oh, ow = g.shape[3], g.shape[1], g.shape[2]
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    cols = 4 * tiles_w + 2
    band = np.empty((6, cols, n_c), dtype=x.dtype)
    t = np.empty((6, 6, n_c), dtype=x.dtype)
    dy = np.zeros((4, 4, n_k), dtype=x.dtype)
    o = np.empty((4, 6, n_k), dtype=x.dtype)
    consts = np.empty(4, dtype=x.dtype)
    consts[0], consts[1], consts[2], consts[3] = 2.0, 4.0, 5.0, 8.0
    two, four, five, eight = consts[0], consts[1], consts[2], consts[3]
    c_lo = min(cols, max(0, -left))
    c_hi = max(c_lo, min(cols, w - left))
    while True:
        item = claim(counter)
        if item >= n_blocks:
            break
        r0 = row0 + item * rows_per_block
        nr = min(rows_per_block, row0 + n_rows - r0)
        _input_tiles(x, r0, nr, tiles_w, tiles_h, top, left, c_lo, c_hi, band, t, v,
                     (r0 - row0) * tiles_w, two, four, five)
        for rr in range(nr):
            img, th = divmod(r0 + rr, tiles_h)
            i0 = th * 4
            for tw in range(tiles_w):
                q = ((r0 - row0 + rr) * tiles_w + tw) * n_k
                j0 = tw * 4
                full = i0 + 4 <= oh and j0 + 4 <= ow
                for i in range(4):
                    for j in range(4):
                        if full or (i0 + i < oh and j0 + j < ow):
                            dy[i, j, :] = g[img, i0 + i, j0 + j]
                        else:
                            dy[i, j, :] = 0.0
                for i in range(4):  # A dY, along each row
                    y0, y1, y2, y3 = dy[i, 0], dy[i, 1], dy[i, 2], dy[i, 3]
                    o0, o1, o2, o3, o4, o5 = o[i, 0], o[i, 1], o[i, 2], o[i, 3], o[i, 4], o[i, 5]
                    for k in range(n_k):
                        o0[k], o1[k], o2[k], o3[k], o4[k], o5[k] = _a(y0[k], y1[k], y2[k],
                                                                      y3[k], two, four, eight)
                for b in range(6):  # (A dY) A^T, down each column
                    y0, y1, y2, y3 = o[0, b], o[1, b], o[2, b], o[3, b]
                    m0, m1, m2 = gm[b], gm[6 + b], gm[12 + b]
                    m3, m4, m5 = gm[18 + b], gm[24 + b], gm[30 + b]
                    for k in range(n_k):
                        m0[q + k], m1[q + k], m2[q + k], m3[q + k], m4[q + k], m5[q + k] = _a(
                            y0[k], y1[k], y2[k], y3[k], two, four, eight)


@njit(cache=NUMBA_CACHE, inline="always")
def _a(y0, y1, y2, y3, two, four, eight):
    """A y for F(4x4, 3x3)'s A (6 x 4), the transpose of `_at`'s A^T."""
    s, d = y0 + y2, y1 + y3
    t, u = y0 + four * y2, two * y1 + eight * y3
    return y0, s + d, s - d, t + u, t - u, y3


@njit(cache=NUMBA_CACHE, nogil=True, error_model="numpy", boundscheck=False)
def _weight_products(v, gm, du, part, n_t, n_c, n_k, first, counter):
    """``du[e] (+)= V[e]^T @ GM[e]`` (C x K) over ``n_t`` tiles, one entry e an item (through
    ``part[e]`` unless ``first``): each sum is one GEMM's and one add's, whoever runs them."""
    while True:
        e = claim(counter)
        if e >= 36:
            break
        a = v[e, :n_t * n_c].reshape((n_t, n_c)).T
        b = gm[e, :n_t * n_k].reshape((n_t, n_k))
        if first:
            np.dot(a, b, du[e])
        else:
            np.dot(a, b, part[e])
            du[e] += part[e]


def _weight_by_winograd(spec):
    """Whether grad-weight runs `_grad_weight_nhwc` (NCHW arrays transposed for it) rather
    than im2col's GEMMs: where both channel counts fill a vector (its transforms run along
    them). Measured against im2col's (NCHW, the same run): keras-c2 1.45x, vgg-64 1.40x,
    vgg-256 2.04x (float64 1.78x, 1.66x, 2.10x); with 1 or 3 input channels 0.1x-0.3x."""
    return lanes(np.dtype(spec.dtype)) <= min(spec.x_shape[1], spec.w_shape[0])


def _grad_weight_nhwc(g, x, spec):
    """dw (3, 3, C, K) by Winograd: ``dU[e] = sum over tiles V[e]^T GM[e]``, then ``dw =
    (G kron G)^T dU``. The tiles' transforms are laid out a chunk of up to `CHUNK_ELEMENTS`
    at a time (all of vgg-256's, 29 MB, in one), then each entry's product over the chunk is
    one deep GEMM; chunks add up in order."""
    from .im2col import serial_blas

    n, c, h, wd = spec.x_shape
    k = spec.w_shape[0]
    oh, ow = spec.out_hw
    (pt, _), (pl, _) = spec.padding
    tiles_w, tiles_h = -(-ow // 4), -(-oh // 4)
    n_rows = n * tiles_h
    if n_rows * tiles_w * c * k == 0:
        return np.zeros((3, 3, c, k), dtype=spec.dtype)
    chunk = max(1, min(n_rows, CHUNK_ELEMENTS // (36 * tiles_w * (c + k))))
    v = np.empty((36, chunk * tiles_w * c), dtype=spec.dtype)
    gm = np.empty((36, chunk * tiles_w * k), dtype=spec.dtype)
    du = np.empty((36, c, k), dtype=spec.dtype)
    part = np.empty((36, c, k) if chunk < n_rows else (1, 1, 1), dtype=spec.dtype)
    with serial_blas():
        for row0 in range(0, n_rows, chunk):
            nr = min(chunk, n_rows - row0)
            rows = plan(nr, tiles_w)
            _parallel.run(_weight_tiles_nhwc, (x, g, v, gm, -pt, -pl, tiles_w, tiles_h, row0,
                                               nr, rows),
                          -(-nr // rows), _parallel.conv_work_ns(spec, 0.1 * nr / n_rows))
            _parallel.run(_weight_products, (v, gm, du, part, nr * tiles_w, c, k, row0 == 0),
                          36, _work_ns(spec) * nr // n_rows)
    return (_GG.T.astype(spec.dtype) @ du.reshape(36, c * k)).reshape(3, 3, c, k)


def _run_nhwc(x, w_oihw, b, out, top, left, work_ns):
    """`_run` for channels-last x and out; ``w_oihw`` the filters as OIHW."""
    from .im2col import serial_blas

    n, oh, ow, k = out.shape
    tiles_w, tiles_h = -(-ow // 4), -(-oh // 4)
    rows = plan(n * tiles_h, tiles_w)
    n_blocks = -(-n * tiles_h // rows)
    bias = b if b is not None else np.zeros(k, dtype=x.dtype)
    ut = np.ascontiguousarray(transform_weight(w_oihw).transpose(0, 2, 1))
    args = (x, ut, bias, out, top, left, tiles_w, tiles_h, rows)
    with serial_blas():
        _parallel.run(_correlate_nhwc, args, n_blocks, work_ns)
    return out


def _forward_nhwc(x, w, b, spec):
    (pt, _), (pl, _) = spec.padding
    n, k, oh, ow = spec.out_shape[0], spec.w_shape[0], *spec.out_hw
    out = np.empty((n, oh, ow, k), dtype=spec.dtype)
    return _run_nhwc(x, w.transpose(3, 2, 0, 1), b, out, -pt, -pl, _work_ns(spec))


def _backward_nhwc(g, x, w, spec, need_input, need_weight, need_bias):
    """Grad-input by `_correlate_nhwc`, grad-weight by `_grad_weight_nhwc`."""
    dx = dw = db = None
    if need_input:
        (pt, _), (pl, _) = spec.padding
        n, c, h, wd = spec.x_shape
        rotated = w[::-1, ::-1].transpose(2, 3, 0, 1)  # (C, K, 3, 3): HWIO (R, S, C, K) turned
        dx = _run_nhwc(g, rotated, None, np.empty((n, h, wd, c), dtype=spec.dtype), pt - 2,
                       pl - 2, _work_ns(spec))
    if need_weight and _weight_by_winograd(spec):
        dw = _grad_weight_nhwc(g, x, spec)
        db = _reduce.channel_sums(g, channels_last=True) if need_bias else None
    elif need_weight or need_bias:
        from . import im2col

        _, dw, db = im2col.conv2d_backward(g, x, w, spec, False, need_weight, need_bias)
    return dx, dw, db
