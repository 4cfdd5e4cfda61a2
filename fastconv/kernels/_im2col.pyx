# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""im2col / col2im for NCHW arrays (Cython, nogil, OpenMP ``prange``).

Inputs are validated upstream (see ``fastconv._validate``). These cores check only what they
need to not crash with bounds checking off: the integer parameters, the channel range and the
shape of ``cols``, once per call, raising ``ValueError``.

Layout of ``cols`` for channels ``c0 <= c < c1``, with ``c`` counted from ``c0``::

    cols[(c*kh + r)*kw + s, (n*oh + i)*ow + j] = x[n, c0 + c, i*sh - pad_top + r*dh,
                                                 j*sw - pad_left + s*dw]

or 0 where that position lies outside the input. Padding therefore needs no padded copy of
``x``: top/left padding is ``pad_top``/``pad_left`` and bottom/right padding is implied by
``oh``/``ow``.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy, memset

cdef extern from "_omp_compat.h" nogil:
    int fc_openmp_enabled()
    void fc_omp_set_num_threads(int n)
    int fc_omp_get_max_threads()

OPENMP_ENABLED = bool(fc_openmp_enabled())

# Calls that move fewer elements than this run on one thread: starting a team costs more.
cdef Py_ssize_t _MIN_PARALLEL_WORK = 1 << 15


