"""One thread count for every CPU kernel: Numba's, OpenMP's (Cython) and the BLAS's."""

from __future__ import annotations

import operator

__all__ = ["set_num_threads", "get_num_threads", "sync"]

_requested: int | None = None


def set_num_threads(n):
    """Use ``n`` threads in every CPU kernel (Numba, OpenMP and BLAS).

    Numba keeps its thread count per calling thread, so the count is re-applied before each
    kernel call from whichever Python thread makes it.
    """
    global _requested
    import numba
    import threadpoolctl

    try:
        if isinstance(n, bool) or type(n).__name__ == "bool_":
            raise TypeError
        n = operator.index(n)
    except TypeError as e:
        raise TypeError(f"n must be an int, got {n!r}") from e
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)
    threadpoolctl.threadpool_limits(n)  # BLAS and any OpenMP runtime already loaded
    try:
        from .kernels import _im2col
    except ImportError:
        pass
    else:
        _im2col.set_num_threads(n)
    _requested = n


def get_num_threads():
    """The number of threads CPU kernels use."""
    import numba

    return _requested if _requested is not None else numba.get_num_threads()


def sync():
    """Re-apply the requested count to Numba in the calling thread (a no-op when never set)."""
    if _requested is not None:
        import numba

        if numba.get_num_threads() != _requested:
            numba.set_num_threads(_requested)
