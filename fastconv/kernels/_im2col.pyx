# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, language_level=3
"""The fused im2col + GEMM conv kernels (Cython, nogil, BLAS from ``scipy.linalg.cython_blas``),
and whole-matrix im2col / col2im, which the tests use to check the column layout.

Inputs are validated upstream (see ``fastconv._validate``). These cores check only what they
need to not crash with bounds checking off: the geometry and the array shapes, once per call,
raising ``ValueError``.

Layout of ``cols`` for channels ``c0 <= c < c1``, with ``c`` counted from ``c0``::

    cols[(c*kh + r)*kw + s, (n*oh + i)*ow + j] = x[n, c0 + c, i*sh - pad_top + r*dh,
                                                 j*sw - pad_left + s*dw]

or 0 where that position lies outside the input. Padding therefore needs no padded copy of
``x``: top/left padding is ``pad_top``/``pad_left`` and bottom/right padding is implied by
``oh``/``ow``.

The conv kernels (`conv_forward`, `conv_backward_weight`, `conv_backward_input`) use the same
layout on *tiles*, and are *part* functions of fastconv's thread pool (fastconv._threads):
every thread running a call claims tiles (or units) from the shared ``counter``, unfolds each
into its own cache-sized buffer and multiplies it at once with one single-threaded BLAS call.
Each item writes its own outputs, so the result depends on how the work is cut into items,
never on which thread ran which. Every GEMM must be single-threaded: the caller holds the BLAS
at one thread while the kernels run (`set_blas_threads`, see ``fastconv.kernels.im2col``).
"""

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from cython cimport floating
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from ._geom cimport Geom, claim, end_inside, first_inside, geom

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

ctypedef int (*_get_threads_t)() noexcept nogil
ctypedef void (*_set_threads_t)(int) noexcept nogil

cdef extern from *:
    """
    #if defined(_WIN32)
    static void *fc_blas_symbol(void *in_lib, const char *name) { return NULL; }
    #else
    #include <dlfcn.h>
    /* `name` in the shared library that holds the code at `in_lib`, or NULL */
    static void *fc_blas_symbol(void *in_lib, const char *name) {
        Dl_info info;
        void *lib, *sym;
        if (!dladdr(in_lib, &info) || info.dli_fname == NULL) return NULL;
        lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (lib == NULL) return NULL;
        sym = dlsym(lib, name);
        dlclose(lib);
        return sym;
    }
    #endif
    """
    void* fc_blas_symbol(void* in_lib, const char* name)

# The thread count of the BLAS library the kernels call (SciPy's, not NumPy's: their wheels
# ship separate OpenBLAS builds), found by name in that library. OpenBLAS's "local" setter is
# process-wide in its pthreads builds, so it is not used.
cdef _get_threads_t _blas_get_threads = NULL
cdef _set_threads_t _blas_set_threads = NULL
_GET_NAMES = (b"scipy_openblas_get_num_threads", b"scipy_openblas_get_num_threads64_",
              b"openblas_get_num_threads", b"openblas_get_num_threads64_",
              b"MKL_Get_Max_Threads", b"bli_thread_get_num_threads")
_SET_NAMES = (b"scipy_openblas_set_num_threads", b"scipy_openblas_set_num_threads64_",
              b"openblas_set_num_threads", b"openblas_set_num_threads64_",
              b"MKL_Set_Num_Threads", b"bli_thread_set_num_threads")

#: None when the conv kernels can call BLAS, else why not.
BLAS_UNAVAILABLE = None


cdef void* _capsule_pointer(dict capi, str name) except NULL:
    capsule = capi[name]
    return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


def _load_blas():
    global _sgemm, _dgemm
    from scipy.linalg import cython_blas

    global _blas_get_threads, _blas_set_threads
    capi = cython_blas.__pyx_capi__
    _sgemm = <_sgemm_t>_capsule_pointer(capi, "sgemm")
    _dgemm = <_dgemm_t>_capsule_pointer(capi, "dgemm")
    for get_name, set_name in zip(_GET_NAMES, _SET_NAMES):
        _blas_get_threads = <_get_threads_t>fc_blas_symbol(<void*>_sgemm, get_name)
        _blas_set_threads = <_set_threads_t>fc_blas_symbol(<void*>_sgemm, set_name)
        if _blas_get_threads != NULL and _blas_set_threads != NULL:
            break
    else:
        _blas_get_threads = NULL
        _blas_set_threads = NULL


try:
    _load_blas()
except Exception as e:  # scipy missing, or a build without cython_blas
    BLAS_UNAVAILABLE = f"scipy.linalg.cython_blas cannot be loaded ({type(e).__name__}: {e})"


def blas_threads():
    """The thread count of the BLAS the kernels call, or None where it cannot be read."""
    return _blas_get_threads() if _blas_get_threads != NULL else None


