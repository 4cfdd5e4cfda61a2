# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Max-pool forward and backward for NCHW arrays (Cython, nogil, OpenMP ``prange``).

Semantics are PyTorch's (see DESIGN.md section 1): windows padded with ``-inf``, dilation,
``ceil_mode`` (through the output size the caller passes), the index of a window's maximum is the
*first* maximum in row-major window order, and a NaN is the maximum (the first NaN wins). Indices
are flat positions in the unpadded ``H*W`` plane. NaN tests are plain IEEE comparisons, so this
file must not be compiled with ``-ffast-math``.

Both directions split the ``(n, c)`` planes over OpenMP threads, one writer per plane: backward
adds the gradients of overlapping windows in a fixed order, so it is race-free and bit-identical
for any number of threads.

Inputs are validated upstream (see ``fastconv._validate``). These cores check only what they need
to not crash with bounds checking off: parameters and shapes once per call, and each index of
backward, raising ``ValueError``.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from "_omp_compat.h" nogil:
    int fc_omp_get_max_threads()

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* m ? v : b without a branch (a branch on random data mispredicts half the time) */
    static inline float fc_pick_f(int m, float v, float b) {
        uint32_t vi, bi, r;
        float out;
        memcpy(&vi, &v, 4);
        memcpy(&bi, &b, 4);
        r = bi ^ ((bi ^ vi) & (uint32_t)(-(int32_t)m));
        memcpy(&out, &r, 4);
        return out;
    }
    static inline double fc_pick_d(int m, double v, double b) {
        uint64_t vi, bi, r;
        double out;
        memcpy(&vi, &v, 8);
        memcpy(&bi, &b, 8);
        r = bi ^ ((bi ^ vi) & (uint64_t)(-(int64_t)m));
        memcpy(&out, &r, 8);
        return out;
    }
    static inline int64_t fc_pick_i(int m, int64_t v, int64_t b) {
        return b ^ ((b ^ v) & -(int64_t)m);
    }
    """
    float fc_pick_f(int m, float v, float b) nogil
    double fc_pick_d(int m, double v, double b) nogil
    int64_t fc_pick_i(int m, int64_t v, int64_t b) nogil

# Calls that touch fewer elements than this run on one thread: starting a team costs more.
cdef Py_ssize_t _MIN_PARALLEL_WORK = 1 << 15


cdef inline Py_ssize_t _first_inside(Py_ssize_t off, Py_ssize_t step) noexcept nogil:
    """Smallest t >= 0 with off + t*step >= 0."""
    if off >= 0:
        return 0
    return (step - 1 - off) // step


cdef inline Py_ssize_t _end_inside(Py_ssize_t off, Py_ssize_t size, Py_ssize_t step,
                                   Py_ssize_t n) noexcept nogil:
    """Smallest t >= 0 with off + t*step >= size, capped at n."""
    cdef Py_ssize_t t
    if size - off <= 0:
        return 0
    t = (size - off + step - 1) // step
    return t if t < n else n


cdef int _check(str name, tuple x_shape, tuple y_shape, int kh, int kw, int sh, int sw, int ph,
                int pw, int dh, int dw) except -1:
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or dh < 1 or dw < 1 or ph < 0 or pw < 0:
        raise ValueError(
            f"{name}: need kernel, stride, dilation >= 1 and padding >= 0, got kernel "
            f"({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw})")
    if x_shape[:2] != y_shape[:2]:
        raise ValueError(f"{name}: input of shape {x_shape} and output of shape {y_shape} "
                         "differ in (N, C)")
    return 0


def max_pool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                     int64_t[:, :, :, ::1] indices, int kh, int kw, int sh, int sw, int ph,
                     int pw, int dh, int dw):
    """Max over the windows of ``x``: ``out[n, c, i, j]`` and, unless None, its index.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64, C-contiguous
        Not modified.
    out : ndarray, shape (N, C, oh, ow), same dtype, C-contiguous
        Overwritten. ``oh, ow`` come from its shape (``ceil_mode`` is the caller's business).
    indices : ndarray of int64, shape (N, C, oh, ow), or None
        Overwritten with ``row*W + col`` of each maximum in the unpadded plane.
    kh, kw, sh, sw, ph, pw, dh, dw : int
        Kernel size, stride, padding (top/left; the bottom/right padding is implied by
        ``oh, ow``) and dilation. Window ``(i, j)`` covers rows ``i*sh - ph + p*dh``,
        ``0 <= p < kh``, and columns ``j*sw - pw + q*dw``, ``0 <= q < kw``.

    Notes
    -----
    Taps outside the plane are skipped: they count as ``-inf``. A window with no tap inside
    (impossible with validated parameters) gives ``-inf`` and the index of its first tap.
    """
    cdef tuple xs = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    cdef tuple ys = (out.shape[0], out.shape[1], out.shape[2], out.shape[3])
    _check("max_pool_forward", xs, ys, kh, kw, sh, sw, ph, pw, dh, dw)
    cdef bint with_idx = indices is not None
    if with_idx and (indices.shape[0], indices.shape[1], indices.shape[2],
                     indices.shape[3]) != ys:
        raise ValueError(f"max_pool_forward: indices must have the output's shape {ys}")
    cdef Py_ssize_t N = xs[0], C = xs[1], H = xs[2], W = xs[3], oh = ys[2], ow = ys[3]
    cdef Py_ssize_t n_planes = N * C, HW = H * W, P = oh * ow
    if n_planes == 0 or P == 0:
        return
    # per output row i: the taps p in [r_lo, r_hi) inside the plane and the first tap's row;
    # per output column j: the first tap's column; per tap column q: the outputs j in
    # [q_lo, q_hi) whose column j*sw - pw + q*dw is inside the plane
    cdef Py_ssize_t* lim = <Py_ssize_t*>malloc((3 * oh + ow + 2 * kw) * sizeof(Py_ssize_t))
    if lim == NULL:
        raise MemoryError()
    cdef Py_ssize_t* r_lo = lim
    cdef Py_ssize_t* r_hi = lim + oh
    cdef Py_ssize_t* r_first = lim + 2 * oh
    cdef Py_ssize_t* c_first = lim + 3 * oh
    cdef Py_ssize_t* q_lo = lim + 3 * oh + ow
    cdef Py_ssize_t* q_hi = lim + 3 * oh + ow + kw
    cdef Py_ssize_t i, j, p, q, plane, row, off
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* src
    cdef floating* yp = &out[0, 0, 0, 0]
    cdef floating* yrow
    cdef int64_t* ip = &indices[0, 0, 0, 0] if with_idx else NULL
    cdef int64_t* arow
    cdef int64_t* scratch
    cdef floating v, b
    cdef int upd
    cdef int n_threads
    cdef int failed = 0
    cdef int* failed_p = &failed
    for i in range(oh):
        r_lo[i] = _first_inside(i * sh - ph, dh)
        r_first[i] = i * sh - ph + r_lo[i] * dh
        r_hi[i] = _end_inside(i * sh - ph, H, dh, kh)
    for j in range(ow):
        c_first[j] = j * sw - pw + _first_inside(j * sw - pw, dw) * dw
    for q in range(kw):
        q_lo[q] = _first_inside(q * dw - pw, sw)
        q_hi[q] = _end_inside(q * dw - pw, W, sw, ow)
        if q_lo[q] > q_hi[q]:
            q_lo[q] = q_hi[q]
    n_threads = (fc_omp_get_max_threads()
                 if n_planes * (HW + P * kh * kw) >= _MIN_PARALLEL_WORK else 1)
    try:
        with nogil, parallel(num_threads=n_threads):
            # without indices, the arguments still drive the NaN / first-maximum rule: a row of
            # them per thread
            scratch = <int64_t*>malloc(ow * sizeof(int64_t)) if ip == NULL else NULL
            if ip == NULL and scratch == NULL:
                failed_p[0] = 1
            for plane in prange(n_planes, schedule="static"):
                if ip != NULL or scratch != NULL:
                    for i in range(oh):
                        # one output row at a time, tap by tap in row-major window order, each
                        # tap a branch-free pass over the row's outputs (vectorizable)
                        yrow = yp + plane * P + i * ow
                        arow = ip + plane * P + i * ow if ip != NULL else scratch
                        for j in range(ow):
                            yrow[j] = -INFINITY
                            arow[j] = r_first[i] * W + c_first[j]
                        for p in range(r_lo[i], r_hi[i]):
                            row = i * sh - ph + p * dh
                            src = xp + plane * HW + row * W
                            for q in range(kw):
                                off = q * dw - pw
                                for j in range(q_lo[q], q_hi[q]):
                                    v = src[j * sw + off]
                                    b = yrow[j]
                                    # strictly greater keeps the first maximum; the first NaN
                                    # wins (plain IEEE comparisons: no -ffast-math)
                                    upd = (v > b) | ((v != v) & (b == b))
                                    if floating is float:
                                        yrow[j] = fc_pick_f(upd, v, b)
                                    else:
                                        yrow[j] = fc_pick_d(upd, v, b)
                                    arow[j] = fc_pick_i(upd, row * W + j * sw + off, arow[j])
            free(scratch)
    finally:
        free(lim)
    if failed:
        raise MemoryError()


def max_pool_backward(const floating[:, :, :, ::1] grad_out, const int64_t[:, :, :, ::1] indices,
                      floating[:, :, :, ::1] dx):
    """``dx`` from routing each ``grad_out`` entry to its index, adding where windows overlap.

    Parameters
    ----------
    grad_out : ndarray, shape (N, C, oh, ow), float32 or float64, C-contiguous
    indices : ndarray of int64, shape (N, C, oh, ow), C-contiguous
        Flat positions in the ``H*W`` plane, as `max_pool_forward` writes them.
    dx : ndarray, shape (N, C, H, W), same dtype, C-contiguous
        Overwritten.

    Raises
    ------
    ValueError
        If an index lies outside ``[0, H*W)`` (``dx`` is then zero where it was skipped).
    """
    cdef tuple gs = (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2], grad_out.shape[3])
    cdef tuple xs = (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3])
    if (indices.shape[0], indices.shape[1], indices.shape[2], indices.shape[3]) != gs:
        raise ValueError(f"max_pool_backward: indices must have grad_out's shape {gs}")
    if gs[:2] != xs[:2]:
        raise ValueError(f"max_pool_backward: grad_out of shape {gs} and dx of shape {xs} "
                         "differ in (N, C)")
    cdef Py_ssize_t n_planes = xs[0] * xs[1], HW = xs[2] * xs[3], P = gs[2] * gs[3]
    cdef Py_ssize_t plane, e, k, bad = 0
    cdef const floating* gp = &grad_out[0, 0, 0, 0] if n_planes * P > 0 else NULL
    cdef const int64_t* ip = &indices[0, 0, 0, 0] if n_planes * P > 0 else NULL
    cdef floating* dp = &dx[0, 0, 0, 0] if n_planes * HW > 0 else NULL
    cdef floating* d
    cdef int n_threads
    if n_planes == 0 or HW == 0:
        return
    n_threads = fc_omp_get_max_threads() if n_planes * (HW + P) >= _MIN_PARALLEL_WORK else 1
    for plane in prange(n_planes, nogil=True, schedule="static", num_threads=n_threads):
        d = dp + plane * HW
        memset(d, 0, HW * sizeof(floating))
        for e in range(P):
            k = ip[plane * P + e]
            if 0 <= k < HW:
                d[k] = d[k] + gp[plane * P + e]
            else:
                bad += 1
    if bad:
        raise ValueError(f"max_pool_backward: {bad} indices lie outside [0, {HW}), the "
                         f"{xs[2]}x{xs[3]} input plane")
