"""cuda-im2col conv2d: unfold, then a tiled GEMM.

An im2col kernel writes the unfolded input ``col[n, (c, p, q), (i, j)]`` (in chunks of images),
then a batched shared-memory tiled GEMM with register blocking (each thread keeps a TM x TN
block of C in registers) computes ``out[n, g] = W[g] @ col[n, g]``. grad-input is
``W[g]^T @ grad_out[n, g]`` followed by a col2im that gathers per input pixel; grad-weight is
split-K: ``grad_out[n, g] @ col[n, g]^T`` per image (and per chunk of positions) into a partials
buffer, summed in a fixed order by a reduction kernel.
"""

from __future__ import annotations

import functools

import numpy as np

from ._common import (_TARGET_BLOCKS, _TPB, _WORKSPACE_ELEMS, _bias_grad, _cdiv, _cuda,
                      _launch_flat, _nbtype, _ns, _pow2, _sim)
from ._memory import _dummy, _Io, _workspace

cuda = None  # numba.cuda, bound by _cuda(globals()) on first use


@functools.cache
def _unfold():
    _cuda(globals())

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
    _cuda(globals())
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
        db = io.output(_bias_grad(gd, spec, io))
    return dx, dw, db
