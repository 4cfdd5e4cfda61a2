# cython: language_level=3
"""What the Cython kernels share: the geometry of a problem and the nogil helpers on it.

A kernel takes its arrays and one `Geom`, built by `geom` from a tuple the Python side keeps
per problem (see fastconv.kernels.im2col). Every size is in elements.
"""

from libc.stdint cimport int64_t


cdef extern from "_claim.h" nogil:
    int64_t fc_claim(int64_t* counter)


cdef struct Geom:
    Py_ssize_t N, C, H, W      # input batch
    Py_ssize_t K, kh, kw       # output channels (C for pools) and kernel size
    Py_ssize_t sh, sw          # stride
    Py_ssize_t pt, pl          # top / left padding (bottom / right follow from oh, ow)
    Py_ssize_t dh, dw          # dilation
    Py_ssize_t oh, ow          # output size
    Py_ssize_t groups


cdef inline Geom geom(tuple t) except *:
    """The `Geom` of ``(N, C, H, W, K, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, groups)``, with
    the checks the loops rely on (validated specs always pass them)."""
    cdef Geom g
    (g.N, g.C, g.H, g.W, g.K, g.kh, g.kw, g.sh, g.sw, g.pt, g.pl, g.dh, g.dw, g.oh, g.ow,
     g.groups) = t
    if (min(g.N, g.C, g.H, g.W, g.K, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.oh, g.ow,
            g.groups) < 1 or g.pt < 0 or g.pl < 0 or g.C % g.groups or g.K % g.groups):
        raise ValueError(f"not a valid problem geometry: {t}")
    return g


cdef inline Py_ssize_t first_inside(Py_ssize_t off, Py_ssize_t step) noexcept nogil:
    """Smallest t >= 0 with off + t*step >= 0."""
    if off >= 0:
        return 0
    return (step - 1 - off) // step


cdef inline Py_ssize_t end_inside(Py_ssize_t off, Py_ssize_t size, Py_ssize_t step,
                                  Py_ssize_t n) noexcept nogil:
    """Smallest t >= 0 with off + t*step >= size, capped at n."""
    cdef Py_ssize_t t
    if size - off <= 0:
        return 0
    t = (size - off + step - 1) // step
    return t if t < n else n


cdef inline Py_ssize_t claim(int64_t* counter) noexcept nogil:
    """The next work item of this call: the threads running it share ``counter``."""
    return fc_claim(counter)
