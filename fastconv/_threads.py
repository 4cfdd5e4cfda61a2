"""The one owner of threads: how many every CPU kernel uses, and the pool that runs them.

fastconv is called between the user's own NumPy operations, so its threads must never fight
NumPy's for the cores (DESIGN.md section 5). The design:

* **One pool, no spinning.** Every parallel CPU kernel (Numba and Cython alike) is a compiled,
  GIL-free *part* function that claims work items from a shared atomic counter until none are
  left. `fastconv.kernels._parallel.run` calls it on the calling thread and on ``k - 1`` pool
  threads. Between calls the
  pool threads block on a lock: no runtime of ours spins after a call, and none is started by
  importing fastconv. No OpenMP runtime and no Numba threading layer is involved, so no
  environment variable needs setting and none is overridden.
* **Small problems run on the calling thread**, below ``MIN_PARALLEL_NS`` of estimated
  single-thread work (the pool's hand-off costs about 20-40 us), as PyTorch's grain size.
* **One count**, `set_num_threads`, is global: it holds in every Python thread. It also limits
  the BLAS libraries (threadpoolctl), and while a kernel runs several parts, the BLAS it calls
  is held at one thread (`fastconv.kernels.im2col.serial_blas`).
* **Concurrent callers**: one call at a time uses the pool; a call from another Python thread
  meanwhile runs its parts on its own thread. Results depend only on how a kernel cuts its work
  into items, never on who runs them, so they are the same either way.
* **Fork-safe**: a child forked after fastconv ran (multiprocessing's default on Linux before
  Python 3.14, data-loader workers) forgets the parent's pool and starts its own on first use.

The default count is ``FASTCONV_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs this
process may run on.
"""

from __future__ import annotations

import operator
import os

import numpy as np

from .kernels import _parallel

__all__ = ["set_num_threads", "get_num_threads"]


def _default_count() -> int:
    for var in ("FASTCONV_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_parallel.count = _default_count()


def set_num_threads(n):
    """Use ``n`` threads in every CPU kernel (fastconv's own and the BLAS's).

    The count is global: it holds in every Python thread, the ones that exist and the ones
    started later.
    """
    import threadpoolctl

    try:
        if isinstance(n, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n)
    except TypeError as e:
        raise TypeError(f"n must be an int, got {n!r}") from e
    if not 1 <= n <= 4096:
        raise ValueError(f"n must be in [1, 4096], got {n}")
    threadpoolctl.threadpool_limits(n, user_api="blas")
    _parallel.count = n


def get_num_threads() -> int:
    """The number of threads CPU kernels use."""
    return _parallel.count