def set_blas_threads(int n):
    """Set the thread count of the BLAS the kernels call (process-wide; a no-op where unknown).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if _blas_set_threads != NULL:
        _blas_set_threads(n)


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
# the two loops everything is built from


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
    i_hi = end_inside(off_h, H, sh, oh)
    i_lo = first_inside(off_h, sh)
    if i_lo > i_hi:
        i_lo = i_hi
    j_hi = end_inside(off_w, W, sw, ow)
    j_lo = first_inside(off_w, sw)
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
                             Py_ssize_t p_sh, Geom g) noexcept nogil:
    """Overwrite one ``H x W`` plane (row stride ``p_sh``) with the fold of its ``kh*kw`` rows.

    Row ``r*kw + s`` of the columns starts at ``src0 + (r*kw + s)*ld`` and holds this image's
    ``oh*ow`` outputs. The plane is zeroed, then every in-bounds entry is added to the pixel it
    was copied from, in the fixed order ``(r, s, i, j)``: one writer, a deterministic sum.
    """
    cdef Py_ssize_t H = g.H, W = g.W, kh = g.kh, kw = g.kw, sh = g.sh, sw = g.sw
    cdef Py_ssize_t dh = g.dh, dw = g.dw, oh = g.oh, ow = g.ow, pad_top = g.pt, pad_left = g.pl
    cdef Py_ssize_t r, s, i, j, ih, off_h, off_w, i_lo, i_hi, j_lo, j_hi
    cdef floating* dst
    cdef const floating* src
    for ih in range(H):
        memset(plane + ih * p_sh, 0, W * sizeof(floating))
    for r in range(kh):
        off_h = r * dh - pad_top
        i_hi = end_inside(off_h, H, sh, oh)
        i_lo = first_inside(off_h, sh)
        if i_lo > i_hi:
            i_lo = i_hi
        for s in range(kw):
            off_w = s * dw - pad_left
            j_hi = end_inside(off_w, W, sw, ow)
            j_lo = first_inside(off_w, sw)
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
# whole-matrix im2col / col2im (the tests check the column layout with them)


cdef Py_ssize_t _channels(str name, Geom g, tuple x_shape, Py_ssize_t rows, Py_ssize_t ncols,
                          int c0, int c1) except -1:
    """Check the arrays against the geometry; return the resolved end channel c1."""
    if x_shape != (g.N, g.C, g.H, g.W):
        raise ValueError(f"{name}: an array of shape {x_shape} does not fit the geometry {g}")
    if c1 == -1:
        c1 = <int>g.C
    if not 0 <= c0 <= c1 <= g.C:
        raise ValueError(
            f"{name}: channel range c0={c0}, c1={c1} is not within the {g.C} channels "
            f"of an array of shape {x_shape}")
    cdef Py_ssize_t want_rows = (c1 - c0) * g.kh * g.kw, want_cols = g.N * g.oh * g.ow
    if rows != want_rows or ncols != want_cols:
        raise ValueError(
            f"{name}: cols has shape ({rows}, {ncols}), expected ((c1-c0)*kh*kw, N*oh*ow) = "
            f"({want_rows}, {want_cols}) for an array of shape {x_shape}, channels {c0}:{c1}")
    return c1


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] cols, tuple geometry, int c0=0,
           int c1=-1):
    """Unfold the sliding windows of ``x[:, c0:c1]`` into the columns of ``cols``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
        Unpadded input; only its last axis must be contiguous. Not modified.
    cols : ndarray, shape ((c1 - c0)*kh*kw, N*oh*ow), same dtype, C-contiguous
        Output, overwritten entirely (see the module docstring for the layout).
    geometry : tuple
        The `Geom` fields (see fastconv.kernels.im2col.geometry); windows that extend past the
        bottom/right edge read zeros.
    c0, c1 : int
        Channel range; ``c1=-1`` means ``C``.
    """
    cdef Geom g = geom(geometry)
    c1 = _channels("im2col", g, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
                   cols.shape[0], cols.shape[1], c0, c1)
    cdef Py_ssize_t x_sn = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_sc = x.strides[1] // sizeof(floating)
    cdef Py_ssize_t x_sh = x.strides[2] // sizeof(floating)
    cdef Py_ssize_t row, c
    with nogil:
        for row in range(cols.shape[0]):
            c = c0 + row // (g.kh * g.kw)
            _unfold_row(&x[0, 0, 0, 0] + c * x_sc, x_sn, x_sh, g.H, g.W,
                        ((row // g.kw) % g.kh) * g.dh - g.pt, (row % g.kw) * g.dw - g.pl, g.sh,
                        g.sw, g.oh, g.ow, 0, g.N * g.oh, &cols[row, 0])


def col2im(const floating[:, ::1] cols, floating[:, :, :, ::1] dx, tuple geometry, int c0=0,
           int c1=-1):
    """Fold ``cols`` back onto ``dx[:, c0:c1]``, summing overlaps: the adjoint of `im2col`.

    Parameters are those of `im2col`, with ``dx`` (shape (N, C, H, W)) in the place of ``x``.
    The planes ``dx[n, c0:c1]`` are overwritten: zeroed, then every in-bounds entry of ``cols``
    is added to the pixel it was copied from, in a fixed order. Other channels of ``dx`` are
    left untouched; ``cols`` is not modified.
    """
    cdef Geom g = geom(geometry)
    c1 = _channels("col2im", g, (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]),
                   cols.shape[0], cols.shape[1], c0, c1)
    cdef Py_ssize_t n_chan = c1 - c0, plane = g.oh * g.ow, khw = g.kh * g.kw
    cdef Py_ssize_t ld = cols.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_sh = dx.strides[2] // sizeof(floating)
    cdef Py_ssize_t p, n, cc
    with nogil:
        for p in range(g.N * n_chan):
            n = p // n_chan
            cc = p % n_chan
            _fold_plane(&cols[0, 0] + cc * khw * ld + n * plane, ld, &dx[n, c0 + cc, 0, 0],
                        dx_sh, g)


# ---------------------------------------------------------------------------------------------
# fused conv kernels: tiles of columns, one BLAS call per (tile, group)


cdef int _check_conv(str name, Geom g, tuple x_shape, Py_ssize_t K, Py_ssize_t w_cols,
                     tuple y_shape) except -1:
    """The arrays against the geometry. ``y`` is the output-shaped array."""
    if BLAS_UNAVAILABLE is not None:
        raise RuntimeError(f"{name}: {BLAS_UNAVAILABLE}")
    if x_shape != (g.N, g.C, g.H, g.W) or y_shape != (g.N, g.K, g.oh, g.ow) or K != g.K:
        raise ValueError(f"{name}: x of shape {x_shape} and an output-shaped array of shape "
                         f"{y_shape} do not fit the geometry {g}")
    if w_cols != (g.C // g.groups) * g.kh * g.kw:
        raise ValueError(
            f"{name}: weight matrix of shape ({K}, {w_cols}) does not fit x of shape "
            f"{x_shape} with groups={g.groups} and kernel ({g.kh}, {g.kw})")
    if max(g.oh * g.ow, w_cols, K) > BLAS_SIZE_LIMIT:
        raise ValueError(f"{name}: sizes exceed the 32-bit BLAS interface")
    return 0


cdef floating* _buffer(str name, Py_ssize_t n, floating kind) except NULL:
    """A per-call scratch buffer of ``n`` elements (``kind`` picks the type); free() it."""
    cdef floating* p = <floating*>malloc((n if n > 0 else 1) * sizeof(floating))
    if p == NULL:
        raise MemoryError(f"{name}: cannot allocate a scratch buffer of {n} elements")
    return p


cdef inline bint _pointwise(Geom g) noexcept nogil:
    """A 1x1 convolution with stride 1 and no padding: its columns are the input planes."""
    return (g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.pt == 0 and g.pl == 0
            and g.oh == g.H and g.ow == g.W)


cdef inline void _unfold_group(const floating* xp, Geom g, Py_ssize_t c0, Py_ssize_t crs,
                               Py_ssize_t g0, Py_ssize_t g1, floating* buf) noexcept nogil:
    """The columns of output rows [g0, g1) for the ``crs`` rows of a group (channels from c0):
    ``buf`` is a column-major ``(T x crs)`` tile, ``T = (g1 - g0)*ow``."""
    cdef Py_ssize_t khw = g.kh * g.kw, T = (g1 - g0) * g.ow, row, c
    for row in range(crs):
        c = c0 + row // khw
        _unfold_row(xp + c * g.H * g.W, g.C * g.H * g.W, g.W, g.H, g.W,
                    ((row // g.kw) % g.kh) * g.dh - g.pt, (row % g.kw) * g.dw - g.pl, g.sh,
                    g.sw, g.oh, g.ow, g0, g1, buf + row * T)


cdef void _forward_tile(const floating* xp, const floating* wp, const floating* bp,
                        floating* yp, Geom g, Py_ssize_t g0, Py_ssize_t g1, bint direct,
                        floating* buf, floating* prod) noexcept nogil:
    """Output rows [g0, g1) of every channel: unfold, GEMM per group, store with the bias.

    ``direct``: one GEMM per group and image the tile touches, writing straight into ``out``
    (``ldc = oh*ow``), then the bias added in place; else one GEMM per group into ``prod``
    (``K x T``), then copied to ``out`` with the bias.
    """
    cdef Py_ssize_t oh = g.oh, ow = g.ow, K = g.K, C = g.C
    cdef Py_ssize_t Cg = C // g.groups, Kg = K // g.groups, crs = Cg * g.kh * g.kw
    cdef Py_ssize_t T = (g1 - g0) * ow, plane = oh * ow, grp, k, r, n, i, j, seg
    cdef floating* d
    cdef const floating* s
    cdef const floating* cols
    cdef floating bk
    # 1x1, stride 1, no padding: the columns of an image are its input planes, read in place
    cdef bint in_place = direct and _pointwise(g)
    for grp in range(g.groups):
        if not in_place:
            _unfold_group(xp, g, grp * Cg, crs, g0, g1, buf)
        if direct:
            r = g0
            n = g0 // oh
            i = g0 - n * oh
            while r < g1:
                seg = oh - i if oh - i < g1 - r else g1 - r
                # column-major: out[n, k0:k1, i:i+seg] (seg*ow x Kg, ld plane) =
                #   columns (seg*ow x crs: buf rows, ld T; or x[n, c0:c1, i:i+seg], ld plane)
                #   @ w[k0:k1].T (crs x Kg)
                if in_place:
                    cols = xp + (n * C + grp * Cg) * plane + i * ow
                else:
                    cols = buf + (r - g0) * ow
                _gemm(c'N', c'N', <int>(seg * ow), <int>Kg, <int>crs, cols,
                      <int>(plane if in_place else T), wp + grp * Kg * crs, <int>crs, 0,
                      yp + (n * K + grp * Kg) * plane + i * ow, <int>plane)
                if bp != NULL:
                    for k in range(grp * Kg, (grp + 1) * Kg):
                        d = yp + (n * K + k) * plane + i * ow
                        bk = bp[k]
                        for j in range(seg * ow):
                            d[j] = d[j] + bk
                r += seg
                n += 1
                i = 0
        else:
            # column-major: prod[k0:k1, :] (T x Kg) = buf (T x crs) @ w[k0:k1].T (crs x Kg)
            _gemm(c'N', c'N', <int>T, <int>Kg, <int>crs, buf, <int>T, wp + grp * Kg * crs,
                  <int>crs, 0, prod + grp * Kg * T, <int>T)
    if direct:
        return
    for k in range(K):
        bk = bp[k] if bp != NULL else 0
        n = g0 // oh
        i = g0 - n * oh
        for r in range(g0, g1):
            d = yp + (n * K + k) * plane + i * ow
            s = prod + k * T + (r - g0) * ow
            if bp != NULL:
                for j in range(ow):
                    d[j] = s[j] + bk
            else:
                memcpy(d, s, ow * sizeof(floating))
            i += 1
            if i == oh:
                i = 0
                n += 1


def conv_forward(const floating[:, :, :, ::1] x, const floating[:, ::1] w,
                 const floating[::1] bias, floating[:, :, :, ::1] out, tuple geometry,
                 int tile_rows, bint direct, int64_t[::1] counter):
    """``out = conv2d(x, w) + bias`` by im2col + GEMM on tiles of the batch-folded columns.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), C-contiguous
    w : ndarray, shape (K, (C // groups)*kh*kw), C-contiguous
        The weights ``(K, C // groups, kh, kw)`` reshaped.
    bias : ndarray, shape (K,), or None
    out : ndarray, shape (N, K, oh, ow), C-contiguous
        Overwritten.
    geometry : tuple
        The `Geom` fields.
    tile_rows : int
        Output rows ``n*oh + i`` per tile: each tile is ``tile_rows*ow`` columns; tile ``t``
        is item ``t`` of ``counter``.
    direct : bool
        True: one GEMM per group and per image a tile touches, writing into ``out`` in place
        (best when a tile spans few images, or the weights are small: each call packs them).
        False: one GEMM per group and tile into a product buffer, then copied to ``out``.
    counter : ndarray of int64, shape (1,)

    Notes
    -----
    Each thread owns a column buffer of ``(C // groups)*kh*kw x tile_rows*ow`` elements and,
    unless ``direct``, a product buffer of ``K x tile_rows*ow``, allocated once per call.
    """
    cdef Geom g = geom(geometry)
    _check_conv("conv_forward", g, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
                w.shape[0], w.shape[1],
                (out.shape[0], out.shape[1], out.shape[2], out.shape[3]))
    if bias is not None and bias.shape[0] != g.K:
        raise ValueError(f"conv_forward: bias has {bias.shape[0]} entries, expected {g.K}")
    cdef Py_ssize_t G = g.N * g.oh
    if not 1 <= tile_rows <= G or tile_rows * g.ow > BLAS_SIZE_LIMIT:
        raise ValueError(f"conv_forward: tile_rows={tile_rows} must be in [1, {G}] and make "
                         "tiles within the 32-bit BLAS interface")
    cdef Py_ssize_t n_tiles = (G + tile_rows - 1) // tile_rows, T = tile_rows * g.ow
    cdef Py_ssize_t t, g0, g1
    cdef const floating* bp = &bias[0] if bias is not None else NULL
    cdef floating* buf = _buffer("conv_forward", w.shape[1] * T, x[0, 0, 0, 0])
    cdef floating* prod = NULL
    try:
        prod = _buffer("conv_forward", 1 if direct else g.K * T, x[0, 0, 0, 0])
        with nogil:
            t = claim(&counter[0])
            while t < n_tiles:
                g0 = t * tile_rows
                g1 = g0 + tile_rows if g0 + tile_rows < G else G
                _forward_tile(&x[0, 0, 0, 0], &w[0, 0], bp, &out[0, 0, 0, 0], g, g0, g1, direct,
                              buf, prod)
                t = claim(&counter[0])
    finally:
        free(buf)
        free(prod)


cdef void _forward_tile_channels_last(const floating* xp, const floating* wp,
                                      const floating* bp, floating* yp, Geom g, Py_ssize_t g0,
                                      Py_ssize_t g1, floating* buf) noexcept nogil:
    """`_forward_tile` of one group storing channels-last: output rows [g0, g1) are pixels
    ``g0*ow .. g1*ow`` of ``out`` (N, oh, ow, K), contiguous across images, so the tile is one
    GEMM whatever images it spans, its K channels a pixel's row (the bias laid there first)."""
    cdef Py_ssize_t K = g.K, crs = g.C * g.kh * g.kw, T = (g1 - g0) * g.ow, p
    cdef floating* d = yp + g0 * g.ow * K
    _unfold_group(xp, g, 0, crs, g0, g1, buf)
    if bp != NULL:
        for p in range(T):
            memcpy(d + p * K, bp, K * sizeof(floating))
    # column-major: out[pixels] (K x T, ld K) = w (K x crs) @ columns.T (crs x T)
    _gemm(c'T', c'T', <int>K, <int>T, <int>crs, wp, <int>crs, buf, <int>T,
          0 if bp == NULL else 1, d, <int>K)


def conv_forward_channels_last(const floating[:, :, :, ::1] x, const floating[:, ::1] w,
                               const floating[::1] bias, floating[:, :, :, ::1] out,
                               tuple geometry, int tile_rows, int64_t[::1] counter):
    """`conv_forward` of one group with ``out`` channels-last, (N, oh, ow, K): x is NCHW."""
    cdef Geom g = geom(geometry)
    _check_conv("conv_forward_channels_last", g,
                (x.shape[0], x.shape[1], x.shape[2], x.shape[3]), w.shape[0], w.shape[1],
                (out.shape[0], out.shape[3], out.shape[1], out.shape[2]))
    if g.groups != 1:
        raise ValueError(f"conv_forward_channels_last: groups={g.groups}, expected 1")
    if bias is not None and bias.shape[0] != g.K:
        raise ValueError(f"conv_forward_channels_last: bias has {bias.shape[0]} entries, "
                         f"expected {g.K}")
    cdef Py_ssize_t G = g.N * g.oh
    if not 1 <= tile_rows <= G or tile_rows * g.ow > BLAS_SIZE_LIMIT:
        raise ValueError(f"conv_forward_channels_last: tile_rows={tile_rows} must be in [1, "
                         f"{G}] and make tiles within the 32-bit BLAS interface")
    cdef Py_ssize_t n_tiles = (G + tile_rows - 1) // tile_rows, T = tile_rows * g.ow
    cdef Py_ssize_t t, g0, g1
    cdef const floating* bp = &bias[0] if bias is not None else NULL
    cdef floating* buf = _buffer("conv_forward_channels_last", w.shape[1] * T, x[0, 0, 0, 0])
    try:
        with nogil:
            t = claim(&counter[0])
            while t < n_tiles:
                g0 = t * tile_rows
                g1 = g0 + tile_rows if g0 + tile_rows < G else G
                _forward_tile_channels_last(&x[0, 0, 0, 0], &w[0, 0], bp, &out[0, 0, 0, 0], g,
                                            g0, g1, buf)
                t = claim(&counter[0])
    finally:
        free(buf)


cdef void _weight_tile(const floating* gp, const floating* xp, floating* acc, Geom g,
                       Py_ssize_t g0, Py_ssize_t g1, floating beta, bint direct, floating* buf,
                       floating* gbuf) noexcept nogil:
    """acc (K x crs) = beta*acc + grad_out[rows g0:g1] @ columns[rows g0:g1].T, per group.

    ``direct``: one GEMM per group and image the tile touches, reading grad_out in place
    (``ldb = oh*ow``); else grad_out's tile is first gathered into ``gbuf`` (``K x T``).
    """
    cdef Py_ssize_t oh = g.oh, ow = g.ow, K = g.K, C = g.C
    cdef Py_ssize_t Cg = C // g.groups, Kg = K // g.groups, crs = Cg * g.kh * g.kw
    cdef Py_ssize_t T = (g1 - g0) * ow, plane = oh * ow, grp, k, r, n, i, seg
    cdef floating b
    cdef const floating* cols
    cdef bint in_place = direct and _pointwise(g)
    if not direct:
        for k in range(K):  # gather the tile of grad_out: gbuf[k, (r - g0)*ow + j]
            n = g0 // oh
            i = g0 - n * oh
            for r in range(g0, g1):
                memcpy(gbuf + k * T + (r - g0) * ow, gp + (n * K + k) * plane + i * ow,
                       ow * sizeof(floating))
                i += 1
                if i == oh:
                    i = 0
                    n += 1
    for grp in range(g.groups):
        if not in_place:
            _unfold_group(xp, g, grp * Cg, crs, g0, g1, buf)
        if direct:
            r = g0
            n = g0 // oh
            i = g0 - n * oh
            b = beta
            while r < g1:
                seg = oh - i if oh - i < g1 - r else g1 - r
                # column-major: acc[k0:k1].T (crs x Kg) = b*acc[k0:k1].T
                #     + columns.T (crs x seg*ow; buf rows, or x[n, c0:c1, i:i+seg] in place)
                #     @ grad_out[n, k0:k1, i:i+seg].T (seg*ow x Kg)
                if in_place:
                    cols = xp + (n * C + grp * Cg) * plane + i * ow
                else:
                    cols = buf + (r - g0) * ow
                _gemm(c'T', c'N', <int>crs, <int>Kg, <int>(seg * ow), cols,
                      <int>(plane if in_place else T), gp + (n * K + grp * Kg) * plane + i * ow,
                      <int>plane, b, acc + grp * Kg * crs, <int>crs)
                b = 1
                r += seg
                n += 1
                i = 0
        else:
            # column-major: acc[k0:k1].T (crs x Kg) = b*acc[k0:k1].T
            #     + buf.T (crs x T) @ gbuf[k0:k1].T (T x Kg)
            _gemm(c'T', c'N', <int>crs, <int>Kg, <int>T, buf, <int>T, gbuf + grp * Kg * T,
                  <int>T, beta, acc + grp * Kg * crs, <int>crs)


def conv_backward_weight(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                         floating[:, :, ::1] slabs, tuple geometry, int tile_rows, bint direct,
                         int64_t[::1] counter):
    """Per slab ``s``: ``slabs[s] = grad_out @ columns(x).T`` over the tiles of that slab.

    Parameters
    ----------
    grad_out : ndarray, shape (N, K, oh, ow), C-contiguous
    x : ndarray, shape (N, C, H, W), C-contiguous
    slabs : ndarray, shape (n_slabs, K, (C // groups)*kh*kw), C-contiguous
        Overwritten: the tiles are cut into ``n_slabs`` contiguous slabs; slab ``s`` (item ``s``
        of ``counter``) sums its tiles' products in order. Their sum in slab order is the
        weight gradient: it depends on ``n_slabs`` and ``tile_rows`` only, never on the threads.
    tile_rows : int
        Output rows per tile, as for `conv_forward`.
    direct : bool
        True: one GEMM per group and per image a tile touches, reading grad_out in place.
        False: grad_out's tile is gathered into a buffer first, then one GEMM per group.
    counter : ndarray of int64, shape (1,)

    Notes
    -----
    Per thread: a column buffer of ``(C // groups)*kh*kw x tile_rows*ow`` and, unless
    ``direct``, a gathered grad_out tile of ``K x tile_rows*ow`` elements.
    """
    cdef Geom g = geom(geometry)
    _check_conv("conv_backward_weight", g, (x.shape[0], x.shape[1], x.shape[2], x.shape[3]),
                slabs.shape[1], slabs.shape[2],
                (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]))
    cdef Py_ssize_t G = g.N * g.oh, n_slabs = slabs.shape[0]
    if not 1 <= tile_rows <= G or tile_rows * g.ow > BLAS_SIZE_LIMIT:
        raise ValueError(f"conv_backward_weight: tile_rows={tile_rows} must be in [1, {G}] "
                         "and make tiles within the 32-bit BLAS interface")
    cdef Py_ssize_t n_tiles = (G + tile_rows - 1) // tile_rows, T = tile_rows * g.ow
    if not 1 <= n_slabs <= n_tiles:
        raise ValueError(f"conv_backward_weight: {n_slabs} slabs for {n_tiles} tiles")
    cdef Py_ssize_t crs = slabs.shape[2], sl, t, t0, g0, g1
    cdef floating* buf = _buffer("conv_backward_weight", crs * T, x[0, 0, 0, 0])
    cdef floating* gbuf = NULL
    try:
        gbuf = _buffer("conv_backward_weight", 1 if direct else g.K * T, x[0, 0, 0, 0])
        with nogil:
            sl = claim(&counter[0])
            while sl < n_slabs:
                t0 = sl * n_tiles // n_slabs
                for t in range(t0, (sl + 1) * n_tiles // n_slabs):
                    g0 = t * tile_rows
                    g1 = g0 + tile_rows if g0 + tile_rows < G else G
                    _weight_tile(&grad_out[0, 0, 0, 0], &x[0, 0, 0, 0], &slabs[sl, 0, 0], g, g0,
                                 g1, 0 if t == t0 else 1, direct, buf, gbuf)
                sl = claim(&counter[0])
    finally:
        free(buf)
        free(gbuf)


cdef void _input_unit(const floating* gp, const floating* wp, floating* dxp, Geom g,
                      Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t grp, Py_ssize_t c_lo,
                      Py_ssize_t c_hi, floating* buf, floating* gbuf) noexcept nogil:
    """dx[n0:n1, grp*Cg + c_lo : grp*Cg + c_hi] = col2im(w[group, c_lo:c_hi].T @ grad_out)."""
    cdef Py_ssize_t khw = g.kh * g.kw, K = g.K, C = g.C, Cg = C // g.groups, Kg = K // g.groups
    cdef Py_ssize_t crs = Cg * khw, plane = g.oh * g.ow, M = (n1 - n0) * plane
    cdef Py_ssize_t nc = c_hi - c_lo, k, n, cc
    cdef const floating* a
    cdef Py_ssize_t lda
    if _pointwise(g):
        # no col2im: dx[n, c_lo:c_hi] (plane x nc) = grad_out[n, k0:k1] @ w[k0:k1, c_lo:c_hi]
        for n in range(n0, n1):
            _gemm(c'N', c'T', <int>plane, <int>nc, <int>Kg, gp + (n * K + grp * Kg) * plane,
                  <int>plane, wp + grp * Kg * crs + c_lo, <int>crs, 0,
                  dxp + (n * C + grp * Cg + c_lo) * plane, <int>plane)
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
    for n in range(n0, n1):
        for cc in range(nc):
            _fold_plane(buf + cc * khw * M + (n - n0) * plane, M,
                        dxp + (n * C + grp * Cg + c_lo + cc) * g.H * g.W, g.W, g)


def conv_backward_input(const floating[:, :, :, ::1] grad_out, const floating[:, ::1] w,
                        floating[:, :, :, ::1] dx, tuple geometry, int chan_block,
                        int img_block, int64_t[::1] counter):
    """``dx = col2im(w.T @ grad_out)`` per group, on units of whole images and channel blocks.

    Parameters
    ----------
    grad_out : ndarray, shape (N, K, oh, ow), C-contiguous
    w : ndarray, shape (K, (C // groups)*kh*kw), C-contiguous
    dx : ndarray, shape (N, C, H, W), C-contiguous
        Overwritten.
    geometry : tuple
        The `Geom` fields.
    chan_block, img_block : int
        A unit of work (an item of ``counter``) is ``img_block`` images times ``chan_block``
        input channels of one group: one GEMM gives its ``chan_block*kh*kw x img_block*oh*ow``
        columns, folded at once onto those planes of ``dx``. Units write disjoint planes and
        each plane is summed in a fixed order, so the result does not depend on the threads.
    counter : ndarray of int64, shape (1,)
    """
    cdef Geom g = geom(geometry)
    _check_conv("conv_backward_input", g, (dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3]),
                w.shape[0], w.shape[1],
                (grad_out.shape[0], grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]))
    cdef Py_ssize_t N = g.N, Cg = g.C // g.groups, Kg = g.K // g.groups, khw = g.kh * g.kw
    if not (1 <= chan_block <= Cg and 1 <= img_block <= N
            and img_block * g.oh * g.ow <= BLAS_SIZE_LIMIT):
        raise ValueError(f"conv_backward_input: chan_block={chan_block} must be in [1, {Cg}] "
                         f"and img_block={img_block} in [1, {N}], within the 32-bit BLAS "
                         "interface")
    cdef Py_ssize_t M = img_block * g.oh * g.ow
    cdef Py_ssize_t n_cb = (Cg + chan_block - 1) // chan_block
    cdef Py_ssize_t n_units = (N + img_block - 1) // img_block * g.groups * n_cb
    cdef Py_ssize_t u, grp, n0, n1, c_lo, c_hi
    cdef floating* buf = _buffer("conv_backward_input", chan_block * khw * M, dx[0, 0, 0, 0])
    cdef floating* gbuf = NULL
    try:
        gbuf = _buffer("conv_backward_input", Kg * M if img_block > 1 else 1, dx[0, 0, 0, 0])
        with nogil:
            u = claim(&counter[0])
            while u < n_units:
                grp = (u // n_cb) % g.groups
                n0 = u // (g.groups * n_cb) * img_block
                n1 = n0 + img_block if n0 + img_block < N else N
                c_lo = u % n_cb * chan_block
                c_hi = c_lo + chan_block if c_lo + chan_block < Cg else Cg
                _input_unit(&grad_out[0, 0, 0, 0], &w[0, 0], &dx[0, 0, 0, 0], g, n0, n1, grp,
                            c_lo, c_hi, buf, gbuf)
                u = claim(&counter[0])
    finally:
        free(buf)
        free(gbuf)


# ---------------------------------------------------------------------------------------------
# channels-last 1x1 layers: the arrays are the GEMM's matrices, read and written in place


cdef int _check_rows(str name, Py_ssize_t a_rows, Py_ssize_t c_rows, Py_ssize_t rows) except -1:
    if BLAS_UNAVAILABLE is not None:
        raise RuntimeError(f"{name}: {BLAS_UNAVAILABLE}")
    if a_rows != c_rows:
        raise ValueError(f"{name}: {a_rows} rows against {c_rows}")
    if not 1 <= rows <= BLAS_SIZE_LIMIT:
        raise ValueError(f"{name}: rows={rows} must be in [1, {BLAS_SIZE_LIMIT}]")
    return 0


def rows_times(const floating[:, ::1] a, const floating[:, ::1] b, const floating[::1] bias,
               floating[:, ::1] c, bint trans_b, Py_ssize_t rows, int64_t[::1] counter):
    """``c = a @ (b.T if trans_b else b) + bias`` by blocks of ``rows`` rows of ``a`` and ``c``
    (block ``t`` is item ``t`` of ``counter``): a channels-last 1x1 layer's forward
    (``a`` = x as (N*H*W, C), ``b`` = w as (C, K)) and grad-input (``a`` = grad-output as
    (N*H*W, K), ``b`` = the same w, transposed). Each row is one GEMM's, whoever runs it."""
    _check_rows("rows_times", a.shape[0], c.shape[0], rows)
    cdef Py_ssize_t m = a.shape[0], kd = a.shape[1], nc = c.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != kd or \
            (b.shape[0] if trans_b else b.shape[1]) != nc:
        raise ValueError(f"rows_times: a of shape ({m}, {kd}), b of shape ({b.shape[0]}, "
                         f"{b.shape[1]}) and c of shape ({m}, {nc}) do not fit")
    if max(kd, nc) > BLAS_SIZE_LIMIT:
        raise ValueError("rows_times: sizes exceed the 32-bit BLAS interface")
    if bias is not None and bias.shape[0] != nc:
        raise ValueError(f"rows_times: bias has {bias.shape[0]} entries, expected {nc}")
    if m == 0 or nc == 0:
        return
    cdef Py_ssize_t n_items = (m + rows - 1) // rows, t, r0, r1, i
    cdef const floating* bp = &bias[0] if bias is not None else NULL
    cdef floating beta = 0 if bp == NULL else 1
    with nogil:
        t = claim(&counter[0])
        while t < n_items:
            r0 = t * rows
            r1 = r0 + rows if r0 + rows < m else m
            if bp != NULL:
                for i in range(r0, r1):
                    memcpy(&c[i, 0], bp, nc * sizeof(floating))
            if kd == 0:
                if bp == NULL:
                    memset(&c[r0, 0], 0, (r1 - r0) * nc * sizeof(floating))
            else:
                # column-major: c[r0:r1].T (nc x m) = op(b).T (nc x kd) @ a[r0:r1].T (kd x m)
                _gemm(c'T' if trans_b else c'N', c'N', <int>nc, <int>(r1 - r0), <int>kd,
                      &b[0, 0], <int>(kd if trans_b else nc), &a[r0, 0], <int>kd, beta,
                      &c[r0, 0], <int>nc)
            t = claim(&counter[0])


def rows_gram(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, :, ::1] slabs,
              Py_ssize_t rows, int64_t[::1] counter):
    """Per slab ``s`` (item ``s`` of ``counter``): ``slabs[s] = a[rows_s].T @ b[rows_s]`` over
    the slab's contiguous share of the rows, in blocks of at most ``rows``: a channels-last
    1x1 layer's grad-weight (``a`` = x as (N*H*W, C), ``b`` = grad-output as (N*H*W, K)).
    Their sum in slab order is the product; it depends on the slab count only."""
    _check_rows("rows_gram", a.shape[0], b.shape[0], rows)
    cdef Py_ssize_t m = a.shape[0], p = a.shape[1], q = b.shape[1], n_slabs = slabs.shape[0]
    if slabs.shape[1] != p or slabs.shape[2] != q:
        raise ValueError(f"rows_gram: slabs of shape ({n_slabs}, {slabs.shape[1]}, "
                         f"{slabs.shape[2]}) for a product of shape ({p}, {q})")
    if not 1 <= n_slabs <= max(m, 1) or max(p, q) > BLAS_SIZE_LIMIT:
        raise ValueError(f"rows_gram: {n_slabs} slabs for {m} rows, or sizes beyond the "
                         "32-bit BLAS interface")
    if p == 0 or q == 0:
        return
    cdef Py_ssize_t s, r0, r1, end
    cdef floating beta
    with nogil:
        s = claim(&counter[0])
        while s < n_slabs:
            r0 = s * m // n_slabs
            end = (s + 1) * m // n_slabs
            if r0 == end:
                memset(&slabs[s, 0, 0], 0, p * q * sizeof(floating))
            beta = 0
            while r0 < end:
                r1 = r0 + rows if r0 + rows < end else end
                # column-major: slab.T (q x p) = b[r0:r1].T (q x m) @ a[r0:r1] (m x p)
                _gemm(c'N', c'T', <int>q, <int>p, <int>(r1 - r0), &b[r0, 0], <int>q,
                      &a[r0, 0], <int>p, beta, &slabs[s, 0, 0], <int>q)
                beta = 1
                r0 = r1
            s = claim(&counter[0])
