# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""im2col / col2im for NCHW arrays, and the fused im2col + GEMM conv kernels (Cython, nogil,
OpenMP ``prange``, BLAS from ``scipy.linalg.cython_blas``).

Inputs are validated upstream (see ``fastconv._validate``). These cores check only what they
need to not crash with bounds checking off: the integer parameters, channel ranges and array
shapes, once per call, raising ``ValueError``.

Layout of ``cols`` for channels ``c0 <= c < c1``, with ``c`` counted from ``c0``::

    cols[(c*kh + r)*kw + s, (n*oh + i)*ow + j] = x[n, c0 + c, i*sh - pad_top + r*dh,
                                                 j*sw - pad_left + s*dw]

or 0 where that position lies outside the input. Padding therefore needs no padded copy of
``x``: top/left padding is ``pad_top``/``pad_left`` and bottom/right padding is implied by
``oh``/``ow``.

`im2col` and `col2im` work on a whole column matrix. The conv kernels (`conv_forward`,
`conv_backward_weight`, `conv_backward_input`) use the same layout on *tiles*: one OpenMP
region in which each thread unfolds a cache-sized slab of columns (a range of output rows
``n*oh + i`` of the batch-folded matrix) into a private buffer and multiplies it with one
single-threaded BLAS call, so that the unfolded data is consumed while it is still in cache and
no second thread pool (BLAS's) wakes up while OpenMP's is spinning. The caller must hold BLAS at
one thread while they run with more than one OpenMP thread (see
``fastconv.kernels.im2col``); they are correct, only slower, if it does not.
"""

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cdef extern from "_omp_compat.h" nogil:
    int fc_openmp_enabled()
    void fc_omp_set_num_threads(int n)
    int fc_omp_get_max_threads()

cdef extern from *:
    """
    #include <time.h>
    static double fc_wall_time(void) {
        struct timespec ts;
        timespec_get(&ts, TIME_UTC);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    """
    double fc_wall_time() nogil

OPENMP_ENABLED = bool(fc_openmp_enabled())

# Calls that move fewer elements than this run on one thread: starting a team costs more.
cdef Py_ssize_t _MIN_PARALLEL_WORK = 1 << 15

# BLAS int arguments are 32-bit (LP64); sizes stay a margin below, as offsets are multiples.
cdef Py_ssize_t _BLAS_INT_MAX = 2147483647
#: The largest output plane (OH*OW), reduction (C/groups*R*S) or channel count the kernels take.
BLAS_SIZE_LIMIT = _BLAS_INT_MAX // 64

# ---------------------------------------------------------------------------------------------
# BLAS: the gemm of scipy.linalg.cython_blas, looked up at import through its C-API capsules so
# that building fastconv needs no scipy headers.

ctypedef void (*_sgemm_t)(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*,
                          float*, float*, int*) noexcept nogil
ctypedef void (*_dgemm_t)(char*, char*, int*, int*, int*, double*, double*, int*, double*, int*,
                          double*, double*, int*) noexcept nogil

cdef _sgemm_t _sgemm = NULL
cdef _dgemm_t _dgemm = NULL

#: None when the conv kernels can call BLAS, else why not.
BLAS_UNAVAILABLE = None


cdef void* _capsule_pointer(dict capi, str name) except NULL:
    capsule = capi[name]
    return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


def _load_blas():
    global _sgemm, _dgemm
    from scipy.linalg import cython_blas

    capi = cython_blas.__pyx_capi__
    _sgemm = <_sgemm_t>_capsule_pointer(capi, "sgemm")
    _dgemm = <_dgemm_t>_capsule_pointer(capi, "dgemm")


try:
    _load_blas()
except Exception as e:  # scipy missing, or a build without cython_blas
    BLAS_UNAVAILABLE = f"scipy.linalg.cython_blas cannot be loaded ({type(e).__name__}: {e})"


cdef inline void _gemm(char ta, char tb, int m, int n, int k, const floating* a, int lda,
                       const floating* b, int ldb, floating beta, floating* c,
                       int ldc) noexcept nogil:
    """Column-major ``C = op(A) @ op(B) + beta * C`` (BLAS gemm with alpha = 1)."""
    cdef floating alpha = 1
    if floating is float:
        _sgemm(&ta, &tb, &m, &n, &k, &alpha, <float*>a, &lda, <float*>b, &ldb, &beta, c, &ldc)
    else:
        _dgemm(&ta, &tb, &m, &n, &k, &alpha, <double*>a, &lda, <double*>b, &ldb, &beta, c, &ldc)


# ---------------------------------------------------------------------------------------------
# threads


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


# ---------------------------------------------------------------------------------------------
# the two loops everything is built from


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


cdef inline void _unfold_row(const floating* xc, Py_ssize_t x_sn, Py_ssize_t x_sh,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t off_h, Py_ssize_t off_w,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t oh, Py_ssize_t ow,
                             Py_ssize_t g0, Py_ssize_t g1, floating* dst) noexcept nogil:
    """One row ``(c, r, s)`` of a column matrix, for the output rows ``g = n*oh + i`` in [g0, g1).

    ``dst[(g - g0)*ow + j] = xc[n*x_sn + (i*sh + off_h)*x_sh + j*sw + off_w]``, or 0 where that
    lies outside the ``H x W`` plane; ``xc`` points to channel ``c`` of image 0 and
    ``off_h = r*dh - pad_top``, ``off_w = s*dw - pad_left``. Each output row is a zero run, a
    copied run (``memcpy`` when ``sw == 1``) and a zero run, with the limits computed once.
    """
    cdef Py_ssize_t i_lo, i_hi, j_lo, j_hi, g, n, i, j
    cdef floating* d
    cdef const floating* src
    i_hi = _end_inside(off_h, H, sh, oh)
    i_lo = _first_inside(off_h, sh)
    if i_lo > i_hi:
        i_lo = i_hi
    j_hi = _end_inside(off_w, W, sw, ow)
    j_lo = _first_inside(off_w, sw)
    if j_lo > j_hi:
        j_lo = j_hi
    n = g0 // oh
    i = g0 - n * oh
    for g in range(g0, g1):
        d = dst + (g - g0) * ow
        if i < i_lo or i >= i_hi:
            memset(d, 0, ow * sizeof(floating))
        else:
            src = xc + n * x_sn + (i * sh + off_h) * x_sh
            if j_lo > 0:
                memset(d, 0, j_lo * sizeof(floating))
            if sw == 1:
                memcpy(d + j_lo, src + j_lo + off_w, (j_hi - j_lo) * sizeof(floating))
            else:
                for j in range(j_lo, j_hi):
                    d[j] = src[j * sw + off_w]
            if j_hi < ow:
                memset(d + j_hi, 0, (ow - j_hi) * sizeof(floating))
        i += 1
        if i == oh:
            i = 0
            n += 1


cdef inline void _fold_plane(const floating* src0, Py_ssize_t ld, floating* plane,
                             Py_ssize_t p_sh, Py_ssize_t H, Py_ssize_t W, Py_ssize_t kh,
                             Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pad_top,
                             Py_ssize_t pad_left, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t oh,
                             Py_ssize_t ow) noexcept nogil:
    """Overwrite one ``H x W`` plane (row stride ``p_sh``) with the fold of its ``kh*kw`` rows.

    Row ``r*kw + s`` of the columns starts at ``src0 + (r*kw + s)*ld`` and holds this image's
    ``oh*ow`` outputs. The plane is zeroed, then every in-bounds entry is added to the pixel it
    was copied from, in the fixed order ``(r, s, i, j)``: one writer, a deterministic sum.
    """
    cdef Py_ssize_t r, s, i, j, ih, off_h, off_w, i_lo, i_hi, j_lo, j_hi
    cdef floating* dst
    cdef const floating* src
    for ih in range(H):
        memset(plane + ih * p_sh, 0, W * sizeof(floating))
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
            for i in range(i_lo, i_hi):
                src = src0 + (r * kw + s) * ld + i * ow
                dst = plane + (i * sh + off_h) * p_sh
                if sw == 1:
                    dst = dst + off_w
                    for j in range(j_lo, j_hi):
                        dst[j] = dst[j] + src[j]
                else:
                    for j in range(j_lo, j_hi):
                        dst[j * sw + off_w] = dst[j * sw + off_w] + src[j]


# ---------------------------------------------------------------------------------------------
# whole-matrix im2col / col2im


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
    cdef Py_ssize_t x_sn = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_sc = x.strides[1] // sizeof(floating)
    cdef Py_ssize_t x_sh = x.strides[2] // sizeof(floating)
    cdef Py_ssize_t row, c, r, s
    cdef int n_threads
    if n_rows == 0 or N * plane == 0:
        return
    n_threads = fc_omp_get_max_threads() if n_rows * N * plane >= _MIN_PARALLEL_WORK else 1

    for row in prange(n_rows, nogil=True, schedule="static", num_threads=n_threads):
        c = c0 + row // khw
        r = (row // kw) % kh
        s = row % kw
        _unfold_row(&x[0, 0, 0, 0] + c * x_sc, x_sn, x_sh, H, W, r * dh - pad_top,
                    s * dw - pad_left, sh, sw, oh, ow, 0, N * oh, &cols[row, 0])


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
    cdef Py_ssize_t khw = <Py_ssize_t>kh * kw, plane = <Py_ssize_t>oh * ow
    cdef Py_ssize_t ld = cols.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_sh = dx.strides[2] // sizeof(floating)
    cdef Py_ssize_t p, n, cc
    cdef int n_threads
    if n_planes == 0:
        return
    n_threads = (fc_omp_get_max_threads()
                 if n_planes * (H * W + khw * plane) >= _MIN_PARALLEL_WORK
                 else 1)

    for p in prange(n_planes, nogil=True, schedule="static", num_threads=n_threads):
        n = p // n_chan
        cc = p % n_chan
        # with no outputs (plane == 0) cols has no columns: only zero the plane
        _fold_plane(&cols[0, 0] + cc * khw * ld + n * plane if plane > 0 else NULL, ld,
                    &dx[n, c0 + cc, 0, 0], dx_sh, H, W, kh, kw, sh, sw, pad_top, pad_left,
                    dh, dw, oh, ow)


# ---------------------------------------------------------------------------------------------
# fused conv kernels: tiles of columns, one BLAS call per (tile, group)


cdef int _check_conv(str name, tuple x_shape, Py_ssize_t K, Py_ssize_t w_cols, tuple y_shape,
                     int kh, int kw, int sh, int sw, int dh, int dw, int groups,
                     int n_threads) except -1:
    """Shapes and parameters shared by the conv kernels. ``y`` is the output-shaped array."""
    N, C = x_shape[0], x_shape[1]
    if BLAS_UNAVAILABLE is not None:
        raise RuntimeError(f"{name}: {BLAS_UNAVAILABLE}")
    if (kh < 1 or kw < 1 or sh < 1 or sw < 1 or dh < 1 or dw < 1 or groups < 1
            or n_threads < 1):
        raise ValueError(
            f"{name}: need kh, kw, sh, sw, dh, dw, groups, n_threads >= 1, got kh={kh}, "
            f"kw={kw}, sh={sh}, sw={sw}, dh={dh}, dw={dw}, groups={groups}, "
            f"n_threads={n_threads}")
    if min(x_shape) < 1:
        raise ValueError(f"{name}: x of shape {x_shape} has an empty dimension")
    if C % groups or K % groups or w_cols != (C // groups) * kh * kw:
        raise ValueError(
            f"{name}: weight matrix of shape ({K}, {w_cols}) does not fit x of shape "
            f"{x_shape} with groups={groups} and kernel ({kh}, {kw})")
    if y_shape[0] != N or y_shape[1] != K or y_shape[2] < 1 or y_shape[3] < 1:
        raise ValueError(
            f"{name}: output-shaped array has shape {y_shape}, expected ({N}, {K}, oh, ow) "
            f"with oh, ow >= 1")
    if max(y_shape[2] * y_shape[3], w_cols, K) > _BLAS_INT_MAX // 64:
        raise ValueError(f"{name}: sizes exceed the 32-bit BLAS interface")
    return 0


cdef bint _c_contiguous4(tuple shape, Py_ssize_t* strides, Py_ssize_t item):
    return (strides[3] == item and strides[2] == shape[3] * item
            and strides[1] == shape[2] * shape[3] * item
            and strides[0] == shape[1] * shape[2] * shape[3] * item)


cdef inline bint _pointwise(Py_ssize_t H, Py_ssize_t W, Py_ssize_t kh, Py_ssize_t kw,
                            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pad_top,
                            Py_ssize_t pad_left, Py_ssize_t oh, Py_ssize_t ow) noexcept nogil:
    """A 1x1 convolution with stride 1 and no padding: its columns are the input planes."""
    return (kh == 1 and kw == 1 and sh == 1 and sw == 1 and pad_top == 0 and pad_left == 0
            and oh == H and ow == W)


cdef inline void _unfold_group(const floating* xp, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                               Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t pad_top, Py_ssize_t pad_left, Py_ssize_t dh,
                               Py_ssize_t dw, Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t c0,
                               Py_ssize_t crs, Py_ssize_t g0, Py_ssize_t g1,
                               floating* buf) noexcept nogil:
    """The columns of output rows [g0, g1) for the ``crs`` rows of a group (channels from c0):
    ``buf`` is a column-major ``(T x crs)`` tile, ``T = (g1 - g0)*ow``."""
    cdef Py_ssize_t khw = kh * kw, T = (g1 - g0) * ow, row, c
    for row in range(crs):
        c = c0 + row // khw
        _unfold_row(xp + c * H * W, C * H * W, W, H, W, ((row // kw) % kh) * dh - pad_top,
                    (row % kw) * dw - pad_left, sh, sw, oh, ow, g0, g1, buf + row * T)


cdef void _forward_tile(const floating* xp, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                        const floating* wp, const floating* bp, floating* yp, Py_ssize_t K,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t pad_top, Py_ssize_t pad_left, Py_ssize_t dh, Py_ssize_t dw,
                        Py_ssize_t oh, Py_ssize_t ow, Py_ssize_t groups, Py_ssize_t g0,
                        Py_ssize_t g1, bint direct, floating* buf, floating* prod,
                        double* times) noexcept nogil:
    """Output rows [g0, g1) of every channel: unfold, GEMM per group, store with the bias.

    ``direct``: one GEMM per group and image the tile touches, writing straight into ``out``
    (``ldc = oh*ow``), then the bias added in place; else one GEMM per group into ``prod``
    (``K x T``), then copied to ``out`` with the bias.
    """
    cdef Py_ssize_t khw = kh * kw, Cg = C // groups, Kg = K // groups, crs = Cg * khw
    cdef Py_ssize_t T = (g1 - g0) * ow, plane = oh * ow, grp, k, g, n, i, j, seg
    cdef double t0 = 0, t1 = 0, t2 = 0, t_store = 0
    cdef floating* d
    cdef const floating* s
    cdef const floating* cols
    cdef floating bk
    # 1x1, stride 1, no padding: the columns of an image are its input planes, read in place
    cdef bint in_place = direct and _pointwise(H, W, kh, kw, sh, sw, pad_top, pad_left, oh, ow)
    for grp in range(groups):
        if times != NULL:
            t0 = fc_wall_time()
        if not in_place:
            _unfold_group(xp, C, H, W, kh, kw, sh, sw, pad_top, pad_left, dh, dw, oh, ow,
                          grp * Cg, crs, g0, g1, buf)
        if times != NULL:
            t1 = fc_wall_time()
            times[0] += t1 - t0
        if direct:
            g = g0
            n = g0 // oh
            i = g0 - n * oh
            while g < g1:
                seg = oh - i if oh - i < g1 - g else g1 - g
                # column-major: out[n, k0:k1, i:i+seg] (seg*ow x Kg, ld plane) =
                #   columns (seg*ow x crs: buf rows, ld T; or x[n, c0:c1, i:i+seg], ld plane)
                #   @ w[k0:k1].T (crs x Kg)
                if in_place:
                    cols = xp + (n * C + grp * Cg) * plane + i * ow
                else:
                    cols = buf + (g - g0) * ow
                _gemm(c'N', c'N', <int>(seg * ow), <int>Kg, <int>crs, cols,
                      <int>(plane if in_place else T), wp + grp * Kg * crs, <int>crs, 0,
                      yp + (n * K + grp * Kg) * plane + i * ow, <int>plane)
                if bp != NULL:
                    t2 = fc_wall_time() if times != NULL else 0
                    for k in range(grp * Kg, (grp + 1) * Kg):
                        d = yp + (n * K + k) * plane + i * ow
                        bk = bp[k]
                        for j in range(seg * ow):
                            d[j] = d[j] + bk
                    if times != NULL:
                        t_store += fc_wall_time() - t2
                g += seg
                n += 1
                i = 0
        else:
            # column-major: prod[k0:k1, :] (T x Kg) = buf (T x crs) @ w[k0:k1].T (crs x Kg)
            _gemm(c'N', c'N', <int>T, <int>Kg, <int>crs, buf, <int>T, wp + grp * Kg * crs,
                  <int>crs, 0, prod + grp * Kg * T, <int>T)
        if times != NULL:
            times[1] += fc_wall_time() - t1 - t_store
            times[2] += t_store
            t_store = 0
    if direct:
        return
    if times != NULL:
        t0 = fc_wall_time()
    for k in range(K):
        bk = bp[k] if bp != NULL else 0
        n = g0 // oh
        i = g0 - n * oh
        for g in range(g0, g1):
            d = yp + (n * K + k) * plane + i * ow
            s = prod + k * T + (g - g0) * ow
            if bp != NULL:
                for j in range(ow):
                    d[j] = s[j] + bk
            else:
                memcpy(d, s, ow * sizeof(floating))
            i += 1
            if i == oh:
                i = 0
                n += 1
    if times != NULL:
        times[2] += fc_wall_time() - t0


def conv_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w,
                 const floating[::1] bias, floating[:, :, :, ::1] out, int kh, int kw, int sh,
                 int sw, int pad_top, int pad_left, int dh, int dw, int groups, int tile_rows,
                 int n_threads, bint direct=True, double[:, ::1] times=None):
    """``out = conv2d(x, w) + bias`` by im2col + GEMM on tiles of the batch-folded columns.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), C-contiguous
    w : ndarray, shape (K, (C // groups)*kh*kw), C-contiguous
        The weights ``(K, C // groups, kh, kw)`` reshaped.
    bias : ndarray, shape (K,), or None
    out : ndarray, shape (N, K, oh, ow), C-contiguous
        Overwritten; ``oh, ow`` are taken from its shape.
    kh, kw, sh, sw, pad_top, pad_left, dh, dw : int
        As for `im2col`.
    groups : int
    tile_rows : int
        Output rows ``n*oh + i`` per tile: each tile is ``tile_rows*ow`` columns.
    n_threads : int
        OpenMP threads; tiles are handed out dynamically (each writes its own outputs, so the
        result does not depend on the schedule).
    direct : bool
        True: one GEMM per group and per image a tile touches, writing into ``out`` in place
        (best when a tile spans few images, or the weights are small: each call packs them).
        False: one GEMM per group and tile into a product buffer, then copied to ``out``.
    times : ndarray, shape (n_threads, 3), float64, optional
        Seconds spent per thread unfolding, in GEMMs and storing the output, added to.

    Notes
    -----
    Each thread owns a column buffer of ``(C // groups)*kh*kw x tile_rows*ow`` elements and,
    unless ``direct``, a product buffer of ``K x tile_rows*ow``, allocated once per call.
    """
    cdef tuple xs = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    cdef tuple ys = (out.shape[0], out.shape[1], out.shape[2], out.shape[3])
    cdef Py_ssize_t K = w.shape[0]
    _check_conv("conv_forward", xs, K, w.shape[1], ys, kh, kw, sh, sw, dh, dw, groups,
                n_threads)
    if not (_c_contiguous4(xs, x.strides, sizeof(floating))
            and _c_contiguous4(ys, out.strides, sizeof(floating))):
        raise ValueError("conv_forward: x and out must be C-contiguous")
    if bias is not None and bias.shape[0] != K:
        raise ValueError(f"conv_forward: bias has {bias.shape[0]} entries, expected {K}")
    if tile_rows < 1:
        raise ValueError(f"conv_forward: tile_rows must be >= 1, got {tile_rows}")
    if times is not None and (times.shape[0] < n_threads or times.shape[1] != 3):
        raise ValueError(f"conv_forward: times must have shape ({n_threads}, 3)")
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t oh = out.shape[2], ow = out.shape[3]
    cdef Py_ssize_t G = N * oh
    if tile_rows > G:
        tile_rows = <int>G
    cdef Py_ssize_t n_tiles = (G + tile_rows - 1) // tile_rows, T = tile_rows * ow
    if T > _BLAS_INT_MAX // 64:
        raise ValueError("conv_forward: tile_rows*ow exceeds the 32-bit BLAS interface")
    cdef Py_ssize_t crs = w.shape[1], t, g0, g1
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef const floating* wp = &w[0, 0]
    cdef const floating* bp = &bias[0] if bias is not None else NULL
    cdef floating* yp = &out[0, 0, 0, 0]
    cdef double* tp = &times[0, 0] if times is not None else NULL
    cdef int failed = 0
    cdef int* failed_p = &failed
    cdef floating* buf
    cdef floating* prod
    if n_tiles < n_threads:
        n_threads = <int>n_tiles

    with nogil, parallel(num_threads=n_threads):
        buf = <floating*>malloc(crs * T * sizeof(floating))
        prod = <floating*>malloc((1 if direct else K * T) * sizeof(floating))
        if buf == NULL or prod == NULL:
            failed_p[0] = 1
        for t in prange(n_tiles, schedule="dynamic"):
            if buf != NULL and prod != NULL:
                g0 = t * tile_rows
                g1 = g0 + tile_rows if g0 + tile_rows < G else G
                _forward_tile(xp, C, H, W, wp, bp, yp, K, kh, kw, sh, sw, pad_top, pad_left,
                              dh, dw, oh, ow, groups, g0, g1, direct, buf, prod,
                              tp + 3 * threadid() if tp != NULL else NULL)
        free(buf)
        free(prod)
    if failed:
        raise MemoryError("conv_forward: cannot allocate the per-thread tile buffers")


cdef void _weight_tile(const floating* gp, const floating* xp, floating* acc, Py_ssize_t C,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t K, Py_ssize_t kh, Py_ssize_t kw,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pad_top, Py_ssize_t pad_left,
                       Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t oh, Py_ssize_t ow,
                       Py_ssize_t groups, Py_ssize_t g0, Py_ssize_t g1, floating beta,
                       bint direct, floating* buf, floating* gbuf, double* times) noexcept nogil:
    """acc (K x crs) = beta*acc + grad_out[rows g0:g1] @ columns[rows g0:g1].T, per group.

    ``direct``: one GEMM per group and image the tile touches, reading grad_out in place
    (``ldb = oh*ow``); else grad_out's tile is first gathered into ``gbuf`` (``K x T``).
    """
    cdef Py_ssize_t khw = kh * kw, Cg = C // groups, Kg = K // groups, crs = Cg * khw
    cdef Py_ssize_t T = (g1 - g0) * ow, plane = oh * ow, grp, k, g, n, i, seg
    cdef double t0 = 0, t1 = 0, t2 = 0
    cdef floating b
    cdef const floating* cols
    cdef bint in_place = direct and _pointwise(H, W, kh, kw, sh, sw, pad_top, pad_left, oh, ow)
    if not direct:
        if times != NULL:
            t0 = fc_wall_time()
        for k in range(K):  # gather the tile of grad_out: gbuf[k, (g - g0)*ow + j]
            n = g0 // oh
            i = g0 - n * oh
            for g in range(g0, g1):
                memcpy(gbuf + k * T + (g - g0) * ow, gp + (n * K + k) * plane + i * ow,
                       ow * sizeof(floating))
                i += 1
                if i == oh:
                    i = 0
                    n += 1
        if times != NULL:
            times[2] += fc_wall_time() - t0
    for grp in range(groups):
        if times != NULL:
            t0 = fc_wall_time()
        if not in_place:
            _unfold_group(xp, C, H, W, kh, kw, sh, sw, pad_top, pad_left, dh, dw, oh, ow,
                          grp * Cg, crs, g0, g1, buf)
        if times != NULL:
            t1 = fc_wall_time()
            times[0] += t1 - t0
        if direct:
            g = g0
            n = g0 // oh
            i = g0 - n * oh
            b = beta
            while g < g1:
                seg = oh - i if oh - i < g1 - g else g1 - g
                # column-major: acc[k0:k1].T (crs x Kg) = b*acc[k0:k1].T
                #     + columns.T (crs x seg*ow; buf rows, or x[n, c0:c1, i:i+seg] in place)
                #     @ grad_out[n, k0:k1, i:i+seg].T (seg*ow x Kg)
                if in_place:
                    cols = xp + (n * C + grp * Cg) * plane + i * ow
                else:
                    cols = buf + (g - g0) * ow
                _gemm(c'T', c'N', <int>crs, <int>Kg, <int>(seg * ow), cols,
                      <int>(plane if in_place else T), gp + (n * K + grp * Kg) * plane + i * ow,
                      <int>plane, b, acc + grp * Kg * crs, <int>crs)
                b = 1
                g += seg
                n += 1
                i = 0
        else:
            # column-major: acc[k0:k1].T (crs x Kg) = b*acc[k0:k1].T
            #     + buf.T (crs x T) @ gbuf[k0:k1].T (T x Kg)
            _gemm(c'T', c'N', <int>crs, <int>Kg, <int>T, buf, <int>T, gbuf + grp * Kg * T,
                  <int>T, beta, acc + grp * Kg * crs, <int>crs)
        if times != NULL:
            t2 = fc_wall_time()
            times[1] += t2 - t1


def conv_backward_weight(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                         floating[:, ::1] grad_w, int kh, int kw, int sh, int sw, int pad_top,
                         int pad_left, int dh, int dw, int groups, int tile_rows, int n_slabs,
                         int n_threads, bint direct=True, double[:, ::1] times=None):
    """``grad_w = grad_out @ columns(x).T`` per group, on tiles of the batch-folded columns.

    Parameters
    ----------
    grad_out : ndarray, shape (N, K, oh, ow), C-contiguous
    x : ndarray, shape (N, C, H, W), C-contiguous
    grad_w : ndarray, shape (K, (C // groups)*kh*kw), C-contiguous
        Overwritten.
    tile_rows : int
        Output rows per tile, as for `conv_forward`.
    n_slabs : int
        The tiles are cut into this many contiguous slabs (at most one per tile). Each slab
        sums its tiles' products in order into its own accumulator (the first into ``grad_w``);
        the accumulators are added in slab order at the end. The result therefore depends on
        ``n_slabs`` and ``tile_rows`` only, not on the number of threads or the schedule: it is
        bit-identical run after run.
    direct : bool
        True: one GEMM per group and per image a tile touches, reading grad_out in place.
        False: grad_out's tile is gathered into a buffer first, then one GEMM per group.
    times : ndarray, shape (n_threads, 3), float64, optional
        Seconds per thread unfolding, in GEMMs, and gathering grad_out plus the final sum.

    Notes
    -----
    Memory: ``n_slabs - 1`` accumulators the size of ``grad_w``, and per thread a column buffer
    of ``(C // groups)*kh*kw x tile_rows*ow`` and, unless ``direct``, a gathered grad_out tile
    of ``K x tile_rows*ow`` elements.
    """
    cdef tuple xs = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    cdef tuple gs = (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2],
                         grad_out.shape[3])
    cdef Py_ssize_t K = grad_w.shape[0], crs = grad_w.shape[1]
    _check_conv("conv_backward_weight", xs, K, crs, gs, kh, kw, sh, sw, dh, dw, groups,
                n_threads)
    if not (_c_contiguous4(xs, x.strides, sizeof(floating))
            and _c_contiguous4(gs, grad_out.strides, sizeof(floating))
            and grad_w.strides[0] == crs * sizeof(floating)):
        raise ValueError("conv_backward_weight: grad_out, x and grad_w must be C-contiguous")
    if tile_rows < 1 or n_slabs < 1:
        raise ValueError(f"conv_backward_weight: tile_rows and n_slabs must be >= 1, got "
                         f"{tile_rows} and {n_slabs}")
    if times is not None and (times.shape[0] < n_threads or times.shape[1] != 3):
        raise ValueError(f"conv_backward_weight: times must have shape ({n_threads}, 3)")
    cdef Py_ssize_t N = xs[0], C = xs[1], H = xs[2], W = xs[3]
    cdef Py_ssize_t oh = grad_out.shape[2], ow = grad_out.shape[3]
    cdef Py_ssize_t G = N * oh
    if tile_rows > G:
        tile_rows = <int>G
    cdef Py_ssize_t n_tiles = (G + tile_rows - 1) // tile_rows, T = tile_rows * ow
    if T > _BLAS_INT_MAX // 64:
        raise ValueError("conv_backward_weight: tile_rows*ow exceeds the 32-bit BLAS interface")
    if n_slabs > n_tiles:
        n_slabs = <int>n_tiles
    cdef Py_ssize_t size = K * crs, sl, s2, t, t_end, g0, g1, e
    cdef const floating* gp = &grad_out[0, 0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* gwp = &grad_w[0, 0]
    cdef double* tp = &times[0, 0] if times is not None else NULL
    cdef floating* scratch = NULL
    cdef floating* acc
    cdef floating* buf
    cdef floating* gbuf
    cdef floating total
    cdef double t0 = 0
    cdef int failed = 0
    cdef int* failed_p = &failed
    if n_slabs > 1:
        scratch = <floating*>malloc((n_slabs - 1) * size * sizeof(floating))
        if scratch == NULL:
            raise MemoryError("conv_backward_weight: cannot allocate the slab accumulators")
    cdef int team = n_threads if n_threads < n_slabs else n_slabs

    try:
        with nogil, parallel(num_threads=team):
            buf = <floating*>malloc(crs * T * sizeof(floating))
            gbuf = <floating*>malloc((1 if direct else K * T) * sizeof(floating))
            if buf == NULL or gbuf == NULL:
                failed_p[0] = 1
            for sl in prange(n_slabs, schedule="dynamic"):
                if buf != NULL and gbuf != NULL:
                    acc = gwp if sl == 0 else scratch + (sl - 1) * size
                    t_end = (sl + 1) * n_tiles // n_slabs
                    for t in range(sl * n_tiles // n_slabs, t_end):
                        g0 = t * tile_rows
                        g1 = g0 + tile_rows if g0 + tile_rows < G else G
                        _weight_tile(gp, xp, acc, C, H, W, K, kh, kw, sh, sw, pad_top,
                                     pad_left, dh, dw, oh, ow, groups, g0, g1,
                                     0 if t == sl * n_tiles // n_slabs else 1, direct,
                                     buf, gbuf,
                                     tp + 3 * threadid() if tp != NULL else NULL)
            free(buf)
            free(gbuf)
        if failed:
            raise MemoryError("conv_backward_weight: cannot allocate the per-thread buffers")
        if n_slabs > 1:
            if tp != NULL:
                t0 = fc_wall_time()
            team = n_threads if size * n_slabs >= _MIN_PARALLEL_WORK else 1
            for e in prange(size, nogil=True, schedule="static", num_threads=team):
                total = gwp[e]
                for s2 in range(n_slabs - 1):
                    total = total + scratch[s2 * size + e]
                gwp[e] = total
            if tp != NULL:
                tp[2] += fc_wall_time() - t0
    finally:
        free(scratch)


cdef void _input_unit(const floating* gp, const floating* wp, floating* dxp, Py_ssize_t N,
                      Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t K, Py_ssize_t kh,
                      Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t pad_top,
                      Py_ssize_t pad_left, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t oh,
                      Py_ssize_t ow, Py_ssize_t groups, Py_ssize_t n0, Py_ssize_t n1,
                      Py_ssize_t grp, Py_ssize_t c_lo, Py_ssize_t c_hi, floating* buf,
                      floating* gbuf, double* times) noexcept nogil:
    """dx[n0:n1, grp*Cg + c_lo : grp*Cg + c_hi] = col2im(w[group, c_lo:c_hi].T @ grad_out)."""
    cdef Py_ssize_t khw = kh * kw, Cg = C // groups, Kg = K // groups, crs = Cg * khw
    cdef Py_ssize_t plane = oh * ow, M = (n1 - n0) * plane, nc = c_hi - c_lo, k, n, cc
    cdef const floating* a
    cdef Py_ssize_t lda
    cdef double t0 = 0, t1 = 0, t2 = 0
    if times != NULL:
        t0 = fc_wall_time()
    if _pointwise(H, W, kh, kw, sh, sw, pad_top, pad_left, oh, ow):
        # no col2im: dx[n, c_lo:c_hi] (plane x nc) = grad_out[n, k0:k1] @ w[k0:k1, c_lo:c_hi]
        for n in range(n0, n1):
            _gemm(c'N', c'T', <int>plane, <int>nc, <int>Kg, gp + (n * K + grp * Kg) * plane,
                  <int>plane, wp + grp * Kg * crs + c_lo, <int>crs, 0,
                  dxp + (n * C + grp * Cg + c_lo) * plane, <int>plane)
        if times != NULL:
            times[1] += fc_wall_time() - t0
        return
    if n1 - n0 == 1:  # grad_out[n0, k0:k1] is already a (plane x Kg) column-major matrix
        a = gp + (n0 * K + grp * Kg) * plane
        lda = plane
    else:
        for k in range(Kg):
            for n in range(n0, n1):
                memcpy(gbuf + k * M + (n - n0) * plane, gp + (n * K + grp * Kg + k) * plane,
                       plane * sizeof(floating))
        a = gbuf
        lda = M
    # column-major: buf (M x nc*khw) = grad_out (M x Kg) @ w[k0:k1, c_lo*khw : c_hi*khw]
    _gemm(c'N', c'T', <int>M, <int>(nc * khw), <int>Kg, a, <int>lda,
          wp + grp * Kg * crs + c_lo * khw, <int>crs, 0, buf, <int>M)
    if times != NULL:
        t1 = fc_wall_time()
        times[1] += t1 - t0
    for n in range(n0, n1):
        for cc in range(nc):
            _fold_plane(buf + cc * khw * M + (n - n0) * plane, M,
                        dxp + (n * C + grp * Cg + c_lo + cc) * H * W, W, H, W, kh, kw, sh, sw,
                        pad_top, pad_left, dh, dw, oh, ow)
    if times != NULL:
        t2 = fc_wall_time()
        times[2] += t2 - t1


def conv_backward_input(const floating[:, :, :, ::1] grad_out, const floating[:, ::1] w,
                        floating[:, :, :, ::1] dx, int kh, int kw, int sh, int sw, int pad_top,
                        int pad_left, int dh, int dw, int groups, int chan_block, int img_block,
                        int n_threads, double[:, ::1] times=None):
    """``dx = col2im(w.T @ grad_out)`` per group, on units of whole images and channel blocks.

    Parameters
    ----------
    grad_out : ndarray, shape (N, K, oh, ow), C-contiguous
    w : ndarray, shape (K, (C // groups)*kh*kw), C-contiguous
    dx : ndarray, shape (N, C, H, W), C-contiguous
        Overwritten.
    chan_block, img_block : int
        A unit of work is ``img_block`` images times ``chan_block`` input channels of one group:
        one GEMM gives its ``chan_block*kh*kw x img_block*oh*ow`` columns, folded at once onto
        those planes of ``dx``. Units write disjoint planes (race-free) and each plane is summed
        in a fixed order, so the result is bit-identical for any number of threads.
    times : ndarray, shape (n_threads, 3), float64, optional
        Seconds per thread: column 1 the GEMMs (with the grad_out gather), column 2 col2im.
    """
    cdef tuple xs = (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3])
    cdef tuple gs = (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2],
                         grad_out.shape[3])
    cdef Py_ssize_t K = w.shape[0], crs = w.shape[1]
    _check_conv("conv_backward_input", xs, K, crs, gs, kh, kw, sh, sw, dh, dw, groups,
                n_threads)
    if not (_c_contiguous4(xs, dx.strides, sizeof(floating))
            and _c_contiguous4(gs, grad_out.strides, sizeof(floating))):
        raise ValueError("conv_backward_input: grad_out and dx must be C-contiguous")
    if chan_block < 1 or img_block < 1:
        raise ValueError(f"conv_backward_input: chan_block and img_block must be >= 1, got "
                         f"{chan_block} and {img_block}")
    if times is not None and (times.shape[0] < n_threads or times.shape[1] != 3):
        raise ValueError(f"conv_backward_input: times must have shape ({n_threads}, 3)")
    cdef Py_ssize_t N = xs[0], C = xs[1], H = xs[2], W = xs[3]
    cdef Py_ssize_t oh = grad_out.shape[2], ow = grad_out.shape[3]
    cdef Py_ssize_t Cg = C // groups, Kg = K // groups, khw = <Py_ssize_t>kh * kw
    if chan_block > Cg:
        chan_block = <int>Cg
    if img_block > N:
        img_block = <int>N
    cdef Py_ssize_t M = img_block * oh * ow
    if M > _BLAS_INT_MAX // 64:
        raise ValueError("conv_backward_input: img_block*oh*ow exceeds the 32-bit BLAS interface")
    cdef Py_ssize_t n_img = (N + img_block - 1) // img_block
    cdef Py_ssize_t n_cb = (Cg + chan_block - 1) // chan_block
    cdef Py_ssize_t n_units = n_img * groups * n_cb, u, ib, grp, cb, n0, n1, c_lo, c_hi
    cdef const floating* gp = &grad_out[0, 0, 0, 0]
    cdef const floating* wp = &w[0, 0]
    cdef floating* dxp = &dx[0, 0, 0, 0]
    cdef double* tp = &times[0, 0] if times is not None else NULL
    cdef int failed = 0
    cdef int* failed_p = &failed
    cdef floating* buf
    cdef floating* gbuf
    if n_units < n_threads:
        n_threads = <int>n_units

    with nogil, parallel(num_threads=n_threads):
        buf = <floating*>malloc(chan_block * khw * M * sizeof(floating))
        gbuf = <floating*>malloc((Kg * M if img_block > 1 else 1) * sizeof(floating))
        if buf == NULL or gbuf == NULL:
            failed_p[0] = 1
        for u in prange(n_units, schedule="dynamic"):
            if buf != NULL and gbuf != NULL:
                ib = u // (groups * n_cb)
                grp = (u // n_cb) % groups
                cb = u % n_cb
                n0 = ib * img_block
                n1 = n0 + img_block if n0 + img_block < N else N
                c_lo = cb * chan_block
                c_hi = c_lo + chan_block if c_lo + chan_block < Cg else Cg
                _input_unit(gp, wp, dxp, N, C, H, W, K, kh, kw, sh, sw, pad_top, pad_left, dh,
                            dw, oh, ow, groups, n0, n1, grp, c_lo, c_hi, buf, gbuf,
                            tp + 3 * threadid() if tp != NULL else NULL)
        free(buf)
        free(gbuf)
    if failed:
        raise MemoryError("conv_backward_input: cannot allocate the per-thread buffers")
