# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""Max-pool forward and backward for NCHW arrays (Cython, nogil).

Semantics are PyTorch's (see DESIGN.md section 1): windows padded with ``-inf``, dilation,
``ceil_mode`` (through the output size the caller passes), the index of a window's maximum is the
*first* maximum in row-major window order, and a NaN is the maximum (the first NaN wins). Indices
are flat positions in the unpadded ``H*W`` plane. NaN tests are plain IEEE comparisons, so this
file must not be compiled with ``-ffast-math``.

Both directions are *part* functions of fastconv's thread pool (see fastconv._threads): every
thread running a call claims ``(n, c)`` planes from the shared ``counter`` until none are left,
one writer per plane. Backward adds the gradients of overlapping windows in a fixed order, so the
result does not depend on the threads.

Inputs are validated upstream (see ``fastconv._validate``). These cores check only what they need
to not crash with bounds checking off: the geometry and the shapes once per call, and each index
of backward, raising ``ValueError``.
"""

from cython cimport floating
from libc.math cimport INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

from ._geom cimport Geom, claim, end_inside, first_inside, geom

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

cdef int _check(str name, Geom g, tuple x_shape, tuple y_shape) except -1:
    if x_shape != (g.N, g.C, g.H, g.W) or y_shape != (g.N, g.C, g.oh, g.ow):
        raise ValueError(f"{name}: input of shape {x_shape} and output of shape {y_shape} do "
                         f"not fit the geometry {g}")
    return 0


def max_pool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                     int64_t[:, :, :, ::1] indices, tuple geometry, int64_t[::1] counter):
    """Max over the windows of ``x``: ``out[n, c, i, j]`` and, unless None, its index.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64, C-contiguous
        Not modified.
    out : ndarray, shape (N, C, oh, ow), same dtype, C-contiguous
        Overwritten.
    indices : ndarray of int64, shape (N, C, oh, ow), or None
        Overwritten with ``row*W + col`` of each maximum in the unpadded plane.
    geometry : tuple
        The `Geom` fields: window ``(i, j)`` covers rows ``i*sh - pt + p*dh``, ``0 <= p < kh``,
        and columns ``j*sw - pl + q*dw``, ``0 <= q < kw`` (the bottom/right padding is implied
        by ``oh, ow``; ``ceil_mode`` is the caller's business).
    counter : ndarray of int64, shape (1,)
        The planes this call's threads claim (see fastconv._threads.run).

    Notes
    -----
    Taps outside the plane are skipped: they count as ``-inf``. A window with no tap inside
    gives ``-inf`` and the index of its first tap at or after row and column 0 (PyTorch's).
    """
    cdef Geom g = geom(geometry)
    _check("max_pool_forward", g, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
           (out.shape[0], out.shape[1], out.shape[2], out.shape[3]))
    cdef bint with_idx = indices is not None
    if with_idx and (indices.shape[0], indices.shape[1], indices.shape[2],
                     indices.shape[3]) != (g.N, g.C, g.oh, g.ow):
        raise ValueError("max_pool_forward: indices must have the output's shape")
    cdef Py_ssize_t H = g.H, W = g.W, oh = g.oh, ow = g.ow, kh = g.kh, kw = g.kw
    cdef Py_ssize_t sh = g.sh, sw = g.sw, ph = g.pt, pw = g.pl, dh = g.dh, dw = g.dw
    cdef Py_ssize_t n_planes = g.N * g.C, HW = H * W, P = oh * ow
    # per output row i: the taps p in [r_lo, r_hi) inside the plane and the first tap's row;
    # per output column j: the first tap's column; per tap column q: the outputs j in
    # [q_lo, q_hi) whose column j*sw - pw + q*dw is inside the plane; and, without indices,
    # a row of arguments (they still drive the NaN / first-maximum rule)
    cdef Py_ssize_t* lim = <Py_ssize_t*>malloc((3 * oh + ow + 2 * kw) * sizeof(Py_ssize_t))
    cdef int64_t* scratch = <int64_t*>malloc(ow * sizeof(int64_t)) if not with_idx else NULL
    if lim == NULL or (not with_idx and scratch == NULL):
        free(lim)
        free(scratch)
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
    cdef int64_t* cp = &counter[0]
    cdef floating v, b
    cdef int upd
    for i in range(oh):
        r_lo[i] = first_inside(i * sh - ph, dh)
        r_first[i] = i * sh - ph + r_lo[i] * dh
        r_hi[i] = end_inside(i * sh - ph, H, dh, kh)
    for j in range(ow):
        c_first[j] = j * sw - pw + first_inside(j * sw - pw, dw) * dw
    for q in range(kw):
        q_lo[q] = first_inside(q * dw - pw, sw)
        q_hi[q] = end_inside(q * dw - pw, W, sw, ow)
        if q_lo[q] > q_hi[q]:
            q_lo[q] = q_hi[q]
    with nogil:
        plane = claim(cp)
        while plane < n_planes:
            for i in range(oh):
                # one output row at a time, tap by tap in row-major window order, each tap a
                # branch-free pass over the row's outputs (vectorizable)
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
                            # strictly greater keeps the first maximum; the first NaN wins
                            # (plain IEEE comparisons: no -ffast-math)
                            upd = (v > b) | ((v != v) & (b == b))
                            if floating is float:
                                yrow[j] = fc_pick_f(upd, v, b)
                            else:
                                yrow[j] = fc_pick_d(upd, v, b)
                            arow[j] = fc_pick_i(upd, row * W + j * sw + off, arow[j])
            plane = claim(cp)
    free(scratch)
    free(lim)


def max_pool_backward(const floating[:, :, :, ::1] grad_out, const int64_t[:, :, :, ::1] indices,
                      floating[:, :, :, ::1] dx, int64_t[::1] counter):
    """``dx`` from adding each ``grad_out`` entry at its index, plane by plane, in order.

    Parameters
    ----------
    grad_out : ndarray, shape (N, C, oh, ow), float32 or float64, C-contiguous
    indices : ndarray of int64, shape (N, C, oh, ow), C-contiguous
        Flat positions in the ``H*W`` plane.
    dx : ndarray, shape (N, C, H, W), same dtype, C-contiguous
        Overwritten.
    counter : ndarray of int64, shape (1,)
        The planes this call's threads claim.

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
    if n_planes * HW == 0:
        return
    cdef Py_ssize_t plane, e, k, t, bad = 0
    cdef const floating* gp = &grad_out[0, 0, 0, 0] if P > 0 else NULL
    cdef const int64_t* ip = &indices[0, 0, 0, 0] if P > 0 else NULL
    cdef floating* dp = &dx[0, 0, 0, 0]
    cdef floating* d
    cdef int64_t* cp = &counter[0]
    with nogil:
        plane = claim(cp)
        while plane < n_planes:
            d = dp + plane * HW
            for t in range(HW):
                d[t] = 0
            for e in range(P):
                k = ip[plane * P + e]
                if 0 <= k < HW:
                    d[k] = d[k] + gp[plane * P + e]
                else:
                    bad += 1
            plane = claim(cp)
    if bad:
        raise ValueError(f"max_pool_backward: {bad} indices lie outside [0, {HW}), the "
                         f"{xs[2]}x{xs[3]} input plane")


# ---------------------------------------------------------------------------------------------
# average pools: fixed and adaptive windows alike, from their window tables (see
# fastconv.kernels._window.box_windows); double accumulators


cdef int _check_box(str name, tuple x_shape, tuple y_shape, const int64_t[:, ::1] rows,
                    const int64_t[:, ::1] cols) except -1:
    cdef Py_ssize_t i
    if x_shape[:2] != y_shape[:2] or rows.shape[0] != y_shape[2] or cols.shape[0] != y_shape[3] \
            or rows.shape[1] != 3 or cols.shape[1] != 3:
        raise ValueError(f"{name}: input of shape {x_shape}, output of shape {y_shape} and "
                         f"window tables of {rows.shape[0]} and {cols.shape[0]} rows do not fit")
    for i in range(rows.shape[0]):
        if not 0 <= rows[i, 0] <= rows[i, 1] <= x_shape[2]:
            raise ValueError(f"{name}: window row {i} is outside the input")
    for i in range(cols.shape[0]):
        if not 0 <= cols[i, 0] <= cols[i, 1] <= x_shape[3]:
            raise ValueError(f"{name}: window column {i} is outside the input")
    return 0


def box_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                const int64_t[:, ::1] rows, const int64_t[:, ::1] cols, int64_t[::1] counter):
    """``out[n, c, i, j]``: the sum of window (i, j) of plane (n, c) over its divisor.

    Window row ``i`` spans input rows ``rows[i, 0] <= h < rows[i, 1]`` and its divisor is
    ``rows[i, 2] * cols[j, 2]``; columns likewise. Planes are claimed from ``counter``.
    """
    cdef tuple xs = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    cdef tuple ys = (out.shape[0], out.shape[1], out.shape[2], out.shape[3])
    _check_box("box_forward", xs, ys, rows, cols)
    cdef Py_ssize_t n_planes = xs[0] * xs[1], H = xs[2], W = xs[3], oh = ys[2], ow = ys[3]
    if n_planes * oh * ow == 0:
        return
    cdef double* acc = <double*>malloc(W * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    cdef Py_ssize_t plane, i, j, r, q
    cdef const floating* src
    cdef double total
    cdef int64_t* cp = &counter[0]
    with nogil:
        plane = claim(cp)
        while plane < n_planes:
            for i in range(oh):
                for q in range(W):
                    acc[q] = 0
                for r in range(rows[i, 0], rows[i, 1]):
                    src = &x[0, 0, 0, 0] + (plane * H + r) * W
                    for q in range(W):
                        acc[q] += src[q]
                for j in range(ow):
                    total = 0
                    for q in range(cols[j, 0], cols[j, 1]):
                        total += acc[q]
                    (&out[0, 0, 0, 0])[(plane * oh + i) * ow + j] = <floating>(
                        total / (rows[i, 2] * cols[j, 2]))
            plane = claim(cp)
    free(acc)


def box_backward(const floating[:, :, :, ::1] grad_out, floating[:, :, :, ::1] dx,
                 const int64_t[:, ::1] rows, const int64_t[:, ::1] cols, int64_t[::1] counter):
    """``dx``, overwritten: each ``grad_out`` entry over its divisor, added to every pixel of
    its window, plane by plane in a fixed order. Planes are claimed from ``counter``."""
    cdef tuple gs = (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2], grad_out.shape[3])
    cdef tuple xs = (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3])
    _check_box("box_backward", xs, gs, rows, cols)
    cdef Py_ssize_t n_planes = xs[0] * xs[1], H = xs[2], W = xs[3], oh = gs[2], ow = gs[3]
    if n_planes * H * W == 0:
        return
    cdef double* buf = <double*>malloc((W + H * W) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef double* spread = buf
    cdef double* acc = buf + W
    cdef Py_ssize_t plane, i, j, r, q, t
    cdef double v
    cdef floating* d
    cdef int64_t* cp = &counter[0]
    with nogil:
        plane = claim(cp)
        while plane < n_planes:
            for t in range(H * W):
                acc[t] = 0
            for i in range(oh):
                for q in range(W):
                    spread[q] = 0
                for j in range(ow):
                    v = (&grad_out[0, 0, 0, 0])[(plane * oh + i) * ow + j] / (
                        rows[i, 2] * cols[j, 2])
                    for q in range(cols[j, 0], cols[j, 1]):
                        spread[q] += v
                for r in range(rows[i, 0], rows[i, 1]):
                    for q in range(W):
                        acc[r * W + q] += spread[q]
            d = &dx[0, 0, 0, 0] + plane * H * W
            for t in range(H * W):
                d[t] = <floating>acc[t]
            plane = claim(cp)
    free(buf)