def set_num_threads(int n):
    """Set the number of OpenMP threads for later kernel calls (a no-op without OpenMP).

    Like ``omp_set_num_threads``, this applies to parallel regions started by the calling thread.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fc_omp_set_num_threads(n)


def get_max_threads():
    """Number of threads a kernel call may use (``omp_get_max_threads``; 1 without OpenMP)."""
    return fc_omp_get_max_threads()


cdef inline Py_ssize_t _first_inside(Py_ssize_t off, Py_ssize_t stride) noexcept nogil:
    """Smallest t >= 0 with t*stride + off >= 0."""
    if off >= 0:
        return 0
    return (stride - 1 - off) // stride


cdef inline Py_ssize_t _end_inside(Py_ssize_t off, Py_ssize_t size, Py_ssize_t stride,
                                   Py_ssize_t n_out) noexcept nogil:
    """Smallest t >= 0 with t*stride + off >= size, capped at n_out."""
    cdef Py_ssize_t t
    if size - off <= 0:
        return 0
    t = (size - off + stride - 1) // stride
    return t if t < n_out else n_out


cdef Py_ssize_t _channel_end(str name, Py_ssize_t n_batch, Py_ssize_t n_chan, Py_ssize_t H,
                             Py_ssize_t W, Py_ssize_t rows, Py_ssize_t ncols,
                             int kh, int kw, int sh, int sw, int dh, int dw, int oh, int ow,
                             int c0, int c1) except -1:
    """Check the parameters the loops rely on; return the resolved end channel c1."""
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or dh < 1 or dw < 1 or oh < 0 or ow < 0:
        raise ValueError(
            f"{name}: need kh, kw, sh, sw, dh, dw >= 1 and oh, ow >= 0, got kh={kh}, kw={kw}, "
            f"sh={sh}, sw={sw}, dh={dh}, dw={dw}, oh={oh}, ow={ow}")
    if c1 == -1:
        c1 = <int>n_chan
    if not 0 <= c0 <= c1 <= n_chan:
        raise ValueError(
            f"{name}: channel range c0={c0}, c1={c1} is not within the {n_chan} channels "
            f"of an array of shape {(n_batch, n_chan, H, W)}")
    cdef Py_ssize_t want_rows = <Py_ssize_t>(c1 - c0) * kh * kw
    cdef Py_ssize_t want_cols = n_batch * <Py_ssize_t>oh * ow
    if rows != want_rows or ncols != want_cols:
        raise ValueError(
            f"{name}: cols has shape ({rows}, {ncols}), expected ((c1-c0)*kh*kw, N*oh*ow) = "
            f"({want_rows}, {want_cols}) for an array of shape {(n_batch, n_chan, H, W)}, "
            f"channels {c0}:{c1}, kernel ({kh}, {kw}), output ({oh}, {ow})")
    return c1


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] cols, int kh, int kw, int sh, int sw,
           int pad_top, int pad_left, int dh, int dw, int oh, int ow, int c0=0, int c1=-1):
    """Unfold the sliding windows of ``x[:, c0:c1]`` into the columns of ``cols``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
        Unpadded input; only its last axis must be contiguous. Not modified.
    cols : ndarray, shape ((c1 - c0)*kh*kw, N*oh*ow), same dtype, C-contiguous
        Output, overwritten entirely (see the module docstring for the layout).
    kh, kw, sh, sw, dh, dw : int
        Kernel size, stride and dilation (all >= 1).
    pad_top, pad_left : int
        Zero padding before the first row and column.
    oh, ow : int
        Output size; windows that extend past the bottom/right edge read zeros.
    c0, c1 : int
        Channel range; ``c1=-1`` means ``C``.

    Notes
    -----
    Rows ``(c, r, s)`` of ``cols`` are split over OpenMP threads, one writer per row. Each
    row segment is a zero run, a copied run (``memcpy`` when ``sw == 1``) and a zero run,
    with the run limits computed once per row: no per-element bounds tests.
    """
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3]
    c1 = _channel_end("im2col", N, x.shape[1], H, W, cols.shape[0], cols.shape[1],
                      kh, kw, sh, sw, dh, dw, oh, ow, c0, c1)
    cdef Py_ssize_t n_rows = cols.shape[0], plane = <Py_ssize_t>oh * ow
    cdef Py_ssize_t khw = <Py_ssize_t>kh * kw
    cdef Py_ssize_t row, c, r, s, n, i, j, off_h, off_w, i_lo, i_hi, j_lo, j_hi
    cdef floating* dst
    cdef floating* d
    cdef const floating* src
    cdef int n_threads
    if n_rows == 0 or N * plane == 0:
        return
    n_threads = fc_omp_get_max_threads() if n_rows * N * plane >= _MIN_PARALLEL_WORK else 1

    for row in prange(n_rows, nogil=True, schedule="static", num_threads=n_threads):
        c = c0 + row // khw
        r = (row // kw) % kh
        s = row % kw
        off_h = r * dh - pad_top
        off_w = s * dw - pad_left
        # outputs i in [i_lo, i_hi) and j in [j_lo, j_hi) read inside the input
        i_hi = _end_inside(off_h, H, sh, oh)
        i_lo = _first_inside(off_h, sh)
        if i_lo > i_hi:
            i_lo = i_hi
        j_hi = _end_inside(off_w, W, sw, ow)
        j_lo = _first_inside(off_w, sw)
        if j_lo > j_hi:
            j_lo = j_hi
        for n in range(N):
            dst = &cols[row, n * plane]
            if i_lo > 0:
                memset(dst, 0, i_lo * ow * sizeof(floating))
            for i in range(i_lo, i_hi):
                d = dst + i * ow
                src = &x[n, c, i * sh + off_h, 0]
                if j_lo > 0:
                    memset(d, 0, j_lo * sizeof(floating))
                if sw == 1:
                    memcpy(d + j_lo, src + j_lo + off_w, (j_hi - j_lo) * sizeof(floating))
                else:
                    for j in range(j_lo, j_hi):
                        d[j] = src[j * sw + off_w]
                if j_hi < ow:
                    memset(d + j_hi, 0, (ow - j_hi) * sizeof(floating))
            if i_hi < oh:
                memset(dst + i_hi * ow, 0, (oh - i_hi) * ow * sizeof(floating))


def col2im(const floating[:, ::1] cols, floating[:, :, :, ::1] dx, int kh, int kw, int sh, int sw,
           int pad_top, int pad_left, int dh, int dw, int oh, int ow, int c0=0, int c1=-1):
    """Fold ``cols`` back onto ``dx[:, c0:c1]``, summing overlaps: the adjoint of `im2col`.

    Parameters are those of `im2col`, with ``dx`` (shape (N, C, H, W)) in the place of ``x``.
    The planes ``dx[n, c0:c1]`` are overwritten: zeroed, then every in-bounds entry of ``cols``
    is added to the pixel it was copied from. Other channels of ``dx`` are left untouched;
    ``cols`` is not modified.

    Notes
    -----
    The ``(n, c)`` planes of ``dx`` are split over OpenMP threads, one writer per plane, and each
    plane sums its contributions in a fixed ``(r, s, i, j)`` order, so the result is race-free
    and bit-identical for any number of threads.
    """
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[2], W = dx.shape[3]
    c1 = _channel_end("col2im", N, dx.shape[1], H, W, cols.shape[0], cols.shape[1],
                      kh, kw, sh, sw, dh, dw, oh, ow, c0, c1)
    cdef Py_ssize_t n_chan = c1 - c0, n_planes = N * n_chan
    cdef Py_ssize_t p, cc, c, r, s, n, i, j, ih, row, off_h, off_w, i_lo, i_hi, j_lo, j_hi
    cdef floating* dst
    cdef const floating* src
    cdef int n_threads
    if n_planes == 0:
        return
    n_threads = (fc_omp_get_max_threads()
                 if n_planes * (H * W + <Py_ssize_t>kh * kw * oh * ow) >= _MIN_PARALLEL_WORK
                 else 1)

    for p in prange(n_planes, nogil=True, schedule="static", num_threads=n_threads):
        n = p // n_chan
        cc = p % n_chan
        c = c0 + cc
        for ih in range(H):
            memset(&dx[n, c, ih, 0], 0, W * sizeof(floating))
        for r in range(kh):
            off_h = r * dh - pad_top
            i_hi = _end_inside(off_h, H, sh, oh)
            i_lo = _first_inside(off_h, sh)
            if i_lo > i_hi:
                i_lo = i_hi
            for s in range(kw):
                off_w = s * dw - pad_left
                j_hi = _end_inside(off_w, W, sw, ow)
                j_lo = _first_inside(off_w, sw)
                if j_lo > j_hi:
                    j_lo = j_hi
                row = (cc * kh + r) * kw + s
                for i in range(i_lo, i_hi):
                    src = &cols[row, (n * oh + i) * ow]
                    dst = &dx[n, c, i * sh + off_h, 0]
                    if sw == 1:
                        dst = dst + off_w
                        for j in range(j_lo, j_hi):
                            dst[j] = dst[j] + src[j]
                    else:
                        for j in range(j_lo, j_hi):
                            dst[j * sw + off_w] = dst[j * sw + off_w] + src[j]
